"""Head grouping: the documented groups and the invariants of both modes."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shd_plugins import head_groups, merge_schedule
from shd_plugins.core.heads import num_merges

DOCUMENTED_PROGRESSIVE = {
    (9, 3): [[0, 1, 2, 3], [4, 5, 6, 7], [8]],
    (16, 6): [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11], [12, 13], [14, 15]],
    (12, 6): [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]],
    (6, 3): [[0, 1], [2, 3], [4, 5]],
    (4, 4): [[0], [1], [2], [3]],
    # 25 -> 12: round one merges floor(25 / 2) = 12 pairs (13 groups left), round two one more pair.
    (25, 12): [[0, 1, 2, 3]] + [[i, i + 1] for i in range(4, 24, 2)] + [[24]],
    # 40 -> 32: a single round of 8 pairs from the front, the other 24 heads carried over.
    (40, 32): [[i, i + 1] for i in range(0, 16, 2)] + [[i] for i in range(16, 40)],
}


@pytest.mark.parametrize('teacher_heads,student_heads', sorted(DOCUMENTED_PROGRESSIVE))
def test_progressive_groups_are_the_documented_ones(teacher_heads, student_heads):
    groups = head_groups(teacher_heads, student_heads)
    assert len(groups) == student_heads
    assert groups == DOCUMENTED_PROGRESSIVE[(teacher_heads, student_heads)]


def test_balanced_groups_are_contiguous_and_near_equal():
    assert head_groups(9, 3, mode='balanced') == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert head_groups(16, 6, mode='balanced') == [
        [0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13], [14, 15]]
    assert head_groups(6, 3, mode='balanced') == head_groups(6, 3)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64).flatmap(lambda m: st.tuples(st.just(m), st.integers(1, m))),
       st.sampled_from(['progressive', 'balanced']))
def test_groups_partition_the_teacher_heads_in_order(counts, mode):
    teacher_heads, student_heads = counts
    groups = head_groups(teacher_heads, student_heads, mode)
    assert len(groups) == student_heads
    assert [h for g in groups for h in g] == list(range(teacher_heads))
    assert all(g == list(range(g[0], g[-1] + 1)) for g in groups)
    assert num_merges(merge_schedule(teacher_heads, student_heads, mode)) == teacher_heads - student_heads
    if mode == 'balanced':
        sizes = [len(g) for g in groups]
        assert max(sizes) - min(sizes) <= 1


def test_more_student_than_teacher_heads_is_a_clear_error():
    with pytest.raises(ValueError, match='teacher has 3 heads but the student has 6'):
        head_groups(3, 6)


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown grouping mode 'random'"):
        head_groups(8, 4, mode='random')
