"""Pair a teacher and a student, capture both, and compute the SHD loss after their forwards."""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .capture import AttentionCapture, find_attention_layers, num_prefix_tokens
from .heads import merge_schedule
from .layer_mapping import LayerSpec, resolve_layer_pairs
from .losses import LOSS_TYPES, shd_loss
from .merge import MERGE_MODES

__all__ = ['TOKEN_MODES', 'SHDOutput', 'SHDDistiller']

TOKEN_MODES = ('all', 'patch')


@dataclass
class SHDOutput:
    """The weighted SHD loss of one step, with detached per-layer values for logging.

    ``layer_losses`` and ``alphas`` are keyed by ``(teacher_layer, student_layer)``; ``alphas`` holds the merge
    weights (B, M - N[, T]) of each pair. Nothing here syncs the device until :meth:`log_dict` is called.
    """
    loss: torch.Tensor
    layer_losses: Dict[Tuple[int, int], torch.Tensor] = field(default_factory=dict)
    alphas: Dict[Tuple[int, int], torch.Tensor] = field(default_factory=dict)

    def log_dict(self, prefix: str = 'shd') -> Dict[str, float]:
        """Flat floats: the loss, each layer's loss and the mean/std of its merge weights."""
        logs = {f'{prefix}_loss': self.loss.item()}
        for (t, s), value in self.layer_losses.items():
            logs[f'{prefix}_loss/t{t}_s{s}'] = value.item()
            alpha = self.alphas[(t, s)]
            if alpha.numel():
                logs[f'{prefix}_alpha_mean/t{t}_s{s}'] = alpha.float().mean().item()
                logs[f'{prefix}_alpha_std/t{t}_s{s}'] = alpha.float().std(unbiased=False).item()
        return logs


class SHDDistiller:
    """Squeezing-Heads Distillation between a teacher and a student transformer.

    Installs :class:`AttentionCapture` hooks on the distilled layers of both models (never changing their
    forward), pairs layers, and after one teacher and one student forward on the same inputs returns the
    weighted SHD loss. The teacher is never modified: not its parameters, buffers, train/eval mode, and no
    hook stays after :meth:`remove`.

    Args:
        teacher: Frozen teacher (timm ViT family or diffusers DiT/PixArt); wrappers are unwrapped.
        student: Student with N <= M heads in every distilled layer.
        layers: ``'uniform'``, ``'last:K'``, ``'t:s,...'`` or ``[(t, s), ...]``
            (see :func:`shd_plugins.layer_mapping.resolve_layer_pairs`).
        temperature: tau of the softened maps.
        weight: lambda_SHD multiplying the mean over layer pairs.
        merge: ``'shd'``, ``'mean'`` or ``'select'``.
        loss: ``'kl'`` or ``'mse'``.
        grouping: ``'progressive'`` or ``'balanced'``.
        tokens: ``'all'`` (maps must cover the same tokens) or ``'patch'`` (drop each model's prefix tokens:
            cls/dist/registers, so e.g. DeiT-distilled can teach a ViT).
        per_row: One merge weight per query row.

    Example::

        distiller = SHDDistiller(teacher, student, temperature=2.0, weight=1.0)
        with torch.no_grad():
            teacher_logits = teacher(x)
        student_logits = student(x)
        shd = distiller.compute_loss()
        (task_loss + shd.loss).backward()
    """

    def __init__(
            self,
            teacher: nn.Module,
            student: nn.Module,
            *,
            layers: LayerSpec = 'uniform',
            temperature: float = 1.0,
            weight: float = 1.0,
            merge: str = 'shd',
            loss: str = 'kl',
            grouping: str = 'progressive',
            tokens: str = 'all',
            per_row: bool = False,
    ):
        if tokens not in TOKEN_MODES:
            raise ValueError(f"Unknown tokens '{tokens}'; choose one of {TOKEN_MODES}.")
        if merge not in MERGE_MODES:
            raise ValueError(f"Unknown merge '{merge}'; choose one of {MERGE_MODES}.")
        if loss not in LOSS_TYPES:
            raise ValueError(f"Unknown loss '{loss}'; choose one of {LOSS_TYPES}.")
        if not temperature > 0:
            raise ValueError(f'temperature must be > 0, got {temperature}.')

        teacher_layers = find_attention_layers(teacher)
        student_layers = find_attention_layers(student)
        self.layer_pairs = resolve_layer_pairs(layers, len(teacher_layers), len(student_layers))
        for t, s in self.layer_pairs:
            t_layer, s_layer = teacher_layers[t], student_layers[s]
            if t_layer.num_heads < s_layer.num_heads:
                raise ValueError(
                    f"Teacher layer {t} ('{t_layer.name}') has {t_layer.num_heads} heads but student layer {s} "
                    f"('{s_layer.name}') has {s_layer.num_heads}: SHD squeezes M teacher heads into N <= M student "
                    f"heads. Use a teacher with at least as many heads as the student.")
            merge_schedule(t_layer.num_heads, s_layer.num_heads, grouping)  # validates the grouping mode
            if merge == 'shd':
                t_layer.check_linear_output()

        self.temperature = temperature
        self.weight = weight
        self.merge = merge
        self.loss = loss
        self.grouping = grouping
        self.per_row = per_row
        self.prefix_tokens = (num_prefix_tokens(teacher), num_prefix_tokens(student)) if tokens == 'patch' else (0, 0)
        self.teacher = teacher
        self.teacher_capture = AttentionCapture(teacher, [t for t, _ in self.layer_pairs], record_values=True)
        self.student_capture = AttentionCapture(student, [s for _, s in self.layer_pairs])

    def teacher_forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the teacher without gradients (its maps are targets, never trained)."""
        with torch.no_grad():
            return self.teacher(*args, **kwargs)

    def compute_loss(
            self,
            query_mask: Optional[torch.Tensor] = None,
            key_mask: Optional[torch.Tensor] = None,
    ) -> SHDOutput:
        """Weighted SHD loss from the last teacher and student forwards; frees the recorded tensors.

        Args:
            query_mask: (B, T) bool over the kept tokens, True where a query row counts.
            key_mask: (B, T) bool over the kept tokens, True where a key may be attended.
        """
        layer_losses: Dict[Tuple[int, int], torch.Tensor] = {}
        alphas: Dict[Tuple[int, int], torch.Tensor] = {}
        values: List[torch.Tensor] = []
        for t, s in self.layer_pairs:
            teacher_rec, student_rec = self.teacher_capture[t], self.student_capture[s]
            self._check_student_graph(s, student_rec.q)
            value, alpha = shd_loss(
                student_rec.logits(), teacher_rec.logits(), teacher_rec.v, teacher_rec.out_weight,
                temperature=self.temperature, loss=self.loss, merge=self.merge, grouping=self.grouping,
                per_row=self.per_row, query_mask=query_mask, key_mask=key_mask, prefix_tokens=self.prefix_tokens,
                return_alphas=True)
            values.append(value)
            layer_losses[(t, s)] = value.detach()
            alphas[(t, s)] = alpha
        self.clear()
        return SHDOutput(loss=self.weight * torch.stack(values).mean(), layer_losses=layer_losses, alphas=alphas)

    def _check_student_graph(self, index: int, q: torch.Tensor) -> None:
        module = self.student_capture.layers[index].module
        if torch.is_grad_enabled() and not q.requires_grad and any(p.requires_grad for p in module.parameters()):
            raise RuntimeError(
                f"The student's q/k of layer {index} carry no gradient although the student is trainable: its "
                f"forward ran under torch.no_grad(), or under reentrant gradient checkpointing "
                f"(use_reentrant=True), which hides the graph from hooks. Use non-reentrant checkpointing "
                f"(timm: set_reentrant_ckpt(False); diffusers' default) for SHD.")

    def clear(self) -> None:
        self.teacher_capture.clear()
        self.student_capture.clear()

    def remove(self) -> None:
        """Remove all hooks from both models."""
        self.teacher_capture.remove()
        self.student_capture.remove()

    def __enter__(self) -> 'SHDDistiller':
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
