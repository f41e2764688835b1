"""Checkpoints of a timm training loop that resume at the exact optimizer step, and the run directory around them.

timm's ``CheckpointSaver`` writes ``last``, the best ``--checkpoint-hist`` and ``recovery-*`` files, but a recovery
checkpoint resumes at the start of the next epoch. :class:`TrainStateSaver` adds the LR scheduler and the position
in the epoch, and the random generators' states; :func:`resume_position` and :func:`restore_rng_state` read them
back; :func:`find_latest_checkpoint` is ``--resume auto``; :func:`read_checkpoint_metadata` names a file that cannot
be read. Every load goes through timm's ``weights_only=True`` loader (``argparse.Namespace`` allowed), never a pickle.
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import random
import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from timm import utils
from timm.utils import CheckpointSaver

from ..evaluation.checkpoints import read_checkpoint_metadata

__all__ = [
    'CHECKPOINT_EXT',
    'TrainStateSaver',
    'ResumePosition',
    'resume_position',
    'rng_state',
    'restore_rng_state',
    'read_checkpoint_metadata',
    'checkpoint_step',
    'find_latest_checkpoint',
    'check_file',
    'resolve_output_dir',
    'truncate_summary',
]

_logger = logging.getLogger(__name__)

CHECKPOINT_EXT = '.pth.tar'

#: ``args`` that must agree for a recovery file to be this run's (another batch size or data set is another run).
RUN_KEYS = ('model', 'model_kwargs', 'num_classes', 'in_chans', 'img_size', 'batch_size', 'grad_accum_steps',
            'seed', 'data_dir', 'kd_model_name', 'kd_distill_type')


class TrainStateSaver(CheckpointSaver):
    """timm's ``CheckpointSaver`` whose checkpoints also hold the LR scheduler and the position in the epoch.

    timm's recovery checkpoints resume at the start of the next epoch. Storing ``num_updates`` (optimizer steps
    so far), ``resume_epoch`` and ``epoch_samples`` (samples of that epoch already used, over all ranks) lets a
    resumed run continue from the exact step. Keys are otherwise timm's, so ``train.py`` can load these files.

    Args:
        *args: ``CheckpointSaver`` arguments (pass ``task=`` so the model and EMA state come from the task).
        lr_scheduler: Scheduler whose ``state_dict`` is saved as ``'scheduler'``.
        **kwargs: ``CheckpointSaver`` keyword arguments.
    """

    def __init__(self, *args: Any, lr_scheduler: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lr_scheduler = lr_scheduler
        self.train_state: dict[str, int] = {}

    def set_position(self, *, num_updates: int, resume_epoch: int, epoch_samples: int) -> None:
        """Where a run resumed from the next checkpoint starts."""
        self.train_state = dict(num_updates=num_updates, resume_epoch=resume_epoch, epoch_samples=epoch_samples)

    def _save(self, save_path: str, epoch: int, metric: float | None = None) -> None:
        save_state = {
            'epoch': epoch,
            'arch': self.args.model if self.args is not None else type(self.model).__name__.lower(),
            'optimizer': self.optimizer.state_dict(),
            'version': 2,
        }
        if self.args is not None:
            save_state['args'] = self.args
        if self.amp_scaler is not None:
            save_state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        save_state.update(self.task.get_checkpoint_state(unwrap_fn=self.unwrap_fn))
        save_state.update(self.task.get_checkpoint_state(ema=True, unwrap_fn=self.unwrap_fn))
        if self.lr_scheduler is not None:
            save_state['scheduler'] = self.lr_scheduler.state_dict()
        save_state['rng_state'] = rng_state()
        save_state.update(self.train_state)
        if metric is not None:
            save_state['metric'] = metric
        save_state['saver'] = self.state_dict(epoch, metric)
        torch.save(save_state, save_path)


class ResumePosition(NamedTuple):
    """Where a resumed run starts: epoch, samples of that epoch already seen (all ranks), optimizer steps."""

    epoch: int
    epoch_samples: int
    num_updates: int


def resume_position(metadata: dict[str, Any], *, global_batch: int, updates_per_epoch: int) -> ResumePosition:
    """The start of a run resumed from a checkpoint's metadata (``load_checkpoint_metadata``).

    A checkpoint of :class:`TrainStateSaver` resumes at its step; a plain timm checkpoint at the epoch after its
    ``epoch``. A position that is not a whole global batch (the batch or world size changed) is rounded down.
    """
    epoch = int(metadata.get('resume_epoch', metadata.get('epoch', -1) + 1))
    samples = int(metadata.get('epoch_samples', 0))
    if samples % global_batch:
        _logger.warning(f'The checkpoint stopped after {samples} samples of epoch {epoch}, not a multiple of the '
                        f'global batch {global_batch} (batch size or world size changed): restarting at the '
                        f'previous whole batch.')
        samples -= samples % global_batch
    num_updates = int(metadata.get('num_updates', epoch * updates_per_epoch))
    return ResumePosition(epoch, samples, num_updates)


def rng_state() -> dict[str, Any]:
    """The global generators (torch CPU and CUDA, ``random``, numpy) as plain tensors and tuples.

    Only the model's own randomness (dropout, drop-path) draws from them in this loop (augmentation is seeded per
    sample, :class:`~shd_plugins.seeding.SeededSamples`); restoring them makes a resumed step bit-identical.
    Every entry loads with ``weights_only=True``.
    """
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        'torch': torch.get_rng_state(),
        'python': random.getstate(),
        'numpy': (torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(metadata: dict[str, Any]) -> bool:
    """Set the global generators from a checkpoint's ``'rng_state'``; False (nothing changed) when it has none."""
    state = metadata.get('rng_state')
    if not state:
        return False
    torch.set_rng_state(state['torch'])
    version, keys, gauss = state['python']
    random.setstate((version, tuple(keys), gauss))
    keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state(('MT19937', keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])
    return True


def checkpoint_step(path: str | Path) -> int:
    """Optimizer step a checkpoint was saved at (-1 if it does not record one or cannot be read)."""
    try:
        return int(read_checkpoint_metadata(path).get('num_updates', -1))
    except (OSError, ValueError) as e:  # a truncated or foreign file must not stop the search
        _logger.warning(f'Skipping: {e}')
        return -1


def _position(metadata: dict[str, Any]) -> tuple[int, int]:
    """(epoch to resume at, samples of it done): comparable between step-exact and plain timm checkpoints."""
    return int(metadata.get('resume_epoch', metadata.get('epoch', -1) + 1)), int(metadata.get('epoch_samples', 0))


def _run_differences(metadata: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The :data:`RUN_KEYS` on which a checkpoint's saved ``args`` and this run's disagree."""
    saved = metadata.get('args')
    if saved is None:
        return ['args (the checkpoint records none)']
    differences = []
    for key in RUN_KEYS:
        ours, theirs = getattr(args, key, None), getattr(saved, key, None)
        if key == 'data_dir' and ours and theirs:
            ours, theirs = str(Path(ours).resolve()), str(Path(theirs).resolve())
        if ours != theirs:
            differences.append(f'{key}={theirs!r} (this run: {ours!r})')
    return differences


def find_latest_checkpoint(output_dir: str | Path, args: argparse.Namespace | None = None) -> Path | None:
    """``--resume auto``: the newest readable checkpoint of this run in ``output_dir``, or None.

    Candidates are ``last``, then ``checkpoint-<epoch>`` (newest epoch first), then ``recovery-*`` files; the one
    furthest into training wins, earlier candidates winning ties. A file that cannot be read (a truncated ``last``)
    is skipped, so the valid ``checkpoint-<epoch>`` files behind it still resume the run. Given ``args``, a recovery
    file whose saved args differ on :data:`RUN_KEYS` belongs to another run (a stray file in a reused folder: its
    position would be "batch 30 of 8" here) and is skipped. Every skipped file is logged with the reason.
    """
    output_dir = Path(output_dir)

    def epoch_of(path: Path) -> int:
        match = re.fullmatch(rf'checkpoint-(\d+){re.escape(CHECKPOINT_EXT)}', path.name)
        return int(match.group(1)) if match else -1

    complete = [output_dir / f'last{CHECKPOINT_EXT}',
                *sorted(output_dir.glob(f'checkpoint-*{CHECKPOINT_EXT}'), key=epoch_of, reverse=True)]
    recovery = sorted(output_dir.glob(f'recovery-*{CHECKPOINT_EXT}'), key=lambda p: p.stat().st_mtime, reverse=True)
    found: list[tuple[Path, tuple[int, int]]] = []
    for path in [*complete, *recovery]:
        if not path.is_file() or (path in complete and path != complete[0] and epoch_of(path) < 0):
            continue
        try:
            metadata = read_checkpoint_metadata(path)
        except (OSError, ValueError) as e:
            _logger.warning(f'--resume auto skips {path.name}: {e}')
            continue
        differences = _run_differences(metadata, args) if args is not None and path in recovery else []
        if differences:
            _logger.warning(f"--resume auto skips {path.name}: another run's recovery file ({', '.join(differences)}).")
            continue
        found.append((path, _position(metadata)))
    if not found:
        return None
    best = max(found, key=lambda item: item[1])  # max keeps the first of equals: last > checkpoint-N > recovery
    for path, position in found:
        if path != best[0]:
            _logger.info(f'--resume auto: {path.name} (epoch {position[0]}, {position[1]} samples in) is older '
                         f'than {best[0].name}.')
    return best[0]


def check_file(path: str | None, flag: str, hint: str) -> None:
    """Fail before any model is built when a checkpoint path is wrong (timm raises a bare FileNotFoundError)."""
    if path and not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} '{path}' does not exist: {hint}")


def resolve_output_dir(args: argparse.Namespace) -> Path:
    """``args.output`` (plus ``args.experiment``); refuses to overwrite another run's checkpoints unless resuming.

    ``args.resume == 'auto'`` is replaced by the latest checkpoint in that directory (``''``: a fresh start).

    Raises:
        ValueError: The directory holds a run and ``args.resume`` is empty.
    """
    output_dir = Path(args.output) / args.experiment if args.experiment else Path(args.output)
    if args.resume == 'auto':
        found = find_latest_checkpoint(output_dir, args) if output_dir.is_dir() else None
        args.resume = str(found) if found else ''
        if utils.is_primary(args):
            _logger.info(f"--resume auto: {found or 'no checkpoint in ' + str(output_dir) + ', starting fresh'}")
    elif not args.resume and (output_dir / f'last{CHECKPOINT_EXT}').is_file():
        raise ValueError(
            f'{output_dir} already holds a run (last{CHECKPOINT_EXT}). Pass --resume auto to continue it, or choose '
            f'another --output/--experiment.')
    return output_dir


def truncate_summary(path: str | Path, start_epoch: int) -> None:
    """Drop ``summary.csv`` rows of epochs a resumed run will train again, so each epoch appears once."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    kept = [rows[0]] + [row for row in rows[1:] if row and int(row[0]) < start_epoch]
    if len(kept) < len(rows):
        with open(path, 'w', newline='') as f:
            csv.writer(f).writerows(kept)
