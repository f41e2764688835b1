"""Crash-safe training checkpoints for ``recipes/train_dit.py``, and the output folder's run.

accelerate's ``save_state`` writes into its folder file by file, so a crash mid-save leaves a ``checkpoint-<step>``
that looks finished but does not load; pruning before the save could leave none at all. Here a checkpoint is written
to ``checkpoint-<step>.partial``, gets a manifest (``checkpoint.json``: step, run id, every file's size) as its last
file, and is renamed into place; old checkpoints are pruned only then. A resume checks the manifest, so a checkpoint
whose save never finished, or whose ``model.safetensors`` / ``optimizer.bin`` was truncated since, is skipped with
the reason, and ``latest`` falls back to the previous one.

An output folder holds one run at a time (``run.json``: its id). ``latest`` and pruning only consider checkpoints of
that run, so a run started with ``--overwrite_output_dir`` never resumes (or deletes) an older run's checkpoints.
Folders that are not named ``checkpoint-<integer>`` (``checkpoint-4.bak``, a ``.partial`` left by a crash) are
ignored by ``latest``; an explicit path to any checkpoint folder works, whatever its name.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import NamedTuple

__all__ = [
    'CHECKPOINT_MANIFEST',
    'RUN_FILE',
    'Checkpoint',
    'check_output_dir',
    'checkpoint_problem',
    'commit_checkpoint',
    'find_checkpoint',
    'list_checkpoints',
    'prune_checkpoints',
    'read_run_id',
    'run_contents',
    'staging_dir',
    'start_run',
]

_logger = logging.getLogger(__name__)

CHECKPOINT_MANIFEST = 'checkpoint.json'
RUN_FILE = 'run.json'
_NAME = re.compile(r'checkpoint-(\d+)')
_PARTIAL = '.partial'


class Checkpoint(NamedTuple):
    """A complete checkpoint: its folder, the optimizer step it was saved at and the run that wrote it."""

    path: Path
    step: int
    run_id: str | None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The ``checkpoint-<integer>`` folders of ``output_dir``, oldest step first; other names are not checkpoints."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def _read_manifest(path: Path) -> dict:
    manifest = path / CHECKPOINT_MANIFEST
    if not manifest.is_file():
        raise ValueError(f'no {CHECKPOINT_MANIFEST}, the file written last when a save completes '
                         f'(the save did not finish, or this is not a train_dit.py checkpoint)')
    try:
        data = json.loads(manifest.read_text())
        return {'step': int(data['step']), 'run_id': data.get('run_id'), 'files': dict(data['files'])}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f'{CHECKPOINT_MANIFEST} is unreadable ({e})') from None


def checkpoint_problem(path: str | Path) -> str | None:
    """Why the checkpoint folder ``path`` cannot be resumed (``None``: complete, every file at its saved size)."""
    path = Path(path)
    try:
        manifest = _read_manifest(path)
    except ValueError as e:
        return str(e)
    for name, size in manifest['files'].items():
        file = path / name
        if not file.is_file():
            return f'{name} is missing'
        if file.stat().st_size != size:
            return f'{name} is {file.stat().st_size} bytes, {size} when saved (truncated or overwritten)'
    return None


def _checkpoint(path: Path) -> Checkpoint:
    manifest = _read_manifest(path)
    return Checkpoint(path, manifest['step'], manifest['run_id'])


def find_checkpoint(output_dir: str | Path, which: str, flag: str = 'Checkpoint',
                    run_id: str | None = None) -> Checkpoint | None:
    """The checkpoint to resume from.

    Args:
        output_dir: The training output folder.
        which: ``'latest'`` (the newest complete checkpoint of run ``run_id`` in ``output_dir``; ``None`` when there
            is none), or a checkpoint folder: a name in ``output_dir`` or a path, whatever its name.
        flag: How ``which`` is named in error messages (a script's flag).
        run_id: The output folder's run (:func:`read_run_id`); ``None`` accepts checkpoints of any run.

    Raises:
        ValueError: ``which`` names a folder that does not exist or is not a complete checkpoint.
    """
    if which != 'latest':
        path = Path(which) if os.path.isdir(which) else Path(output_dir, which)
        if not path.is_dir():
            raise ValueError(f'{flag} {which}: no such checkpoint folder (looked in {path}); pass a '
                             f"checkpoint-<step> folder or 'latest'.")
        problem = checkpoint_problem(path)
        if problem is not None:
            raise ValueError(f'{flag} {which}: {path} is not a complete checkpoint: {problem}. Pass another '
                             f"checkpoint or 'latest' (the newest complete one).")
        return _checkpoint(path)
    skipped = []
    for path in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None and run_id is not None and _checkpoint(path).run_id != run_id:
            problem = f'written by another run ({_checkpoint(path).run_id}, not {run_id} of {RUN_FILE})'
        if problem is None:
            if skipped:
                _logger.warning(f'Resuming from {path.name}; skipped newer: ' + '; '.join(skipped))
            return _checkpoint(path)
        skipped.append(f'{path.name}: {problem}')
    if skipped:
        _logger.warning(f'No complete checkpoint of this run in {output_dir}; skipped: ' + '; '.join(skipped))
    return None


def staging_dir(output_dir: str | Path, step: int, remove_leftover: bool = True) -> Path:
    """Where the checkpoint of ``step`` is written before :func:`commit_checkpoint`.

    Args:
        output_dir: The training output folder.
        step: The optimizer step being saved.
        remove_leftover: Delete what a crashed save left there (on one process only).
    """
    staging = Path(output_dir, f'checkpoint-{step}{_PARTIAL}')
    if remove_leftover and staging.exists():
        _logger.warning(f'Removing {staging}, an unfinished save of an earlier attempt.')
        shutil.rmtree(staging)
    return staging


def commit_checkpoint(staging: str | Path, step: int, run_id: str | None) -> Path:
    """Writes the manifest (after syncing every file to disk) and renames ``staging`` to ``checkpoint-<step>``.

    A folder of that name already there (a run restarted from an earlier step) is replaced only once the new one
    is in place, so a crash at any point leaves a complete checkpoint of that step, or the previous checkpoint.
    """
    staging = Path(staging)
    files = {}
    for file in sorted(p for p in staging.rglob('*') if p.is_file()):
        with open(file, 'rb') as f:
            os.fsync(f.fileno())
        files[file.relative_to(staging).as_posix()] = file.stat().st_size
    manifest = staging / CHECKPOINT_MANIFEST
    with open(manifest, 'w') as f:
        json.dump({'step': step, 'run_id': run_id, 'files': files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    final = staging.with_name(f'checkpoint-{step}')
    replaced = None
    if final.exists():
        replaced = final.with_name(f'{final.name}.replaced-{uuid.uuid4().hex[:8]}')
        os.replace(final, replaced)
    os.replace(staging, final)
    if replaced is not None:
        shutil.rmtree(replaced)
    return final


def prune_checkpoints(output_dir: str | Path, limit: int | None, run_id: str | None, keep: str | Path) -> None:
    """After a save, keep the newest ``limit`` checkpoints of run ``run_id`` (``keep``, the new one, always)."""
    if limit is None:
        return
    keep = Path(keep)
    ours = [p for p in list_checkpoints(output_dir) if p != keep and checkpoint_problem(p) is None
            and (run_id is None or _checkpoint(p).run_id == run_id)]
    removing = ours[: max(len(ours) - (limit - 1), 0)]
    if removing:
        _logger.info(f"{len(ours) + 1} checkpoints, limit {limit}: removing {', '.join(p.name for p in removing)}")
    for path in removing:
        shutil.rmtree(path)


def read_run_id(output_dir: str | Path) -> str | None:
    """The id of the run the output folder holds (``None``: no ``run.json``)."""
    file = Path(output_dir, RUN_FILE)
    return json.loads(file.read_text()).get('run_id') if file.is_file() else None


def start_run(output_dir: str | Path, run_id: str | None = None) -> str:
    """Records the output folder's run: ``run_id`` (a resumed run's) or a new id; returns it."""
    run_id = run_id or uuid.uuid4().hex
    Path(output_dir, RUN_FILE).write_text(json.dumps({'run_id': run_id}) + '\n')
    return run_id


def run_contents(output_dir: str | Path) -> list[str]:
    """What a new run in ``output_dir`` would overwrite: a trained model (``transformer/``), checkpoint folders."""
    output_dir = Path(output_dir)
    held = [p.name for p in list_checkpoints(output_dir)]
    if (output_dir / 'transformer').is_dir():
        held.insert(0, 'a trained model (transformer/)')
    return held


def check_output_dir(output_dir: str | Path, resume: str | None, overwrite: bool) -> None:
    """Refuses to start a new run in a folder holding another run's model or checkpoints.

    Raises:
        ValueError: The folder holds a finished model (``transformer/``) or checkpoints and neither
            ``--resume_from_checkpoint`` nor ``--overwrite_output_dir`` was given; names the folder and both flags.
    """
    if resume or overwrite:
        return
    held = run_contents(output_dir)
    if held:
        raise ValueError(
            f"--output_dir {output_dir} already holds a run: {', '.join(held)}. Pass --resume_from_checkpoint "
            f'latest to continue it, --overwrite_output_dir to start a new run there, or another --output_dir.')
