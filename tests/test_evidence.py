"""`make evidence` (issue 13): its statistics against known values, its paired plan, and the quick run end to end."""
from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest
from conftest import run_quick

from shd_plugins.evidence.plan import (
    DIT_VARIANTS,
    VIT_VARIANTS,
    EvidenceSettings,
    evidence_jobs,
    identical_groupings,
    vit_kwargs,
)
from shd_plugins.evidence.stats import comparison_sentence, holm, paired_comparison, paired_t_test, sign_test

ROOT = Path(__file__).resolve().parents[1]


def test_paired_t_test_matches_known_values():
    t, p = paired_t_test([1.0, 2.0, 3.0, 4.0, 5.0])  # scipy.stats.ttest_1samp([1..5], 0)
    assert t == pytest.approx(4.242640687119285) and p == pytest.approx(0.01323559956368269, rel=1e-9)
    a, b = [80.1, 82.3, 79.5, 85.0, 81.2], [78.0, 80.9, 80.1, 82.2, 79.9]  # scipy.stats.ttest_rel(a, b)
    t, p = paired_t_test([x - y for x, y in zip(a, b)])
    assert t == pytest.approx(2.4633537007722563) and p == pytest.approx(0.0694406758698303, rel=1e-9)
    assert paired_t_test([3.0]) == (None, None)
    assert paired_t_test([0.0, 0.0, 0.0]) == (0.0, 1.0)  # identical runs: no difference at all
    assert paired_t_test([2.0, 2.0, 2.0])[1] == 0.0


def test_sign_test_is_the_exact_binomial():
    assert sign_test([1.0] * 5) == pytest.approx(2 / 32)  # the floor with 5 seeds: never below 0.05
    assert sign_test([1, 1, 1, 1, -1]) == pytest.approx(0.375)  # scipy.stats.binomtest(4, 5)
    assert sign_test([1] * 9 + [-1]) == pytest.approx(0.021484375)  # scipy.stats.binomtest(9, 10)
    assert sign_test([1, -1, 0, 0]) == 1.0 and sign_test([0.0, 0.0]) == 1.0  # ties are dropped


def test_holm_adjusts_in_order_and_skips_missing():
    assert holm([0.01, 0.04, 0.03, None]) == pytest.approx([0.03, 0.06, 0.06, None])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_paired_comparison_pairs_by_seed_and_reads_direction():
    shd = {0: 80.0, 1: 82.0, 2: 84.0, 3: 86.0}
    kd = {1: 81.0, 2: 82.5, 3: 84.0, 7: 99.0}  # seed 0 and 7 have no partner
    c = paired_comparison(shd, kd, higher_is_better=True)
    assert c['seeds'] == [1, 2, 3] and c['differences'] == [1.0, 1.5, 2.0] and c['better'] == 3
    assert c['mean'] == pytest.approx(1.5) and c['std'] == pytest.approx(0.5)
    fid = paired_comparison({0: 10.0, 1: 12.0}, {0: 11.0, 1: 11.0}, higher_is_better=False)
    assert (fid['better'], fid['worse']) == (1, 1)
    sentence = comparison_sentence(c, 'KD + SHD', 'KD', 'top-1 points', True)
    assert sentence.startswith('KD + SHD is significantly better than KD') and 'seeds go that way' not in sentence
    worse = paired_comparison({s: 20.0 + s * 0.01 for s in range(5)}, {s: 10.0 for s in range(5)}, False)
    assert 'significantly worse' in comparison_sentence(worse, 'KD', 'no distillation', 'FID', False)
    dissent = paired_comparison(dict(enumerate([5.0, 6.0, 7.0, 8.0, -0.1])), dict.fromkeys(range(5), 0.0), True)
    assert dissent['p_t'] < 0.05 and 'only 4 of 5 seeds go that way' in comparison_sentence(
        dissent, 'A', 'B', 'points', True)
    noisy = paired_comparison({0: 1.0, 1: -1.0, 2: 1.5}, {0: 0.0, 1: 0.0, 2: 0.0}, True)
    assert comparison_sentence(noisy, 'A', 'B', 'points', True).startswith('No significant difference')


def test_plan_pairs_every_variant_on_the_same_seeds():
    s = EvidenceSettings()
    assert len(s.vit_seeds) >= 5 and len(s.dit_seeds) >= 3 and set(s.heads) == {2, 4} and 64 in s.vit_tokens
    assert vit_kwargs(64)['patch_size'] == 4 and vit_kwargs(16, 2)['num_heads'] == 2
    assert set(identical_groupings((2, 4))) == {2, 4}  # 8 -> 2 and 8 -> 4: balanced is progressive
    jobs = evidence_jobs(Path('/o'), Path('/d'), Path('/d8'), s)
    assert len({j.name for j in jobs}) == len(jobs)
    students = [j for j in jobs if j.info.get('role') == 'student' and 'eval' not in j.info
                and not j.info.get('investigation')]
    cells = [('vit', 16, VIT_VARIANTS, s.vit_seeds), ('vit', 64, VIT_VARIANTS, s.vit_seeds),
             ('dit', 16, DIT_VARIANTS, s.dit_seeds)]
    for kind, tokens, variants, seeds in cells:
        for heads in s.heads:
            cell = [j for j in students if (j.info['kind'], j.info['tokens'], j.info['heads']) == (kind, tokens, heads)]
            assert {j.info['variant'] for j in cell} == set(variants) - {'kd_shd_balanced'}
            for variant in {j.info['variant'] for j in cell}:
                mine = [j for j in cell if j.info['variant'] == variant]
                assert sorted(j.info['seed'] for j in mine) == sorted(seeds)
                for j in mine:
                    assert j.command[j.command.index('--seed') + 1] == str(j.info['seed'])
    by_name = {j.name: j for j in jobs}
    feature = by_name['vit64/h2_feature_s0'].command
    assert feature[feature.index('--kd-distill-type') + 1] == 'feature' and 'patch_size=4' in feature
    mse = by_name['dit/h4_kd_shd_mse_s2'].command
    assert mse[mse.index('--shd_loss') + 1] == 'mse' and mse[mse.index('--seed') + 1] == '2'
    assert '--shd-per-row' in by_name['vit16/h4_kd_shd_per_row_s3'].command
    weak_kd = by_name['dit/h2_kd_w0.25_s1'].command
    assert weak_kd[weak_kd.index('--output_kd_weight') + 1] == '0.25'
    assert weak_kd[weak_kd.index('--shd_weight') + 1] == '0'


def run_evidence(output: Path) -> subprocess.CompletedProcess:
    return run_quick('evidence.py', output)


@pytest.mark.slow
def test_quick_evidence_writes_a_complete_paired_report(tmp_path):
    output = tmp_path / 'evidence'
    run_evidence(output)
    results = json.loads((output / 'results.json').read_text())
    report = (output / 'EVIDENCE.md').read_text()
    s = results['settings']
    assert results['quick'] and 'numbers mean nothing' in report

    runs = results['runs']
    for tokens in s['vit_tokens']:
        for variant in s['vit_variants']:
            mine = [r for r in runs if (r['kind'], r['tokens'], r.get('variant')) == ('vit', tokens, variant)]
            assert sorted(r['seed'] for r in mine) == sorted(s['vit_seeds'])
            assert all(0 <= r['top1'] <= 100 and r['epochs_done'] == s['vit_student_epochs'][str(tokens)]
                       for r in mine)
    dit = [r for r in runs if r['kind'] == 'dit' and r['role'] != 'reference']
    assert all(r['fid'] >= 0 and r['train_seconds'] > 0 and r['eval_command'].startswith('python eval/fid.py')
               for r in dit)
    assert results['top1_checks'] and all(c['agree'] for c in results['top1_checks'])

    # Every comparison present in the runs is tested, its numbers agree with the per-seed table, its sentence is shown.
    comparisons = [c for c in results['comparisons'] if not c.get('identical')]
    assert {(c['kind'], c['variant'], c['baseline']) for c in comparisons} >= {('vit', 'kd_shd', 'feature'),
                                                                               ('dit', 'kd_shd', 'kd')}
    for c in comparisons:
        cell = results['summary'][c['cell']]
        diffs = [cell[c['variant']]['per_seed'][str(seed)] - cell[c['baseline']]['per_seed'][str(seed)]
                 for seed in c['seeds']]
        assert c['differences'] == pytest.approx(diffs) and c['n'] == 2
        assert c['sentence'] in report and 0 <= c['p_sign'] <= 1 and (c['p_t'] is None or 0 <= c['p_t'] <= 1)
        assert c['p_holm'] is None or c['p_holm'] >= c['p_t']
    investigation = results['kd_investigation']
    assert investigation['teacher']['fid'] is not None and investigation['real_data_fid']['fid'] >= 0
    assert all(finding in report for finding in investigation['findings'])
    for key, path in results['figures'].items():
        assert path and Path(path).is_file() and str(Path(path).relative_to(output)) in report, key
    for r in runs:
        assert r['command'] in report
    planned, measured = results['compute']['planned'], results['compute']['measured']
    assert planned['total'] > 0 and measured['total'] > 0 and not math.isnan(measured['total'])

    # A second run finds every run cached and only rewrites the report.
    second = run_evidence(output)
    assert not re.search(r'\[evidence\] (start|resume)', second.stdout + second.stderr)
    again = json.loads((output / 'results.json').read_text())
    assert again['runs'] == runs and again['total_seconds'] == results['total_seconds'] > 0


def _fabricate_outputs(jobs, effect):
    """Write what the recipes and evaluators would write, with a known KD + SHD effect, for the report's code."""
    import random

    rng = random.Random(0)
    for job in jobs:
        job.run_dir.mkdir(parents=True, exist_ok=True)
        info = job.info
        if info.get('eval') == 'top1':
            continue
        if info.get('eval', '').startswith('fid') or info.get('role') == 'reference':
            metrics = {'frechet_inception_distance': 10.0 + rng.gauss(0, 1) - (effect if 'kd_shd' in job.name else 0),
                       'kernel_inception_distance_mean': 0.1, 'inception_score_mean': 3.0, 'precision': 0.3,
                       'recall': 0.9}
            (job.run_dir / 'fid_results.json').write_text(json.dumps({'metrics': metrics, 'num_samples': 200}))
        elif info['kind'] == 'vit':
            top1 = 70.0 + rng.gauss(0, 1) + (effect if info.get('variant') == 'kd_shd' else 0)
            (job.run_dir / 'summary.csv').write_text('epoch,train_loss,eval_loss,eval_top1,eval_top5\n'
                                                     f'0,2.0,1.5,50.0,90.0\n1,1.0,0.9,{top1},99.0\n')
        else:
            rows = [{'step': i, 'loss': 0.2, 'diffusion_loss': 0.15, 'mse': 0.14 + rng.gauss(0, 0.001), 'vb': 0.01,
                     **({'output_kd_loss': 0.03} if info.get('variant', '').startswith('kd') else {})}
                    for i in range(1, 21)]
            (job.run_dir / 'train_log.jsonl').write_text('\n'.join(map(json.dumps, rows)) + '\n')
    for job in jobs:
        if job.info.get('eval') == 'top1':
            run = job.run_dir.parent
            last = (run / 'summary.csv').read_text().splitlines()[-1].split(',')
            (job.run_dir / 'top1.json').write_text(json.dumps({'top1': float(last[3]), 'num_samples': 359}))


def test_report_of_the_full_plan_from_synthetic_runs(tmp_path):
    from shd_plugins.evidence.report import write_evidence

    settings = EvidenceSettings()
    jobs = evidence_jobs(tmp_path, tmp_path / 'data', tmp_path / 'data8', settings)
    _fabricate_outputs(jobs, effect=5.0)
    (tmp_path / 'data').mkdir(exist_ok=True)
    (tmp_path / 'data' / 'digits_meta.json').write_text(json.dumps({'counts': {'train': 1438, 'val': 359}}))
    report = write_evidence(tmp_path, jobs, {job.name: 1.0 for job in jobs}, settings, quick=False,
                            total_seconds=60.0, workers=2, command_line='python recipes/evidence.py').read_text()
    results = json.loads((tmp_path / 'results.json').read_text())
    comparisons = {(c['cell'], c['variant'], c['baseline']): c for c in results['comparisons']}
    # A +5 point effect over 1-point noise is found in every ViT cell; the DiT's 5-FID effect is found too.
    for tokens in (16, 64):
        for heads in (2, 4):
            c = comparisons[(f'vit{tokens}/h{heads}', 'kd_shd', 'kd')]
            assert c['n'] == 5 and c['p_t'] < 0.01 and c['better'] == 5
            assert c['sentence'].startswith('KD + SHD is significantly better than KD')
            assert comparisons[(f'vit{tokens}/h{heads}', 'kd_shd_balanced', 'kd_shd')]['identical']
    dit = comparisons[('dit16/h2', 'kd_shd', 'kd')]
    assert dit['n'] == 3 and dit['mean'] < 0 and 'better' in dit['sentence']
    # 4 ViT cells x 9 tested comparisons + 2 DiT cells x 7 (no feature alignment; balanced = progressive: not tested)
    assert results['num_tests'] == sum(c.get('p_t') is not None for c in results['comparisons']) == 4 * 9 + 2 * 7
    findings = results['kd_investigation']['findings']
    assert any('without guidance' in f for f in findings) and any('output-KD weight 0.25' in f for f in findings)
    assert any('precision / recall' in f for f in findings) and any('training digits themselves' in f for f in findings)
    for c in results['comparisons']:
        assert c['sentence'] in report
    for path in results['figures'].values():
        assert Path(path).is_file()
    assert len(results['top1_checks']) == 4 and all(c['agree'] for c in results['top1_checks'])
