"""Attention capture on real timm and diffusers modules: transparent, faithful, safe with EMA copies."""
import copy

import pytest
import torch
from diffusers import DDPMScheduler, DiTPipeline, PixArtTransformer2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0
from diffusers.models.transformers.transformer_ltx import LTXAttention
from timm.layers.attention2d import MultiQueryAttention2d
from timm.layers.diff_attention import DiffAttention
from tiny_models import dit_inputs, tiny_dit, tiny_vae, tiny_vit

from shd_plugins import AttentionCapture, SHDConfig, SHDDistiller, find_attention_layers
from shd_plugins.capture import (
    AttentionAdapter,
    adapter_for,
    attention_adapters,
    register_attention_adapter,
    unregister_attention_adapter,
)


def set_timm_fused(model, fused: bool) -> None:
    for layer in find_attention_layers(model):
        layer.module.fused_attn = fused


def all_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize('fused', [True, False])
def test_timm_outputs_are_bit_identical_with_capture(fused):
    model = tiny_vit(qk_norm=True).eval()
    set_timm_fused(model, fused)
    x = torch.randn(3, 3, 32, 32)
    reference = model(x)
    with AttentionCapture(model, record_values=True) as capture, capture.recording():
        captured = model(x)
    assert torch.equal(reference, captured)
    assert all_hooks(model) == 0


@pytest.mark.parametrize('processor', [AttnProcessor2_0, AttnProcessor])
def test_diffusers_outputs_are_bit_identical_with_capture(processor):
    model = tiny_dit().eval()
    for layer in find_attention_layers(model):
        layer.module.set_processor(processor())
    inputs = dit_inputs()
    reference = model(**inputs).sample
    with AttentionCapture(model, record_values=True) as capture, capture.recording():
        captured = model(**inputs).sample
    assert torch.equal(reference, captured)
    assert all_hooks(model) == 0


@pytest.mark.parametrize('qk_norm', [False, True])
def test_timm_captured_maps_equal_the_unfused_path(qk_norm):
    model = tiny_vit(qk_norm=qk_norm).eval()
    set_timm_fused(model, False)
    probs = {}
    for i, layer in enumerate(find_attention_layers(model)):  # attn_drop receives the softmax probabilities
        layer.module.attn_drop.register_forward_hook(lambda m, a, out, i=i: probs.__setitem__(i, out))
    x = torch.randn(2, 3, 32, 32)
    with AttentionCapture(model) as capture:
        with capture.recording():
            model(x)
        for i in capture.selected:
            torch.testing.assert_close(capture[i].logits().softmax(-1), probs[i], rtol=1e-5, atol=1e-6)


def test_diffusers_captured_maps_equal_the_math_path():
    model = tiny_dit().eval()
    probs = {}
    for i, layer in enumerate(find_attention_layers(model)):
        attn = layer.module
        attn.set_processor(AttnProcessor())
        original = attn.get_attention_scores

        def record(query, key, mask=None, i=i, original=original):
            probs[i] = original(query, key, mask)
            return probs[i]
        attn.get_attention_scores = record
    with AttentionCapture(model, record_values=True) as capture:
        with capture.recording():
            model(**dit_inputs())
        for i in capture.selected:
            rec = capture[i]
            heads = rec.q.shape[1]
            expected = probs[i].view(-1, heads, *probs[i].shape[-2:])
            torch.testing.assert_close(rec.logits().softmax(-1), expected, rtol=1e-5, atol=1e-6)
            assert rec.v.shape == rec.q.shape
            assert rec.out_weight is find_attention_layers(model)[i].module.to_out[0].weight


def test_pixart_self_attention_is_captured_and_cross_attention_skipped():
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=12, norm_num_groups=2).eval()
    layers = find_attention_layers(model)
    assert [layer.name for layer in layers] == ['transformer_blocks.0.attn1', 'transformer_blocks.1.attn1']
    inputs = dict(hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 5, 12),
                  timestep=torch.tensor([10]), added_cond_kwargs={'resolution': None, 'aspect_ratio': None})
    reference = model(**inputs).sample
    with AttentionCapture(model) as capture, capture.recording():
        assert torch.equal(model(**inputs).sample, reference)
        assert capture[1].logits().shape == (1, 2, 16, 16)


def test_diffusers_fused_qkv_projections():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    x = torch.randn(2, 5, 16)
    with AttentionCapture(attn, record_values=True) as capture, capture.recording():
        attn(x)
        unfused = capture[0]
    attn.fuse_projections()
    attn.set_processor(FusedAttnProcessor2_0())
    with AttentionCapture(attn, record_values=True) as capture, capture.recording():
        attn(x)
        fused = capture[0]
    torch.testing.assert_close(fused.logits(), unfused.logits())
    torch.testing.assert_close(fused.v, unfused.v)


def test_only_selected_layers_are_recorded():
    model = tiny_vit(depth=4).eval()
    with AttentionCapture(model, layers=[1, 3]) as capture, capture.recording():
        model(torch.randn(1, 3, 32, 32))
        assert capture[3].q.shape == (1, 4, 17, 8)
        with pytest.raises(RuntimeError, match='No attention was recorded for layer 0'):
            capture[0]
    with pytest.raises(ValueError, match='Layer index 4 out of range: the model has 4 attention layers'):
        AttentionCapture(model, layers=[4])


def test_deepcopy_of_a_captured_model_does_not_record_into_the_capture():
    student = tiny_vit()
    capture = AttentionCapture(student)
    ema = copy.deepcopy(student)  # what EMA helpers do
    with capture.recording():
        ema(torch.randn(1, 3, 32, 32))
    with pytest.raises(RuntimeError, match='No attention was recorded'):
        capture[0]
    with capture.recording():
        student(torch.randn(1, 3, 32, 32))
    assert capture[0].q.shape == (1, 4, 17, 8)
    capture.remove()


def test_forwards_outside_recording_leave_nothing_behind():
    model = tiny_vit().eval()
    capture = AttentionCapture(model)
    model(torch.randn(1, 3, 32, 32))  # an evaluation or sampling forward
    assert capture._slots == {}
    with pytest.raises(RuntimeError, match='inside `with capture.recording\\(\\):`'):
        capture[0]
    with capture.recording():
        model(torch.randn(2, 3, 32, 32))
    model(torch.randn(5, 3, 32, 32))  # does not overwrite what the recorded forward left
    assert capture[0].q.shape[0] == 2
    with capture.recording():  # entering drops the previous step's tensors
        assert capture._slots == {}
    capture.remove()


@pytest.mark.parametrize('module, reason', [
    (lambda: DiffAttention(dim=16, num_heads=2), 'differential attention'),
    (lambda: MultiQueryAttention2d(dim=16, num_heads=2), 'multi-query attention shares k/v across heads'),
    (lambda: Attention(query_dim=16, heads=2, dim_head=8, added_kv_proj_dim=12), r'joint attention \(SD3/Flux style\)'),
    (lambda: LTXAttention(16, heads=2, kv_heads=2, dim_head=8), 'LTXAttention is a diffusers attention class not yet'),
])
def test_unsupported_attention_is_refused_with_the_reason(module, reason):
    model = torch.nn.Sequential(torch.nn.Identity(), module())
    with pytest.raises(ValueError, match=rf"Attention module '1' \(\w+\) is not supported by SHD capture: {reason}"):
        AttentionCapture(model)


def test_models_without_attention_are_refused():
    with pytest.raises(ValueError, match='No supported attention layers found in Linear'):
        AttentionCapture(torch.nn.Linear(4, 4))


def test_dit_pipeline_sampling_is_identical_with_capture_installed():
    # DiTPipeline hard-codes the null class id 1000, so the tiny DiT has ImageNet's 1000 classes.
    pipe = DiTPipeline(transformer=tiny_dit(in_channels=4, num_classes=1000), vae=tiny_vae(), scheduler=DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)

    def sample():
        torch.manual_seed(0)  # DiTPipeline's scheduler.step draws DDPM noise from the global RNG
        return pipe(class_labels=[1, 7], num_inference_steps=3, guidance_scale=1.5,
                    generator=torch.Generator().manual_seed(0), output_type='np').images

    reference = sample()
    with AttentionCapture(pipe.transformer, record_values=True) as capture, capture.recording():
        assert (sample() == reference).all()
        assert capture[0].q.shape[0] == 4  # guidance doubles the batch


class FusedQKVAttention(torch.nn.Module):
    """An attention class shd_plugins does not ship an adapter for: fused qkv, SDPA, a linear projection."""

    def __init__(self, dim: int = 16, num_heads: int = 4):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class FusedQKVAdapter(AttentionAdapter):
    name = 'test_fused_qkv'

    def claims(self, module):
        return isinstance(module, FusedQKVAttention)

    def geometry(self, module):
        return module.num_heads, module.head_dim, module.head_dim ** -0.5

    def install(self, module, recorder):
        heads, head_dim = module.num_heads, module.head_dim

        def record(slot, out):
            q, k, v = out.view(*out.shape[:2], 3, heads, head_dim).permute(2, 0, 3, 1, 4)
            slot.q, slot.k = q, k
            if recorder.record_values:
                slot.v = v
        recorder.hook(module.qkv, record)

    def out_weight(self, module):
        return module.proj.weight


@pytest.fixture
def fused_qkv_adapter():
    register_attention_adapter(FusedQKVAdapter)
    yield
    unregister_attention_adapter(FusedQKVAdapter.name)


def stack(heads: int, seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(FusedQKVAttention(num_heads=heads), FusedQKVAttention(num_heads=heads))


def test_unknown_attention_needs_an_adapter():
    with pytest.raises(ValueError, match='No supported attention layers found in Sequential.*register_attention'):
        AttentionCapture(stack(4))


def test_a_registered_adapter_teaches_the_capture_a_new_attention(fused_qkv_adapter):
    model = stack(4).eval()
    x = torch.randn(2, 5, 16)
    reference = model(x)
    q, k, _ = model[0].qkv(x).view(2, 5, 3, 4, 4).permute(2, 0, 3, 1, 4)
    expected = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1)  # head_dim 4: scale 1/2
    with AttentionCapture(model, record_values=True) as capture:
        with capture.recording():
            assert torch.equal(model(x), reference)
        torch.testing.assert_close(capture[0].logits().softmax(-1), expected)
        assert capture[1].out_weight is model[1].proj.weight
    assert adapter_for(model[0]).name == 'test_fused_qkv'

    teacher, student = stack(4), stack(2, seed=1)
    with SHDDistiller(teacher, student, SHDConfig(layers='uniform')) as distiller:
        with distiller.recording():
            distiller.teacher_forward(x)
            student(x)
        out = distiller.compute_loss()
        out.loss.backward()
    assert distiller.layer_pairs == [(0, 0), (1, 1)] and out.value > 0
    assert student[0].qkv.weight.grad.abs().sum() > 0 and teacher[0].qkv.weight.grad is None


def test_registry_names_are_unique_and_user_adapters_win(fused_qkv_adapter):
    assert attention_adapters()[0].name == 'test_fused_qkv'
    assert {'timm', 'diffusers'} <= {a.name for a in attention_adapters()}
    with pytest.raises(ValueError, match="adapter named 'test_fused_qkv' is already registered"):
        register_attention_adapter(FusedQKVAdapter)
    with pytest.raises(KeyError, match="No attention adapter named 'nope'"):
        unregister_attention_adapter('nope')
