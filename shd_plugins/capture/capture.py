"""Record per-head q, k (and v) of attention layers without touching the attention computation.

Fused kernels (SDPA, flash, xformers) never materialise attention probabilities, so the registered
:mod:`attention adapters <shd_plugins.capture.registry>` hook the submodules that *produce* q and k, and the loss
recomputes ``softmax(q k^T * scale)``. The model's own forward path and outputs stay exactly as they were, whatever
``fused_attn`` or attention processor is active.

Hooks record only inside :meth:`AttentionCapture.recording`, the training forward; evaluation, sampling, EMA and
gradient-checkpoint recomputation forwards run outside it and leave nothing behind.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..core.precision import autocast_disabled
from .registry import AttentionLayer, adapter_for, attention_adapters

__all__ = ['CapturedAttention', 'AttentionCapture', 'LayerRecorder', 'find_attention_layers', 'unwrap_model',
           'num_prefix_tokens']


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers, as timm does."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or (
                type(model).__name__ == 'DistributedDataParallel' and hasattr(model, 'module')):
            model = model.module
        elif hasattr(model, '_orig_mod') and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def num_prefix_tokens(model: nn.Module) -> int:
    """Leading non-patch tokens (cls, dist, registers) as timm's ``num_prefix_tokens``; 0 for DiTs."""
    return int(getattr(unwrap_model(model), 'num_prefix_tokens', 0) or 0)


def find_attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """All distillable attention layers of a (possibly wrapped) model, in forward order.

    Raises:
        ValueError: the model holds attention an adapter refuses (names the module and why), or none at all.
    """
    model = unwrap_model(model)
    layers = []
    for name, module in model.named_modules():
        adapter = adapter_for(module)
        if adapter is None or not adapter.is_distilled(module):
            continue
        reason = adapter.refusal(module)
        if reason is not None:
            raise ValueError(
                f"Attention module '{name}' ({type(module).__name__}) is not supported by SHD capture: {reason}. "
                f'A project can teach SHD its own attention with shd_plugins.capture.register_attention_adapter.')
        num_heads, head_dim, scale = adapter.geometry(module)
        layers.append(AttentionLayer(name, module, adapter, int(num_heads), int(head_dim), float(scale)))
    if not layers:
        claimed = [a.name for a in attention_adapters() if not a.name.startswith('refused:')]
        raise ValueError(
            f'No supported attention layers found in {type(model).__name__}: SHD capture has adapters for '
            f'{claimed} (timm Attention of the VisionTransformer family, diffusers Attention self-attention of '
            f'DiT/PixArt). Register an adapter for other attention with register_attention_adapter.')
    return layers


@dataclass
class CapturedAttention:
    """What one forward recorded for one layer: per-head q, k (B, H, N, d), and v for the teacher.

    Nothing here is N x N: the default (streamed) SHD loss reads q, k and v as they are
    (:func:`~shd_plugins.core.streamed.streamed_shd_loss`); :meth:`logits` forms the scores for the dense reference.
    """

    q: torch.Tensor
    k: torch.Tensor
    scale: float
    v: torch.Tensor | None = None
    out_weight: torch.Tensor | None = None

    def logits(self) -> torch.Tensor:
        """Pre-softmax scores ``q k^T * scale`` (B, H, N, N) in float32."""
        with autocast_disabled(self.q):
            return (self.q.float() * self.scale) @ self.k.float().transpose(-2, -1)  # scale the (N x d) side


@dataclass
class _Slot:
    """Tensors recorded for one layer during the current forward."""

    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None


class LayerRecorder:
    """What an adapter installs its hooks through, for one layer of one :class:`AttentionCapture`.

    Attributes:
        record_values: Whether v is wanted too (the teacher side).
        num_heads: Heads of the layer (for reshaping projection outputs).
    """

    def __init__(self, capture: AttentionCapture, index: int, layer: AttentionLayer):
        self._capture, self._index = capture, index
        self.record_values = capture.record_values
        self.num_heads = layer.num_heads

    def hook(self, submodule: nn.Module, record: Callable[[_Slot, torch.Tensor], None]) -> None:
        """Call ``record(slot, output)`` after each recorded forward of ``submodule``.

        The hook is inert outside :meth:`AttentionCapture.recording` and on deep copies of ``submodule`` (an EMA
        copy of the model carries the hook but never records into this capture).
        """
        submodule_ref = weakref.ref(submodule)
        capture, index = self._capture, self._index

        def hook(module: nn.Module, args, output: torch.Tensor) -> None:
            if not capture.is_recording or module is not submodule_ref():
                return
            record(capture._slots.setdefault(index, _Slot()), output)

        capture._handles.append(submodule.register_forward_hook(hook))


class AttentionCapture:
    """Record per-head q, k (and v) of selected attention layers with forward hooks.

    Args:
        model: A model whose attention a registered adapter claims (timm VisionTransformer family, diffusers
            ``Attention`` models); DDP, DataParallel and ``torch.compile`` wrappers are unwrapped (the hooks go on
            the inner module).
        layers: Indices into :func:`find_attention_layers` order to record; all layers when None.
        record_values: Also record v and expose the output-projection weight (the teacher side needs them for
            the merge weights; see :meth:`AttentionLayer.check_linear_output`).

    Run the forward inside ``with capture.recording():``; afterwards ``capture[i]`` gives the
    :class:`CapturedAttention` of layer i. Use as a context manager, or call :meth:`remove`.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int] | None = None, *, record_values: bool = False):
        self.layers = find_attention_layers(model)
        self.record_values = record_values
        selected = range(len(self.layers)) if layers is None else layers
        self.selected = sorted({int(i) for i in selected})
        for i in self.selected:
            if not 0 <= i < len(self.layers):
                raise ValueError(
                    f'Layer index {i} out of range: the model has {len(self.layers)} attention layers '
                    f'(0..{len(self.layers) - 1}).')
        self.is_recording = False
        self._slots: dict[int, _Slot] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for i in self.selected:
            layer = self.layers[i]
            layer.adapter.install(layer.module, LayerRecorder(self, i, layer))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @contextlib.contextmanager
    def recording(self) -> Iterator[AttentionCapture]:
        """Record the forwards run inside; what an earlier forward recorded is dropped on entry."""
        self.clear()
        self.is_recording = True
        try:
            yield self
        finally:
            self.is_recording = False

    def __getitem__(self, index: int) -> CapturedAttention:
        layer = self.layers[index]
        slot = self._slots.get(index)
        if slot is None or slot.q is None or slot.k is None or (self.record_values and slot.v is None):
            raise RuntimeError(
                f"No attention was recorded for layer {index} ('{layer.name}'). Run the model's forward inside "
                f"`with capture.recording():` (SHDDistiller.recording()); if fuse_qkv_projections() was called after "
                f"installing the capture, install it again.")
        return CapturedAttention(
            q=slot.q, k=slot.k, scale=layer.scale, v=slot.v,
            out_weight=layer.out_weight() if self.record_values else None)

    def clear(self) -> None:
        """Drop the recorded tensors (frees the activations they keep alive)."""
        self._slots.clear()

    def remove(self) -> None:
        """Remove every hook and drop recorded tensors; the model is as before installation."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> AttentionCapture:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
