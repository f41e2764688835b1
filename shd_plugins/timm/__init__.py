"""timm integration: the SHD ``TrainingTask`` and the helpers of a ``train.py``-style training loop."""
from .task import KD_DISTILL_TYPES, SHDDistillationTask, add_shd_args, create_distillation_teacher

__all__ = ['KD_DISTILL_TYPES', 'SHDDistillationTask', 'add_shd_args', 'create_distillation_teacher']
