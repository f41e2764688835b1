"""Squeezing-Heads Distillation (SHD) for timm Vision Transformers and diffusers DiTs.

``import shd_plugins`` needs torch only. The framework integrations are subpackages imported on demand:
``shd_plugins.timm`` (the ``TrainingTask``), ``shd_plugins.diffusers`` (the DiT objective, model folders, sampler),
``shd_plugins.evaluation`` (FID, top-1), ``shd_plugins.viz`` (figures) and ``shd_plugins.demo`` (the digits demo).
"""
from .capture import (
    AttentionAdapter,
    AttentionCapture,
    CapturedAttention,
    find_attention_layers,
    register_attention_adapter,
)
from .config import SHDConfig
from .core import (
    GROUPING_MODES,
    LOSS_TYPES,
    MERGE_MODES,
    RowProjections,
    attention_map_loss,
    head_groups,
    logit_kd_loss,
    merge_heads,
    merge_schedule,
    output_mse_loss,
    resolve_layer_pairs,
    resolve_loss_weights,
    shd_loss,
    streamed_shd_loss,
)
from .distiller import SHDDistiller, SHDOutput

__version__ = '0.2.0'

__all__ = [
    'GROUPING_MODES', 'LOSS_TYPES', 'MERGE_MODES', 'AttentionAdapter', 'AttentionCapture', 'CapturedAttention',
    'RowProjections', 'SHDConfig', 'SHDDistiller', 'SHDOutput', 'attention_map_loss', 'find_attention_layers',
    'head_groups', 'logit_kd_loss', 'merge_heads', 'merge_schedule', 'output_mse_loss', 'register_attention_adapter',
    'resolve_layer_pairs', 'resolve_loss_weights', 'shd_loss', 'streamed_shd_loss',
]
