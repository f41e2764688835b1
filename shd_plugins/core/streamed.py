"""The SHD loss from q, k and v in bounded chunks and row blocks: no (B, H, N, N) tensor is ever held.

The dense :func:`~shd_plugins.core.losses.shd_loss` takes the score maps of both models, so one distilled layer holds
B x (M + N) x T^2 floats (and autograd keeps them for backward): at 1024-4096 tokens that is the activation budget.
Every quantity SHD needs is local to a sample and a merge group, and a sum over query rows, so this module walks a
layer in chunks (some samples x the teacher heads of some merge groups, whose maps fill about 8 MiB on CPU) and,
within a chunk too large for one block, in blocks of query rows:

- Merge weights: a pair's closed-form weight needs ``<U, U>``, ``<W, W>`` and ``<U, W>`` (see
  :mod:`~shd_plugins.core.merge`), each a sum over rows of the block's ``(A_p - A_q) V`` products, so they are
  accumulated block by block. Where rows go through different output projections (joint attention,
  :class:`~shd_plugins.core.projections.RowProjections`) a block is cut at the segment boundaries it spans and
  each piece is weighed with its own projection's Gram blocks. Round r of a multi-round schedule mixes maps with
  the weights of rounds < r, so per-map weights over several row blocks take one pass per round; ``per_row``
  weights depend only on their row and take one pass. A chunk holds whole merge groups (and its part of the
  schedule), so chunks never need another pass.
- The loss: each block's merged targets and student log-softmax come from q and k, and the block's gradient to the
  student scores has a closed form (``tau (S - T)`` for the KL), so the gradients to q and k are computed with the
  value, block by block, and autograd keeps only them (O(T d)): no recomputation in the backward, no N x N
  tensor saved. When the weights need no other rows (``per_row``, or all rows in one block) the merge that
  computes them also yields the tau = 1 targets, so each block's teacher maps are formed once.

The result equals the dense loss up to float32 summation order (tests: 1e-5 relative on the loss, 1e-4 on the
gradients), including the per-layer merge weights it returns. The attention-call formulation of ``../shared/SPEC.md``
section 8 would let fused SDPA kernels do the work on GPU. On CPU the chunks are the faster choice: an estimate of
that formulation with torch's CPU flash kernel took 0.92x the former whole-layer row blocks before its entropy term
(which still needs the merged maps), while the chunks with in-place softmax and a single exp pass for the student take
0.82x (DeiT-S -> DeiT-Ti, 197 tokens) and 0.49x (DiT-XL/2 -> DiT-S/2, 1024 tokens) of that time inside a real
training step (interleaved A/B). A chunk's tensors stay in cache and are reused by the allocator instead of being
page-faulted in afresh; the teacher's output Gram matrix ``W_O^T W_O`` is kept across steps.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .heads import MergeSchedule, merge_schedule, num_merges
from .losses import (
    LOSS_TYPES,
    _check_shd_shapes,
    _check_temperature,
    check_prefix_tokens,
    prepare_masks,
    split_prefix_tokens,
)
from .merge import (
    MERGE_MODES,
    _apply_schedule,
    _check_merge_inputs,
    alpha_from_terms,
    group_layouts,
    merge_rounds,
    round_terms,
)
from .precision import without_autocast
from .projections import RowProjections, as_row_projections, drop_prefix_rows

__all__ = ['streamed_shd_loss', 'default_block_rows']

_logger = logging.getLogger(__name__)

# Elements of one (B, H, rows, T) block tensor: 2^24 float32 = 64 MiB; a block step holds a handful of them.
_BLOCK_ELEMENTS = 2 ** 24
# Teacher-map elements of one chunk on CPU (samples x the heads of some merge groups x T^2) when that fits: 8 MiB of
# float32 keeps a chunk's tensors in cache and under glibc's mmap threshold, so they are not page-faulted in afresh at
# every call (on CPU that was half the loss time at 1024 tokens). Chunks never need another pass: a weight depends only
# on its own sample and group. Other devices (a caching allocator, a launch cost per kernel) take chunks up to the
# block bound.
_CHUNK_ELEMENTS = 2 ** 21
_TINY = torch.finfo(torch.float32).tiny
# (id of the weight or of its base, offset, shape, stride) -> (weakref to that tensor, (version, dtype, device),
# W_O^T W_O); an entry goes with its tensor.
# One entry per distinct weight tensor: joint attention's RowProjections hold two (to_out and to_add_out).
_GRAM_CACHE: dict[int, tuple[weakref.ref, tuple, torch.Tensor]] = {}


def default_block_rows(batch: int, heads: int, tokens: int, budget: int = _BLOCK_ELEMENTS) -> int:
    """Query rows per block so that one (batch, heads, rows, tokens) float32 block stays within ``budget`` elements."""
    return max(1, min(tokens, budget // max(1, batch * heads * tokens)))


def _check_qk(name: str, q: torch.Tensor, k: torch.Tensor) -> None:
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(
            f'{name} q and k must both be per-head (B, H, T, d) tensors of one shape, got q {tuple(q.shape)} and '
            f'k {tuple(k.shape)}.')


def _scores_view(batch: int, heads: int, tokens: int, like: torch.Tensor) -> torch.Tensor:
    """A (B, H, T, T) stand-in without storage (an expanded scalar), to run the dense path's shape checks."""
    return like.new_zeros(()).expand(batch, heads, tokens, tokens)


def _gram_index(weight: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """The tensor a Gram cache entry lives with (a view's base) and the entry's key."""
    source = weight if weight._base is None else weight._base
    return source, (id(source), weight.storage_offset(), tuple(weight.shape), weight.stride())


@dataclass(frozen=True)
class _Chunk:
    """A batch range and a contiguous range of student heads (final merge groups), with the part of the merge
    schedule that builds them: the merge weights of one chunk never depend on another chunk's maps."""
    batch: slice
    student_heads: slice
    teacher_heads: slice
    schedule: MergeSchedule  # over the chunk's own teacher heads
    merges: list[int]  # the chunk's merges in the schedule order of the whole layer (the alphas' merge index)


def _chunks(schedule: MergeSchedule, teacher_heads: int, batch: int, tokens: int,
            device: torch.device | None = None) -> list[_Chunk]:
    """Split a layer into chunks whose teacher maps hold about ``_CHUNK_ELEMENTS`` on CPU, ``_BLOCK_ELEMENTS``
    elsewhere (at least one group of one sample): consecutive final groups as long as one sample's maps fit, then as
    many samples as fit."""
    budget = _CHUNK_ELEMENTS if device is None or device.type == 'cpu' else _BLOCK_ELEMENTS
    layouts = group_layouts(schedule, teacher_heads)
    final_starts, final_sizes = layouts[-1]
    chunks, first = [], 0
    while first < len(final_starts):
        stop = first + 1
        while stop < len(final_starts) and (final_starts[stop] + final_sizes[stop] - final_starts[first]) \
                * tokens * tokens <= budget:
            stop += 1
        head_start, head_stop = final_starts[first], final_starts[stop - 1] + final_sizes[stop - 1]
        local, merges = _sub_schedule(schedule, layouts, head_start, head_stop)
        samples = min(batch, max(1, budget // ((head_stop - head_start) * tokens * tokens)))
        chunks += [_Chunk(slice(b, min(b + samples, batch)), slice(first, stop), slice(head_start, head_stop), local,
                          merges) for b in range(0, batch, samples)]
        first = stop
    return chunks


def _sub_schedule(schedule: MergeSchedule, layouts, head_start: int, head_stop: int) -> tuple[MergeSchedule, list[int]]:
    """The rounds of ``schedule`` restricted to the groups inside teacher heads [head_start, head_stop) (a range of
    whole final groups), renumbered from 0, and the indices of their merges in the whole schedule."""
    local, merges, index = [], [], 0
    for round_slots, (starts, _) in zip(schedule, layouts):
        inside = {group: i for i, group in enumerate(g for g, s in enumerate(starts) if head_start <= s < head_stop)}
        local_round = []
        for slot in round_slots:
            if slot[0] in inside:  # a slot merges adjacent groups: all of it is inside or none
                local_round.append(tuple(inside[group] for group in slot))
                if len(slot) == 2:
                    merges.append(index)
            index += len(slot) == 2
        if local_round != [(i,) for i in range(len(local_round))]:  # a round that merges nothing here is skipped
            local.append(local_round)
    return local, merges


def _cached_gram(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``W_O^T W_O`` (M*d, M*d) of one output-projection weight; block (a, b) is ``W_O^a W_O^b^T``.

    The teacher is frozen, so the product (a (M d)^3 matmul: 3 GFLOP per DiT-XL layer, per step) is kept per
    weight tensor and recomputed only when the weight changes in place (its version counter moves). A view of a
    parameter (Flux single-stream blocks give ``proj_out.weight[:, :inner]``, a new view at every step) is kept
    under its base parameter and its place in it, so the cache still hits.
    """
    source, index = _gram_index(weight)
    key = (weight._version, dtype, weight.device)  # a view shares its base's version counter
    cached = _GRAM_CACHE.get(index)
    if cached is None or cached[0]() is not source or cached[1] != key:
        ref = weakref.ref(source, lambda _, index=index: _GRAM_CACHE.pop(index, None))
        weight_float = weight.detach().to(dtype)
        cached = (ref, key, weight_float.t() @ weight_float)
        _GRAM_CACHE[index] = cached
    return cached[2]


class _Teacher:
    """The teacher side of a chunk in float32: scaled q, k, v, the output Gram blocks, masks; block maps on demand."""

    def __init__(self, q, k, v, projections, key_mask, query_mask, columns: slice | None = None):
        self.q, self.k, self.v, self.projections = q, k, v, projections
        self.key_mask, self.query_mask, self.columns = key_mask, query_mask, columns

    @classmethod
    def prepare(cls, q, k, v, out_weight, scale, key_mask, query_mask) -> _Teacher:
        dtype = torch.promote_types(q.dtype, torch.float32)
        # The caller's weight tensors themselves (not detached copies): the Gram cache is keyed by them.
        return cls(q.detach().to(dtype) * scale,  # scale the (T x d) side, as CapturedAttention.logits does
                   k.detach().to(dtype), None if v is None else v.detach().to(dtype),
                   None if out_weight is None else as_row_projections(out_weight, q.shape[2]), key_mask, query_mask)

    def take(self, chunk: _Chunk) -> _Teacher:
        """Views of the chunk's samples and heads; its Gram blocks are the heads' rows and columns."""
        batch, heads = chunk.batch, chunk.teacher_heads
        columns = None if self.v is None else slice(heads.start * self.v.shape[-1], heads.stop * self.v.shape[-1])
        return _Teacher(self.q[batch, heads], self.k[batch, heads], None if self.v is None else self.v[batch, heads],
                        self.projections, None if self.key_mask is None else self.key_mask[batch],
                        None if self.query_mask is None else self.query_mask[batch], columns)

    def gram(self, weight: torch.Tensor) -> torch.Tensor:
        gram = _cached_gram(weight, self.q.dtype)
        return gram if self.columns is None else gram[self.columns, self.columns]

    def maps(self, rows: slice, temperature: float = 1.0) -> torch.Tensor:
        scores = self.q[:, :, rows] @ self.k.transpose(-2, -1)
        if self.key_mask is not None:
            scores = scores.masked_fill(~self.key_mask[:, None, None, :], float('-inf'))
        if temperature != 1.0:
            scores = scores.div_(temperature)
        return _softmax_(scores)

    def weight_maps(self, rows: slice) -> torch.Tensor:
        """tau = 1 maps with invalid query rows zeroed: they must not steer the merge weights."""
        maps = self.maps(rows)
        return maps if self.query_mask is None else maps.mul_(self.query_mask[:, None, rows, None])


def _compute_alphas(teacher: _Teacher, schedule: MergeSchedule, blocks: list[slice]) -> torch.Tensor:
    """Per-map merge weights over several row blocks: round r needs the weights of rounds < r, so one pass per
    round, accumulating the pair terms ``<U,U>, <W,W>, <U,W>`` over the blocks."""
    batch = teacher.q.shape[0]
    alphas, offset = teacher.q.new_zeros((batch, num_merges(schedule))), 0
    for r, (round_slots, layout) in enumerate(zip(schedule, group_layouts(schedule, teacher.q.shape[1]))):
        terms = sum(round_terms(_apply_schedule(teacher.weight_maps(rows), schedule[:r], alphas[:, :offset]),
                                teacher.v, teacher.projections, teacher.gram, round_slots, layout, per_row=False,
                                start=rows.start) for rows in blocks)
        pairs = terms.shape[2]
        alphas[:, offset:offset + pairs] = alpha_from_terms(*terms)
        offset += pairs
    return alphas


def _softmax_(z: torch.Tensor) -> torch.Tensor:
    """Softmax along the last dim, in place: no second block tensor to allocate (and page-fault in on CPU), which
    outweighs the fused kernel's fewer passes (interleaved, per layer: DeiT 0.94x, DiT-XL/2 at 1024 tokens 0.89x).
    Fully masked rows give NaN, as ``softmax`` does."""
    z = z.sub_(z.amax(-1, keepdim=True)).exp_()
    return z.div_(z.sum(-1, keepdim=True))


def _softmax_and_log(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(softmax(z), log_softmax(z))`` along the last dim from one exp pass; ``z`` becomes the log-softmax."""
    z = z.sub_(z.amax(-1, keepdim=True))
    probs = z.exp()
    total = probs.sum(-1, keepdim=True)
    return probs.div_(total), z.sub_(total.log_())


def _block_loss_and_grad(target: torch.Tensor, scores: torch.Tensor, key_mask: torch.Tensor | None,
                         row_weight: torch.Tensor | None, temperature: float,
                         loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of the block's per-row losses (as ``attention_map_loss`` computes them) and its gradient with
    respect to the student scores, in closed form: the backward then needs no recomputation of the block.

    ``scores`` (a fresh product) is overwritten. ``T log T`` is taken as ``T log max(T, tiny)``: equal where T > 0,
    and 0 where T = 0, like ``xlogy`` but a quarter of its time on CPU.
    """
    z = scores if temperature == 1.0 else scores.div_(temperature)
    if loss == 'kl' and key_mask is None and row_weight is None:
        # The common case in few passes over the block: every target row is a convex combination of softmax
        # rows, so it sums to 1 and the gradient is S - T. (The value keeps the per-element difference: the
        # entropy and cross sums apart would cancel to 1e-4 relative.)
        student, log_student = _softmax_and_log(z)
        value = target.clamp_min(_TINY).log_().sub_(log_student).mul_(target).sum()
        grad_z = student.sub_(target)
        if temperature != 1.0:
            value, grad_z = value * temperature ** 2, grad_z.mul_(temperature)  # tau^2 from the loss, 1/tau from z
        return value, grad_z
    if key_mask is not None:
        z = z.masked_fill(~key_mask[:, None, None, :], float('-inf'))
    log_student = F.log_softmax(z, dim=-1)
    if key_mask is not None:
        log_student = log_student.masked_fill(~key_mask[:, None, None, :], 0.0)
    student = log_student.exp()
    if key_mask is not None:
        student = student.masked_fill(~key_mask[:, None, None, :], 0.0)
    if loss == 'kl':
        per_row_loss = (target * (target.clamp_min(_TINY).log() - log_student)).sum(-1) * temperature ** 2
        grad_z = (student * target.sum(-1, keepdim=True) - target) * temperature ** 2
    else:
        per_row_loss = (target - student).pow(2).sum(-1)
        grad_student = 2 * (student - target)
        grad_z = student * (grad_student - (student * grad_student).sum(-1, keepdim=True))
    grad_scores = grad_z / temperature
    if row_weight is None:
        return per_row_loss.sum(), grad_scores
    weight = row_weight[:, None, :, None]
    return (per_row_loss * weight[..., 0]).sum(), grad_scores * weight


class _PrecomputedGrad(torch.autograd.Function):
    """A scalar whose gradients to its inputs were computed with its value (``grad_output`` scales them)."""

    @staticmethod
    def forward(ctx, value, grad_q, grad_k, q, k):  # noqa: ARG004 (q, k only link the graph)
        ctx.save_for_backward(grad_q, grad_k)
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        grad_q, grad_k = ctx.saved_tensors
        return None, None, None, grad_q * grad_output, grad_k * grad_output


@without_autocast
def streamed_shd_loss(
        student_q: torch.Tensor,
        student_k: torch.Tensor,
        student_scale: float,
        teacher_q: torch.Tensor,
        teacher_k: torch.Tensor,
        teacher_values: torch.Tensor | None,
        teacher_out_weight: torch.Tensor | RowProjections | None,
        teacher_scale: float,
        *,
        temperature: float = 1.0,
        loss: str = 'kl',
        merge: str = 'shd',
        grouping: str = 'progressive',
        per_row: bool = False,
        query_mask: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        prefix_tokens: int | tuple[int, int] = 0,
        return_alphas: bool = False,
        block_rows: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`~shd_plugins.core.losses.shd_loss` from per-head q, k (and the teacher's v), in row blocks.

    Same value, gradients, merge weights and errors as ``shd_loss(student_q k^T * scale, teacher_q k^T * scale,
    ...)``, but the largest tensor is one (B, H, rows, T) block and autograd keeps only the inputs.

    Args:
        student_q, student_k: Student per-head queries and keys (B, N, T, d_s); gradients flow to both.
        student_scale: The student's score scale (usually ``d_s ** -0.5``).
        teacher_q, teacher_k: Teacher per-head queries and keys (B, M, T', d); no gradient.
        teacher_values: Teacher per-head values (B, M, T', d); only ``merge='shd'`` needs them.
        teacher_out_weight: Teacher output projection weight (D, M*d), or RowProjections over the T' teacher query
            rows (joint attention); only ``merge='shd'`` needs it.
        teacher_scale: The teacher's score scale.
        temperature, loss, merge, grouping, per_row, query_mask, key_mask, prefix_tokens, return_alphas: As in
            :func:`~shd_plugins.core.losses.shd_loss`.
        block_rows: Query rows per block within a chunk; by default all rows, unless one chunk's (samples, heads,
            T, T) maps would pass 64 MiB of float32.

    Returns:
        The scalar loss, or ``(loss, alphas)``.
    """
    _check_temperature(temperature)
    if loss not in LOSS_TYPES:
        raise ValueError(f"Unknown loss '{loss}'; choose one of {LOSS_TYPES}.")
    if merge not in MERGE_MODES:
        raise ValueError(f"Unknown merge '{merge}'; choose one of {MERGE_MODES}.")
    _check_qk('student', student_q, student_k)
    _check_qk('teacher', teacher_q, teacher_k)
    teacher_prefix, student_prefix = split_prefix_tokens(prefix_tokens)
    check_prefix_tokens((teacher_prefix, student_prefix), teacher_q.shape[-2], student_q.shape[-2])
    teacher_out_weight = drop_prefix_rows(teacher_out_weight, teacher_prefix, teacher_q.shape[-2])
    student_q, student_k = student_q[:, :, student_prefix:], student_k[:, :, student_prefix:]
    teacher_q, teacher_k = teacher_q[:, :, teacher_prefix:], teacher_k[:, :, teacher_prefix:]
    if teacher_values is not None:
        teacher_values = teacher_values[:, :, teacher_prefix:]
    batch, num_heads, tokens, _ = student_q.shape
    teacher_scores = _scores_view(teacher_q.shape[0], teacher_q.shape[1], teacher_q.shape[2], teacher_q)
    _check_shd_shapes(_scores_view(batch, num_heads, tokens, student_q), teacher_scores,
                      teacher_values if teacher_values is not None else teacher_q)
    query_mask, key_mask = prepare_masks(query_mask, key_mask, batch, tokens)
    schedule = merge_schedule(teacher_q.shape[1], num_heads, grouping)
    if merge == 'shd':
        _check_merge_inputs(teacher_scores, teacher_values, teacher_out_weight)
    if block_rows is not None and block_rows < 1:
        raise ValueError(f'block_rows must be >= 1, got {block_rows}.')

    full_teacher = _Teacher.prepare(teacher_q, teacher_k, teacher_values if merge == 'shd' else None,
                                    teacher_out_weight if merge == 'shd' else None, teacher_scale, key_mask, query_mask)
    dtype = torch.promote_types(student_q.dtype, torch.float32)
    scaled_q, student_k_float = student_q.to(dtype) * student_scale, student_k.to(dtype)
    row_weight = None if query_mask is None else query_mask.to(dtype)
    alpha_shape = (batch, num_merges(schedule)) + ((tokens,) if per_row else ())
    needs_grad = torch.is_grad_enabled() and (scaled_q.requires_grad or student_k_float.requires_grad)
    reuse = temperature == 1.0 and query_mask is None  # the merged tau = 1 maps are then the targets
    with torch.no_grad():
        alphas = full_teacher.q.new_full(alpha_shape, {'shd': 0.0, 'mean': 0.5, 'select': 1.0}[merge])
        total = scaled_q.new_zeros(())
        grad_q, grad_k = torch.zeros_like(scaled_q), torch.zeros_like(student_k_float)
        for chunk in _chunks(schedule, teacher_q.shape[1], batch, tokens, teacher_q.device):
            teacher = full_teacher.take(chunk)
            chunk_q, chunk_k = scaled_q[chunk.batch, chunk.student_heads], student_k_float[chunk.batch,
                                                                                           chunk.student_heads]
            chunk_grad_q, chunk_grad_k = grad_q[chunk.batch, chunk.student_heads], grad_k[chunk.batch,
                                                                                          chunk.student_heads]
            chunk_alphas = alphas[chunk.batch][:, chunk.merges]  # a copy (the merges need not be adjacent)
            rows_per_block = block_rows or default_block_rows(
                chunk_q.shape[0], max(teacher.q.shape[1], chunk_q.shape[1]), tokens)
            blocks = [slice(start, min(start + rows_per_block, tokens)) for start in range(0, tokens, rows_per_block)]
            merge_in_blocks = merge == 'shd' and (per_row or len(blocks) == 1)
            if merge == 'shd' and not merge_in_blocks:
                chunk_alphas = _compute_alphas(teacher, chunk.schedule, blocks)
            for rows in blocks:
                if merge_in_blocks:
                    merged, block_alphas = merge_rounds(teacher.weight_maps(rows), teacher.v, teacher.projections,
                                                        teacher.gram, chunk.schedule, per_row, start=rows.start)
                    if per_row:
                        chunk_alphas[..., rows] = block_alphas
                    else:
                        chunk_alphas = block_alphas
                    target = merged if reuse else _apply_schedule(teacher.maps(rows, temperature), chunk.schedule,
                                                                  block_alphas)
                else:
                    target = _apply_schedule(teacher.maps(rows, temperature), chunk.schedule,
                                             chunk_alphas[..., rows] if per_row else chunk_alphas)
                block_q = chunk_q[:, :, rows]
                value, grad_scores = _block_loss_and_grad(
                    target, block_q @ chunk_k.transpose(-2, -1), teacher.key_mask,
                    None if row_weight is None else row_weight[chunk.batch, rows], temperature, loss)
                total += value
                if needs_grad:  # e.g. a loss logged under no_grad skips the two gradient products
                    chunk_grad_q[:, :, rows] = grad_scores @ chunk_k
                    chunk_grad_k += grad_scores.transpose(-2, -1) @ block_q
            if chunk.merges:
                alphas[chunk.batch][:, chunk.merges] = chunk_alphas
        count = num_heads * batch * tokens if row_weight is None else (num_heads * row_weight.sum()).clamp_min(1.0)
        total, grad_q, grad_k = total / count, grad_q / count, grad_k / count
    value = _PrecomputedGrad.apply(total, grad_q, grad_k, scaled_q, student_k_float)
    return (value, alphas) if return_alphas else value
