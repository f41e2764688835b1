"""SHD loss and the usual distillation companions (logit KD, output MSE).

All losses compute in float32 (or float64 if given) even under autocast: attention maps are
probability distributions over N keys and half precision loses their small entries.
"""

import math

import torch
import torch.nn.functional as F

from .merge import merge_heads
from .precision import without_autocast
from .projections import RowProjections, drop_prefix_rows

__all__ = [
    'LOSS_TYPES', 'shd_loss', 'attention_map_loss', 'logit_kd_loss', 'output_mse_loss', 'resolve_loss_weights',
    'split_prefix_tokens', 'check_prefix_tokens', 'prepare_masks',
]

LOSS_TYPES = ('kl', 'mse')


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_temperature(temperature: float) -> None:
    if not 0 < temperature < math.inf:
        raise ValueError(f'temperature must be > 0 and finite, got {temperature}.')


def split_prefix_tokens(prefix_tokens: int | tuple[int, int]) -> tuple[int, int]:
    """``(teacher_prefix, student_prefix)`` from an int (same for both) or a pair."""
    if isinstance(prefix_tokens, int):
        prefix_tokens = (prefix_tokens, prefix_tokens)
    teacher_prefix, student_prefix = prefix_tokens
    if teacher_prefix < 0 or student_prefix < 0:
        raise ValueError(f'prefix_tokens must be >= 0, got {prefix_tokens}.')
    return teacher_prefix, student_prefix


def check_prefix_tokens(prefix_tokens: tuple[int, int], teacher_tokens: int, student_tokens: int) -> None:
    """The prefix tokens dropped from each side must leave at least one token."""
    teacher_prefix, student_prefix = prefix_tokens
    if teacher_prefix >= teacher_tokens or student_prefix >= student_tokens:
        raise ValueError(
            f'prefix_tokens (teacher {teacher_prefix}, student {student_prefix}) leave no tokens: the teacher maps '
            f'cover {teacher_tokens} tokens and the student maps {student_tokens}. Drop fewer prefix tokens.')


def prepare_masks(
        query_mask: torch.Tensor | None,
        key_mask: torch.Tensor | None,
        batch: int,
        tokens: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Check the masks' shapes and make rows without any valid key count for nothing.

    A sample whose key mask is all False has no distribution to match: its rows would be NaN after the softmax. Its
    keys are all unmasked (the values stay finite) and its query rows are marked invalid, so it contributes 0 to
    the loss and nothing to the merge weights. Pure tensor ops: no device sync.

    Returns:
        ``(query_mask, key_mask)`` as bool tensors (B, T), or None where none was given.
    """
    for name, mask in (('query_mask', query_mask), ('key_mask', key_mask)):
        if mask is not None and tuple(mask.shape) != (batch, tokens):
            raise ValueError(
                f'{name} must be (B, T) = ({batch}, {tokens}) over the kept tokens (after prefix tokens are dropped), '
                f'got shape {tuple(mask.shape)}.')
    query_mask = None if query_mask is None else query_mask.to(torch.bool)
    if key_mask is None:
        return query_mask, None
    key_mask = key_mask.to(torch.bool)
    has_key = key_mask.any(-1, keepdim=True)
    key_mask = key_mask | ~has_key
    query_mask = has_key.expand(batch, tokens) if query_mask is None else query_mask & has_key
    return query_mask, key_mask


@without_autocast
def attention_map_loss(
        student_logits: torch.Tensor,
        target_maps: torch.Tensor,
        *,
        temperature: float = 1.0,
        loss: str = 'kl',
        query_mask: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distance from target attention maps to the student's tempered maps, averaged over valid rows.

    Args:
        student_logits: Student scaled scores ``Q K^T * scale`` (B, H, N, N).
        target_maps: Row-stochastic targets (B, H, N, N), already tempered; zero at masked keys.
        temperature: tau of ``softmax(S / tau)``; the KL is scaled by tau^2 as in Hinton et al.
        loss: ``'kl'`` (KL(target || student) per row, ``xlogy`` so zero targets add 0) or ``'mse'``
            (squared error summed over keys, averaged over rows like the KL).
        query_mask: (B, N) bool, True for query rows that count.
        key_mask: (B, N) bool, True for keys that may be attended.
    """
    if loss not in LOSS_TYPES:
        raise ValueError(f"Unknown loss '{loss}'; choose one of {LOSS_TYPES}.")
    _check_temperature(temperature)
    query_mask, key_mask = prepare_masks(query_mask, key_mask, student_logits.shape[0], student_logits.shape[-1])
    scores = _float(student_logits) / temperature
    key_valid = None if key_mask is None else key_mask[:, None, None, :]
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid, float('-inf'))
    log_student = F.log_softmax(scores, dim=-1)
    if key_valid is not None:
        log_student = log_student.masked_fill(~key_valid, 0.0)
    target = _float(target_maps).detach()

    if loss == 'kl':
        per_row = (torch.xlogy(target, target) - target * log_student).sum(-1) * temperature ** 2
    else:
        per_row = (target - log_student.exp()).pow(2).sum(-1)

    if query_mask is None:
        return per_row.mean()
    row_weight = query_mask[:, None, :].to(per_row.dtype).expand_as(per_row)
    return (per_row * row_weight).sum() / row_weight.sum().clamp_min(1.0)


def _check_shd_shapes(
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        teacher_values: torch.Tensor,
) -> None:
    for name, tensor in (('student_logits', student_logits), ('teacher_logits', teacher_logits)):
        if tensor.dim() != 4 or tensor.shape[-1] != tensor.shape[-2]:
            raise ValueError(f'{name} must be (B, H, N, N) scores, got shape {tuple(tensor.shape)}.')
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(
            f'Batch sizes differ: student_logits {tuple(student_logits.shape)} vs teacher_logits '
            f'{tuple(teacher_logits.shape)}.')
    if student_logits.shape[0] == 0:
        raise ValueError(f'The batch is empty: student_logits {tuple(student_logits.shape)}. Skip the SHD loss for '
                         f'empty batches.')
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f'Student and teacher maps cover different token counts: student {tuple(student_logits.shape)} vs '
            f'teacher {tuple(teacher_logits.shape)}. If only prefix tokens (cls/dist/register) differ, pass '
            f"prefix_tokens (tokens='patch'); otherwise match patch size and resolution.")
    if teacher_values.dim() != 4 or teacher_values.shape[:3] != teacher_logits.shape[:3]:
        raise ValueError(
            f'teacher_values must be (B, M, N, d) matching teacher_logits {tuple(teacher_logits.shape)}, '
            f'got {tuple(teacher_values.shape)}.')


@without_autocast
def shd_loss(
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        teacher_values: torch.Tensor,
        teacher_out_weight: torch.Tensor | RowProjections,
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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Squeezing-Heads Distillation loss for one matched layer pair.

    The teacher's M maps are merged into the student's N with weights computed from the tau = 1 maps; the
    same weights then mix the tempered maps ``softmax(S^T / tau)``, and the student's
    ``log_softmax(S^S / tau)`` is trained toward them. The teacher side carries no gradient.

    Args:
        student_logits: Student scores ``Q K^T * scale`` (B, N_heads, T, T).
        teacher_logits: Teacher scores (B, M, T', T').
        teacher_values: Teacher per-head values (B, M, T', d).
        teacher_out_weight: Teacher output projection weight (D, M*d), or
            :class:`~shd_plugins.core.projections.RowProjections` over all T' teacher query rows (prefix tokens
            included) where rows go through different projections (joint attention: text and image streams).
        temperature: tau > 0.
        loss: ``'kl'`` or ``'mse'``.
        merge: ``'shd'``, ``'mean'`` or ``'select'``.
        grouping: ``'progressive'`` or ``'balanced'``.
        per_row: One merge weight per query row.
        query_mask: (B, T) bool over the kept tokens (after prefix removal), True = row counts.
        key_mask: (B, T) bool over the kept tokens, True = key may be attended. A sample with no valid key
            contributes 0 (it has no distribution to match).
        prefix_tokens: Leading tokens (cls/dist/register) dropped from rows and columns before the
            softmax, i.e. the remaining rows are renormalised. An int for both or ``(teacher, student)``.
        return_alphas: Also return the merge weights (B, M - N[, T]).

    Returns:
        The scalar loss, or ``(loss, alphas)``.
    """
    _check_temperature(temperature)
    teacher_prefix, student_prefix = split_prefix_tokens(prefix_tokens)
    check_prefix_tokens((teacher_prefix, student_prefix), teacher_logits.shape[-1], student_logits.shape[-1])
    teacher_out_weight = drop_prefix_rows(teacher_out_weight, teacher_prefix, teacher_logits.shape[-1])
    student_logits = student_logits[..., student_prefix:, student_prefix:]
    teacher_logits = teacher_logits[..., teacher_prefix:, teacher_prefix:]
    teacher_values = teacher_values[:, :, teacher_prefix:]
    _check_shd_shapes(student_logits, teacher_logits, teacher_values)
    query_mask, key_mask = prepare_masks(query_mask, key_mask, student_logits.shape[0], student_logits.shape[-1])

    with torch.no_grad():
        teacher_scores = _float(teacher_logits.detach())
        if key_mask is not None:
            teacher_scores = teacher_scores.masked_fill(~key_mask[:, None, None, :], float('-inf'))
        teacher_maps = teacher_scores.softmax(-1)
        # Invalid query rows must not steer the merge weights: zero them for the weight computation only.
        weight_maps = teacher_maps if query_mask is None else teacher_maps * query_mask[:, None, :, None]
        merged, alphas = merge_heads(
            weight_maps, teacher_values.detach(), teacher_out_weight.detach(), student_logits.shape[1],
            grouping=grouping, merge=merge, per_row=per_row)
        if temperature != 1.0 or query_mask is not None:
            targets = teacher_maps if temperature == 1.0 else (teacher_scores / temperature).softmax(-1)
            merged, _ = merge_heads(
                targets, None, None, student_logits.shape[1], grouping=grouping, merge=merge, per_row=per_row,
                alphas=alphas)

    value = attention_map_loss(
        student_logits, merged, temperature=temperature, loss=loss, query_mask=query_mask, key_mask=key_mask)
    return (value, alphas) if return_alphas else value


@without_autocast
def logit_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Hinton KD exactly as timm's ``LogitDistillationTask``: batch-mean KL of tempered softmaxes times tau^2."""
    _check_temperature(temperature)
    log_student = F.log_softmax(_float(student_logits) / temperature, dim=-1)
    log_teacher = F.log_softmax(_float(teacher_logits.detach()) / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, reduction='batchmean', log_target=True) * temperature ** 2


@without_autocast
def output_mse_loss(student_output: torch.Tensor, teacher_output: torch.Tensor) -> torch.Tensor:
    """MSE between student and (detached) teacher outputs, e.g. DiT noise predictions."""
    if student_output.shape != teacher_output.shape:
        raise ValueError(
            f'Output shapes differ: student {tuple(student_output.shape)} vs teacher '
            f'{tuple(teacher_output.shape)}.')
    return F.mse_loss(_float(student_output), _float(teacher_output.detach()))


def resolve_loss_weights(
        task_loss_weight: float | None = None,
        distill_loss_weight: float | None = None,
) -> tuple[float, float]:
    """timm's KD weighting: independent weights when ``distill_loss_weight`` is given (task defaults to 1),
    complementary ``(w, 1 - w)`` when only ``task_loss_weight`` is given, ``(1, 1)`` when neither is."""
    if distill_loss_weight is not None:
        return (1.0 if task_loss_weight is None else task_loss_weight), distill_loss_weight
    if task_loss_weight is not None:
        return task_loss_weight, 1.0 - task_loss_weight
    return 1.0, 1.0
