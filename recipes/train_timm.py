#!/usr/bin/env python3
"""Train a timm classifier on an ImageFolder, optionally distilled from a teacher, with timm's ``train.py`` flags.

``--kd-distill-type`` takes timm's ``logit``, ``feature`` and ``token`` plus ``shd`` (Squeezing-Heads attention
distillation, :class:`shd_plugins.timm.SHDDistillationTask`). Options come from the command line and from a
YAML file given with ``-c`` (two-stage parse, as ``train.py``: the file sets defaults, flags override them).

Examples (the embedded digits data, CPU)::

    python -c "from shd_plugins.demo.data import write_digits_imagefolder as w; w('runs/digits')"  # any ImageFolder
    # teacher: 8 heads, trained without distillation
    python recipes/train_timm.py -c recipes/configs/digits_vit.yaml --data-dir runs/digits \\
        --model-kwargs patch_size=8 embed_dim=64 depth=4 num_heads=8 --output runs/teacher
    # student: 2 heads, SHD from the teacher
    python recipes/train_timm.py -c recipes/configs/digits_vit.yaml --data-dir runs/digits --output runs/student \\
        --kd-model-name vit_tiny_patch16_224 --kd-model-kwargs patch_size=8 embed_dim=64 depth=4 num_heads=8 \\
        --kd-checkpoint runs/teacher/model_best.pth.tar --kd-distill-type shd --shd-weight 1.0
    # multi-process (one process per GPU, or gloo on CPU), and resume after an interruption
    torchrun --nproc_per_node 2 recipes/train_timm.py -c ... --device cpu
    python recipes/train_timm.py -c ... --output runs/student --resume auto

Checkpoints follow timm: ``last.pth.tar`` every epoch, the ``--checkpoint-hist`` best as ``checkpoint-<epoch>`` and
``model_best.pth.tar`` (ranked by ``--eval-metric``), ``recovery-<epoch>-<batch>.pth.tar`` every
``--recovery-interval`` optimizer steps. They also hold the LR scheduler, the optimizer step, the position in
the epoch and the random generators, so ``--resume`` (a path, or ``auto``) continues from the saved step with the
samples that epoch had not yet seen, augmented as before (per-sample seeds): on CPU a killed and resumed run ends
with the weights of an uninterrupted one (``tests/test_timm_checkpoints.py``). ``--resume auto`` takes the newest
readable checkpoint of this run (``last``, then ``checkpoint-<epoch>``, then this run's ``recovery-*``), logging
each file it skips and why (truncated, another run's). ``summary.csv`` gets one row per epoch. A timm train
checkpoint of the teacher records its model, so ``--kd-checkpoint`` alone builds it.

The pieces (flags, loaders, task, one epoch, checkpoints) are :mod:`shd_plugins.timm`; this script only orders them.
A user error (a wrong path, option or data folder) ends it with ``train_timm.py: error: <message>`` and status 2.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from timm import utils
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import TrainingTask, load_task_ema_checkpoint, resume_task_checkpoint

from shd_plugins.cli import user_errors
from shd_plugins.timm import (
    ResumableSampler,
    TrainStateSaver,
    create_task_optimizer,
    parse_train_args,
    read_checkpoint_metadata,
    resolve_amp,
    resolve_lr,
    restore_rng_state,
    resume_position,
    setup_training,
    train_one_epoch,
    truncate_summary,
    validate,
)

_logger = logging.getLogger('train')


def main(argv: Sequence[str] | None = None) -> int:
    utils.setup_default_logging()
    with user_errors():
        args, args_text = parse_train_args(argv)
    device = utils.init_distributed_device(args)
    args.grad_accum_steps = max(1, args.grad_accum_steps)
    if args.distributed:
        _logger.info(f'Process {args.rank} of {args.world_size} on {device} (distributed).')
    try:
        with user_errors(cleanup=dist.destroy_process_group if args.distributed else None):
            state = setup_training(args)
        train(args, args_text, **state)
    finally:
        if args.distributed and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def train(
        args: argparse.Namespace,
        args_text: str,
        *,
        model: nn.Module,
        task: TrainingTask,
        device: torch.device,
        output_dir: Path,
        train_loader: torch.utils.data.DataLoader,
        sampler: ResumableSampler,
        eval_loader: torch.utils.data.DataLoader | None,
) -> None:
    primary = utils.is_primary(args)
    batches_per_epoch = sampler.samples_per_rank() // args.batch_size
    updates_per_epoch = math.ceil(batches_per_epoch / args.grad_accum_steps)
    global_batch = args.batch_size * args.world_size
    resolve_lr(args)
    optimizer = create_task_optimizer(task, args)  # the student, plus e.g. the feature task's projector
    amp_autocast, loss_scaler = resolve_amp(args, device)

    resume = None
    if args.resume:
        resume = read_checkpoint_metadata(args.resume)  # readable: setup_training checked it (auto: found it)
        resume_task_checkpoint(
            task, args.resume, optimizer=None if args.no_resume_opt else optimizer, loss_scaler=loss_scaler,
            log_info=primary)
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                       device=torch.device('cpu') if args.model_ema_force_cpu else None)
        if args.resume:
            load_task_ema_checkpoint(task, args.resume)
    if args.distributed:
        task.prepare_distributed(device_ids=[device] if device.type == 'cuda' else None)

    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=args.eval_metric == 'loss'),
        updates_per_epoch=updates_per_epoch)
    start_epoch, start_samples, num_updates = 0, 0, 0
    if resume is not None:
        start_epoch, start_samples, num_updates = resume_position(
            resume, global_batch=global_batch, updates_per_epoch=updates_per_epoch)
        if lr_scheduler is not None and 'scheduler' in resume:
            lr_scheduler.load_state_dict(resume['scheduler'])
        if lr_scheduler is not None and lr_scheduler.t_in_epochs:
            lr_scheduler.step(start_epoch)
        elif lr_scheduler is not None:
            lr_scheduler.step_update(num_updates)
        if primary:
            _logger.info(f"Resumed from '{args.resume}' at epoch {start_epoch}, batch "
                         f"{start_samples // global_batch} of {batches_per_epoch}, step {num_updates}.")

    saver = None
    summary_path = output_dir / 'summary.csv'
    eval_metric = ('ema_' if args.model_ema and not args.model_ema_force_cpu else '') + args.eval_metric
    if primary:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / 'args.yaml').write_text(args_text)
        saver = TrainStateSaver(
            model=model, optimizer=optimizer, args=args, amp_scaler=loss_scaler, checkpoint_dir=str(output_dir),
            recovery_dir=str(output_dir), decreasing=args.eval_metric == 'loss', max_history=args.checkpoint_hist,
            task=task, lr_scheduler=lr_scheduler)
        if resume is not None and Path(args.resume).resolve().parent == output_dir.resolve():
            saver.load_state_dict_from_checkpoint(args.resume)
        truncate_summary(summary_path, start_epoch)
        _logger.info(f'Training {num_epochs} epochs of {updates_per_epoch} steps (global batch {global_batch} x '
                     f'{args.grad_accum_steps} accumulation) into {output_dir}.')

    if resume is not None and args.world_size == 1 and not restore_rng_state(resume):
        _logger.warning(f"'{args.resume}' holds no generator states: dropout and drop-path draw differently from "
                        f'the run that saved it.')  # several processes keep their own seeds (rank 0's are saved)
    best = None
    for epoch in range(start_epoch, num_epochs):
        start_batch = start_samples // global_batch if epoch == start_epoch else 0
        sampler.set_epoch(epoch, start=start_batch * global_batch)
        if primary:
            _logger.info(f'Epoch {epoch}: starting at step {num_updates} (batch {start_batch}).')
        epoch_start = time.time()
        train_metrics, num_updates = train_one_epoch(
            epoch, task, train_loader, optimizer, args, device=device, lr_scheduler=lr_scheduler, saver=saver,
            loss_scaler=loss_scaler, amp_autocast=amp_autocast, num_updates=num_updates, start_batch=start_batch,
            batches_per_epoch=batches_per_epoch)

        eval_metrics: dict[str, float] = OrderedDict()
        if eval_loader is not None:
            eval_metrics = validate(utils.unwrap_model(task.get_eval_model()), eval_loader, args, device)
            if args.model_ema and not args.model_ema_force_cpu:
                ema_metrics = validate(task.get_eval_model(ema=True), eval_loader, args, device)
                eval_metrics.update((f'ema_{k}', v) for k, v in ema_metrics.items())
        metric = eval_metrics.get(eval_metric)
        lrs = [group['lr'] for group in optimizer.param_groups]  # the epoch's LR, logged as timm does
        if lr_scheduler is not None:
            lr_scheduler.step(epoch + 1, metric)

        if primary:
            saver.set_position(num_updates=num_updates, resume_epoch=epoch + 1, epoch_samples=0)
            best = saver.save_checkpoint(epoch, metric=metric)
            utils.update_summary(epoch, train_metrics, eval_metrics, filename=str(summary_path),
                                 lr=sum(lrs) / len(lrs))
            _logger.info(f'Epoch {epoch} done in {time.time() - epoch_start:.1f}s, step {num_updates}: '
                         f'train {dict(train_metrics)}, eval {dict(eval_metrics)}')
    if primary:
        if best is not None and best[0] is not None:
            _logger.info(f'*** Best metric: {best[0]} (epoch {best[1]})')
        _logger.info(f'Finished at step {num_updates}.')


if __name__ == '__main__':
    sys.exit(main())
