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
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .heads import MergeSchedule, merge_schedule, num_merges

__all__ = ['MERGE_MODES', 'merge_heads', 'pair_alpha', 'reconstruction_error']

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
        values: Optional[torch.Tensor],
        out_weight: Optional[torch.Tensor],
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


def _group_columns(members: Sequence[int], head_dim: int) -> List[int]:
    return [h * head_dim + i for h in members for i in range(head_dim)]


def merge_heads(
        attn: torch.Tensor,
        values: Optional[torch.Tensor],
        out_weight: Optional[torch.Tensor],
        num_heads: int,
        *,
        grouping: str = 'progressive',
        merge: str = 'shd',
        per_row: bool = False,
        alphas: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Squeeze M teacher attention maps into ``num_heads`` maps.

    Args:
        attn: Row-stochastic teacher maps (B, M, N, N).
        values: Teacher per-head values (B, M, N, d); only needed for ``merge='shd'``.
        out_weight: Output-projection weight (D, M*d) as ``nn.Linear`` stores it; head h owns columns
            ``h*d:(h+1)*d``. Only needed for ``merge='shd'``.
        num_heads: Student head count N <= M.
        grouping: ``'progressive'`` or ``'balanced'`` (see :func:`shd_plugins.heads.merge_schedule`).
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
        alphas = attn.new_full(alpha_shape, fill)
    elif tuple(alphas.shape) != alpha_shape:
        raise ValueError(f'alphas must have shape {alpha_shape} for this merge, got {tuple(alphas.shape)}.')
    alphas = alphas.detach().clone()

    if compute_alpha:
        with torch.no_grad():
            _compute_schedule_alphas(attn.detach(), values.detach(), out_weight.detach(), schedule, alphas,
                                     per_row)
    return _apply_schedule(attn, schedule, alphas), alphas


def _apply_schedule(attn: torch.Tensor, schedule: MergeSchedule, alphas: torch.Tensor) -> torch.Tensor:
    maps = list(attn.unbind(1))
    merge_index = 0
    for round_slots in schedule:
        new_maps = []
        for slot in round_slots:
            if len(slot) == 1:
                new_maps.append(maps[slot[0]])
                continue
            alpha = alphas[:, merge_index].to(attn.dtype)
            alpha = alpha[:, None, None] if alpha.dim() == 1 else alpha[:, :, None]
            new_maps.append(alpha * maps[slot[0]] + (1 - alpha) * maps[slot[1]])
            merge_index += 1
        maps = new_maps
    return torch.stack(maps, dim=1)


def _compute_schedule_alphas(
        attn: torch.Tensor,
        values: torch.Tensor,
        out_weight: torch.Tensor,
        schedule: MergeSchedule,
        alphas: torch.Tensor,
        per_row: bool,
) -> None:
    """Fill ``alphas`` in place, merging maps round by round; pairs of equal group sizes are batched."""
    compute_dtype = torch.promote_types(attn.dtype, torch.float32)
    attn = attn.to(compute_dtype)
    values = values.to(compute_dtype)
    out_weight = out_weight.to(compute_dtype)
    batch, heads, tokens, head_dim = values.shape
    gram = out_weight.t() @ out_weight  # (M*d, M*d); block (a, b) is W_O^a W_O^b^T
    flat_values = values.permute(0, 2, 1, 3).reshape(batch, tokens, heads * head_dim)

    maps = list(attn.unbind(1))
    members: List[List[int]] = [[h] for h in range(heads)]
    merge_index = 0
    for round_slots in schedule:
        buckets: Dict[Tuple[int, int], List[Tuple[int, Tuple[int, ...]]]] = defaultdict(list)
        for slot in round_slots:
            if len(slot) == 2:
                buckets[(len(members[slot[0]]), len(members[slot[1]]))].append((merge_index, slot))
                merge_index += 1
        merged_maps: Dict[Tuple[int, ...], torch.Tensor] = {}
        for bucket in buckets.values():
            indices = [i for i, _ in bucket]
            cols_p = [_group_columns(members[p], head_dim) for _, (p, _) in bucket]
            cols_q = [_group_columns(members[q], head_dim) for _, (_, q) in bucket]
            attn_p = torch.stack([maps[p] for _, (p, _) in bucket], dim=1)  # (B, K, N, N)
            attn_q = torch.stack([maps[q] for _, (_, q) in bucket], dim=1)
            delta = attn_p - attn_q
            delta_vp = delta @ torch.stack([flat_values[..., c] for c in cols_p], dim=1)  # (B, K, N, d_p)
            delta_vq = delta @ torch.stack([flat_values[..., c] for c in cols_q], dim=1)
            gram_pp = torch.stack([gram[cp][:, cp] for cp in cols_p])  # (K, d_p, d_p)
            gram_qq = torch.stack([gram[cq][:, cq] for cq in cols_q])
            gram_pq = torch.stack([gram[cp][:, cq] for cp, cq in zip(cols_p, cols_q)])
            alpha = pair_alpha(delta_vp, delta_vq, gram_pp, gram_qq, gram_pq, per_row=per_row)
            alphas[:, indices] = alpha.to(alphas.dtype)
            weight = alpha[..., None, None] if not per_row else alpha[..., None]
            mixed = attn_q + weight * delta
            for k, (_, slot) in enumerate(bucket):
                merged_maps[slot] = mixed[:, k]
        maps = [maps[slot[0]] if len(slot) == 1 else merged_maps[slot] for slot in round_slots]
        members = [sum((members[i] for i in slot), []) for slot in round_slots]
