"""Squeezing-Heads Distillation for diffusers DiTs, as one objective a training loop calls.

timm's distillation tasks (``timm/task/distillation.py``) hold the frozen teacher, run both forwards and return a
dict of loss terms whose ``'loss'`` the loop backpropagates. :class:`DiTDistillationObjective` is the same for a
class-conditional diffusers DiT: given the noisy latents, timesteps and class labels of a training step it runs the
frozen teacher and the student on the same inputs and returns

    loss = L_diffusion(student) + output_kd_weight * MSE(student_eps, teacher_eps) + shd.weight * L_SHD

``L_diffusion`` (DiT's eps MSE, plus the variational bound for learned-sigma models) is added when the loop passes
the ``noise``; ``L_SHD`` squeezes each distilled teacher layer's M attention maps into the student's N <= M maps
(:class:`~shd_plugins.SHDDistiller`, forward hooks only, so any attention processor works).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
import torch.nn as nn

from ..capture import unwrap_model
from ..config import SHDConfig
from ..core.losses import output_mse_loss
from ..distiller import SHDDistiller
from .losses import LearnedSigmaVLB, default_dit_scheduler, dit_diffusion_loss, drop_class_labels
from .models import builtin_label_dropout, check_teacher_compatible, disable_builtin_label_dropout, learns_sigma

__all__ = ['DiTDistillationObjective']

_logger = logging.getLogger(__name__)


class DiTDistillationObjective(nn.Module):
    """DiT training objective with output and attention (SHD) distillation from a frozen teacher DiT.

    The teacher is frozen (``requires_grad=False``, eval mode even when the objective is put in train mode) and
    never modified; it sees exactly the student's noisy inputs, timesteps and class labels, under ``no_grad`` and in
    its own weight dtype (e.g. bf16 under mixed precision). Only the teacher and student forwards run inside this
    objective are recorded for SHD: sampling, validation and EMA forwards elsewhere leave nothing behind. Losses are
    float32.

    Labels: diffusers' DiT drops labels by itself in train mode, independently in every block and never in the
    (eval-mode) teacher. The objective disables that and instead drops each label once, with the same
    probability, before handing the same labels to both models, so the classifier-free-guidance training of the
    student is kept and teacher and student agree on the condition.

    Args:
        student: The DiT being trained (``DiTTransformer2DModel``, possibly wrapped by DDP/``accelerate``: the
            wrapper is what is called, so gradients are synchronised).
        teacher: The frozen teacher DiT (same token grid, input channels and classes, >= heads in distilled
            layers); ``None`` for DiT's plain objective (then ``noise`` must be given).
        shd: The SHD options; ``SHDConfig()`` when None. ``weight == 0`` disables the attention term (no hooks).
        output_kd_weight: Weight of the MSE between the student's and teacher's noise predictions (eps channels).
        class_dropout_prob: Probability of replacing a label by the null class (``num_embeds_ada_norm``) in train
            mode. None takes the student's built-in rate (0.1 for diffusers' DiT); 0 when the loop drops labels
            itself (:func:`~shd_plugins.diffusers.drop_class_labels`).
        noise_scheduler: The training scheduler, whose betas define the learned-sigma bound; DiT's default
            schedule when None.

    Raises:
        ValueError: A teacher that cannot teach this student (token grid, channels, classes, heads), or an
            invalid option.

    Example::

        from shd_plugins import SHDConfig
        from shd_plugins.diffusers import DiTDistillationObjective

        objective = DiTDistillationObjective(student, teacher, SHDConfig(weight=1.0, temperature=2.0))
        for latents, labels in loader:
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, 1000, (len(latents),))
            noisy_latents = scheduler.add_noise(latents, noise, timesteps)
            terms = objective(noisy_latents, timesteps, labels, noise=noise, latents=latents)
            terms['loss'].backward()
            optimizer.step(); optimizer.zero_grad()
    """

    def __init__(
            self,
            student: nn.Module,
            teacher: nn.Module | None,
            shd: SHDConfig | None = None,
            *,
            output_kd_weight: float = 1.0,
            class_dropout_prob: float | None = None,
            noise_scheduler: Any | None = None,
    ):
        super().__init__()
        self.shd = shd or SHDConfig()
        if output_kd_weight < 0:
            raise ValueError(f'output_kd_weight must be >= 0, got {output_kd_weight}.')
        student_model = unwrap_model(student)
        if class_dropout_prob is None:
            class_dropout_prob = builtin_label_dropout(student_model)
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f'class_dropout_prob must be in [0, 1), got {class_dropout_prob}.')
        self.output_kd_weight = float(output_kd_weight)
        self.class_dropout_prob = float(class_dropout_prob)
        self.null_class = student_model.config.num_embeds_ada_norm
        disable_builtin_label_dropout(student_model)

        self.student = student
        self.teacher = teacher
        self.distiller: SHDDistiller | None = None
        if teacher is not None:
            check_teacher_compatible(unwrap_model(teacher), student_model)
            teacher.requires_grad_(False)
            teacher.eval()
            if self.shd.enabled:
                self.distiller = SHDDistiller(teacher, student, self.shd)
                _logger.info(f'SHD layer pairs (teacher, student): {self.distiller.layer_pairs}')
            if not self.shd.enabled and self.output_kd_weight == 0:
                _logger.warning('A teacher was given but the SHD and output KD weights are 0: it is unused.')

        self.vlb = None
        if learns_sigma(student_model):
            betas = (noise_scheduler or default_dit_scheduler()).betas
            self.vlb = LearnedSigmaVLB(betas)
        self._warned_no_latents = False

    @property
    def layer_pairs(self) -> list[tuple[int, int]]:
        """The distilled ``(teacher_layer, student_layer)`` pairs (empty without SHD)."""
        return list(self.distiller.layer_pairs) if self.distiller is not None else []

    @property
    def uses_teacher(self) -> bool:
        """Whether a distillation term (SHD or output KD) needs the teacher's forward."""
        return self.teacher is not None and (self.distiller is not None or self.output_kd_weight > 0)

    def train(self, mode: bool = True) -> DiTDistillationObjective:
        """Set the student's mode; the teacher stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def _teacher_dtype(self) -> torch.dtype:
        return next(self.teacher.parameters()).dtype

    def forward(
            self,
            noisy_latents: torch.Tensor,
            timesteps: torch.Tensor,
            class_labels: torch.Tensor,
            *,
            noise: torch.Tensor | None = None,
            latents: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One training step's loss terms.

        Args:
            noisy_latents: x_t, (B, C, H, W).
            timesteps: Integer timesteps (B,).
            class_labels: Class ids (B,), dropped here with ``class_dropout_prob`` in train mode.
            noise: The noise added to the latents; adds DiT's diffusion loss (``mse``, ``vb``,
                ``diffusion_loss``) to ``loss``.
            latents: Clean latents x_0; with ``noise``, adds the variational bound (``vb``) of learned-sigma
                models (without them the variance channels get no training signal).

        Returns:
            ``{'loss', 'output', 'output_kd_loss', 'shd_loss', 'shd_loss/t<i>_s<j>', 'shd_alpha_mean/...',
            'shd_alpha_std/...', 'mse', 'vb', 'diffusion_loss'}`` as present: ``output`` is the student's
            prediction; ``output_kd_loss`` and ``shd_loss`` are unweighted (like timm's ``kd_loss``); the
            per-layer SHD logs are detached; nothing syncs the device.
        """
        if noise is None and not self.uses_teacher:
            raise ValueError('No distillation term (no teacher, or SHD and output KD weights 0): pass noise= for the '
                             'diffusion loss.')
        if self.training and self.class_dropout_prob > 0:
            class_labels = drop_class_labels(class_labels, self.class_dropout_prob, self.null_class)

        teacher_output = None
        with self.distiller.recording() if self.distiller is not None else contextlib.nullcontext():
            if self.uses_teacher:
                with torch.no_grad():
                    teacher_output = self.teacher(noisy_latents.to(self._teacher_dtype()), timestep=timesteps,
                                                  class_labels=class_labels).sample
            output = self.student(noisy_latents, timestep=timesteps, class_labels=class_labels).sample

        terms: dict[str, torch.Tensor] = {}
        loss = output.new_zeros((), dtype=torch.float32)
        if noise is not None:
            if self.vlb is not None and latents is None and not self._warned_no_latents:
                _logger.warning('A learned-sigma student without latents=: the variance channels are not trained.')
                self._warned_no_latents = True
            vlb = self.vlb if latents is not None else None
            terms.update(dit_diffusion_loss(output, noise, vlb=vlb, latents=latents, noisy_latents=noisy_latents,
                                            timesteps=timesteps))
            loss = loss + terms['diffusion_loss']
        if self.output_kd_weight > 0 and teacher_output is not None:
            channels = noisy_latents.shape[1]
            terms['output_kd_loss'] = output_mse_loss(output[:, :channels], teacher_output[:, :channels])
            loss = loss + self.output_kd_weight * terms['output_kd_loss']
        if self.distiller is not None:
            shd = self.distiller.compute_loss()  # float32 even under autocast (shd_plugins.core.precision)
            terms.update(shd.log_tensors('shd'))
            terms['shd_loss'] = shd.value
            loss = loss + shd.loss
        return {'loss': loss, 'output': output, **terms}

    def remove_hooks(self) -> None:
        """Remove the SHD capture hooks from the teacher and the student."""
        if self.distiller is not None:
            self.distiller.remove()
