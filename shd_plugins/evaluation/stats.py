"""FID statistics (feature mean and covariance) and the Frechet distance, both computed by torch-fidelity.

Kept apart from the extractors and the reference loaders so that precomputed statistics (ADM's reference batches,
`save_reference_stats` files) and freshly extracted features go through the same two torch-fidelity functions.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

__all__ = ['FeatureStats', 'feature_stats', 'frechet_distance']


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
