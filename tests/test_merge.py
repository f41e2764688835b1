"""The closed-form squeeze against brute force and dense evaluation."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shd_plugins import head_groups, merge_heads
from shd_plugins.core.merge import pair_alpha, reconstruction_error


def random_layer(batch, heads, tokens, head_dim, width, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    attn = (torch.randn(batch, heads, tokens, tokens, generator=gen, dtype=dtype) * 2).softmax(-1)
    values = torch.randn(batch, heads, tokens, head_dim, generator=gen, dtype=dtype)
    out_weight = torch.randn(width, heads * head_dim, generator=gen, dtype=dtype)
    return attn, values, out_weight


def head_outputs(values, out_weight):
    """Dense X_h = V_h W_O^h, (B, M, N, D)."""
    heads, head_dim = values.shape[1], values.shape[-1]
    blocks = out_weight.t().reshape(heads, head_dim, -1)  # W_O^h = W[:, h*d:(h+1)*d].T
    return torch.einsum('bhnd,hdk->bhnk', values, blocks)


@pytest.mark.parametrize('seed', range(8))
def test_alpha_is_the_grid_argmin_of_the_reconstruction_error(seed):
    attn, values, out_weight = random_layer(3, 2, 7, 4, 6, seed)
    _, alphas = merge_heads(attn, values, out_weight, 1)
    outputs = head_outputs(values, out_weight)
    grid = torch.linspace(0, 1, 4001, dtype=torch.float64)
    for b in range(3):
        errors = reconstruction_error(grid[:, None, None], attn[b, 0], attn[b, 1], outputs[b, 0], outputs[b, 1])
        best = grid[errors.argmin()]
        error_at_alpha = reconstruction_error(alphas[b, 0], attn[b, 0], attn[b, 1], outputs[b, 0], outputs[b, 1])
        assert error_at_alpha <= errors.min() + 1e-9 * errors.max()
        assert abs(alphas[b, 0] - best) <= 1.0 / 4000 + 1e-9


@pytest.mark.parametrize('seed', range(4))
def test_per_row_alpha_is_the_rowwise_grid_argmin(seed):
    attn, values, out_weight = random_layer(2, 2, 5, 3, 4, seed)
    _, alphas = merge_heads(attn, values, out_weight, 1, per_row=True)
    assert alphas.shape == (2, 1, 5)
    outputs = head_outputs(values, out_weight)
    grid = torch.linspace(0, 1, 4001, dtype=torch.float64)
    for b in range(2):
        for r in range(5):
            errors = reconstruction_error(
                grid[:, None, None], attn[b, 0, r:r + 1], attn[b, 1, r:r + 1], outputs[b, 0], outputs[b, 1])
            assert abs(alphas[b, 0, r] - grid[errors.argmin()]) <= 1.0 / 4000 + 1e-9


def test_gram_evaluation_equals_the_dense_one():
    attn, values, out_weight = random_layer(4, 2, 9, 5, 11, seed=3)
    outputs = head_outputs(values, out_weight)
    delta = attn[:, 0] - attn[:, 1]
    u, w = delta @ outputs[:, 0], delta @ outputs[:, 1]
    dense = ((u * (u + w)).sum((-2, -1)) / (u + w).pow(2).sum((-2, -1))).clamp(0, 1)
    dense_rows = ((u * (u + w)).sum(-1) / (u + w).pow(2).sum(-1)).clamp(0, 1)

    head_dim = values.shape[-1]
    w_p, w_q = out_weight[:, :head_dim].t(), out_weight[:, head_dim:].t()
    args = (delta @ values[:, 0], delta @ values[:, 1], w_p @ w_p.t(), w_q @ w_q.t(), w_p @ w_q.t())
    torch.testing.assert_close(pair_alpha(*args), dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pair_alpha(*args, per_row=True), dense_rows, rtol=1e-10, atol=1e-12)


def test_zero_output_circuit_of_the_second_head_gives_alpha_one():
    attn, values, out_weight = random_layer(3, 2, 6, 4, 8, seed=5)
    out_weight[:, 4:] = 0  # X_q = V_q W_O^q = 0
    _, alphas = merge_heads(attn, values, out_weight, 1)
    torch.testing.assert_close(alphas, torch.ones_like(alphas))


def test_identical_maps_fall_back_to_one_half():
    attn, values, out_weight = random_layer(2, 2, 6, 4, 8, seed=6)
    attn[:, 1] = attn[:, 0]
    _, alphas = merge_heads(attn, values, out_weight, 1)
    torch.testing.assert_close(alphas, torch.full_like(alphas, 0.5))


def test_equal_head_counts_merge_nothing():
    attn, values, out_weight = random_layer(2, 4, 6, 3, 8, seed=7)
    merged, alphas = merge_heads(attn, values, out_weight, 4)
    assert torch.equal(merged, attn)
    assert alphas.shape == (2, 0)


def test_multi_round_merge_uses_concatenated_values_and_stacked_weights():
    """9 -> 3 by hand: each pairwise merge sees the merged heads' X = X_p + X_q."""
    attn, values, out_weight = random_layer(2, 9, 5, 3, 7, seed=8)
    merged, alphas = merge_heads(attn, values, out_weight, 3)
    outputs = head_outputs(values, out_weight)

    def pair(a_p, a_q, x_p, x_q):
        delta = a_p - a_q
        u, w = delta @ x_p, delta @ x_q
        alpha = ((u * (u + w)).sum((-2, -1)) / (u + w).pow(2).sum((-2, -1))).clamp(0, 1)
        return alpha[:, None, None] * a_p + (1 - alpha[:, None, None]) * a_q, x_p + x_q, alpha

    maps = [(attn[:, h], outputs[:, h]) for h in range(9)]
    manual_alphas = []
    round_one = []
    for i in range(0, 8, 2):
        a, x, alpha = pair(maps[i][0], maps[i + 1][0], maps[i][1], maps[i + 1][1])
        round_one.append((a, x))
        manual_alphas.append(alpha)
    round_one.append(maps[8])
    round_two = []
    for i in range(0, 4, 2):
        a, x, alpha = pair(round_one[i][0], round_one[i + 1][0], round_one[i][1], round_one[i + 1][1])
        round_two.append((a, x))
        manual_alphas.append(alpha)
    expected = torch.stack([round_two[0][0], round_two[1][0], round_one[4][0]], dim=1)
    torch.testing.assert_close(merged, expected)
    torch.testing.assert_close(alphas, torch.stack(manual_alphas, dim=1))
    assert head_groups(9, 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 12).flatmap(lambda m: st.tuples(st.just(m), st.integers(1, m))),
    st.integers(1, 3), st.integers(1, 9), st.integers(1, 6),
    st.sampled_from(['progressive', 'balanced']), st.sampled_from(['shd', 'mean', 'select']),
    st.booleans(), st.integers(0, 2 ** 16),
)
def test_merged_maps_are_row_stochastic(counts, batch, tokens, head_dim, grouping, merge, per_row, seed):
    teacher_heads, student_heads = counts
    attn, values, out_weight = random_layer(batch, teacher_heads, tokens, head_dim, 5, seed, dtype=torch.float32)
    merged, alphas = merge_heads(
        attn, values, out_weight, student_heads, grouping=grouping, merge=merge, per_row=per_row)
    assert merged.shape == (batch, student_heads, tokens, tokens)
    assert (merged >= 0).all()
    torch.testing.assert_close(merged.sum(-1), torch.ones(batch, student_heads, tokens))
    assert alphas.shape[:2] == (batch, teacher_heads - student_heads)
    assert ((alphas >= 0) & (alphas <= 1)).all()


def test_ablation_baselines():
    attn, values, out_weight = random_layer(2, 4, 5, 3, 6, seed=9)
    mean, _ = merge_heads(attn, None, None, 2, merge='mean')
    select, _ = merge_heads(attn, None, None, 2, merge='select')
    torch.testing.assert_close(mean, torch.stack([attn[:, 0:2].mean(1), attn[:, 2:4].mean(1)], dim=1))
    torch.testing.assert_close(select, attn[:, [0, 2]])


def test_inconsistent_inputs_are_clear_errors():
    attn, values, out_weight = random_layer(2, 4, 5, 3, 6, seed=10)
    with pytest.raises(ValueError, match=r'values must be \(B, M, N, d\)'):
        merge_heads(attn, values[:, :3], out_weight, 2)
    with pytest.raises(ValueError, match=r'out_weight must be the \(D, M\*d\) = \(D, 12\)'):
        merge_heads(attn, values, out_weight[:, :10], 2)
    with pytest.raises(ValueError, match='teacher has 4 heads but the student has 5'):
        merge_heads(attn, values, out_weight, 5)
    with pytest.raises(ValueError, match="Unknown merge 'max'"):
        merge_heads(attn, values, out_weight, 2, merge='max')
