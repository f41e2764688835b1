"""Checkpoints of ``recipes/train_timm.py``: bit-exact resume, ``--resume auto``'s choice among the files of a run
directory, and errors that name a truncated or foreign checkpoint (``shd_plugins.timm.checkpoint``)."""
from __future__ import annotations

import argparse
import logging
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
    create_distillation_teacher,
    find_latest_checkpoint,
    parse_train_args,
    read_checkpoint_metadata,
    resolve_output_dir,
    setup_training,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'recipes' / 'train_timm.py'
CONFIG = REPO / 'recipes' / 'configs' / 'digits_vit.yaml'
MODEL = 'vit_tiny_patch16_224'
TEACHER = dict(patch_size=8, embed_dim=64, depth=4, num_heads=8)   # digits_vit.yaml's kd_model_kwargs
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}


@pytest.fixture(scope='module')
def teacher_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp('teacher') / 'teacher.pth'
    torch.manual_seed(1)
    torch.save(timm.create_model(MODEL, num_classes=10, in_chans=1, img_size=32, **TEACHER).state_dict(), path)
    return path


def run_args(data_dir: Path, output: Path, teacher: Path, *extra: str) -> list:
    """2 epochs of 22 steps, random crops (digits_vit.yaml) and drop-path, so data and model RNG both matter."""
    return [
        sys.executable, str(SCRIPT), '-c', str(CONFIG), '--data-dir', str(data_dir), '--output', str(output),
        '--kd-model-name', MODEL, '--kd-checkpoint', str(teacher), '--epochs', '2', '--recovery-interval', '3',
        '--drop-path', '0.1', '--model-ema', '--model-ema-decay', '0.9', '--no-progress', '--device', 'cpu', *extra,
    ]


def load(path: Path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=False)


@pytest.mark.slow
def test_killed_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(
        digits_imagefolder, teacher_checkpoint, tmp_path):
    """A real interruption: SIGKILL of the training process once it has written a mid-epoch recovery checkpoint.

    The kill lands wherever the process is (mid-step, mid-save), as a crash or a pre-empted job would, and the
    resumed run must still end bit-identical (student, EMA, optimizer) to a run that was never stopped.
    """
    reference = subprocess.run(run_args(digits_imagefolder, tmp_path / 'ref', teacher_checkpoint),
                               capture_output=True, text=True, env=ENV, cwd=REPO)
    assert reference.returncode == 0, reference.stderr

    output = tmp_path / 'run'
    log = open(tmp_path / 'killed.log', 'w')
    proc = subprocess.Popen(run_args(digits_imagefolder, output, teacher_checkpoint), stdout=log,
                            stderr=subprocess.STDOUT, env=ENV, cwd=REPO)
    deadline = time.time() + 120
    while not list(output.glob('recovery-0-*.pth.tar')) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / 'killed.log').read_text()
    assert not (output / 'last.pth.tar').exists()  # killed in epoch 0: only recovery files to resume from

    resumed = subprocess.run([*run_args(digits_imagefolder, output, teacher_checkpoint), '--resume', 'auto'],
                             capture_output=True, text=True, env=ENV, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr
    assert 'Resumed from' in resumed.stderr + resumed.stdout

    expected, got = load(tmp_path / 'ref' / 'last.pth.tar'), load(output / 'last.pth.tar')
    assert got['num_updates'] == expected['num_updates'] == 44
    for key in ('state_dict', 'state_dict_ema'):
        for name, value in expected[key].items():
            assert torch.equal(got[key][name], value), f'{key}.{name} differs after the resume'
    for index, state in expected['optimizer']['state'].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(got['optimizer']['state'][index][name]), torch.as_tensor(value))


# ---- --resume auto: which file of a run directory ------------------------------------------------------------


def run_namespace(data_dir: Path, output: Path, *argv: str) -> argparse.Namespace:
    """This run's args as ``setup_training`` sees them (single process)."""
    args, _ = parse_train_args(['-c', str(CONFIG), '--data-dir', str(data_dir), '--output', str(output), *argv])
    args.rank, args.local_rank, args.world_size, args.distributed = 0, 0, 1, False
    return args


def write_checkpoint(path: Path, args: argparse.Namespace, *, resume_epoch: int, epoch_samples: int) -> Path:
    """A checkpoint with the keys ``TrainStateSaver`` writes (position, args), tiny weights."""
    torch.save({'epoch': resume_epoch - (epoch_samples == 0), 'arch': args.model, 'args': args,
                'state_dict': {'w': torch.zeros(2)}, 'resume_epoch': resume_epoch, 'epoch_samples': epoch_samples,
                'num_updates': resume_epoch * 22 + epoch_samples // 64}, path)
    return path


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.unlink()  # a new inode: checkpoint-<epoch> files are hard links of last
    path.write_bytes(data[:len(data) // 2])


def test_resume_auto_skips_another_runs_recovery_file(tmp_path, caplog):
    """Issue 12.5: a fresh run into a folder holding another run's recovery file resumed it ("batch 30 of 8")."""
    other = run_namespace(tmp_path, tmp_path, '--batch-size', '8')
    write_checkpoint(tmp_path / 'recovery-0-30.pth.tar', other, resume_epoch=0, epoch_samples=248)
    args = run_namespace(tmp_path, tmp_path, '--resume', 'auto')
    with caplog.at_level(logging.WARNING):
        assert resolve_output_dir(args) == tmp_path and args.resume == ''   # a fresh start
    assert "recovery-0-30.pth.tar: another run's recovery file (batch_size=8 (this run: 64))" in caplog.text


def test_resume_auto_prefers_last_then_this_runs_newer_recovery(tmp_path):
    args = run_namespace(tmp_path, tmp_path)
    last = write_checkpoint(tmp_path / 'last.pth.tar', args, resume_epoch=2, epoch_samples=0)
    write_checkpoint(tmp_path / 'checkpoint-1.pth.tar', args, resume_epoch=2, epoch_samples=0)
    write_checkpoint(tmp_path / 'recovery-1-9.pth.tar', args, resume_epoch=1, epoch_samples=640)  # older
    assert find_latest_checkpoint(tmp_path, args) == last      # ties: last before checkpoint-<epoch>
    newer = write_checkpoint(tmp_path / 'recovery-2-4.pth.tar', args, resume_epoch=2, epoch_samples=320)
    assert find_latest_checkpoint(tmp_path, args) == newer     # this run, further than last


def test_truncated_last_falls_back_to_the_newest_checkpoint_epoch(tmp_path, caplog):
    """Issue 12.5: a truncated last.pth.tar made --resume auto start fresh, ignoring checkpoint-<epoch> files."""
    args = run_namespace(tmp_path, tmp_path)
    write_checkpoint(tmp_path / 'checkpoint-0.pth.tar', args, resume_epoch=1, epoch_samples=0)
    newest = write_checkpoint(tmp_path / 'checkpoint-3.pth.tar', args, resume_epoch=4, epoch_samples=0)
    (tmp_path / 'checkpoint-3.bak.pth.tar').write_bytes(b'not ours')    # a stray copy is not a candidate
    truncate(write_checkpoint(tmp_path / 'last.pth.tar', args, resume_epoch=4, epoch_samples=0))
    with caplog.at_level(logging.WARNING):
        assert find_latest_checkpoint(tmp_path, args) == newest
    assert "skips last.pth.tar: Checkpoint '" in caplog.text and 'truncated or corrupt' in caplog.text


def test_truncated_resume_checkpoint_is_an_error_naming_the_file(digits_imagefolder, tmp_path):
    """Issue 12.6: torch's error for a truncated file has no file name (``[Errno 22]``, ``central directory``)."""
    args = run_namespace(digits_imagefolder, tmp_path / 'out')
    path = write_checkpoint(tmp_path / 'last.pth.tar', args, resume_epoch=1, epoch_samples=0)
    truncate(path)
    with pytest.raises(ValueError, match=f"Checkpoint '{path}' .* cannot be read.*truncated or corrupt"):
        read_checkpoint_metadata(path)
    empty = tmp_path / 'empty.pth.tar'
    empty.write_bytes(b'')
    with pytest.raises(ValueError, match='empty.pth.tar'):
        setup_training(run_namespace(digits_imagefolder, tmp_path / 'out', '--resume', str(empty)))


# ---- the teacher from its train checkpoint ----------------------------------------------------------------------


def teacher_train_checkpoint(path: Path, **kwargs) -> tuple[Path, torch.nn.Module]:
    """A teacher checkpoint as timm's train.py writes it: weights plus ``arch`` and ``args``."""
    torch.manual_seed(2)
    model_kwargs = {**TEACHER, **kwargs}
    teacher = timm.create_model(MODEL, num_classes=10, in_chans=1, img_size=32, **model_kwargs)
    args = argparse.Namespace(model=MODEL, model_kwargs=model_kwargs, num_classes=10, in_chans=1, img_size=32)
    torch.save({'epoch': 3, 'arch': MODEL, 'args': args, 'state_dict': teacher.state_dict(), 'version': 2}, path)
    return path, teacher


def test_teacher_is_rebuilt_from_its_train_checkpoint_alone(tmp_path):
    path, reference = teacher_train_checkpoint(tmp_path / 'teacher.pth.tar')
    teacher = create_distillation_teacher(None, num_classes=10, in_chans=1, img_size=(32, 32), pretrained_path=path)
    assert teacher.model.blocks[0].attn.num_heads == 8 and len(teacher.model.blocks) == 4
    assert all(torch.equal(teacher.model.state_dict()[k], v) for k, v in reference.state_dict().items())


def test_teacher_kwargs_that_disagree_with_the_checkpoint_name_both(tmp_path):
    """Issue 12.6: 4 heads instead of 8 have equal weight shapes: they loaded silently."""
    path, _ = teacher_train_checkpoint(tmp_path / 'teacher.pth.tar')
    with pytest.raises(ValueError, match=r'num_heads=4 \(checkpoint: 8\).*teacher.pth.tar'):
        create_distillation_teacher(MODEL, num_classes=10, in_chans=1, img_size=(32, 32), pretrained_path=path,
                                    model_kwargs={**TEACHER, 'num_heads': 4})
    with pytest.raises(ValueError, match="--kd-model-name 'deit_tiny_patch16_224' disagrees .* trained as"):
        create_distillation_teacher('deit_tiny_patch16_224', num_classes=10, in_chans=1, pretrained_path=path)


def test_a_head_count_the_checkpoint_left_at_the_default_is_compared_too(tmp_path):
    """The checkpoint's args do not name num_heads (the architecture's default, 3): 6 heads must not load silently."""
    torch.manual_seed(2)
    model_kwargs = dict(patch_size=8, embed_dim=48, depth=2)
    teacher = timm.create_model(MODEL, num_classes=10, in_chans=1, img_size=32, **model_kwargs)
    args = argparse.Namespace(model=MODEL, model_kwargs=model_kwargs, num_classes=10, in_chans=1, img_size=32)
    path = tmp_path / 'teacher.pth.tar'
    torch.save({'epoch': 3, 'arch': MODEL, 'args': args, 'state_dict': teacher.state_dict(), 'version': 2}, path)
    with pytest.raises(ValueError, match=r'trained as .* \(3 attention heads per layer.*has 6 heads per layer'):
        create_distillation_teacher(MODEL, num_classes=10, in_chans=1, img_size=(32, 32), pretrained_path=path,
                                    model_kwargs={**model_kwargs, 'num_heads': 6})
    assert create_distillation_teacher(None, num_classes=10, in_chans=1, img_size=(32, 32),
                                       pretrained_path=path).model.blocks[0].attn.num_heads == 3


def test_a_safetensors_teacher_loads_and_needs_its_name(tmp_path):
    """.safetensors holds tensors only: no recorded model, so the name and kwargs are required, and used."""
    from safetensors.torch import save_file

    torch.manual_seed(3)
    reference = timm.create_model(MODEL, num_classes=10, in_chans=1, img_size=32, **TEACHER)
    path = tmp_path / 'teacher.safetensors'
    save_file(reference.state_dict(), str(path))
    teacher = create_distillation_teacher(MODEL, num_classes=10, in_chans=1, img_size=(32, 32), pretrained_path=path,
                                          model_kwargs=TEACHER)
    assert all(torch.equal(teacher.model.state_dict()[k], v) for k, v in reference.state_dict().items())
    with pytest.raises(ValueError, match=r"teacher.safetensors' records no model .*--kd-model-name"):
        create_distillation_teacher(None, num_classes=10, in_chans=1, img_size=(32, 32), pretrained_path=path)


def test_state_dict_teacher_with_wrong_kwargs_names_the_shapes(tmp_path):
    """Issue 12.6: a plain state_dict and a wrong --kd-model-kwargs failed blaming ``input_size[0]=3``."""
    path = tmp_path / 'teacher.pth'
    torch.save(timm.create_model(MODEL, num_classes=10, in_chans=1, img_size=32, **TEACHER).state_dict(), path)
    with pytest.raises(ValueError, match=r'does not fit .*patch_embed.proj.weight: checkpoint \(64, 1, 8, 8\) vs '
                                         r'model \(32, 1, 8, 8\).*Pass the --kd-model-kwargs'):
        create_distillation_teacher(MODEL, num_classes=10, in_chans=1, img_size=(32, 32), pretrained_path=path,
                                    model_kwargs={**TEACHER, 'embed_dim': 32})
    truncate(path)
    with pytest.raises(ValueError, match='teacher.pth.*truncated or corrupt'):
        create_distillation_teacher(MODEL, num_classes=10, in_chans=1, pretrained_path=path, model_kwargs=TEACHER)


def test_train_timm_builds_the_teacher_from_kd_checkpoint_alone(digits_imagefolder, tmp_path):
    path, reference = teacher_train_checkpoint(tmp_path / 'teacher.pth.tar')
    args = run_namespace(digits_imagefolder, tmp_path / 'out', '--kd-checkpoint', str(path), '--device', 'cpu')
    assert args.kd_model_name is None
    task = setup_training(args)['task']
    assert type(task).__name__ == 'SHDDistillationTask'   # digits_vit.yaml's --kd-distill-type
    assert task.distiller.layer_pairs == [(1, 0), (3, 1)]
    assert all(torch.equal(task.teacher.model.state_dict()[k], v) for k, v in reference.state_dict().items())
