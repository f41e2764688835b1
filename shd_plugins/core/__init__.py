"""The SHD math, torch only: head grouping, the closed-form merge, the losses, layer mapping, precision."""
from .heads import GROUPING_MODES, head_groups, merge_schedule, num_merges
from .layer_mapping import LayerSpec, parse_layer_spec, resolve_layer_pairs
from .losses import (
    LOSS_TYPES,
    attention_map_loss,
    logit_kd_loss,
    output_mse_loss,
    resolve_loss_weights,
    shd_loss,
)
from .merge import MERGE_MODES, merge_heads, pair_alpha
from .precision import autocast_disabled, without_autocast
from .projections import RowProjections
from .streamed import streamed_shd_loss

__all__ = [
    'GROUPING_MODES', 'LOSS_TYPES', 'MERGE_MODES', 'LayerSpec', 'RowProjections', 'attention_map_loss',
    'autocast_disabled', 'head_groups', 'logit_kd_loss', 'merge_heads', 'merge_schedule', 'num_merges',
    'output_mse_loss', 'pair_alpha', 'parse_layer_spec', 'resolve_layer_pairs', 'resolve_loss_weights', 'shd_loss',
    'streamed_shd_loss', 'without_autocast',
]
