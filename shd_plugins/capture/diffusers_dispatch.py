"""diffusers attention classes that route through the attention dispatcher: Flux (double- and single-stream) and Wan.

``FluxAttention`` and ``WanAttention`` apply q/k norms, RoPE and (Flux) the joint text + image concatenation inside
their processors, then call ``dispatch_attention_fn``, whose native backend calls torch
``scaled_dot_product_attention``: q, k, v are read there (:func:`~shd_plugins.capture.diffusers.capture_kernel`).

Flux double-stream blocks put the text tokens first; image rows go through ``to_out``, text rows through
``to_add_out``. A single-stream block's attention (``pre_only``) has no output projection of its own and never sees
the text length: the block concatenates text and image before calling it and sends ``cat(attn_output, mlp_hidden)``
through ``proj_out``. So the single-stream adapter claims the *block* (the layer is named after it), reads the text
length from the block's arguments and the kernel call inside its ``.attn``, and takes ``W_O`` as the first
``inner_dim`` columns of ``proj_out``; the ``FluxAttention`` adapter skips ``pre_only`` attention, so each layer is
found once, in forward order (double-stream blocks, then single-stream blocks). A ``pre_only`` ``FluxAttention`` in any
other block (Chroma's, ...) is refused: SHD does not know that block's projection or text length.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .diffusers import SUPPORTED_DIFFUSERS_ATTENTION, capture_kernel
from .registry import AttentionAdapter, forward_argument, is_loaded_instance, register_attention_adapter

__all__ = ['FluxAttentionAdapter', 'FluxSingleStreamAdapter', 'WanAttentionAdapter']

_FLUX = 'diffusers.models.transformers.transformer_flux'
_WAN = 'diffusers.models.transformers.transformer_wan'


def _processor_refusal(module: nn.Module, supported: str) -> str | None:
    processor = type(module.processor).__name__
    if processor == supported:
        return None
    return (f'{type(module).__name__} with processor {processor} is not supported (IP-adapter processors add '
            f'attention calls); set {supported} on the SHD teacher and student. Supported: '
            f'{SUPPORTED_DIFFUSERS_ATTENTION}')


def _flux_geometry(attn: nn.Module) -> tuple[int, int, float]:
    """FluxAttention calls the kernel without a scale: torch's default 1/sqrt(d)."""
    return attn.heads, attn.head_dim, attn.head_dim ** -0.5


def _text_first(args: tuple, kwargs: dict) -> slice | None:
    """Flux: the text tokens lead the joint sequence; their count is the ``encoder_hidden_states`` length."""
    context = forward_argument(args, kwargs, 1, 'encoder_hidden_states')
    return None if context is None else slice(0, context.shape[1])


@register_attention_adapter(first=False)
class FluxAttentionAdapter(AttentionAdapter):
    """Flux ``FluxAttention`` (double-stream blocks; ``pre_only`` single-stream attention goes through its block)."""

    name = 'diffusers-flux'

    def claims(self, module: nn.Module) -> bool:
        return is_loaded_instance(module, _FLUX, 'FluxAttention')

    def is_distilled(self, module: nn.Module) -> bool:
        return not module.pre_only

    def refusal(self, module: nn.Module) -> str | None:
        return _processor_refusal(module, 'FluxAttnProcessor')

    def geometry(self, module: nn.Module) -> tuple[int, int, float]:
        return _flux_geometry(module)

    def install(self, module: nn.Module, recorder) -> None:
        joint = module.added_kv_proj_dim is not None
        capture_kernel(recorder, module, self.geometry(module)[2],
                       lambda args, kwargs: _text_first(args, kwargs) if joint else None)

    def out_weight(self, module: nn.Module) -> torch.Tensor:
        return module.to_out[0].weight

    def text_out_weight(self, module: nn.Module) -> torch.Tensor | None:
        return module.to_add_out.weight


@register_attention_adapter(first=False)
class FluxSingleStreamAdapter(AttentionAdapter):
    """Flux ``FluxSingleTransformerBlock``: joint attention over cat(text, image) with one shared projection."""

    name = 'diffusers-flux-single'

    def claims(self, module: nn.Module) -> bool:
        return is_loaded_instance(module, _FLUX, 'FluxSingleTransformerBlock')

    def refusal(self, module: nn.Module) -> str | None:
        return _processor_refusal(module.attn, 'FluxAttnProcessor')

    def geometry(self, module: nn.Module) -> tuple[int, int, float]:
        return _flux_geometry(module.attn)

    def install(self, module: nn.Module, recorder) -> None:
        capture_kernel(recorder, module, self.geometry(module)[2], _text_first, kernel_of=module.attn)

    def out_weight(self, module: nn.Module) -> torch.Tensor:
        # proj_out reads cat(attn_output, mlp_hidden_states): the attention's columns come first.
        return module.proj_out.weight[:, :module.attn.inner_dim]


class _OtherSingleStreamBlocks(AttentionAdapter):
    """Blocks other than Flux's holding a ``pre_only`` FluxAttention: refused rather than silently skipped."""

    name = 'refused:diffusers-single-stream'

    def claims(self, module: nn.Module) -> bool:
        if is_loaded_instance(module, _FLUX, 'FluxSingleTransformerBlock'):
            return False
        return any(is_loaded_instance(child, _FLUX, 'FluxAttention') and child.pre_only for child in module.children())

    def refusal(self, module: nn.Module) -> str | None:
        return (f'its single-stream FluxAttention (pre_only: no output projection of its own) is supported only '
                f'inside FluxSingleTransformerBlock, whose proj_out and text length SHD knows; register an adapter '
                f'for {type(module).__name__}')


register_attention_adapter(_OtherSingleStreamBlocks, first=False)


@register_attention_adapter(first=False)
class WanAttentionAdapter(AttentionAdapter):
    """Wan ``WanAttention`` self-attention (RMSNorm across heads, RoPE); cross-attention layers are skipped."""

    name = 'diffusers-wan'

    def claims(self, module: nn.Module) -> bool:
        return is_loaded_instance(module, _WAN, 'WanAttention')

    def is_distilled(self, module: nn.Module) -> bool:
        return not module.is_cross_attention

    def refusal(self, module: nn.Module) -> str | None:
        if module.add_k_proj is not None:
            return 'its added image-context keys form a second attention map whose output is summed with the first'
        return _processor_refusal(module, 'WanAttnProcessor')

    def geometry(self, module: nn.Module) -> tuple[int, int, float]:
        head_dim = module.inner_dim // module.heads
        return module.heads, head_dim, head_dim ** -0.5

    def install(self, module: nn.Module, recorder) -> None:
        capture_kernel(recorder, module, self.geometry(module)[2], lambda args, kwargs: None)

    def out_weight(self, module: nn.Module) -> torch.Tensor:
        return module.to_out[0].weight
