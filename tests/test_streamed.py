"""The streamed SHD loss (row blocks from q, k, v) against the dense reference shd_loss."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import set_reentrant_ckpt
from tiny_models import dit_inputs, tiny_dit, tiny_vit

from shd_plugins import SHDDistiller
from shd_plugins.core import streamed as streamed_module
from shd_plugins.core.heads import merge_schedule, num_merges
from shd_plugins.core.losses import shd_loss
from shd_plugins.core.merge import merge_heads
from shd_plugins.core.streamed import streamed_shd_loss


def layer_pair(batch=2, teacher_heads=6, student_heads=3, tokens=10, head_dim=4, student_dim=5, width=8, seed=0,
               dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(dtype)

    teacher = dict(q=randn(batch, teacher_heads, tokens, head_dim, std=1.5), k=randn(batch, teacher_heads, tokens,
                   head_dim, std=1.5), v=randn(batch, teacher_heads, tokens, head_dim),
                   w=randn(width, teacher_heads * head_dim), scale=head_dim ** -0.5)
    student = dict(q=randn(batch, student_heads, tokens, student_dim).requires_grad_(True),
                   k=randn(batch, student_heads, tokens, student_dim).requires_grad_(True), scale=student_dim ** -0.5)
    return teacher, student


def logits(q, k, scale):
    dtype = torch.promote_types(q.dtype, torch.float32)
    return (q.to(dtype) * scale) @ k.to(dtype).transpose(-2, -1)


def both(teacher, student, **options):
    """(loss, alphas, grad_q, grad_k) of the dense and the streamed path."""
    results = []
    for streamed in (False, True):
        for tensor in (student['q'], student['k']):
            tensor.grad = None
        if streamed:
            value, alphas = streamed_shd_loss(
                student['q'], student['k'], student['scale'], teacher['q'], teacher['k'], teacher['v'], teacher['w'],
                teacher['scale'], return_alphas=True, **options)
        else:
            dense_options = {key: value for key, value in options.items() if key != 'block_rows'}
            value, alphas = shd_loss(
                logits(student['q'], student['k'], student['scale']), logits(teacher['q'], teacher['k'],
                                                                             teacher['scale']),
                teacher['v'], teacher['w'], return_alphas=True, **dense_options)
        value.backward()
        results.append((value.detach(), alphas, student['q'].grad.clone(), student['k'].grad.clone()))
    return results


def assert_agree(dense, streamed):
    torch.testing.assert_close(streamed[0], dense[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(streamed[1], dense[1], rtol=1e-4, atol=1e-5)
    for got, want in zip(streamed[2:], dense[2:]):
        scale = want.abs().max().clamp_min(1e-12)
        assert ((got - want).abs().max() / scale) < 1e-4, 'gradients differ'


@pytest.fixture(params=['one chunk', 'mixed chunks', 'chunk per group and sample'])
def chunking(request, monkeypatch):
    """The layer in one chunk (what tiny sizes get), chunks of several groups or samples, and one chunk per merge
    group per sample (what long sequences get); the tests' 10 tokens make 800 elements 8 heads of one sample."""
    budget = {'one chunk': None, 'mixed chunks': 800, 'chunk per group and sample': 1}[request.param]
    if budget is not None:
        monkeypatch.setattr(streamed_module, '_CHUNK_ELEMENTS', budget)
    return request.param


def random_masks(batch, tokens, seed=3):
    gen = torch.Generator().manual_seed(seed)
    query = torch.rand(batch, tokens, generator=gen) > 0.3
    key = torch.rand(batch, tokens, generator=gen) > 0.3
    key[:, 0] = True
    return query, key


@pytest.mark.parametrize('heads', [(6, 3), (9, 3), (16, 6), (4, 4), (5, 1)])
@pytest.mark.parametrize('grouping', ['progressive', 'balanced'])
@pytest.mark.parametrize('per_row', [False, True])
def test_agrees_with_dense_over_schedules(heads, grouping, per_row, chunking):
    teacher, student = layer_pair(teacher_heads=heads[0], student_heads=heads[1])
    assert_agree(*both(teacher, student, grouping=grouping, per_row=per_row, block_rows=3))


@pytest.mark.parametrize('merge', ['shd', 'mean', 'select'])
@pytest.mark.parametrize('temperature', [1.0, 2.0, 0.5])
@pytest.mark.parametrize('loss', ['kl', 'mse'])
def test_agrees_with_dense_over_merge_temperature_loss(merge, temperature, loss, chunking):
    teacher, student = layer_pair(teacher_heads=9, student_heads=3)
    assert_agree(*both(teacher, student, merge=merge, temperature=temperature, loss=loss, block_rows=4))


@pytest.mark.parametrize('per_row', [False, True])
@pytest.mark.parametrize('which', ['query', 'key', 'both', 'empty_keys'])
def test_agrees_with_dense_under_masks(per_row, which, chunking):
    teacher, student = layer_pair(teacher_heads=16, student_heads=6)
    query, key = random_masks(2, 10)
    if which == 'empty_keys':
        key[1] = False  # a sample with no valid key contributes nothing
    masks = dict(query=dict(query_mask=query), key=dict(key_mask=key), both=dict(query_mask=query, key_mask=key),
                 empty_keys=dict(key_mask=key))[which]
    assert_agree(*both(teacher, student, per_row=per_row, temperature=2.0, block_rows=3, **masks))


@pytest.mark.parametrize('prefix', [1, (2, 1), (0, 1)])
def test_agrees_with_dense_with_prefix_tokens(prefix, chunking):
    teacher_prefix, student_prefix = (prefix, prefix) if isinstance(prefix, int) else prefix
    teacher, _ = layer_pair(tokens=10 + teacher_prefix)
    _, student = layer_pair(tokens=10 + student_prefix, seed=1)
    query, key = random_masks(2, 10)
    assert_agree(*both(teacher, student, prefix_tokens=prefix, query_mask=query, key_mask=key, block_rows=4))


@pytest.mark.parametrize('heads', [(16, 6), (9, 3), (6, 6), (12, 5)])
@pytest.mark.parametrize('grouping', ['progressive', 'balanced'])
@pytest.mark.parametrize('budget', [1, 250, 10 ** 6])
def test_chunks_tile_the_heads_samples_and_merges(heads, grouping, budget, monkeypatch):
    monkeypatch.setattr(streamed_module, '_CHUNK_ELEMENTS', budget)
    schedule = merge_schedule(*heads, grouping)
    chunks = streamed_module._chunks(schedule, heads[0], batch=3, tokens=5)
    for sample in range(3):
        mine = [chunk for chunk in chunks if chunk.batch.start <= sample < chunk.batch.stop]
        assert [c.student_heads.start for c in mine] == [0] + [c.student_heads.stop for c in mine[:-1]]
        assert [c.teacher_heads.start for c in mine] == [0] + [c.teacher_heads.stop for c in mine[:-1]]
        assert mine[-1].student_heads.stop == heads[1] and mine[-1].teacher_heads.stop == heads[0]
        assert sorted(m for c in mine for m in c.merges) == list(range(num_merges(schedule)))
        for chunk in mine:  # the sub-schedule reduces the chunk's heads to its student heads
            assert num_merges(chunk.schedule) == len(chunk.merges)
            width = chunk.teacher_heads.stop - chunk.teacher_heads.start
            assert width - len(chunk.merges) == chunk.student_heads.stop - chunk.student_heads.start
    if budget == 1:
        assert len(chunks) == 3 * heads[1]
    if budget == 10 ** 6:
        assert len(chunks) == 1


def test_default_block_is_one_block_at_tiny_sizes_and_agrees():
    teacher, student = layer_pair(teacher_heads=16, student_heads=6)
    assert_agree(*both(teacher, student))


def test_float64_inputs_agree_tightly(chunking):
    teacher, student = layer_pair(dtype=torch.float64, teacher_heads=9, student_heads=3)
    dense, streamed = both(teacher, student, block_rows=3, temperature=2.0)
    torch.testing.assert_close(streamed[0], dense[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('merge', ['shd', 'mean'])
@pytest.mark.parametrize('per_row', [False, True])
def test_loss_is_zero_when_the_student_matches(merge, per_row, chunking):
    # A student whose q k^T * scale equals the logs of the merged targets: q = log T, k = identity (d = T).
    teacher, _ = layer_pair(teacher_heads=9, student_heads=3, tokens=6)
    teacher_logits = logits(teacher['q'], teacher['k'], teacher['scale'])
    _, alphas = merge_heads(teacher_logits.softmax(-1), teacher['v'], teacher['w'], 3, merge=merge, per_row=per_row)
    merged, _ = merge_heads(teacher_logits.softmax(-1), None, None, 3, merge=merge, per_row=per_row, alphas=alphas)
    student_q = merged.log()
    student_k = torch.eye(6).expand(2, 3, 6, 6)
    value = streamed_shd_loss(student_q, student_k, 1.0, teacher['q'], teacher['k'], teacher['v'], teacher['w'],
                              teacher['scale'], merge=merge, per_row=per_row, block_rows=4)
    assert abs(value.item()) < 1e-5


def test_teacher_gets_no_gradient_and_student_does():
    teacher, student = layer_pair()
    for name in ('q', 'k', 'v', 'w'):
        teacher[name].requires_grad_(True)
    streamed_shd_loss(student['q'], student['k'], student['scale'], teacher['q'], teacher['k'], teacher['v'],
                      teacher['w'], teacher['scale'], block_rows=3).backward()
    assert all(teacher[name].grad is None for name in ('q', 'k', 'v', 'w'))
    assert student['q'].grad.abs().sum() > 0 and student['k'].grad.abs().sum() > 0


def test_bf16_inputs_under_autocast_compute_in_float32():
    teacher, student = layer_pair(teacher_heads=9, student_heads=3)
    half = {name: (t.detach().bfloat16() if torch.is_tensor(t) else t) for name, t in teacher.items()}
    student_half = {name: (t.detach().bfloat16().requires_grad_(True) if torch.is_tensor(t) else t)
                    for name, t in student.items()}
    with torch.autocast('cpu', dtype=torch.bfloat16):
        value = streamed_shd_loss(student_half['q'], student_half['k'], student_half['scale'], half['q'], half['k'],
                                  half['v'], half['w'], half['scale'], block_rows=3, temperature=2.0)
    assert value.dtype == torch.float32
    value.backward()
    assert student_half['q'].grad.dtype == torch.bfloat16
    dense = shd_loss(logits(student_half['q'], student_half['k'], student_half['scale']),
                     logits(half['q'], half['k'], half['scale']), half['v'], half['w'], temperature=2.0)
    torch.testing.assert_close(value, dense, rtol=1e-5, atol=1e-7)


def _errors(call):
    with pytest.raises(ValueError) as info:
        call()
    return str(info.value)


@pytest.mark.parametrize('case', ['tokens', 'temperature', 'query_mask', 'key_mask', 'prefix', 'heads', 'batch',
                                  'out_weight', 'loss', 'merge'])
def test_bad_input_gives_the_dense_paths_errors(case):
    teacher, student = layer_pair()
    options: dict = {}
    if case == 'tokens':
        teacher, _ = layer_pair(tokens=12)
    elif case == 'temperature':
        options['temperature'] = 0.0
    elif case == 'query_mask':
        options['query_mask'] = torch.ones(2, 9, dtype=torch.bool)
    elif case == 'key_mask':
        options['key_mask'] = torch.ones(3, 10, dtype=torch.bool)
    elif case == 'prefix':
        options['prefix_tokens'] = 10
    elif case == 'heads':
        teacher, _ = layer_pair(teacher_heads=2)
    elif case == 'batch':
        teacher, _ = layer_pair(batch=3)
    elif case == 'out_weight':
        teacher['w'] = teacher['w'][:, :-1]
    elif case == 'loss':
        options['loss'] = 'l1'
    else:
        options['merge'] = 'max'
    dense = _errors(lambda: shd_loss(
        logits(student['q'], student['k'], student['scale']), logits(teacher['q'], teacher['k'], teacher['scale']),
        teacher['v'], teacher['w'], **options))
    streamed = _errors(lambda: streamed_shd_loss(
        student['q'], student['k'], student['scale'], teacher['q'], teacher['k'], teacher['v'], teacher['w'],
        teacher['scale'], **options))
    assert streamed == dense


def test_bad_qk_shapes_and_block_rows_are_named():
    teacher, student = layer_pair()
    with pytest.raises(ValueError, match='student q and k'):
        streamed_shd_loss(student['q'], student['k'][..., :-1], 1.0, teacher['q'], teacher['k'], teacher['v'],
                          teacher['w'], 1.0)
    with pytest.raises(ValueError, match='block_rows'):
        streamed_shd_loss(student['q'], student['k'], 1.0, teacher['q'], teacher['k'], teacher['v'], teacher['w'],
                          1.0, block_rows=0)


def distiller_run(teacher, student, inputs, dense, autocast=False, **options):
    """Loss, per-layer losses, merge weights and the student's gradients of one SHDDistiller step."""
    student.zero_grad()
    with SHDDistiller(teacher, student, dense=dense, **options) as distiller:
        with distiller.recording(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            if isinstance(inputs, dict):
                distiller.teacher_forward(**inputs)
                student(**inputs)
            else:
                distiller.teacher_forward(inputs)
                student(inputs)
        out = distiller.compute_loss()
        out.loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return out, grads


def assert_distillers_agree(dense, streamed, grad_rtol=1e-4):
    (dense_out, dense_grads), (streamed_out, streamed_grads) = dense, streamed
    torch.testing.assert_close(streamed_out.value, dense_out.value, rtol=1e-5, atol=1e-7)
    assert dense_out.layer_losses.keys() == streamed_out.layer_losses.keys()
    for key in dense_out.layer_losses:
        torch.testing.assert_close(streamed_out.layer_losses[key], dense_out.layer_losses[key], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(streamed_out.alphas[key], dense_out.alphas[key], rtol=1e-4, atol=1e-5)
    assert dense_grads.keys() == streamed_grads.keys() and dense_grads
    # Relative to the largest gradient: some are zero up to rounding (a key bias shifts every score of a row alike).
    scale = max(grad.abs().max() for grad in dense_grads.values())
    for name, want in dense_grads.items():
        assert ((streamed_grads[name] - want).abs().max() / scale) < grad_rtol, name


@pytest.mark.parametrize('options', [dict(), dict(temperature=2.0, per_row=True), dict(grouping='balanced')])
def test_distiller_streamed_equals_dense_on_timm_vits_with_checkpointing(options):
    torch.manual_seed(0)
    teacher = timm.create_model('deit_tiny_distilled_patch16_224', pretrained=False, img_size=32, patch_size=8,
                                embed_dim=72, depth=2, num_heads=9, num_classes=10)
    student = tiny_vit(num_heads=3, embed_dim=24, seed=1)
    student.set_grad_checkpointing(True)
    set_reentrant_ckpt(False)
    x = torch.randn(2, 3, 32, 32)
    dense = distiller_run(teacher, student, x, True, tokens='patch', **options)
    assert_distillers_agree(dense, distiller_run(teacher, student, x, False, tokens='patch', **options))


def test_distiller_streamed_equals_dense_on_diffusers_dits_with_checkpointing():
    teacher, student = tiny_dit(num_heads=16, head_dim=4), tiny_dit(num_heads=6, head_dim=4, seed=1)
    teacher.eval(), student.eval()  # no label dropout: both runs see the same labels
    student.enable_gradient_checkpointing()
    inputs = dit_inputs()
    dense = distiller_run(teacher, student, inputs, True, temperature=2.0)
    assert_distillers_agree(dense, distiller_run(teacher, student, inputs, False, temperature=2.0))


def test_distiller_streamed_equals_dense_under_bf16_autocast():
    teacher, student = tiny_vit(num_heads=8), tiny_vit(num_heads=2, seed=1)
    x = torch.randn(2, 3, 32, 32)
    dense = distiller_run(teacher, student, x, True, autocast=True)
    streamed = distiller_run(teacher, student, x, False, autocast=True)
    assert streamed[0].value.dtype == torch.float32
    # q and k are bf16: their gradients round to bf16, where one ulp (2^-8) can flip between equal float32 paths.
    assert_distillers_agree(dense, streamed, grad_rtol=1e-2)


def test_distiller_default_is_streamed():
    teacher, student = tiny_vit(num_heads=8), tiny_vit(num_heads=2, seed=1)
    with SHDDistiller(teacher, student) as distiller:
        assert not distiller.dense


def test_autograd_saves_no_n_by_n_tensor():
    teacher, student = layer_pair(teacher_heads=16, student_heads=6, tokens=48, head_dim=4, student_dim=4)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        dense = shd_loss(logits(student['q'], student['k'], student['scale']),
                         logits(teacher['q'], teacher['k'], teacher['scale']), teacher['v'], teacher['w'])
        dense_max, saved[:] = max(saved), []
        streamed_shd_loss(student['q'], student['k'], student['scale'], teacher['q'], teacher['k'], teacher['v'],
                          teacher['w'], teacher['scale'])
    assert dense_max >= 2 * 6 * 48 * 48 and dense.requires_grad
    assert max(saved, default=0) <= 2 * 6 * 48 * 4  # the gradients of q and k, nothing (T x T)


def test_under_no_grad_the_value_is_the_same_and_carries_no_graph():
    teacher, student = layer_pair(teacher_heads=9, student_heads=3)
    args = (student['q'], student['k'], student['scale'], teacher['q'], teacher['k'], teacher['v'], teacher['w'],
            teacher['scale'])
    with torch.no_grad():
        logged = streamed_shd_loss(*args, block_rows=4)
    assert not logged.requires_grad
    torch.testing.assert_close(logged, streamed_shd_loss(*args, block_rows=4).detach())


def test_the_cached_output_gram_follows_in_place_changes_of_the_weight():
    teacher, student = layer_pair(teacher_heads=9, student_heads=3)
    assert_agree(*both(teacher, student))
    with torch.no_grad():  # e.g. an EMA teacher updated in place: the merge weights must see the new weight
        teacher['w'].mul_(torch.linspace(0.1, 3.0, teacher['w'].shape[1]))
    assert_agree(*both(teacher, student))
