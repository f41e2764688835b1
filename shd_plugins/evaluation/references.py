"""Reference sets of the FID evaluator: images and/or precomputed FID statistics, and how to write the latter.

ADM's reference batches (`VIRTUAL_imagenet256_labeled.npz`) hold both `arr_0` images and Inception `mu`/`sigma`;
FID is then taken against the statistics, as ADM's evaluator does, and the images serve KID and precision/recall.
`check_reference` reads no pixels, so a sampling job can fail in seconds on a mistyped reference, not after hours.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset
from torch_fidelity.defaults import DEFAULTS

from ..imagefolder import image_extensions
from .extractors import INCEPTION, default_feature_layer, extract_features
from .images import ImageArrayDataset, folder_dataset, images_from_npz, read_npz
from .stats import FeatureStats, feature_stats

__all__ = ['Reference', 'check_reference', 'load_reference', 'save_reference_stats']


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


def check_reference(path: str | Path) -> str:
    """Cheap readability check of a reference path (no image decoding); returns its kind.

    Returns:
        `'images'`, `'statistics'` or `'statistics+images'`.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: A folder without images, or a file that is not an `.npz` with `arr_0` or `mu`/`sigma`.
    """
    path = Path(path)
    if path.is_dir():
        extensions = image_extensions()
        if next((p for p in path.rglob('*') if p.suffix.lower() in extensions), None) is None:
            raise ValueError(f"Reference folder {path} holds no images ({', '.join(extensions)}).")
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
