"""timm integration: the SHD ``TrainingTask`` and the helpers of a ``train.py``-style training loop.

- :mod:`.task`: :class:`SHDDistillationTask` (timm's logit distillation plus the SHD term), :func:`add_shd_args`
  (``--kd-distill-type shd`` and the ``--shd-*`` flags for a copy of timm's ``train.py``),
  :func:`create_distillation_teacher` (a teacher from a local checkpoint, never a silent download).
- :mod:`.args`: the command line of ``recipes/train_timm.py`` (timm's flag names, ``-c`` YAML defaults).
- :mod:`.data`: :class:`ResumableSampler`, :func:`build_train_loader`, :func:`per_channel`.
- :mod:`.checkpoint`: :class:`TrainStateSaver` (resumes at the exact step), ``--resume auto``, ``summary.csv``.
- :mod:`.training`: student/task creation, AMP, one epoch, validation, :func:`setup_training`.
"""
from .args import build_train_parsers, parse_train_args
from .checkpoint import (
    CHECKPOINT_EXT,
    ResumePosition,
    TrainStateSaver,
    check_file,
    checkpoint_step,
    find_latest_checkpoint,
    resolve_output_dir,
    resume_position,
    truncate_summary,
)
from .data import ResumableSampler, build_train_loader, per_channel, resolve_val_dir
from .task import KD_DISTILL_TYPES, SHDDistillationTask, add_shd_args, create_distillation_teacher
from .training import (
    LOSS_KEYS,
    create_student,
    create_task,
    reduce_sums,
    resolve_amp,
    resolve_lr,
    setup_training,
    train_one_epoch,
    validate,
)

__all__ = [
    'CHECKPOINT_EXT', 'KD_DISTILL_TYPES', 'LOSS_KEYS', 'ResumableSampler', 'ResumePosition', 'SHDDistillationTask',
    'TrainStateSaver', 'add_shd_args', 'build_train_loader', 'build_train_parsers', 'check_file', 'checkpoint_step',
    'create_distillation_teacher', 'create_student', 'create_task', 'find_latest_checkpoint', 'parse_train_args',
    'per_channel', 'reduce_sums', 'resolve_amp', 'resolve_lr', 'resolve_output_dir', 'resolve_val_dir',
    'resume_position', 'setup_training', 'train_one_epoch', 'truncate_summary', 'validate',
]
