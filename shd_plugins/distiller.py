"""Pair a teacher and a student, capture both, and compute the SHD loss after their forwards."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .capture import AttentionCapture, CapturedAttention, find_attention_layers, num_prefix_tokens
from .config import SHDConfig
from .core.heads import merge_schedule
from .core.layer_mapping import resolve_layer_pairs
from .core.losses import shd_loss
from .core.streamed import streamed_shd_loss

__all__ = ['SHDOutput', 'SHDDistiller']

_logger = logging.getLogger(__name__)


@dataclass
class SHDOutput:
    """The SHD loss of one step, with detached per-layer values for logging.

    ``value`` is the mean over layer pairs (logged as ``shd_loss``, unweighted like timm's ``kd_loss``) and ``loss``
    is ``weight * value``, the term to add to the objective. ``layer_losses`` and ``alphas`` are keyed by
    ``(teacher_layer, student_layer)``; ``alphas`` holds the merge weights (B, M - N[, T]) of each pair. Nothing here
    syncs the device until :meth:`log_dict` is called.
    """

    loss: torch.Tensor
    value: torch.Tensor
    layer_losses: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    alphas: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    def log_tensors(self, prefix: str = 'shd') -> dict[str, torch.Tensor]:
        """Detached scalars: the loss, each layer's loss and the mean/std of its merge weights (no device sync)."""
        logs = {f'{prefix}_loss': self.value.detach()}
        for (t, s), value in self.layer_losses.items():
            logs[f'{prefix}_loss/t{t}_s{s}'] = value
            alpha = self.alphas[(t, s)]
            if alpha.numel():
                logs[f'{prefix}_alpha_mean/t{t}_s{s}'] = alpha.float().mean()
                logs[f'{prefix}_alpha_std/t{t}_s{s}'] = alpha.float().std(unbiased=False)
        return logs

    def log_dict(self, prefix: str = 'shd') -> dict[str, float]:
        """:meth:`log_tensors` as Python floats (syncs the device)."""
        return {key: value.item() for key, value in self.log_tensors(prefix).items()}


class SHDDistiller:
    """Squeezing-Heads Distillation between a teacher and a student transformer.

    Installs :class:`~shd_plugins.capture.AttentionCapture` hooks on the distilled layers of both models (never
    changing their forward), pairs layers, and after one teacher and one student forward on the same inputs, run
    inside :meth:`recording`, returns the SHD loss. The teacher is never modified: not its parameters, buffers,
    train/eval mode, and no hook stays after :meth:`remove`.

    Args:
        teacher: Frozen teacher (any model a registered attention adapter claims); wrappers are unwrapped.
        student: Student with N <= M heads in every distilled layer.
        config: The SHD options (:class:`~shd_plugins.SHDConfig`); defaults when None.
        dense: Compute the loss from (B, H, T, T) score maps (:func:`~shd_plugins.core.losses.shd_loss`, the
            reference) instead of streaming it from q, k, v in row blocks
            (:func:`~shd_plugins.core.streamed.streamed_shd_loss`, the default: same value, gradients and merge
            weights, without holding or saving N x N tensors). Layers whose capture records an additive logits
            bias (a relative-position bias) always take the dense loss.
        **options: Options overriding ``config`` (``temperature=2.0``, ``merge='mean'``, ...).

    Example::

        distiller = SHDDistiller(teacher, student, SHDConfig(temperature=2.0, weight=1.0))
        with distiller.recording():
            teacher_logits = distiller.teacher_forward(x)
            student_logits = student(x)
        shd = distiller.compute_loss()
        (task_loss + shd.loss).backward()
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, config: SHDConfig | None = None, *,
                 dense: bool = False, **options: Any):
        config = config or SHDConfig()
        self.dense = dense
        self.config = config.replace(**options) if options else config
        teacher_layers = find_attention_layers(teacher)
        student_layers = find_attention_layers(student)
        self.layer_pairs = resolve_layer_pairs(self.config.layers, len(teacher_layers), len(student_layers))
        for t, s in self.layer_pairs:
            t_layer, s_layer = teacher_layers[t], student_layers[s]
            if t_layer.num_heads < s_layer.num_heads:
                raise ValueError(
                    f"Teacher layer {t} ('{t_layer.name}') has {t_layer.num_heads} heads but student layer {s} "
                    f"('{s_layer.name}') has {s_layer.num_heads}: SHD squeezes M teacher heads into N <= M student "
                    f'heads. Use a teacher with at least as many heads as the student.')
            merge_schedule(t_layer.num_heads, s_layer.num_heads, self.config.grouping)
            if self.config.merge == 'shd':
                t_layer.check_linear_output()

        self.prefix_tokens = (
            (num_prefix_tokens(teacher), num_prefix_tokens(student)) if self.config.tokens != 'all' else (0, 0))
        self.teacher = teacher
        self.teacher_capture = AttentionCapture(teacher, [t for t, _ in self.layer_pairs], record_values=True)
        self.student_capture = AttentionCapture(student, [s for _, s in self.layer_pairs])
        self._finite_checked = False
        self._said_teacher_eval = False

    @contextlib.contextmanager
    def recording(self) -> Iterator[SHDDistiller]:
        """Record the teacher and student forwards run inside (the training forward); nothing else is recorded.

        Entering drops whatever an earlier step left; :meth:`compute_loss` may run inside or after the block. A
        teacher left in train mode is put in eval mode (said once in the log): with dropout on, its targets would
        differ at every step.
        """
        if self.teacher.training:
            if not self._said_teacher_eval:
                _logger.info('The SHD teacher was in train mode: putting it in eval mode (dropout and drop-path off) '
                             'so that its attention targets are deterministic.')
                self._said_teacher_eval = True
            self.teacher.eval()
        with self.teacher_capture.recording(), self.student_capture.recording():
            yield self

    def teacher_forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the teacher without gradients (its maps are targets, never trained)."""
        with torch.no_grad():
            return self.teacher(*args, **kwargs)

    def compute_loss(
            self,
            query_mask: torch.Tensor | None = None,
            key_mask: torch.Tensor | None = None,
    ) -> SHDOutput:
        """SHD loss from the forwards of the last :meth:`recording` block; frees the recorded tensors.

        Args:
            query_mask: (B, T) bool over the kept tokens, True where a query row counts.
            key_mask: (B, T) bool over the kept tokens, True where a key may be attended.
        """
        config = self.config
        layer_losses: dict[tuple[int, int], torch.Tensor] = {}
        alphas: dict[tuple[int, int], torch.Tensor] = {}
        values: list[torch.Tensor] = []
        check_finite = config.check_finite or not self._finite_checked
        try:
            for t, s in self.layer_pairs:
                teacher_rec, student_rec = self.teacher_capture[t], self.student_capture[s]
                if config.tokens != 'all':
                    teacher_rec, student_rec = teacher_rec.image_only(), student_rec.image_only()
                self._check_token_sets(t, s, teacher_rec, student_rec)
                self._check_student_graph(s, student_rec.q)
                if check_finite:
                    self._check_finite(t, s, teacher_rec, student_rec)
                options = dict(
                    temperature=config.temperature, loss=config.loss, merge=config.merge, grouping=config.grouping,
                    per_row=config.per_row, query_mask=query_mask, key_mask=key_mask,
                    prefix_tokens=self.prefix_tokens, return_alphas=True)
                if self.dense or teacher_rec.bias is not None or student_rec.bias is not None:
                    value, alpha = shd_loss(
                        student_rec.logits(), teacher_rec.logits(), teacher_rec.v, teacher_rec.projections(), **options)
                else:
                    value, alpha = streamed_shd_loss(
                        student_rec.q, student_rec.k, student_rec.scale, teacher_rec.q, teacher_rec.k, teacher_rec.v,
                        teacher_rec.projections(), teacher_rec.scale, **options)
                values.append(value)
                layer_losses[(t, s)] = value.detach()
                alphas[(t, s)] = alpha
        finally:
            self.clear()
        self._finite_checked = True
        value = torch.stack(values).mean()
        return SHDOutput(loss=config.weight * value, value=value, layer_losses=layer_losses, alphas=alphas)

    def _check_finite(self, t: int, s: int, teacher_rec: CapturedAttention, student_rec: CapturedAttention) -> None:
        """Raise on NaN/inf in the recorded tensors, naming the tensor and the layer (syncs the device: run once)."""
        for side, rec, layer in (('teacher', teacher_rec, self.teacher_capture.layers[t]),
                                 ('student', student_rec, self.student_capture.layers[s])):
            for name in ('q', 'k', 'v'):
                tensor = getattr(rec, name)
                if tensor is not None and not bool(torch.isfinite(tensor).all()):
                    raise ValueError(
                        f"The {side}'s {name} of layer pair (teacher {t}, student {s}) holds NaN or inf (attention "
                        f"module '{layer.name}'): the model's forward diverged or its input is not finite. Check the "
                        f'inputs and the learning rate; SHD checks the first step, SHDConfig(check_finite=True) every '
                        f'step.')

    def _check_token_sets(self, t: int, s: int, teacher_rec: CapturedAttention, student_rec: CapturedAttention) -> None:
        """Joint attention: the teacher's and the student's maps must cover the same text and image tokens."""
        if teacher_rec.text is None and student_rec.text is None:
            return  # plain attention: the loss names differing token counts itself
        if teacher_rec.text != student_rec.text or teacher_rec.tokens != student_rec.tokens:
            def describe(rec: CapturedAttention) -> str:
                text = 0 if rec.text is None else rec.text.stop - rec.text.start
                return (f'{rec.tokens} tokens ({text} text at {rec.text}, {rec.tokens - text} image), '
                        f'q {tuple(rec.q.shape)}')
            raise ValueError(
                f'Layer pair (teacher {t}, student {s}): the joint attention maps cover different token sets: '
                f'teacher {describe(teacher_rec)} vs student {describe(student_rec)}. Give both models the same '
                f"prompt embeddings (text length) and latent size, or distil the image tokens only (tokens='image').")

    def _check_student_graph(self, index: int, q: torch.Tensor) -> None:
        module = self.student_capture.layers[index].module
        if torch.is_grad_enabled() and not q.requires_grad and any(p.requires_grad for p in module.parameters()):
            raise RuntimeError(
                f"The student's q/k of layer {index} carry no gradient although the student is trainable: its "
                f'forward ran under torch.no_grad(), or under reentrant gradient checkpointing '
                f'(use_reentrant=True), which hides the graph from hooks. Use non-reentrant checkpointing '
                f"(timm: set_reentrant_ckpt(False); diffusers' default) for SHD.")

    def clear(self) -> None:
        """Drop the recorded tensors of both models."""
        self.teacher_capture.clear()
        self.student_capture.clear()

    def remove(self) -> None:
        """Remove all hooks from both models."""
        self.teacher_capture.remove()
        self.student_capture.remove()

    def __enter__(self) -> SHDDistiller:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
