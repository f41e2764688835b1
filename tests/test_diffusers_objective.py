"""DiTDistillationObjective: the five README lines in a plain PyTorch loop, loss terms, frozen teacher, scoping."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding

from shd_plugins.diffusers import LearnedSigmaVLB, default_dit_scheduler, dit_diffusion_loss

# Pixel-space grayscale 8x8 inputs, patch 2: 16 tokens. Learned sigma (out_channels = 2 * in_channels).
TINY = dict(in_channels=1, out_channels=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10, attention_head_dim=8)
TEACHER = dict(TINY, num_attention_heads=4, num_layers=2)
STUDENT = dict(TINY, num_attention_heads=2, num_layers=2)


def tiny_dits(**student_overrides) -> tuple[DiTTransformer2DModel, DiTTransformer2DModel]:
    """A random teacher (4 heads) and student (2 heads); PyTorch's init, so attention and labels matter."""
    torch.manual_seed(0)
    teacher = DiTTransformer2DModel(**TEACHER)
    student = DiTTransformer2DModel(**dict(STUDENT, **student_overrides))
    return teacher, student


def batch(size: int = 8, channels: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """One DiT training batch: clean latents, noise, timesteps, x_t and labels."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.rand(size, channels, 8, 8, generator=generator) * 2 - 1
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (size,), generator=generator)
    noisy_latents = default_dit_scheduler().add_noise(latents, noise, timesteps)
    labels = torch.randint(0, 10, (size,), generator=generator)
    return dict(latents=latents, noise=noise, timesteps=timesteps, noisy_latents=noisy_latents, class_labels=labels)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_the_five_readme_lines_in_a_plain_pytorch_loop():
    """The README's lines, unchanged, in a user's own DiT loop: the SHD loss falls and only the student learns."""
    teacher, student = tiny_dits()
    teacher_before, student_before = snapshot(teacher), snapshot(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    scheduler = default_dit_scheduler()
    torch.manual_seed(1)
    data = torch.rand(64, 1, 8, 8) * 2 - 1
    targets = torch.arange(64) % 10

    # ---- the README's five lines: two imports, the objective, and in the loop the call and the backward ----
    from shd_plugins import SHDConfig
    from shd_plugins.diffusers import DiTDistillationObjective
    objective = DiTDistillationObjective(student, teacher, SHDConfig(weight=1.0, temperature=2.0))
    shd_losses = []
    for step in range(30):
        index = torch.randint(0, len(data), (16,))
        latents, class_labels = data[index], targets[index]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),))
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)
        terms = objective(noisy_latents, timesteps, class_labels, noise=noise, latents=latents)
        terms['loss'].backward()
        optimizer.step()
        optimizer.zero_grad()
        shd_losses.append(terms['shd_loss'].item())

    first, last = sum(shd_losses[:5]) / 5, sum(shd_losses[-5:]) / 5
    assert last < 0.7 * first, shd_losses
    teacher_after, student_after = snapshot(teacher), snapshot(student)
    assert all(torch.equal(teacher_before[k], teacher_after[k]) for k in teacher_before)
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    changed = [k for k in student_before if not torch.equal(student_before[k], student_after[k])]
    assert len(changed) > len(student_before) // 2


def test_loss_terms_sum_and_gradients_reach_only_the_student():
    from shd_plugins import SHDConfig
    from shd_plugins.diffusers import DiTDistillationObjective

    teacher, student = tiny_dits()
    objective = DiTDistillationObjective(student, teacher, SHDConfig(weight=0.5, temperature=2.0),
                                         output_kd_weight=0.25, class_dropout_prob=0.0)
    assert objective.layer_pairs == [(0, 0), (1, 1)]
    b = batch()
    terms = objective(b['noisy_latents'], b['timesteps'], b['class_labels'], noise=b['noise'], latents=b['latents'])

    expected = {'loss', 'output', 'mse', 'vb', 'diffusion_loss', 'output_kd_loss', 'shd_loss', 'shd_loss/t0_s0',
                'shd_loss/t1_s1', 'shd_alpha_mean/t1_s1', 'shd_alpha_std/t1_s1'}
    assert expected <= set(terms)
    assert terms['output'].shape == (8, 2, 8, 8)
    for key, value in terms.items():
        if key != 'output':
            assert value.dtype == torch.float32 and value.dim() == 0 and torch.isfinite(value), key
    assert not any(terms[k].requires_grad for k in terms if '/' in k)  # per-layer logs are detached
    torch.testing.assert_close(terms['diffusion_loss'], terms['mse'] + terms['vb'])
    torch.testing.assert_close(
        terms['loss'], terms['diffusion_loss'] + 0.25 * terms['output_kd_loss'] + 0.5 * terms['shd_loss'])
    torch.testing.assert_close(terms['shd_loss'], (terms['shd_loss/t0_s0'] + terms['shd_loss/t1_s1']) / 2)

    terms['loss'].backward()
    assert all(p.grad is None for p in teacher.parameters())
    attention = student.transformer_blocks[0].attn1
    assert attention.to_q.weight.grad is not None and attention.to_q.weight.grad.abs().sum() > 0

    # The SHD term alone reaches the student's q/k: the attention maps are what it distils.
    student.zero_grad()
    shd_only = DiTDistillationObjective(student, teacher, SHDConfig(), output_kd_weight=0.0, class_dropout_prob=0.0)
    objective.remove_hooks()
    shd_terms = shd_only(b['noisy_latents'], b['timesteps'], b['class_labels'])
    assert set(shd_terms) >= {'loss', 'shd_loss'} and 'mse' not in shd_terms and 'output_kd_loss' not in shd_terms
    shd_terms['loss'].backward()
    assert attention.to_k.weight.grad.abs().sum() > 0


def test_forwards_outside_the_objective_leave_nothing_behind():
    """Sampling, validation and EMA forwards between steps are not recorded: the next step's SHD loss is unchanged."""
    from shd_plugins import SHDConfig
    from shd_plugins.diffusers import DiTDistillationObjective

    teacher, student = tiny_dits()
    objective = DiTDistillationObjective(student, teacher, SHDConfig(), class_dropout_prob=0.0)
    b = batch()
    args = (b['noisy_latents'], b['timesteps'], b['class_labels'])
    reference = objective(*args)['shd_loss'].detach()

    ema = copy.deepcopy(student)  # an EMA copy shares the student's modules' classes, not its hooks
    other = batch(size=3, seed=5)
    with torch.no_grad():
        student.eval()
        student(other['noisy_latents'], timestep=other['timesteps'], class_labels=other['class_labels'])
        teacher(other['noisy_latents'], timestep=other['timesteps'], class_labels=other['class_labels'])
        ema(other['noisy_latents'], timestep=other['timesteps'], class_labels=other['class_labels'])
        student.train()
    again = objective(*args)['shd_loss'].detach()
    torch.testing.assert_close(again, reference)

    objective.remove_hooks()  # no hook stays on either model
    assert not any(m._forward_hooks for m in list(student.modules()) + list(teacher.modules()))


def test_teacher_is_frozen_in_eval_mode_and_labels_are_dropped_once():
    from shd_plugins import SHDConfig
    from shd_plugins.diffusers import DiTDistillationObjective

    teacher, student = tiny_dits()
    teacher.train()
    objective = DiTDistillationObjective(student, teacher, SHDConfig())
    assert objective.class_dropout_prob == pytest.approx(0.1)  # diffusers' built-in rate, now applied once
    assert all(m.dropout_prob == 0 for m in student.modules() if isinstance(m, LabelEmbedding))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    objective.train()
    assert student.training and not teacher.training

    # In eval mode nothing is dropped, so two calls agree; in train mode labels are dropped at the given rate.
    b = batch()
    args = (b['noisy_latents'], b['timesteps'], b['class_labels'])
    objective.eval()
    with torch.no_grad():
        torch.testing.assert_close(objective(*args)['output'], objective(*args)['output'])
    objective.train()
    dropping = DiTDistillationObjective(student, teacher, SHDConfig(weight=0.0), class_dropout_prob=0.5)
    torch.manual_seed(3)
    with torch.no_grad():
        terms = dropping(*args)
    torch.manual_seed(3)  # replay the one draw: each label is dropped once, for both models
    seen = torch.where(torch.rand(8) < 0.5, torch.full_like(b['class_labels'], 10), b['class_labels'])
    assert (seen == 10).any() and (seen != 10).any()
    with torch.no_grad():
        student_output = student(b['noisy_latents'], timestep=b['timesteps'], class_labels=seen).sample
        teacher_output = teacher(b['noisy_latents'], timestep=b['timesteps'], class_labels=seen).sample
    torch.testing.assert_close(terms['output'], student_output)
    torch.testing.assert_close(terms['output_kd_loss'], torch.mean((student_output - teacher_output)[:, :1] ** 2))


def test_learned_sigma_bound_trains_only_the_variance_channels():
    scheduler = default_dit_scheduler()
    b = batch()
    output = torch.randn(8, 2, 8, 8, requires_grad=True)
    terms = dit_diffusion_loss(output, b['noise'], vlb=LearnedSigmaVLB(scheduler.betas), latents=b['latents'],
                               noisy_latents=b['noisy_latents'], timesteps=b['timesteps'])
    assert set(terms) == {'mse', 'vb', 'diffusion_loss'} and terms['vb'] > 0
    (grad,) = torch.autograd.grad(terms['vb'], output)
    assert grad[:, :1].abs().sum() == 0 and grad[:, 1:].abs().sum() > 0

    # Without latents the objective cannot form the bound; a fixed-sigma student has none.
    from shd_plugins.diffusers import DiTDistillationObjective

    teacher, student = tiny_dits()
    objective = DiTDistillationObjective(student, teacher, class_dropout_prob=0.0)
    assert 'vb' not in objective(b['noisy_latents'], b['timesteps'], b['class_labels'], noise=b['noise'])
    fixed_teacher = DiTTransformer2DModel(**dict(TEACHER, out_channels=1))
    fixed = DiTDistillationObjective(DiTTransformer2DModel(**dict(STUDENT, out_channels=1)), fixed_teacher)
    terms = fixed(b['noisy_latents'], b['timesteps'], b['class_labels'], noise=b['noise'], latents=b['latents'])
    assert 'vb' not in terms and torch.equal(terms['diffusion_loss'], terms['mse'])


def test_without_teacher_it_is_dits_objective_and_mixed_precision_losses_stay_float32():
    from shd_plugins.diffusers import DiTDistillationObjective

    teacher, student = tiny_dits()
    plain = DiTDistillationObjective(student, None, class_dropout_prob=0.0)
    b = batch()
    terms = plain(b['noisy_latents'], b['timesteps'], b['class_labels'], noise=b['noise'], latents=b['latents'])
    assert set(terms) == {'loss', 'output', 'mse', 'vb', 'diffusion_loss'}
    with pytest.raises(ValueError, match='pass noise='):
        plain(b['noisy_latents'], b['timesteps'], b['class_labels'])

    # A bf16 teacher under autocast: the teacher runs in its dtype, every loss is float32.
    mixed = DiTDistillationObjective(student, teacher.to(torch.bfloat16), class_dropout_prob=0.0)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        terms = mixed(b['noisy_latents'], b['timesteps'], b['class_labels'], noise=b['noise'], latents=b['latents'])
    for key in ('loss', 'mse', 'vb', 'output_kd_loss', 'shd_loss'):
        assert terms[key].dtype == torch.float32 and torch.isfinite(terms[key]), key
    terms['loss'].backward()
    assert all(p.grad is None for p in teacher.parameters())
