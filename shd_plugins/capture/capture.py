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
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

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
            f'{claimed} (timm Attention, AttentionRope and EvaAttention of the VisionTransformer and EVA families; '
            f'diffusers DiT, PixArt, SD3/SD3.5, Flux, HunyuanDiT, CogVideoX and Wan attention). Register an adapter '
            f'for other attention with register_attention_adapter.')
    return layers


def _same_tensor(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    """The same elements of the same storage (two views of one weight slice, as Flux single blocks give)."""
    return a is b or (a is not None and a.data_ptr() == b.data_ptr() and a.shape == b.shape
                       and a.stride() == b.stride() and a.dtype == b.dtype)


@dataclass
class CapturedAttention:
    """What one forward recorded for one layer: per-head q, k (B, H, N, d), and v for the teacher.

    Nothing here is N x N: the default (streamed) SHD loss reads q, k and v as they are
    (:func:`~shd_plugins.core.streamed.streamed_shd_loss`); :meth:`logits` forms the scores for the dense reference.

    ``bias`` is an additive logits bias broadcastable to (B, H, N, N) (a relative-position bias, as MDT's), part
    of the map: layers with a bias take the dense loss (the streamed one reads q and k only).

    Joint attention (SD3, Flux, CogVideoX) attends over text and image tokens at once: ``text`` says which of the N
    tokens are text, and a text query row's output goes through ``text_out_weight`` (``to_add_out``; None when
    the block discards the text rows' outputs) instead of ``out_weight`` (``to_out``).
    """

    q: torch.Tensor
    k: torch.Tensor
    scale: float
    v: torch.Tensor | None = None
    out_weight: torch.Tensor | None = None
    text: slice | None = None
    text_out_weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return self.q.shape[-2]

    def logits(self) -> torch.Tensor:
        """Pre-softmax scores ``q k^T * scale (+ bias)`` (B, H, N, N) in float32."""
        with autocast_disabled(self.q):
            scores = (self.q.float() * self.scale) @ self.k.float().transpose(-2, -1)  # scale the (N x d) side
            return scores if self.bias is None else scores + self.bias.float()

    def image_only(self) -> CapturedAttention:
        """The image tokens alone: text rows and columns dropped (the image x image block, rows renormalised)."""
        if self.text is None:
            return self
        if self.text.start == 0:  # text first (Flux, CogVideoX)
            cut = slice(self.text.stop, self.tokens)
        elif self.text.stop == self.tokens:  # text last (SD3)
            cut = slice(0, self.text.start)
        else:
            raise ValueError(f'The image tokens of a joint attention layer must be contiguous, text is {self.text} '
                             f'of {self.tokens} tokens.')
        return replace(self, q=self.q[:, :, cut], k=self.k[:, :, cut],
                       v=None if self.v is None else self.v[:, :, cut], text=None, text_out_weight=None,
                       bias=None if self.bias is None else self.bias[..., cut, cut])

    def projections(self) -> torch.Tensor | Any | None:
        """The output projection(s) the merge weights need: one weight, or per-stream rows for joint attention."""
        if self.out_weight is None or self.text is None or _same_tensor(self.text_out_weight, self.out_weight):
            return self.out_weight
        from ..core import RowProjections
        text_start, text_stop = self.text.start, self.text.stop
        segments = [(0, text_start, self.out_weight), (text_start, text_stop, self.text_out_weight),
                    (text_stop, self.tokens, self.out_weight)]
        return RowProjections(tuple(s for s in segments if s[1] > s[0]), self.tokens)


@dataclass
class _Slot:
    """Tensors recorded for one layer during the current forward (``text``: the text tokens of joint attention;
    ``bias``: an additive logits bias)."""

    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    text: slice | None = None
    bias: torch.Tensor | None = None


_SDPA = F.scaled_dot_product_attention


class _KernelCalls(TorchFunctionMode):
    """Sees the ``scaled_dot_product_attention`` calls made while it is active and lets them run unchanged."""

    _PARAMETERS = ('query', 'key', 'value', 'attn_mask', 'dropout_p', 'is_causal', 'scale', 'enable_gqa')

    def __init__(self, record: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], None]):
        super().__init__()
        self.record, self.calls = record, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            self.calls += 1
            call = dict(zip(self._PARAMETERS, args, strict=False)) | kwargs
            self.record(call.pop('query'), call.pop('key'), call.pop('value'), call)
        return func(*args, **kwargs)


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

    def hook_inputs(self, submodule: nn.Module, record: Callable[[_Slot, tuple, dict], None]) -> None:
        """Call ``record(slot, args, kwargs)`` before each recorded forward of ``submodule`` (e.g. to read the
        rotary embedding or the text length a block is called with). Inert as :meth:`hook` is."""
        submodule_ref = weakref.ref(submodule)
        capture, index = self._capture, self._index

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if capture.is_recording and module is submodule_ref():
                record(capture._slots.setdefault(index, _Slot()), args, kwargs)

        capture._handles.append(submodule.register_forward_pre_hook(pre_hook, with_kwargs=True))

    def hook_kernel(self, submodule: nn.Module,
                    record: Callable[[_Slot, torch.Tensor, torch.Tensor, torch.Tensor, dict], None]) -> None:
        """Call ``record(slot, query, key, value, options)`` for each torch ``scaled_dot_product_attention`` call made
        inside a recorded forward of ``submodule``: the q, k, v exactly as the kernel receives them (after
        q/k norms, rotary embeddings and the joint text + image concatenation, whatever the processor).

        The call itself runs unchanged (same function, same arguments), so outputs are bit-identical. Attention
        backends that bypass torch's SDPA (the flash-attn or xformers libraries, sage) are not seen: the recorded
        forward then raises, naming the module, instead of training on stale or missing maps.
        """
        submodule_ref = weakref.ref(submodule)
        capture, index = self._capture, self._index
        active: list[_KernelCalls] = []

        def pre_hook(module: nn.Module, args: tuple) -> None:
            if capture.is_recording and module is submodule_ref():
                slot = capture._slots.setdefault(index, _Slot())
                mode = _KernelCalls(lambda q, k, v, options: record(slot, q, k, v, options))
                mode.__enter__()
                active.append(mode)

        def post_hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not active or module is not submodule_ref():
                return
            mode = active.pop()
            mode.__exit__(None, None, None)
            if mode.calls == 0 and output is not None:  # None: the forward raised (always_call), let that through
                raise RuntimeError(
                    f'SHD capture saw no torch scaled_dot_product_attention call in the forward of '
                    f'{type(module).__name__}: its attention backend or processor bypasses torch SDPA (flash-attn, '
                    f"xformers, sage). Use diffusers' native backend for the SHD teacher and student "
                    f"(model.set_attention_backend('native') or the attention_backend('native') context) or the "
                    f'default attention processor.')

        capture._handles.append(submodule.register_forward_pre_hook(pre_hook))
        capture._handles.append(submodule.register_forward_hook(post_hook, always_call=True))


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
            q=slot.q, k=slot.k, scale=layer.scale, v=slot.v, text=slot.text, bias=slot.bias,
            out_weight=layer.out_weight() if self.record_values else None,
            text_out_weight=layer.text_out_weight() if self.record_values and slot.text is not None else None)

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
