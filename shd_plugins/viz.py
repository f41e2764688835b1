"""Figures for SHD reports: what the squeeze does (the paper's Figure 1) and where the merge weights land (Figure 3).

Drawn on :class:`matplotlib.figure.Figure` objects, never through ``pyplot``: no display, no global backend switch
(importing this module leaves a notebook's backend alone) and nothing kept in pyplot's figure registry.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from .capture import AttentionCapture, num_prefix_tokens
from .core.heads import head_groups
from .core.merge import merge_heads

__all__ = ['collect_squeeze', 'plot_squeeze', 'plot_alpha_distributions', 'save_figure']

_logger = logging.getLogger(__name__)


@torch.no_grad()
def collect_squeeze(
        teacher: torch.nn.Module,
        student: torch.nn.Module,
        inputs: Mapping[str, torch.Tensor],
        layer_pairs: Sequence[Sequence[int]],
        *,
        grouping: str = 'progressive',
        drop_prefix: bool = True,
) -> dict[str, object]:
    """Teacher maps, squeezed teacher maps, student maps and merge weights for the given layer pairs.

    Args:
        teacher, student: Models in eval mode.
        inputs: Keyword arguments of both models' forward (``{'x': images}`` for timm, DiT kwargs otherwise).
        layer_pairs: ``[(teacher_layer, student_layer), ...]``.
        drop_prefix: Drop cls/dist/register rows and columns (renormalised) so maps cover patches only.

    Returns:
        ``{'pairs': [...], 'teacher': [(B, M, T, T)], 'merged': [(B, N, T, T)], 'student': [(B, N, T, T)],
        'alphas': [(B, M - N)], 'groups': [[...]]}`` as CPU tensors, one entry per pair.
    """
    t_prefix = num_prefix_tokens(teacher) if drop_prefix else 0
    s_prefix = num_prefix_tokens(student) if drop_prefix else 0
    result = {'pairs': [tuple(p) for p in layer_pairs], 'teacher': [], 'merged': [], 'student': [], 'alphas': [],
              'groups': []}
    with AttentionCapture(teacher, [t for t, _ in layer_pairs], record_values=True) as t_cap, \
            AttentionCapture(student, [s for _, s in layer_pairs]) as s_cap:
        with t_cap.recording(), s_cap.recording():
            _forward(teacher, inputs)
            _forward(student, inputs)
        for t, s in layer_pairs:
            t_rec, s_rec = t_cap[t], s_cap[s]
            t_maps = t_rec.logits()[..., t_prefix:, t_prefix:].softmax(-1)
            s_maps = s_rec.logits()[..., s_prefix:, s_prefix:].softmax(-1)
            merged, alphas = merge_heads(t_maps, t_rec.v[:, :, t_prefix:], t_rec.out_weight, s_maps.shape[1],
                                         grouping=grouping)
            result['teacher'].append(t_maps.cpu())
            result['merged'].append(merged.cpu())
            result['student'].append(s_maps.cpu())
            result['alphas'].append(alphas.cpu())
            result['groups'].append(head_groups(t_maps.shape[1], s_maps.shape[1], grouping))
    return result


def _forward(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> None:
    if set(inputs) == {'x'}:
        model(inputs['x'])
    else:
        model(**inputs)


def plot_squeeze(
        teacher_maps: torch.Tensor,
        merged_maps: torch.Tensor,
        student_maps: torch.Tensor,
        groups: Sequence[Sequence[int]],
        path: Path,
        *,
        title: str = '',
        image: np.ndarray | None = None,
) -> Path:
    """The paper's Figure 1 for one sample and layer: teacher heads, squeezed maps, student maps.

    Args:
        teacher_maps: (M, T, T) for one sample; merged_maps, student_maps: (N, T, T).
        groups: Teacher heads per student head (labels the squeezed row).
        image: Optional input image shown at the start of the first row.
    """
    num_teacher, num_student = teacher_maps.shape[0], merged_maps.shape[0]
    cols = max(num_teacher, num_student) + (1 if image is not None else 0)
    fig = Figure(figsize=(1.6 * cols, 5.2))
    axes = fig.subplots(3, cols, squeeze=False)
    offset = 1 if image is not None else 0
    vmax = float(max(teacher_maps.max(), merged_maps.max(), student_maps.max()))
    rows = [(teacher_maps, 'teacher head {}'), (merged_maps, 'squeezed {}'), (student_maps, 'student head {}')]
    for r, (maps, label) in enumerate(rows):
        for c in range(cols):
            axes[r, c].axis('off')
        for h in range(maps.shape[0]):
            ax = axes[r, h + offset]
            ax.imshow(maps[h].numpy(), cmap='viridis', vmin=0, vmax=vmax)
            name = label.format(h) if r != 1 else f"squeezed {{{','.join(map(str, groups[h]))}}}"
            ax.set_title(name, fontsize=7)
    if image is not None:
        axes[0, 0].imshow(image, cmap='gray')
        axes[0, 0].set_title('input', fontsize=7)
    return save_figure(fig, path, title=title)


def plot_alpha_distributions(alphas: Mapping[str, np.ndarray], path: Path, *, title: str = '') -> Path:
    """The paper's Figure 3: the distribution of merge weights, one panel per distilled layer."""
    names = [n for n in alphas if np.asarray(alphas[n]).size]
    cols = min(4, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig = Figure(figsize=(3.0 * cols, 2.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis('off')
    for ax, name in zip(axes.flat, names):
        values = np.asarray(alphas[name]).ravel()
        ax.axis('on')
        ax.hist(values, bins=np.linspace(0, 1, 26), color='tab:blue', alpha=0.8)
        ax.axvline(0.5, color='gray', lw=0.8, ls='--')
        ax.set_title(f'{name}\nmean {values.mean():.3f}, std {values.std():.3f}', fontsize=8)
        ax.set_xlabel('alpha', fontsize=8)
        ax.tick_params(labelsize=7)
    return save_figure(fig, path, title=title)


def save_figure(fig: Figure, path: Path, *, title: str = '', dpi: int = 120) -> Path:
    """Title, tight layout, write (creating the folder): every report figure ends this way.

    Args:
        fig: A :class:`~matplotlib.figure.Figure` made directly (``Figure(figsize=...)``, then ``fig.subplots``),
            not by ``pyplot``, so nothing keeps it alive after this call.
        path: Output file; its suffix picks the format (png, pdf, svg).
    """
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path

