"""Tests of ``SHDDistillationTask``: timm's logit-distillation task plus the SHD term, on tiny real ViTs; and SHD in a
copy of timm's ``train.py`` (the README's three additions, the ``--shd-*`` flags reaching the task).

timm's ``train.py`` is not in the wheel, so :func:`timm_train_parser` declares the flags of its parser that the tasks
read, at module level and with the names, defaults and choices of timm 1.0.31's knowledge-distillation group;
:func:`timm_train_task` is its task-building ``if`` chain with the README's ``elif`` branch pasted before the final
``else: raise``.
"""
from __future__ import annotations

import argparse
import copy

import pytest
import timm
import torch
import torch.distributed as dist
from timm import utils
from timm.loss import LabelSmoothingCrossEntropy
from timm.task import (
    ClassificationTask,
    DistillationTeacher,
    FeatureDistillationTask,
    LogitDistillationTask,
    TokenDistillationTask,
)

from shd_plugins import SHDConfig, SHDDistiller
from shd_plugins.timm import (  # README addition 1
    SHDDistillationTask,
    add_shd_args,
    create_distillation_task,
    create_distillation_teacher,
)

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


def timm_train_parser() -> argparse.ArgumentParser:
    """The part of timm ``train.py``'s parser the tasks read (model, data normalisation, knowledge distillation)."""
    parser = argparse.ArgumentParser(description='PyTorch ImageNet Training')
    group = parser.add_argument_group('Model parameters')
    group.add_argument('--model', default='resnet50', type=str, metavar='MODEL')
    group.add_argument('--num-classes', type=int, default=None, metavar='N')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=utils.ParseKwargs)
    group = parser.add_argument_group('Augmentation and regularization parameters')
    group.add_argument('--smoothing', type=float, default=0.1)
    # Knowledge Distillation parameters
    parser.add_argument('--kd-model-name', default=None, type=str)
    parser.add_argument('--kd-distill-type', default='logit', type=str, choices=['logit', 'feature', 'token'])
    parser.add_argument('--kd-loss-type', default='kl', type=str)
    parser.add_argument('--distill-loss-weight', default=None, type=float)
    parser.add_argument('--task-loss-weight', default=None, type=float)
    parser.add_argument('--kd-temperature', default=4.0, type=float)
    parser.add_argument('--kd-student-feature-dim', default=None, type=int)
    parser.add_argument('--kd-teacher-feature-dim', default=None, type=int)
    parser.add_argument('--kd-token-distill-type', default='soft', type=str, choices=['soft', 'hard'])
    add_shd_args(parser)  # README addition 2: after the KD arguments
    return parser


def timm_train_task(args, model, train_loss_fn, device, model_dtype):
    """``train.py``'s task set-up with the README's addition 3: its ``if args.kd_model_name is not None:`` chain of
    ``LogitDistillationTask``/``FeatureDistillationTask``/``TokenDistillationTask``/``raise`` replaced by one call."""
    if args.kd_model_name is not None or args.kd_checkpoint:  # README addition 3 (lines as the user pastes them)
        task = create_distillation_task(
            args, model, criterion=train_loss_fn, device=device, dtype=model_dtype, verbose=utils.is_primary(args))
    else:
        task = ClassificationTask(
            model=model, criterion=train_loss_fn, device=device, dtype=model_dtype, verbose=utils.is_primary(args))
    return task


def test_forward_returns_timm_keys_and_adds_the_weighted_shd_term():
    student, teacher = vit(**STUDENT_KWARGS), vit(seed=1, **TEACHER_KWARGS)
    task = SHDDistillationTask(
        student, teacher, temperature=2.0, shd=SHDConfig(weight=3.0, temperature=1.5), verbose=False)
    x, y = batch()
    result = task(x, y)
    assert set(result) == {'loss', 'output', 'task_loss', 'kd_loss', 'shd_loss'}
    assert result['output'].shape == (4, 10)

    # Same student, teacher and weights through timm's own task and a standalone distiller.
    reference = LogitDistillationTask(student, teacher, temperature=2.0, verbose=False)
    distiller = SHDDistiller(teacher, student, temperature=1.5)
    with distiller.recording():
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
        distill_loss_weight=distill_w, shd=SHDConfig(weight=0.5), verbose=False)
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
        SHDDistillationTask(vit(**STUDENT_KWARGS), vit(seed=1, **TEACHER_KWARGS),
                            shd=SHDConfig(layers='every-other'), verbose=False)


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
    parser = timm_train_parser()
    args = parser.parse_args([
        '--kd-model-name', MODEL, '--kd-distill-type', 'shd', '--kd-checkpoint', str(path),
        '--kd-model-kwargs', 'patch_size=8', 'embed_dim=64', 'depth=4', 'num_heads=8',
        '--shd-weight', '2', '--shd-layers', 'last:1', '--shd-merge', 'mean', '--shd-tokens', 'patch'])
    task = SHDDistillationTask.from_args(args, vit(**STUDENT_KWARGS), verbose=False)
    assert task.shd.weight == 2.0 and task.temperature == 4.0
    assert task.distiller.layer_pairs == [(3, 1)] and task.distiller.config.merge == 'mean'
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


# ---- SHD in a copy of timm's train.py ----------------------------------------------------------------------


def parse(parser: argparse.ArgumentParser, *argv: str) -> argparse.Namespace:
    args = parser.parse_args(list(argv))
    args.rank, args.world_size, args.distributed = 0, 1, False  # as utils.init_distributed_device sets them
    return args


def test_the_three_readme_additions_train_a_student_in_timms_train_py(teacher_checkpoint):
    path, _ = teacher_checkpoint
    parser = timm_train_parser()
    args = parse(parser, '--model', MODEL, '--kd-model-name', MODEL, '--kd-distill-type', 'shd',
                 '--kd-checkpoint', str(path), '--kd-model-kwargs', 'patch_size=8', 'embed_dim=64',
                 'depth=4', 'num_heads=8', '--shd-weight', '2', '--shd-layers', 'last:1')
    model = vit(**STUDENT_KWARGS)
    train_loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    task = timm_train_task(args, model, train_loss_fn, torch.device('cpu'), None)

    assert isinstance(task, SHDDistillationTask) and task.criterion is train_loss_fn
    assert task.shd == SHDConfig(weight=2.0, layers='last:1') and task.distiller.layer_pairs == [(3, 1)]
    teacher_state = torch.load(path, map_location='cpu')
    assert all(torch.equal(task.teacher.model.state_dict()[k], v) for k, v in teacher_state.items())

    optimizer = torch.optim.AdamW(task.trainable_module.parameters(), lr=1e-3)
    task.train()
    before = model.blocks[1].attn.qkv.weight.detach().clone()
    result = task(*batch())
    assert set(result) == {'loss', 'output', 'task_loss', 'kd_loss', 'shd_loss'}
    torch.testing.assert_close(result['loss'], result['task_loss'] + result['kd_loss'] + 2.0 * result['shd_loss'])
    result['loss'].backward()
    optimizer.step()
    assert not torch.equal(model.blocks[1].attn.qkv.weight, before)

    # The other branches of the chain are untouched: timm's own logit task with the same parser.
    args = parse(parser, '--model', MODEL)
    assert isinstance(timm_train_task(args, vit(**STUDENT_KWARGS), train_loss_fn, None, None), ClassificationTask)


def test_shd_choice_is_added_once_and_existing_flags_are_kept():
    parser = timm_train_parser()
    add_shd_args(parser)  # a second call (or a train.py declaring some flags itself) changes nothing
    assert parser._option_string_actions['--kd-distill-type'].choices == ['logit', 'feature', 'token', 'shd']
    flags = [flag for action in parser._actions for flag in action.option_strings]
    assert len(flags) == len(set(flags))
    with pytest.raises(SystemExit):
        parser.parse_args(['--kd-distill-type', 'attention'])
    with pytest.raises(SystemExit):
        parser.parse_args(['--shd_weight', '2'])  # diffusers-style flags are not timm's


def test_every_shd_option_reaches_the_task_through_timm_style_flags(teacher_checkpoint):
    path, _ = teacher_checkpoint
    parser = timm_train_parser()
    assert SHDConfig.from_args(parser.parse_args([])) == SHDConfig()  # defaults are SHDConfig's
    args = parse(parser, '--kd-model-name', MODEL, '--kd-distill-type', 'shd', '--kd-checkpoint',
                 str(path), '--kd-model-kwargs', 'patch_size=8', 'embed_dim=64', 'depth=4',
                 'num_heads=8', '--shd-weight', '0.5', '--shd-temperature', '2.5', '--shd-layers', '3:1,1:0',
                 '--shd-merge', 'select', '--shd-loss', 'mse', '--shd-grouping', 'balanced', '--shd-tokens', 'patch',
                 '--shd-per-row')
    expected = SHDConfig(weight=0.5, temperature=2.5, layers='3:1,1:0', merge='select', loss='mse',
                         grouping='balanced', tokens='patch', per_row=True)
    task = SHDDistillationTask.from_args(args, vit(**STUDENT_KWARGS), verbose=False)
    assert task.shd == expected and task.distiller.config == expected
    assert task.distiller.layer_pairs == [(1, 0), (3, 1)] and task.distiller.prefix_tokens == (1, 1)
    result = task(*batch())
    torch.testing.assert_close(result['loss'], result['task_loss'] + result['kd_loss'] + 0.5 * result['shd_loss'])


def test_invalid_shd_flag_values_fail_with_the_option_named(teacher_checkpoint):
    path, _ = teacher_checkpoint
    parser = timm_train_parser()
    with pytest.raises(SystemExit):  # choices come from SHDConfig's modes
        parser.parse_args(['--shd-loss', 'cosine'])
    args = parse(parser, '--kd-model-name', MODEL, '--kd-distill-type', 'shd', '--kd-checkpoint',
                 str(path), '--shd-temperature', '0')
    with pytest.raises(ValueError, match='temperature must be > 0'):
        SHDDistillationTask.from_args(args, vit(**STUDENT_KWARGS), verbose=False)


def test_zero_weight_installs_no_hooks_and_is_timms_logit_distillation():
    student, teacher = vit(**STUDENT_KWARGS), vit(seed=1, **TEACHER_KWARGS)
    task = SHDDistillationTask(student, teacher, temperature=2.0, shd=SHDConfig(weight=0), verbose=False)
    assert task.distiller is None
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in [*student.modules(), *teacher.modules()])
    x, y = batch()
    result = task(x, y)
    expected = LogitDistillationTask(student, teacher, temperature=2.0, verbose=False)(x, y)
    assert set(result) == {'loss', 'output', 'task_loss', 'kd_loss'}
    torch.testing.assert_close(result['loss'], expected['loss'])
    task.remove_hooks()


def test_evaluation_forwards_record_nothing():
    student, teacher = vit(**STUDENT_KWARGS), vit(seed=1, **TEACHER_KWARGS)
    task = SHDDistillationTask(student, teacher, verbose=False)
    x, y = batch()
    reference = task(x, y)['shd_loss']
    task.eval()
    with torch.no_grad():
        task.get_eval_model()(x)
        task.teacher(x)
    for capture, index in ((task.distiller.student_capture, 0), (task.distiller.teacher_capture, 1)):
        with pytest.raises(RuntimeError, match='No attention was recorded'):
            capture[index]
    task.train()
    torch.testing.assert_close(task(x, y)['shd_loss'], reference)  # the eval forwards left nothing behind


@pytest.mark.parametrize('distill_type, task_class', [
    ('logit', LogitDistillationTask), ('feature', FeatureDistillationTask), ('token', TokenDistillationTask),
    ('shd', SHDDistillationTask)])
def test_every_kd_distill_type_in_timms_train_py_uses_the_local_teacher(teacher_checkpoint, distill_type, task_class):
    """Issue 12.7: timm's chain gave logit/feature/token the hub name, ignoring --kd-checkpoint/--kd-model-kwargs."""
    path, reference = teacher_checkpoint
    args = parse(timm_train_parser(), '--model', MODEL, '--kd-model-name', MODEL, '--kd-distill-type', distill_type,
                 '--kd-checkpoint', str(path), '--kd-model-kwargs', 'patch_size=8', 'embed_dim=64', 'depth=4',
                 'num_heads=8', '--kd-student-feature-dim', '32', '--kd-teacher-feature-dim', '64')
    train_loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    torch.manual_seed(0)
    student = (timm.create_model('deit_tiny_distilled_patch16_224', num_classes=10, **STUDENT_KWARGS)
               if distill_type == 'token' else vit(**STUDENT_KWARGS))  # token KD needs a distillation head
    task = timm_train_task(args, student, train_loss_fn, torch.device('cpu'), None)
    assert type(task) is task_class and task.criterion is train_loss_fn
    loaded = task.teacher.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in reference.state_dict().items())
    task.train()
    result = task(*batch())
    assert torch.isfinite(result['loss']) and {'kd_loss', 'distill_loss'} & set(result)  # token: distill_loss
