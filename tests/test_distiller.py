"""SHDDistiller on real timm ViTs and diffusers DiTs."""
import logging
import os
import subprocess
import sys
from pathlib import Path

import ddp_shd_worker
import pytest
import timm
import torch
from timm.layers import Attention, set_reentrant_ckpt
from tiny_models import dit_inputs, tiny_dit, tiny_vit

from shd_plugins import SHDConfig, SHDDistiller

ROOT = Path(__file__).resolve().parents[1]


def snapshot(model):
    return {k: v.detach().clone() for k, v in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()}


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def vit_step(distiller, teacher, student, x):
    with distiller.recording():
        distiller.teacher_forward(x)
        student(x)
    return distiller.compute_loss()


def test_gradients_reach_student_qk_projections_and_nothing_of_the_teacher():
    teacher, student = tiny_vit(num_heads=8, depth=4, embed_dim=64), tiny_vit(num_heads=2, seed=1)
    for p in teacher.parameters():
        p.requires_grad_(True)  # even a trainable-looking teacher must get no gradient
    with SHDDistiller(teacher, student, temperature=2.0) as distiller:
        out = vit_step(distiller, teacher, student, torch.randn(2, 3, 32, 32))
        out.loss.backward()
    assert distiller.layer_pairs == [(1, 0), (3, 1)]
    for block in student.blocks:
        grad = block.attn.qkv.weight.grad
        dim = grad.shape[1]
        assert grad[:2 * dim].abs().sum() > 0  # q and k rows
        torch.testing.assert_close(grad[2 * dim:], torch.zeros_like(grad[2 * dim:]))  # v rows: SHD only trains q/k
    assert all(p.grad is None for p in teacher.parameters())


def test_dit_distillation_trains_the_student_to_the_squeezed_maps():
    teacher, student = tiny_dit(num_heads=8, num_layers=4), tiny_dit(num_heads=2, num_layers=2, seed=1)
    teacher.eval()
    distiller = SHDDistiller(teacher, student, weight=1.0)
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    inputs = dit_inputs(batch=4)
    losses = []
    for _ in range(30):
        with distiller.recording():
            distiller.teacher_forward(**inputs)
            student(**inputs)
        loss = distiller.compute_loss().loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    distiller.remove()


def test_the_teacher_is_never_modified_and_runs_in_eval_mode(caplog):
    teacher, student = tiny_vit(num_heads=8, drop_rate=0.5), tiny_vit(num_heads=2, seed=1)
    teacher.train()  # left in train mode: dropout would give other targets at every step
    before, hooks_before = snapshot(teacher), hook_count(teacher)
    distiller = SHDDistiller(teacher, student)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    caplog.set_level(logging.INFO, logger='shd_plugins.distiller')
    x = torch.randn(2, 3, 32, 32)
    for _ in range(2):
        teacher.train()  # a user's model.train() before each step
        out = vit_step(distiller, teacher, student, x)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        teacher.train()
        with distiller.recording():  # the targets of the same input are the same at every step
            distiller.teacher_forward(x)
        first_q = distiller.teacher_capture[1].q
        with distiller.recording():
            distiller.teacher_forward(x)
        assert torch.equal(distiller.teacher_capture[1].q, first_q)
    distiller.remove()
    assert not teacher.training
    assert caplog.text.count('The SHD teacher was in train mode: putting it in eval mode') == 1
    assert hook_count(teacher) == hooks_before == 0 and hook_count(student) == 0
    after = snapshot(teacher)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def grads_of_shd(teacher, student, x, **kwargs):
    student.zero_grad()
    with SHDDistiller(teacher, student, **kwargs) as distiller:
        vit_step(distiller, teacher, student, x).loss.backward()
    return {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients():
    teacher, student = tiny_vit(num_heads=8), tiny_vit(num_heads=2, seed=1)
    x = torch.randn(2, 3, 32, 32)
    reference = grads_of_shd(teacher, student, x)
    student.set_grad_checkpointing(True)
    set_reentrant_ckpt(False)
    checkpointed = grads_of_shd(teacher, student, x)
    assert reference.keys() == checkpointed.keys()
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], rtol=1e-5, atol=1e-7)


def test_reentrant_checkpointing_is_refused_clearly():
    teacher, student = tiny_vit(num_heads=8), tiny_vit(num_heads=2, seed=1)
    student.set_grad_checkpointing(True)
    set_reentrant_ckpt(True)
    try:
        with pytest.raises(RuntimeError, match=r'reentrant gradient checkpointing \(use_reentrant=True\)'):
            grads_of_shd(teacher, student, torch.randn(2, 3, 32, 32))
    finally:
        set_reentrant_ckpt(False)


def test_diffusers_gradient_checkpointing_gives_the_same_gradients():
    teacher, student = tiny_dit(num_heads=4), tiny_dit(num_heads=2, seed=1)
    teacher.eval(), student.eval()  # DiT label embeddings drop labels at random in train mode; checkpointing still runs
    inputs = dit_inputs()

    def grads():
        student.zero_grad()
        with SHDDistiller(teacher, student) as distiller:
            with distiller.recording():
                distiller.teacher_forward(**inputs)
                student(**inputs)
            distiller.compute_loss().loss.backward()
        return {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    reference = grads()
    student.enable_gradient_checkpointing()
    checkpointed = grads()
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], rtol=1e-5, atol=1e-7)


def test_an_ema_copy_made_after_installation_does_not_disturb_the_step():
    teacher, student = tiny_vit(num_heads=8), tiny_vit(num_heads=2, seed=1)
    x = torch.randn(2, 3, 32, 32)
    distiller = SHDDistiller(teacher, student)
    ema = timm.utils.ModelEmaV3(student, decay=0.9)
    with distiller.recording():
        distiller.teacher_forward(x)
        student(x)
    expected = distiller.compute_loss().loss
    with distiller.recording():
        distiller.teacher_forward(x)
        student(x)
        ema.module(torch.randn(2, 3, 32, 32))  # the EMA copy's forward between student forward and loss
    torch.testing.assert_close(distiller.compute_loss().loss, expected)
    distiller.remove()


def test_patch_tokens_let_a_distilled_deit_teach_a_vit():
    torch.manual_seed(0)
    teacher = timm.create_model('deit_tiny_distilled_patch16_224', pretrained=False, img_size=32, patch_size=8,
                                embed_dim=32, depth=2, num_heads=4, num_classes=10)
    student = tiny_vit(num_heads=2, seed=1)
    x = torch.randn(2, 3, 32, 32)
    with SHDDistiller(teacher, student, tokens='patch') as distiller:
        assert distiller.prefix_tokens == (2, 1)
        patch_loss = vit_step(distiller, teacher, student, x).loss
        assert torch.isfinite(patch_loss)
    with SHDDistiller(teacher, student, tokens='image') as distiller:  # the same option under its diffusion name
        assert distiller.prefix_tokens == (2, 1)
        torch.testing.assert_close(vit_step(distiller, teacher, student, x).loss, patch_loss)
    with SHDDistiller(teacher, student, tokens='all') as distiller:
        with pytest.raises(ValueError, match=r'student \(2, 2, 17, 17\) vs teacher \(2, 4, 18, 18\)'):
            vit_step(distiller, teacher, student, x)


def test_bad_configurations_are_clear_errors():
    teacher, student = tiny_vit(num_heads=2), tiny_vit(num_heads=4, seed=1)
    with pytest.raises(ValueError, match=r"Teacher layer 0 \('blocks.0.attn'\) has 2 heads but student layer 0 "):
        SHDDistiller(teacher, student)
    teacher = tiny_vit(num_heads=8)
    with pytest.raises(ValueError, match="Unknown layer spec 'middle'"):
        SHDDistiller(teacher, student, layers='middle')
    with pytest.raises(ValueError, match="Unknown tokens 'cls'"):
        SHDDistiller(teacher, student, tokens='cls')
    with pytest.raises(ValueError, match='temperature must be > 0'):
        SHDDistiller(teacher, student, temperature=-1.0)


def gated_vit():
    model = tiny_vit(num_heads=8)
    for block in model.blocks:  # timm's Attention with its output gate
        block.attn = Attention(32, num_heads=8, qkv_bias=True, gated=True)
    return model


@pytest.mark.parametrize('make_teacher, reason', [
    (lambda: tiny_vit(num_heads=8, scale_attn_norm=True), 'scale_norm normalises the concatenated head outputs'),
    (gated_vit, 'a gate multiplies the head outputs before the projection'),
])
def test_teachers_without_a_linear_value_circuit_refuse_shd_and_train_the_baselines(make_teacher, reason):
    teacher, student = make_teacher(), tiny_vit(num_heads=2, seed=1)
    with pytest.raises(ValueError, match=reason):
        SHDDistiller(teacher, student)
    for merge in ('mean', 'select'):  # the baselines need no value circuit: a real step runs
        with SHDDistiller(teacher, student, merge=merge) as distiller:
            out = vit_step(distiller, teacher, student, torch.randn(2, 3, 32, 32))
            out.loss.backward()
        assert torch.isfinite(out.value) and student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
        student.zero_grad()


@pytest.mark.slow
def test_ddp_two_process_gloo(tmp_path):
    """Real torchrun, 2 CPU processes: the all-reduced SHD gradients equal one process on the combined batch."""
    env = {**os.environ, 'PYTHONPATH': f"{ROOT / 'tests'}{os.pathsep}{ROOT}", 'OMP_NUM_THREADS': '1'}
    result = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29611',
         str(ROOT / 'tests' / 'ddp_shd_worker.py'), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f'rank{r}.pt') for r in range(2)]
    x, y = (torch.cat(parts) for parts in zip(*(ddp_shd_worker.rank_batch(r) for r in range(2))))
    for objective in ('shd', 'shd+ce'):
        grads = [ranks[r][objective]['first_step_grads'] for r in range(2)]
        assert ranks[0][objective]['loss'] != ranks[1][objective]['loss']  # each rank saw its own data
        teacher, student = tiny_vit(num_heads=8), tiny_vit(num_heads=2, seed=1)
        with SHDDistiller(teacher, student, temperature=2.0) as distiller:  # one process, the combined batch
            ddp_shd_worker.step_loss(distiller, student, x, y, objective).backward()
        for name, param in student.named_parameters():
            torch.testing.assert_close(grads[0][name], grads[1][name])  # all-reduced
            expected = param.grad if param.grad is not None else torch.zeros_like(param)
            torch.testing.assert_close(grads[0][name], expected, rtol=1e-4, atol=1e-6, msg=f'{objective}: {name}')
        assert any(g.abs().sum() > 0 for n, g in grads[0].items() if 'qkv' in n)


def test_config_object_with_overrides_weight_and_logs():
    teacher, student = tiny_vit(num_heads=8), tiny_vit(num_heads=2, seed=1)
    with SHDDistiller(teacher, student, SHDConfig(weight=2.0, layers='last:1'), temperature=2.0) as distiller:
        assert distiller.config == SHDConfig(weight=2.0, layers='last:1', temperature=2.0)
        assert distiller.layer_pairs == [(1, 1)]
        out = vit_step(distiller, teacher, student, torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(out.loss, 2.0 * out.value)
    logs = out.log_dict()
    assert set(logs) == {'shd_loss', 'shd_loss/t1_s1', 'shd_alpha_mean/t1_s1', 'shd_alpha_std/t1_s1'}
    assert logs['shd_loss'] == pytest.approx(out.value.item())
    assert all(not t.requires_grad for t in out.log_tensors().values())


def test_a_failed_loss_leaves_no_stale_tensors_for_the_next_step():
    teacher, student = tiny_vit(num_heads=8), tiny_vit(num_heads=2, seed=1)
    with SHDDistiller(teacher, student) as distiller:
        with distiller.recording():
            distiller.teacher_forward(torch.randn(2, 3, 32, 32))
            student(torch.randn(3, 3, 32, 32))  # batch mismatch: the loss fails
        with pytest.raises(ValueError, match='Batch sizes differ'):
            distiller.compute_loss()
        with pytest.raises(RuntimeError, match='No attention was recorded'):
            distiller.compute_loss()  # the previous step's teacher tensors are not reused


def test_non_finite_tensors_are_named_on_the_first_step_and_every_step_on_request():
    teacher, student = tiny_vit(num_heads=8), tiny_vit(num_heads=2, seed=1)
    x = torch.randn(2, 3, 32, 32)
    bad = x.clone()
    bad[0, 0, 0, 0] = float('nan')
    with SHDDistiller(teacher, student) as distiller:
        with distiller.recording():
            distiller.teacher_forward(bad)
            student(x)
        with pytest.raises(ValueError, match=r"The teacher's q of layer pair \(teacher 0, student 0\) holds NaN or inf "
                                             r"\(attention module 'blocks.0.attn'\)"):
            distiller.compute_loss()
        vit_step(distiller, teacher, student, x)  # a good first step: later steps are not checked (no device sync)
        assert not torch.isfinite(vit_step(distiller, teacher, student, bad).value)
    with SHDDistiller(teacher, student, check_finite=True) as distiller:
        vit_step(distiller, teacher, student, x)
        with pytest.raises(ValueError, match="The teacher's q of layer pair"):
            vit_step(distiller, teacher, student, bad)
