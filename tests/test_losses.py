"""SHD loss, logit KD and output MSE."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from shd_plugins import logit_kd_loss, merge_heads, output_mse_loss, resolve_loss_weights, shd_loss


def teacher_layer(batch=2, heads=6, tokens=7, head_dim=4, width=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, heads, tokens, tokens, generator=gen) * 2
    values = torch.randn(batch, heads, tokens, head_dim, generator=gen)
    out_weight = torch.randn(width, heads * head_dim, generator=gen)
    return logits, values, out_weight


@pytest.mark.parametrize('temperature', [1.0, 2.0, 0.5])
@pytest.mark.parametrize('merge', ['shd', 'mean', 'select'])
def test_loss_is_zero_when_student_matches_the_squeezed_teacher(temperature, merge):
    logits, values, out_weight = teacher_layer()
    _, alphas = merge_heads(logits.softmax(-1), values, out_weight, 3, merge=merge)
    merged_tempered, _ = merge_heads((logits / temperature).softmax(-1), None, None, 3, merge=merge, alphas=alphas)
    student_logits = merged_tempered.log() * temperature  # softmax(S / tau) == merged tempered maps
    loss = shd_loss(student_logits, logits, values, out_weight, temperature=temperature, merge=merge)
    assert abs(loss.item()) < 1e-5
    mse = shd_loss(student_logits, logits, values, out_weight, temperature=temperature, merge=merge, loss='mse')
    assert abs(mse.item()) < 1e-10


def test_loss_is_positive_otherwise_and_scaled_by_tau_squared():
    logits, values, out_weight = teacher_layer()
    student_logits = torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(1))
    assert shd_loss(student_logits, logits, values, out_weight) > 0
    assert shd_loss(student_logits, logits, values, out_weight, loss='mse') > 0
    # tau^2 scaling: with the same merged targets, the KL at tau is tau^2 times the unscaled KL.
    tau = 3.0
    _, alphas = merge_heads(logits.softmax(-1), values, out_weight, 3)
    target, _ = merge_heads((logits / tau).softmax(-1), None, None, 3, alphas=alphas)
    unscaled = (torch.xlogy(target, target) - target * F.log_softmax(student_logits / tau, -1)).sum(-1).mean()
    torch.testing.assert_close(shd_loss(student_logits, logits, values, out_weight, temperature=tau),
                               unscaled * tau ** 2)


def test_gradients_reach_the_student_and_not_the_teacher():
    logits, values, out_weight = teacher_layer()
    logits.requires_grad_(True)
    values.requires_grad_(True)
    out_weight.requires_grad_(True)
    student_logits = torch.randn(2, 3, 7, 7, requires_grad=True)
    shd_loss(student_logits, logits, values, out_weight, temperature=2.0).backward()
    assert student_logits.grad is not None and student_logits.grad.abs().sum() > 0
    assert logits.grad is None and values.grad is None and out_weight.grad is None


def test_computes_in_float32_under_half_inputs():
    logits, values, out_weight = teacher_layer()
    student_logits = torch.randn(2, 3, 7, 7)
    reference = shd_loss(student_logits, logits, values, out_weight)
    half = shd_loss(student_logits.bfloat16(), logits.bfloat16(), values.bfloat16(), out_weight.bfloat16())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, reference, rtol=5e-2, atol=5e-2)


def test_masks_drop_rows_and_keys():
    logits, values, out_weight = teacher_layer(tokens=6)
    student_logits = torch.randn(2, 3, 6, 6)
    key_mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    query_mask = torch.tensor([[True] * 3 + [False] * 3, [True] * 6])
    masked = shd_loss(student_logits, logits, values, out_weight, key_mask=key_mask, query_mask=query_mask)
    assert torch.isfinite(masked)
    # The masked sample 1 equals the loss on its first 4 tokens (teacher and student rows renormalised).
    kept = shd_loss(student_logits[1:, :, :4, :4], logits[1:, :, :4, :4], values[1:, :, :4], out_weight,
                    key_mask=torch.ones(1, 4, dtype=torch.bool),
                    query_mask=torch.ones(1, 4, dtype=torch.bool))
    only_sample_one = shd_loss(
        student_logits, logits, values, out_weight, key_mask=key_mask,
        query_mask=torch.tensor([[False] * 6, [True] * 4 + [False] * 2]))
    torch.testing.assert_close(only_sample_one, kept)


def test_prefix_tokens_are_dropped_and_rows_renormalised():
    logits, values, out_weight = teacher_layer(tokens=9)  # teacher: 2 prefix tokens (cls, dist) + 7 patches
    student_logits = torch.randn(2, 3, 8, 8)  # student: 1 prefix token (cls) + 7 patches
    loss = shd_loss(student_logits, logits, values, out_weight, prefix_tokens=(2, 1))
    expected = shd_loss(student_logits[..., 1:, 1:], logits[..., 2:, 2:], values[:, :, 2:], out_weight)
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match=r'different token counts: student \(2, 3, 8, 8\) vs teacher \(2, 6, 9, 9\)'):
        shd_loss(student_logits, logits, values, out_weight)


def test_bad_inputs_are_clear_errors():
    logits, values, out_weight = teacher_layer(heads=2)
    with pytest.raises(ValueError, match='teacher has 2 heads but the student has 3'):
        shd_loss(torch.randn(2, 3, 7, 7), logits, values, out_weight)
    with pytest.raises(ValueError, match='temperature must be > 0 and finite, got 0.0'):
        shd_loss(torch.randn(2, 1, 7, 7), logits, values, out_weight, temperature=0.0)
    with pytest.raises(ValueError, match='temperature must be > 0 and finite, got inf'):
        shd_loss(torch.randn(2, 1, 7, 7), logits, values, out_weight, temperature=float('inf'))
    with pytest.raises(ValueError, match=r'key_mask must be \(B, T\) = \(2, 7\) .*got shape \(2, 1\)'):
        shd_loss(torch.randn(2, 1, 7, 7), logits, values, out_weight, key_mask=torch.ones(2, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r'query_mask must be \(B, T\) = \(2, 5\)'):
        shd_loss(torch.randn(2, 1, 7, 7), logits, values, out_weight, prefix_tokens=2,
                 query_mask=torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match=r'prefix_tokens \(teacher 7, student 7\) leave no tokens: the teacher maps '
                                         r'cover 7 tokens'):
        shd_loss(torch.randn(2, 1, 7, 7), logits, values, out_weight, prefix_tokens=7)
    with pytest.raises(ValueError, match=r'The batch is empty: student_logits \(0, 1, 7, 7\)'):
        shd_loss(torch.randn(0, 1, 7, 7), logits[:0], values[:0], out_weight)
    with pytest.raises(ValueError, match=r'teacher_values must be \(B, M, N, d\)'):
        shd_loss(torch.randn(2, 1, 7, 7), logits, values[:, :1], out_weight)
    with pytest.raises(ValueError, match="Unknown loss 'l1'"):
        shd_loss(torch.randn(2, 1, 7, 7), logits, values, out_weight, loss='l1')
    with pytest.raises(ValueError, match="Unknown grouping mode 'odd'"):
        shd_loss(torch.randn(2, 1, 7, 7), logits, values, out_weight, grouping='odd')


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8).flatmap(lambda m: st.tuples(st.just(m), st.integers(1, m))),
       st.integers(1, 3), st.integers(2, 8), st.floats(0.25, 4.0), st.booleans(), st.integers(0, 1000))
def test_loss_is_finite_non_negative_and_differentiable(counts, batch, tokens, temperature, per_row, seed):
    teacher_heads, student_heads = counts
    logits, values, out_weight = teacher_layer(batch, teacher_heads, tokens, 3, 5, seed)
    student_logits = torch.randn(batch, student_heads, tokens, tokens, requires_grad=True)
    loss = shd_loss(student_logits, logits, values, out_weight, temperature=temperature, per_row=per_row)
    assert torch.isfinite(loss) and loss >= -1e-6
    loss.backward()
    assert torch.isfinite(student_logits.grad).all()


def test_logit_kd_matches_timm_and_output_mse():
    student, teacher = torch.randn(4, 10), torch.randn(4, 10)
    tau = 2.0
    expected = F.kl_div(F.log_softmax(student / tau, -1), F.log_softmax(teacher / tau, -1),
                        reduction='batchmean', log_target=True) * tau ** 2
    torch.testing.assert_close(logit_kd_loss(student, teacher, tau), expected)
    assert logit_kd_loss(teacher, teacher, tau) == 0
    torch.testing.assert_close(output_mse_loss(student, teacher), F.mse_loss(student, teacher))
    with pytest.raises(ValueError, match=r'Output shapes differ: student \(4, 10\) vs teacher \(4, 9\)'):
        output_mse_loss(student, teacher[:, :9])


def test_loss_weights_follow_timm_conventions():
    assert resolve_loss_weights() == (1.0, 1.0)
    assert resolve_loss_weights(task_loss_weight=0.3) == (0.3, 0.7)
    assert resolve_loss_weights(distill_loss_weight=2.0) == (1.0, 2.0)
    assert resolve_loss_weights(0.5, 2.0) == (0.5, 2.0)


def test_losses_stay_float32_under_autocast():
    logits, values, out_weight = teacher_layer()
    student_logits = torch.randn(2, 3, 7, 7)
    reference = shd_loss(student_logits, logits, values, out_weight, temperature=2.0)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        inside = shd_loss(student_logits, logits, values, out_weight, temperature=2.0)
        kd = logit_kd_loss(torch.randn(4, 10), torch.randn(4, 10))
    assert inside.dtype == torch.float32 and kd.dtype == torch.float32
    torch.testing.assert_close(inside, reference)  # no silent bf16 matmuls inside


@pytest.mark.parametrize('per_row', [False, True])
def test_a_sample_without_valid_keys_contributes_nothing(per_row):
    logits, values, out_weight = teacher_layer(batch=3, heads=4)
    student = torch.randn(3, 2, 7, 7, requires_grad=True)
    key_mask = torch.rand(3, 7) > 0.3
    key_mask[:, 0] = True
    reference = shd_loss(student[:2], logits[:2], values[:2], out_weight, key_mask=key_mask[:2], per_row=per_row)
    key_mask[2] = False  # the third sample has no key to attend: no distribution to match
    value = shd_loss(student, logits, values, out_weight, key_mask=key_mask, per_row=per_row)
    torch.testing.assert_close(value, reference)
    value.backward()
    assert torch.isfinite(student.grad).all() and student.grad[2].abs().sum() == 0
    all_masked = shd_loss(student, logits, values, out_weight, key_mask=torch.zeros(3, 7, dtype=torch.bool))
    assert all_masked.item() == 0.0
