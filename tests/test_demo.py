"""The embedded default end to end: `recipes/digits_demo.py --quick` on digits, then its cache."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from conftest import run_quick

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ('none', 'kd', 'kd_shd', 'kd_mean', 'kd_select')


def run_demo(output: Path) -> subprocess.CompletedProcess:
    return run_quick('digits_demo.py', output)


@pytest.mark.slow
def test_quick_demo_writes_a_complete_consistent_report(tmp_path):
    output = tmp_path / 'demo'
    run_demo(output)
    results = json.loads((output / 'results.json').read_text())
    report = (output / 'REPORT.md').read_text()
    heads = results['settings']['heads']
    seeds = results['settings']['vit_seeds']

    runs = results['runs']
    for kind in ('vit', 'dit'):
        assert [r for r in runs if r['kind'] == kind and r['role'] == 'teacher'], kind
        for h in heads:
            for variant in VARIANTS:
                matching = [r for r in runs
                            if r['kind'] == kind and r.get('heads') == h and r.get('variant') == variant]
                assert len(matching) == (len(seeds) if kind == 'vit' else 1), (kind, h, variant)
    for r in runs:
        assert r['train_seconds'] > 0 and r['command'].startswith('python recipes/train_')
        assert r['eval_command'].startswith('python eval/')
        if r['kind'] == 'vit':
            assert 0 <= r['top1'] <= 100 and r['num_val'] == results['data']['counts']['val']
        else:
            assert r['fid'] >= 0 and r['fid_tool'].startswith('torch-fidelity')

    # Summaries agree with the runs, and the report shows the same numbers.
    for h, variants in results['vit_summary'].items():
        for variant, stats in variants.items():
            values = [r['top1'] for r in runs if r['kind'] == 'vit' and r.get('heads') == int(h)
                      and r.get('variant') == variant]
            assert stats['mean'] == pytest.approx(sum(values) / len(values))
            assert f"{stats['mean']:.2f} ± {stats['std']:.2f}" in report
    for r in runs:
        if r['kind'] == 'dit':
            assert f"{r['fid']:.3f}" in report
    assert {v['kind'] for v in results['verdicts']} == {'vit', 'dit'}
    for v in results['verdicts']:
        assert v['verdict'] in report

    # Every figure exists and is referenced; every command is shown.
    for key, path in results['figures'].items():
        assert path and Path(path).is_file(), key
        assert str(Path(path).relative_to(output)) in report
    assert results['alpha_stats'] and all(0 <= s['min'] <= s['max'] <= 1 for s in results['alpha_stats'].values())
    for r in runs:
        assert r['command'] in report

    # A second run finds every run cached and only rewrites the report.
    second = run_demo(output)
    assert not re.search(r'\[demo\] (start|resume)', second.stdout + second.stderr)
    assert json.loads((output / 'results.json').read_text())['runs'] == runs
