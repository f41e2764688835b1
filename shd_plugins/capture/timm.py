"""timm attention: ``Attention`` of the VisionTransformer family, the rotary ``AttentionRope`` / ``EvaAttention`` of
EVA02 and the ``vit_*_rope`` models, and the timm attention SHD refuses.

``q_norm`` and ``k_norm`` are always called (``nn.Identity`` without QK-norm), so their outputs are the per-head
(B, H, N, d) q and k on both the fused and the unfused path. Rotary attention rotates them afterwards, so its adapter
also reads the ``rope`` tensor the block passes to the attention's forward and applies timm's own rotation to the
recorded q and k, exactly as the forward does (patch tokens only: the leading ``num_prefix_tokens`` stay unrotated).
Nothing here imports timm until a model holds one of these classes: classes are looked up among the modules
already imported.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import (
    AttentionAdapter,
    forward_argument,
    heads_first,
    loaded_class,
    refuse_attention,
    register_attention_adapter,
)

__all__ = ['TimmAttentionAdapter', 'TimmRopeAttentionAdapter']


def _record_v_from_qkv(module: nn.Module, recorder) -> None:
    """v from the output of a fused ``qkv`` linear laid out (B, N, 3, H, d), as timm reshapes it."""
    heads, head_dim = module.num_heads, module.head_dim

    def record_v(slot, out: torch.Tensor) -> None:
        batch, tokens, _ = out.shape
        slot.v = out.view(batch, tokens, 3, heads, head_dim)[:, :, 2].transpose(1, 2)
    recorder.hook(module.qkv, record_v)


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
            _record_v_from_qkv(module, recorder)

    def out_weight(self, module: nn.Module) -> torch.Tensor:
        return module.proj.weight

    def output_problems(self, module: nn.Module) -> list[str]:
        reasons = []
        if not isinstance(module.norm, nn.Identity):
            reasons.append('scale_norm normalises the concatenated head outputs before the projection')
        if getattr(module, 'gate', None) is not None:
            reasons.append('a gate multiplies the head outputs before the projection')
        return reasons


@register_attention_adapter(first=False)
class TimmRopeAttentionAdapter(TimmAttentionAdapter):
    """timm rotary attention: ``AttentionRope`` (``vit_*_rope*`` incl. mixed RoPE, DeepSeek ViT) and ``EvaAttention``
    (EVA02, ``vit_*_rope_reg*``), fused or separate q/k/v projections, QK-norm, ``rotate_half``, grouped k/v heads.

    The recorded q and k are ``cat(prefix, apply_rot_embed_cat(patch, rope, half))`` of the q/k-norm outputs, cast
    to v's dtype: what the attention kernel receives. Grouped k/v heads (``num_kv_heads``) are repeated to the query
    heads as the forward does. Attention masks (``attn_mask``, ``is_causal``) are refused while recording.
    """

    name = 'timm_rope'

    def claims(self, module: nn.Module) -> bool:
        classes = (loaded_class('timm.layers.attention', 'AttentionRope'), loaded_class('timm.models.eva',
                                                                                       'EvaAttention'))
        return any(cls is not None and type(module) is cls for cls in classes)

    def install(self, module: nn.Module, recorder) -> None:
        from timm.layers import apply_rot_embed_cat

        prefix, half = module.num_prefix_tokens, getattr(module, 'rotate_half', False)
        groups = getattr(module, 'num_kv_groups', 1)
        call: dict = {}  # this forward's rope and the dtype the forward casts the rotated q/k to (v's)

        def read_call(slot, args: tuple, kwargs: dict) -> None:
            # forward(x, rope=None, attn_mask=None, is_causal=False)
            if forward_argument(args, kwargs, 2, 'attn_mask') is not None or forward_argument(
                    args, kwargs, 3, 'is_causal', False):
                raise ValueError(
                    f'{type(module).__name__} was called with attn_mask or is_causal while SHD recorded it: the '
                    f'captured maps would leave the mask out. Record unmasked forwards and pass key_mask/query_mask '
                    f'to SHDDistiller.compute_loss instead.')
            call['rope'] = forward_argument(args, kwargs, 1, 'rope')

        def rotated(x: torch.Tensor) -> torch.Tensor:
            rope = call.get('rope')
            if rope is None:
                return x
            patch = apply_rot_embed_cat(x[:, :, prefix:, :], rope, half=half)
            return torch.cat([x[:, :, :prefix, :], patch], dim=2).to(call['dtype'])

        def record_k(slot, out: torch.Tensor) -> None:
            slot.k = rotated(out).repeat_interleave(groups, dim=1) if groups > 1 else rotated(out)
            call.clear()  # drop the reference to the rope tensor

        recorder.hook_inputs(module, read_call)
        recorder.hook_inputs(module.q_norm, lambda slot, args, kwargs: call.__setitem__('dtype', args[0].dtype))
        recorder.hook(module.q_norm, lambda slot, out: setattr(slot, 'q', rotated(out)))
        recorder.hook(module.k_norm, record_k)
        if recorder.record_values:
            self._record_v(module, recorder, groups)

    @staticmethod
    def _record_v(module: nn.Module, recorder, groups: int) -> None:
        if module.qkv is None:  # separate projections (EVA02 B/L, grouped k/v heads)
            kv_heads = module.num_heads // groups

            def record_v(slot, out: torch.Tensor) -> None:
                v = heads_first(out, kv_heads)
                slot.v = v.repeat_interleave(groups, dim=1) if groups > 1 else v
            recorder.hook(module.v_proj, record_v)
        elif getattr(module, 'q_bias', None) is None:
            _record_v_from_qkv(module, recorder)
        else:
            # EvaAttention with q/v biases computes F.linear(x, qkv.weight, bias) without calling ``qkv``: v is the
            # v rows of that product, taken from the forward's input.
            width = module.num_heads * module.head_dim

            def record_v_from_input(slot, args: tuple, kwargs: dict) -> None:
                x = args[0] if args else kwargs['x']
                slot.v = heads_first(F.linear(x, module.qkv.weight[2 * width:], module.v_bias), module.num_heads)
            recorder.hook_inputs(module, record_v_from_input)


_WINDOW = ('window attention attends within local (shifted) windows and adds a per-window relative position bias: '
           'there is no global N x N map per head to distil')
for _path, _name, _reason in (
        ('timm.layers.diff_attention', 'DiffAttention', 'differential attention subtracts two softmax maps'),
        ('timm.layers.attention2d', 'MultiQueryAttention2d', 'multi-query attention shares k/v across heads'),
        ('timm.layers.attention2d', 'MultiQueryAttentionV2', 'multi-query attention shares k/v across heads'),
        ('timm.models.swin_transformer', 'WindowAttention', f'Swin {_WINDOW}'),
        ('timm.models.swin_transformer_v2', 'WindowAttention', f'Swin V2 {_WINDOW}'),
        ('timm.models.swin_transformer_v2_cr', 'WindowMultiHeadAttention', f'Swin V2 (cr) {_WINDOW}'),
):
    refuse_attention(_path, _name, _reason)
