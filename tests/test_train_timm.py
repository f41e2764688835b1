"""``recipes/train_timm.py`` end to end (SHD on digits, interruption + resume, torchrun, errors) and the library
pieces it chains (``shd_plugins.timm``: parser, setup, sampler, run directory)."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

from shd_plugins.timm import (
    ResumableSampler,
    SHDDistillationTask,
    parse_train_args,
    resolve_output_dir,
    resume_position,
    setup_training,
    truncate_summary,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'recipes' / 'train_timm.py'
CONFIG = REPO / 'recipes' / 'configs' / 'digits_vit.yaml'
EVAL = REPO / 'eval' / 'top1.py'
MODEL = 'vit_tiny_patch16_224'
STUDENT = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)   # digits_vit.yaml's student
TEACHER = dict(patch_size=8, embed_dim=64, depth=4, num_heads=8)   # digits_vit.yaml's kd_model_kwargs
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}  # 2 cores shared by the tests

def kwargs_flags(flag: str, kwargs: dict) -> list:
    return [flag, *[f'{k}={v}' for k, v in kwargs.items()]]


@pytest.fixture(scope='module')
def teacher_checkpoint(tmp_path_factory) -> Path:
    """An 8-head teacher for the 2-head student (random weights: the tests check mechanics, not accuracy)."""
    path = tmp_path_factory.mktemp('teacher') / 'teacher.pth'
    torch.manual_seed(1)
    teacher = timm.create_model(MODEL, num_classes=10, in_chans=1, img_size=32, **TEACHER)
    torch.save(teacher.state_dict(), path)
    return path


def train_args(data_dir: Path, output: Path, teacher: Path, *extra: str) -> list:
    """digits_vit.yaml, shortened: 3 epochs of 44 steps at batch 32, recovery checkpoints every 5 steps."""
    return [
        str(SCRIPT), '-c', str(CONFIG), '--data-dir', str(data_dir), '--output', str(output),
        '--kd-model-name', MODEL, '--kd-checkpoint', str(teacher), '--kd-distill-type', 'shd',
        '--epochs', '3', '-b', '32', '--recovery-interval', '5', '--model-ema', '--model-ema-decay', '0.9',
        '--no-progress', '--device', 'cpu', *extra,
    ]


def summary_rows(output: Path) -> list:
    with open(output / 'summary.csv', newline='') as f:
        return list(csv.DictReader(f))


def saved_step(path: Path) -> int:
    return int(torch.load(path, map_location='cpu', weights_only=False)['num_updates'])


@pytest.mark.slow
def test_shd_training_resumes_from_the_saved_step_and_evaluates(digits_imagefolder, teacher_checkpoint, tmp_path):
    output = tmp_path / 'run'
    steps_per_epoch = 1438 // 32

    # 1. A real run, killed (SIGKILL) once it has written a recovery checkpoint.
    log1 = open(tmp_path / 'first.log', 'w')
    proc = subprocess.Popen([sys.executable, *train_args(digits_imagefolder, output, teacher_checkpoint)],
                            stdout=log1, stderr=subprocess.STDOUT, env=ENV, cwd=REPO)
    deadline = time.time() + 120
    while not list(output.glob('recovery-*.pth.tar')) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log1.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / 'first.log').read_text()
    saved = [p for p in output.glob('*.pth.tar') if p.name.startswith(('recovery-', 'last'))]
    resume_step = max(saved_step(p) for p in saved)
    assert 0 < resume_step < 3 * steps_per_epoch

    # 2. Resume: it continues from the saved step and finishes.
    resumed = subprocess.run([sys.executable, *train_args(digits_imagefolder, output, teacher_checkpoint),
                              '--resume', 'auto'], capture_output=True, text=True, env=ENV, cwd=REPO)
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log
    assert f'step {resume_step}.' in log and 'Resumed from' in log, log
    assert f'Finished at step {3 * steps_per_epoch}.' in log
    rows = summary_rows(output)
    assert [int(r['epoch']) for r in rows] == [0, 1, 2]  # each epoch once, even the interrupted one
    assert [int(r['train_steps']) for r in rows] == [steps_per_epoch * (e + 1) for e in range(3)]
    assert {'train_task_loss', 'train_kd_loss', 'train_shd_loss', 'eval_top1', 'eval_ema_top1'} <= set(rows[0])
    assert saved_step(output / 'last.pth.tar') == 3 * steps_per_epoch
    last = torch.load(output / 'last.pth.tar', map_location='cpu', weights_only=False)
    assert {'state_dict', 'state_dict_ema', 'optimizer', 'scheduler'} <= set(last)
    assert not any(k.startswith('module.') for k in last['state_dict'])

    # 3. eval/top1.py on the best checkpoint (ranked by the EMA top-1) reproduces the training-time number.
    results_file = tmp_path / 'top1.json'
    evaluation = subprocess.run([
        sys.executable, str(EVAL), '--model', MODEL, *kwargs_flags('--model-kwargs', STUDENT),
        '--num-classes', '10', '--in-chans', '1', '--img-size', '32',
        '--checkpoint', str(output / 'model_best.pth.tar'), '--use-ema', '--data-dir', str(digits_imagefolder),
        '--split', 'val', '--workers', '0', '--no-progress',
        '--results-file', str(results_file)], capture_output=True, text=True, env=ENV, cwd=REPO)
    assert evaluation.returncode == 0, evaluation.stderr
    results = json.loads(results_file.read_text())
    best = max(rows, key=lambda r: float(r['eval_ema_top1']))
    assert results['num_samples'] == 359
    assert results['top1'] == pytest.approx(float(best['eval_ema_top1']), abs=1e-3)


@pytest.mark.slow
def test_torchrun_two_cpu_processes(digits_imagefolder, teacher_checkpoint, tmp_path):
    output = tmp_path / 'ddp'
    args = train_args(digits_imagefolder, output, teacher_checkpoint, '--epochs', '1', '--recovery-interval', '0')
    run = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', *args],
        capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log
    assert 'Process 0 of 2' in log and 'Process 1 of 2' in log
    steps = (1438 // 2) // 32  # each rank sees half of the data
    assert f'Finished at step {steps}.' in log
    rows = summary_rows(output)
    assert len(rows) == 1 and int(rows[0]['train_steps']) == steps
    assert saved_step(output / 'last.pth.tar') == steps
    assert not any(k.startswith('module.') for k in torch.load(
        output / 'last.pth.tar', map_location='cpu', weights_only=False)['state_dict'])


def setup_args(*argv: str):
    """Parsed args of a single process, as ``main`` has them before ``setup``."""
    args, _ = parse_train_args(list(argv))
    args.rank, args.local_rank, args.world_size, args.distributed = 0, 0, 1, False
    return args


def base_flags(data_dir, output, teacher) -> list:
    return ['-c', str(CONFIG), '--data-dir', str(data_dir), '--output', str(output), '--kd-model-name', MODEL,
            '--kd-checkpoint', str(teacher), '--device', 'cpu']


def test_teacher_with_fewer_heads_than_student(digits_imagefolder, tmp_path):
    teacher = tmp_path / 'teacher_2heads.pth'
    torch.save(timm.create_model(MODEL, num_classes=10, in_chans=1, img_size=32,
                                 **{**TEACHER, 'num_heads': 2}).state_dict(), teacher)
    args = setup_args(*base_flags(digits_imagefolder, tmp_path / 'out', teacher),
                      *kwargs_flags('--model-kwargs', {**STUDENT, 'num_heads': 4}),
                      *kwargs_flags('--kd-model-kwargs', {**TEACHER, 'num_heads': 2}))
    with pytest.raises(ValueError, match='has 2 heads but student layer .* has 4'):
        setup_training(args)


def test_missing_checkpoint_paths(digits_imagefolder, tmp_path):
    missing = tmp_path / 'missing_teacher.pth'
    with pytest.raises(FileNotFoundError, match='missing_teacher.pth'):
        setup_training(setup_args(*base_flags(digits_imagefolder, tmp_path / 'out', missing)))
    args = setup_args('-c', str(CONFIG), '--data-dir', str(digits_imagefolder), '--resume', str(tmp_path / 'x.tar'))
    with pytest.raises(FileNotFoundError, match='--resume .*x.tar'):
        setup_training(args)


def test_data_dir_that_is_not_an_imagefolder(tmp_path, teacher_checkpoint):
    not_images = tmp_path / 'notes'
    not_images.mkdir()
    (not_images / 'readme.txt').write_text('no images here')
    run = subprocess.run([sys.executable, str(SCRIPT), *base_flags(not_images, tmp_path / 'out', teacher_checkpoint)],
                         capture_output=True, text=True, env=ENV, cwd=REPO)
    assert run.returncode == 2
    assert run.stderr.splitlines()[-1].startswith('train_timm.py: error: '), run.stderr  # shd_plugins.cli convention
    assert 'Traceback' not in run.stderr
    assert 'is not an ImageFolder' in run.stderr and str(not_images) in run.stderr


def test_unknown_shd_layers_spec(digits_imagefolder, teacher_checkpoint, tmp_path):
    args = setup_args(*base_flags(digits_imagefolder, tmp_path / 'out', teacher_checkpoint), '--shd-layers', 'odd')
    with pytest.raises(ValueError, match="Unknown layer spec 'odd'"):
        setup_training(args)


def test_config_file_sets_defaults_and_flags_override(tmp_path):
    args, args_text = parse_train_args(['-c', str(CONFIG), '--epochs', '2', '--model-kwargs', 'depth=1'])
    assert args.epochs == 2 and args.model_kwargs == {'depth': 1}                  # flags win
    assert args.in_chans == 1 and args.kd_model_kwargs['num_heads'] == 8          # the file's values
    assert args.kd_distill_type == 'shd' and 'shd_weight' in args_text
    bad = tmp_path / 'bad.yaml'
    bad.write_text('shd_weigth: 2\n')
    with pytest.raises(SystemExit):
        parse_train_args(['-c', str(bad)])


def test_output_dir_of_another_run_is_not_overwritten(tmp_path):
    (tmp_path / 'last.pth.tar').write_bytes(b'')
    args = setup_args('--data-dir', str(tmp_path), '--output', str(tmp_path))
    with pytest.raises(ValueError, match='--resume auto'):
        resolve_output_dir(args)


def test_resumable_sampler_skips_exactly_the_seen_samples():
    full = ResumableSampler(103, num_replicas=2, rank=0, seed=3)
    other = ResumableSampler(103, num_replicas=2, rank=1, seed=3)
    full.set_epoch(4)
    other.set_epoch(4)
    order = [i for pair in zip(full, other) for i in pair]
    assert sorted(set(order)) == list(range(103))                     # every sample, padded to 104
    resumed = ResumableSampler(103, num_replicas=1, seed=3)  # a different world size
    resumed.set_epoch(4, start=40)
    assert list(resumed) == order[40:103] and len(resumed) == 63


def test_setup_builds_the_shd_task_from_the_flags(digits_imagefolder, teacher_checkpoint, tmp_path):
    args = setup_args(*base_flags(digits_imagefolder, tmp_path / 'out', teacher_checkpoint), '--shd-weight', '2.5')
    state = setup_training(args)
    task = state['task']
    assert isinstance(task, SHDDistillationTask)
    assert task.shd.weight == 2.5 and task.temperature == 4.0
    assert task.distiller.layer_pairs == [(1, 0), (3, 1)]          # uniform: 4 teacher layers -> 2 student layers
    assert getattr(task.criterion, 'smoothing', None) == pytest.approx(0.1)
    teacher_state = torch.load(teacher_checkpoint, map_location='cpu')
    assert all(torch.equal(task.teacher.model.state_dict()[k], v) for k, v in teacher_state.items())
    images, _ = next(iter(state['train_loader']))
    assert images.shape == (64, 1, 32, 32)
    assert len(state['eval_loader'].dataset) == 359                 # the whole val split on a single process


def test_resume_position_of_timm_and_step_exact_checkpoints(tmp_path):
    assert resume_position({'epoch': 4}, global_batch=64, updates_per_epoch=10) == (5, 0, 50)  # timm's: next epoch
    exact = {'epoch': 1, 'resume_epoch': 2, 'epoch_samples': 320, 'num_updates': 25}
    assert resume_position(exact, global_batch=64, updates_per_epoch=10) == (2, 320, 25)
    assert resume_position(exact, global_batch=96, updates_per_epoch=10).epoch_samples == 288  # whole batches
    summary = tmp_path / 'summary.csv'
    summary.write_text('epoch,train_loss\n0,1.0\n1,0.9\n2,0.8\n')
    truncate_summary(summary, start_epoch=2)
    assert summary.read_text().split() == ['epoch,train_loss', '0,1.0', '1,0.9']


@pytest.mark.slow
def test_token_distillation_logs_timm_distill_loss(digits_imagefolder, teacher_checkpoint, tmp_path):
    """timm's token task returns 'distill_loss' (not 'kd_loss'): the epoch summary must carry it."""
    output = tmp_path / 'token'
    args = train_args(digits_imagefolder, output, teacher_checkpoint, '--epochs', '1', '-b', '128',
                      '--recovery-interval', '0', '--kd-distill-type', 'token',
                      '--model', 'deit_tiny_distilled_patch16_224')
    run = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    row = summary_rows(output)[0]
    assert float(row['train_distill_loss']) > 0 and float(row['train_task_loss']) > 0
    assert 'train_shd_loss' not in row and 'train_kd_loss' not in row


def test_the_optimizer_covers_the_feature_task_projector(digits_imagefolder, teacher_checkpoint, tmp_path):
    """timm's feature task keeps its projector in task.trainable_module: the recipe's optimizer must cover it, as
    timm's train.py does (an optimizer over the student alone left the projector at its initialisation)."""
    from shd_plugins.timm import create_task_optimizer, parse_train_args
    from shd_plugins.timm.training import create_task

    argv = train_args(digits_imagefolder, tmp_path / 'feature', teacher_checkpoint, '--kd-distill-type', 'feature')[1:]
    args, _ = parse_train_args(argv)
    args.rank, args.world_size, args.distributed = 0, 1, False  # as after utils.init_distributed_device
    model = timm.create_model(MODEL, num_classes=10, in_chans=1, img_size=32, **STUDENT)
    task = create_task(args, model, {}, torch.device('cpu'))
    optimized = {id(p) for group in create_task_optimizer(task, args).param_groups for p in group['params']}
    projector = list(task.trainable_module.projection.parameters())
    assert projector and all(id(p) in optimized for p in projector)
    assert all(id(p) in optimized for p in model.parameters())
    args.kd_distill_type = 'logit'
    logit = create_task(args, model, {}, torch.device('cpu'))
    optimized = [p for group in create_task_optimizer(logit, args).param_groups for p in group['params']]
    assert sorted(map(id, optimized)) == sorted(map(id, model.parameters()))  # the student, as before
