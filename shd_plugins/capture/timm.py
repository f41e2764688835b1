"""timm attention: the ``Attention`` of the VisionTransformer family, and the timm attention SHD refuses.

``q_norm`` and ``k_norm`` are always called (``nn.Identity`` without QK-norm), so their outputs are the final
(B, H, N, d) q and k on both the fused and the unfused path; v comes from the ``qkv`` output and ``W_O`` from
``proj.weight``. Nothing here imports timm: classes are looked up among the modules already imported.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .registry import AttentionAdapter, loaded_class, refuse_attention, register_attention_adapter

__all__ = ['TimmAttentionAdapter']


@register_attention_adapter(first=False)
class TimmAttentionAdapter(AttentionAdapter):
    """timm ``Attention`` (ViT, DeiT, DeiT-distilled, ``qk_norm``); exactly that class, not its subclasses."""

    name = 'timm'

    def claims(self, module: nn.Module) -> bool:
        cls = loaded_class('timm.layers.attention', 'Attention')
        return cls is not None and type(module) is cls

    def geometry(self, module: nn.Module) -> tuple[int, int, float]:
        return module.num_heads, module.head_dim, module.scale

    def install(self, module: nn.Module, recorder) -> None:
        recorder.hook(module.q_norm, lambda slot, out: setattr(slot, 'q', out))
        recorder.hook(module.k_norm, lambda slot, out: setattr(slot, 'k', out))
        if recorder.record_values:
            heads, head_dim = module.num_heads, module.head_dim

            def record_v(slot, out: torch.Tensor) -> None:
                batch, tokens, _ = out.shape
                slot.v = out.view(batch, tokens, 3, heads, head_dim)[:, :, 2].transpose(1, 2)
            recorder.hook(module.qkv, record_v)

    def out_weight(self, module: nn.Module) -> torch.Tensor:
        return module.proj.weight

    def output_problems(self, module: nn.Module) -> list[str]:
        reasons = []
        if not isinstance(module.norm, nn.Identity):
            reasons.append('scale_norm normalises the concatenated head outputs before the projection')
        if getattr(module, 'gate', None) is not None:
            reasons.append('a gate multiplies the head outputs before the projection')
        return reasons


for _path, _name, _reason in (
        ('timm.layers.attention', 'AttentionRope', 'rotary embeddings are applied to q/k after the q/k norms'),
        ('timm.layers.diff_attention', 'DiffAttention', 'differential attention subtracts two softmax maps'),
        ('timm.models.eva', 'EvaAttention', 'EVA attention applies rotary embeddings after the q/k norms'),
        ('timm.layers.attention2d', 'MultiQueryAttention2d', 'multi-query attention shares k/v across heads'),
        ('timm.layers.attention2d', 'MultiQueryAttentionV2', 'multi-query attention shares k/v across heads'),
):
    refuse_attention(_path, _name, _reason)
