"""Crash-safe DiT checkpoints (shd_plugins.diffusers.checkpoints) and train_dit.py's resume and overwrite refusal.

The unit tests build checkpoint folders with the files accelerate writes (safetensors weights, a torch-saved
optimizer state); the end-to-end test kills train_dit.py for real and compares the resumed run with an uninterrupted
one, bit for bit.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shd_plugins.diffusers import (
    check_output_dir,
    checkpoint_problem,
    commit_checkpoint,
    find_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    read_run_id,
    run_contents,
    staging_dir,
    start_run,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'recipes' / 'train_dit.py'
ENV = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', TOKENIZERS_PARALLELISM='false')
TINY = dict(in_channels=1, out_channels=2, sample_size=32, patch_size=8, num_embeds_ada_norm=10)


def _save(output_dir: Path, step: int, run_id: str | None = 'run-a') -> Path:
    """A checkpoint as train_dit.py writes it: staged, the files accelerate writes, then committed."""
    staging = staging_dir(output_dir, step)
    (staging / 'transformer').mkdir(parents=True)
    save_file({'w': torch.full((64,), float(step))}, staging / 'transformer' / 'diffusion_pytorch_model.safetensors')
    torch.save({'state': {0: {'exp_avg': torch.ones(64) * step}}}, staging / 'optimizer.bin')
    return commit_checkpoint(staging, step, run_id)


def _truncate(file: Path) -> None:
    with open(file, 'r+b') as f:
        f.truncate(file.stat().st_size // 2)


def test_stray_folders_are_not_checkpoints(tmp_path):
    """`checkpoint-4.bak` gave `invalid literal for int()`; a crash's `.partial` must never be resumed."""
    for name in ('checkpoint-4.bak', 'checkpoint-x', 'checkpoint-9.partial', 'checkpoints'):
        (tmp_path / name).mkdir()
    assert list_checkpoints(tmp_path) == []
    assert find_checkpoint(tmp_path, 'latest') is None
    _save(tmp_path, 2)
    _save(tmp_path, 10)
    assert [p.name for p in list_checkpoints(tmp_path)] == ['checkpoint-2', 'checkpoint-10']  # by step, not name
    assert find_checkpoint(tmp_path, 'latest').step == 10


def test_a_path_to_any_checkpoint_folder_works(tmp_path):
    """A custom name gave `IndexError` (the step was parsed from the name); the manifest says the step."""
    saved = _save(tmp_path / 'run', 6)
    custom = tmp_path / 'elsewhere' / 'my-best'
    custom.parent.mkdir()
    os.replace(saved, custom)
    found = find_checkpoint(tmp_path / 'run', str(custom), flag='--resume_from_checkpoint')
    assert (found.path, found.step, found.run_id) == (custom, 6, 'run-a')
    assert find_checkpoint(tmp_path / 'elsewhere', 'my-best').step == 6  # a name inside the output folder
    with pytest.raises(ValueError, match=r'--resume_from_checkpoint nope: no such checkpoint folder'):
        find_checkpoint(tmp_path / 'run', 'nope', flag='--resume_from_checkpoint')


@pytest.mark.parametrize('fault', ['model', 'optimizer', 'unfinished', 'other_run'])
def test_latest_skips_what_cannot_resume_and_says_why(fault, tmp_path, caplog):
    """A truncated weight/optimizer file, a save that never finished or another run's checkpoint: the previous one."""
    _save(tmp_path, 2)
    newest = _save(tmp_path, 4, run_id='run-b' if fault == 'other_run' else 'run-a')
    reason = {
        'model': r'transformer/diffusion_pytorch_model.safetensors is \d+ bytes, \d+ when saved',
        'optimizer': r'optimizer.bin is \d+ bytes, \d+ when saved',
        'unfinished': 'no checkpoint.json',
        'other_run': 'written by another run',
    }[fault]
    if fault == 'model':
        _truncate(newest / 'transformer' / 'diffusion_pytorch_model.safetensors')
    elif fault == 'optimizer':
        _truncate(newest / 'optimizer.bin')
    elif fault == 'unfinished':  # accelerate's files are there, the manifest written last is not
        (newest / 'checkpoint.json').unlink()
    assert checkpoint_problem(tmp_path / 'checkpoint-2') is None
    with caplog.at_level(logging.WARNING, logger='shd_plugins.diffusers.checkpoints'):
        found = find_checkpoint(tmp_path, 'latest', run_id='run-a')
    assert found.path == tmp_path / 'checkpoint-2' and found.step == 2
    assert any('checkpoint-4' in r.getMessage() and re.search(reason, r.getMessage())
               for r in caplog.records), caplog.text
    if fault != 'other_run':  # named explicitly, a broken checkpoint is an error naming the folder and the fault
        with pytest.raises(ValueError, match=f'checkpoint-4 is not a complete checkpoint: {reason}'):
            find_checkpoint(tmp_path, 'checkpoint-4', flag='--resume_from_checkpoint')


def test_commit_replaces_and_prunes_after(tmp_path):
    """Pruning runs after the new checkpoint is in place and keeps `limit` of this run (the new one always)."""
    for step in (2, 4):
        _save(tmp_path, step)
    foreign = _save(tmp_path, 100, run_id='older-run')
    (tmp_path / 'checkpoint-6.partial' / 'leftover').mkdir(parents=True)  # a crash mid-save
    new = _save(tmp_path, 6)
    assert not (new / 'leftover').exists() and not (tmp_path / 'checkpoint-6.partial').exists()
    prune_checkpoints(tmp_path, 2, 'run-a', keep=new)
    assert [p.name for p in list_checkpoints(tmp_path)] == ['checkpoint-4', 'checkpoint-6', 'checkpoint-100']
    assert foreign.is_dir()
    again = _save(tmp_path, 6)  # a folder of the same step is replaced, never left half-written
    assert again == new and checkpoint_problem(new) is None
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith('checkpoint-6')) == ['checkpoint-6']


def test_output_dir_holding_a_run_is_refused(tmp_path):
    check_output_dir(tmp_path / 'new', None, False)  # nothing there
    (tmp_path / 'transformer').mkdir()
    with pytest.raises(ValueError, match=rf'--output_dir {tmp_path} already holds a run: a trained model '
                                         r'\(transformer/\).*--resume_from_checkpoint latest.*--overwrite_output_dir'):
        check_output_dir(tmp_path, None, False)
    check_output_dir(tmp_path, 'latest', False)
    assert run_contents(tmp_path) == ['a trained model (transformer/)']
    check_output_dir(tmp_path, None, True)
    assert read_run_id(tmp_path) is None and read_run_id(tmp_path) != start_run(tmp_path) == read_run_id(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# train_dit.py, interrupted for real
# ----------------------------------------------------------------------------------------------------------------


def _args(data: Path, root: Path, output_dir: Path) -> list[str]:
    # 40 samples, batch 8: 5 steps an epoch, so the resumed part crosses two epoch boundaries; random flips draw
    # from the RNG for every sample; EMA, label dropout and SHD are on.
    return [
        str(SCRIPT), '--train_data_dir', str(data / 'train'), '--resolution', '32', '--max_train_samples', '40',
        '--model_config', str(root / 'student.json'), '--shd_teacher_model_name_or_path', str(root / 'teacher'),
        '--shd_weight', '1.0', '--output_kd_weight', '0.5', '--shd_temperature', '2.0', '--train_batch_size', '8',
        '--seed', '0', '--report_to', 'none', '--random_flip', '--use_ema', '--ema_decay', '0.9',
        '--max_train_steps', '12', '--checkpointing_steps', '4', '--output_dir', str(output_dir)]


def _run(args: list[str], expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == expect, result.stderr[-4000:]
    return result


def _run_killed_after(args: list[str], step: int) -> None:
    """Start the script and SIGKILL it (no cleanup, as a crash or a preempted job) once checkpoint-<step> is saved."""
    process = subprocess.Popen([sys.executable, *args], env=ENV, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in process.stderr:
            if 'Saved state to' in line and line.rstrip().endswith(f'checkpoint-{step}'):
                os.killpg(process.pid, signal.SIGKILL)
                break
    finally:
        process.wait(timeout=240)
    assert process.returncode == -signal.SIGKILL, f'the run ended before checkpoint-{step} (rc {process.returncode})'


def _losses(output_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (output_dir / 'train_log.jsonl').read_text().splitlines()]
    return {r['step']: r['loss'] for r in records if 'event' not in r}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / 'diffusion_pytorch_model.safetensors')


def _assert_equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
        max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_killed_and_resumed_run_equals_the_uninterrupted_run(digits_imagefolder, tmp_path):
    """SIGKILL after checkpoint-4, resume `latest`: the same losses, weights, EMA and optimizer state at step 12.

    A kill is what happens to a preempted job: nothing after the checkpoint is saved and the resumed process
    rebuilds the data loader and RNGs from scratch (stopping at --max_train_steps and raising it would also change
    the LR schedule's length and end the run cleanly). Before the fix the losses after step 4 differed by up to 0.05.
    """
    from diffusers import DiTTransformer2DModel
    DiTTransformer2DModel(**TINY, num_attention_heads=4, attention_head_dim=8, num_layers=3).save_pretrained(
        tmp_path / 'teacher' / 'transformer')
    (tmp_path / 'student.json').write_text(json.dumps({'_class_name': 'DiTTransformer2DModel', **TINY,
                                                       'num_attention_heads': 2, 'attention_head_dim': 8,
                                                       'num_layers': 2}))
    full, resumed = tmp_path / 'full', tmp_path / 'resumed'
    with open(tmp_path / 'full.log', 'w') as log:  # a file, not a pipe: nobody reads it while the run goes on
        uninterrupted = subprocess.Popen([sys.executable, *_args(digits_imagefolder, tmp_path, full)], env=ENV,
                                         cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        _run_killed_after(_args(digits_imagefolder, tmp_path, resumed), step=4)
        assert uninterrupted.wait(timeout=240) == 0, (tmp_path / 'full.log').read_text()[-4000:]
    assert [p.name for p in list_checkpoints(resumed)][0] == 'checkpoint-4'

    refused = _run(_args(digits_imagefolder, tmp_path, resumed), expect=2)  # neither flag: refused, named
    assert f'train_dit.py: error: --output_dir {resumed} already holds a run' in refused.stderr
    (tmp_path / 'finished').mkdir()  # a trained model and no checkpoint: 'latest' must not start over it
    (tmp_path / 'finished' / 'transformer').mkdir()
    refused = _run([*_args(digits_imagefolder, tmp_path, tmp_path / 'finished'), '--resume_from_checkpoint',
                    'latest'], expect=2)
    assert 'no complete checkpoint of the run in' in refused.stderr and '--overwrite_output_dir' in refused.stderr
    _run([*_args(digits_imagefolder, tmp_path, resumed), '--resume_from_checkpoint', 'latest'])

    assert _losses(resumed) == _losses(full) and sorted(_losses(full)) == list(range(1, 13))
    for folder in ('transformer', 'checkpoint-12/transformer', 'checkpoint-12/transformer_ema'):
        _assert_equal_states(_weights(full / folder), _weights(resumed / folder))
    optimizers = [torch.load(d / 'checkpoint-12' / 'optimizer.bin', weights_only=True) for d in (full, resumed)]
    assert optimizers[0]['state'].keys() == optimizers[1]['state'].keys()
    for index, state in optimizers[0]['state'].items():
        _assert_equal_states(state, optimizers[1]['state'][index])
    # --use_ema: the saved model is the EMA of the last step, not the raw weights.
    _assert_equal_states(_weights(full / 'transformer'), _weights(full / 'checkpoint-12' / 'transformer_ema'))
    raw = _weights(full / 'checkpoint-12' / 'transformer')
    assert any(not torch.equal(raw[k], v) for k, v in _weights(full / 'transformer').items())
