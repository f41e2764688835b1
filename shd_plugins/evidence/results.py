"""The numbers of the evidence, read from what the recipes and evaluators wrote, and their paired comparisons.

A ViT's top-1 is the last row of the recipe's ``summary.csv`` (its validation of the last epoch); a DiT's FID is
``eval/fid.py``'s ``fid_results.json``; a DiT's training losses come from the recipe's ``train_log.jsonl``. Every
comparison pairs the two variants seed by seed within one (model, token scale, heads) cell.
"""
from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..demo.jobs import VARIANT_LABELS, Job, display_command
from ..demo.report import FID_KEYS, mean_and_spread
from .plan import identical_groupings
from .stats import comparison_sentence, holm, paired_comparison

__all__ = ['COMPARISONS', 'variant_label', 'collect_records', 'collect_top1_checks',
           'cell_summaries', 'compare_all', 'kd_investigation']

#: (variant, baseline) pairs, in the order of issue 13: SHD against the baselines and ablations, then its options.
COMPARISONS = (
    ('kd_shd', 'kd'), ('kd_shd', 'none'), ('kd_shd', 'kd_mean'), ('kd_shd', 'kd_select'),
    ('kd_shd_per_row', 'kd_shd'), ('kd_shd_balanced', 'kd_shd'), ('kd_shd_mse', 'kd_shd'), ('kd_shd', 'feature'),
    ('kd', 'none'), ('feature', 'none'),
)
_METRIC = {'vit': ('top1', True, 'top-1 points'), 'dit': ('fid', False, 'FID')}
_TAIL_FRACTION = 0.1  # training losses: mean over the last 10% of steps


def variant_label(variant: str) -> str:
    """Display name of a variant, including the investigation's ``kd_w<weight>``."""
    if variant in VARIANT_LABELS:
        return VARIANT_LABELS[variant]
    if variant.startswith('kd_w'):
        return f'KD with output-KD weight {variant[4:]}'
    return variant


def _last_validation(run_dir: Path) -> dict[str, float]:
    """The last row of the timm recipe's ``summary.csv``: the validation of the last epoch."""
    with open(run_dir / 'summary.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f'{run_dir / "summary.csv"} has no epoch: the run did not finish an epoch.')
    last = rows[-1]
    return {'top1': float(last['eval_top1']), 'val_loss': float(last['eval_loss']), 'epochs_done': len(rows),
            'train_loss': float(last['train_loss'])}


def _dit_losses(run_dir: Path) -> dict[str, float]:
    """Mean training losses over the last 10% of steps of ``train_log.jsonl`` (diffusion, output KD, SHD)."""
    path = run_dir / 'train_log.jsonl'
    if not path.is_file():
        return {}
    steps = [row for row in map(json.loads, path.read_text().splitlines()) if 'step' in row and 'loss' in row]
    tail = steps[-max(1, int(len(steps) * _TAIL_FRACTION)):]
    keys = ('diffusion_loss', 'mse', 'output_kd_loss', 'shd_loss')
    return {f'final_{k}': sum(r[k] for r in tail) / len(tail) for k in keys if tail and all(k in r for r in tail)}


def collect_records(jobs: Sequence[Job], seconds: Mapping[str, float]) -> list[dict]:
    """One record per training run: what it was, its command, wall seconds, metric (and its evaluation's)."""
    evals = {job.name.rsplit('/', 1)[0]: job for job in jobs if job.info.get('eval') == 'fid'}
    unguided: dict[str, list[Job]] = defaultdict(list)
    for job in jobs:
        if str(job.info.get('eval', '')).startswith('fid_g'):
            unguided[job.name.rsplit('/', 1)[0]].append(job)
    records = []
    for job in jobs:
        if job.info.get('role') == 'reference' and job.name in seconds:
            fid = json.loads((job.run_dir / 'fid_results.json').read_text())
            records.append({**job.info, 'name': job.name, 'command': display_command(job.command), 'train_seconds': 0.0,
                            'eval_seconds': round(seconds[job.name], 1), 'num_samples': fid.get('num_samples'),
                            **{name: fid['metrics'].get(key) for name, key in FID_KEYS.items()}})
        if 'eval' in job.info or job.name not in seconds:
            continue
        record = {**job.info, 'name': job.name, 'command': display_command(job.command),
                  'train_seconds': round(seconds[job.name], 1)}
        if job.info['kind'] == 'vit':
            record.update(_last_validation(job.run_dir))
        else:
            record.update(_dit_losses(job.run_dir))
            fid_job = evals.get(job.name)
            if fid_job is None or fid_job.name not in seconds:
                continue
            fid = json.loads((fid_job.run_dir / 'fid_results.json').read_text())
            record.update({name: fid['metrics'].get(key) for name, key in FID_KEYS.items()})
            record.update(eval_command=display_command(fid_job.command), eval_seconds=round(seconds[fid_job.name], 1),
                          num_samples=fid.get('num_samples'))
            for other in unguided.get(job.name, []):
                if other.name in seconds:
                    metrics = json.loads((other.run_dir / 'fid_results.json').read_text())['metrics']
                    record[f"{other.info['eval']}_fid"] = metrics.get(FID_KEYS['fid'])
                    record['eval_seconds'] += round(seconds[other.name], 1)
                    record['eval_command'] += '\n' + display_command(other.command)
        records.append(record)
    return records


def collect_top1_checks(jobs: Sequence[Job], seconds: Mapping[str, float], records: Sequence[dict]) -> list[dict]:
    """``eval/top1.py`` on ``last.pth.tar`` next to the recipe's own last validation, for the checked runs."""
    by_name = {r['name']: r for r in records}
    checks = []
    for job in jobs:
        if job.info.get('eval') != 'top1' or job.name not in seconds:
            continue
        run = by_name.get(job.name.rsplit('/', 1)[0])
        evaluated = json.loads((job.run_dir / 'top1.json').read_text())
        if run is None:
            continue
        checks.append({'name': run['name'], 'recipe_top1': run['top1'], 'evaluator_top1': evaluated['top1'],
                       'num_samples': evaluated['num_samples'], 'agree': abs(run['top1'] - evaluated['top1']) < 0.01,
                       'command': display_command(job.command), 'seconds': round(seconds[job.name], 1)})
    return checks


def _cell_key(r: Mapping) -> str:
    return f"{r['kind']}{r['tokens']}/h{r['heads']}"


def cell_summaries(records: Sequence[dict]) -> dict[str, dict[str, dict]]:
    """``{'vit16/h2': {variant: {per_seed: {seed: metric}, mean, std, ..., train_seconds_mean}}}`` of the students."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:
        metric = _METRIC[r['kind']][0]
        if r['role'] == 'student' and r.get(metric) is not None:
            groups[(_cell_key(r), r['variant'])].append(r)
    summary: dict[str, dict[str, dict]] = defaultdict(dict)
    for (cell, variant), runs in groups.items():
        metric = _METRIC[runs[0]['kind']][0]
        summary[cell][variant] = {
            **mean_and_spread([r[metric] for r in runs]),
            'metric': metric, 'per_seed': {int(r['seed']): r[metric] for r in sorted(runs, key=lambda r: r['seed'])},
            'train_seconds_mean': sum(r['train_seconds'] for r in runs) / len(runs)}
    return dict(summary)


def _compare(summary: Mapping[str, Mapping[str, dict]], pairs: Sequence[tuple[str, str]],
             planned: Mapping[str, Sequence[str]] | None = None) -> list[dict]:
    """Paired comparisons of ``pairs`` in every cell; ``planned`` (``{kind: variants}``) says which variants were asked
    for, so an untrained balanced-grouping variant is reported as identical only where it was asked for."""
    comparisons = []
    for cell, variants in summary.items():
        kind_tokens, heads = cell.split('/h')
        kind = kind_tokens.rstrip('0123456789')
        _, higher, unit = _METRIC[kind]
        for variant, baseline in pairs:
            entry = {'cell': cell, 'kind': kind, 'tokens': int(kind_tokens[len(kind):]), 'heads': int(heads),
                     'variant': variant, 'baseline': baseline, 'unit': unit, 'higher_is_better': higher}
            if (variant == 'kd_shd_balanced' and int(heads) in identical_groupings([int(heads)])
                    and baseline in variants and variant in (planned or {}).get(kind, ())):
                schedule = identical_groupings([int(heads)])[int(heads)]
                entry.update(identical=True, differences=[], sentence=(
                    f'{variant_label(variant)} vs {variant_label(baseline)}: for 8 -> {heads} heads balanced and '
                    f'progressive grouping build the same merge schedule {schedule}, so the runs would be identical '
                    '(the same seed gives the same run): not trained twice, difference 0 by construction.'))
                comparisons.append(entry)
                continue
            if variant not in variants or baseline not in variants:
                continue
            entry.update(paired_comparison(variants[variant]['per_seed'], variants[baseline]['per_seed'], higher))
            comparisons.append(entry)
    return comparisons


def compare_all(summary: Mapping[str, Mapping[str, dict]], planned: Mapping[str, Sequence[str]]) -> list[dict]:
    """Every comparison of ``COMPARISONS`` in every cell, with Holm-adjusted p-values over all of them and one
    sentence each (the sentence of an identical-schedule comparison says why it was not trained).

    Args:
        summary: :func:`cell_summaries` of the runs.
        planned: ``{'vit': variants, 'dit': variants}`` asked for (``EvidenceSettings``).
    """
    main = {cell: {v: s for v, s in variants.items() if not v.startswith('kd_w')} for cell, variants in summary.items()}
    comparisons = _compare(main, COMPARISONS, planned)
    tested = [c for c in comparisons if c.get('p_t') is not None]
    for c, p in zip(tested, holm([c['p_t'] for c in tested])):
        c['p_holm'] = p
    for c in comparisons:
        if 'sentence' not in c:
            c['sentence'] = comparison_sentence(c, variant_label(c['variant']), variant_label(c['baseline']),
                                                c['unit'], c['higher_is_better'])
    return comparisons


def kd_investigation(records: Sequence[dict], summary: Mapping[str, Mapping[str, dict]],
                     comparisons: Sequence[dict]) -> dict:
    """Point 4 of issue 13: does the DiT's KD baseline hurt over seeds, and what the targeted runs say about why.

    Returns:
        ``kd_vs_none`` (the comparisons), ``teacher`` (the DiT teacher's FID and training steps), ``weights``
        (comparisons of each ``kd_w<weight>`` run with KD and with no distillation), ``losses`` (mean final
        training losses per cell and variant) and ``findings`` (sentences generated from those numbers).
    """
    kd_vs_none = [c for c in comparisons if c['kind'] == 'dit' and (c['variant'], c['baseline']) == ('kd', 'none')]
    teacher = next((r for r in records if r['kind'] == 'dit' and r['role'] == 'teacher'), None)
    floor = next((r for r in records if r['role'] == 'reference'), None)
    weights, losses, findings = [], {}, []
    for cell, variants in summary.items():
        if not cell.startswith('dit'):
            continue
        for variant in (v for v in variants if v.startswith('kd_w')):
            pairs = [(variant, 'kd'), (variant, 'none')]
            for c in _compare({cell: variants}, pairs):
                c['sentence'] = comparison_sentence(c, variant_label(c['variant']), variant_label(c['baseline']),
                                                    c['unit'], False)
                weights.append(c)
        runs = [r for r in records if r['kind'] == 'dit' and r['role'] == 'student' and _cell_key(r) == cell]
        for variant in variants:
            mine = [r for r in runs if r['variant'] == variant and 'final_mse' in r]
            if mine:
                losses.setdefault(cell, {})[variant] = {
                    key: sum(r[key] for r in mine) / len(mine) for key in mine[0] if key.startswith('final_')}
    for c in kd_vs_none:
        findings.append(f"{c['heads']} heads: {c['sentence']}")
    if not kd_vs_none:
        findings.append('KD against no distillation was not measured in this run (it needs both DiT variants).')
    if floor is not None:
        findings.append(f"With these features the training digits themselves have FID {floor['fid']:.2f} against the "
                        f"validation digits ({floor['num_samples']} images): the floor a perfect generator reaches.")
    if teacher is not None and teacher.get('fid') is not None:
        findings.append(f"The DiT teacher ({teacher['steps']} steps) has FID {teacher['fid']:.2f} (sampling seed 0).")
        for cell, variants in summary.items():
            if cell.startswith('dit') and 'none' in variants:
                none = variants['none']
                relation = 'worse (higher)' if teacher['fid'] > none['mean'] else 'better (lower)'
                findings.append(
                    f"The teacher's FID is {relation} than that of the {cell.split('/h')[1]}-head students trained "
                    f"without a teacher ({none['mean']:.2f} ± {none['std']:.2f} over {none['n']} seeds).")
    for cell, by_variant in losses.items():
        if 'kd' in by_variant and 'none' in by_variant and 'final_mse' in by_variant['kd']:
            kd, none = by_variant['kd']['final_mse'], by_variant['none']['final_mse']
            findings.append(
                f"{cell}: the final noise-prediction MSE on the training batches (last {_TAIL_FRACTION:.0%} of steps, "
                f"mean over seeds) is {kd:.4f} with KD vs {none:.4f} without ({'higher' if kd > none else 'lower'} "
                f"with KD; {math.fabs(kd - none) / none:.1%} apart)"
                + (f"; the KD students' output-KD MSE to the teacher ends at "
                   f"{by_variant['kd']['final_output_kd_loss']:.4f}" if 'final_output_kd_loss' in by_variant['kd']
                   else '') + '.')
    findings += [f"{c['cell']}: {c['sentence']}" for c in weights]
    for cell in (c for c in summary if c.startswith('dit')):
        runs = [r for r in records if r['kind'] == 'dit' and r['role'] == 'student' and _cell_key(r) == cell]
        by_variant = {v: [r for r in runs if r['variant'] == v] for v in ('none', 'kd')}
        if not all(by_variant.values()):
            continue
        shape = {v: {k: sum(r[k] for r in rs) / len(rs) for k in ('precision', 'recall', 'is')
                     if all(r.get(k) is not None for r in rs)} for v, rs in by_variant.items()}
        if all(len(m) == 3 for m in shape.values()):
            findings.append(f"{cell}: precision / recall / IS (means over seeds) are "
                            f"{shape['kd']['precision']:.3f} / {shape['kd']['recall']:.3f} / {shape['kd']['is']:.2f} "
                            f"with KD and {shape['none']['precision']:.3f} / {shape['none']['recall']:.3f} / "
                            f"{shape['none']['is']:.2f} without.")
        unguided = {v: {int(r['seed']): r['fid_g1_fid'] for r in rs if r.get('fid_g1_fid') is not None}
                    for v, rs in by_variant.items()}
        if unguided['kd'] and unguided['none']:
            c = paired_comparison(unguided['kd'], unguided['none'], higher_is_better=False)
            findings.append(f'{cell}, sampled without guidance (scale 1): '
                            + comparison_sentence(c, 'KD', 'no distillation', 'FID', False))
    return {'kd_vs_none': kd_vs_none, 'teacher': teacher, 'real_data_fid': floor, 'weights': weights, 'losses': losses,
            'findings': findings}
