"""Shared pytest fixtures: the embedded digits ImageFolder and deterministic seeding."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shd_plugins.demo.data import write_digits_imagefolder

DIGITS_IMAGE_SIZE = 32


@pytest.fixture(scope='session')
def digits_imagefolder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of the digits ImageFolder (``root/train``, ``root/val``; 32x32 grayscale PNGs), written once."""
    root = tmp_path_factory.mktemp('digits')
    write_digits_imagefolder(root, image_size=DIGITS_IMAGE_SIZE)
    return root


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Seed python/numpy/torch before every test so random model inits and data draws are reproducible.

    Only the default generators are reseeded: no global flags (deterministic algorithms, threads) change.
    """
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def run_quick(script: str, output: Path) -> subprocess.CompletedProcess:
    """Run ``recipes/<script> --quick --output <output>`` (the demo, the evidence) and check it succeeded."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    result = subprocess.run([sys.executable, str(root / 'recipes' / script), '--quick', '--output', str(output)],
                            cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result
