"""The attention-adapter registry: how the capture learns a family of attention modules.

An :class:`AttentionAdapter` claims the modules of one attention family, says how many heads they have, hooks
the submodules that produce q, k (and v), gives the output projection the merge weights need, and states why a
module it claims cannot be captured. Adapters are consulted in registration order, user registrations first,
so a project can teach SHD its own attention (or override a refusal) without editing this package, the way
diffusers' ``attention_dispatch.py`` registers attention backends by decorator.

Example::

    @register_attention_adapter
    class MyAttentionAdapter(AttentionAdapter):
        name = 'my_attention'

        def claims(self, module):
            return isinstance(module, MyAttention)

        def geometry(self, module):
            return module.num_heads, module.head_dim, module.scale

        def install(self, module, recorder):
            recorder.hook(module.q_norm, lambda slot, out: setattr(slot, 'q', out))
            recorder.hook(module.k_norm, lambda slot, out: setattr(slot, 'k', out))
            if recorder.record_values:
                recorder.hook(module.v_proj, lambda slot, out: setattr(slot, 'v', heads_first(out, module.num_heads)))

        def out_weight(self, module):
            return module.proj.weight
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from .capture import LayerRecorder

__all__ = [
    'AttentionAdapter', 'AttentionLayer', 'register_attention_adapter', 'unregister_attention_adapter',
    'attention_adapters', 'adapter_for', 'refuse_attention', 'loaded_class', 'is_loaded_instance', 'forward_argument',
    'heads_first', 'per_head',
]


def loaded_class(module_path: str, name: str) -> type | None:
    """A class from an already-imported module: a model cannot hold instances of a module never imported.

    Adapters look their classes up this way so that ``import shd_plugins`` imports no framework.
    """
    module = sys.modules.get(module_path)
    return getattr(module, name, None) if module is not None else None


def is_loaded_instance(module: nn.Module, module_path: str, name: str) -> bool:
    """``isinstance(module, cls)`` for a :func:`loaded_class` (False while its module is not imported)."""
    cls = loaded_class(module_path, name)
    return cls is not None and isinstance(module, cls)


def forward_argument(args: tuple, kwargs: dict, index: int, name: str, default=None):
    """A forward's argument given by keyword or by position (modules are called both ways: gradient checkpointing
    passes a block's arguments by position), or ``default`` when absent; for ``hook_inputs`` records."""
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def heads_first(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """A projection output (B, N, H*d) as per-head (B, H, N, d)."""
    batch, tokens, width = x.shape
    return x.view(batch, tokens, num_heads, width // num_heads).transpose(1, 2)


def per_head(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """A per-head tensor: (B, H, N, d) as is, (B*H, N, d) (``head_to_batch_dim`` layouts) regrouped."""
    if x.dim() == 4:
        return x
    batch_heads, tokens, head_dim = x.shape
    return x.view(batch_heads // num_heads, num_heads, tokens, head_dim)


class AttentionAdapter:
    """How SHD captures one family of attention modules. Subclass, then :func:`register_attention_adapter`.

    The capture never changes a module's forward: an adapter only registers forward hooks (through the
    :class:`~shd_plugins.capture.LayerRecorder` it is given) on submodules whose outputs are the per-head q and k
    the attention kernel receives, and, when ``recorder.record_values``, v.
    """

    #: Registry name (unique).
    name: str = ''

    def claims(self, module: nn.Module) -> bool:
        """True for every module of this family, capturable or not."""
        raise NotImplementedError

    def refusal(self, module: nn.Module) -> str | None:
        """Why a claimed module cannot be captured faithfully, or None when it can."""
        return None

    def is_distilled(self, module: nn.Module) -> bool:
        """False for claimed modules that are not self-attention layers to distil (e.g. cross-attention)."""
        return True

    def geometry(self, module: nn.Module) -> tuple[int, int, float]:
        """``(num_heads, head_dim, scale)`` of the attention logits ``q k^T * scale``."""
        raise NotImplementedError

    def install(self, module: nn.Module, recorder: LayerRecorder) -> None:
        """Record per-head q, k (and v when ``recorder.record_values``) through the recorder's hooks.

        ``recorder.hook`` records a submodule's output (q/k norms, projections); ``recorder.hook_inputs`` reads a
        forward's arguments (rotary embeddings, the text length); ``recorder.hook_kernel`` records the q, k, v
        handed to ``scaled_dot_product_attention`` inside the module's forward (after RoPE and the joint
        concatenation). Joint attention also sets ``slot.text`` to the slice of text tokens.
        """
        raise NotImplementedError

    def out_weight(self, module: nn.Module) -> torch.Tensor:
        """The (D, H*d) output-projection weight; head h owns columns ``h*d:(h+1)*d``."""
        raise NotImplementedError

    def text_out_weight(self, module: nn.Module) -> torch.Tensor | None:
        """Joint attention: the (D', H*d) projection the text query rows go through (``to_add_out``), or None when
        the block discards their outputs. Only called when the adapter recorded ``slot.text``."""
        return self.out_weight(module)

    def output_problems(self, module: nn.Module) -> list[str]:
        """Reasons the head outputs do not reach the projection linearly (the SHD merge weights need that)."""
        return []


class _RefusedAttention(AttentionAdapter):
    """Claims one known attention class only to refuse it with the reason."""

    def __init__(self, module_path: str, class_name: str, reason: str):
        self.name = f'refused:{module_path}.{class_name}'
        self.module_path, self.class_name, self.reason = module_path, class_name, reason

    def claims(self, module: nn.Module) -> bool:
        return is_loaded_instance(module, self.module_path, self.class_name)

    def refusal(self, module: nn.Module) -> str | None:
        return self.reason


_ADAPTERS: list[AttentionAdapter] = []


def register_attention_adapter(
        adapter: type[AttentionAdapter] | AttentionAdapter | None = None,
        *,
        first: bool = True,
) -> Callable | type[AttentionAdapter] | AttentionAdapter:
    """Register an adapter class (as a decorator) or instance.

    Args:
        adapter: An :class:`AttentionAdapter` subclass (instantiated without arguments) or instance.
        first: Consult it before the adapters registered so far (the default: a user's adapter wins over the
            built-in ones and their refusals). The built-in adapters register with ``first=False``.

    Returns:
        What was given, so it works as a decorator (``@register_attention_adapter`` or with arguments).

    Raises:
        ValueError: The adapter has no name, or another adapter has its name.
    """
    if adapter is None:
        return lambda a: register_attention_adapter(a, first=first)
    instance = adapter() if isinstance(adapter, type) else adapter
    if not isinstance(instance, AttentionAdapter):
        raise TypeError(f'Attention adapters subclass shd_plugins.capture.AttentionAdapter, got {type(instance)}.')
    if not instance.name:
        raise ValueError(f'{type(instance).__name__} needs a unique `name` to be registered.')
    if any(a.name == instance.name for a in _ADAPTERS):
        raise ValueError(
            f"An attention adapter named '{instance.name}' is already registered; unregister_attention_adapter"
            f"('{instance.name}') first to replace it.")
    _ADAPTERS.insert(0, instance) if first else _ADAPTERS.append(instance)
    return adapter


def unregister_attention_adapter(name: str) -> AttentionAdapter:
    """Remove (and return) the adapter registered under ``name``."""
    for i, adapter in enumerate(_ADAPTERS):
        if adapter.name == name:
            return _ADAPTERS.pop(i)
    raise KeyError(f"No attention adapter named '{name}'; registered: {[a.name for a in _ADAPTERS]}.")


def refuse_attention(module_path: str, class_name: str, reason: str) -> None:
    """Register a refusal: modules of this class make the capture fail with ``reason`` instead of being skipped."""
    register_attention_adapter(_RefusedAttention(module_path, class_name, reason), first=False)


def attention_adapters() -> tuple[AttentionAdapter, ...]:
    """The registered adapters in the order they are consulted."""
    return tuple(_ADAPTERS)


def adapter_for(module: nn.Module) -> AttentionAdapter | None:
    """The first registered adapter that claims ``module``, or None."""
    return next((a for a in _ADAPTERS if a.claims(module)), None)


@dataclass
class AttentionLayer:
    """One distillable attention layer found in a model, with the adapter that captures it."""

    name: str
    module: nn.Module
    adapter: AttentionAdapter
    num_heads: int
    head_dim: int
    scale: float

    def out_weight(self) -> torch.Tensor:
        """The (D, H*d) output-projection weight; head h owns columns ``h*d:(h+1)*d``."""
        return self.adapter.out_weight(self.module)

    def text_out_weight(self) -> torch.Tensor | None:
        """Joint attention: the projection of the text query rows (see :meth:`AttentionAdapter.text_out_weight`)."""
        return self.adapter.text_out_weight(self.module)

    def check_linear_output(self) -> None:
        """The value-output circuit ``X_h = V_h W_O^h`` needs the projection to act linearly per head."""
        reasons = self.adapter.output_problems(self.module)
        if reasons:
            raise ValueError(
                f"Teacher attention '{self.name}' cannot provide SHD merge weights: {'; '.join(reasons)}. "
                f"Use merge='mean' or 'select', or a teacher without these options.")
