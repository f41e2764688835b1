"""diffusers ``Attention``: DiT, PixArt, SD3/SD3.5 joint attention, HunyuanDiT, CogVideoX; and what SHD refuses.

Two ways to read q and k, chosen by the module's attention processor:

- Plain self-attention processors (``AttnProcessor2_0``, ``AttnProcessor``, xformers, sliced, fused): q and k are the
  projections' outputs, through ``norm_q``/``norm_k`` when the processor applies them. Projections are hooked first and
  the norms (when called) overwrite q/k after, so this holds for every processor of :data:`PROJECTION_PROCESSORS`, and
  the hooks survive ``enable_xformers_memory_efficient_attention``. ``fuse_qkv_projections`` is followed through
  ``to_qkv``.
- Processors that apply RoPE or join text and image tokens inside (:data:`KERNEL_PROCESSORS`: SD3's
  ``JointAttnProcessor2_0``, HunyuanDiT, CogVideoX): a projection hook would see the wrong q and k, so q, k, v are
  read where the processor hands them to ``scaled_dot_product_attention`` (:func:`capture_kernel`), with the text
  tokens' place in the joint sequence taken from the forward's arguments.

Any other processor is refused, naming the supported ones. Nothing here imports diffusers: classes are looked up
among the modules already imported.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn

from .registry import (
    AttentionAdapter,
    attention_adapters,
    forward_argument,
    heads_first,
    is_loaded_instance,
    per_head,
    refuse_attention,
    register_attention_adapter,
)

__all__ = ['DiffusersAttentionAdapter', 'PROJECTION_PROCESSORS', 'KERNEL_PROCESSORS', 'capture_kernel',
           'SUPPORTED_DIFFUSERS_ATTENTION']

#: ``Attention`` processors whose q, k are the projection (and q/k norm) outputs: self-attention without RoPE.
PROJECTION_PROCESSORS = ('AttnProcessor2_0', 'AttnProcessor', 'XFormersAttnProcessor', 'FusedAttnProcessor2_0',
                         'SlicedAttnProcessor', 'AttnProcessorNPU', 'XLAFlashAttnProcessor2_0')

#: ``Attention`` processors read at the kernel, with where their text tokens sit in the joint sequence: ``'after'``
#: the image tokens (SD3: image rows through ``to_out``, text rows through ``to_add_out``), ``'before'`` them
#: (CogVideoX: one ``to_out`` for all rows) or None (HunyuanDiT self-attention with RoPE: no text tokens).
KERNEL_PROCESSORS = {
    'JointAttnProcessor2_0': 'after', 'FusedJointAttnProcessor2_0': 'after',
    'CogVideoXAttnProcessor2_0': 'before', 'FusedCogVideoXAttnProcessor2_0': 'before',
    'HunyuanAttnProcessor2_0': None, 'FusedHunyuanAttnProcessor2_0': None,
}

_LINEAR_ATTENTION = 'linear attention (Sana) never forms a softmax attention map, so there is no map to distil'
_REFUSED_PROCESSORS = {
    'SanaLinearAttnProcessor2_0': _LINEAR_ATTENTION,
    'PAGCFGSanaLinearAttnProcessor2_0': _LINEAR_ATTENTION,
    'PAGIdentitySanaLinearAttnProcessor2_0': _LINEAR_ATTENTION,
    'XFormersJointAttnProcessor': 'the xformers joint processor calls xformers instead of torch '
                                  'scaled_dot_product_attention, where SHD reads joint q and k; set '
                                  'JointAttnProcessor2_0 on the SHD teacher and student',
}

#: What the diffusers adapters support, for refusal messages.
SUPPORTED_DIFFUSERS_ATTENTION = (
    f'Attention with processors {list(PROJECTION_PROCESSORS) + list(KERNEL_PROCESSORS)} (DiT, PixArt, SD3, SD3.5, '
    f'HunyuanDiT, CogVideoX), FluxAttention with FluxAttnProcessor (FluxTransformerBlock, and '
    f'FluxSingleTransformerBlock for the single-stream blocks), WanAttention with WanAttnProcessor')

#: Logit added where a boolean attention mask is False: exp() of it is exactly 0 in float32, and it stays finite
#: under the loss's temperature (an infinite one would turn 0 * log 0 terms into NaN).
_MASKED_LOGIT = -1e9


def _tokens(x: torch.Tensor) -> int:
    """Tokens of a (B, N, C) sequence or a (B, C, *spatial) feature map."""
    return x.shape[1] if x.dim() == 3 else math.prod(x.shape[2:])


def _mask_bias(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
    """An SDPA ``attn_mask`` as the additive logits bias it is, broadcast to (B, heads or 1, N_q, N_k)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, _MASKED_LOGIT)
    else:
        bias = mask.float().clamp(min=_MASKED_LOGIT)
    heads = bias.shape[-3] if bias.dim() >= 3 else 1
    return bias.expand(query.shape[0], heads, query.shape[-2], key.shape[-2])


def capture_kernel(
        recorder,
        module: nn.Module,
        scale: float,
        text_tokens: Callable[[tuple, dict], slice | None],
        *,
        inputs_of: nn.Module | None = None,
        kernel_of: nn.Module | None = None,
) -> None:
    """Record the q, k (and v) that ``kernel_of``'s forward hands to torch ``scaled_dot_product_attention``.

    Why: processors that apply RoPE, q/k norms or the joint text + image concatenation inside their ``__call__``
    leave no submodule whose output is the final q and k; the kernel call is the one place they all meet.

    Args:
        recorder: The :class:`~shd_plugins.capture.LayerRecorder` of the layer.
        module: The layer's module (named in errors).
        scale: The logits scale the layer's geometry states; a kernel call with another scale is an error.
        text_tokens: ``(args, kwargs)`` of ``inputs_of``'s forward -> the slice of text tokens in the joint
            sequence, or None.
        inputs_of: The module whose forward arguments give the text length (default ``module``; Flux's single-stream
            block, whose attention sees the text already concatenated).
        kernel_of: The module inside whose forward the kernel is called (default ``module``).

    A forward that calls the kernel more than once (IP-adapter or guidance processors), with a causal mask, with
    grouped k/v heads or with another scale raises instead of recording a map SHD would misread.
    """
    record_values = recorder.record_values
    name = type(module).__name__

    def on_inputs(slot, args: tuple, kwargs: dict) -> None:
        slot.q = slot.k = slot.v = slot.bias = None
        slot.text = text_tokens(args, kwargs)

    def on_kernel(slot, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, options: dict) -> None:
        if slot.q is not None:
            raise RuntimeError(
                f'SHD capture saw more than one scaled_dot_product_attention call in one forward of {name} (an '
                f'IP-adapter or guidance processor adds attention calls): SHD cannot tell which map to distil. Use the '
                f"model's default attention processor for the SHD teacher and student.")
        kernel_scale = options.get('scale')
        kernel_scale = query.shape[-1] ** -0.5 if kernel_scale is None else kernel_scale
        problems = []
        if options.get('is_causal'):
            problems.append('a causal mask')
        if key.shape[-3] != query.shape[-3]:
            problems.append(f'{key.shape[-3]} key heads for {query.shape[-3]} query heads')
        if not math.isclose(kernel_scale, scale, rel_tol=1e-6):
            problems.append(f'scale {kernel_scale} where the layer states {scale}')
        if slot.text is not None and slot.text.stop > query.shape[-2]:
            problems.append(f'{query.shape[-2]} tokens, fewer than the text tokens {slot.text} of its arguments')
        if problems:
            raise RuntimeError(f'SHD capture cannot read the attention kernel call of {name}: {", ".join(problems)}.')
        slot.q, slot.k = query, key
        if record_values:
            slot.v = value
        slot.bias = _mask_bias(options.get('attn_mask'), query, key)

    recorder.hook_inputs(inputs_of or module, on_inputs)
    recorder.hook_kernel(kernel_of or module, on_kernel)


def _processor(module: nn.Module) -> str:
    return type(getattr(module, 'processor', None)).__name__


@register_attention_adapter(first=False)
class DiffusersAttentionAdapter(AttentionAdapter):
    """diffusers ``Attention``: self-attention and joint text + image attention; cross-attention layers are skipped."""

    name = 'diffusers'

    def claims(self, module: nn.Module) -> bool:
        return is_loaded_instance(module, 'diffusers.models.attention_processor', 'Attention')

    def is_distilled(self, module: nn.Module) -> bool:
        return not module.is_cross_attention

    def refusal(self, module: nn.Module) -> str | None:
        processor = _processor(module)
        if processor in _REFUSED_PROCESSORS:
            return _REFUSED_PROCESSORS[processor]
        if processor in KERNEL_PROCESSORS:
            return None
        if processor in PROJECTION_PROCESSORS:
            if getattr(module, 'add_q_proj', None) is not None or getattr(module, 'added_kv_proj_dim', None):
                joint = [p for p, layout in KERNEL_PROCESSORS.items() if layout == 'after']
                return (f'joint attention (SD3/Flux style) mixes text tokens into the keys, and its processor '
                        f'{processor} is not one of the joint processors SHD reads ({joint})')
            return None
        return (f'attention processor {processor} is not supported; supported: {SUPPORTED_DIFFUSERS_ATTENTION}. Set '
                f'a supported processor (attn.set_processor) or register an adapter')

    def geometry(self, module: nn.Module) -> tuple[int, int, float]:
        head_dim = module.inner_dim // module.heads
        # The kernel processors call SDPA without a scale: torch's default 1/sqrt(d), whatever attn.scale says.
        scale = head_dim ** -0.5 if _processor(module) in KERNEL_PROCESSORS else float(module.scale)
        return module.heads, head_dim, scale

    def install(self, module: nn.Module, recorder) -> None:
        processor = _processor(module)
        if processor in KERNEL_PROCESSORS:
            layout = KERNEL_PROCESSORS[processor]

            def text_tokens(args: tuple, kwargs: dict) -> slice | None:
                context = forward_argument(args, kwargs, 1, 'encoder_hidden_states')
                if layout is None or context is None:
                    return None
                text = _tokens(context)
                if layout == 'before':
                    return slice(0, text)
                image = _tokens(forward_argument(args, kwargs, 0, 'hidden_states'))
                return slice(image, image + text)
            capture_kernel(recorder, module, self.geometry(module)[2], text_tokens)
            return
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

    def text_out_weight(self, module: nn.Module) -> torch.Tensor | None:
        if KERNEL_PROCESSORS.get(_processor(module)) == 'after':  # SD3: to_add_out, None on context_pre_only blocks
            return None if module.to_add_out is None else module.to_add_out.weight
        return self.out_weight(module)  # CogVideoX: one to_out for text and video rows


class _OtherDiffusersAttention(AttentionAdapter):
    """Any other diffusers attention class (``AttentionModuleMixin``): refused until an adapter supports it.

    It claims only what no other registered adapter claims, so the order in which the built-in adapter modules
    register does not matter.
    """

    name = 'refused:diffusers-other'

    def claims(self, module: nn.Module) -> bool:
        if not is_loaded_instance(module, 'diffusers.models.attention', 'AttentionModuleMixin'):
            return False
        return not any(adapter.claims(module) for adapter in attention_adapters() if adapter is not self)

    def refusal(self, module: nn.Module) -> str | None:
        return (f'{type(module).__name__} is a diffusers attention class not yet supported; supported: '
                f'{SUPPORTED_DIFFUSERS_ATTENTION}')


register_attention_adapter(_OtherDiffusersAttention, first=False)
refuse_attention('diffusers.models.attention_processor', 'SanaMultiscaleLinearAttention', _LINEAR_ATTENTION)
