"""diffusers attention: ``Attention`` self-attention (DiT, PixArt), and the diffusers attention SHD refuses.

Projections are hooked first and ``norm_q``/``norm_k`` (when a processor applies them) overwrite q/k after, so the
recorded q, k are what the kernel sees for these processors whichever is active (hooks survive
``enable_xformers_memory_efficient_attention``). ``fuse_qkv_projections`` is followed through ``to_qkv``.
Nothing here imports diffusers: classes are looked up among the modules already imported.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .registry import AttentionAdapter, heads_first, loaded_class, per_head, register_attention_adapter

__all__ = ['DiffusersAttentionAdapter']


@register_attention_adapter(first=False)
class DiffusersAttentionAdapter(AttentionAdapter):
    """diffusers ``Attention`` self-attention; cross-attention layers are skipped, joint attention is refused."""

    name = 'diffusers'

    def claims(self, module: nn.Module) -> bool:
        cls = loaded_class('diffusers.models.attention_processor', 'Attention')
        return cls is not None and isinstance(module, cls)

    def is_distilled(self, module: nn.Module) -> bool:
        return not module.is_cross_attention

    def refusal(self, module: nn.Module) -> str | None:
        if getattr(module, 'add_q_proj', None) is not None or getattr(module, 'added_kv_proj_dim', None):
            return 'joint attention (SD3/Flux style) mixes text tokens into the keys'
        return None

    def geometry(self, module: nn.Module) -> tuple[int, int, float]:
        return module.heads, module.inner_dim // module.heads, float(module.scale)

    def install(self, module: nn.Module, recorder) -> None:
        heads, record_values = module.heads, recorder.record_values
        if getattr(module, 'fused_projections', False) and hasattr(module, 'to_qkv'):
            def record_qkv(slot, out: torch.Tensor) -> None:
                q, k, v = out.chunk(3, dim=-1)
                slot.q, slot.k = heads_first(q, heads), heads_first(k, heads)
                if record_values:
                    slot.v = heads_first(v, heads)
            recorder.hook(module.to_qkv, record_qkv)
        else:
            recorder.hook(module.to_q, lambda slot, out: setattr(slot, 'q', heads_first(out, heads)))
            recorder.hook(module.to_k, lambda slot, out: setattr(slot, 'k', heads_first(out, heads)))
            if record_values:
                recorder.hook(module.to_v, lambda slot, out: setattr(slot, 'v', heads_first(out, heads)))
        if getattr(module, 'norm_q', None) is not None:
            recorder.hook(module.norm_q, lambda slot, out: setattr(slot, 'q', per_head(out, heads)))
        if getattr(module, 'norm_k', None) is not None:
            recorder.hook(module.norm_k, lambda slot, out: setattr(slot, 'k', per_head(out, heads)))

    def out_weight(self, module: nn.Module) -> torch.Tensor:
        return module.to_out[0].weight


class _OtherDiffusersAttention(AttentionAdapter):
    """Any other diffusers attention class (``AttentionModuleMixin``): refused until an adapter supports it."""

    name = 'refused:diffusers-other'

    def claims(self, module: nn.Module) -> bool:
        mixin = loaded_class('diffusers.models.attention', 'AttentionModuleMixin')
        return mixin is not None and isinstance(module, mixin)

    def refusal(self, module: nn.Module) -> str | None:
        return f'{type(module).__name__} is a diffusers attention class not yet supported'


register_attention_adapter(_OtherDiffusersAttention, first=False)
