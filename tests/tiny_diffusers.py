"""Tiny random diffusers transformers of the families SHD captures, with their forward inputs (no downloads).

Every builder takes the head count (head dim fixed per family) and a seed; every ``*_inputs`` takes the text length
and the latent size, so that a test can give teacher and student the same or different token sets.
"""
import diffusers
import torch

#: The diffusers versions these builders and tests/test_diffusers_families.py were run with (pyproject's floor is the
#: first). Under 0.35.2 every family passes except two cases that fail inside diffusers itself, before any capture:
#: HunyuanDiT (0.35.2 raises on a deprecation of its own get_2d_sincos_pos_embed) and a Flux forward with a (B, N)
#: attention_mask (0.35.2's native dispatcher cannot broadcast it).
TESTED_DIFFUSERS = ('0.35.2', '0.42.1')


def _seeded(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def sd3(heads: int = 4, seed: int = 0, dual: bool = False):
    """SD3 (two joint blocks, the last ``context_pre_only``) or, ``dual``, SD3.5 (block 0 adds ``attn2``; qk norm)."""
    torch.manual_seed(seed)
    extra = dict(dual_attention_layers=(0,), qk_norm='rms_norm') if dual else {}
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=heads,
        joint_attention_dim=12, caption_projection_dim=heads * 8, pooled_projection_dim=10, out_channels=4,
        pos_embed_max_size=8, **extra).eval()


def sd3_inputs(text: int = 5, size: int = 8, seed: int = 0) -> dict:
    gen = _seeded(seed)
    return dict(hidden_states=torch.randn(2, 4, size, size, generator=gen),
                encoder_hidden_states=torch.randn(2, text, 12, generator=gen),
                pooled_projections=torch.randn(2, 10, generator=gen), timestep=torch.tensor([3, 500]))


def flux(heads: int = 4, seed: int = 0):
    """One double-stream and one single-stream block; RoPE axes (2, 2, 4) over head dim 8."""
    torch.manual_seed(seed)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=heads, joint_attention_dim=12, pooled_projection_dim=10, axes_dims_rope=(2, 2, 4)).eval()


def flux_inputs(text: int = 5, size: int = 4, seed: int = 0) -> dict:
    gen = _seeded(seed)
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing='ij')
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
    return dict(hidden_states=torch.randn(2, size * size, 4, generator=gen),
                encoder_hidden_states=torch.randn(2, text, 12, generator=gen),
                pooled_projections=torch.randn(2, 10, generator=gen), timestep=torch.tensor([0.3, 0.7]),
                img_ids=img_ids, txt_ids=torch.zeros(text, 3))


def pixart(heads: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=heads * 8, sample_size=8, patch_size=2, caption_channels=12, norm_num_groups=2).eval()


def pixart_inputs(text: int = 5, size: int = 8, seed: int = 0) -> dict:
    gen = _seeded(seed)
    return dict(hidden_states=torch.randn(2, 4, size, size, generator=gen),
                encoder_hidden_states=torch.randn(2, text, 12, generator=gen), timestep=torch.tensor([10, 600]),
                added_cond_kwargs={'resolution': None, 'aspect_ratio': None})


def hunyuan(heads: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.HunyuanDiT2DModel(
        num_attention_heads=heads, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8,
        hidden_size=heads * 8, num_layers=2, cross_attention_dim=12, cross_attention_dim_t5=16,
        pooled_projection_dim=10, text_len=5, text_len_t5=6, use_style_cond_and_image_meta_size=False).eval()


def hunyuan_inputs(text: int = 5, size: int = 8, seed: int = 0) -> dict:
    """HunyuanDiT takes its 2D RoPE from the pipeline; it is built here as HunyuanDiTPipeline does."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    gen, grid = _seeded(seed), size // 2
    return dict(hidden_states=torch.randn(2, 4, size, size, generator=gen), timestep=torch.tensor([3.0, 500.0]),
                encoder_hidden_states=torch.randn(2, text, 12, generator=gen), text_embedding_mask=torch.ones(2, text),
                encoder_hidden_states_t5=torch.randn(2, 6, 16, generator=gen), text_embedding_mask_t5=torch.ones(2, 6),
                image_rotary_emb=get_2d_rotary_pos_embed(8, ((0, 0), (grid, grid)), (grid, grid), use_real=True))


def wan(heads: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=12, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32).eval()


def wan_inputs(text: int = 5, size: int = 8, seed: int = 0, frames: int = 2) -> dict:
    gen = _seeded(seed)
    return dict(hidden_states=torch.randn(2, 4, frames, size, size, generator=gen), timestep=torch.tensor([3, 500]),
                encoder_hidden_states=torch.randn(2, text, 12, generator=gen))


def cogvideox(heads: int = 4, seed: int = 0):
    """Head dim 16: CogVideoX's 3D RoPE splits it into even temporal and spatial parts."""
    torch.manual_seed(seed)
    return diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=12, num_layers=2, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
        max_text_seq_length=5, use_rotary_positional_embeddings=True).eval()


def cogvideox_inputs(text: int = 5, size: int = 8, seed: int = 0) -> dict:
    """CogVideoX takes its 3D RoPE from the pipeline; it is built here as CogVideoXPipeline does (2 latent frames)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    gen, grid = _seeded(seed), size // 2
    return dict(hidden_states=torch.randn(2, 2, 4, size, size, generator=gen), timestep=torch.tensor([3, 500]),
                encoder_hidden_states=torch.randn(2, text, 12, generator=gen),
                image_rotary_emb=get_3d_rotary_pos_embed(16, ((0, 0), (grid, grid)), (grid, grid), 2))


def sana(heads: int = 2, seed: int = 0):
    """Sana: linear self-attention (refused by SHD) and softmax cross-attention."""
    torch.manual_seed(seed)
    return diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=heads * 8, caption_channels=12,
        sample_size=8, patch_size=2)
