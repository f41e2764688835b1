"""The figures of the digits demo's report, drawn from the trained runs with :mod:`shd_plugins.viz`.

The paper's Figure 1 (teacher heads, squeezed maps, student maps) for the ViT and the DiT, its Figure 3 (where the
closed-form merge weights land) for the ViT students, and one grid of samples of every DiT.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from ..core.layer_mapping import resolve_layer_pairs
from ..diffusers import load_dit_components
from ..evaluation.top1 import build_eval_loader, create_eval_model
from ..viz import collect_squeeze, plot_alpha_distributions, plot_squeeze, save_figure
from .jobs import VARIANT_LABELS, VIT_NAME, VIT_STUDENT_KWARGS, VIT_TEACHER_KWARGS

__all__ = ['load_vit', 'squeeze_figures', 'dit_squeeze_figure', 'sample_grid_figure']

_logger = logging.getLogger(__name__)


def load_vit(run_dir: Path, model_kwargs: dict[str, int]) -> torch.nn.Module:
    """The best checkpoint of a demo ViT run (the recipe's ``model_best.pth.tar``), in eval mode."""
    return create_eval_model(VIT_NAME, checkpoint=run_dir / 'model_best.pth.tar', num_classes=10, in_chans=1,
                             img_size=32, model_kwargs=model_kwargs).eval()


def squeeze_figures(out: Path, figures: Path, heads: int, seed: int) -> dict[str, object]:
    """Figure 1 (one sample's teacher heads, squeezed maps, student maps) and Figure 3 (alpha distributions).

    Returns:
        ``{'alphas': {layer: (B, M - N) merge weights}, 'squeeze_figure': path, 'alpha_figure': path}``; a
        figure's key is missing when no KD + SHD student of ``seed`` was trained.
    """
    teacher = load_vit(out / 'vit' / 'teacher', VIT_TEACHER_KWARGS)
    loader = build_eval_loader(out / 'data', teacher, split='val', batch_size=512, workers=0, in_chans=1)
    images, labels = next(iter(loader))
    alphas: dict[str, np.ndarray] = {}
    result: dict[str, object] = {'alphas': alphas}
    for h in sorted({heads, *VIT_STUDENT_KWARGS}):
        run = out / 'vit' / f'h{h}_kd_shd_s{seed}'
        if not (run / 'model_best.pth.tar').is_file():
            continue
        student = load_vit(run, VIT_STUDENT_KWARGS[h])
        pairs = resolve_layer_pairs('uniform', VIT_TEACHER_KWARGS['depth'], VIT_STUDENT_KWARGS[h]['depth'])
        squeeze = collect_squeeze(teacher, student, {'x': images}, pairs)
        for (t, s), layer_alphas in zip(squeeze['pairs'], squeeze['alphas']):
            alphas[f'ViT 8->{h} heads, teacher layer {t} -> student layer {s}'] = layer_alphas.numpy()
        if h == heads:
            t, s = squeeze['pairs'][-1]
            path = plot_squeeze(squeeze['teacher'][-1][0], squeeze['merged'][-1][0], squeeze['student'][-1][0],
                                squeeze['groups'][-1], figures / 'vit_squeeze.png', image=images[0, 0].numpy(),
                                title=f'ViT on digits (label {int(labels[0])}): teacher layer {t} (8 heads) -> '
                                      f'student layer {s} ({h} heads), KD + SHD student, patch tokens only')
            result['squeeze_figure'] = str(path)
    if alphas:
        result['alpha_figure'] = str(plot_alpha_distributions(
            alphas, figures / 'alpha_distributions.png',
            title=f'Closed-form merge weights over the {len(images)} validation images (0.5 = mean-merge)'))
    else:
        _logger.warning('no KD + SHD ViT student of seed %d in %s: no squeeze or alpha figure', seed, out / 'vit')
    return result


def dit_squeeze_figure(out: Path, figures: Path, heads: int) -> str | None:
    """Figure 1 for the DiT: maps of one noisy digit at t = 500; None when the KD + SHD student is missing."""
    run = out / 'dit' / f'h{heads}_kd_shd'
    if not (run / 'transformer').is_dir():
        return None
    teacher = load_dit_components(out / 'dit' / 'teacher').transformer.eval()
    student = load_dit_components(run).transformer.eval()
    gen = torch.Generator().manual_seed(0)
    size = teacher.config.sample_size
    inputs = {'hidden_states': torch.randn(1, 1, size, size, generator=gen), 'timestep': torch.tensor([500]),
              'class_labels': torch.tensor([3])}
    pairs = resolve_layer_pairs('uniform', len(teacher.transformer_blocks), len(student.transformer_blocks))
    squeeze = collect_squeeze(teacher, student, inputs, pairs[-1:])
    t, s = squeeze['pairs'][0]
    return str(plot_squeeze(squeeze['teacher'][0][0], squeeze['merged'][0][0], squeeze['student'][0][0],
                            squeeze['groups'][0], figures / 'dit_squeeze.png',
                            title=f'DiT on digits (class 3, t = 500): teacher layer {t} (8 heads) -> student layer '
                                  f'{s} ({heads} heads), KD + SHD student'))


def sample_grid_figure(records: list[dict], figures: Path, per_class: int = 2, num_classes: int = 10) -> str | None:
    """Samples of every DiT, one row per model and ``per_class`` samples of each class, enlarged (nearest).

    Reads each FID run's ``samples.npz``, where sample ``i`` has class ``i % num_classes`` (``eval/fid.py``'s
    "even" labels). None when no DiT has samples.
    """
    runs = [r for r in records if r['kind'] == 'dit' and Path(r.get('samples_npz', '')).is_file()]
    if not runs:
        return None
    fig = Figure(figsize=(0.5 * num_classes * per_class + 2.2, 0.62 * len(runs) + 0.4))
    axes = fig.subplots(len(runs), 1, squeeze=False)
    for ax, r in zip(axes[:, 0], runs):
        samples = np.load(r['samples_npz'])['arr_0']
        tiles = [samples[c + k * num_classes, ..., 0] for c in range(num_classes) for k in range(per_class)]
        ax.imshow(np.concatenate(tiles, axis=1), cmap='gray', interpolation='nearest', vmin=0, vmax=255)
        ax.set_xticks([])
        ax.set_yticks([])
        label = 'teacher (8 heads)' if r['role'] == 'teacher' else f"{r['heads']} heads: {VARIANT_LABELS[r['variant']]}"
        ax.set_ylabel(f"{label}\nFID {r['fid']:.2f}", rotation=0, ha='right', va='center', fontsize=7)
    axes[0, 0].set_title(f'{per_class} samples per class, classes 0-9 left to right', fontsize=8)
    return str(save_figure(fig, figures / 'dit_samples.png', dpi=110))
