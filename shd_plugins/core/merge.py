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
"""
from collections import defaultdict
from collections.abc import Sequence

import torch

from .heads import MergeSchedule, Slot, merge_schedule, num_merges

__all__ = ['MERGE_MODES', 'merge_heads', 'pair_alpha', 'alpha_from_terms', 'reconstruction_error']

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
    if per_row:
        uu = ((delta_vp @ gram_pp) * delta_vp).sum(-1)
        ww = ((delta_vq @ gram_qq) * delta_vq).sum(-1)
        uw = ((delta_vp @ gram_pq) * delta_vq).sum(-1)
    else:
        uu = ((delta_vp.transpose(-2, -1) @ delta_vp) * gram_pp).sum((-2, -1))
        ww = ((delta_vq.transpose(-2, -1) @ delta_vq) * gram_qq).sum((-2, -1))
        uw = ((delta_vp.transpose(-2, -1) @ delta_vq) * gram_pq).sum((-2, -1))
    return alpha_from_terms(uu, ww, uw, eps=eps)


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
        out_weight: torch.Tensor | None,
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
    if out_weight.dim() != 2 or out_weight.shape[1] != heads * head_dim:
        raise ValueError(
            f'out_weight must be the (D, M*d) = (D, {heads * head_dim}) weight of the output projection '
            f'(nn.Linear layout) for {heads} heads of dim {head_dim}, got {tuple(out_weight.shape)}.')


def merge_heads(
        attn: torch.Tensor,
        values: torch.Tensor | None,
        out_weight: torch.Tensor | None,
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
            ``h*d:(h+1)*d``. Only needed for ``merge='shd'``.
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
        out_weight: torch.Tensor,
        schedule: MergeSchedule,
        per_row: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge round by round, computing each pair's weight from the current (already merged) maps.

    Groups are always contiguous head ranges, so a group's values and Gram blocks are slices; pairs whose
    groups have equal sizes are batched.
    """
    compute_dtype = torch.promote_types(attn.dtype, torch.float32)
    maps = attn.to(compute_dtype)
    values = values.to(compute_dtype)
    out_weight = out_weight.to(compute_dtype)
    batch, heads, tokens, head_dim = values.shape
    gram = out_weight.t() @ out_weight  # (M*d, M*d); block (a, b) is W_O^a W_O^b^T

    def group_values(start: int, size: int) -> torch.Tensor:  # (B, N, size*d): V of the merged group
        return values[:, start:start + size].permute(0, 2, 1, 3).reshape(batch, tokens, size * head_dim)

    def gram_block(start_p: int, size_p: int, start_q: int, size_q: int) -> torch.Tensor:
        return gram[start_p * head_dim:(start_p + size_p) * head_dim, start_q * head_dim:(start_q + size_q) * head_dim]

    starts, sizes = list(range(heads)), [1] * heads
    all_alphas = []
    for round_slots in schedule:
        pairs = [slot for slot in round_slots if len(slot) == 2]
        round_alpha = maps.new_empty((batch, len(pairs)) + ((tokens,) if per_row else ()))
        buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
        for k, (p, q) in enumerate(pairs):
            buckets[(sizes[p], sizes[q])].append(k)
        for (size_p, size_q), members in buckets.items():
            delta = (_take(maps, 1, [pairs[k][0] for k in members])
                     - _take(maps, 1, [pairs[k][1] for k in members]))  # (B, K, N, N)
            values_p = torch.stack([group_values(starts[pairs[k][0]], size_p) for k in members], dim=1)
            values_q = torch.stack([group_values(starts[pairs[k][1]], size_q) for k in members], dim=1)
            blocks = [(starts[pairs[k][0]], starts[pairs[k][1]]) for k in members]
            gram_pp = torch.stack([gram_block(sp, size_p, sp, size_p) for sp, _ in blocks])
            gram_qq = torch.stack([gram_block(sq, size_q, sq, size_q) for _, sq in blocks])
            gram_pq = torch.stack([gram_block(sp, size_p, sq, size_q) for sp, sq in blocks])
            round_alpha[:, members] = pair_alpha(
                delta @ values_p, delta @ values_q, gram_pp, gram_qq, gram_pq, per_row=per_row)
        all_alphas.append(round_alpha)
        maps = _mix_round(maps, round_slots, round_alpha)
        starts = [starts[slot[0]] for slot in round_slots]
        sizes = [sum(sizes[i] for i in slot) for slot in round_slots]
    empty = maps.new_empty((batch, 0) + ((tokens,) if per_row else ()))
    return maps, torch.cat(all_alphas, dim=1) if all_alphas else empty
