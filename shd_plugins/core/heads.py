"""Which teacher heads are squeezed into which student head.

A squeeze from M teacher heads to N student heads is a *merge schedule*: a list of rounds, each round a
list of slots over the current groups, a slot being ``(i,)`` (carry group i over unchanged) or ``(i, j)``
(merge groups i and j pairwise). The groups a schedule ends with are what :func:`head_groups` returns, and
:func:`shd_plugins.core.merge.merge_heads` executes the same schedule on attention maps, so the grouping and
the merge can never disagree.
"""
from collections.abc import Sequence

__all__ = ['GROUPING_MODES', 'Slot', 'MergeSchedule', 'merge_schedule', 'head_groups', 'num_merges']

GROUPING_MODES = ('progressive', 'balanced')

Slot = tuple[int, ...]
MergeSchedule = list[list[Slot]]


def _check_head_counts(num_teacher_heads: int, num_student_heads: int) -> None:
    if num_student_heads < 1 or num_teacher_heads < 1:
        raise ValueError(
            f'Head counts must be positive, got teacher={num_teacher_heads}, student={num_student_heads}.')
    if num_teacher_heads < num_student_heads:
        raise ValueError(
            f'SHD squeezes teacher heads into fewer student heads: the teacher has {num_teacher_heads} heads '
            f'but the student has {num_student_heads}. Use a teacher with at least as many heads as the '
            f'student (N <= M), or distil a different layer pair.')


def _progressive_schedule(num_teacher_heads: int, num_student_heads: int) -> MergeSchedule:
    """Rounds of adjacent pairs from the front, merging only as many pairs as needed to land on N."""
    schedule: MergeSchedule = []
    num_groups = num_teacher_heads
    while num_groups > num_student_heads:
        k = min(num_groups // 2, num_groups - num_student_heads)
        merged = [(2 * i, 2 * i + 1) for i in range(k)]
        carried = [(i,) for i in range(2 * k, num_groups)]
        schedule.append(merged + carried)
        num_groups -= k
    return schedule


def _balanced_schedule(num_teacher_heads: int, num_student_heads: int) -> MergeSchedule:
    """Contiguous blocks of near-equal size (larger blocks first), each reduced by a pairwise tree."""
    base, extra = divmod(num_teacher_heads, num_student_heads)
    sizes = [base + 1 if j < extra else base for j in range(num_student_heads)]
    # blocks[j] lists the current group indices belonging to student head j
    blocks: list[list[int]] = []
    start = 0
    for size in sizes:
        blocks.append(list(range(start, start + size)))
        start += size

    schedule: MergeSchedule = []
    while any(len(b) > 1 for b in blocks):
        round_slots: list[Slot] = []
        new_blocks: list[list[int]] = []
        for block in blocks:
            new_block = []
            for i in range(0, len(block), 2):
                slot = tuple(block[i:i + 2])
                new_block.append(len(round_slots))
                round_slots.append(slot)
            new_blocks.append(new_block)
        schedule.append(round_slots)
        blocks = new_blocks
    return schedule


def merge_schedule(num_teacher_heads: int, num_student_heads: int, mode: str = 'progressive') -> MergeSchedule:
    """Build the pairwise merge schedule that squeezes M teacher heads into N.

    Args:
        num_teacher_heads: M, heads per teacher layer.
        num_student_heads: N <= M, heads per student layer.
        mode: ``'progressive'`` (the paper's rounds of adjacent pairs, merging only ``min(|H| // 2, |H| - N)``
            pairs from the front per round so any N <= M is reached) or ``'balanced'`` (contiguous groups of
            near-equal size, each merged by a pairwise tree).

    Returns:
        The list of rounds; an empty list when M == N.
    """
    if mode not in GROUPING_MODES:
        raise ValueError(f"Unknown grouping mode '{mode}'; choose one of {GROUPING_MODES}.")
    _check_head_counts(num_teacher_heads, num_student_heads)
    if mode == 'progressive':
        return _progressive_schedule(num_teacher_heads, num_student_heads)
    return _balanced_schedule(num_teacher_heads, num_student_heads)


def head_groups(num_teacher_heads: int, num_student_heads: int, mode: str = 'progressive') -> list[list[int]]:
    """Teacher head indices squeezed into each student head (student head j <- group j).

    Examples (progressive): 9 -> 3 gives ``[[0, 1, 2, 3], [4, 5, 6, 7], [8]]``; 16 -> 6 gives
    ``[[0..3], [4..7], [8, 9], [10, 11], [12, 13], [14, 15]]``; M == N gives one head per group.
    """
    groups: list[list[int]] = [[h] for h in range(num_teacher_heads)]
    for round_slots in merge_schedule(num_teacher_heads, num_student_heads, mode):
        groups = [sum((groups[i] for i in slot), []) for slot in round_slots]
    return groups


def num_merges(schedule: Sequence[Sequence[Slot]]) -> int:
    """Number of pairwise merges in a schedule (M - N for any valid schedule)."""
    return sum(len(slot) == 2 for round_slots in schedule for slot in round_slots)
