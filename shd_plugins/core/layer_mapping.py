"""Which teacher layer supervises which student layer."""
import math
import re
from collections.abc import Sequence

__all__ = ['LayerSpec', 'uniform_teacher_layer', 'parse_layer_spec', 'resolve_layer_pairs']

LayerSpec = str | Sequence[tuple[int, int]]

_SPEC_HELP = (
    "'uniform' (every student layer l takes teacher layer round((l + 1) * L_T / L_S) - 1), "
    "'last:K' (the uniform pairs of the last K student layers), "
    "or explicit 'teacher:student' pairs such as '11:5,5:2'")


def uniform_teacher_layer(student_layer: int, num_teacher_layers: int, num_student_layers: int) -> int:
    """``round((l + 1) * L_T / L_S) - 1`` with halves rounded up (so the last layers always pair).

    A student more than twice as deep as its teacher would get layer -1 for its first layers; those take the
    teacher's first layer.
    """
    return max(0, int(math.floor((student_layer + 1) * num_teacher_layers / num_student_layers + 0.5)) - 1)


def parse_layer_spec(spec: LayerSpec) -> tuple[str, int | list[tuple[int, int]] | None]:
    """Check a layer spec's syntax before the models are known.

    Returns:
        ``('uniform', None)``, ``('last', K)`` or ``('pairs', [(teacher, student), ...])``.

    Raises:
        ValueError: The spec is not one of the accepted forms (the message lists them).
    """
    if not isinstance(spec, str):
        pairs = [tuple(p) for p in spec]
        for pair in pairs:
            if len(pair) != 2:
                raise ValueError(f'Layer pairs are (teacher, student), got {pair}.')
        return 'pairs', pairs
    text = spec.strip().lower()
    last = re.fullmatch(r'last[:\-]?(\d+)', text)
    if text in ('uniform', 'all'):
        return 'uniform', None
    if last:
        return 'last', int(last.group(1))
    if re.fullmatch(r'\s*-?\d+\s*:\s*-?\d+\s*(,\s*-?\d+\s*:\s*-?\d+\s*)*', text):
        return 'pairs', [tuple(int(v) for v in item.split(':')) for item in text.split(',')]
    raise ValueError(f"Unknown layer spec '{spec}'. Use {_SPEC_HELP}.")


def resolve_layer_pairs(spec: LayerSpec, num_teacher_layers: int, num_student_layers: int) -> list[tuple[int, int]]:
    """Turn a layer spec into ``[(teacher_layer, student_layer), ...]`` ordered by student layer.

    Args:
        spec: ``'uniform'``, ``'last:K'``, ``'t:s,t:s'`` or a sequence of ``(teacher, student)`` pairs.
        num_teacher_layers: Attention layers in the teacher.
        num_student_layers: Attention layers in the student.
    """
    kind, value = parse_layer_spec(spec)
    if kind == 'pairs':
        return _check_pairs(value, num_teacher_layers, num_student_layers)
    students = list(range(num_student_layers))
    if kind == 'last':
        if not 1 <= value <= num_student_layers:
            raise ValueError(f"'{spec}': K must be in 1..{num_student_layers} (the student's layer count).")
        students = students[num_student_layers - value:]
    return [(uniform_teacher_layer(s, num_teacher_layers, num_student_layers), s) for s in students]


def _check_pairs(pairs, num_teacher_layers: int, num_student_layers: int) -> list[tuple[int, int]]:
    if not pairs:
        raise ValueError(f'The layer spec selects no layer pair. Use {_SPEC_HELP}.')
    for teacher, student in pairs:
        if not (0 <= teacher < num_teacher_layers and 0 <= student < num_student_layers):
            raise ValueError(
                f'Layer pair {teacher}:{student} is out of range: the teacher has {num_teacher_layers} attention '
                f'layers (0..{num_teacher_layers - 1}), the student {num_student_layers} '
                f'(0..{num_student_layers - 1}).')
    students = [s for _, s in pairs]
    if len(set(students)) != len(students):
        raise ValueError(f'Each student layer may be supervised once; got pairs {pairs}.')
    return sorted(((int(t), int(s)) for t, s in pairs), key=lambda p: p[1])
