"""One object for the SHD options: defaults, validation, and the command-line flags of timm and diffusers scripts.

Every entry point (:class:`~shd_plugins.SHDDistiller`, the timm task, the diffusers objective, the recipes) takes an
:class:`SHDConfig`, so an option is declared, defaulted, documented and validated in exactly one place, as
torch-fidelity keeps one dict of defaults that every metric reads.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .core.heads import GROUPING_MODES
from .core.layer_mapping import LayerSpec, parse_layer_spec
from .core.losses import LOSS_TYPES
from .core.merge import MERGE_MODES

__all__ = ['TOKEN_MODES', 'FLAG_STYLES', 'SHDConfig']

TOKEN_MODES = ('all', 'patch', 'image')
FLAG_STYLES = ('timm', 'diffusers')

# The command-line help of each option; the defaults come from the dataclass fields.
_HELP = {
    'weight': 'Weight lambda_SHD of the SHD loss; 0 disables it',
    'temperature': 'Temperature tau of the softened attention maps',
    'layers': "Layer pairs: 'uniform', 'last:K' or teacher:student pairs such as '11:5,5:2'",
    'merge': "Head merge: 'shd' (closed form), 'mean' or 'select' (the paper's ablations)",
    'loss': 'Attention map loss',
    'grouping': 'Merge rounds: progressive adjacent pairs, or balanced contiguous groups',
    'tokens': "'all' tokens (the joint text + image map of SD3/Flux), or 'patch'/'image' to keep the image tokens "
              "only (drop cls/dist/register tokens and joint attention's text tokens)",
    'per_row': 'One merge weight per query row instead of one per map',
    'check_finite': 'Check the recorded q/k/v for NaN/inf at every step, not only the first (syncs the device)',
}


@dataclass(frozen=True)
class SHDConfig:
    """The options of Squeezing-Heads Distillation.

    Args:
        weight: lambda_SHD multiplying the mean SHD loss over the distilled layer pairs (>= 0).
        temperature: tau > 0 of the softened maps ``softmax(S / tau)``; the KL is scaled by tau^2.
        layers: ``'uniform'``, ``'last:K'``, ``'t:s,...'`` or a sequence of ``(teacher, student)`` pairs
            (see :func:`shd_plugins.core.layer_mapping.resolve_layer_pairs`).
        merge: ``'shd'`` (closed-form weights), ``'mean'`` (a = 0.5) or ``'select'`` (first head of each pair).
        loss: ``'kl'`` or ``'mse'``.
        grouping: ``'progressive'`` (rounds of adjacent pairs) or ``'balanced'`` (contiguous near-equal groups).
        tokens: ``'all'`` (the maps must cover the same tokens; for joint attention the whole text + image map) or
            ``'patch'``, alias ``'image'``: keep the image tokens only, rows renormalised (drop each model's
            prefix tokens: cls/dist/registers, so e.g. a distilled DeiT can teach a ViT; and the text tokens of
            joint attention, the image x image block). Two names for one option: ViT users say patch, diffusion
            users say image.
        per_row: One merge weight per query row.
        check_finite: Check the recorded tensors for NaN/inf at every step (a device sync per step); the first step
            is always checked.

    Raises:
        ValueError: An option outside its choices or range; the message names the option and the fix.
    """

    weight: float = 1.0
    temperature: float = 1.0
    layers: LayerSpec = 'uniform'
    merge: str = 'shd'
    loss: str = 'kl'
    grouping: str = 'progressive'
    tokens: str = 'all'
    per_row: bool = False
    check_finite: bool = False

    def __post_init__(self):
        for name, choices in (('merge', MERGE_MODES), ('loss', LOSS_TYPES), ('grouping', GROUPING_MODES),
                              ('tokens', TOKEN_MODES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"Unknown {name} '{getattr(self, name)}'; choose one of {choices}.")
        if not (isinstance(self.temperature, (int, float)) and 0 < self.temperature < math.inf):
            raise ValueError(f'temperature must be > 0 and finite, got {self.temperature!r}.')
        if not (isinstance(self.weight, (int, float)) and 0 <= self.weight < math.inf):
            raise ValueError(f'weight must be >= 0 and finite (0 disables SHD), got {self.weight!r}.')
        parse_layer_spec(self.layers)  # syntax now; ranges once the models' layer counts are known
        if not isinstance(self.layers, str):  # a hashable, immutable copy of explicit pairs
            object.__setattr__(self, 'layers', tuple(tuple(int(v) for v in pair) for pair in self.layers))

    @property
    def enabled(self) -> bool:
        """False when ``weight`` is 0: callers skip the capture entirely."""
        return self.weight > 0

    def replace(self, **changes: Any) -> SHDConfig:
        """A copy with some options changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_args(cls, args: argparse.Namespace | dict[str, Any], prefix: str = 'shd_') -> SHDConfig:
        """Build from parsed flags (``args.shd_weight``, ...) added by :meth:`add_args`; absent ones keep defaults."""
        values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
        return cls(**{name: values[prefix + name] for name in cls.option_names() if prefix + name in values})

    @classmethod
    def add_args(
            cls,
            parser: argparse.ArgumentParser,
            style: str = 'timm',
            *,
            title: str = 'SHD attention distillation parameters',
            defaults: SHDConfig | None = None,
    ) -> argparse._ArgumentGroup:
        """Add one ``--shd-*`` (timm style) or ``--shd_*`` (diffusers style) flag per option.

        The destination is always ``shd_<option>``, so :meth:`from_args` reads either style. Flags the parser
        already has are left alone (a copy of timm's ``train.py`` may declare some itself).

        Args:
            parser: The script's parser.
            style: ``'timm'`` (dashes, as timm's ``train.py``) or ``'diffusers'`` (underscores, as diffusers'
                example scripts).
            title: Title of the argument group.
            defaults: Defaults other than the dataclass's (e.g. a recipe's own).
        """
        if style not in FLAG_STYLES:
            raise ValueError(f"Unknown flag style '{style}'; choose one of {FLAG_STYLES}.")
        defaults = defaults or cls()
        group = parser.add_argument_group(title)
        choices = {'merge': MERGE_MODES, 'loss': LOSS_TYPES, 'grouping': GROUPING_MODES, 'tokens': TOKEN_MODES}
        for f in dataclasses.fields(cls):
            flag = '--shd' + ('-' + f.name.replace('_', '-') if style == 'timm' else '_' + f.name)
            if flag in parser._option_string_actions:
                continue
            default = getattr(defaults, f.name)
            help_text = f'{_HELP[f.name]} (default: {default})'
            if f.type in (bool, 'bool'):
                group.add_argument(flag, dest=f'shd_{f.name}', action='store_true', default=default, help=help_text)
            else:
                kind = {'weight': float, 'temperature': float}.get(f.name, str)
                if f.name == 'layers' and not isinstance(default, str):
                    default = ','.join(f'{t}:{s}' for t, s in default)
                group.add_argument(flag, dest=f'shd_{f.name}', type=kind, default=default,
                                   choices=choices.get(f.name), help=help_text)
        return group
