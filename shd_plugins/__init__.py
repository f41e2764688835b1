"""Squeezing-Heads Distillation (SHD) for timm Vision Transformers and diffusers DiTs."""
from .capture import AttentionCapture, CapturedAttention, find_attention_layers
from .distiller import SHDDistiller, SHDOutput
from .heads import GROUPING_MODES, head_groups, merge_schedule
from .layer_mapping import resolve_layer_pairs
from .losses import (
    LOSS_TYPES, attention_map_loss, logit_kd_loss, output_mse_loss, resolve_loss_weights, shd_loss,
)
from .merge import MERGE_MODES, merge_heads

__version__ = '0.1.0'

__all__ = [
    'AttentionCapture', 'CapturedAttention', 'find_attention_layers', 'SHDDistiller', 'SHDOutput', 'GROUPING_MODES',
    'head_groups', 'merge_schedule', 'resolve_layer_pairs', 'LOSS_TYPES', 'attention_map_loss', 'logit_kd_loss',
    'output_mse_loss', 'resolve_loss_weights', 'shd_loss', 'MERGE_MODES', 'merge_heads',
]
