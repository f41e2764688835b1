"""The squeeze: closed-form convex combination of teacher attention maps.

Two heads p, q that must share one map get ``a * A_p + (1 - a) * A_q`` with the ``a`` that best keeps the
layer's output ``A_p X_p + A_q X_q`` (``X_h = V_h W_O^h``, the value-output circuit of head h)::

    E(a) = || (a A_p + (1 - a) A_q)(X_p + X_q) - (A_p X_p + A_q X_q) ||_F^2
         = || a (U + W) - U ||_F^2,   with  D = A_p - A_q,  U = D X_p,  W = D X_q

    a* = <U, U + W> / ||U + W||^2,   clamped to [0, 1]  (0.5 when ||U + W||^2 vanishes)

The paper states the objective but its equation could not be read; this closed form is derived from that
description (E is a 1-D quadratic in a). The N x D products are never formed: with ``P = D V_p`` and
``G_pq = W_O^p W_O^q^T`` (d x d), ``<U, W> = sum((P^T Q) * G_pq)``, about one attention-times-values
product per pair.

Joint attention (SD3, Flux double-stream blocks, CogVideoX) runs one map over text and image tokens, but a query
row's output then goes through its own stream's projection: image rows through ``to_out``, text rows through
``to_add_out``, and SD3's last block discards the text rows' outputs. The output to keep is then, row by row,
``sum_h A_h[i] V_h W_O^{h,s(i)}`` with the projection of row i's segment s(i); every term above is a sum over query
rows, so it becomes the sum over segments of the row-restricted term with that segment's Gram blocks (discarded rows
add nothing). :class:`RowProjections` describes such a layer; a plain weight is its one-segment case.
"""
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch

from .heads import MergeSchedule, Slot, merge_schedule, num_merges
from .projections import RowProjections, as_row_projections

__all__ = ['MERGE_MODES', 'RowProjections', 'merge_heads', 'pair_alpha', 'alpha_from_terms', 'reconstruction_error']

MERGE_MODES = ('shd', 'mean', 'select')


def pair_alpha(
        delta_vp: torch.Tensor,
        delta_vq: torch.Tensor,
        gram_pp: torch.Tensor,
        gram_qq: torch.Tensor,
        gram_pq: torch.Tensor,
        *,
        per_row: bool = False,
        eps: float = 1e-6,
) -> torch.Tensor:
    """Closed-form mixing weight of a pairwise merge from d x d Gram blocks.

    Args:
        delta_vp: ``P = (A_p - A_q) V_p`` of shape (..., N, d_p).
        delta_vq: ``Q = (A_p - A_q) V_q`` of shape (..., N, d_q).
        gram_pp: ``W_O^p W_O^p^T`` (..., d_p, d_p), broadcastable against the batch dims of P.
        gram_qq: ``W_O^q W_O^q^T`` (..., d_q, d_q).
        gram_pq: ``W_O^p W_O^q^T`` (..., d_p, d_q).
        per_row: One weight per query row instead of one per map.
        eps: A denominator below ``eps * (|U|^2 + |W|^2)`` counts as vanishing (weight 0.5).

    Returns:
        The weight a in [0, 1], shape (...) or (..., N) with ``per_row``.
    """
    return alpha_from_terms(*_pair_terms(delta_vp, delta_vq, gram_pp, gram_qq, gram_pq, per_row), eps=eps)


def _pair_terms(delta_vp, delta_vq, gram_pp, gram_qq, gram_pq, per_row: bool) -> tuple[torch.Tensor, ...]:
    """``(|U|^2, |W|^2, <U,W>)`` of :func:`pair_alpha`'s arguments, summed over rows unless ``per_row``."""
    if per_row:
        return (((delta_vp @ gram_pp) * delta_vp).sum(-1), ((delta_vq @ gram_qq) * delta_vq).sum(-1),
                ((delta_vp @ gram_pq) * delta_vq).sum(-1))
    return (((delta_vp.transpose(-2, -1) @ delta_vp) * gram_pp).sum((-2, -1)),
            ((delta_vq.transpose(-2, -1) @ delta_vq) * gram_qq).sum((-2, -1)),
            ((delta_vp.transpose(-2, -1) @ delta_vq) * gram_pq).sum((-2, -1)))


def _row_terms(
        delta_vp: torch.Tensor,
        delta_vq: torch.Tensor,
        projections: RowProjections,
        gram_of: Callable[[torch.Tensor], torch.Tensor],
        columns: Sequence[tuple[slice, slice]],
        *,
        per_row: bool,
        start: int = 0,
) -> torch.Tensor:
    """The stacked terms ``(|U|^2, |W|^2, <U,W>)`` of K pairs over a block of query rows, each row weighed with the
    Gram blocks of its own segment's projection; rows whose outputs are discarded add nothing.

    Args:
        delta_vp, delta_vq: ``P``, ``Q`` (..., K, rows, d_p) and (..., K, rows, d_q) of the block's rows
            [start, start + rows); (..., rows, d) with one pair.
        projections: The projections of all query rows.
        gram_of: A projection weight -> its ``W^T W`` (M*d, M*d) in the compute dtype.
        columns: Each pair's ``(cols_p, cols_q)``: its groups' columns in the Gram.
        per_row: Keep the row dimension instead of summing over it.
        start: The block's first row.

    Returns:
        (3, ..., K[, rows]); (3, ...[, rows]) with one pair.
    """
    shape = delta_vp.shape[:-1] if per_row else delta_vp.shape[:-2]
    terms = delta_vp.new_zeros((3,) + shape)
    for rows, weight in projections.row_slices(start, start + delta_vp.shape[-2]):
        if weight is None:
            continue
        gram = gram_of(weight)
        blocks = [gram[pairs[0]] if len(pairs) == 1 else torch.stack([gram[cols] for cols in pairs]) for pairs in (
            [(p, p) for p, _ in columns], [(q, q) for _, q in columns], columns)]  # views with one pair: no copy
        part = torch.stack(_pair_terms(delta_vp[..., rows, :], delta_vq[..., rows, :], *blocks, per_row))
        if per_row:
            terms[..., rows] = part
        else:
            terms += part
    return terms


def alpha_from_terms(uu: torch.Tensor, ww: torch.Tensor, uw: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """``a* = (|U|^2 + <U,W>) / |U + W|^2`` clamped to [0, 1], 0.5 where the denominator vanishes.

    Split from :func:`pair_alpha` so that a caller that accumulates the three inner products over row blocks (the
    streamed loss) applies the same closed form.
    """
    denominator = uu + 2 * uw + ww
    vanishing = denominator <= eps * (uu + ww) + torch.finfo(denominator.dtype).tiny
    alpha = (uu + uw) / torch.where(vanishing, torch.ones_like(denominator), denominator)
    return torch.where(vanishing, torch.full_like(alpha, 0.5), alpha.clamp(0.0, 1.0))


def reconstruction_error(
        alpha: torch.Tensor,
        attn_p: torch.Tensor,
        attn_q: torch.Tensor,
        out_p: torch.Tensor,
        out_q: torch.Tensor,
) -> torch.Tensor:
    """Dense ``E(a)`` of the module docstring (forms the N x D products: for tests and diagnostics)."""
    merged = alpha * attn_p + (1 - alpha) * attn_q
    return (merged @ (out_p + out_q) - (attn_p @ out_p + attn_q @ out_q)).pow(2).sum((-2, -1))


def _check_merge_inputs(
        attn: torch.Tensor,
        values: torch.Tensor | None,
        out_weight: torch.Tensor | RowProjections | None,
) -> None:
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f'attn must be (B, M, N, N) attention maps, got shape {tuple(attn.shape)}.')
    batch, heads, tokens, _ = attn.shape
    if values is None or out_weight is None:
        raise ValueError("merge='shd' needs the teacher's values and output-projection weight.")
    if values.dim() != 4 or tuple(values.shape[:3]) != (batch, heads, tokens):
        raise ValueError(
            f'values must be (B, M, N, d) = ({batch}, {heads}, {tokens}, d) to match attn '
            f'{tuple(attn.shape)}, got {tuple(values.shape)}.')
    head_dim = values.shape[-1]
    if isinstance(out_weight, RowProjections):
        if out_weight.tokens != tokens:
            raise ValueError(
                f'out_weight RowProjections cover {out_weight.tokens} query rows but the teacher maps have {tokens}: '
                f'the segments must tile the query rows the merge sees (after prefix tokens are dropped).')
        if out_weight.width not in (None, heads * head_dim):
            raise ValueError(
                f'out_weight RowProjections hold (D_s, {out_weight.width}) weights, but {heads} heads of dim '
                f'{head_dim} need (D_s, {heads * head_dim}) output projections (nn.Linear layout).')
        return
    if not isinstance(out_weight, torch.Tensor):
        raise TypeError(f'out_weight must be a torch.Tensor or RowProjections, got {type(out_weight).__name__}.')
    if out_weight.dim() != 2 or out_weight.shape[1] != heads * head_dim:
        raise ValueError(
            f'out_weight must be the (D, M*d) = (D, {heads * head_dim}) weight of the output projection '
            f'(nn.Linear layout) for {heads} heads of dim {head_dim}, got {tuple(out_weight.shape)}.')


def merge_heads(
        attn: torch.Tensor,
        values: torch.Tensor | None,
        out_weight: torch.Tensor | RowProjections | None,
        num_heads: int,
        *,
        grouping: str = 'progressive',
        merge: str = 'shd',
        per_row: bool = False,
        alphas: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squeeze M teacher attention maps into ``num_heads`` maps.

    Args:
        attn: Row-stochastic teacher maps (B, M, N, N).
        values: Teacher per-head values (B, M, N, d); only needed for ``merge='shd'``.
        out_weight: Output-projection weight (D, M*d) as ``nn.Linear`` stores it; head h owns columns
            ``h*d:(h+1)*d``, or :class:`RowProjections` over the N query rows where rows go through different
            projections (joint attention). Only needed for ``merge='shd'``.
        num_heads: Student head count N <= M.
        grouping: ``'progressive'`` or ``'balanced'`` (see :func:`shd_plugins.core.heads.merge_schedule`).
        merge: ``'shd'`` (closed-form a), ``'mean'`` (a = 0.5) or ``'select'`` (a = 1, keep the first head of
            each pair): the latter two are the paper's ablation baselines.
        per_row: One a per query row instead of one per (sample, merged pair).
        alphas: Reuse weights from an earlier call (e.g. the tau = 1 maps) instead of computing them.

    Returns:
        ``(merged, alphas)``: merged maps (B, num_heads, N, N) and the weight of every pairwise merge in
        schedule order, (B, M - N) or (B, M - N, N) with ``per_row``. Weights are never pooled across the
        batch and carry no gradient.
    """
    if merge not in MERGE_MODES:
        raise ValueError(f"Unknown merge '{merge}'; choose one of {MERGE_MODES}.")
    if attn.dim() != 4:
        raise ValueError(f'attn must be (B, M, N, N) attention maps, got shape {tuple(attn.shape)}.')
    schedule = merge_schedule(attn.shape[1], num_heads, grouping)
    compute_alpha = merge == 'shd' and alphas is None
    if compute_alpha:
        _check_merge_inputs(attn, values, out_weight)
    batch, _, tokens, _ = attn.shape
    alpha_shape = (batch, num_merges(schedule)) + ((tokens,) if per_row else ())
    if alphas is None:
        fill = {'shd': 0.0, 'mean': 0.5, 'select': 1.0}[merge]
        alphas = attn.new_full(alpha_shape, fill, dtype=torch.promote_types(attn.dtype, torch.float32))
    elif tuple(alphas.shape) != alpha_shape:
        raise ValueError(f'alphas must have shape {alpha_shape} for this merge, got {tuple(alphas.shape)}.')
    alphas = alphas.detach().clone()

    if compute_alpha:
        with torch.no_grad():
            merged, computed = _merge_computing_alphas(
                attn.detach(), values.detach(), out_weight.detach(), schedule, per_row)
        alphas.copy_(computed)
        if not attn.requires_grad:
            return merged.to(attn.dtype), alphas
    return _apply_schedule(attn, schedule, alphas), alphas


def _take(x: torch.Tensor, dim: int, indices: Sequence[int]) -> torch.Tensor:
    """``x.index_select(dim, indices)``, as a strided view (no copy) when the indices are evenly spaced."""
    step = indices[1] - indices[0] if len(indices) > 1 else 1
    if step > 0 and all(b - a == step for a, b in zip(indices, indices[1:])):
        return x[(slice(None),) * dim + (slice(indices[0], indices[-1] + 1, step),)]
    return x.index_select(dim, torch.tensor(indices, device=x.device))


def _mix_round(maps: torch.Tensor, round_slots: Sequence[Slot], pair_weights: torch.Tensor) -> torch.Tensor:
    """One round for all slots at once: ``a * A_p + (1 - a) * A_q`` for pairs, carried groups unchanged.

    Args:
        maps: Current group maps (B, G, N, N).
        round_slots: The round's slots over the G groups.
        pair_weights: (B, P) or (B, P, N) weights of the round's P pairs, in slot order.
    """
    pair_pos = [i for i, slot in enumerate(round_slots) if len(slot) == 2]
    single_pos = [i for i, slot in enumerate(round_slots) if len(slot) == 1]
    if not pair_pos:  # only carried groups (a sub-schedule's round)
        return _take(maps, 1, [slot[0] for slot in round_slots])
    weight = pair_weights.to(maps.dtype)
    weight = weight[..., None, None] if weight.dim() == 2 else weight[..., None]
    first = _take(maps, 1, [round_slots[i][0] for i in pair_pos])
    second = _take(maps, 1, [round_slots[i][1] for i in pair_pos])
    mixed = torch.lerp(second, first, weight)  # exact at a = 0 and a = 1, unlike q + a * (p - q)
    if not single_pos:
        return mixed
    out = torch.cat([mixed, _take(maps, 1, [round_slots[i][0] for i in single_pos])], dim=1)
    order = pair_pos + single_pos
    if order != sorted(order):  # slots interleave pairs and carried groups (balanced grouping)
        out = out.index_select(1, torch.tensor(sorted(range(len(order)), key=order.__getitem__), device=out.device))
    return out


def _apply_schedule(attn: torch.Tensor, schedule: MergeSchedule, alphas: torch.Tensor) -> torch.Tensor:
    maps, merge_offset = attn, 0
    for round_slots in schedule:
        num_pairs = sum(len(slot) == 2 for slot in round_slots)
        maps = _mix_round(maps, round_slots, alphas[:, merge_offset:merge_offset + num_pairs])
        merge_offset += num_pairs
    return maps


def _merge_computing_alphas(
        attn: torch.Tensor,
        values: torch.Tensor,
        out_weight: torch.Tensor | RowProjections,
        schedule: MergeSchedule,
        per_row: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge round by round, computing each pair's weight from the current (already merged) maps (float32)."""
    compute_dtype = torch.promote_types(attn.dtype, torch.float32)
    grams: dict[int, torch.Tensor] = {}

    def gram_of(weight: torch.Tensor) -> torch.Tensor:  # (M*d, M*d); block (a, b) is W_O^a W_O^b^T; one per weight
        if id(weight) not in grams:
            weight_float = weight.to(compute_dtype)
            grams[id(weight)] = weight_float.t() @ weight_float
        return grams[id(weight)]

    return merge_rounds(attn.to(compute_dtype), values.to(compute_dtype), as_row_projections(out_weight, attn.shape[2]),
                        gram_of, schedule, per_row)


def group_layouts(schedule: MergeSchedule, heads: int) -> list[tuple[list[int], list[int]]]:
    """``(starts, sizes)`` of the head groups before each round of ``schedule`` and, last, of the final groups.

    Groups are always contiguous head ranges (a pair merges adjacent ranges), and the final groups are in head order.
    """
    layouts, starts, sizes = [], list(range(heads)), [1] * heads
    for round_slots in schedule:
        layouts.append((starts, sizes))
        starts = [starts[slot[0]] for slot in round_slots]
        sizes = [sum(sizes[i] for i in slot) for slot in round_slots]
    return layouts + [(starts, sizes)]


def round_terms(
        maps: torch.Tensor,
        values: torch.Tensor,
        projections: RowProjections,
        gram_of: Callable[[torch.Tensor], torch.Tensor],
        round_slots: Sequence[Slot],
        layout: tuple[list[int], list[int]],
        *,
        per_row: bool,
        start: int = 0,
) -> torch.Tensor:
    """The terms ``(|U|^2, |W|^2, <U,W>)`` (3, B, P[, rows]) of a round's P pairs over the query rows
    [start, start + rows) that ``maps`` (B, G, rows, N) hold; pairs whose groups have equal sizes are batched
    (one subtraction and two products for all of them)."""
    starts, sizes = layout
    batch, _, tokens, head_dim = values.shape
    pairs = [slot for slot in round_slots if len(slot) == 2]
    terms = maps.new_empty((3, batch, len(pairs)) + ((maps.shape[2],) if per_row else ()))
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for k, (p, q) in enumerate(pairs):
        buckets[(sizes[p], sizes[q])].append(k)

    def group_values(first: int, size: int) -> torch.Tensor:  # (B, N, size*d): V of the merged group
        return values[:, first:first + size].permute(0, 2, 1, 3).reshape(batch, tokens, size * head_dim)

    def columns(first: int, size: int) -> slice:  # the group's rows/columns in the Gram
        return slice(first * head_dim, (first + size) * head_dim)

    for (size_p, size_q), members in buckets.items():
        firsts, seconds = [pairs[k][0] for k in members], [pairs[k][1] for k in members]
        delta = _take(maps, 1, firsts) - _take(maps, 1, seconds)  # (B, K, rows, N)
        values_p = torch.stack([group_values(starts[p], size_p) for p in firsts], dim=1)
        values_q = torch.stack([group_values(starts[q], size_q) for q in seconds], dim=1)
        cols = [(columns(starts[p], size_p), columns(starts[q], size_q)) for p, q in zip(firsts, seconds)]
        terms[:, :, members] = _row_terms(delta @ values_p, delta @ values_q, projections, gram_of, cols,
                                          per_row=per_row, start=start)
    return terms


def merge_rounds(
        maps: torch.Tensor,
        values: torch.Tensor,
        projections: RowProjections,
        gram_of: Callable[[torch.Tensor], torch.Tensor],
        schedule: MergeSchedule,
        per_row: bool,
        start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the maps (B, M, rows, N) of query rows [start, start + rows) round by round, each pair's weight from
    the current maps: ``(merged, alphas)``. The rows must be all the rows a weight depends on (all of them, or any
    block with ``per_row``). Shared by the dense merge and the streamed loss (which passes its cached Grams)."""
    pieces = []
    for round_slots, layout in zip(schedule, group_layouts(schedule, maps.shape[1])):
        round_alpha = alpha_from_terms(*round_terms(maps, values, projections, gram_of, round_slots, layout,
                                                    per_row=per_row, start=start))
        pieces.append(round_alpha)
        maps = _mix_round(maps, round_slots, round_alpha)
    if not pieces:  # M == N: nothing to merge
        return maps, maps.new_empty((maps.shape[0], 0) + ((maps.shape[2],) if per_row else ()))
    return maps, torch.cat(pieces, dim=1)
