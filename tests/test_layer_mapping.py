"""Teacher-to-student layer pairing."""
import pytest

from shd_plugins import resolve_layer_pairs


def test_uniform_mapping_follows_the_spec_formula():
    assert resolve_layer_pairs('uniform', 28, 12) == [
        (1, 0), (4, 1), (6, 2), (8, 3), (11, 4), (13, 5), (15, 6), (18, 7), (20, 8), (22, 9), (25, 10), (27, 11)]
    assert resolve_layer_pairs('uniform', 12, 12) == [(i, i) for i in range(12)]
    assert resolve_layer_pairs('uniform', 4, 2) == [(1, 0), (3, 1)]
    assert resolve_layer_pairs('uniform', 12, 6)[-1] == (11, 5)  # last layers always pair


def test_last_k_and_explicit_pairs():
    assert resolve_layer_pairs('last:2', 28, 12) == [(25, 10), (27, 11)]
    assert resolve_layer_pairs('11:5, 5:2', 12, 6) == [(5, 2), (11, 5)]
    assert resolve_layer_pairs([(3, 1)], 4, 2) == [(3, 1)]


@pytest.mark.parametrize('spec, message', [
    ('middle', "Unknown layer spec 'middle'"),
    ('last:0', "'last:0': K must be in 1..6"),
    ('12:0', 'Layer pair 12:0 is out of range: the teacher has 12 attention layers'),
    ('1:0,2:0', 'Each student layer may be supervised once'),
    ([], 'selects no layer pair'),
])
def test_bad_specs_are_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_layer_pairs(spec, 12, 6)


@pytest.mark.parametrize('teacher_layers, student_layers', [(2, 5), (1, 4), (3, 12), (12, 12), (28, 12), (5, 2)])
def test_uniform_pairs_every_student_layer_with_an_in_range_teacher_layer(teacher_layers, student_layers):
    pairs = resolve_layer_pairs('uniform', teacher_layers, student_layers)
    assert [s for _, s in pairs] == list(range(student_layers))
    assert all(0 <= t < teacher_layers for t, _ in pairs)
    assert pairs[-1][0] == teacher_layers - 1
    assert [t for t, _ in pairs] == sorted(t for t, _ in pairs)
