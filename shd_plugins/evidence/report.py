"""EVIDENCE.md, results.json and the paired-difference figures of ``make evidence``.

Everything the report says is generated from the finished runs: the per-seed tables, one sentence per comparison,
the compute of every run, the planned-vs-measured budget and every command. Nothing is tuned or edited after the
fact; quick-mode reports say in their first line that their numbers mean nothing.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from ..demo.report import markdown_table
from .figures import paired_difference_figure
from .plan import UNIT_SECONDS, EvidenceSettings, estimate_seconds, identical_groupings
from .results import (
    cell_summaries,
    collect_records,
    collect_top1_checks,
    compare_all,
    kd_investigation,
    variant_label,
)
from .stats import ALPHA, format_p

__all__ = ['measured_compute', 'render_markdown', 'write_evidence']

_logger = logging.getLogger(__name__)
_SHORT = {'none': 'none', 'kd': 'KD', 'kd_shd': 'KD+SHD', 'kd_mean': 'KD+mean', 'kd_select': 'KD+select',
          'kd_shd_per_row': 'SHD per-row', 'kd_shd_balanced': 'SHD balanced', 'kd_shd_mse': 'SHD MSE',
          'feature': 'feature'}


def measured_compute(records: Sequence[Mapping], checks: Sequence[Mapping]) -> dict[str, float]:
    """Wall seconds spent per job kind (the same keys as :func:`~shd_plugins.evidence.plan.estimate_seconds`)."""
    return {'vit': sum(r['train_seconds'] for r in records if r['kind'] == 'vit'),
            'top1': sum(c['seconds'] for c in checks),
            'dit': sum(r['train_seconds'] for r in records if r['kind'] == 'dit'),
            'fid': sum(r.get('eval_seconds', 0.0) for r in records if r['kind'] == 'dit'),
            'total': sum(r['train_seconds'] + r.get('eval_seconds', 0.0) for r in records)
            + sum(c['seconds'] for c in checks)}


def _cell_title(cell: str) -> str:
    kind_tokens, heads = cell.split('/h')
    kind = 'ViT' if kind_tokens.startswith('vit') else 'DiT'
    return f'{kind}, {kind_tokens[3:]} tokens, 8 -> {heads} heads'


def _header(r: Mapping) -> list[str]:
    s = r['settings']
    quick = ' QUICK=1' if r['quick'] else ''
    lines = ['# Evidence: SHD on digits, paired over seeds', '']
    if r['quick']:
        lines += ['**Quick mode: a plumbing check with tiny step counts; the numbers mean nothing.**', '']
    lines += [
        f"Generated {r['generated']} by `make evidence{quick}` (`{r['command_line']}`) in "
        f"{r['total_seconds'] / 60:.1f} min on {r['machine']}, {r['workers']} runs at a time with one thread each. "
        f"Data: scikit-learn's digits ({r['data']['counts']['train']} train / {r['data']['counts']['val']} val "
        'images), 32x32 for the ViTs, 8x8 for the DiTs.', '',
        '## Design', '',
        f"- **Paired by design.** Every variant of a (model, token scale, heads, seed) cell is trained with the same "
        f"`--seed` (the same initialisation and data order) and the same hyperparameters; ViT seeds "
        f"{list(s['vit_seeds'])}, DiT seeds {list(s['dit_seeds'])}, students with {list(s['heads'])} heads, "
        'teachers with 8.',
        "- **Hyperparameters chosen once, on KD** (the demo's: `recipes/configs/digits_vit.yaml`, KD temperature 4, "
        f"SHD weight {s['vit_shd_weight']} for the ViT, {s['dit_shd_weight']} for the DiT, output-KD weight 1, "
        f"DiT learning rate {s['dit_lr']}), shared by every variant; nothing here was tuned toward SHD. The MSE map "
        "loss keeps the KL weight (so its scale differs), feature alignment is timm's `FeatureDistillationTask` "
        'with its default weights (task 1, distillation 1) and its linear projector (student width -> teacher width).',
        f"- **ViT** (`recipes/train_timm.py`): {', '.join(str(t) for t in s['vit_tokens'])} tokens (8x8 / 4x4 "
        f"patches); teachers {s['vit_teacher_epochs']} epochs, students "
        f"{', '.join(f'{e} epochs at {t} tokens' for t, e in s['vit_student_epochs'].items())}. **Metric: top-1 of "
        "the last epoch** on the validation split (the recipe's own validation, `summary.csv`), never the best "
        'epoch, which would select on the reported split.',
        f"- **DiT** (`recipes/train_dit.py`, pixel space, 16 tokens): teacher {s['dit_teacher_steps']} steps, "
        f"students {s['dit_student_steps']} steps. **Metric: FID** (`eval/fid.py`, {s['fid_samples']} samples, DDIM "
        f"{s['fid_steps']} steps, guidance 1.5, sampling seed = training seed) against the {r['data']['counts']['val']}"
        " validation digits with the 16-token ViT teacher's pre-logit features. Lower is better.",
        f"- **Tests.** Per comparison: the per-seed differences, their mean and sample std, a two-sided paired t-test "
        f"(decides \"significant\", p < {ALPHA}), the exact two-sided sign test (its floor is 0.0625 with 5 seeds, "
        '0.25 with 3: it can never be significant there, it is shown as a distribution-free check of the direction) '
        f"and Holm's adjustment over all {r['num_tests']} tests (with that many tests at p < 0.05, about "
        f"{0.05 * r['num_tests']:.1f} false positives are expected if nothing differs).", '']
    for heads, schedule in r['identical_groupings'].items():
        lines.append(f'- **Balanced grouping at 8 -> {heads} heads is progressive grouping** (both build the merge '
                     f'schedule {schedule}): its runs would repeat the KD + SHD runs exactly, so they are not '
                     'trained; the report says so where the comparison would be.')
    return lines + ['']


def _verdicts(r: Mapping) -> list[str]:
    lines = ['## Verdicts, one sentence per comparison', '']
    for cell in dict.fromkeys(c['cell'] for c in r['comparisons']):
        lines += [f'### {_cell_title(cell)}', '']
        lines += [f"- {c['sentence']}" for c in r['comparisons'] if c['cell'] == cell]
        lines.append('')
    return lines


def _comparison_table(r: Mapping) -> list[str]:
    rows = []
    for c in r['comparisons']:
        if c.get('identical'):
            rows.append([_cell_title(c['cell']), f"{_SHORT[c['variant']]} - {_SHORT[c['baseline']]}", 'identical',
                         '0 (same run)', '-', '-', '-', '-'])
            continue
        rows.append([_cell_title(c['cell']), f"{_SHORT[c['variant']]} - {_SHORT[c['baseline']]}",
                     ' '.join(f'{d:+.2f}' for d in c['differences']), f"{c['mean']:+.2f} ± {c['std']:.2f}",
                     f"{c['better']}/{c['n']}", format_p(c['p_t'], '-'), format_p(c['p_sign'], '-'),
                     format_p(c.get('p_holm'), '-')])
    header = ['cell', 'difference', 'per seed', 'mean ± std', 'better', 'p (t)', 'p (sign)', 'p (Holm)']
    return ['## Paired differences', '',
            'Differences are variant minus baseline in the metric (top-1 points: positive is better; FID: negative is '
            'better), seed by seed in the order of the seeds. "better" counts the seeds where the variant won.', '',
            markdown_table(header, rows), '']


def _per_seed_tables(r: Mapping) -> list[str]:
    lines = ['## Per-seed results', '']
    for cell, variants in r['summary'].items():
        seeds = sorted({int(s) for v in variants.values() for s in v['per_seed']})
        metric = next(iter(variants.values()))['metric']
        per_seed = {v: {int(s): x for s, x in st['per_seed'].items()} for v, st in variants.items()}
        rows = [[variant_label(v), *[f'{per_seed[v][s]:.2f}' if s in per_seed[v] else '-' for s in seeds],
                 f"{st['mean']:.2f} ± {st['std']:.2f}", f"{st['train_seconds_mean']:.0f}"]
                for v, st in variants.items()]
        name = 'top-1 %' if metric == 'top1' else 'FID'
        lines += [f'### {_cell_title(cell)} ({name})', '',
                  markdown_table(['variant', *[f'seed {s}' for s in seeds], 'mean ± std', 'train s / run'], rows), '']
    teachers = [t for t in r['runs'] if t['role'] == 'teacher']
    rows = [[f"{'ViT' if t['kind'] == 'vit' else 'DiT'}, {t['tokens']} tokens",
             f"{t['top1']:.2f} top-1" if t['kind'] == 'vit' else f"{t['fid']:.2f} FID" if t.get('fid') else '-',
             f"{t['train_seconds']:.0f}"] for t in teachers]
    return lines + ['### Teachers (8 heads)', '', markdown_table(['teacher', 'metric', 'train s'], rows), '']


def _investigation(r: Mapping) -> list[str]:
    inv = r['kd_investigation']
    lines = ['## Point 4: the DiT KD baseline', '',
             'In the demo (one seed) output KD made the DiT students worse than no distillation. Here: the same '
             "comparison over seeds, the teacher itself measured with the same FID, the students' final training "
             'losses (`train_log.jsonl`), and a targeted run with a smaller output-KD weight.', '']
    lines += [f'- {f}' for f in inv['findings']]
    return lines + ['']


def _checks_and_compute(r: Mapping) -> list[str]:
    lines = ["## eval/top1.py agrees with the recipe's last validation", '']
    rows = [[c['name'], f"{c['recipe_top1']:.4f}", f"{c['evaluator_top1']:.4f}", 'yes' if c['agree'] else '**NO**']
            for c in r['top1_checks']]
    lines += [markdown_table(['run', 'recipe (summary.csv, last epoch)', 'eval/top1.py (last.pth.tar)', 'agree'],
                             rows), '']
    planned, measured = r['compute']['planned'], r['compute']['measured']
    rows = [[k, f'{planned[k]:.0f}', f'{measured[k]:.0f}'] for k in ('vit', 'top1', 'dit', 'fid', 'total')]
    lines += ['## Compute', '',
              f"Core-seconds (one thread per run) planned from the unit costs measured before the run "
              f"(`shd_plugins/evidence/plan.py` `UNIT_SECONDS`) and measured (wall seconds of each run, from the "
              f"scheduler). Planned wall time: {planned['total'] / r['workers'] / 60:.1f} min at {r['workers']} runs "
              f"at a time; measured: {r['total_seconds'] / 60:.1f} min (the wall time of the invocations that ran "
              'jobs, summed over resumptions).', '', markdown_table(['jobs', 'planned s', 'measured s'], rows), '',
              'The plan: core-seconds = (start-up + epochs x s/epoch, steps x s/step, samples x DDIM steps x s) x the '
              'slow-down of two runs side by side, summed over runs; the unit costs were measured on this machine '
              'with little else running:', '',
              markdown_table(['unit', 's'], [[k, f'{v:g}'] for k, v in r['compute']['unit_seconds'].items()]), '',
              "To fit about an hour with 5 ViT and 3 DiT seeds, the runs are shorter than the demo's (ViT students "
              '12 epochs, DiT students 1000 steps, FID 500 samples x 50 DDIM steps there): see the design section for '
              'the sizes used here. Shorter training leaves students further from convergence, where distillation '
              'usually matters more than at the end; the verdicts hold for these sizes only.', '',
              'Wall seconds of every training run (evaluation seconds in `results.json`):', '']
    rows = [[run['name'], f"{run['train_seconds']:.0f}", f"{run.get('eval_seconds', 0):.0f}"] for run in r['runs']]
    lines += ['<details><summary>per run</summary>', '', markdown_table(['run', 'train s', 'eval s'], rows), '',
              '</details>', '']
    return lines


def _figures_and_commands(r: Mapping, out: Path) -> list[str]:
    lines = ['## Figures', '']
    for key, path in r['figures'].items():
        if path:
            lines += [f'![{key}]({Path(path).relative_to(out)})', '']
    lines += ['## Commands', '', 'Every run is a recipe or evaluator a user runs at scale, with the same flags '
              "(paths are this machine's):", '', '<details><summary>all commands</summary>', '', '```']
    for run in r['runs']:
        lines.append(run['command'])
        if run.get('eval_command'):
            lines.append(run['eval_command'])
    lines += [c['command'] for c in r['top1_checks']]
    return lines + ['```', '', '</details>', '', 'All numbers are in `results.json`.']


def _closing(r: Mapping) -> list[str]:
    tested = [c for c in r['comparisons'] if c.get('p_t') is not None]
    significant = [c for c in tested if c['p_t'] < ALPHA]
    holm_ok = [c for c in tested if c.get('p_holm') is not None and c['p_holm'] < ALPHA]
    lines = ['## Closing note (generated from the numbers above)', '',
             f"{len(significant)} of {len(tested)} paired comparisons are significant at p < {ALPHA} (t-test), "
             f"{len(holm_ok)} after Holm's correction. For the main question, KD + SHD against KD:", '']
    for c in (c for c in r['comparisons'] if (c['variant'], c['baseline']) == ('kd_shd', 'kd')):
        lines.append(f"- {_cell_title(c['cell'])}: {c['sentence']}")
    return lines + ['']


def render_markdown(results: Mapping, out: Path) -> str:
    """EVIDENCE.md from ``results.json``'s content; figure paths are written relative to ``out``."""
    lines = (_header(results) + _closing(results) + _verdicts(results) + _comparison_table(results)
             + _per_seed_tables(results) + _investigation(results) + _checks_and_compute(results)
             + _figures_and_commands(results, out))
    return '\n'.join(lines) + '\n'


def _figures(out: Path, comparisons: Sequence[dict]) -> dict[str, str | None]:
    paths = {}
    for kind_tokens in dict.fromkeys(c['cell'].split('/h')[0] for c in comparisons):
        mine = [c for c in comparisons if c['cell'].startswith(kind_tokens + '/')]
        vit = kind_tokens.startswith('vit')
        path = paired_difference_figure(
            mine, out / 'figures' / f'paired_{kind_tokens}.png', unit='top-1 points' if vit else 'FID lower by',
            higher_is_better=vit, labels=_SHORT,
            title=f"{'ViT' if vit else 'DiT'}, {kind_tokens[3:]} tokens: paired differences per seed")
        paths[f'paired_{kind_tokens}'] = str(path) if path else None
    return paths


def write_evidence(out: Path, jobs: list, seconds: Mapping[str, float], settings: EvidenceSettings, *, quick: bool,
                   total_seconds: float, workers: int, command_line: str) -> Path:
    """Collect the finished runs of ``jobs``, test every comparison, draw the figures, write results.json and
    EVIDENCE.md into ``out``.

    Returns:
        The path of EVIDENCE.md.
    """
    records = collect_records(jobs, seconds)
    checks = collect_top1_checks(jobs, seconds, records)
    summary = cell_summaries(records)
    comparisons = compare_all(summary, {'vit': settings.vit_variants, 'dit': settings.dit_variants})
    data_meta = json.loads((out / 'data' / 'digits_meta.json').read_text())
    results = {
        'generated': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), 'quick': quick,
        'command_line': command_line, 'workers': workers,
        'machine': f'{platform.machine()}, {os.cpu_count()} CPU cores',
        'total_seconds': round(total_seconds, 1), 'settings': asdict(settings),
        'data': {'root': str(out / 'data'), 'counts': data_meta['counts']},
        'identical_groupings': {str(h): s for h, s in identical_groupings(settings.heads).items()},
        'num_tests': sum(c.get('p_t') is not None for c in comparisons),
        'runs': records, 'top1_checks': checks, 'summary': summary, 'comparisons': comparisons,
        'kd_investigation': kd_investigation(records, summary, comparisons),
        'compute': {'planned': estimate_seconds(jobs), 'measured': measured_compute(records, checks),
                    'unit_seconds': dict(UNIT_SECONDS)},
        'figures': _figures(out, comparisons),
    }
    (out / 'results.json').write_text(json.dumps(results, indent=2, default=str))
    report = out / 'EVIDENCE.md'
    report.write_text(render_markdown(json.loads((out / 'results.json').read_text()), out))
    _logger.info('wrote %s and %s', out / 'results.json', report)
    return report
