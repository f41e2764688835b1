"""Feature extractors for the FID evaluator, registered with torch-fidelity's registry by name.

Two kinds: torch-fidelity's own Inception-v3 (`inception-v3-compat`), whose weights are looked up where
torch-fidelity would download them so that an offline machine fails with a message saying where to put the file;
and a timm classifier checkpoint (`register_timm_feature_extractor`), for small datasets such as the digits on
which Inception features say little. `extract_features` runs either over any images `as_image_dataset` reads.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch_fidelity
from timm.data import resolve_input_data_config
from torch.utils.data import Dataset
from torch_fidelity.defaults import DEFAULTS
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import DEFAULT_FEATURE_EXTRACTOR, create_feature_extractor, get_featuresdict_from_dataset

from ..timm.data import per_channel
from .images import as_image_dataset
from .top1 import create_eval_model
from .weights import INCEPTION_FILE_NAME, INCEPTION_SHA256_PREFIX, trusted_inception_copy, verified_inception_state_dict

__all__ = [
    'INCEPTION',
    'MissingInceptionWeightsError',
    'TimmFeatureExtractor',
    'default_feature_layer',
    'default_inception_weights_path',
    'extract_features',
    'extract_with',
    'feature_extractor_kwargs',
    'feature_size',
    'register_timm_feature_extractor',
    'resolve_cuda',
    'resolve_inception_weights',
]

#: torch-fidelity's FID extractor, `inception-v3-compat` (the TF-FID Inception), used here for every metric as ADM.
INCEPTION = DEFAULT_FEATURE_EXTRACTOR['fid']


# Inception weights, offline


class MissingInceptionWeightsError(FileNotFoundError):
    """torch-fidelity's Inception weights are neither given nor cached, and downloading was not allowed."""


def default_inception_weights_path() -> Path:
    """Where torch-fidelity's download lands and is looked up: `$TORCH_HOME/hub/checkpoints/<file>`."""
    return Path(torch.hub.get_dir()) / 'checkpoints' / INCEPTION_FILE_NAME


def resolve_inception_weights(weights_path: str | Path | None = None, *, allow_download: bool = False) -> str:
    """The Inception weights file to use, verified before any sampling (see `verified_inception_state_dict`).

    torch-fidelity itself would download with `torch.load(weights_only=False)` and no hash check; here the download
    (when allowed) goes through `torch.hub.download_url_to_file` with the published SHA-256 prefix, and every file,
    given or cached, is read with `weights_only=True` and checked against the Inception architecture.

    Args:
        weights_path: Explicit weights file (`--inception_weights`).
        allow_download: Download the published file into the torch hub cache when nothing is cached.

    Raises:
        MissingInceptionWeightsError: Neither the given file nor the cached one exists, and no download allowed.
        UntrustedWeightsError: The file's pickle would run code, or it is named as the published file but its
            SHA-256 differs (both hashes named).
        ValueError: A truncated file or a state dict of another architecture.
    """
    if weights_path is not None:
        if not Path(weights_path).is_file():
            raise MissingInceptionWeightsError(f'Inception weights file {weights_path} does not exist.')
        path = Path(weights_path)
    else:
        path = default_inception_weights_path()
        if not path.is_file():
            if not allow_download:
                raise MissingInceptionWeightsError(
                    f"torch-fidelity's Inception-v3 weights '{path.name}' were not found at {path}. Offline, download "
                    f"{URL_INCEPTION_V3} on a connected machine and either copy it to {path.parent}/ "
                    f"($TORCH_HOME/hub/checkpoints/) or pass its path with --inception_weights PATH "
                    f"(inception_weights=... in Python)."
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            try:  # torch.hub writes a temporary file and moves it into place only once its hash matches
                torch.hub.download_url_to_file(URL_INCEPTION_V3, str(path), hash_prefix=INCEPTION_SHA256_PREFIX)
            except (OSError, RuntimeError) as e:  # URLError is an OSError; a wrong hash a RuntimeError
                raise MissingInceptionWeightsError(
                    f'Could not download {URL_INCEPTION_V3} to {path} ({e}); download it on a connected machine '
                    f'and pass it with --inception_weights PATH.'
                ) from e
    verified_inception_state_dict(path)
    return str(path)


# A timm classifier as a torch-fidelity feature extractor


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
        self.model = create_eval_model(
            cfg['model_name'],
            checkpoint=cfg['checkpoint'],
            use_ema=cfg.get('use_ema', False),
            num_classes=cfg['num_classes'],
            in_chans=cfg['in_chans'],
            img_size=cfg.get('img_size'),
            model_kwargs=cfg.get('model_kwargs'),
        )
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
    else:
        cls = type(f'TimmFeatureExtractor_{len(FEATURE_EXTRACTORS_REGISTRY)}', (TimmFeatureExtractor,), {})
        cls.timm_config = config
        torch_fidelity.register_feature_extractor(name, cls)
    return name, TimmFeatureExtractor.get_default_feature_layer_for_metric('fid')


# Features


@contextmanager
def feature_extractor_kwargs(
    feature_extractor: str, inception_weights: str | Path | None, allow_download: bool
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """torch-fidelity kwargs for a registered extractor, and its JSON-ready provenance, while the block runs.

    Inception gets a private copy of its verified weights (`trusted_inception_copy`), removed when the block ends:
    torch-fidelity unpickles that copy with `weights_only=False`, never the user's file.

    Yields:
        `(kwargs, description)`: kwargs for torch-fidelity; description for the results (the weights file and its
        SHA-256, or the timm settings).

    Raises:
        ValueError: `feature_extractor` is not in torch-fidelity's registry.
        MissingInceptionWeightsError, UntrustedWeightsError: See `resolve_inception_weights`.
    """
    if feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(
            f'Feature extractor {feature_extractor!r} is not registered with torch-fidelity (known: '
            f'{sorted(FEATURE_EXTRACTORS_REGISTRY)}); register a timm classifier with register_timm_feature_extractor.'
        )
    cls = FEATURE_EXTRACTORS_REGISTRY[feature_extractor]
    if feature_extractor != INCEPTION:
        description = {'kind': 'timm', **cls.timm_config} if issubclass(cls, TimmFeatureExtractor) else {}
        yield {}, description or {'kind': feature_extractor}
        return
    weights = resolve_inception_weights(inception_weights, allow_download=allow_download)
    with trusted_inception_copy(weights) as (copy, sha256):
        yield {'feature_extractor_weights_path': copy}, {'kind': 'inception', 'weights': weights, 'sha256': sha256}


def default_feature_layer(feature_extractor: str, metric: str) -> str | None:
    """The extractor's layer for `metric`, or `None` if it cannot serve it (IS needs class logits)."""
    cls = FEATURE_EXTRACTORS_REGISTRY[feature_extractor]
    try:
        layer = cls.get_default_feature_layer_for_metric(metric)
    except (NotImplementedError, ValueError, KeyError):
        return None
    if metric == 'isc' and (layer is None or 'logits' not in str(layer)):
        return None
    return layer


def feature_size(feature_extractor: str) -> int | None:
    """Width of the extractor's FID features, to check precomputed statistics before any sampling.

    Inception's layers are named by their width (`'2048'`); a timm classifier is built once and run on its dummy
    input (a model build and one tiny forward). Other torch-fidelity extractors would download weights to be
    built: `None`, the width is checked after extraction instead.
    """
    layer = default_feature_layer(feature_extractor, 'fid')
    if str(layer).isdigit():
        return int(layer)
    cls = FEATURE_EXTRACTORS_REGISTRY[feature_extractor]
    if not issubclass(cls, TimmFeatureExtractor):
        return None
    extractor = cls(feature_extractor, [layer])
    with torch.inference_mode():
        return int(extractor(cls.get_dummy_input_for_compile())[0].shape[-1])


def resolve_cuda(cuda: bool | None) -> bool:
    """`cuda`, or whether CUDA is available when None (torch-fidelity itself defaults to True and fails)."""
    return torch.cuda.is_available() if cuda is None else cuda


def extract_with(
    dataset: Dataset, extractor: FeatureExtractorBase, batch_size: int, cuda: bool, verbose: bool
) -> dict[str, torch.Tensor]:
    """Features of `dataset` per layer of a created `extractor`, gathered on the CPU (torch-fidelity's loop)."""
    return get_featuresdict_from_dataset(dataset, extractor, batch_size, cuda, True, verbose)


def extract_features(
    images: Any,
    feature_extractor: str = INCEPTION,
    layers: Sequence[str] | None = None,
    *,
    batch_size: int = DEFAULTS['batch_size'],
    cuda: bool | None = None,
    inception_weights: str | Path | None = None,
    allow_download: bool = False,
    verbose: bool = False,
) -> dict[str, np.ndarray]:
    """Features torch-fidelity computes for `images` (array, folder, .npz or Dataset), per layer.

    Args:
        layers: Feature layers; default the extractor's FID layer.
    """
    layers = list(layers or [default_feature_layer(feature_extractor, 'fid')])
    cuda = resolve_cuda(cuda)
    with feature_extractor_kwargs(feature_extractor, inception_weights, allow_download) as (kwargs, _):
        extractor = create_feature_extractor(feature_extractor, layers, cuda=cuda, verbose=verbose, **kwargs)
    features = extract_with(as_image_dataset(images), extractor, batch_size, cuda, verbose)
    return {k: v.numpy() for k, v in features.items()}
