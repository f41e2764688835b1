"""SHD capture on the diffusers transformer families: SD3, SD3.5 (dual attention), Flux, PixArt, HunyuanDiT, Wan,
CogVideoX.

For each family, with tiny random configs (2 attention blocks, 4 teacher and 2 student heads): outputs are
bit-identical with the capture recording; the captured maps equal softmax(q k^T * scale) from an eager recomputation
of that processor written here from the module's weights (projections, norms, RoPE, the text + image concatenation
order); the SHD loss is 0 against a copy; a 4 -> 2 head pair trains with gradient only in the student's q/k path; and
mismatched token sets are clear errors. Run with diffusers ``tiny_diffusers.TESTED_DIFFUSERS``; a family whose class
the installed diffusers lacks is skipped, saying so.
"""
import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import diffusers
import pytest
import tiny_diffusers as tiny
import torch
from diffusers.models.embeddings import apply_rotary_emb

from shd_plugins import AttentionCapture, SHDDistiller, find_attention_layers
from shd_plugins.core import RowProjections


def arg(args, kwargs, index, name):
    return kwargs[name] if name in kwargs else (args[index] if len(args) > index else None)


def split_heads(x, heads):
    """(B, N, H*d) -> (B, H, N, d)."""
    return x.view(*x.shape[:2], heads, -1).transpose(1, 2)


def eager_plain(attn, args, kwargs):
    """PixArt self-attention (AttnProcessor2_0): the projections, heads split."""
    x = arg(args, kwargs, 0, 'hidden_states')
    return split_heads(attn.to_q(x), attn.heads), split_heads(attn.to_k(x), attn.heads), None


def eager_sd3(attn, args, kwargs):
    """JointAttnProcessor2_0: per-stream q/k norms, image tokens first, then text."""
    x, context = arg(args, kwargs, 0, 'hidden_states'), arg(args, kwargs, 1, 'encoder_hidden_states')
    q, k = split_heads(attn.to_q(x), attn.heads), split_heads(attn.to_k(x), attn.heads)
    if attn.norm_q is not None:
        q, k = attn.norm_q(q), attn.norm_k(k)
    if context is None:
        return q, k, None
    cq, ck = split_heads(attn.add_q_proj(context), attn.heads), split_heads(attn.add_k_proj(context), attn.heads)
    if attn.norm_added_q is not None:
        cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
    return torch.cat([q, cq], 2), torch.cat([k, ck], 2), slice(x.shape[1], x.shape[1] + context.shape[1])


def eager_flux(attn, args, kwargs):
    """FluxAttnProcessor: RMS q/k norms per stream, text first, then RoPE over the joint sequence."""
    x, context = arg(args, kwargs, 0, 'hidden_states'), arg(args, kwargs, 1, 'encoder_hidden_states')
    rope = arg(args, kwargs, 3, 'image_rotary_emb')
    d = attn.head_dim
    q, k = attn.norm_q(attn.to_q(x).unflatten(-1, (-1, d))), attn.norm_k(attn.to_k(x).unflatten(-1, (-1, d)))
    text = None
    if context is not None:
        cq = attn.norm_added_q(attn.add_q_proj(context).unflatten(-1, (-1, d)))
        ck = attn.norm_added_k(attn.add_k_proj(context).unflatten(-1, (-1, d)))
        q, k, text = torch.cat([cq, q], 1), torch.cat([ck, k], 1), slice(0, context.shape[1])
    q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
    return q.transpose(1, 2), k.transpose(1, 2), text


def eager_hunyuan(attn, args, kwargs):
    """HunyuanAttnProcessor2_0: LayerNorm q/k per head, then 2D RoPE."""
    x, rope = arg(args, kwargs, 0, 'hidden_states'), kwargs['image_rotary_emb']
    q = attn.norm_q(split_heads(attn.to_q(x), attn.heads))
    k = attn.norm_k(split_heads(attn.to_k(x), attn.heads))
    return apply_rotary_emb(q, rope), apply_rotary_emb(k, rope), None


def eager_wan(attn, args, kwargs):
    """WanAttnProcessor: RMSNorm across all heads, then RoPE on interleaved pairs (written out here)."""
    x, (cos, sin) = arg(args, kwargs, 0, 'hidden_states'), arg(args, kwargs, 3, 'rotary_emb')

    def rotate(t):  # (B, N, H, d); cos/sin (1, N, 1, d) repeat each frequency twice
        t1, t2 = t[..., 0::2], t[..., 1::2]
        c, s = cos[..., 0::2], sin[..., 0::2]
        return torch.stack([t1 * c - t2 * s, t1 * s + t2 * c], dim=-1).flatten(-2)
    q = rotate(attn.norm_q(attn.to_q(x)).unflatten(2, (attn.heads, -1)))
    k = rotate(attn.norm_k(attn.to_k(x)).unflatten(2, (attn.heads, -1)))
    return q.transpose(1, 2), k.transpose(1, 2), None


def eager_cogvideox(attn, args, kwargs):
    """CogVideoXAttnProcessor2_0: text first, one set of projections, LayerNorm q/k, RoPE on the video tokens only."""
    x, context = arg(args, kwargs, 0, 'hidden_states'), arg(args, kwargs, 1, 'encoder_hidden_states')
    rope, text = kwargs['image_rotary_emb'], context.shape[1]
    joint = torch.cat([context, x], 1)
    q = attn.norm_q(split_heads(attn.to_q(joint), attn.heads))
    k = attn.norm_k(split_heads(attn.to_k(joint), attn.heads))
    q = torch.cat([q[:, :, :text], apply_rotary_emb(q[:, :, text:], rope)], 2)
    k = torch.cat([k[:, :, :text], apply_rotary_emb(k[:, :, text:], rope)], 2)
    return q, k, slice(0, text)


@dataclass
class Family:
    name: str
    cls: str  # the diffusers class (skip when the installed diffusers lacks it)
    build: Callable
    inputs: Callable
    eager: Callable
    layers: list[str]
    mismatch: dict = field(default_factory=lambda: {'text': 6})  # student inputs whose token set differs
    joint: bool = True

    def __repr__(self) -> str:
        return self.name


FAMILIES = [
    Family('sd3', 'SD3Transformer2DModel', tiny.sd3, tiny.sd3_inputs, eager_sd3,
           ['transformer_blocks.0.attn', 'transformer_blocks.1.attn']),
    Family('sd3.5', 'SD3Transformer2DModel', lambda heads=4, seed=0: tiny.sd3(heads, seed, dual=True), tiny.sd3_inputs,
           eager_sd3, ['transformer_blocks.0.attn', 'transformer_blocks.0.attn2', 'transformer_blocks.1.attn']),
    Family('flux', 'FluxTransformer2DModel', tiny.flux, tiny.flux_inputs, eager_flux,
           ['transformer_blocks.0.attn', 'single_transformer_blocks.0']),
    Family('pixart', 'PixArtTransformer2DModel', tiny.pixart, tiny.pixart_inputs, eager_plain,
           ['transformer_blocks.0.attn1', 'transformer_blocks.1.attn1'], {'size': 12}, joint=False),
    Family('hunyuandit', 'HunyuanDiT2DModel', tiny.hunyuan, tiny.hunyuan_inputs, eager_hunyuan,
           ['blocks.0.attn1', 'blocks.1.attn1'], {'size': 12}, joint=False),
    Family('wan', 'WanTransformer3DModel', tiny.wan, tiny.wan_inputs, eager_wan,
           ['blocks.0.attn1', 'blocks.1.attn1'], {'frames': 1}, joint=False),
    Family('cogvideox', 'CogVideoXTransformer3DModel', tiny.cogvideox, tiny.cogvideox_inputs, eager_cogvideox,
           ['transformer_blocks.0.attn1', 'transformer_blocks.1.attn1']),
]


@pytest.fixture(params=FAMILIES, ids=repr)
def family(request) -> Family:
    fam = request.param
    if not hasattr(diffusers, fam.cls):
        pytest.skip(f'diffusers {diffusers.__version__} has no {fam.cls} (these tests ran with diffusers '
                    f'{" and ".join(tiny.TESTED_DIFFUSERS)})')
    return fam


def attention_module(module):
    """The attention whose forward computes a layer's map (Flux's single-stream layer is the block)."""
    return module.attn if type(module).__name__ == 'FluxSingleTransformerBlock' else module


def sample(model, inputs):
    return model(**inputs, return_dict=False)[0]


def hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_outputs_are_bit_identical_and_maps_equal_the_eager_processor(family):
    model, inputs = family.build(), family.inputs()
    layers = find_attention_layers(model)
    assert [layer.name for layer in layers] == family.layers  # each layer once, in forward order
    reference = sample(model, inputs)
    calls = {}
    handles = [attention_module(layer.module).register_forward_pre_hook(
        lambda m, args, kwargs, i=i: calls.__setitem__(i, (args, kwargs)), with_kwargs=True)
        for i, layer in enumerate(layers)]
    with AttentionCapture(model, record_values=True) as capture:
        with capture.recording():
            assert torch.equal(sample(model, inputs), reference)
        with torch.no_grad():
            for i, layer in enumerate(layers):
                q, k, text = family.eager(attention_module(layer.module), *calls[i])
                if attention_module(layer.module) is not layer.module:  # Flux single-stream: the block put text first
                    text = slice(0, inputs['encoder_hidden_states'].shape[1])
                expected = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
                rec = capture[i]
                assert rec.text == text and rec.v.shape == rec.q.shape == q.shape
                assert rec.scale == layer.scale == q.shape[-1] ** -0.5
                torch.testing.assert_close(rec.logits().softmax(-1), expected, atol=1e-5, rtol=1e-5)
    for handle in handles:
        handle.remove()
    assert hooks(model) == 0
    assert torch.equal(sample(model, inputs), reference)


@pytest.mark.parametrize('tokens', ['all', 'image'])
def test_shd_loss_is_zero_against_a_copy(family, tokens):
    teacher = family.build()
    student, inputs = copy.deepcopy(teacher), family.inputs()
    with SHDDistiller(teacher, student, tokens=tokens) as distiller:
        with distiller.recording():
            distiller.teacher_forward(**inputs)
            sample(student, inputs)
        out = distiller.compute_loss()
    assert len(out.layer_losses) == len(family.layers)
    assert out.value.item() < 1e-6


def test_four_to_two_heads_train_only_the_student_qk_path(family):
    teacher, student = family.build(heads=4), family.build(heads=2, seed=1).train()
    before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    inputs = family.inputs()
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    with SHDDistiller(teacher, student, temperature=2.0) as distiller:
        for _ in range(6):
            optimizer.zero_grad(set_to_none=True)
            with distiller.recording():
                distiller.teacher_forward(**inputs)
                sample(student, inputs)
            out = distiller.compute_loss()
            out.loss.backward()
            optimizer.step()
            losses.append(out.value.item())
        last = distiller.student_capture.layers[-1].module
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(torch.equal(p, before[name]) and p.grad is None for name, p in teacher.named_parameters())
    attn = attention_module(last)  # the last layer's v and output projection feed no distilled map
    assert attn.to_q.weight.grad.abs().sum() > 0 and attn.to_k.weight.grad.abs().sum() > 0
    outputs = [attn.to_v] + ([attn.to_out[0]] if hasattr(attn, 'to_out') else [last.proj_out])
    assert all(linear.weight.grad is None for linear in outputs)


def test_different_token_sets_are_named_errors(family):
    teacher, student = family.build(heads=4), family.build(heads=2, seed=1)
    with SHDDistiller(teacher, student) as distiller:
        with distiller.recording():
            distiller.teacher_forward(**family.inputs())
            sample(student, family.inputs(**family.mismatch))
        teacher_q, student_q = distiller.teacher_capture[0].q, distiller.student_capture[0].q
        with pytest.raises(ValueError, match='different token (sets|counts)') as error:
            distiller.compute_loss()
        message = str(error.value)
        if family.joint:  # both joint shapes named
            assert str(tuple(teacher_q.shape)) in message and str(tuple(student_q.shape)) in message
        else:  # both (B, H, T, T) score shapes named
            assert f'{teacher_q.shape[-2]}, {teacher_q.shape[-2]})' in message
            assert f'{student_q.shape[-2]}, {student_q.shape[-2]})' in message
    if family.joint:  # the image x image block does not depend on the text length
        with SHDDistiller(teacher, student, tokens='image') as distiller:
            with distiller.recording():
                distiller.teacher_forward(**family.inputs())
                sample(student, family.inputs(**family.mismatch))
            assert torch.isfinite(distiller.compute_loss().value)


def test_joint_projections_follow_each_stream():
    sd3, flux = tiny.sd3(dual=True), tiny.flux()
    with AttentionCapture(sd3, record_values=True) as capture, capture.recording():
        sample(sd3, tiny.sd3_inputs())
        first, self_attention, last = capture[0].projections(), capture[1].projections(), capture[2].projections()
    block0, block1 = sd3.transformer_blocks
    assert [(a, b) for a, b, _ in first.segments] == [(0, 16), (16, 21)]  # image first, then 5 text tokens
    assert first.segments[0][2] is block0.attn.to_out[0].weight
    assert first.segments[1][2] is block0.attn.to_add_out.weight
    assert self_attention is block0.attn2.to_out[0].weight
    assert last.segments[1][2] is None  # context_pre_only: the last block discards the text rows' outputs
    with AttentionCapture(flux, record_values=True) as capture, capture.recording():
        sample(flux, tiny.flux_inputs())
        double, single = capture[0].projections(), capture[1].projections()
    assert isinstance(double, RowProjections)
    assert [(a, b) for a, b, _ in double.segments] == [(0, 5), (5, 21)]  # text first
    assert double.segments[0][2] is flux.transformer_blocks[0].attn.to_add_out.weight
    assert double.segments[1][2] is flux.transformer_blocks[0].attn.to_out[0].weight
    proj_out = flux.single_transformer_blocks[0].proj_out.weight
    assert torch.equal(single, proj_out[:, :32])  # one projection for text and image rows: no row segments


def test_flux_attention_masks_enter_the_captured_map():
    model, inputs = tiny.flux(), tiny.flux_inputs()
    mask = torch.ones(2, 21, dtype=torch.bool)
    mask[1, 3:5] = False  # the second prompt is 3 tokens long, padded to 5
    inputs['joint_attention_kwargs'] = {'attention_mask': mask}
    reference = sample(model, inputs)
    with AttentionCapture(model) as capture, capture.recording():
        assert torch.equal(sample(model, inputs), reference)
        for i in capture.selected:
            probs = capture[i].logits().softmax(-1)
            assert probs[1, :, :, 3:5].abs().max() == 0 and probs[0, :, :, 3:5].min() > 0
            torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs[..., 0]))
    student = copy.deepcopy(model)  # masked logits stay finite: the loss against a copy is 0, not NaN
    with SHDDistiller(model, student, temperature=0.5) as distiller:
        with distiller.recording():
            distiller.teacher_forward(**inputs)
            sample(student, inputs)
        assert distiller.compute_loss().value.item() < 1e-6


@pytest.mark.parametrize('build, inputs', [(tiny.flux, tiny.flux_inputs), (tiny.sd3, tiny.sd3_inputs)])
def test_gradient_checkpointing_passes_block_arguments_by_position(build, inputs):
    teacher, inputs = build(heads=4), inputs()
    results = []
    for checkpointing in (False, True):
        student = build(heads=2, seed=1).train()
        if checkpointing:
            student.enable_gradient_checkpointing()
        with SHDDistiller(teacher, student) as distiller:
            with distiller.recording():
                distiller.teacher_forward(**inputs)
                sample(student, inputs)
            out = distiller.compute_loss()
        out.loss.backward()
        results.append((out.value, [p.grad for p in student.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for plain, checkpointed in zip(results[0][1], results[1][1], strict=True):
        assert (plain is None) == (checkpointed is None)
        if plain is not None:
            torch.testing.assert_close(plain, checkpointed)


def test_refusals_name_the_module_its_class_and_what_is_supported():
    sana = r"Attention module 'transformer_blocks.0.attn1' \(Attention\) is not supported by SHD capture: linear"
    with pytest.raises(ValueError, match=sana + r' attention \(Sana\) never forms a softmax attention map'):
        find_attention_layers(tiny.sana())
    model = tiny.sd3()
    model.transformer_blocks[1].attn.set_processor(diffusers.models.attention_processor.PAGJointAttnProcessor2_0())
    with pytest.raises(ValueError, match=r"'transformer_blocks.1.attn' \(Attention\) .* processor "
                                         r'PAGJointAttnProcessor2_0 is not supported; supported: Attention with'):
        find_attention_layers(model)
    from diffusers.models.transformers.transformer_ltx import LTXAttention
    with pytest.raises(ValueError, match=r"'1' \(LTXAttention\) .* LTXAttention is a diffusers attention class not yet "
                                         r'supported; supported: .*FluxAttention.*WanAttention'):
        find_attention_layers(torch.nn.Sequential(torch.nn.Identity(), LTXAttention(16, heads=2, kv_heads=2,
                                                                                    dim_head=8)))
