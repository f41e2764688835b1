"""timm integration: the SHD ``TrainingTask`` and the helpers of a ``train.py``-style training loop.

- :mod:`.task`: :class:`SHDDistillationTask` (timm's logit distillation plus the SHD term), :func:`add_shd_args`
  (``--kd-distill-type shd`` and the ``--shd-*`` flags for a copy of timm's ``train.py``),
  :func:`create_distillation_teacher` (a teacher from a local checkpoint, never a silent download),
  :func:`create_distillation_task` (any of ``train.py``'s four ``--kd-distill-type`` tasks with that teacher).
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
    read_checkpoint_metadata,
    resolve_output_dir,
    restore_rng_state,
    resume_position,
    rng_state,
    truncate_summary,
)
from .data import ResumableSampler, build_train_loader, per_channel, resolve_val_dir
from .task import (
    KD_DISTILL_TYPES,
    SHDDistillationTask,
    add_shd_args,
    create_distillation_task,
    create_distillation_teacher,
    teacher_from_checkpoint,
)
from .training import (
    LOSS_KEYS,
    create_student,
    create_task,
    create_task_optimizer,
    reduce_sums,
    resolve_amp,
    resolve_lr,
    setup_training,
    train_one_epoch,
    validate,
)

__all__ = [
    'add_shd_args', 'build_train_loader', 'build_train_parsers', 'check_file', 'CHECKPOINT_EXT', 'checkpoint_step',
    'create_distillation_task', 'create_distillation_teacher', 'create_student', 'create_task', 'create_task_optimizer',
    'find_latest_checkpoint', 'KD_DISTILL_TYPES', 'LOSS_KEYS', 'parse_train_args', 'per_channel',
    'read_checkpoint_metadata', 'reduce_sums', 'resolve_amp', 'resolve_lr', 'resolve_output_dir', 'resolve_val_dir',
    'restore_rng_state', 'ResumableSampler', 'resume_position', 'ResumePosition', 'rng_state',
    'setup_training', 'SHDDistillationTask', 'teacher_from_checkpoint', 'train_one_epoch', 'TrainStateSaver',
    'truncate_summary', 'validate',
]
