"""Attention capture: hooks that record q, k (and v) of attention layers, behind an adapter registry.

Importing this package registers the built-in adapters (timm, diffusers) without importing either framework.
"""
from . import diffusers as _diffusers  # noqa: F401  (registers the built-in diffusers adapter and refusals)
from . import diffusers_dispatch as _diffusers_dispatch  # noqa: F401  (Flux and Wan adapters)
from . import timm as _timm  # noqa: F401  (registers the built-in timm adapter and refusals)
from .capture import (
    AttentionCapture,
    CapturedAttention,
    LayerRecorder,
    find_attention_layers,
    num_prefix_tokens,
    unwrap_model,
)
from .registry import (
    AttentionAdapter,
    AttentionLayer,
    adapter_for,
    attention_adapters,
    forward_argument,
    heads_first,
    is_loaded_instance,
    loaded_class,
    per_head,
    refuse_attention,
    register_attention_adapter,
    unregister_attention_adapter,
)

__all__ = [
    'AttentionAdapter', 'AttentionCapture', 'AttentionLayer', 'CapturedAttention', 'LayerRecorder', 'adapter_for',
    'attention_adapters', 'find_attention_layers', 'forward_argument', 'heads_first', 'is_loaded_instance',
    'loaded_class', 'num_prefix_tokens', 'per_head',
    'refuse_attention', 'register_attention_adapter', 'unregister_attention_adapter', 'unwrap_model',
]
