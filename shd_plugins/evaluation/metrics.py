"""FID, IS, KID and precision/recall of generated samples against a reference, every number from torch-fidelity.

`compute_metrics` hands torch-fidelity's `calculate_metrics` both image sets, or, when the reference is given as
precomputed `mu`/`sigma`, runs torch-fidelity's own per-metric functions on features extracted once per set. Unset
settings are torch-fidelity's defaults (`torch_fidelity.defaults.DEFAULTS`), read rather than copied, and the
result records the settings used, the tool and its version, so numbers say which tool made them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.defaults import DEFAULTS
from torch_fidelity.metric_fid import KEY_METRIC_FID
from torch_fidelity.metric_isc import isc_featuresdict_to_metric
from torch_fidelity.metric_kid import kid_featuresdict_to_metric
from torch_fidelity.metric_prc import prc_featuresdict_to_metric
from torch_fidelity.utils import create_feature_extractor

from .extractors import (
    INCEPTION,
    default_feature_layer,
    extract_with,
    feature_extractor_kwargs,
    feature_size,
    resolve_cuda,
)
from .images import as_image_dataset, image_size
from .references import Reference, check_image_sizes, check_stats_width, load_reference
from .stats import feature_stats, frechet_distance

__all__ = ['METRICS', 'compute_metrics']

#: The metrics `compute_metrics` can run, by torch-fidelity's flag names.
METRICS = ('isc', 'fid', 'kid', 'prc')


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
    for metric in METRICS:
        if not requested[metric]:
            continue
        layer = default_feature_layer(feature_extractor, metric)
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
    batch_size: int = DEFAULTS['batch_size'],
    kid_subset_size: int = DEFAULTS['kid_subset_size'],
    kid_subsets: int = DEFAULTS['kid_subsets'],
    isc_splits: int = DEFAULTS['isc_splits'],
    prc_neighborhood: int = DEFAULTS['prc_neighborhood'],
    inception_weights: str | Path | None = None,
    allow_download: bool = False,
    cuda: bool | None = None,
    rng_seed: int = DEFAULTS['rng_seed'],
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
    samples_ds = as_image_dataset(samples, 'sample')
    ref = load_reference(reference, need_images=kid or prc)
    if ref.images is not None and len(ref.images) == 0:
        raise ValueError(f'The reference set {ref.source} is empty.')
    if ref.stats_feature_extractor not in (None, feature_extractor):
        raise ValueError(
            f'Reference statistics {ref.source} were made with {ref.stats_feature_extractor!r}, not '
            f'{feature_extractor!r}; recompute them with save_reference_stats or pick that extractor.'
        )
    if ref.images is not None:
        check_image_sizes(image_size(samples_ds), image_size(ref.images), ref.source)
    if ref.stats is not None and fid:  # before minutes of feature extraction
        check_stats_width(len(ref.stats.mu), feature_size(feature_extractor), ref.source)
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
    fidelity_kwargs = dict(cuda=resolve_cuda(cuda), verbose=verbose, cache=False, save_cpu_ram=True, **settings)
    with feature_extractor_kwargs(feature_extractor, inception_weights, allow_download) as (extractor_kwargs, about):
        metrics = _run(samples_ds, ref, feature_extractor, plan, {**fidelity_kwargs, **extractor_kwargs})

    return {
        'tool': 'torch-fidelity',
        'tool_version': torch_fidelity.__version__,
        'feature_extractor': feature_extractor,
        'feature_extractor_config': about,
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


def _run(samples: Dataset, ref: Reference, feature_extractor: str, plan: _Plan, kwargs: dict[str, Any]) -> dict:
    """torch-fidelity's metrics: `calculate_metrics` on both image sets, or per metric against `ref.stats`."""
    if not plan.layers:
        return {}
    if ref.stats is None:
        return torch_fidelity.calculate_metrics(
            input1=samples,
            input2=ref.images,
            feature_extractor=feature_extractor,
            **{m: m in plan.layers for m in METRICS},
            **{f'feature_layer_{m}': layer for m, layer in plan.layers.items()},
            **kwargs,
        )
    return _metrics_against_stats(samples, ref, feature_extractor, plan, kwargs)


def _metrics_against_stats(
    samples: Dataset, ref: Reference, feature_extractor: str, plan: _Plan, kwargs: dict[str, Any]
) -> dict[str, float]:
    """The torch-fidelity metric functions on features extracted once per set; FID against `ref.stats`."""
    extractor = create_feature_extractor(feature_extractor, sorted(set(plan.layers.values())), **kwargs)
    batch_size, cuda, verbose = kwargs['batch_size'], kwargs['cuda'], kwargs['verbose']
    sample_features = extract_with(samples, extractor, batch_size, cuda, verbose)
    ref_features = None
    if 'kid' in plan.layers or 'prc' in plan.layers:
        ref_features = extract_with(ref.images, extractor, batch_size, cuda, verbose)
    metrics: dict[str, float] = {}
    if 'isc' in plan.layers:  # torch-fidelity's own readers of its kwargs (splits, shuffle, seed, subsets...)
        metrics.update(isc_featuresdict_to_metric(sample_features, plan.layers['isc'], **kwargs))
    if 'fid' in plan.layers:
        metrics[KEY_METRIC_FID] = frechet_distance(feature_stats(sample_features[plan.layers['fid']]), ref.stats)
    if 'kid' in plan.layers:
        metrics.update(kid_featuresdict_to_metric(sample_features, ref_features, plan.layers['kid'], **kwargs))
    if 'prc' in plan.layers:
        metrics.update(prc_featuresdict_to_metric(sample_features, ref_features, plan.layers['prc'], **kwargs))
    return metrics
