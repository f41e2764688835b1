"""Tiny real timm and diffusers models for tests (random weights, no downloads)."""
import timm
import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel


def tiny_vit(num_heads: int = 4, depth: int = 2, embed_dim: int = 32, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        'vit_tiny_patch16_224', pretrained=False, img_size=32, patch_size=8, embed_dim=embed_dim, depth=depth,
        num_heads=num_heads, num_classes=10, **kwargs)


def tiny_dit(num_heads: int = 4, num_layers: int = 2, head_dim: int = 8, sample_size: int = 8, patch_size: int = 2,
             in_channels: int = 3, learn_sigma: bool = False, num_classes: int = 10,
             seed: int = 0) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=num_heads, attention_head_dim=head_dim, in_channels=in_channels,
        out_channels=2 * in_channels if learn_sigma else in_channels, num_layers=num_layers,
        sample_size=sample_size, patch_size=patch_size, num_embeds_ada_norm=num_classes, norm_type='ada_norm_zero')


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D', 'DownEncoderBlock2D'),
        up_block_types=('UpDecoderBlock2D', 'UpDecoderBlock2D'), block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, layers_per_block=1, sample_size=16)


def dit_inputs(batch: int = 2, channels: int = 3, size: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, channels, size, size, generator=gen),
                timestep=torch.randint(0, 1000, (batch,), generator=gen),
                class_labels=torch.randint(0, 10, (batch,), generator=gen))
