"""Rotary timm ViTs (EVA02, vit_*_rope, mixed RoPE): the capture records q/k as the attention kernel gets them."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import AttentionRope, apply_rot_embed_cat
from timm.models.eva import EvaAttention
from timm.models.swin_transformer import WindowAttention
from timm.models.swin_transformer_v2 import WindowAttention as WindowAttentionV2
from timm.models.swin_transformer_v2_cr import WindowMultiHeadAttention

from shd_plugins import AttentionCapture, SHDConfig, SHDDistiller, find_attention_layers
from shd_plugins.capture import adapter_for
from shd_plugins.core.losses import shd_loss

MODELS = {
    'eva02': ('eva02_tiny_patch14_224', {}),  # EvaAttention; fused qkv with q/v biases (qkv is not called)
    'eva02_separate_qkv': ('eva02_tiny_patch14_224', dict(qkv_fused=False)),  # EVA02-B/L layout
    'vit_rope_reg': ('vit_medium_patch16_rope_reg1_gap_256', {}),  # EvaAttention; one register, no cls token
    'vit_rope': ('vit_small_patch16_rope_224', {}),  # AttentionRope, axial RoPE
    'vit_rope_mixed': ('vit_small_patch16_rope_mixed_224', {}),  # AttentionRope, learnt per-layer per-head RoPE
    'vit_rope_gqa': ('vit_small_patch16_rope_224',  # grouped k/v heads, QK-norm, 'half' rotation layout
                     dict(qkv_fused=False, num_kv_heads=2, qk_norm=True, rope_rotate_half=True)),
}


def tiny(key: str, num_heads: int = 4, seed: int = 0, **extra) -> torch.nn.Module:
    name, kwargs = MODELS[key]
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2,
                             num_heads=num_heads, num_classes=10, **(kwargs | extra))


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def set_fused(model, fused: bool) -> None:
    for layer in find_attention_layers(model):
        layer.module.fused_attn = fused


def eager_attention(model, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(softmax(q k^T * scale), v, logits) of every layer, from the weights, the model's rope and timm's rotation."""
    inputs = {}
    handles = [blk.attn.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
               for i, blk in enumerate(model.blocks)]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    rope = model.rope.get_embed()
    maps = []
    for i, blk in enumerate(model.blocks):
        attn, h = blk.attn, inputs[i]
        batch, tokens, _ = h.shape
        heads, head_dim = attn.num_heads, attn.head_dim
        kv_heads = getattr(attn, 'num_kv_heads', heads)
        if attn.qkv is not None:
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)) if getattr(attn, 'q_bias', None) is not None \
                else attn.qkv.bias
            q, k, v = F.linear(h, attn.qkv.weight, bias).view(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = (proj(h).view(batch, tokens, n, head_dim).transpose(1, 2)
                       for proj, n in ((attn.q_proj, heads), (attn.k_proj, kv_heads), (attn.v_proj, kv_heads)))
        layer_rope = rope[i] if model.rope_mixed else rope
        prefix = attn.num_prefix_tokens
        q, k = (torch.cat([t[:, :, :prefix], apply_rot_embed_cat(t[:, :, prefix:], layer_rope, half=attn.rotate_half)],
                          dim=2) for t in (attn.q_norm(q), attn.k_norm(k)))
        k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
        logits = q @ k.transpose(-2, -1) * attn.scale
        maps.append((logits.softmax(-1), v, logits))
    return maps


class Float32Norm(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), x.shape[-1:])


def no_gradient(p: torch.Tensor) -> bool:
    return p.grad is None or not p.grad.any()


@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('key', list(MODELS))
def test_outputs_are_bit_identical_with_capture(key, fused):
    model = tiny(key).eval()
    set_fused(model, fused)
    assert all(adapter_for(layer.module).name == 'timm_rope' for layer in find_attention_layers(model))
    reference = model(images())
    with AttentionCapture(model, record_values=True) as capture, capture.recording():
        assert torch.equal(model(images()), reference)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


@pytest.mark.parametrize('key', list(MODELS))
def test_captured_maps_equal_eager_rope_attention_and_the_unfused_path(key):
    model = tiny(key).eval()
    expected = eager_attention(model, images())
    set_fused(model, False)
    probs = {}  # attn_drop receives the model's own softmax map on the unfused path
    for i, blk in enumerate(model.blocks):
        blk.attn.attn_drop.register_forward_hook(lambda m, a, out, i=i: probs.__setitem__(i, out))
    with AttentionCapture(model, record_values=True) as capture:
        with capture.recording():
            model(images())
        for i, (probs_eager, v_eager, _) in enumerate(expected):
            rec = capture[i]
            captured = rec.logits().softmax(-1)
            torch.testing.assert_close(captured, probs_eager, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(captured, probs[i], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(rec.v, v_eager, rtol=1e-5, atol=1e-6)
            assert rec.out_weight is model.blocks[i].attn.proj.weight


def test_rotation_changes_the_map():
    """The recorded map is the rotated one: the same weights without RoPE give another map."""
    model = tiny('vit_rope').eval()
    with AttentionCapture(model) as capture:
        with capture.recording():
            model(images())
        rotated = capture[1].logits()
        model.rope, model.rope_mixed = None, False  # the blocks now get rope=None
        with capture.recording():
            model(images())
        assert not torch.allclose(rotated, capture[1].logits(), atol=1e-3)


def test_autocast_q_and_k_are_what_the_kernel_receives(monkeypatch):
    """Under bf16 autocast the forward casts the rotated q/k to v's dtype; the capture records those tensors."""
    model = tiny('vit_rope_gqa').eval()
    set_fused(model, True)
    for blk in model.blocks:  # q/k norms that return float32, as layer_norm does under CUDA autocast
        blk.attn.q_norm, blk.attn.k_norm = Float32Norm(), Float32Norm()
    kernel = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, **kwargs):
        kernel.append((q, k))
        return sdpa(q, k, v, **kwargs)
    monkeypatch.setattr(F, 'scaled_dot_product_attention', recording_sdpa)
    with AttentionCapture(model) as capture, torch.autocast('cpu', dtype=torch.bfloat16):
        with capture.recording():
            model(images())
        for i, (q, k) in enumerate(kernel):
            assert capture[i].q.dtype == torch.bfloat16 and torch.equal(capture[i].q, q)
            assert torch.equal(capture[i].k, k)  # grouped k/v heads repeated as the kernel gets them


@pytest.mark.parametrize('key', list(MODELS))
def test_shd_loss_is_zero_for_a_copy(key):
    teacher = tiny(key).eval()
    student = copy.deepcopy(teacher)
    with SHDDistiller(teacher, student) as distiller:
        with distiller.recording():
            distiller.teacher_forward(images())
            student(images())
        assert abs(distiller.compute_loss().value.item()) < 1e-6


@pytest.mark.parametrize('key', ['eva02', 'eva02_separate_qkv', 'vit_rope_mixed', 'vit_rope_gqa'])
def test_a_four_to_two_head_pair_trains(key):
    teacher, student = tiny(key).eval(), tiny(key, num_heads=2, seed=1)
    teacher_state = copy.deepcopy(teacher.state_dict())
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    with SHDDistiller(teacher, student) as distiller:
        for step in range(8):
            with distiller.recording():
                distiller.teacher_forward(images(seed=step % 2))
                student(images(seed=step % 2))
            out = distiller.compute_loss()
            optimizer.zero_grad()
            out.loss.backward()
            if step == 0:
                attn = student.blocks[-1].attn  # the last distilled layer: only its q/k projections are trained
                width = attn.num_heads * attn.head_dim
                if attn.qkv is not None:
                    assert attn.qkv.weight.grad[:2 * width].abs().sum() > 0
                    assert not attn.qkv.weight.grad[2 * width:].any()
                    if getattr(attn, 'q_bias', None) is not None:
                        assert attn.q_bias.grad.abs().sum() > 0 and no_gradient(attn.v_bias)
                else:
                    assert attn.q_proj.weight.grad.abs().sum() > 0 and attn.k_proj.weight.grad.abs().sum() > 0
                    assert no_gradient(attn.v_proj.weight)
                assert no_gradient(attn.proj.weight) and no_gradient(student.head.weight)
            optimizer.step()
            losses.append(out.value.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())


def test_patch_tokens_drop_the_prefix_tokens():
    teacher = tiny('eva02', num_reg_tokens=4).eval()  # cls + 4 registers
    student = tiny('eva02', num_heads=2, seed=1)  # cls only
    x = images()
    with SHDDistiller(teacher, student) as distiller:
        with distiller.recording():
            distiller.teacher_forward(x)
            student(x)
        with pytest.raises(ValueError, match=r'different token counts: student \(2, 2, 17, 17\) vs teacher '
                                             r'\(2, 4, 21, 21\).*tokens=.patch'):
            distiller.compute_loss()
    with SHDDistiller(teacher, student, SHDConfig(tokens='patch')) as distiller:
        assert distiller.prefix_tokens == (5, 1)
        with distiller.recording():
            distiller.teacher_forward(x)
            student(x)
        out = distiller.compute_loss()
    expected = []
    for (_, v, t_logits), (_, _, s_logits), t_block in zip(eager_attention(teacher, x), eager_attention(student, x),
                                                           teacher.blocks, strict=True):
        expected.append(shd_loss(s_logits[..., 1:, 1:], t_logits[..., 5:, 5:], v[:, :, 5:], t_block.attn.proj.weight))
    torch.testing.assert_close(out.value, torch.stack(expected).mean().detach(), rtol=1e-4, atol=1e-6)


def test_scale_norm_teachers_are_refused_for_shd_merge_weights():
    teacher, student = tiny('eva02_separate_qkv', scale_attn_inner=True), tiny('eva02', num_heads=2)
    with pytest.raises(ValueError, match=r"Teacher attention 'blocks.0.attn' cannot provide SHD merge weights: "
                                         r'scale_norm normalises'):
        SHDDistiller(teacher, student)
    SHDDistiller(teacher, student, merge='mean').remove()


def test_masked_forwards_are_refused_while_recording():
    model = tiny('vit_rope').eval()
    with AttentionCapture(model) as capture:
        model.forward_features(images(), is_causal=True)  # outside recording: nothing checked, nothing kept
        with capture.recording(), pytest.raises(ValueError, match='AttentionRope was called with attn_mask or '
                                                                  'is_causal while SHD recorded it'):
            model.forward_features(images(), is_causal=True)


@pytest.mark.parametrize('module, reason', [
    (lambda: WindowAttention(dim=16, num_heads=2, window_size=4), 'Swin window attention attends within local'),
    (lambda: WindowAttentionV2(dim=16, num_heads=2, window_size=(4, 4)), 'Swin V2 window attention'),
    (lambda: WindowMultiHeadAttention(dim=16, num_heads=2, window_size=(4, 4)), r'Swin V2 \(cr\) window attention'),
])
def test_window_attention_is_refused_with_the_reason(module, reason):
    with pytest.raises(ValueError, match=rf"Attention module '1' \(\w+\) is not supported by SHD capture: {reason}"):
        AttentionCapture(torch.nn.Sequential(torch.nn.Identity(), module()))


def test_rotary_attention_modules_are_claimed():
    for module in (AttentionRope(dim=16, num_heads=2), EvaAttention(dim=16, num_heads=2, scale_norm=False)):
        assert adapter_for(module).name == 'timm_rope'
