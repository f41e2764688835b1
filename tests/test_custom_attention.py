"""A user's own attention taught to SHD: an MDTv2-style attention (fused qkv, a learnable relative-position bias on
the logits, SDPA with the bias as float attn_mask, masked training where only the kept tokens attend).

MDT's code is not on PyPI, so the model is written here from its description. Its adapter records what the SDPA
kernel receives (q, k, v and the float ``attn_mask``, which becomes ``slot.bias``, part of the distilled map).
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from shd_plugins import AttentionCapture, SHDDistiller
from shd_plugins.capture import AttentionAdapter, register_attention_adapter, unregister_attention_adapter

GRID = (4, 4)
TOKENS = GRID[0] * GRID[1]


def relative_position_index(height: int, width: int) -> torch.Tensor:
    """(L, L) index into a ((2h-1)(2w-1), H) table of the relative offset between two grid positions (Swin/MDT)."""
    coords = torch.stack(torch.meshgrid(torch.arange(height), torch.arange(width), indexing='ij')).flatten(1)
    offsets = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    return (offsets[..., 0] + height - 1) * (2 * width - 1) + offsets[..., 1] + width - 1


class MDTAttention(nn.Module):
    """Fused qkv, relative-position bias on the logits; with ``ids_keep`` x holds only the kept tokens."""

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int] = GRID):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_table = nn.Parameter(0.5 * torch.randn((2 * grid[0] - 1) * (2 * grid[1] - 1), num_heads))
        self.register_buffer('rel_pos_index', relative_position_index(*grid), persistent=False)

    def position_bias(self, ids_keep: torch.Tensor | None) -> torch.Tensor:
        bias = self.rel_pos_table[self.rel_pos_index].permute(2, 0, 1)  # (H, L, L)
        if ids_keep is None:
            return bias.unsqueeze(0)
        return bias[:, ids_keep[:, :, None], ids_keep[:, None, :]].transpose(0, 1)  # (B, H, n, n): kept tokens

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.position_bias(ids_keep))
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class MDTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = MDTAttention(dim, num_heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, ids_keep=None):
        x = x + self.attn(self.norm1(x), ids_keep)
        return x + self.mlp(self.norm2(x))


class TinyMDT(nn.Module):
    """Latent tokens in, the kept tokens (MDT's ``ids_keep``, as in masked training) through the blocks."""

    def __init__(self, num_heads: int, dim: int = 32, depth: int = 2, channels: int = 4):
        super().__init__()
        self.embed = nn.Linear(channels, dim)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, TOKENS, dim))
        self.blocks = nn.ModuleList(MDTBlock(dim, num_heads) for _ in range(depth))
        self.out = nn.Linear(dim, channels)

    def forward(self, tokens, ids_keep=None):
        x = self.embed(tokens) + self.pos_embed
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
        for block in self.blocks:
            x = block(x, ids_keep)
        return self.out(x)


class MDTAttentionAdapter(AttentionAdapter):
    name = 'test_mdt'

    def claims(self, module):
        return isinstance(module, MDTAttention)

    def geometry(self, module):
        return module.num_heads, module.head_dim, module.head_dim ** -0.5

    def install(self, module, recorder):
        def record(slot, q, k, v, options):  # what SDPA receives; its float attn_mask is the logits bias
            slot.q, slot.k, slot.bias = q, k, options['attn_mask']
            if recorder.record_values:
                slot.v = v
        recorder.hook_kernel(module, record)

    def out_weight(self, module):
        return module.proj.weight


@pytest.fixture(autouse=True)
def mdt_adapter():
    register_attention_adapter(MDTAttentionAdapter)
    yield
    unregister_attention_adapter(MDTAttentionAdapter.name)


def mdt(num_heads: int = 4, seed: int = 0) -> TinyMDT:
    torch.manual_seed(seed)
    return TinyMDT(num_heads)


def latents(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, TOKENS, 4, generator=torch.Generator().manual_seed(seed))


def random_keep(batch: int = 2, keep: int = 10, seed: int = 0) -> torch.Tensor:
    """MDT's masking: a random permutation per sample, its first ``keep`` positions kept."""
    return torch.rand(batch, TOKENS, generator=torch.Generator().manual_seed(seed)).argsort(1)[:, :keep]


def eager_maps(model: TinyMDT, tokens, ids_keep) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(softmax(q k^T * scale + bias), softmax(q k^T * scale)) per layer, the bias looked up offset by offset."""
    inputs = {}
    handles = [b.attn.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
               for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        model(tokens, ids_keep)
    for handle in handles:
        handle.remove()
    positions = torch.arange(TOKENS).expand(tokens.shape[0], -1) if ids_keep is None else ids_keep
    rows, cols = positions // GRID[1], positions % GRID[1]
    maps = []
    for i, block in enumerate(model.blocks):
        attn, x = block.attn, inputs[i]
        batch, n, _ = x.shape
        q, k, _ = (x @ attn.qkv.weight.T + attn.qkv.bias).view(batch, n, 3, attn.num_heads, -1).unbind(2)
        logits = torch.einsum('bihd,bjhd->bhij', q, k) / attn.head_dim ** 0.5
        bias = torch.empty_like(logits)
        for b in range(batch):
            for a in range(n):
                for c in range(n):
                    dy, dx = rows[b, a] - rows[b, c], cols[b, a] - cols[b, c]
                    bias[b, :, a, c] = attn.rel_pos_table[(dy + GRID[0] - 1) * (2 * GRID[1] - 1) + dx + GRID[1] - 1]
        maps.append(((logits + bias).softmax(-1), logits.softmax(-1)))
    return maps


@pytest.mark.parametrize('keep', [None, 10])
def test_outputs_are_bit_identical_and_the_map_includes_the_bias(keep):
    model = mdt().eval()
    ids_keep = None if keep is None else random_keep(keep=keep)
    reference = model(latents(), ids_keep)
    expected = eager_maps(model, latents(), ids_keep)
    with AttentionCapture(model, record_values=True) as capture:
        with capture.recording():
            assert torch.equal(model(latents(), ids_keep), reference)
        for i, (with_bias, without_bias) in enumerate(expected):
            captured = capture[i].logits().softmax(-1)
            assert captured.shape == (2, 4, keep or TOKENS, keep or TOKENS)
            torch.testing.assert_close(captured, with_bias, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(captured, without_bias, atol=1e-2)  # the bias is part of the map
            assert capture[i].out_weight is model.blocks[i].attn.proj.weight


def test_shd_loss_is_zero_for_a_copy():
    teacher = mdt().eval()
    student = copy.deepcopy(teacher)
    ids_keep = random_keep()
    with SHDDistiller(teacher, student) as distiller:
        with distiller.recording():
            distiller.teacher_forward(latents(), ids_keep)
            student(latents(), ids_keep)
        assert abs(distiller.compute_loss().value.item()) < 1e-6


def test_a_four_to_two_head_pair_trains_on_the_same_kept_tokens():
    teacher, student = mdt().eval(), mdt(num_heads=2, seed=1)
    teacher_state = copy.deepcopy(teacher.state_dict())
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    with SHDDistiller(teacher, student) as distiller:
        for step in range(10):
            ids_keep = random_keep(seed=step)  # one mask per step, shared by teacher and student
            with distiller.recording():
                distiller.teacher_forward(latents(seed=step), ids_keep)
                student(latents(seed=step), ids_keep)
            out = distiller.compute_loss()
            optimizer.zero_grad()
            out.loss.backward()
            if step == 0:
                attn = student.blocks[-1].attn
                assert attn.rel_pos_table.grad.abs().sum() > 0  # the bias is trained with q and k
                assert attn.qkv.weight.grad[:64].abs().sum() > 0 and not attn.qkv.weight.grad[64:].any()
                assert attn.proj.weight.grad is None
            optimizer.step()
            losses.append(out.value.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())


def test_different_kept_token_counts_are_refused_with_both_shapes():
    teacher, student = mdt().eval(), mdt(num_heads=2, seed=1)
    with SHDDistiller(teacher, student) as distiller:
        with distiller.recording():
            distiller.teacher_forward(latents(), random_keep(keep=10))
            student(latents(), random_keep(keep=8))
        with pytest.raises(ValueError, match=r'different token counts: student \(2, 2, 8, 8\) vs teacher '
                                             r'\(2, 4, 10, 10\)'):
            distiller.compute_loss()
