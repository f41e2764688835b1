"""Embedded default data set (scikit-learn digits) as an ImageFolder.

The machines this project runs on have no internet, so the default data set must ship with an installed
package: scikit-learn bundles the 1797 8x8 "digits" images (values 0..16). Written as a
torchvision/timm ImageFolder (``root/{train,val}/<class>/<idx>.png``) they feed the same code paths as
ImageNet (``timm.data.create_dataset('', root=...)``, ``torchvision.datasets.ImageFolder``).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

__all__ = ['META_FILENAME', 'write_digits_imagefolder']

META_FILENAME = 'digits_meta.json'
_SPLITS = ('train', 'val')
_DIGITS_MAX_VALUE = 16.0
_RESAMPLE = 'bicubic'


def _stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices per class so every class keeps ``val_fraction`` in val.

    A per-class split (rather than a global shuffle) keeps the class balance identical in both splits, so
    top-1 on the tiny val split is not skewed by an unlucky draw.
    """
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def _digit_to_image(pixels: np.ndarray, image_size: int) -> Image.Image:
    """Convert one 8x8 digit (values 0..16) into a grayscale ``image_size`` PIL image.

    Bicubic upscaling gives smooth strokes, closer to natural images than nearest-neighbour blocks.
    """
    arr = np.clip(np.rint(pixels.reshape(8, 8) * (255.0 / _DIGITS_MAX_VALUE)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, mode='L')
    if image_size != 8:
        img = img.resize((image_size, image_size), resample=Image.Resampling.BICUBIC)
    return img


def _settings(image_size: int, val_fraction: float, seed: int) -> dict[str, Any]:
    return {
        'dataset': 'sklearn_digits',
        'image_size': int(image_size),
        'val_fraction': float(val_fraction),
        'seed': int(seed),
        'resample': _RESAMPLE,
        'mode': 'L',
    }


def _folder_is_complete(root: Path, meta: dict[str, Any]) -> bool:
    """Check every split/class folder holds the number of PNGs the meta file promises."""
    for split in _SPLITS:
        for cls, count in meta['class_counts'][split].items():
            cls_dir = root / split / cls
            if not cls_dir.is_dir() or sum(1 for _ in cls_dir.glob('*.png')) != count:
                return False
    return True


def write_digits_imagefolder(
    root: str | Path,
    *,
    image_size: int = 32,
    val_fraction: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Write scikit-learn's digits as an ImageFolder under ``root/train`` and ``root/val``.

    Images are grayscale ("L") PNGs, upscaled from 8x8 to ``image_size`` with bicubic resampling; the
    train/val split is stratified by class and fixed by ``seed``. A ``digits_meta.json`` records the
    settings and counts so a second call with the same settings is a no-op (cheap for tests and repeated
    demo runs).

    Args:
        root: Output directory (created if missing).
        image_size: Side of the square output images in pixels.
        val_fraction: Fraction of each class put in ``val``, in (0, 1).
        seed: Seed of the stratified split.
        overwrite: Delete and rewrite an existing folder written with different settings.
        progress: Show a tqdm bar while writing.

    Returns:
        The meta dict: settings plus ``counts`` (images per split) and ``class_counts`` (per split, class).

    Raises:
        ValueError: Bad arguments, or ``root`` holds a digits folder written with other settings and
            ``overwrite`` is False.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f'val_fraction must be in (0, 1), got {val_fraction}.')
    if image_size < 1:
        raise ValueError(f'image_size must be a positive number of pixels, got {image_size}.')
    root = Path(root)
    settings = _settings(image_size, val_fraction, seed)
    meta_path = root / META_FILENAME

    if meta_path.is_file():
        old_meta = json.loads(meta_path.read_text())
        old_settings = {k: old_meta.get(k) for k in settings}
        if old_settings == settings and _folder_is_complete(root, old_meta):
            return old_meta
        if old_settings != settings and not overwrite:
            raise ValueError(
                f'{root} already holds a digits ImageFolder written with {old_settings}, which differs from '
                f'the requested {settings}. Pass overwrite=True (--overwrite) to rewrite it, or pick another '
                'directory.'
            )
    elif root.exists() and any(root.iterdir()) and not overwrite:
        raise ValueError(
            f'{root} exists, is not empty and has no {META_FILENAME}: refusing to write digits into it. '
            'Pick an empty or new directory, or pass overwrite=True to replace its train/val folders.'
        )

    for split in _SPLITS:
        if (root / split).exists():
            shutil.rmtree(root / split)
    meta_path.unlink(missing_ok=True)

    from sklearn.datasets import load_digits  # local import: scikit-learn is slow to import

    digits = load_digits()
    images, labels = np.asarray(digits.data), np.asarray(digits.target)
    split_indices = dict(zip(_SPLITS, _stratified_split(labels, val_fraction, seed)))

    class_names = [str(c) for c in range(10)]
    class_counts: dict[str, dict[str, int]] = {}
    for split, indices in split_indices.items():
        for cls in class_names:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
        for idx in tqdm(indices, desc=f'digits {split}', disable=not progress):
            _digit_to_image(images[idx], image_size).save(root / split / str(labels[idx]) / f'{idx}.png')
        class_counts[split] = {cls: int((labels[indices] == int(cls)).sum()) for cls in class_names}

    meta = {
        **settings,
        'counts': {split: int(len(indices)) for split, indices in split_indices.items()},
        'class_counts': class_counts,
        'classes': class_names,
    }
    # Meta last: its presence marks a complete folder.
    meta_path.write_text(json.dumps(meta, indent=2) + '\n')
    return meta
