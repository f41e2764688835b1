"""Evaluators: FID and friends through torch-fidelity, top-1 as timm's ``validate.py``.

The FID evaluator is split by concern: ``images`` (uint8 NHWC arrays, ADM ``.npz`` files, image folders),
``stats`` (FID statistics, Frechet distance), ``weights`` (weight files read without running their pickle, the
Inception weights' checks), ``extractors`` (offline Inception, timm classifiers registered with torch-fidelity),
``references`` (images and/or precomputed statistics, validated before sampling) and ``metrics`` (``compute_metrics``);
``top1`` is the classifier evaluator the timm recipe validates with.

The names below are imported on first use: ``top1`` needs timm only, so the timm recipe (the ``[timm]`` extra)
runs without torch-fidelity, which the FID modules import.
"""
from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the submodule that defines it.
_EXPORTS = {
    'INCEPTION': 'extractors',
    'MissingInceptionWeightsError': 'extractors',
    'TimmFeatureExtractor': 'extractors',
    'default_inception_weights_path': 'extractors',
    'extract_features': 'extractors',
    'feature_size': 'extractors',
    'register_timm_feature_extractor': 'extractors',
    'resolve_inception_weights': 'extractors',
    'ImageArrayDataset': 'images',
    'load_images': 'images',
    'save_image_grid': 'images',
    'save_npz': 'images',
    'METRICS': 'metrics',
    'compute_metrics': 'metrics',
    'Reference': 'references',
    'check_image_sizes': 'references',
    'check_reference': 'references',
    'check_stats_width': 'references',
    'load_reference': 'references',
    'save_reference_stats': 'references',
    'FeatureStats': 'stats',
    'feature_stats': 'stats',
    'frechet_distance': 'stats',
    'build_eval_loader': 'top1',
    'check_checkpoint_args': 'checkpoints',
    'check_weights_source': 'top1',
    'read_checkpoint_metadata': 'checkpoints',
    'create_eval_model': 'top1',
    'evaluate_classifier': 'top1',
    'input_img_mode': 'top1',
    'resolve_eval_data_config': 'top1',
    'resolve_split_dir': 'top1',
    'INCEPTION_FILE_NAME': 'weights',
    'INCEPTION_SHA256_PREFIX': 'weights',
    'UntrustedWeightsError': 'weights',
    'file_sha256': 'weights',
    'load_tensors': 'weights',
    'verified_inception_state_dict': 'weights',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    return getattr(importlib.import_module(f'.{_EXPORTS[name]}', __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
