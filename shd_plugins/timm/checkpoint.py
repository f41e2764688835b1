"""Checkpoints of a timm training loop that resume at the exact optimizer step, and the run directory around them.

timm's ``CheckpointSaver`` writes ``last``, the best ``--checkpoint-hist`` and ``recovery-*`` files, but a recovery
checkpoint resumes at the start of the next epoch. :class:`TrainStateSaver` adds the LR scheduler and the position
in the epoch; :func:`resume_position` reads it back; :func:`find_latest_checkpoint` is ``--resume auto``.
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from timm import utils
from timm.utils import CheckpointSaver, load_checkpoint_metadata

__all__ = [
    'CHECKPOINT_EXT',
    'TrainStateSaver',
    'ResumePosition',
    'resume_position',
    'checkpoint_step',
    'find_latest_checkpoint',
    'check_file',
    'resolve_output_dir',
    'truncate_summary',
]

_logger = logging.getLogger(__name__)

CHECKPOINT_EXT = '.pth.tar'


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


def checkpoint_step(path: str | Path) -> int:
    """Optimizer step a checkpoint was saved at (-1 if it does not record one or cannot be read)."""
    try:
        return int(load_checkpoint_metadata(str(path)).get('num_updates', -1))
    except Exception as e:  # a truncated or foreign file must not stop the search
        _logger.warning(f"Skipping unreadable checkpoint '{path}': {e}")
        return -1


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint of ``output_dir`` with the most optimizer steps (``last`` wins ties over a recovery file)."""
    output_dir = Path(output_dir)
    candidates = [output_dir / f'last{CHECKPOINT_EXT}', *sorted(output_dir.glob(f'recovery-*{CHECKPOINT_EXT}'))]
    steps = {path: checkpoint_step(path) for path in candidates if path.is_file()}
    steps = {path: step for path, step in steps.items() if step >= 0}
    return max(steps, key=steps.get) if steps else None


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
        found = find_latest_checkpoint(output_dir) if output_dir.is_dir() else None
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
