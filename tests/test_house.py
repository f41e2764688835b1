"""The house rules of the package layout: a torch-only core, no import cycles, small modules."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ('timm', 'diffusers', 'torch_fidelity', 'matplotlib', 'accelerate', 'sklearn', 'PIL')
MAX_MODULE_LINES = 450


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix('').parts)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def imported_modules(path: Path) -> set[str]:
    """Modules of this repository a file imports at run time (``TYPE_CHECKING`` blocks excluded)."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == '__init__.py' else module_name(path).rpartition('.')[0]
    type_checking = [n for n in ast.walk(tree) if isinstance(n, ast.If) and 'TYPE_CHECKING' in ast.unparse(n.test)]
    skipped = {id(n) for block in type_checking for n in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
                base = '.'.join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f'{base}.{alias.name}' for alias in node.names)
    if package in ('recipes', 'eval'):  # a script imports its siblings by bare name (its folder is on sys.path)
        found |= {f'{package}.{name}' for name in found if (path.parent / f'{name}.py').is_file()}
    return found


def repository_modules() -> dict[str, Path]:
    files = [*ROOT.glob('shd_plugins/**/*.py'), *ROOT.glob('recipes/*.py'), *ROOT.glob('eval/*.py')]
    return {module_name(f): f for f in files}


def test_import_shd_plugins_needs_torch_only():
    code = (f'import sys, shd_plugins, shd_plugins.capture, shd_plugins.config, shd_plugins.core; '
            f'print([m for m in {FRAMEWORKS!r} if m in sys.modules])')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == '[]', f'import shd_plugins imported frameworks: {result.stdout}'


def test_no_import_cycles_among_library_recipes_and_evaluators():
    modules = repository_modules()
    graph = {name: {m for m in imported_modules(path) if m in modules and m != name} for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    # scripts are entry points: the library never imports them, and they do not import each other
    for name, deps in graph.items():
        scripts = {d for d in deps if d.startswith(('recipes', 'eval'))}
        assert not scripts, f'{name} imports the scripts {sorted(scripts)}: move the shared code into shd_plugins/'


def test_library_modules_are_small():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in ROOT.glob('shd_plugins/**/*.py')}
    too_long = {path: n for path, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not too_long, f'modules over {MAX_MODULE_LINES} lines (split them by concern): {too_long}'
