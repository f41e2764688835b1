"""Output projections that differ by query row (joint attention: text rows through to_add_out, image rows through
to_out, or discarded): the merge weights against brute force, and the dense and streamed losses against each other."""
import pytest
import torch
from test_streamed import assert_agree, both, layer_pair, logits

from shd_plugins.core import RowProjections, merge_heads, shd_loss, streamed_shd_loss
from shd_plugins.core.streamed import _GRAM_CACHE, _gram_index

BATCH, HEADS, TOKENS, HEAD_DIM, TEXT = 2, 4, 7, 3, 3  # rows [0, 3) text, [3, 7) image


def joint_layer(seed=0):
    gen = torch.Generator().manual_seed(seed)
    attn = (torch.randn(BATCH, HEADS, TOKENS, TOKENS, generator=gen, dtype=torch.float64) * 2).softmax(-1)
    values = torch.randn(BATCH, HEADS, TOKENS, HEAD_DIM, generator=gen, dtype=torch.float64)
    w_img = torch.randn(5, HEADS * HEAD_DIM, generator=gen, dtype=torch.float64)
    w_txt = torch.randn(3, HEADS * HEAD_DIM, generator=gen, dtype=torch.float64) * 2
    return attn, values, w_img, w_txt


def group_outputs(values, heads, weight):
    """Dense X = sum_{h in heads} V_h W_O^h with W_O^h = W[:, h*d:(h+1)*d].T, (B, N, D)."""
    return sum(values[:, h] @ weight[:, h * HEAD_DIM:(h + 1) * HEAD_DIM].t() for h in heads)


def row_errors(a, attn_p, attn_q, heads_p, heads_q, values, segments):
    """E(a) of every query row, each row's outputs through its own segment's projection (0 where discarded); ``a``
    broadcasts against the (B, N, N) maps."""
    a = torch.as_tensor(a, dtype=attn_p.dtype)
    errors = attn_p.new_zeros(torch.broadcast_shapes(a.shape, attn_p.shape)[:-1])
    for start, stop, weight in segments:
        if weight is None:
            continue
        x_p, x_q = group_outputs(values, heads_p, weight), group_outputs(values, heads_q, weight)
        rows = slice(start, stop)
        merged = (a * attn_p + (1 - a) * attn_q)[..., rows, :]
        kept = attn_p[:, rows] @ x_p + attn_q[:, rows] @ x_q
        errors[..., rows] = (merged @ (x_p + x_q) - kept).pow(2).sum(-1)
    return errors


def brute_alpha(errors_at):
    """Argmin on [0, 1] of the quadratic E(a) = c2 a^2 + c1 a + c0 fitted through E(0), E(1/2), E(1); 1/2 when E is
    flat (the vanishing-denominator rule)."""
    e0, e_half, e1 = errors_at(0.0), errors_at(0.5), errors_at(1.0)
    c2 = 2 * (e1 + e0 - 2 * e_half)
    c1 = e1 - e0 - c2
    flat = c2 <= 1e-9 * (e0 + e1) + 1e-300
    return torch.where(flat, torch.full_like(c2, 0.5), (-c1 / torch.where(flat, 1.0, 2 * c2)).clamp(0, 1))


@pytest.mark.parametrize('seed', range(3))
@pytest.mark.parametrize('text', ['projected', 'discarded'])
@pytest.mark.parametrize('per_row', [False, True])
def test_alphas_are_the_brute_force_argmin_with_per_row_projections(seed, text, per_row):
    attn, values, w_img, w_txt = joint_layer(seed)
    segments = ((0, TEXT, w_txt if text == 'projected' else None), (TEXT, TOKENS, w_img))
    merged, alphas = merge_heads(attn, values, RowProjections(segments, TOKENS), 1, per_row=per_row)
    # 4 -> 1 progressive: round 1 merges (0, 1) and (2, 3), round 2 the two merged groups.
    round_one = [(attn[:, 0], attn[:, 1], [0], [1]), (attn[:, 2], attn[:, 3], [2], [3])]
    weights = [alphas[:, k, :, None] if per_row else alphas[:, k, None, None] for k in range(2)]
    mixed = [w * a + (1 - w) * b for w, (a, b, _, _) in zip(weights, round_one)]
    pairs = round_one + [(mixed[0], mixed[1], [0, 1], [2, 3])]
    for k, (attn_p, attn_q, heads_p, heads_q) in enumerate(pairs):
        def errors_at(a, attn_p=attn_p, attn_q=attn_q, heads_p=heads_p, heads_q=heads_q):
            errors = row_errors(a, attn_p, attn_q, heads_p, heads_q, values, segments)
            return errors if per_row else errors.sum(-1)

        torch.testing.assert_close(alphas[:, k], brute_alpha(errors_at), rtol=0, atol=1e-9)
        if not per_row:  # and a fine grid agrees that nothing on [0, 1] does better
            grid_errors = errors_at(torch.linspace(0, 1, 2001, dtype=torch.float64)[:, None, None, None])
            assert (errors_at(alphas[:, k, None, None]) <= grid_errors.min(0).values * (1 + 1e-9) + 1e-12).all()
    if text == 'discarded' and per_row:  # rows without outputs: nothing to keep, the 1/2 of a vanishing denominator
        assert (alphas[..., :TEXT] == 0.5).all()
    torch.testing.assert_close(merged.sum(-1), torch.ones_like(merged.sum(-1)))


def test_projections_differ_from_one_weight_for_all_rows():
    attn, values, w_img, w_txt = joint_layer()
    _, joint = merge_heads(attn, values, RowProjections(((0, TEXT, w_txt), (TEXT, TOKENS, w_img)), TOKENS), 2)
    _, image_only = merge_heads(attn, values, w_img, 2)
    assert not torch.allclose(joint, image_only)


@pytest.mark.parametrize('per_row', [False, True])
def test_one_segment_gives_exactly_the_plain_weight_results(per_row):
    attn, values, w_img, _ = joint_layer()
    one = RowProjections(((0, TOKENS, w_img),), TOKENS)
    for num_heads in (3, 2, 1):
        plain = merge_heads(attn, values, w_img, num_heads, per_row=per_row)
        for got, want in zip(merge_heads(attn, values, one, num_heads, per_row=per_row), plain):
            assert torch.equal(got, want)
    # The same weight split in two segments: the same weights up to summation order.
    split = RowProjections(((0, TEXT, w_img), (TEXT, TOKENS, w_img)), TOKENS)
    torch.testing.assert_close(merge_heads(attn, values, split, 1, per_row=per_row)[1],
                               merge_heads(attn, values, w_img, 1, per_row=per_row)[1], rtol=1e-12, atol=1e-12)

    teacher, student = layer_pair(teacher_heads=9, student_heads=3)
    args = (logits(student['q'], student['k'], student['scale']), logits(teacher['q'], teacher['k'],
                                                                         teacher['scale']), teacher['v'])
    one = RowProjections(((0, 10, teacher['w']),), 10)
    for prefix in (0, 1):
        for got, want in zip(shd_loss(*args, one, per_row=per_row, prefix_tokens=prefix, return_alphas=True),
                             shd_loss(*args, teacher['w'], per_row=per_row, prefix_tokens=prefix, return_alphas=True)):
            assert torch.equal(got, want)
        streamed_args = (student['q'], student['k'], student['scale'], teacher['q'], teacher['k'], teacher['v'])
        options = dict(teacher_scale=teacher['scale'], per_row=per_row, prefix_tokens=prefix, block_rows=3,
                       return_alphas=True)
        for got, want in zip(streamed_shd_loss(*streamed_args, one, **options),
                             streamed_shd_loss(*streamed_args, teacher['w'], **options)):
            assert torch.equal(got, want)


def joint_teacher(text_weight: str, seed=0):
    """A 9 -> 3 layer pair over 1 prefix + 9 tokens, teacher rows [0, 4) text and [4, 10) image."""
    teacher, student = layer_pair(teacher_heads=9, student_heads=3, tokens=10, seed=seed)
    gen = torch.Generator().manual_seed(seed + 7)
    w_txt = None if text_weight == 'discarded' else torch.randn(6, teacher['w'].shape[1], generator=gen) * 2
    teacher['w'] = RowProjections(((0, 4, w_txt), (4, 10, teacher['w'])), 10)
    return teacher, student


@pytest.mark.parametrize('text', ['projected', 'discarded'])
@pytest.mark.parametrize('per_row', [False, True])
@pytest.mark.parametrize('grouping', ['progressive', 'balanced'])
@pytest.mark.parametrize('block_rows', [2, None])
def test_streamed_agrees_with_dense(text, per_row, grouping, block_rows):
    teacher, student = joint_teacher(text)
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[0, 5:7] = False
    key_mask[1, 1] = False
    # After the prefix row is dropped the text rows are [0, 3): blocks of 2 rows straddle the boundary at 3.
    dense, streamed = both(teacher, student, merge='shd', per_row=per_row, grouping=grouping, temperature=2.0,
                           prefix_tokens=(1, 1), key_mask=key_mask, block_rows=block_rows)
    assert_agree(dense, streamed)
    torch.testing.assert_close(streamed[1], dense[1], rtol=1e-5, atol=1e-6)
    if text == 'discarded' and per_row:
        assert (dense[1][..., :3] == 0.5).all()


def test_streamed_keeps_one_gram_per_weight_and_saves_no_n_by_n_tensor():
    teacher, student = joint_teacher('projected')
    weights = [weight for _, _, weight in teacher['w'].segments]
    args = (student['q'], student['k'], student['scale'], teacher['q'], teacher['k'], teacher['v'], teacher['w'],
            teacher['scale'])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        streamed_shd_loss(*args, block_rows=3)
    assert max(saved) <= 2 * 3 * 10 * 5  # the gradients of q and k, nothing (T x T)
    grams = [_GRAM_CACHE[_gram_index(weight)[1]][2] for weight in weights]
    streamed_shd_loss(*args, block_rows=3)
    assert all(_GRAM_CACHE[_gram_index(weight)[1]][2] is gram for weight, gram in zip(weights, grams))
    with torch.no_grad():  # an in-place change of one weight is seen, the other's Gram is kept
        weights[0].mul_(2.0)
    assert_agree(*both(teacher, student, block_rows=3, prefix_tokens=1))
    now = [_GRAM_CACHE[_gram_index(weight)[1]][2] for weight in weights]
    assert now[0] is not grams[0] and now[1] is grams[1]


def test_take_and_drop_leading_renumber_rows():
    a, b = torch.zeros(2, 12), torch.zeros(3, 12)
    rows = RowProjections([(0, 3, a), (3, 7, b)], 7)
    taken = rows.take(2, 6)
    assert taken.tokens == 4 and [(s, e) for s, e, _ in taken.segments] == [(0, 1), (1, 4)]
    assert taken.segments[0][2] is a and taken.segments[1][2] is b
    dropped = rows.drop_leading(3)
    assert dropped.tokens == 4 and len(dropped.segments) == 1 and dropped.segments[0][:2] == (0, 4)
    assert rows.drop_leading(0) is rows and rows.width == 12
    assert list(rows.row_slices(2, 5)) == [(slice(0, 1), a), (slice(1, 3), b)]
    assert RowProjections(((0, 2, None),), 2).width is None
    with pytest.raises(ValueError, match='drop 7 leading rows'):
        rows.drop_leading(7)
    with pytest.raises(ValueError, match=r'take rows \[4, 4\)'):
        rows.take(4, 4)


@pytest.mark.parametrize('segments, tokens, match', [
    (((0, 3, 'a'), (4, 7, 'b')), 7, r'segment 1 is \[4, 7\) but must start at 3'),  # gap
    (((0, 4, 'a'), (3, 7, 'b')), 7, r'segment 1 is \[3, 7\) but must start at 4'),  # overlap
    (((1, 7, 'a'),), 7, r'segment 0 is \[1, 7\) but must start at 0'),
    (((0, 3, 'a'), (3, 3, 'b')), 3, r'segment 1 is \[3, 3\)'),  # empty
    (((0, 3, 'a'),), 7, r'cover the rows \[0, 3\) but tokens is 7'),
    ((), 7, r'cover the rows \[0, 0\) but tokens is 7'),
    (((0, 3, 'a'), (3, 7, 'wide')), 7, r'one M\*d.*segment 1 has shape \(3, 15\), the earlier ones M\*d = 12'),
    (((0, 7, 'vector'),), 7, r'segment 0 has shape \(12,\)'),
    (((0, 7),), 7, 'must be \\(start, stop, weight\\)'),
    (((0, 7, 'a'),), 0, 'tokens must be an int >= 1'),
])
def test_construction_errors_name_the_problem(segments, tokens, match):
    weights = dict(a=torch.zeros(2, 12), b=torch.zeros(3, 12), wide=torch.zeros(3, 15), vector=torch.zeros(12))
    segments = tuple(tuple(weights.get(x, x) if isinstance(x, str) else x for x in seg) for seg in segments)
    with pytest.raises(ValueError, match=match):
        RowProjections(segments, tokens)


def test_a_weight_that_is_no_tensor_is_refused():
    with pytest.raises(TypeError, match='segment 0 weight must be a torch.Tensor'):
        RowProjections(((0, 7, [[1.0]]),), 7)


def test_wrong_token_count_and_width_are_named_alike_by_dense_and_streamed():
    attn, values, w_img, w_txt = joint_layer()
    with pytest.raises(ValueError, match='cover 8 query rows but the teacher maps have 7'):
        merge_heads(attn, values, RowProjections(((0, 3, w_txt), (3, 8, w_img)), 8), 2)
    narrow = RowProjections(((0, 3, w_txt[:, :-3]), (3, 7, w_img[:, :-3])), 7)
    with pytest.raises(ValueError, match=r'\(D_s, 9\) weights, but 4 heads of dim 3 need \(D_s, 12\)'):
        merge_heads(attn, values, narrow, 2)
    with pytest.raises(TypeError, match='torch.Tensor or RowProjections, got list'):
        merge_heads(attn, values, [w_img], 2)

    teacher, student = joint_teacher('projected')
    teacher['w'] = teacher['w'].take(0, 9)  # the teacher has 10 query rows (1 prefix + 9)
    for call in (lambda: shd_loss(logits(student['q'], student['k'], student['scale']),
                                  logits(teacher['q'], teacher['k'], teacher['scale']), teacher['v'], teacher['w'],
                                  prefix_tokens=1),
                 lambda: streamed_shd_loss(student['q'], student['k'], student['scale'], teacher['q'], teacher['k'],
                                           teacher['v'], teacher['w'], teacher['scale'], prefix_tokens=1)):
        with pytest.raises(ValueError, match=r'cover 9 query rows but the teacher maps have 10 \(before dropping 1'):
            call()


def test_the_gram_of_a_fresh_view_of_a_weight_is_cached_with_its_base():
    """Flux single-stream blocks hand a new view ``proj_out.weight[:, :inner]`` at every step."""
    teacher, student = joint_teacher('projected')
    base = torch.randn(6, 2 * teacher['w'].width)
    args = (student['q'], student['k'], student['scale'], teacher['q'], teacher['k'], teacher['v'])

    def run():
        view = base[:, :teacher['w'].width]
        streamed_shd_loss(*args, view, teacher['scale'])
        return _GRAM_CACHE[_gram_index(view)[1]][2]
    first = run()
    assert run() is first
    with torch.no_grad():
        base.mul_(2.0)  # a change of the base moves the view's version too
    assert run() is not first
