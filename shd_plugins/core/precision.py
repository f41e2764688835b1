"""Keep attention-map arithmetic in float32 inside autocast regions."""
import functools
from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ['autocast_disabled', 'without_autocast']

F = TypeVar('F', bound=Callable)


def autocast_disabled(tensor: torch.Tensor) -> torch.autocast:
    """An autocast-off context for ``tensor``'s device type.

    Attention maps are distributions over N keys: under bf16/fp16 autocast, matmuls would silently drop back to
    half precision even on float32 inputs, losing the small entries the KL depends on.
    """
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def without_autocast(fn: F) -> F:
    """Run a loss with autocast off (for the device of its first tensor argument)."""
    @functools.wraps(fn)
    def wrapper(first: torch.Tensor, *args, **kwargs):
        with autocast_disabled(first):
            return fn(first, *args, **kwargs)
    return wrapper
