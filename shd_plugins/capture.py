"""Capture per-head q, k (and v) of attention layers without touching the attention computation.

Fused kernels (SDPA, flash, xformers) never materialise attention probabilities, so we record the tensors
that *produce* them with forward hooks on the projection/norm submodules, and recompute
``softmax(q k^T * scale)`` in the loss. The model's own forward path and outputs stay exactly as they were,
whatever ``fused_attn`` or diffusers attention processor is active.

Supported: timm ``Attention`` (ViT, DeiT, DeiT-distilled, ``qk_norm``) and diffusers ``Attention`` self-attention
(``DiTTransformer2DModel``, ``PixArtTransformer2DModel``; cross-attention layers are skipped). Rotary and
differential attention, joint (SD3/Flux-style) attention are refused with the reason.
"""
import sys
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .precision import autocast_disabled

__all__ = ['AttentionLayer', 'CapturedAttention', 'AttentionCapture', 'find_attention_layers', 'unwrap_model',
           'num_prefix_tokens']

# (module path, class name, reason) of attention we know and cannot capture faithfully yet.
_UNSUPPORTED = (
    ('timm.layers.attention', 'AttentionRope', 'rotary embeddings are applied to q/k after the q/k norms'),
    ('timm.layers.diff_attention', 'DiffAttention', 'differential attention subtracts two softmax maps'),
    ('timm.models.eva', 'EvaAttention', 'EVA attention applies rotary embeddings after the q/k norms'),
    ('timm.layers.attention2d', 'MultiQueryAttention2d', 'multi-query attention shares k/v across heads'),
    ('timm.layers.attention2d', 'MultiQueryAttentionV2', 'multi-query attention shares k/v across heads'),
)


def _loaded_class(module_path: str, name: str) -> Optional[type]:
    """A class from an already-imported module: a model cannot hold instances of a module never imported."""
    module = sys.modules.get(module_path)
    return getattr(module, name, None) if module is not None else None


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


@dataclass
class AttentionLayer:
    """One self-attention layer found in a model."""
    name: str
    module: nn.Module
    kind: str  # 'timm' | 'diffusers'
    num_heads: int
    head_dim: int
    scale: float

    def out_weight(self) -> torch.Tensor:
        """The (D, H*d) output-projection weight; head h owns columns ``h*d:(h+1)*d``."""
        proj = self.module.proj if self.kind == 'timm' else self.module.to_out[0]
        return proj.weight

    def check_linear_output(self) -> None:
        """The value-output circuit ``X_h = V_h W_O^h`` needs the projection to act linearly per head."""
        reasons = []
        if self.kind == 'timm':
            if not isinstance(self.module.norm, nn.Identity):
                reasons.append('scale_norm normalises the concatenated head outputs before the projection')
            if getattr(self.module, 'gate', None) is not None:
                reasons.append('a gate multiplies the head outputs before the projection')
        if reasons:
            raise ValueError(
                f"Teacher attention '{self.name}' cannot provide SHD merge weights: {'; '.join(reasons)}. "
                f"Use merge='mean' or 'select', or a teacher without these options.")


@dataclass
class CapturedAttention:
    """What one forward recorded for one layer: per-head q, k (B, H, N, d), and v for the teacher."""
    q: torch.Tensor
    k: torch.Tensor
    scale: float
    v: Optional[torch.Tensor] = None
    out_weight: Optional[torch.Tensor] = None

    def logits(self) -> torch.Tensor:
        """Pre-softmax scores ``q k^T * scale`` (B, H, N, N) in float32."""
        with autocast_disabled(self.q):
            return (self.q.float() * self.scale) @ self.k.float().transpose(-2, -1)  # scale the (N x d) side


def _attention_kind(module: nn.Module) -> Tuple[Optional[str], Optional[str]]:
    """(kind, None) for a capturable self-attention, (None, reason) for an unsupported one, (None, None) else."""
    timm_attention = _loaded_class('timm.layers.attention', 'Attention')
    if timm_attention is not None and type(module) is timm_attention:
        return 'timm', None
    diffusers_attention = _loaded_class('diffusers.models.attention_processor', 'Attention')
    if diffusers_attention is not None and isinstance(module, diffusers_attention):
        if module.is_cross_attention:
            return None, None
        if getattr(module, 'add_q_proj', None) is not None or getattr(module, 'added_kv_proj_dim', None):
            return None, 'joint attention (SD3/Flux style) mixes text tokens into the keys'
        return 'diffusers', None
    for module_path, name, reason in _UNSUPPORTED:
        cls = _loaded_class(module_path, name)
        if cls is not None and isinstance(module, cls):
            return None, reason
    mixin = _loaded_class('diffusers.models.attention', 'AttentionModuleMixin')
    if mixin is not None and isinstance(module, mixin):
        return None, f'{type(module).__name__} is a diffusers attention class not yet supported'
    return None, None


def find_attention_layers(model: nn.Module) -> List[AttentionLayer]:
    """All self-attention layers of a (possibly wrapped) model, in forward order.

    Raises:
        ValueError: the model holds attention we cannot capture (names the module and why), or none at all.
    """
    model = unwrap_model(model)
    layers = []
    for name, module in model.named_modules():
        kind, reason = _attention_kind(module)
        if reason is not None:
            raise ValueError(
                f"Attention module '{name}' ({type(module).__name__}) is not supported by SHD capture: {reason}.")
        if kind == 'timm':
            layers.append(AttentionLayer(name, module, kind, module.num_heads, module.head_dim, module.scale))
        elif kind == 'diffusers':
            head_dim = module.inner_dim // module.heads
            layers.append(AttentionLayer(name, module, kind, module.heads, head_dim, float(module.scale)))
    if not layers:
        raise ValueError(
            f'No supported attention layers found in {type(model).__name__}: SHD capture supports timm '
            f'Attention (VisionTransformer family) and diffusers Attention self-attention (DiT, PixArt).')
    return layers


@dataclass
class _Slot:
    """Tensors recorded for one layer during the current forward."""
    q: Optional[torch.Tensor] = None
    k: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None


def _heads_first(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """A projection output (B, N, H*d) as per-head (B, H, N, d)."""
    batch, tokens, width = x.shape
    return x.view(batch, tokens, num_heads, width // num_heads).transpose(1, 2)


class AttentionCapture:
    """Record per-head q, k (and v) of selected attention layers with forward hooks.

    Args:
        model: A timm VisionTransformer-family model or a diffusers model built from ``Attention``; DDP,
            DataParallel and ``torch.compile`` wrappers are unwrapped (the hooks go on the inner module).
        layers: Indices into :func:`find_attention_layers` order to record; all layers when None.
        record_values: Also record v and expose the output-projection weight (the teacher side needs them for
            the merge weights; see :meth:`AttentionLayer.check_linear_output`).

    Use as a context manager, or call :meth:`remove`. After each forward, ``capture[i]`` gives the
    :class:`CapturedAttention` of layer i. Hooks fire only for the module they were installed on, so a
    ``copy.deepcopy`` of the model (an EMA copy) carries inert hooks and never records into this capture.
    """

    def __init__(self, model: nn.Module, layers: Optional[Sequence[int]] = None, *, record_values: bool = False):
        self.layers = find_attention_layers(model)
        self.record_values = record_values
        selected = range(len(self.layers)) if layers is None else layers
        self.selected = sorted(set(int(i) for i in selected))
        for i in self.selected:
            if not 0 <= i < len(self.layers):
                raise ValueError(
                    f'Layer index {i} out of range: the model has {len(self.layers)} attention layers '
                    f'(0..{len(self.layers) - 1}).')
        self._slots: Dict[int, _Slot] = {}
        self._handles: List[torch.utils.hooks.RemovableHandle] = []
        for i in self.selected:
            self._install(i)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _hook(self, index: int, submodule: nn.Module, record: Callable[[_Slot, torch.Tensor], None]):
        submodule_ref = weakref.ref(submodule)
        slots = self._slots

        def hook(module: nn.Module, args, output: torch.Tensor) -> None:
            if module is not submodule_ref():  # a deepcopy (EMA) of the hooked module: stay inert
                return
            record(slots.setdefault(index, _Slot()), output)

        self._handles.append(submodule.register_forward_hook(hook))

    def _install(self, index: int) -> None:
        layer = self.layers[index]
        attn, heads, head_dim = layer.module, layer.num_heads, layer.head_dim

        if layer.kind == 'timm':
            # q_norm / k_norm are always called (nn.Identity without qk_norm): their outputs are the final
            # (B, H, N, d) q and k on both the fused and the unfused path.
            self._hook(index, attn.q_norm, lambda slot, out: setattr(slot, 'q', out))
            self._hook(index, attn.k_norm, lambda slot, out: setattr(slot, 'k', out))
            if self.record_values:
                def record_v(slot: _Slot, out: torch.Tensor) -> None:
                    batch, tokens, _ = out.shape
                    slot.v = out.view(batch, tokens, 3, heads, head_dim)[:, :, 2].transpose(1, 2)
                self._hook(index, attn.qkv, record_v)
            return

        # diffusers: projections first; norm_q/norm_k (when a processor applies them) overwrite q/k after.
        if getattr(attn, 'fused_projections', False) and hasattr(attn, 'to_qkv'):
            def record_qkv(slot: _Slot, out: torch.Tensor) -> None:
                q, k, v = out.chunk(3, dim=-1)
                slot.q, slot.k = _heads_first(q, heads), _heads_first(k, heads)
                if self.record_values:
                    slot.v = _heads_first(v, heads)
            self._hook(index, attn.to_qkv, record_qkv)
        else:
            self._hook(index, attn.to_q, lambda slot, out: setattr(slot, 'q', _heads_first(out, heads)))
            self._hook(index, attn.to_k, lambda slot, out: setattr(slot, 'k', _heads_first(out, heads)))
            if self.record_values:
                self._hook(index, attn.to_v, lambda slot, out: setattr(slot, 'v', _heads_first(out, heads)))
        if getattr(attn, 'norm_q', None) is not None:
            self._hook(index, attn.norm_q, lambda slot, out: setattr(slot, 'q', _per_head(out, heads)))
        if getattr(attn, 'norm_k', None) is not None:
            self._hook(index, attn.norm_k, lambda slot, out: setattr(slot, 'k', _per_head(out, heads)))

    def __getitem__(self, index: int) -> CapturedAttention:
        layer = self.layers[index]
        slot = self._slots.get(index)
        if slot is None or slot.q is None or slot.k is None or (self.record_values and slot.v is None):
            raise RuntimeError(
                f"No attention was recorded for layer {index} ('{layer.name}'). Run the model's forward after "
                f"installing the capture; if fuse_qkv_projections() was called after installing it, install "
                f"the capture again.")
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

    def __enter__(self) -> 'AttentionCapture':
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _per_head(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """A per-head norm output: (B, H, N, d) as is, (B*H, N, d) from head_to_batch_dim processors regrouped."""
    if x.dim() == 4:
        return x
    batch_heads, tokens, head_dim = x.shape
    return x.view(batch_heads // num_heads, num_heads, tokens, head_dim)
