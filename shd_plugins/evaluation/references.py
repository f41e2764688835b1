"""Reference sets of the FID evaluator: images and/or precomputed FID statistics, and how to write the latter.

ADM's reference batches (`VIRTUAL_imagenet256_labeled.npz`) hold both `arr_0` images and Inception `mu`/`sigma`;
FID is then taken against the statistics, as ADM's evaluator does, and the images serve KID and precision/recall.
`check_reference` reads no pixels, so a sampling job can fail in seconds on a mistyped reference, not after hours.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset
from torch_fidelity.defaults import DEFAULTS

from .extractors import INCEPTION, default_feature_layer, extract_features
from .images import (
    ImageArrayDataset,
    folder_dataset,
    folder_image_size,
    images_from_npz,
    npz_member_header,
    read_npz,
)
from .stats import FeatureStats, feature_stats

__all__ = [
    'Reference',
    'check_image_sizes',
    'check_reference',
    'check_stats_width',
    'load_reference',
    'save_reference_stats',
]


@dataclass
class Reference:
    """A reference set: images (for every metric) and/or FID statistics (FID only, as ADM's reference batches)."""

    images: Dataset | None = None
    stats: FeatureStats | None = None
    source: str = 'array'
    stats_feature_extractor: str | None = None  # recorded by save_reference_stats; ADM files do not say

    @property
    def num_images(self) -> int | None:
        return len(self.images) if self.images is not None else None

    @property
    def kind(self) -> str:
        if self.stats is None:
            return 'images'
        return 'statistics+images' if self.images is not None else 'statistics'


def _size_text(size: Sequence[int]) -> str:
    return 'x'.join(str(int(v)) for v in size)


def check_image_sizes(samples: Sequence[int], reference: Sequence[int], reference_name: str) -> None:
    """Refuses samples and reference images of different `(height, width)`: both would be resized to the extractor's
    input, and FID would then measure the resize as much as the model.

    Raises:
        ValueError: The sizes differ (both named).
    """
    if tuple(samples) != tuple(reference):
        raise ValueError(
            f'The samples are {_size_text(samples)} images but the reference {reference_name} holds '
            f'{_size_text(reference)} images; score samples against a reference of their own size (resize the '
            f'reference set, or sample at its resolution).'
        )


def _check_npz_images(path: Path, image_size: Sequence[int] | None) -> None:
    shape, dtype = npz_member_header(path, 'arr_0')
    what = f'{path}:arr_0'
    if dtype != np.uint8:
        raise ValueError(f'{what} must be uint8 (0..255), got {dtype}; convert with (x * 255).round().astype(uint8).')
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3)):
        raise ValueError(f'{what} must be NHWC with 1 or 3 channels (or NHW), got shape {shape}.')
    if shape[0] == 0:
        raise ValueError(f'{what} holds no images.')
    if image_size is not None:
        check_image_sizes(image_size, shape[1:3], str(path))


def _check_npz_stats(path: Path, feature_dim: int | None) -> None:
    (mu, mu_dtype), (sigma, sigma_dtype) = npz_member_header(path, 'mu'), npz_member_header(path, 'sigma')
    if len(mu) != 1 or sigma != (mu[0], mu[0]) or not all(d.kind == 'f' for d in (mu_dtype, sigma_dtype)):
        raise ValueError(
            f'{path}: mu must be float (D,) and sigma float (D, D); got mu {mu_dtype} {mu} and sigma '
            f'{sigma_dtype} {sigma}.'
        )
    check_stats_width(mu[0], feature_dim, str(path))


def check_stats_width(stats_width: int, feature_dim: int | None, source: str) -> None:
    """Refuses FID statistics of another width than the extractor's features (`feature_dim`; None: unknown).

    Raises:
        ValueError: The widths differ (both named).
    """
    if feature_dim is not None and stats_width != feature_dim:
        raise ValueError(
            f'{source} holds statistics of {stats_width} features, but the feature extractor gives {feature_dim}: '
            f'they were made with another extractor or layer; recompute them with save_reference_stats.'
        )


def check_reference(
    path: str | Path, *, image_size: Sequence[int] | None = None, feature_dim: int | None = None
) -> str:
    """Validates a reference path without decoding pixels (headers only); returns its kind.

    Run before sampling, so that a reference that cannot be scored fails in seconds, not after hours: the `.npz`
    member dtypes and shapes, the folder's one image size, the sizes against the samples' and the statistics'
    width against the extractor's.

    Args:
        image_size: `(height, width)` the samples have (or the model generates); reference images must match.
        feature_dim: Width of the extractor's FID features; precomputed `mu`/`sigma` must match.

    Returns:
        `'images'`, `'statistics'` or `'statistics+images'`.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: A folder without images or of mixed sizes, an `.npz` without `arr_0` or `mu`/`sigma`, a wrong
            dtype or shape, or sizes that disagree (each message names the file and both values).
    """
    path = Path(path)
    if path.is_dir():
        _, size = folder_image_size(path)
        if image_size is not None:
            check_image_sizes(image_size, size, str(path))
        return 'images'
    if not path.is_file():
        raise FileNotFoundError(
            f'Reference {path} does not exist; expected an image folder, an .npz of images (`arr_0`) or an .npz '
            f'of Inception statistics (`mu`, `sigma`).'
        )
    keys = set(read_npz(path).files) if path.suffix == '.npz' else set()
    has_stats, has_images = {'mu', 'sigma'} <= keys, 'arr_0' in keys
    if not (has_stats or has_images):
        raise ValueError(f'Reference {path} is not an .npz with `arr_0` or `mu`/`sigma` (keys: {sorted(keys)}).')
    if has_images:
        _check_npz_images(path, image_size)
    if has_stats:
        _check_npz_stats(path, feature_dim)
    return 'statistics+images' if has_stats and has_images else 'statistics' if has_stats else 'images'


def load_reference(reference: Any, *, need_images: bool = True) -> Reference:
    """Reads a reference: image folder, `.npz` with `arr_0` and/or `mu`/`sigma`, array, Dataset or `FeatureStats`.

    Args:
        reference: What to compare samples with.
        need_images: Load `arr_0` of an `.npz` that also has statistics (KID and precision/recall need images).
    """
    if isinstance(reference, Reference):
        return reference
    if isinstance(reference, FeatureStats):
        return Reference(stats=reference, source='FeatureStats')
    if isinstance(reference, Dataset):
        return Reference(images=reference, source=type(reference).__name__)
    if isinstance(reference, np.ndarray):
        return Reference(images=ImageArrayDataset(reference))
    path = Path(reference)
    kind = check_reference(path)
    if path.is_dir():
        return Reference(images=folder_dataset(path), source=str(path))
    npz = read_npz(path)
    has_stats, has_images = kind.startswith('statistics'), kind.endswith('images')
    stats = FeatureStats(npz['mu'], npz['sigma']) if has_stats else None
    images = None
    if has_images and (need_images or not has_stats):
        images = ImageArrayDataset(images_from_npz(npz, path))
    made_with = str(npz['feature_extractor']) if 'feature_extractor' in npz.files else None
    return Reference(images=images, stats=stats, source=str(path), stats_feature_extractor=made_with)


def save_reference_stats(
    reference: Any,
    path: str | Path,
    *,
    feature_extractor: str = INCEPTION,
    batch_size: int = DEFAULTS['batch_size'],
    cuda: bool | None = None,
    inception_weights: str | Path | None = None,
    allow_download: bool = False,
) -> Path:
    """Writes FID statistics (`mu`, `sigma`) of a reference set to an `.npz`, like ADM's reference batches.

    The extractor and layer are recorded beside them, so that `compute_metrics` refuses to compare them with
    features of another extractor.
    """
    layer = default_feature_layer(feature_extractor, 'fid')
    features = extract_features(
        reference, feature_extractor, [layer], batch_size=batch_size, cuda=cuda,
        inception_weights=inception_weights, allow_download=allow_download,
    )[layer]
    stats = feature_stats(features)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    provenance = {'feature_extractor': np.array(feature_extractor), 'feature_layer': np.array(layer)}
    np.savez(path, mu=stats.mu, sigma=stats.sigma, **provenance)
    return path
