"""Embedded default data set (scikit-learn digits) as an ImageFolder, and ImageFolder layout checks.

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

__all__ = [
    "META_FILENAME",
    "write_digits_imagefolder",
    "is_imagefolder",
    "check_imagefolder",
]

META_FILENAME = "digits_meta.json"
_SPLITS = ("train", "val")
_DIGITS_MAX_VALUE = 16.0
_RESAMPLE = "bicubic"
_EXPECTED_LAYOUT = "<dir>/<class_name>/<image files> (e.g. <dir>/0/12.png, <dir>/1/7.png)"


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
    img = Image.fromarray(arr, mode="L")
    if image_size != 8:
        img = img.resize((image_size, image_size), resample=Image.Resampling.BICUBIC)
    return img


def _settings(image_size: int, val_fraction: float, seed: int) -> dict[str, Any]:
    return {
        "dataset": "sklearn_digits",
        "image_size": int(image_size),
        "val_fraction": float(val_fraction),
        "seed": int(seed),
        "resample": _RESAMPLE,
        "mode": "L",
    }


def _folder_is_complete(root: Path, meta: dict[str, Any]) -> bool:
    """Check every split/class folder holds the number of PNGs the meta file promises."""
    for split in _SPLITS:
        for cls, count in meta["class_counts"][split].items():
            cls_dir = root / split / cls
            if not cls_dir.is_dir() or sum(1 for _ in cls_dir.glob("*.png")) != count:
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
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    if image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}.")
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
                f"{root} already holds a digits ImageFolder written with {old_settings}, which differs from "
                f"the requested {settings}. Pass overwrite=True (--overwrite) to rewrite it, or pick another "
                "directory."
            )
    elif root.exists() and any(root.iterdir()) and not overwrite:
        raise ValueError(
            f"{root} exists, is not empty and has no {META_FILENAME}: refusing to write digits into it. "
            "Pick an empty or new directory, or pass overwrite=True to replace its train/val folders."
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
        for idx in tqdm(indices, desc=f"digits {split}", disable=not progress):
            _digit_to_image(images[idx], image_size).save(root / split / str(labels[idx]) / f"{idx}.png")
        class_counts[split] = {cls: int((labels[indices] == int(cls)).sum()) for cls in class_names}

    meta = {
        **settings,
        "counts": {split: int(len(indices)) for split, indices in split_indices.items()},
        "class_counts": class_counts,
        "classes": class_names,
    }
    # Meta last: its presence marks a complete folder.
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _img_extensions() -> tuple[str, ...]:
    """Extensions timm's ImageFolder reader loads (``.png``, ``.jpg``, ``.jpeg`` unless extended).

    Narrower than torchvision's list: a folder of ``.bmp`` files would pass a torchvision check and then
    hold zero samples for ``timm.data.create_dataset``.
    """
    from timm.data.readers.img_extensions import get_img_extensions

    return tuple(get_img_extensions())


def _has_images(folder: Path, recursive: bool = False) -> bool:
    extensions = _img_extensions()
    files = folder.rglob("*") if recursive else folder.iterdir()
    return any(f.suffix.lower() in extensions and f.is_file() for f in files)


def _imagefolder_problem(path: Path) -> str | None:
    """Return why ``path`` is not an ImageFolder, or None when it is one."""
    if not path.exists():
        return "it does not exist"
    if not path.is_dir():
        return "it is not a directory"
    entries = sorted(path.iterdir())
    class_dirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    if not class_dirs:
        top_images = [p for p in entries if p.is_file() and p.suffix.lower() in _img_extensions()]
        if top_images:
            return (
                f"it holds {len(top_images)} image file(s) at the top level (e.g. {top_images[0].name}) but no "
                "class subfolders"
            )
        return "it has no class subfolders" + ("" if entries else " (it is empty)")
    nested = [p.name for p in class_dirs if not _has_images(p) and _has_images(p, recursive=True)]
    if nested and len(nested) == len(class_dirs):
        # Readers accept this (images anywhere below a class folder), but it is almost always a dataset root
        # passed where a split folder was meant: torchvision would make 'train'/'val' the two classes, timm
        # (leaf folder names) would silently merge the splits.
        return (
            f"its subfolders ({', '.join(nested[:5])}) hold no images directly, only in deeper folders; this looks "
            f"like a dataset root: pass one split folder instead, e.g. {path / nested[0]}"
        )
    empty = [p.name for p in class_dirs if not _has_images(p, recursive=True)]
    if empty:
        shown = ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else "")
        return f"{len(empty)} class folder(s) hold no image files: {shown}"
    return None


def is_imagefolder(path: str | Path) -> bool:
    """Tell whether ``path`` has the ImageFolder layout ``<dir>/<class_name>/<image files>``."""
    return _imagefolder_problem(Path(path)) is None


def check_imagefolder(path: str | Path) -> Path:
    """Raise a clear error unless ``path`` is an ImageFolder; return it as a Path.

    torchvision's and timm's readers fail late and vaguely (``Found no valid file``, or a silent single
    class) on a wrong directory; checking first names the directory and the expected layout.

    Class folders may nest images deeper (as readers allow), except when no class folder holds images
    directly: that is a dataset root (``<root>/train/<class>/...``) passed in place of a split folder.

    Raises:
        ValueError: ``path`` is missing, not a directory, empty, has images but no class subfolders, has
            class folders without images, or looks like a dataset root rather than a split.
    """
    path = Path(path)
    problem = _imagefolder_problem(path)
    if problem is not None:
        raise ValueError(
            f"{path} is not an ImageFolder: {problem}. Expected layout: {_EXPECTED_LAYOUT}, with image "
            f"extensions {', '.join(_img_extensions())}."
        )
    return path
