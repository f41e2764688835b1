"""Images in and out of the FID evaluator: uint8 NHWC arrays, ADM-style `.npz` files and image folders.

torch-fidelity takes datasets of uint8 CHW RGB tensors; generated samples live as uint8 NHWC arrays, saved as ADM's
evaluator reads them (`arr_0` of an `.npz`), and references are often folders of PNGs. Every reader here fails with
a message naming the file and the fix, before any feature is extracted.
"""
from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torch_fidelity.datasets import ImagesPathDataset
from tqdm.auto import tqdm

from ..imagefolder import find_image_files, image_extensions

__all__ = [
    'ImageArrayDataset',
    'as_image_dataset',
    'check_uint8_nhwc',
    'folder_dataset',
    'folder_image_size',
    'image_size',
    'images_from_npz',
    'load_images',
    'npz_member_header',
    'read_npz',
    'save_image_grid',
    'save_npz',
]


def check_uint8_nhwc(images: np.ndarray, what: str = 'images') -> np.ndarray:
    """`images` as a uint8 NHWC array with 1 or 3 channels (NHW grayscale gains a channel axis).

    Raises:
        ValueError: Another dtype or shape (the message says how to convert).
    """
    images = np.asarray(images)
    if images.ndim == 3:  # NHW grayscale
        images = images[..., None]
    if images.dtype != np.uint8:
        raise ValueError(f'{what} must be uint8 (0..255), got {images.dtype}; convert with (x * 255).round().')
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f'{what} must be NHWC with 1 or 3 channels, got shape {images.shape}.')
    return images


def save_npz(images: np.ndarray, path: str | Path) -> Path:
    """Saves uint8 NHWC images as ADM's evaluator reads them (`arr_0`)."""
    images = check_uint8_nhwc(images)
    path = Path(path)
    if path.suffix != '.npz':
        raise ValueError(f'Sample batches are .npz files; got {path}.')
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, arr_0=images)
    return path


def save_image_grid(images: np.ndarray, path: str | Path, max_images: int = 64) -> Path:
    """Tiles the first `max_images` uint8 NHWC images in a square-ish grid and saves it as an image file."""
    images = check_uint8_nhwc(images)[:max_images]
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, image in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * h : (r + 1) * h, q * w : (q + 1) * w] = image
    path = Path(path)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)
    return path


def read_npz(path: Path) -> np.lib.npyio.NpzFile:
    """Lazily opened npz members; unreadable files raise a ValueError naming the file."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f'Could not read {path} as an .npz file ({e}).') from e


def images_from_npz(npz: np.lib.npyio.NpzFile, path: Path) -> np.ndarray:
    """The `arr_0` images of an opened `.npz`, checked."""
    if 'arr_0' not in npz.files:
        raise ValueError(f'{path} has no `arr_0` image array (keys: {npz.files}); ADM sample batches store it there.')
    return check_uint8_nhwc(npz['arr_0'], f'{path}:arr_0')


def _image_files_or_raise(folder: Path) -> list[Path]:
    files = find_image_files(folder)
    if not files:
        raise ValueError(f"No images ({', '.join(image_extensions())}) found under {folder}.")
    return files


def _check_one_size(sizes: set[tuple[int, ...]], folder: Path) -> None:
    if len(sizes) > 1:
        raise ValueError(f'Images under {folder} differ in size ({sorted(sizes)[:3]}...); resize them to one size.')


def folder_image_size(folder: Path) -> tuple[list[Path], tuple[int, int]]:
    """The image files under `folder` and their one `(height, width)`, from the headers (no pixel decoded)."""
    files = _image_files_or_raise(folder)
    sizes = set()
    for f in files:
        with Image.open(f) as im:
            sizes.add(im.size)
    _check_one_size(sizes, folder)
    width, height = sizes.pop()
    return files, (height, width)


def npz_member_header(path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one `.npz` member from its header: a 2 GB reference batch is not read to check it."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open(f'{key}.npy') as f:
            version = np.lib.format.read_magic(f)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = reader(f)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f'Could not read the header of `{key}` in {path} ({e}).') from e
    return tuple(shape), np.dtype(dtype)


def image_size(dataset: Dataset) -> tuple[int, int]:
    """`(height, width)` of a dataset's first uint8 CHW image (the datasets here hold one size)."""
    return tuple(dataset[0].shape[-2:])


def load_images(path: str | Path) -> np.ndarray:
    """Loads an image folder (recursive) or an `.npz` (`arr_0`) as uint8 NHWC (folders come back as RGB)."""
    path = Path(path)
    if path.is_dir():
        files = _image_files_or_raise(path)
        images = [np.asarray(Image.open(f).convert('RGB')) for f in tqdm(files, desc='Reading images', leave=False)]
        _check_one_size({im.shape for im in images}, path)
        return np.stack(images)
    if path.suffix == '.npz' and path.is_file():
        return images_from_npz(read_npz(path), path)
    if not path.exists():
        raise FileNotFoundError(f'{path} does not exist; expected an image folder or an .npz with `arr_0`.')
    raise ValueError(f'{path} is neither an image folder nor an .npz file.')


class ImageArrayDataset(Dataset):
    """uint8 NHWC images as the uint8 CHW RGB tensors torch-fidelity takes as `input1`/`input2`.

    Grayscale is repeated to three channels: Inception requires RGB, and an RGB image with equal channels is read
    back exactly by 1-channel extractors.
    """

    def __init__(self, images: np.ndarray):
        self.images = check_uint8_nhwc(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = torch.from_numpy(np.ascontiguousarray(self.images[index])).permute(2, 0, 1)
        return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image


def folder_dataset(folder: Path) -> Dataset:
    """Lazily read image folder (torch-fidelity's own reader); sizes are checked from headers up front."""
    files, _ = folder_image_size(folder)
    return ImagesPathDataset([str(f) for f in files])


def as_image_dataset(images: Any, what: str = 'image') -> Dataset:
    """A non-empty dataset of uint8 CHW images from an array, an image folder, an `.npz` or a Dataset.

    Args:
        what: Names the set in the error message (`sample`, `reference`).
    """
    if isinstance(images, Dataset):
        dataset = images
    elif isinstance(images, np.ndarray):
        dataset = ImageArrayDataset(images)
    else:
        path = Path(images)
        dataset = folder_dataset(path) if path.is_dir() else ImageArrayDataset(load_images(path))
    if len(dataset) == 0:
        raise ValueError(f'The {what} set is empty.')
    return dataset
