"""Figures of EVIDENCE.md: the paired differences of every comparison, one point per seed.

One figure per model and token scale, one panel per student head count. Differences are drawn as improvements
(positive = the first variant of the comparison is better: higher top-1, lower FID), so every panel reads the
same way; the bar is the mean with its seed standard deviation, the points are the seeds.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..viz import save_figure

__all__ = ['paired_difference_figure']


def paired_difference_figure(comparisons: Sequence[Mapping], path: Path, *, title: str, unit: str,
                             higher_is_better: bool, labels: Mapping[str, str]) -> Path | None:
    """Draw the comparisons of one model and scale (their ``heads`` pick the panel); None when there are none.

    Args:
        comparisons: Entries of ``results.json``'s ``comparisons`` (``heads``, ``variant``, ``baseline``,
            ``differences``, ``mean``, ``std``, ``p_t``); entries without differences are skipped.
        path: Output PNG.
        title: Figure title.
        unit: The metric's unit in words, for the y label.
        higher_is_better: Direction of the metric (FID differences are negated to read as improvements).
        labels: Short display name of each variant.
    """
    comparisons = [c for c in comparisons if c.get('differences')]
    if not comparisons:
        return None
    heads = sorted({c['heads'] for c in comparisons})
    names = list(dict.fromkeys(f"{labels[c['variant']]}\nvs {labels[c['baseline']]}" for c in comparisons))
    fig = Figure(figsize=(max(6.0, 0.85 * len(names) + 1.5), 3.0 * len(heads)))
    axes = fig.subplots(len(heads), 1, squeeze=False)[:, 0]
    sign = 1.0 if higher_is_better else -1.0
    rng = np.random.default_rng(0)
    for ax, h in zip(axes, heads):
        for c in (c for c in comparisons if c['heads'] == h):
            x = names.index(f"{labels[c['variant']]}\nvs {labels[c['baseline']]}")
            diffs = sign * np.asarray(c['differences'], dtype=float)
            significant = c.get('p_t') is not None and c['p_t'] < 0.05
            color = ('tab:green' if diffs.mean() > 0 else 'tab:red') if significant else 'tab:gray'
            ax.bar(x, diffs.mean(), width=0.6, color=color, alpha=0.35)
            ax.errorbar(x, diffs.mean(), yerr=c['std'], color='black', capsize=3, lw=1)
            ax.scatter(x + rng.uniform(-0.15, 0.15, diffs.size), diffs, s=12, color='black', zorder=3)
        ax.axhline(0.0, color='black', lw=0.8)
        ax.set_xlim(-0.6, max(len(names), 3) - 0.4)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, fontsize=6.5)
        ax.set_ylabel(f'{h} heads: improvement\n({unit})', fontsize=8)
        ax.tick_params(axis='y', labelsize=7)
    axes[0].set_title('bars: mean over seeds (green/red: paired t-test p < 0.05, gray: not significant)\n'
                      'whiskers: seed std; points: seeds', fontsize=7)
    return save_figure(fig, path, title=title, dpi=110)
