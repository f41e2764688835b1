"""The SHD loss from q, k and v in bounded blocks of query rows: no (B, H, N, N) tensor is ever held.

The dense :func:`~shd_plugins.core.losses.shd_loss` takes the score maps of both models, so one distilled layer holds
B x (M + N) x T^2 floats (and autograd keeps them for backward): at 1024-4096 tokens that is the activation budget.
Every quantity SHD needs is a sum over query rows, so this module walks the rows in blocks:

- Merge weights: a pair's closed-form weight needs ``<U, U>``, ``<W, W>`` and ``<U, W>`` (see
  :mod:`~shd_plugins.core.merge`), each a sum over rows of the block's ``(A_p - A_q) V`` products, so they are
  accumulated block by block. Where rows go through different output projections (joint attention,
  :class:`~shd_plugins.core.projections.RowProjections`) a block is cut at the segment boundaries it spans and
  each piece is weighed with its own projection's Gram blocks. Round r of a multi-round schedule mixes maps with
  the weights of rounds < r, so per-map weights take one pass per round; ``per_row`` weights depend only on their
  row and take one pass.
- The loss: each block's merged targets and student log-softmax come from q and k, and the block's gradient to the
  student scores has a closed form (``tau (S - T)`` for the KL), so the gradients to q and k are computed with the
  value, block by block, and autograd keeps only them (O(T d)): no recomputation in the backward, no N x N
  tensor saved. When the weights need no other rows (``per_row``, or all rows in one block) the merge that
  computes them also yields the tau = 1 targets, so each block's teacher maps are formed once.

The result equals the dense loss up to float32 summation order (tests: 1e-5 relative on the loss, 1e-4 on the
gradients), including the per-layer merge weights it returns. The attention-call formulation of ``../shared/SPEC.md``
section 8 would let fused SDPA kernels do the work on GPU; the row blocks reuse the merge code (pair weights, the
round mixing) and, on CPU, take less time than the dense loss (``eval/bench_overhead.py``, modes c and d), mostly
because the teacher's output Gram matrix ``W_O^T W_O`` is kept across steps instead of recomputed per layer.
"""
from __future__ import annotations

import logging
import weakref

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
from .merge import MERGE_MODES, _apply_schedule, _check_merge_inputs, _mix_round, _row_terms, alpha_from_terms
from .precision import without_autocast
from .projections import RowProjections, as_row_projections, drop_prefix_rows

__all__ = ['streamed_shd_loss', 'default_block_rows']

_logger = logging.getLogger(__name__)

# Elements of one (B, H, rows, T) block tensor: 2^24 float32 = 64 MiB; a block step holds a handful of them.
_BLOCK_ELEMENTS = 2 ** 24
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


class _Teacher:
    """The teacher side in float32: scaled q, k, v, the output Gram matrices, masks; block maps on demand."""

    def __init__(self, q, k, v, out_weight, scale, key_mask, query_mask):
        dtype = torch.promote_types(q.dtype, torch.float32)
        self.q = q.detach().to(dtype) * scale  # scale the (T x d) side, as CapturedAttention.logits does
        self.k = k.detach().to(dtype)
        self.v = None if v is None else v.detach().to(dtype)
        # The caller's weight tensors themselves (not detached copies): the Gram cache is keyed by them.
        self.projections = None if out_weight is None else as_row_projections(out_weight, q.shape[2])
        self.key_mask, self.query_mask = key_mask, query_mask

    def gram(self, weight: torch.Tensor) -> torch.Tensor:
        """``W_O^T W_O`` (M*d, M*d) of one output-projection weight; block (a, b) is ``W_O^a W_O^b^T``.

        The teacher is frozen, so the product (a (M d)^3 matmul: 3 GFLOP per DiT-XL layer, per step) is kept per
        weight tensor and recomputed only when the weight changes in place (its version counter moves). A view of a
        parameter (Flux single-stream blocks give ``proj_out.weight[:, :inner]``, a new view at every step) is kept
        under its base parameter and its place in it, so the cache still hits.
        """
        source, index = _gram_index(weight)
        key = (weight._version, self.q.dtype, weight.device)  # a view shares its base's version counter
        cached = _GRAM_CACHE.get(index)
        if cached is None or cached[0]() is not source or cached[1] != key:
            ref = weakref.ref(source, lambda _, index=index: _GRAM_CACHE.pop(index, None))
            weight_float = weight.detach().to(self.q.dtype)
            cached = (ref, key, weight_float.t() @ weight_float)
            _GRAM_CACHE[index] = cached
        return cached[2]

    def maps(self, rows: slice, temperature: float = 1.0) -> torch.Tensor:
        scores = self.q[:, :, rows] @ self.k.transpose(-2, -1)
        if self.key_mask is not None:
            scores = scores.masked_fill(~self.key_mask[:, None, None, :], float('-inf'))
        return (scores if temperature == 1.0 else scores / temperature).softmax(-1)

    def weight_maps(self, rows: slice) -> torch.Tensor:
        """tau = 1 maps with invalid query rows zeroed: they must not steer the merge weights."""
        maps = self.maps(rows)
        return maps if self.query_mask is None else maps * self.query_mask[:, None, rows, None]

    def pair_terms(self, maps, rows, pair, starts, sizes, per_row) -> torch.Tensor:
        """The stacked ``(|U|^2, |W|^2, <U,W>)`` (3, B[, rows]) of one pair of (merged) groups over the block's
        ``rows``, from ``(A_p - A_q) V_p``, ``(A_p - A_q) V_q`` and the Gram blocks of each row's projection."""
        p, q = pair
        batch, _, tokens, head_dim = self.v.shape
        delta = maps[:, p] - maps[:, q]

        def group(i):
            start, size = starts[i], sizes[i]
            values = self.v[:, start:start + size].permute(0, 2, 1, 3).reshape(batch, tokens, size * head_dim)
            return values, slice(start * head_dim, (start + size) * head_dim)

        (values_p, cols_p), (values_q, cols_q) = group(p), group(q)
        return _row_terms(delta @ values_p, delta @ values_q, self.projections, self.gram, [(cols_p, cols_q)],
                          per_row=per_row, start=rows.start)


def _group_layouts(schedule: MergeSchedule, heads: int) -> list[tuple[list[int], list[int]]]:
    """``(starts, sizes)`` of the head groups each round of ``schedule`` starts from (groups are head ranges)."""
    layouts, starts, sizes = [], list(range(heads)), [1] * heads
    for round_slots in schedule:
        layouts.append((starts, sizes))
        starts = [starts[slot[0]] for slot in round_slots]
        sizes = [sum(sizes[i] for i in slot) for slot in round_slots]
    return layouts


def _merge_block(teacher: _Teacher, maps: torch.Tensor, rows: slice, schedule: MergeSchedule,
                 per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the maps of the block ``rows`` when it holds every row a weight depends on (per-row weights, or a
    block of all rows), computing the weights round by round as :func:`~shd_plugins.core.merge.merge_heads` does."""
    pieces = []
    for round_slots, (starts, sizes) in zip(schedule, _group_layouts(schedule, maps.shape[1])):
        pairs = [slot for slot in round_slots if len(slot) == 2]
        round_alpha = torch.stack([alpha_from_terms(*teacher.pair_terms(maps, rows, pair, starts, sizes, per_row))
                                   for pair in pairs], dim=1)
        pieces.append(round_alpha)
        maps = _mix_round(maps, round_slots, round_alpha)
    if not pieces:  # M == N: nothing to merge
        return maps, maps.new_empty((maps.shape[0], 0) + ((maps.shape[2],) if per_row else ()))
    return maps, torch.cat(pieces, dim=1)


def _compute_alphas(teacher: _Teacher, schedule: MergeSchedule, blocks: list[slice]) -> torch.Tensor:
    """Per-map merge weights over several row blocks: round r needs the weights of rounds < r, so one pass per
    round, accumulating the pair terms ``<U,U>, <W,W>, <U,W>`` over the blocks."""
    batch = teacher.q.shape[0]
    alphas, offset = teacher.q.new_zeros((batch, num_merges(schedule))), 0
    for r, (round_slots, (starts, sizes)) in enumerate(zip(schedule, _group_layouts(schedule, teacher.q.shape[1]))):
        pairs = [slot for slot in round_slots if len(slot) == 2]
        terms = teacher.q.new_zeros(3, batch, len(pairs))
        for rows in blocks:
            maps = _apply_schedule(teacher.weight_maps(rows), schedule[:r], alphas[:, :offset])
            for i, pair in enumerate(pairs):
                terms[:, :, i] += teacher.pair_terms(maps, rows, pair, starts, sizes, per_row=False)
        alphas[:, offset:offset + len(pairs)] = alpha_from_terms(*terms)
        offset += len(pairs)
    return alphas


def _block_loss_and_grad(target: torch.Tensor, scores: torch.Tensor, key_mask: torch.Tensor | None,
                         row_weight: torch.Tensor | None, temperature: float,
                         loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of the block's per-row losses (as ``attention_map_loss`` computes them) and its gradient with
    respect to the student scores, in closed form: the backward then needs no recomputation of the block."""
    z = scores if temperature == 1.0 else scores / temperature
    if key_mask is not None:
        z = z.masked_fill(~key_mask[:, None, None, :], float('-inf'))
    log_student = F.log_softmax(z, dim=-1)
    if key_mask is not None:
        log_student = log_student.masked_fill(~key_mask[:, None, None, :], 0.0)
    student = log_student.exp()
    if key_mask is not None:
        student = student.masked_fill(~key_mask[:, None, None, :], 0.0)
    if loss == 'kl' and key_mask is None and row_weight is None:
        # The common case in fewer passes over the block: every target row is a convex combination of softmax
        # rows, so it sums to 1 and the gradient is S - T. (The value keeps the per-element difference: the
        # entropy and cross sums apart would cancel to 1e-4 relative.)
        value = torch.xlogy(target, target).sub_(target * log_student).sum()
        grad_z = student.sub_(target)
        if temperature != 1.0:
            value, grad_z = value * temperature ** 2, grad_z.mul_(temperature)  # tau^2 from the loss, 1/tau from z
        return value, grad_z
    if loss == 'kl':
        per_row_loss = (torch.xlogy(target, target) - target * log_student).sum(-1) * temperature ** 2
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
        block_rows: Query rows per block; by default about 64 MiB of float32 per (B, H, rows, T) block.

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
    rows_per_block = block_rows or default_block_rows(batch, max(teacher_q.shape[1], num_heads), tokens)
    blocks = [slice(start, min(start + rows_per_block, tokens)) for start in range(0, tokens, rows_per_block)]

    teacher = _Teacher(teacher_q, teacher_k, teacher_values if merge == 'shd' else None,
                       teacher_out_weight if merge == 'shd' else None, teacher_scale, key_mask, query_mask)
    dtype = torch.promote_types(student_q.dtype, torch.float32)
    scaled_q, student_k_float = student_q.to(dtype) * student_scale, student_k.to(dtype)
    row_weight = None if query_mask is None else query_mask.to(dtype)
    alpha_shape = (batch, num_merges(schedule)) + ((tokens,) if per_row else ())
    merge_in_blocks = merge == 'shd' and (per_row or len(blocks) == 1)
    needs_grad = torch.is_grad_enabled() and (scaled_q.requires_grad or student_k_float.requires_grad)
    with torch.no_grad():
        if merge != 'shd':
            alphas = teacher.q.new_full(alpha_shape, 0.5 if merge == 'mean' else 1.0)
        elif merge_in_blocks:
            alphas = teacher.q.new_empty(alpha_shape)
        else:
            alphas = _compute_alphas(teacher, schedule, blocks)
        total = scaled_q.new_zeros(())
        grad_q, grad_k = torch.zeros_like(scaled_q), torch.zeros_like(student_k_float)
        for rows in blocks:
            if merge_in_blocks:
                merged, block_alphas = _merge_block(teacher, teacher.weight_maps(rows), rows, schedule, per_row)
                if per_row:
                    alphas[..., rows] = block_alphas
                else:
                    alphas.copy_(block_alphas)
                reuse = temperature == 1.0 and query_mask is None  # the merged tau = 1 maps are the targets
            else:
                block_alphas, reuse = (alphas[..., rows] if per_row else alphas), False
            target = merged if reuse else _apply_schedule(teacher.maps(rows, temperature), schedule, block_alphas)
            block_q = scaled_q[:, :, rows]
            value, grad_scores = _block_loss_and_grad(
                target, block_q @ student_k_float.transpose(-2, -1), key_mask,
                None if row_weight is None else row_weight[:, rows], temperature, loss)
            total += value
            if needs_grad:  # e.g. a loss logged under no_grad skips the two gradient products
                grad_q[:, :, rows] = grad_scores @ student_k_float
                grad_k += grad_scores.transpose(-2, -1) @ block_q
        count = num_heads * batch * tokens if row_weight is None else (num_heads * row_weight.sum()).clamp_min(1.0)
        total, grad_q, grad_k = total / count, grad_q / count, grad_k / count
    value = _PrecomputedGrad.apply(total, grad_q, grad_k, scaled_q, student_k_float)
    return (value, alphas) if return_alphas else value
