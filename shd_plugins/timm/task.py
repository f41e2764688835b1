"""Squeezing-Heads Distillation as a ``timm.task.TrainingTask``.

timm (>= 1.0.31) trains through task objects: ``task(input, target)`` returns a dict whose ``'loss'`` is
backpropagated. It ships logit, feature and token distillation but no attention-map distillation.
:class:`SHDDistillationTask` adds it the way timm would: it *is* a :class:`timm.task.LogitDistillationTask`
(same teacher wrapper, input re-normalisation, weighting modes, DDP, EMA and checkpoint behaviour) whose loss
gains ``weight * L_SHD`` from an :class:`~shd_plugins.SHDDistiller` hooked on the teacher and the student. The SHD
options are one :class:`~shd_plugins.SHDConfig`, declared and validated there, never here.

A copy of timm's ``train.py`` offers ``--kd-distill-type shd`` with :func:`add_shd_args`, and
:func:`create_distillation_task` builds any of its four distillation tasks with the local teacher (see the README).
"""
from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from timm.models import create_model, get_model_input_config, load_state_dict, resolve_model_input_args
from timm.task import (
    DistillationTeacher,
    FeatureDistillationTask,
    LogitDistillationTask,
    TokenDistillationTask,
    TrainingTask,
)
from timm.utils import unwrap_model

from ..cli import ParseKwargs
from ..config import SHDConfig
from ..distiller import SHDDistiller
from ..evaluation.checkpoints import check_checkpoint_args, read_checkpoint_metadata
from .data import per_channel

__all__ = [
    'SHDDistillationTask', 'create_distillation_teacher', 'create_distillation_task', 'teacher_from_checkpoint',
    'add_shd_args', 'match_normalization', 'KD_DISTILL_TYPES',
]

_logger = logging.getLogger(__name__)

KD_DISTILL_TYPES = ('logit', 'feature', 'token', 'shd')


def teacher_from_checkpoint(
        path: str | os.PathLike,
        name: str | None,
        model_kwargs: dict[str, Any] | None,
) -> tuple[str, dict[str, Any]]:
    """The teacher's model name and kwargs, completed and checked against what its timm train checkpoint records.

    A checkpoint written by timm's ``train.py`` (or ``recipes/train_timm.py``) carries ``arch`` and ``args``
    (``model``, ``model_kwargs``), so the teacher can be rebuilt from the file alone. Given values must agree with
    them: a wrong head count with equal weight shapes would otherwise load and distil the wrong attention split.

    Returns:
        ``(name, model_kwargs)``: the recorded kwargs updated with the given ones.

    Raises:
        ValueError: The file cannot be read, no name is given or recorded, or a given value disagrees with the
            recorded one (both are named).
    """
    model_kwargs = dict(model_kwargs or {})
    if str(path).endswith('.safetensors'):
        saved = None
    else:
        metadata = read_checkpoint_metadata(path)
        saved = metadata.get('args')
        if saved is not None and not getattr(saved, 'model', None):
            saved = None
    if saved is None:
        if name is None:
            raise ValueError(
                f"Teacher checkpoint '{path}' records no model (not a timm train checkpoint): pass its timm model "
                f"name (--kd-model-name) and --kd-model-kwargs.")
        return name, model_kwargs
    if name is not None and name != saved.model:
        raise ValueError(f"--kd-model-name '{name}' disagrees with teacher checkpoint '{path}', trained as "
                         f"'{saved.model}'. Drop --kd-model-name (it is read from the checkpoint) or fix it.")
    recorded = dict(getattr(saved, 'model_kwargs', None) or {})
    wrong = [f'{k}={v!r} (checkpoint: {recorded[k]!r})' for k, v in model_kwargs.items()
             if k in recorded and recorded[k] != v]
    if wrong:
        raise ValueError(
            f"--kd-model-kwargs {', '.join(wrong)} disagree with what teacher checkpoint '{path}' was trained with "
            f"(model_kwargs {recorded}). Drop them (they are read from the checkpoint) or fix them.")
    return saved.model, {**recorded, **model_kwargs}


def _shape_mismatches(model: nn.Module, path: str) -> list[str]:
    """``key: checkpoint shape vs model shape`` for the weights of ``path`` that do not fit ``model``."""
    state = load_state_dict(path, use_ema=True)  # weights_only=True; train checkpoints unpacked as timm does
    own = model.state_dict()
    return [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
            for k, v in state.items() if k in own and own[k].shape != v.shape]


def create_distillation_teacher(
        model_name_or_module: str | nn.Module | None,
        *,
        num_classes: int | None = None,
        in_chans: int = 3,
        img_size: int | tuple[int, int] | None = None,
        pretrained_path: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        pretrained_cfg_overlay: dict[str, Any] | None = None,
        allow_download: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
) -> DistillationTeacher:
    """A timm :class:`~timm.task.DistillationTeacher` whose weights come from a local file, never a silent download.

    timm's ``DistillationTeacher(name)`` downloads hub weights when no path is given and cannot pass model kwargs
    (a tiny or resized ViT). This builds the model the same way (``pretrained=True`` with a ``file`` overlay, so
    timm's checkpoint filters, train-checkpoint/EMA unpacking and head handling apply) plus ``model_kwargs``, and
    wraps it in timm's ``DistillationTeacher``.

    Args:
        model_name_or_module: timm model name, or a ready teacher module (wrapped as is); None to read it from
            the ``args`` of a timm train checkpoint (:func:`teacher_from_checkpoint`, as are missing kwargs).
        num_classes: Classes of the teacher head (the student's, as timm infers).
        in_chans: Input channels (the student's).
        img_size: Input size (the student's); given to fixed-size models (ViTs) unless ``model_kwargs`` has one.
        pretrained_path: Local checkpoint: a state_dict, ``.safetensors`` or a timm train checkpoint
            (``state_dict_ema`` preferred when present).
        model_kwargs: Extra ``create_model`` kwargs (``img_size``, ``patch_size``, ``depth``, ...).
        pretrained_cfg_overlay: Extra pretrained cfg entries (e.g. ``mean``/``std`` of the teacher's training data).
        allow_download: Without ``pretrained_path``, download the hub weights (needs internet).
        device: Device of the teacher.
        dtype: Dtype of the teacher.

    Raises:
        FileNotFoundError: ``pretrained_path`` does not exist.
        ValueError: A model name with neither ``pretrained_path`` nor ``allow_download``; a checkpoint that cannot
            be read, or whose recorded architecture or weight shapes disagree with the model (both named).
    """
    if isinstance(model_name_or_module, nn.Module):
        return DistillationTeacher(model_name_or_module, device=device, dtype=dtype)
    name = model_name_or_module
    if pretrained_path:
        if not os.path.isfile(pretrained_path):
            raise FileNotFoundError(
                f"Teacher checkpoint '{pretrained_path}' does not exist. Pass the path of a local checkpoint of "
                f"'{name}' (--kd-checkpoint PATH: a state_dict, .safetensors or a timm train checkpoint).")
        name, model_kwargs = teacher_from_checkpoint(pretrained_path, name, model_kwargs)
        overlay = dict(file=str(pretrained_path), num_classes=num_classes)
    elif name is None:
        raise ValueError('No teacher: pass its checkpoint (--kd-checkpoint PATH) and, unless that is a timm train '
                         'checkpoint (which records its model), its timm name (--kd-model-name).')
    elif allow_download:
        overlay = {}
    else:
        raise ValueError(
            f"Teacher '{name}' has no weights: a randomly initialised teacher teaches nothing. Pass a local "
            f"checkpoint (--kd-checkpoint PATH, teacher_pretrained_path=...), or allow the hub download "
            f"(--kd-pretrained, teacher_allow_download=True; needs internet).")
    overlay.update(pretrained_cfg_overlay or {})
    _logger.info(f"Creating KD teacher model '{name}' {model_kwargs or ''} from "
                 f"{pretrained_path or 'pretrained hub weights'}")
    model_args = resolve_model_input_args(
        name, {'img_size': img_size, 'in_chans': in_chans}, num_classes=num_classes, device=device, dtype=dtype,
        **(model_kwargs or {}))
    try:
        model = create_model(**model_args, pretrained=True, pretrained_cfg_overlay=overlay or None)
    except (RuntimeError, ValueError) as e:
        mismatches = _shape_mismatches(create_model(**model_args), str(pretrained_path)) if pretrained_path else []
        if not mismatches:
            raise
        raise ValueError(
            f"Teacher checkpoint '{pretrained_path}' does not fit '{name}' with kwargs {model_kwargs or {}}: "
            f"{'; '.join(mismatches[:4])}{' ...' if len(mismatches) > 4 else ''}. Pass the --kd-model-kwargs the "
            f"teacher was trained with (timm said: {str(e).splitlines()[0]})") from e
    if pretrained_path:  # equal weight shapes load silently: compare head counts, defaults included
        check_checkpoint_args(pretrained_path, model, name)
    return DistillationTeacher(model, device=device, dtype=dtype)


def _teacher_for(student: nn.Module, name: str | None, **kwargs: Any) -> DistillationTeacher:
    """:func:`create_distillation_teacher` for ``student``'s classes, input channels and input size."""
    in_chans = getattr(student, 'in_chans', None)
    return create_distillation_teacher(
        name, num_classes=student.num_classes, in_chans=in_chans if in_chans is not None else 3,
        img_size=tuple(get_model_input_config(student)['input_size'][1:]), **kwargs)


class SHDDistillationTask(LogitDistillationTask):
    """Logit distillation plus Squeezing-Heads attention distillation.

    ``loss = task_w * task_loss + distill_w * kd_loss + shd.weight * shd_loss``, where ``task_w``/``distill_w`` follow
    ``LogitDistillationTask`` (independent weights when ``distill_loss_weight`` is given, complementary when only
    ``task_loss_weight`` is, 1/1 otherwise) and ``shd_loss`` is the SHD loss averaged over the distilled layer pairs.
    Everything but the SHD term is timm's own code: the teacher is timm's ``DistillationTeacher`` (kept in eval
    mode, fed the input re-normalised for its own mean/std), ``prepare_distributed`` wraps only the student, the EMA
    and checkpoint state are the student's.

    The :class:`~shd_plugins.SHDDistiller` hooks ``teacher.model`` and the bare student at construction, so build the
    task before ``prepare_distributed``/``compile`` as timm's ``train.py`` does. Only the training forward records
    attention (it runs inside ``distiller.recording()``), so evaluation and EMA forwards leave nothing behind. With
    ``shd.weight == 0`` no hooks are installed and the task is timm's logit distillation (no ``'shd_loss'``).

    Args:
        student_model: Student ViT with N heads per distilled layer.
        teacher_model: timm model name, module or ``DistillationTeacher`` with M >= N heads; None reads the name
            from ``teacher_pretrained_path``, a timm train checkpoint.
        criterion: Task loss; created from ``criterion_kwargs`` when None.
        criterion_kwargs: Arguments for ``timm.loss.create_classification_loss``.
        teacher_pretrained_path: Local teacher checkpoint (required for a model name unless
            ``teacher_allow_download``).
        teacher_pretrained_cfg_overlay: Teacher pretrained cfg overrides (e.g. its normalisation).
        teacher_model_kwargs: Extra ``create_model`` kwargs for a teacher given by name.
        teacher_allow_download: Download hub weights for a teacher name without a path.
        loss_type: Logit KD loss ('kl').
        distill_loss_weight: Weight of the logit KD loss (see weighting above).
        task_loss_weight: Weight of the task loss (see weighting above).
        temperature: Logit KD temperature.
        shd: The SHD options (weight lambda_SHD, map temperature, layer pairs, merge, loss, tokens, grouping,
            per_row); ``SHDConfig()`` defaults when None.
        input_mean: Normalisation the data loader applies, when it is not the student's pretrained cfg
            (``--mean``); used to re-normalise the teacher input.
        input_std: Likewise for the std.
        device: Device for task tensors/buffers.
        dtype: Dtype for task tensors/buffers.
        verbose: Enable info logging.

    Example::

        task = SHDDistillationTask(
            student, 'deit_small_patch16_224', teacher_pretrained_path='deit_s.pth',
            criterion_kwargs=dict(smoothing=0.1), temperature=1.0, shd=SHDConfig(weight=1.0), device=device)
        result = task(input, target)   # {'loss', 'output', 'task_loss', 'kd_loss', 'shd_loss'}
        result['loss'].backward()
    """

    def __init__(
            self,
            student_model: nn.Module,
            teacher_model: str | nn.Module | DistillationTeacher | None,
            criterion: nn.Module | None = None,
            criterion_kwargs: dict[str, Any] | None = None,
            teacher_pretrained_path: str | None = None,
            teacher_pretrained_cfg_overlay: dict[str, Any] | None = None,
            teacher_model_kwargs: dict[str, Any] | None = None,
            teacher_allow_download: bool = False,
            loss_type: str = 'kl',
            distill_loss_weight: float | None = None,
            task_loss_weight: float | None = None,
            temperature: float = 1.0,
            shd: SHDConfig | None = None,
            input_mean: Sequence[float] | None = None,
            input_std: Sequence[float] | None = None,
            device: torch.device | None = None,
            dtype: torch.dtype | None = None,
            verbose: bool = True,
    ):
        student = unwrap_model(student_model)
        if teacher_model is None or isinstance(teacher_model, str):
            teacher_model = _teacher_for(
                student, teacher_model, pretrained_path=teacher_pretrained_path, model_kwargs=teacher_model_kwargs,
                pretrained_cfg_overlay=teacher_pretrained_cfg_overlay, allow_download=teacher_allow_download,
                device=device, dtype=dtype)
        super().__init__(
            student_model,
            teacher_model,
            criterion=criterion,
            criterion_kwargs=criterion_kwargs,
            loss_type=loss_type,
            distill_loss_weight=distill_loss_weight,
            task_loss_weight=task_loss_weight,
            temperature=temperature,
            device=device,
            dtype=dtype,
            verbose=verbose,
        )
        match_normalization(self, student, input_mean, input_std)

        self.shd = shd if shd is not None else SHDConfig()
        self.distiller = SHDDistiller(self.teacher.model, student, self.shd) if self.shd.enabled else None
        if self.verbose:
            pairs = self.distiller.layer_pairs if self.distiller is not None else 'none (weight 0: SHD off)'
            _logger.info(f'SHDDistillationTask: {self.shd}, layer pairs (teacher, student)={pairs}')

    @classmethod
    def from_args(
            cls,
            args: argparse.Namespace,
            model: nn.Module,
            criterion: nn.Module | None = None,
            criterion_kwargs: dict[str, Any] | None = None,
            device: torch.device | None = None,
            dtype: torch.dtype | None = None,
            verbose: bool = True,
    ) -> SHDDistillationTask:
        """Build the task from timm ``train.py`` arguments plus the flags of :func:`add_shd_args`.

        The SHD options are read by :meth:`SHDConfig.from_args <shd_plugins.SHDConfig.from_args>` (``args.shd_*``;
        absent ones keep their defaults). Pass ``train.py``'s ``train_loss_fn`` as ``criterion`` (or
        ``criterion_kwargs`` for ``create_classification_loss``), as it does for ``LogitDistillationTask``.
        """
        return cls(
            student_model=model,
            teacher_model=args.kd_model_name,
            criterion=criterion,
            criterion_kwargs=criterion_kwargs,
            teacher_pretrained_path=getattr(args, 'kd_checkpoint', None) or None,
            teacher_model_kwargs=getattr(args, 'kd_model_kwargs', None),
            teacher_allow_download=getattr(args, 'kd_pretrained', False),
            loss_type=getattr(args, 'kd_loss_type', 'kl'),
            distill_loss_weight=args.distill_loss_weight,
            task_loss_weight=args.task_loss_weight,
            temperature=args.kd_temperature,
            shd=SHDConfig.from_args(args),
            input_mean=getattr(args, 'mean', None),
            input_std=getattr(args, 'std', None),
            device=device,
            dtype=dtype,
            verbose=verbose,
        )

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logit distillation forward (student, then teacher under no_grad) plus the SHD term of the same forwards.

        Returns:
            ``{'loss', 'output', 'task_loss', 'kd_loss', 'shd_loss'}``; ``shd_loss`` is unweighted (like
            ``kd_loss``), the objective adds ``shd.weight * shd_loss``.
        """
        if self.distiller is None:
            return super().forward(input, target)
        with self.distiller.recording():  # only the training forwards are recorded, never eval/EMA ones
            result = super().forward(input, target)
        shd = self.distiller.compute_loss()  # float32 even under autocast (shd_plugins.core.precision)
        result['loss'] = result['loss'] + shd.loss
        result['shd_loss'] = shd.value
        return result

    def remove_hooks(self) -> None:
        """Remove the SHD capture hooks from the teacher and the student."""
        if self.distiller is not None:
            self.distiller.remove()


def match_normalization(
        task: TrainingTask,
        student: nn.Module,
        input_mean: Sequence[float] | None = None,
        input_std: Sequence[float] | None = None,
) -> None:
    """Size a distillation task's student/teacher mean/std buffers for the real channel count (and the loader's
    override).

    timm's tasks take both from the models' pretrained configs, which say 3 channels even for a 1-channel model,
    so the teacher would be fed a 3-channel re-normalised input. Every task of :func:`create_distillation_task`
    passes through here.
    """
    in_chans = getattr(student, 'in_chans', None)
    teacher = unwrap_model(task.teacher.model)
    teacher_chans = getattr(teacher, 'in_chans', in_chans)
    if in_chans is not None and teacher_chans != in_chans:
        raise ValueError(
            f'The teacher takes {teacher_chans} input channels but the student {in_chans}: both must see the '
            f'same images. Create the teacher with in_chans={in_chans}.')
    for name, override in (('student_mean', input_mean), ('student_std', input_std)):
        values = override if override is not None else getattr(task, name)
        setattr(task, name, per_channel(values, in_chans).to(device=task.device, dtype=task.dtype))
    for name in ('mean_kd', 'std_kd'):
        buffer = getattr(task.teacher, name)
        setattr(task.teacher, name, per_channel(buffer, teacher_chans).to(buffer))


def create_distillation_task(
        args: argparse.Namespace,
        model: nn.Module,
        criterion: nn.Module | None = None,
        criterion_kwargs: dict[str, Any] | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        verbose: bool = True,
) -> TrainingTask:
    """Any of timm ``train.py``'s distillation tasks (``--kd-distill-type logit|feature|token|shd``), local teacher.

    timm's ``train.py`` hands ``--kd-model-name`` to its tasks, which build the teacher from the hub; this builds it
    with :func:`create_distillation_teacher` from ``--kd-checkpoint`` (alone, for a timm train checkpoint) and
    ``--kd-model-kwargs`` (``--kd-pretrained`` allows the hub), so the four types honour the same flags. The other
    arguments are timm's, read as ``train.py`` reads them.

    Raises:
        ValueError: An unknown ``--kd-distill-type``, or a teacher that cannot be built (the message says why).
    """
    distill_type = getattr(args, 'kd_distill_type', 'logit')
    if distill_type not in KD_DISTILL_TYPES:
        raise ValueError(f"Unknown --kd-distill-type '{distill_type}'; choose one of {', '.join(KD_DISTILL_TYPES)}.")
    common = dict(criterion=criterion, criterion_kwargs=criterion_kwargs, device=device, dtype=dtype,
                  verbose=verbose)
    if distill_type == 'shd':
        return SHDDistillationTask.from_args(args, model, **common)
    teacher = _teacher_for(
        unwrap_model(model), getattr(args, 'kd_model_name', None),
        pretrained_path=getattr(args, 'kd_checkpoint', None) or None,
        model_kwargs=getattr(args, 'kd_model_kwargs', None), allow_download=getattr(args, 'kd_pretrained', False),
        device=device, dtype=dtype)
    weights = dict(distill_loss_weight=args.distill_loss_weight, task_loss_weight=args.task_loss_weight)
    if distill_type == 'logit':
        task = LogitDistillationTask(model, teacher, loss_type=getattr(args, 'kd_loss_type', 'kl'),
                                     temperature=args.kd_temperature, **weights, **common)
    elif distill_type == 'feature':
        task = FeatureDistillationTask(
            model, teacher, student_feature_dim=args.kd_student_feature_dim,
            teacher_feature_dim=args.kd_teacher_feature_dim, **weights, **common)
    else:
        task = TokenDistillationTask(model, teacher, distill_type=args.kd_token_distill_type,
                                     temperature=args.kd_temperature, **weights, **common)
    match_normalization(task, unwrap_model(model), getattr(args, 'mean', None), getattr(args, 'std', None))
    return task


def add_shd_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--kd-distill-type shd``, the local-teacher flags and the ``--shd-*`` flags to a timm ``train.py`` parser.

    Adds ``'shd'`` to the choices of an existing ``--kd-distill-type``. The ``--shd-*`` flags (dest ``shd_<option>``)
    are :meth:`SHDConfig.add_args <shd_plugins.SHDConfig.add_args>` in timm style, so their choices, defaults and
    help live with the options. Flags the parser already has are left alone.
    """
    distill_type = parser._option_string_actions.get('--kd-distill-type')
    if distill_type is not None and distill_type.choices is not None and 'shd' not in distill_type.choices:
        distill_type.choices = [*distill_type.choices, 'shd']

    group = parser.add_argument_group('Local distillation teacher parameters')

    def add(*flags: str, **kwargs: Any) -> None:
        if not any(f in parser._option_string_actions for f in flags):
            group.add_argument(*flags, **kwargs)

    add('--kd-model-kwargs', nargs='*', default={}, action=ParseKwargs,
        help='Extra create_model kwargs of the teacher, k=v (e.g. img_size=32 depth=4)')
    add('--kd-checkpoint', '--kd-pretrained-path', dest='kd_checkpoint', default=None, type=str, metavar='PATH',
        help='Local teacher weights (state_dict, .safetensors or timm train checkpoint; EMA weights preferred)')
    add('--kd-pretrained', action='store_true', default=False,
        help='Without --kd-checkpoint, download the teacher hub weights (needs internet)')
    SHDConfig.add_args(parser, style='timm')
    return parser
