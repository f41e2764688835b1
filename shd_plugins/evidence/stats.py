"""Paired statistics of the evidence: per-seed differences, a paired t-test, an exact sign test, Holm's correction.

Every variant of a (model, scale, heads, seed) cell is trained with the same seed, initialisation and data order,
so two variants are compared seed by seed: the differences cancel what the seeds share (the initialisation, the
batches) and leave what the variants change. Two tests are reported for each comparison: the paired t-test (its
p-value decides what "significant" means in the report) and the exact two-sided sign test, which assumes nothing
about the distribution of the differences but can never go below ``2 / 2**n`` (0.0625 with 5 seeds, 0.25 with 3).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ['ALPHA', 'format_p', 'sign_test', 'paired_t_test', 'holm', 'paired_comparison', 'comparison_sentence']

#: The significance level of every verdict.
ALPHA = 0.05


def sign_test(differences: Sequence[float]) -> float:
    """Exact two-sided sign test of "the median difference is 0"; zero differences (ties) are dropped.

    Returns:
        ``min(1, 2 * P(X <= min(wins, losses)))`` with ``X ~ Binomial(n, 1/2)``; 1.0 when every difference is 0.
    """
    wins = sum(d > 0 for d in differences)
    losses = sum(d < 0 for d in differences)
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2.0 * tail)


def paired_t_test(differences: Sequence[float]) -> tuple[float | None, float | None]:
    """Two-sided one-sample t-test of the paired differences against 0 (``scipy.stats.ttest_rel``'s statistic).

    Returns:
        ``(t, p)``; ``(None, None)`` with fewer than two differences. When all differences are equal the t statistic
        is infinite: p is 0 for a non-zero difference, 1 for identical runs (difference 0).
    """
    n = len(differences)
    if n < 2:
        return None, None
    mean = math.fsum(differences) / n
    var = math.fsum((d - mean) ** 2 for d in differences) / (n - 1)
    if var <= 1e-24 * max(1.0, mean * mean):
        return (math.copysign(math.inf, mean), 0.0) if mean != 0 else (0.0, 1.0)
    t = mean / math.sqrt(var / n)
    from scipy.stats import t as student_t  # local import: scipy is in the eval/demo extras, not the core

    return t, float(2.0 * student_t.sf(abs(t), n - 1))


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (family-wise error over every test given; None entries are skipped)."""
    order = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


def paired_comparison(variant: Mapping[int, float], baseline: Mapping[int, float], higher_is_better: bool) -> dict:
    """Compare two variants over the seeds both have: per-seed differences ``variant - baseline`` and both tests.

    Args:
        variant: ``{seed: metric}`` of the variant.
        baseline: ``{seed: metric}`` of the baseline.
        higher_is_better: Whether a larger metric is better (top-1) or worse (FID); sets ``better``/``worse``.

    Returns:
        ``seeds``, ``differences``, ``n``, ``mean``, ``std`` (sample, 0 for one seed), ``t``, ``p_t``, ``p_sign``,
        ``better`` / ``worse`` / ``ties`` (seeds where the variant was better, worse, equal).
    """
    seeds = sorted(set(variant) & set(baseline))
    diffs = [float(variant[s]) - float(baseline[s]) for s in seeds]
    n = len(diffs)
    mean = math.fsum(diffs) / n if n else math.nan
    std = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else 0.0
    t, p_t = paired_t_test(diffs)
    sign = 1 if higher_is_better else -1
    return {'seeds': seeds, 'differences': diffs, 'n': n, 'mean': mean, 'std': std, 't': t, 'p_t': p_t,
            'p_sign': sign_test(diffs) if n else None, 'better': sum(sign * d > 0 for d in diffs),
            'worse': sum(sign * d < 0 for d in diffs), 'ties': sum(d == 0 for d in diffs)}


def format_p(p: float | None, missing: str = 'n/a') -> str:
    """A p-value as the report prints it: 3 decimals, or 1 significant digit below 0.001; ``missing`` for None."""
    return missing if p is None else f'{p:.3f}' if p >= 0.001 else f'{p:.1e}'


def comparison_sentence(c: Mapping, variant: str, baseline: str, unit: str, higher_is_better: bool) -> str:
    """One honest sentence: what holds at p < 0.05 (and its direction), what does not.

    Args:
        c: A :func:`paired_comparison` result, optionally with ``p_holm``.
        variant: Display name of the variant.
        baseline: Display name of the baseline.
        unit: The metric's unit in words (``'top-1 points'``, ``'FID'``).
        higher_is_better: Direction of the metric.
    """
    n = c['n']
    if n == 0:
        return f'{variant} vs {baseline}: no seed has both runs, nothing to compare.'
    numbers = (f"difference {c['mean']:+.2f} ± {c['std']:.2f} {unit} over {n} seed(s), better on {c['better']}/{n}; "
               f"paired t-test p = {format_p(c['p_t'])}, sign test p = {format_p(c['p_sign'])}")
    if c.get('p_holm') is not None:
        numbers += f", Holm-adjusted p = {format_p(c['p_holm'])}"
    if c['p_t'] is None:
        return f'{variant} vs {baseline}: one seed, no test possible ({numbers}).'
    if c['p_t'] < ALPHA:
        direction = 'better' if (c['mean'] > 0) == higher_is_better else 'worse'
        caveats = []
        agree = c['better'] if direction == 'better' else c['worse']
        if agree < n:  # the sign test sits at its floor (2 / 2**n) only when every seed agrees
            caveats.append(f'only {agree} of {n} seeds go that way')
        if c.get('p_holm') is not None and c['p_holm'] >= ALPHA:
            caveats.append('it does not survive the Holm correction over all comparisons')
        tail = f"; but {' and '.join(caveats)}" if caveats else ''
        return f'{variant} is significantly {direction} than {baseline} (p < {ALPHA}; {numbers}){tail}.'
    if c['mean'] == 0:
        return f'No difference between {variant} and {baseline} ({numbers}).'
    lean = 'better' if (c['mean'] > 0) == higher_is_better else 'worse'
    return (f'No significant difference between {variant} and {baseline} at p < {ALPHA} ({numbers}); the mean '
            f'leans {lean}, within the seed noise.')
