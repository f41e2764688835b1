"""Tests of ``SHDDistillationTask``: timm's logit-distillation task plus the SHD term, on tiny real ViTs."""
import argparse
import copy

import pytest
import timm
import torch
import torch.distributed as dist
from timm.task import DistillationTeacher, LogitDistillationTask

from shd_plugins import SHDDistiller
from shd_plugins.timm.task import SHDDistillationTask, add_shd_args, create_distillation_teacher

MODEL = 'vit_tiny_patch16_224'
STUDENT_KWARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
TEACHER_KWARGS = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=8)


def vit(in_chans: int = 3, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(MODEL, num_classes=10, in_chans=in_chans, **kwargs)


def batch(in_chans: int = 3, size: int = 4):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(size, in_chans, 32, 32, generator=gen), torch.randint(0, 10, (size,), generator=gen)


@pytest.fixture
def teacher_checkpoint(tmp_path):
    path = tmp_path / 'teacher.pth'
    teacher = vit(seed=1, **TEACHER_KWARGS)
    torch.save(teacher.state_dict(), path)
    return path, teacher


def test_forward_returns_timm_keys_and_adds_the_weighted_shd_term():
    student, teacher = vit(**STUDENT_KWARGS), vit(seed=1, **TEACHER_KWARGS)
    task = SHDDistillationTask(student, teacher, temperature=2.0, shd_weight=3.0, shd_temperature=1.5, verbose=False)
    x, y = batch()
    result = task(x, y)
    assert set(result) == {'loss', 'output', 'task_loss', 'kd_loss', 'shd_loss'}
    assert result['output'].shape == (4, 10)

    # Same student, teacher and weights through timm's own task and a standalone distiller.
    reference = LogitDistillationTask(student, teacher, temperature=2.0, verbose=False)
    distiller = SHDDistiller(teacher, student, temperature=1.5)
    expected = reference(x, y)
    shd = distiller.compute_loss().loss
    distiller.remove()
    torch.testing.assert_close(result['kd_loss'], expected['kd_loss'])
    torch.testing.assert_close(result['task_loss'], expected['task_loss'])
    torch.testing.assert_close(result['shd_loss'], shd)
    torch.testing.assert_close(result['loss'], expected['loss'] + 3.0 * shd)


@pytest.mark.parametrize('task_w, distill_w, expected', [
    (None, None, (1.0, 1.0)),    # default: both 1
    (0.3, None, (0.3, 0.7)),     # complementary
    (None, 2.0, (1.0, 2.0)),     # independent, task defaults to 1
    (0.5, 2.0, (0.5, 2.0)),      # independent
])
def test_weighting_modes_are_timms(task_w, distill_w, expected):
    task = SHDDistillationTask(
        vit(**STUDENT_KWARGS), vit(seed=1, **TEACHER_KWARGS), task_loss_weight=task_w,
        distill_loss_weight=distill_w, shd_weight=0.5, verbose=False)
    assert (task.task_loss_weight, task.distill_loss_weight) == pytest.approx(expected)
    result = task(*batch())
    total = expected[0] * result['task_loss'] + expected[1] * result['kd_loss'] + 0.5 * result['shd_loss']
    torch.testing.assert_close(result['loss'], total)


def test_trains_student_attention_and_never_the_teacher():
    student, teacher = vit(**STUDENT_KWARGS), vit(seed=1, **TEACHER_KWARGS)
    before = copy.deepcopy(teacher.state_dict())
    task = SHDDistillationTask(
        student, teacher, task_loss_weight=0.0, distill_loss_weight=0.0, verbose=False)  # SHD term only
    task.train()
    assert not task.teacher.training and not teacher.training and student.training
    task(*batch())['loss'].backward()
    assert student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # q/k projections receive the SHD gradient
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_teacher_from_name_and_local_checkpoint(teacher_checkpoint):
    path, reference = teacher_checkpoint
    kwargs = {k: v for k, v in TEACHER_KWARGS.items() if k != 'img_size'}  # the size follows the student
    task = SHDDistillationTask(
        vit(**STUDENT_KWARGS), MODEL, teacher_pretrained_path=str(path), teacher_model_kwargs=kwargs, verbose=False)
    assert isinstance(task.teacher, DistillationTeacher)
    loaded = task.teacher.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in reference.state_dict().items())
    assert set(task(*batch())) >= {'shd_loss'}


def test_teacher_checkpoint_errors_are_clear(tmp_path):
    missing = tmp_path / 'nope.pth'
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        SHDDistillationTask(vit(**STUDENT_KWARGS), MODEL, teacher_pretrained_path=str(missing),
                            teacher_model_kwargs=TEACHER_KWARGS, verbose=False)
    with pytest.raises(ValueError, match='--kd-checkpoint'):  # no silent hub download
        create_distillation_teacher(MODEL, num_classes=10, model_kwargs=TEACHER_KWARGS)


def test_teacher_with_fewer_heads_than_student_is_refused():
    teacher = vit(seed=1, **{**TEACHER_KWARGS, 'num_heads': 1})
    with pytest.raises(ValueError, match='at least as many heads'):
        SHDDistillationTask(vit(**STUDENT_KWARGS), teacher, verbose=False)


def test_unknown_layer_spec_is_refused():
    with pytest.raises(ValueError, match='Unknown layer spec'):
        SHDDistillationTask(vit(**STUDENT_KWARGS), vit(seed=1, **TEACHER_KWARGS), shd_layers='every-other',
                            verbose=False)


def test_teacher_input_is_renormalised_for_its_own_mean_std():
    student = vit(**STUDENT_KWARGS)  # ViT cfg: mean = std = 0.5
    teacher = DistillationTeacher(vit(seed=1, **TEACHER_KWARGS))
    teacher.mean_kd.copy_(torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
    teacher.std_kd.copy_(torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
    seen = []
    teacher.model.patch_embed.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    task = SHDDistillationTask(student, teacher, verbose=False)
    x, y = batch()
    task(x, y)
    expected = (x * 0.5 + 0.5 - teacher.mean_kd) / teacher.std_kd
    torch.testing.assert_close(seen[0], expected)


def test_single_channel_models_keep_single_channel_normalisation():
    student, teacher = vit(in_chans=1, **STUDENT_KWARGS), vit(in_chans=1, seed=1, **TEACHER_KWARGS)
    task = SHDDistillationTask(student, teacher, input_mean=(0.3,), input_std=(0.2,), verbose=False)
    assert task.student_mean.shape == task.teacher.mean_kd.shape[:1] + (1, 1, 1)
    assert task.student_mean.flatten().tolist() == pytest.approx([0.3])
    result = task(*batch(in_chans=1))
    assert torch.isfinite(result['loss'])


def test_ema_and_checkpoint_state_hold_only_the_student():
    student = vit(**STUDENT_KWARGS)
    task = SHDDistillationTask(student, vit(seed=1, **TEACHER_KWARGS), verbose=False)
    task.setup_ema(decay=0.5)
    x, y = batch()
    task(x, y)['loss'].backward()
    task.update_ema(step=1)
    task.get_eval_model(ema=True)(x)  # EMA copy: its hooks are inert, the next step still works
    task(x, y)
    state = {**task.get_checkpoint_state(), **task.get_checkpoint_state(ema=True)}
    assert set(state) == {'state_dict', 'state_dict_ema'}
    assert set(state['state_dict']) == set(student.state_dict())


def test_prepare_distributed_wraps_only_the_student(tmp_path):
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    try:
        student, teacher = vit(**STUDENT_KWARGS), vit(seed=1, **TEACHER_KWARGS)
        task = SHDDistillationTask(student, teacher, verbose=False).prepare_distributed()
        assert isinstance(task.trainable_module, torch.nn.parallel.DistributedDataParallel)
        assert task.teacher.model is teacher and not isinstance(task.teacher, torch.nn.parallel.DistributedDataParallel)
        result = task(*batch())
        result['loss'].backward()
        assert result['shd_loss'] > 0 and student.blocks[1].attn.qkv.weight.grad is not None
        assert set(task.get_checkpoint_state()['state_dict']) == set(student.state_dict())  # no 'module.' prefix
    finally:
        dist.destroy_process_group()


def test_add_shd_args_extends_a_timm_parser_and_builds_the_task(teacher_checkpoint):
    path, _ = teacher_checkpoint
    parser = argparse.ArgumentParser()
    parser.add_argument('--kd-model-name', default=None)
    parser.add_argument('--kd-distill-type', default='logit', choices=['logit', 'feature', 'token'])
    parser.add_argument('--kd-loss-type', default='kl')
    parser.add_argument('--distill-loss-weight', type=float, default=None)
    parser.add_argument('--task-loss-weight', type=float, default=None)
    parser.add_argument('--kd-temperature', type=float, default=4.0)
    add_shd_args(parser)
    args = parser.parse_args([
        '--kd-model-name', MODEL, '--kd-distill-type', 'shd', '--kd-checkpoint', str(path),
        '--kd-model-kwargs', 'patch_size=8', 'embed_dim=64', 'depth=4', 'num_heads=8',
        '--shd-weight', '2', '--shd-layers', 'last:1', '--shd-merge', 'mean', '--shd-tokens', 'patch'])
    task = SHDDistillationTask.from_args(args, vit(**STUDENT_KWARGS), verbose=False)
    assert task.shd_weight == 2.0 and task.temperature == 4.0
    assert task.distiller.layer_pairs == [(3, 1)] and task.distiller.merge == 'mean'
    assert task.distiller.prefix_tokens == (1, 1)
    with pytest.raises(SystemExit):
        parser.parse_args(['--shd-merge', 'median'])


def test_shd_term_is_float32_under_autocast():
    task = SHDDistillationTask(vit(**STUDENT_KWARGS), vit(seed=1, **TEACHER_KWARGS), verbose=False)
    x, y = batch()
    with torch.autocast(device_type='cpu', dtype=torch.bfloat16):
        result = task(x, y)
    assert result['output'].dtype == torch.bfloat16 and result['shd_loss'].dtype == torch.float32
    result['loss'].backward()
    reference = task(x, y)['shd_loss']  # full precision
    torch.testing.assert_close(result['shd_loss'], reference, rtol=0.1, atol=1e-3)
