"""FID, IS, KID and precision/recall through torch-fidelity, with offline Inception and timm feature extractors.

Every number is produced by torch-fidelity (`calculate_metrics`, or its own statistics and Frechet-distance
functions when the reference is given as precomputed `mu`/`sigma`), so results say which tool made them.
What this module adds around it:

* inputs: uint8 NHWC arrays, image folders (recursive) and ADM-style `.npz` files (`arr_0`), plus `.npz`
  reference statistics (`mu`, `sigma`, as in ADM's reference batches);
* offline use: the Inception weights are looked up where torch-fidelity would download them, and a missing file
  is reported before any download is attempted;
* a feature extractor built from a timm classifier checkpoint, for small datasets (digits) on which Inception
  features say little.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import timm
import torch
import torch.nn.functional as F
import torch_fidelity
from PIL import Image
from timm.data import resolve_input_data_config
from torch.utils.data import Dataset
from torch_fidelity.datasets import ImagesPathDataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset
from tqdm.auto import tqdm

from ..timm.data import per_channel

__all__ = [
    'INCEPTION',
    'FeatureStats',
    'ImageArrayDataset',
    'MissingInceptionWeightsError',
    'Reference',
    'TimmFeatureExtractor',
    'check_reference',
    'compute_metrics',
    'default_inception_weights_path',
    'extract_features',
    'feature_stats',
    'find_image_files',
    'frechet_distance',
    'load_images',
    'load_reference',
    'register_timm_feature_extractor',
    'resolve_inception_weights',
    'save_npz',
    'save_reference_stats',
]

INCEPTION = 'inception-v3-compat'
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
_METRIC_FLAGS = ('isc', 'fid', 'kid', 'prc')


# --------------------------------------------------------------------------------------------------------------
# Images in and out
# --------------------------------------------------------------------------------------------------------------


def _check_uint8_nhwc(images: np.ndarray, what: str = 'images') -> np.ndarray:
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
    images = _check_uint8_nhwc(images)
    path = Path(path)
    if path.suffix != '.npz':
        raise ValueError(f'Sample batches are .npz files; got {path}.')
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, arr_0=images)
    return path


def find_image_files(folder: str | Path) -> list[Path]:
    """All png/jpg/jpeg files under `folder`, recursively, in a stable (sorted) order."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob('*') if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Lazily opened npz members; unreadable files raise a ValueError naming the file."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f'Could not read {path} as an .npz file ({e}).') from e


def _images_from_npz(path: Path) -> np.ndarray:
    npz = _read_npz(path)
    if 'arr_0' not in npz.files:
        raise ValueError(f'{path} has no `arr_0` image array (keys: {npz.files}); ADM sample batches store it there.')
    return _check_uint8_nhwc(npz['arr_0'], f'{path}:arr_0')


def _image_files_or_raise(folder: Path) -> list[Path]:
    files = find_image_files(folder)
    if not files:
        raise ValueError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}.")
    return files


def load_images(path: str | Path) -> np.ndarray:
    """Loads an image folder (recursive) or an `.npz` (`arr_0`) as uint8 NHWC (folders come back as RGB)."""
    path = Path(path)
    if path.is_dir():
        files = _image_files_or_raise(path)
        images = [np.asarray(Image.open(f).convert('RGB')) for f in tqdm(files, desc='Reading images', leave=False)]
        sizes = {im.shape for im in images}
        if len(sizes) > 1:
            raise ValueError(f'Images under {path} differ in size ({sorted(sizes)[:3]}...); resize them to one size.')
        return np.stack(images)
    if path.suffix == '.npz' and path.is_file():
        return _images_from_npz(path)
    if not path.exists():
        raise FileNotFoundError(f'{path} does not exist; expected an image folder or an .npz with `arr_0`.')
    raise ValueError(f'{path} is neither an image folder nor an .npz file.')


class ImageArrayDataset(Dataset):
    """uint8 NHWC images as the uint8 CHW RGB tensors torch-fidelity takes as `input1`/`input2`.

    Grayscale is repeated to three channels: Inception requires RGB, and an RGB image with equal channels is read
    back exactly by 1-channel extractors.
    """

    def __init__(self, images: np.ndarray):
        self.images = _check_uint8_nhwc(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = torch.from_numpy(np.ascontiguousarray(self.images[index])).permute(2, 0, 1)
        return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image


def _folder_dataset(folder: Path) -> Dataset:
    """Lazily read image folder (torch-fidelity's own reader); sizes are checked from headers up front."""
    files = _image_files_or_raise(folder)
    sizes = set()
    for f in files:
        with Image.open(f) as im:
            sizes.add(im.size)
    if len(sizes) > 1:
        raise ValueError(f'Images under {folder} differ in size ({sorted(sizes)[:3]}...); resize them to one size.')
    return ImagesPathDataset([str(f) for f in files])


# --------------------------------------------------------------------------------------------------------------
# References: images and/or precomputed statistics
# --------------------------------------------------------------------------------------------------------------


@dataclass
class FeatureStats:
    """Mean and covariance of features, the sufficient statistics of FID."""

    mu: np.ndarray
    sigma: np.ndarray

    def __post_init__(self):
        self.mu = np.asarray(self.mu, dtype=np.float64)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        if self.mu.ndim != 1 or self.sigma.shape != (len(self.mu), len(self.mu)):
            raise ValueError(f'mu must be (D,) and sigma (D, D); got {self.mu.shape} and {self.sigma.shape}.')


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
        return Reference(images=_folder_dataset(path), source=str(path))
    npz = _read_npz(path)
    has_stats, has_images = kind.startswith('statistics'), kind.endswith('images')
    stats = FeatureStats(npz['mu'], npz['sigma']) if has_stats else None
    images = None
    if has_images and (need_images or not has_stats):
        images = ImageArrayDataset(_check_uint8_nhwc(npz['arr_0'], f'{path}:arr_0'))
    made_with = str(npz['feature_extractor']) if 'feature_extractor' in npz.files else None
    return Reference(images=images, stats=stats, source=str(path), stats_feature_extractor=made_with)


def check_reference(path: str | Path) -> str:
    """Cheap readability check of a reference path (no image decoding); returns its kind.

    Lets a sampling job fail in seconds, not after hours, on a mistyped or unreadable reference.
    """
    path = Path(path)
    if path.is_dir():
        if next((p for p in path.rglob('*') if p.suffix.lower() in IMAGE_EXTENSIONS), None) is None:
            raise ValueError(f"Reference folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
        return 'images'
    if not path.is_file():
        raise FileNotFoundError(
            f'Reference {path} does not exist; expected an image folder, an .npz of images (`arr_0`) or an .npz '
            f'of Inception statistics (`mu`, `sigma`).'
        )
    keys = set(_read_npz(path).files) if path.suffix == '.npz' else set()
    has_stats, has_images = {'mu', 'sigma'} <= keys, 'arr_0' in keys
    if not (has_stats or has_images):
        raise ValueError(f'Reference {path} is not an .npz with `arr_0` or `mu`/`sigma` (keys: {sorted(keys)}).')
    return 'statistics+images' if has_stats and has_images else 'statistics' if has_stats else 'images'


def _as_dataset(images: Any, what: str) -> Dataset:
    if isinstance(images, Dataset):
        dataset = images
    elif isinstance(images, np.ndarray):
        dataset = ImageArrayDataset(images)
    else:
        path = Path(images)
        dataset = _folder_dataset(path) if path.is_dir() else ImageArrayDataset(load_images(path))
    if len(dataset) == 0:
        raise ValueError(f'The {what} set is empty.')
    return dataset


# --------------------------------------------------------------------------------------------------------------
# Inception weights, offline
# --------------------------------------------------------------------------------------------------------------


class MissingInceptionWeightsError(FileNotFoundError):
    """torch-fidelity's Inception weights are neither given nor cached, and downloading was not allowed."""


def default_inception_weights_path() -> Path:
    """Where torch-fidelity's download lands and is looked up: `$TORCH_HOME/hub/checkpoints/<file>`."""
    return Path(torch.hub.get_dir()) / 'checkpoints' / os.path.basename(urlparse(URL_INCEPTION_V3).path)


def resolve_inception_weights(weights_path: str | Path | None = None, *, allow_download: bool = False) -> str | None:
    """The Inception weights file to hand torch-fidelity, checked before it would try to download.

    Args:
        weights_path: Explicit weights file (`--inception_weights`).
        allow_download: Return `None` (torch-fidelity downloads) instead of failing when nothing is cached.

    Raises:
        MissingInceptionWeightsError: Neither the given file nor the cached one exists.
    """
    if weights_path is not None:
        if not Path(weights_path).is_file():
            raise MissingInceptionWeightsError(f'Inception weights file {weights_path} does not exist.')
        return str(weights_path)
    cached = default_inception_weights_path()
    if cached.is_file():
        return str(cached)
    if allow_download:
        return None
    raise MissingInceptionWeightsError(
        f"torch-fidelity's Inception-v3 weights '{cached.name}' were not found at {cached}. Offline, download "
        f"{URL_INCEPTION_V3} on a connected machine and either copy it to {cached.parent}/ "
        f"($TORCH_HOME/hub/checkpoints/) or pass its path with --inception_weights PATH "
        f"(inception_weights=... in Python)."
    )


# --------------------------------------------------------------------------------------------------------------
# timm classifier as a torch-fidelity feature extractor
# --------------------------------------------------------------------------------------------------------------


def _timm_state_dict_path(checkpoint: str | Path) -> str:
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(
            f"timm checkpoint {path} does not exist; expected a state_dict file or a timm train checkpoint "
            f"(with 'state_dict'/'state_dict_ema')."
        )
    return str(path.resolve())


class TimmFeatureExtractor(FeatureExtractorBase):
    """Pre-logits features (FID, KID, precision/recall) and logits (IS) of a timm classifier checkpoint.

    torch-fidelity instantiates registered classes itself, with only its own kwargs, so the model settings live
    on a per-registration subclass (`timm_config`) made by `register_timm_feature_extractor`. Inputs arrive as
    uint8 NCHW RGB; they are converted to the model's channels, resized to its input size and normalised with
    its data config (no crop: samples are already full frames at the training resolution).
    """

    timm_config: dict[str, Any] = {}

    def __init__(self, name: str, features_list: Sequence[str], **kwargs: Any):
        super().__init__(name, list(features_list))
        cfg = self.timm_config
        model_kwargs = dict(cfg.get('model_kwargs') or {})
        if cfg.get('img_size') is not None:
            model_kwargs['img_size'] = cfg['img_size']
        self.model = timm.create_model(
            cfg['model_name'],
            pretrained=False,
            num_classes=cfg['num_classes'],
            in_chans=cfg['in_chans'],
            **model_kwargs,
        )
        timm.models.load_checkpoint(self.model, cfg['checkpoint'], use_ema=cfg.get('use_ema', False), strict=True)
        overrides = {k: cfg[k] for k in ('mean', 'std', 'interpolation') if cfg.get(k) is not None}
        self.data_config = resolve_input_data_config(self.model, overrides)
        self.in_chans = self.data_config['input_size'][0]
        self.input_size = tuple(self.data_config['input_size'][1:])
        interpolation = self.data_config.get('interpolation', 'bicubic')
        self.interpolation = interpolation if interpolation in ('nearest', 'bilinear', 'bicubic') else 'bicubic'
        self.register_buffer('mean', per_channel(self.data_config['mean'], self.in_chans), persistent=False)
        self.register_buffer('std', per_channel(self.data_config['std'], self.in_chans), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def get_provided_features_list(cls) -> tuple[str, ...]:
        return ('pre_logits', 'logits') if cls.timm_config.get('num_classes', 0) > 0 else ('pre_logits',)

    @classmethod
    def get_default_feature_layer_for_metric(cls, metric: str) -> str:
        if metric == 'isc':
            if 'logits' not in cls.get_provided_features_list():
                raise ValueError('This timm feature extractor has no classifier head (num_classes=0): no IS.')
            return 'logits'
        return 'pre_logits'

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros((1, 3, 32, 32), dtype=torch.uint8)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW (1 or 3 channels) -> normalised float input of the classifier."""
        x = x.float() / 255.0
        if x.shape[1] == 3 and self.in_chans == 1:  # ITU-R 601 luma, as PIL's convert("L")
            weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
            x = (x * weights).sum(dim=1, keepdim=True)
        elif x.shape[1] == 1 and self.in_chans == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != self.in_chans:
            raise ValueError(f'Cannot feed {x.shape[1]}-channel images to a {self.in_chans}-channel classifier.')
        if tuple(x.shape[-2:]) != self.input_size:
            antialias = self.interpolation != 'nearest' and x.shape[-1] > self.input_size[-1]
            x = F.interpolate(x, size=self.input_size, mode=self.interpolation, antialias=antialias)
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4):
            raise ValueError('Expecting uint8 images as a NCHW torch.Tensor.')
        features = self.model.forward_features(self.preprocess(x))
        out = {'pre_logits': self.model.forward_head(features, pre_logits=True)}
        if 'logits' in self.features_list:
            out['logits'] = self.model.forward_head(features)
        return tuple(out[name].float() for name in self.features_list)


def register_timm_feature_extractor(
    model_name: str,
    checkpoint: str | Path,
    *,
    num_classes: int,
    in_chans: int = 3,
    img_size: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    use_ema: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str | None = None,
    name: str | None = None,
) -> tuple[str, str]:
    """Registers a timm classifier checkpoint with torch-fidelity (idempotent for identical settings).

    Args:
        model_name: timm architecture, e.g. `vit_tiny_patch16_224`.
        checkpoint: state_dict file or timm train checkpoint (`state_dict` / `state_dict_ema`).
        num_classes: Classifier classes (0 for a headless model: no IS).
        in_chans: Input channels the model was trained with (1 for grayscale).
        img_size: Input size the model was built with.
        model_kwargs: Further `timm.create_model` kwargs (e.g. `patch_size`, `embed_dim`, `depth`).
        use_ema: Take `state_dict_ema` from a train checkpoint.
        mean, std, interpolation: Overrides of the model's data config (as timm's validate.py flags).
        name: Registry name; default derived from the settings.

    Returns:
        `(name, feature_layer)`: pass `name` as `feature_extractor`; `feature_layer` is used for FID/KID/PRC.
    """
    config = {
        'model_name': model_name,
        'checkpoint': _timm_state_dict_path(checkpoint),
        'num_classes': int(num_classes),
        'in_chans': int(in_chans),
        'img_size': img_size,
        'model_kwargs': dict(model_kwargs or {}),
        'use_ema': bool(use_ema),
        'mean': tuple(mean) if mean is not None else None,
        'std': tuple(std) if std is not None else None,
        'interpolation': interpolation,
    }
    if name is None:
        digest = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]
        name = f"timm-{re.sub(r'[^A-Za-z0-9_.-]+', '-', model_name)}-{digest}"
    registered = FEATURE_EXTRACTORS_REGISTRY.get(name)
    if registered is not None:
        if getattr(registered, 'timm_config', None) != config:
            raise ValueError(
                f'Feature extractor {name!r} is already registered with other settings; pass another `name`.'
            )
        return name, 'pre_logits'
    cls_name = f'TimmFeatureExtractor_{len(FEATURE_EXTRACTORS_REGISTRY)}'
    cls = type(cls_name, (TimmFeatureExtractor,), {'timm_config': config})
    torch_fidelity.register_feature_extractor(name, cls)
    return name, 'pre_logits'


# --------------------------------------------------------------------------------------------------------------
# Features, statistics, Frechet distance
# --------------------------------------------------------------------------------------------------------------


def _extractor_kwargs(
    feature_extractor: str, inception_weights: str | Path | None, allow_download: bool
) -> dict[str, Any]:
    if feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(
            f'Feature extractor {feature_extractor!r} is not registered with torch-fidelity (known: '
            f'{sorted(FEATURE_EXTRACTORS_REGISTRY)}); register a timm classifier with register_timm_feature_extractor.'
        )
    if feature_extractor == INCEPTION:
        weights = resolve_inception_weights(inception_weights, allow_download=allow_download)
        return {'feature_extractor_weights_path': weights}
    return {}


def _default_layer(feature_extractor: str, metric: str) -> str | None:
    """The extractor's layer for `metric`, or `None` if it cannot serve it (IS needs class logits)."""
    cls = FEATURE_EXTRACTORS_REGISTRY[feature_extractor]
    try:
        layer = cls.get_default_feature_layer_for_metric(metric)
    except (NotImplementedError, ValueError, KeyError):
        return None
    if metric == 'isc' and (layer is None or 'logits' not in str(layer)):
        return None
    return layer


def _cuda(cuda: bool | None) -> bool:
    return torch.cuda.is_available() if cuda is None else cuda


def _extract(
    dataset: Dataset, extractor: FeatureExtractorBase, batch_size: int, cuda: bool, verbose: bool
) -> dict[str, torch.Tensor]:
    return get_featuresdict_from_dataset(dataset, extractor, batch_size, cuda, True, verbose)


def extract_features(
    images: Any,
    feature_extractor: str = INCEPTION,
    layers: Sequence[str] | None = None,
    *,
    batch_size: int = 64,
    cuda: bool | None = None,
    inception_weights: str | Path | None = None,
    allow_download: bool = False,
    verbose: bool = False,
) -> dict[str, np.ndarray]:
    """Features torch-fidelity computes for `images` (array, folder, .npz or Dataset), per layer.

    Args:
        layers: Feature layers; default the extractor's FID layer.
    """
    kwargs = _extractor_kwargs(feature_extractor, inception_weights, allow_download)
    layers = list(layers or [_default_layer(feature_extractor, 'fid')])
    cuda = _cuda(cuda)
    extractor = create_feature_extractor(feature_extractor, layers, cuda=cuda, verbose=verbose, **kwargs)
    features = _extract(_as_dataset(images, 'image'), extractor, batch_size, cuda, verbose)
    return {k: v.numpy() for k, v in features.items()}


def feature_stats(features: np.ndarray | torch.Tensor) -> FeatureStats:
    """FID statistics of `(N, D)` features, computed by torch-fidelity."""
    stats = fid_features_to_statistics(torch.as_tensor(features))
    return FeatureStats(stats['mu'], stats['sigma'])


def frechet_distance(stats_1: FeatureStats, stats_2: FeatureStats) -> float:
    """torch-fidelity's Frechet distance between two Gaussians (both taken in float64)."""
    if stats_1.mu.shape != stats_2.mu.shape:
        raise ValueError(
            f'Statistics of different feature sizes ({stats_1.mu.shape[0]} vs {stats_2.mu.shape[0]}): the reference '
            f'statistics were made with another feature extractor or layer.'
        )
    stats = [{'mu': s.mu, 'sigma': s.sigma} for s in (stats_1, stats_2)]
    return float(fid_statistics_to_metric(*stats, False)[KEY_METRIC_FID])


def save_reference_stats(
    reference: Any,
    path: str | Path,
    *,
    feature_extractor: str = INCEPTION,
    batch_size: int = 64,
    cuda: bool | None = None,
    inception_weights: str | Path | None = None,
    allow_download: bool = False,
) -> Path:
    """Writes FID statistics (`mu`, `sigma`) of a reference set to an `.npz`, like ADM's reference batches."""
    layer = _default_layer(feature_extractor, 'fid')
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


# --------------------------------------------------------------------------------------------------------------
# All metrics
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """Which metrics can run, on which layers, and why others cannot."""

    layers: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _plan(
    feature_extractor: str,
    requested: dict[str, bool],
    num_samples: int,
    reference: Reference,
    prc_neighborhood: int,
) -> _Plan:
    plan = _Plan()
    for metric in _METRIC_FLAGS:
        if not requested[metric]:
            continue
        layer = _default_layer(feature_extractor, metric)
        if layer is None:
            plan.skipped[metric] = f'feature extractor {feature_extractor!r} provides no class logits'
        elif metric in ('kid', 'prc') and reference.images is None:
            plan.skipped[metric] = 'reference has statistics only (no images)'
        elif metric == 'prc' and min(num_samples, reference.num_images) <= prc_neighborhood:
            plan.skipped[metric] = f'needs more than prc_neighborhood={prc_neighborhood} images per set'
        else:
            plan.layers[metric] = layer
    return plan


def compute_metrics(
    samples: Any,
    reference: Any,
    *,
    feature_extractor: str = INCEPTION,
    fid: bool = True,
    isc: bool = True,
    kid: bool = True,
    prc: bool = True,
    batch_size: int = 64,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    isc_splits: int = 10,
    prc_neighborhood: int = 3,
    inception_weights: str | Path | None = None,
    allow_download: bool = False,
    cuda: bool | None = None,
    rng_seed: int = 2020,
    verbose: bool = True,
) -> dict[str, Any]:
    """Scores generated `samples` against `reference` with torch-fidelity.

    Args:
        samples: uint8 NHWC array, image folder, `.npz` (`arr_0`) or Dataset of uint8 CHW tensors.
        reference: Same kinds, or an `.npz`/`FeatureStats` with `mu`/`sigma`. With statistics the FID is taken
            against them (as ADM's evaluator); KID and precision/recall then need the `.npz`'s `arr_0` too.
        feature_extractor: torch-fidelity extractor name (`inception-v3-compat`, or a name from
            `register_timm_feature_extractor`).
        fid, isc, kid, prc: Metrics to compute. IS needs class logits (Inception, or a timm classifier's head);
            metrics that cannot run are listed under `skipped` with the reason.
        kid_subset_size: KID subset size, clipped to the smaller set.
        inception_weights: Local weights for `inception-v3-compat` (else the torch hub cache; see
            `resolve_inception_weights`).
        allow_download: Let torch-fidelity download missing Inception weights.
        cuda: Run on the GPU (default: when available).

    Returns:
        JSON-ready dict: tool, version, extractor, layers, set sizes, reference kind, `metrics` (torch-fidelity
        keys), `skipped` and the settings used.
    """
    requested = {'isc': isc, 'fid': fid, 'kid': kid, 'prc': prc}
    if not any(requested.values()):
        raise ValueError('No metric requested; set at least one of fid, isc, kid, prc.')
    extractor_kwargs = _extractor_kwargs(feature_extractor, inception_weights, allow_download)
    samples_ds = _as_dataset(samples, 'sample')
    ref = load_reference(reference, need_images=kid or prc)
    if ref.images is not None and len(ref.images) == 0:
        raise ValueError(f'The reference set {ref.source} is empty.')
    if ref.stats_feature_extractor not in (None, feature_extractor):
        raise ValueError(
            f'Reference statistics {ref.source} were made with {ref.stats_feature_extractor!r}, not '
            f'{feature_extractor!r}; recompute them with save_reference_stats or pick that extractor.'
        )
    plan = _plan(feature_extractor, requested, len(samples_ds), ref, prc_neighborhood)
    sizes = [len(samples_ds)] + ([ref.num_images] if ref.images is not None else [])
    settings = {
        'batch_size': batch_size,
        'kid_subset_size': min([kid_subset_size] + sizes),
        'kid_subsets': kid_subsets,
        'isc_splits': min(isc_splits, len(samples_ds)),
        'prc_neighborhood': prc_neighborhood,
        'rng_seed': rng_seed,
    }
    fidelity_kwargs = dict(
        cuda=_cuda(cuda),
        batch_size=batch_size,
        verbose=verbose,
        cache=False,
        save_cpu_ram=True,
        rng_seed=rng_seed,
        **{k: v for k, v in settings.items() if k not in ('batch_size', 'rng_seed')},
        **extractor_kwargs,
    )

    if not plan.layers:
        metrics: dict[str, float] = {}
    elif ref.stats is None:
        metrics = torch_fidelity.calculate_metrics(
            input1=samples_ds,
            input2=ref.images,
            feature_extractor=feature_extractor,
            **{m: m in plan.layers for m in _METRIC_FLAGS},
            **{f'feature_layer_{m}': layer for m, layer in plan.layers.items()},
            **fidelity_kwargs,
        )
    else:
        metrics = _metrics_against_stats(samples_ds, ref, feature_extractor, plan, fidelity_kwargs)

    return {
        'tool': 'torch-fidelity',
        'tool_version': torch_fidelity.__version__,
        'feature_extractor': feature_extractor,
        'feature_extractor_config': _extractor_description(feature_extractor, extractor_kwargs),
        'feature_layers': plan.layers,
        'num_samples': len(samples_ds),
        'num_reference': ref.num_images,
        'reference': {
            'source': ref.source,
            'kind': ref.kind,
            'fid_from': 'precomputed mu/sigma' if ref.stats is not None else 'reference images',
        },
        'metrics': {k: float(v) for k, v in metrics.items()},
        'skipped': plan.skipped,
        'settings': settings,
    }


def _metrics_against_stats(
    samples: Dataset, ref: Reference, feature_extractor: str, plan: _Plan, kwargs: dict[str, Any]
) -> dict[str, float]:
    """The torch-fidelity metric functions on features extracted once per set; FID against `ref.stats`."""
    extractor = create_feature_extractor(feature_extractor, sorted(set(plan.layers.values())), **kwargs)
    batch_size, cuda, verbose = kwargs['batch_size'], kwargs['cuda'], kwargs['verbose']
    sample_features = _extract(samples, extractor, batch_size, cuda, verbose)
    ref_features = None
    if 'kid' in plan.layers or 'prc' in plan.layers:
        ref_features = _extract(ref.images, extractor, batch_size, cuda, verbose)
    metrics: dict[str, float] = {}
    if 'isc' in plan.layers:
        metrics.update(
            isc_features_to_metric(sample_features[plan.layers['isc']], kwargs['isc_splits'], True, kwargs['rng_seed'])
        )
    if 'fid' in plan.layers:
        metrics[KEY_METRIC_FID] = frechet_distance(feature_stats(sample_features[plan.layers['fid']]), ref.stats)
    if 'kid' in plan.layers:
        layer = plan.layers['kid']
        metrics.update(kid_features_to_metric(sample_features[layer], ref_features[layer], **kwargs))
    if 'prc' in plan.layers:
        layer = plan.layers['prc']
        metrics.update(prc_features_to_metric(sample_features[layer], ref_features[layer], **kwargs))
    return metrics


def _extractor_description(feature_extractor: str, extractor_kwargs: dict[str, Any]) -> dict[str, Any]:
    cls = FEATURE_EXTRACTORS_REGISTRY[feature_extractor]
    if issubclass(cls, TimmFeatureExtractor):
        return {'kind': 'timm', **cls.timm_config}
    if feature_extractor == INCEPTION:
        weights = extractor_kwargs.get('feature_extractor_weights_path') or URL_INCEPTION_V3
        return {'kind': 'inception', 'weights': weights}
    return {'kind': feature_extractor}
