"""The report half of the digits demo: results.json, REPORT.md and its figures from the finished runs.

Numbers come only from the files the evaluators write (``top1.json``, ``fid_results.json``), so the report shows
exactly what a user running the printed commands gets. Students are compared by their mean over seeds and judged
against the seed spread, never by one lucky run.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .figures import dit_squeeze_figure, sample_grid_figure, squeeze_figures
from .jobs import VARIANT_LABELS, VARIANTS, Job, Settings, display_command

__all__ = ['FID_KEYS', 'COMPARISONS', 'mean_and_spread', 'markdown_table', 'collect_runs', 'summarize',
           'compare_variants', 'render_markdown', 'write_report']

_logger = logging.getLogger(__name__)

#: results.json name -> key in ``eval/fid.py``'s ``fid_results.json`` metrics (torch-fidelity's names).
FID_KEYS = {'fid': 'frechet_inception_distance', 'kid': 'kernel_inception_distance_mean',
            'is': 'inception_score_mean', 'precision': 'precision', 'recall': 'recall'}
#: (variant, baseline) pairs the verdicts judge: KD + SHD against KD and against the paper's two ablations.
COMPARISONS = (('kd_shd', 'kd'), ('kd_shd', 'kd_mean'), ('kd_shd', 'kd_select'))


def mean_and_spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min, max and count."""
    array = np.asarray(values, dtype=np.float64)
    return {'mean': float(array.mean()), 'std': float(array.std(ddof=1)) if array.size > 1 else 0.0,
            'min': float(array.min()), 'max': float(array.max()), 'n': int(array.size)}


def markdown_table(header: Sequence[str], rows: list[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ['| ' + ' | '.join(map(str, header)) + ' |', '|' + '|'.join('---' for _ in header) + '|']
    lines += ['| ' + ' | '.join(map(str, row)) + ' |' for row in rows]
    return '\n'.join(lines)


def collect_runs(jobs: list[Job], seconds: dict[str, float]) -> list[dict]:
    """One record per training run: what it was, its command, compute and evaluation numbers."""
    records = []
    evals = {job.name.rsplit('/', 1)[0]: job for job in jobs if 'eval' in job.info}
    for job in jobs:
        if 'eval' in job.info:
            continue
        record = {**job.info, 'name': job.name, 'command': display_command(job.command),
                  'train_seconds': round(seconds[job.name], 1)}
        eval_job = evals[job.name]
        record['eval_command'] = display_command(eval_job.command)
        record['eval_seconds'] = round(seconds[eval_job.name], 1)
        if job.info['kind'] == 'vit':
            top1 = json.loads((eval_job.run_dir / 'top1.json').read_text())
            record.update(top1=top1['top1'], top5=top1['top5'], val_loss=top1['loss'],
                          num_val=top1['num_samples'])
        else:
            fid = json.loads((eval_job.run_dir / 'fid_results.json').read_text())
            record.update({name: fid['metrics'].get(key) for name, key in FID_KEYS.items()})
            record['fid_tool'] = f"{fid.get('tool', 'torch-fidelity')} {fid.get('tool_version', '')}".strip()
            record['num_samples'] = fid.get('num_samples')
            record['samples_grid'] = str(eval_job.run_dir / 'samples_grid.png')
            record['samples_npz'] = str(eval_job.run_dir / 'samples.npz')
        records.append(record)
    return records


def summarize(records: list[dict], kind: str, metric: str) -> dict[str, dict[str, dict]]:
    """``{heads: {variant: mean/std/min/max/n of metric, plus mean train seconds}}`` for the students."""
    groups = defaultdict(list)
    for r in records:
        if r['kind'] == kind and r['role'] == 'student' and r.get(metric) is not None:
            groups[(r['heads'], r['variant'])].append(r)
    summary: dict[str, dict[str, dict]] = defaultdict(dict)
    for (heads, variant), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], VARIANTS.index(kv[0][1]))):
        summary[str(heads)][variant] = {
            **mean_and_spread([r[metric] for r in runs]),
            'seeds': [r['seed'] for r in runs], 'values': [r[metric] for r in runs],
            'train_seconds_mean': float(np.mean([r['train_seconds'] for r in runs]))}
    return dict(summary)


def compare_variants(summary: dict[str, dict[str, dict]], higher_is_better: bool, metric: str) -> list[dict]:
    """KD + SHD against KD and against the two ablations, per head count, judged by the seed spread."""
    verdicts = []
    for heads, variants in summary.items():
        for variant, baseline in COMPARISONS:
            if variant not in variants or baseline not in variants:
                continue
            a, b = variants[variant], variants[baseline]
            gain = (a['mean'] - b['mean']) * (1 if higher_is_better else -1)
            spread = max(a['std'], b['std'])
            name, other = VARIANT_LABELS[variant], VARIANT_LABELS[baseline]
            if gain > 0 and (b['n'] < 2 or gain > 2 * spread):
                verdict = f'{name} beat {other}' + (' (one seed: no spread to judge by)' if b['n'] < 2 else
                                                     ' by more than twice the seed spread')
            elif gain > 0:
                verdict = f'{name} was better than {other} on average, but within twice the seed spread'
            else:
                verdict = f'{name} did not beat {other}'
            verdicts.append({'heads': int(heads), 'metric': metric, 'variant': variant, 'baseline': baseline,
                             'variant_mean': a['mean'], 'baseline_mean': b['mean'], 'gain': gain,
                             'seed_spread': spread, 'n_seeds': b['n'], 'verdict': verdict})
    return verdicts


def _fmt(stats: dict, digits: int = 2) -> str:
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _model_label(record: dict) -> str:
    return 'teacher (8 heads)' if record['role'] == 'teacher' else f"{record['heads']} heads"


def _header(results: dict) -> list[str]:
    s, counts = results['settings'], results['data']['counts']
    quick = ' --quick' if results['quick'] else ''
    return [
        '# SHD on digits: the embedded default', '',
        f"Generated {results['generated']} by `python recipes/digits_demo.py{quick}` "
        f"in {results['total_seconds'] / 60:.1f} min on {results['machine']}. Data: scikit-learn's digits as a "
        f"32x32 grayscale ImageFolder ({counts['train']} train / {counts['val']} val images). Teachers have 8 heads; "
        f"students {', '.join(map(str, s['heads']))}."
        + (' **Quick mode: tiny step counts, numbers are not meaningful.**' if results['quick'] else ''), '']


def _verdict_lines(results: dict) -> list[str]:
    lines = ['## Verdict', '']
    for v in results['verdicts']:
        unit = 'top-1 points' if v['metric'] == 'top1' else 'FID'
        lines.append(f"- {v['kind'].upper()}, {v['heads']} heads ({v['metric']}): {v['verdict']}: "
                     f"{v['variant_mean']:.2f} vs {v['baseline_mean']:.2f} (gain {v['gain']:+.2f} {unit}; largest "
                     f"seed std {v['seed_spread']:.2f}, {v['n_seeds']} seed(s)).")
    return lines


def _vit_table(results: dict) -> list[str]:
    teacher = [r for r in results['runs'] if r['kind'] == 'vit' and r['role'] == 'teacher'][0]
    rows = [['teacher (8 heads)', '-', f"{teacher['top1']:.2f}", '-', f"{teacher['train_seconds']:.0f}"]]
    for heads, variants in results['vit_summary'].items():
        for variant, st in variants.items():
            rows.append([f'{heads} heads', VARIANT_LABELS[variant], _fmt(st), f"{st['min']:.2f} - {st['max']:.2f}",
                         f"{st['train_seconds_mean']:.0f}"])
    seeds = len(results['settings']['vit_seeds'])
    header = ['model', 'variant', f'top-1 % (mean ± std over {seeds} seed(s))', 'min - max', 'train s / run']
    return ['## ViT students: top-1 on the validation split (eval/top1.py)', '', markdown_table(header, rows), '']


def _dit_table(results: dict) -> list[str]:
    s = results['settings']
    rows = []
    for r in [r for r in results['runs'] if r['kind'] == 'dit']:
        rows.append([_model_label(r), '-' if r['role'] == 'teacher' else VARIANT_LABELS[r['variant']],
                     f"{r['fid']:.3f}", f"{r['kid']:.4f}" if r['kid'] is not None else '-',
                     f"{r['is']:.2f}" if r['is'] else '-', f"{r['train_seconds']:.0f}"])
    return ["## DiT students: FID against the validation images with the digits classifier's features "
            '(eval/fid.py)', '',
            f"{s['fid_samples']} samples per model, DDIM {s['fid_steps']} steps, guidance 1.5; features: the ViT "
            "teacher's pre-logits (torch-fidelity with a registered timm extractor; IS from its logits). Lower "
            'FID/KID is better. One seed per DiT.', '',
            markdown_table(['model', 'variant', 'FID', 'KID', 'IS', 'train s'], rows), '']


def _figure_lines(results: dict, out: Path) -> list[str]:
    def rel(path: str | None) -> str:
        return str(Path(path).relative_to(out)) if path else ''

    f = results['figures']
    lines = ['## What the squeeze does', '',
             'Teacher heads (top), the closed-form squeezed maps that supervise each student head (middle), and the '
             "KD + SHD student's maps (bottom), for one sample and the last distilled layer (as the paper's "
             'Figure 1).', '']
    lines += [f'![{key}]({rel(f[key])})' for key in ('vit_squeeze', 'dit_squeeze') if f.get(key)]
    lines += ['', '## Where the merge weights land', '',
              "Distribution of the closed-form alpha per distilled layer (as the paper's Figure 3); 0.5 is what "
              'mean-merge uses, 1 is head-select.', '']
    if f.get('alpha_figure'):
        lines.append(f"![alphas]({rel(f['alpha_figure'])})")
    alpha_rows = [[k, f"{v['mean']:.3f}", f"{v['std']:.3f}", f"{v['min']:.3f}", f"{v['max']:.3f}"]
                  for k, v in results['alpha_stats'].items()]
    lines += ['', markdown_table(['layer', 'mean alpha', 'std', 'min', 'max'], alpha_rows), '', '## DiT samples', '']
    if f.get('dit_samples'):
        lines.append(f"![samples]({rel(f['dit_samples'])})")
    return lines


def render_markdown(results: dict, out: Path) -> str:
    """REPORT.md from ``results.json``'s content; figure paths are written relative to ``out``."""
    lines = _header(results) + _verdict_lines(results) + [''] + _vit_table(results) + _dit_table(results)
    lines += _figure_lines(results, out)
    lines += ['', '## Commands', '', 'Each run is the recipe or evaluator a user runs at scale, with the same flags '
              "(paths are this machine's):", '', '```']
    for r in results['runs']:
        lines += [r['command'], r['eval_command']]
    lines += ['```', '', 'All numbers are in `results.json`.']
    return '\n'.join(lines) + '\n'


def write_report(out: Path, jobs: list[Job], seconds: dict[str, float], settings: Settings, *, quick: bool,
                 total_seconds: float) -> Path:
    """Collect the finished runs of ``jobs``, draw the figures, write ``results.json`` and ``REPORT.md``.

    Returns:
        The path of ``REPORT.md``.
    """
    figures = out / 'figures'
    figures.mkdir(parents=True, exist_ok=True)
    records = collect_runs(jobs, seconds)
    vit_summary = summarize(records, 'vit', 'top1')
    dit_summary = summarize(records, 'dit', 'fid')
    verdicts = ([{'kind': 'vit', **v} for v in compare_variants(vit_summary, True, 'top1')]
                + [{'kind': 'dit', **v} for v in compare_variants(dit_summary, False, 'fid')])
    squeeze = squeeze_figures(out, figures, min(settings.heads), settings.vit_seeds[0])
    figure_paths = {'vit_squeeze': squeeze.get('squeeze_figure'), 'alpha_figure': squeeze.get('alpha_figure'),
                    'dit_squeeze': dit_squeeze_figure(out, figures, min(settings.heads)),
                    'dit_samples': sample_grid_figure(records, figures)}
    data_meta = json.loads((out / 'data' / 'digits_meta.json').read_text())
    results = {
        'generated': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), 'quick': quick,
        'machine': f'{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}',
        'total_seconds': round(total_seconds, 1), 'settings': asdict(settings),
        'data': {'root': str(out / 'data'), 'counts': data_meta['counts']},
        'runs': records, 'vit_summary': vit_summary, 'dit_summary': dit_summary, 'verdicts': verdicts,
        'alpha_stats': {name: mean_and_spread(alphas.ravel().tolist()) for name, alphas in squeeze['alphas'].items()},
        'figures': figure_paths,
    }
    (out / 'results.json').write_text(json.dumps(results, indent=2))
    report = out / 'REPORT.md'
    report.write_text(render_markdown(results, out))
    _logger.info('wrote %s and %s', out / 'results.json', report)
    return report
