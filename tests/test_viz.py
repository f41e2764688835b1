"""The report figures: squeezed maps of real (tiny) timm ViTs and diffusers DiTs, and the files they are drawn to."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import dit_inputs, tiny_dit, tiny_vit

from shd_plugins.core.heads import head_groups
from shd_plugins.viz import collect_squeeze, plot_alpha_distributions, plot_squeeze

TEACHER_HEADS, STUDENT_HEADS = 8, 2


def _models_and_inputs(kind: str) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, torch.Tensor], int]:
    """Teacher (8 heads), student (2 heads), forward kwargs and the number of patch tokens."""
    if kind == 'vit':
        teacher = tiny_vit(num_heads=TEACHER_HEADS, embed_dim=64, seed=0)
        student = tiny_vit(num_heads=STUDENT_HEADS, seed=1)
        return teacher.eval(), student.eval(), {'x': torch.randn(3, 3, 32, 32)}, 16  # 32 / 8 = 4x4 patches
    teacher = tiny_dit(num_heads=TEACHER_HEADS, seed=0)
    student = tiny_dit(num_heads=STUDENT_HEADS, seed=1)
    return teacher.eval(), student.eval(), dit_inputs(batch=3), 16  # 8 / 2 = 4x4 patches


@pytest.mark.parametrize('kind', ['vit', 'dit'])
def test_collect_squeeze_gives_row_stochastic_maps_inside_their_groups(kind: str) -> None:
    teacher, student, inputs, tokens = _models_and_inputs(kind)
    pairs = [(0, 0), (1, 1)]
    squeeze = collect_squeeze(teacher, student, inputs, pairs)

    assert squeeze['pairs'] == pairs
    groups = head_groups(TEACHER_HEADS, STUDENT_HEADS, 'progressive')
    for i in range(len(pairs)):
        t_maps, merged, s_maps = squeeze['teacher'][i], squeeze['merged'][i], squeeze['student'][i]
        assert t_maps.shape == (3, TEACHER_HEADS, tokens, tokens)
        assert merged.shape == s_maps.shape == (3, STUDENT_HEADS, tokens, tokens)
        assert squeeze['alphas'][i].shape == (3, TEACHER_HEADS - STUDENT_HEADS)
        assert ((squeeze['alphas'][i] >= 0) & (squeeze['alphas'][i] <= 1)).all()
        for maps in (t_maps, merged, s_maps):  # prefix tokens dropped and rows renormalised
            torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:-1]))
        assert squeeze['groups'][i] == groups
        # Pairwise merges with weights in [0, 1] are convex combinations: every squeezed map lies, entry by entry,
        # between the smallest and largest map of the teacher heads it merges.
        for j, group in enumerate(groups):
            members = t_maps[:, list(group)]
            assert (merged[:, j] >= members.min(1).values - 1e-6).all()
            assert (merged[:, j] <= members.max(1).values + 1e-6).all()
    for model in (teacher, student):  # the capture leaves no hook behind
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_collect_squeeze_keeps_prefix_tokens_when_asked() -> None:
    teacher, student, inputs, tokens = _models_and_inputs('vit')
    squeeze = collect_squeeze(teacher, student, inputs, [(1, 1)], drop_prefix=False)
    assert squeeze['teacher'][0].shape[-1] == squeeze['merged'][0].shape[-1] == tokens + 1  # + the class token


def test_figures_are_written(tmp_path: Path) -> None:
    teacher, student, inputs, _ = _models_and_inputs('vit')
    squeeze = collect_squeeze(teacher, student, inputs, [(1, 1)])
    squeeze_png = plot_squeeze(squeeze['teacher'][0][0], squeeze['merged'][0][0], squeeze['student'][0][0],
                               squeeze['groups'][0], tmp_path / 'figures' / 'squeeze.png', title='layer 1',
                               image=inputs['x'][0, 0].numpy())
    alpha_png = plot_alpha_distributions({'layer 1': squeeze['alphas'][0].numpy(), 'empty': np.array([])},
                                         tmp_path / 'alphas.png', title='alphas')
    assert squeeze_png == tmp_path / 'figures' / 'squeeze.png'
    for path in (squeeze_png, alpha_png):
        with Image.open(path) as image:
            assert image.format == 'PNG' and min(image.size) > 100


def test_viz_leaves_pyplot_alone(tmp_path: Path) -> None:
    """Drawing goes through ``matplotlib.figure.Figure``: no pyplot, so no global backend switch for the caller."""
    code = ('import sys, numpy as np; from pathlib import Path; from shd_plugins.viz import plot_alpha_distributions; '
            f"plot_alpha_distributions({{'a': np.random.rand(50)}}, Path({str(tmp_path / 'a.png')!r})); "
            "print('matplotlib.pyplot' in sys.modules)")
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == 'False'
    assert (tmp_path / 'a.png').is_file()
