"""The pieces of a timm ``train.py``-style loop around a ``TrainingTask``: model, task, AMP, one epoch, validation.

Each helper reads timm ``train.py``'s flags from ``args`` (same names), so a copy of ``train.py`` can reuse them one
by one; :func:`setup_training` chains them for ``recipes/train_timm.py``. Loss components are averaged over the
epoch on every rank and summed over ranks once, at the end (:func:`reduce_sums`): no device sync per step.
"""
from __future__ import annotations

import argparse
import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from timm import utils
from timm.data import resolve_input_data_config
from timm.models import create_model, resolve_model_input_args
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.task import ClassificationTask, TrainingTask
from tqdm import tqdm

from ..evaluation.top1 import build_eval_loader, evaluate_classifier, resolve_eval_data_config, resolve_split_dir
from .checkpoint import TrainStateSaver, check_file, read_checkpoint_metadata, resolve_output_dir
from .data import build_train_loader, resolve_val_dir
from .task import create_distillation_task

__all__ = [
    'LOSS_KEYS',
    'create_student',
    'create_task',
    'create_task_optimizer',
    'resolve_amp',
    'resolve_lr',
    'reduce_sums',
    'setup_training',
    'train_one_epoch',
    'validate',
]

_logger = logging.getLogger(__name__)

#: Loss components a task may return, averaged per epoch into ``summary.csv`` (``train_<key>``).
LOSS_KEYS = ('loss', 'task_loss', 'kd_loss', 'distill_loss', 'shd_loss')  # distill_loss: timm's token task


def create_student(args: argparse.Namespace) -> nn.Module:
    """The model to train (``args.model`` + ``model_kwargs``); never downloads weights unless ``--pretrained``.

    Sets ``args.num_classes`` from the model when it was not given.
    """
    model = create_model(**resolve_model_input_args(
        args.model,
        {'img_size': args.img_size, 'in_chans': args.in_chans},
        pretrained=args.pretrained,
        num_classes=args.num_classes,
        drop_rate=args.drop,
        drop_path_rate=args.drop_path,
        checkpoint_path=args.initial_checkpoint or None,
        **args.model_kwargs,
    ))
    if args.num_classes is None:
        args.num_classes = model.num_classes
    return model


def create_task(
        args: argparse.Namespace,
        model: nn.Module,
        data_config: dict[str, Any],
        device: torch.device,
) -> TrainingTask:
    """Classification, or (``--kd-model-name`` or ``--kd-checkpoint`` given) timm's logit/feature/token distillation
    or SHD through :func:`~shd_plugins.timm.create_distillation_task`: a local teacher, never a silent download.
    """
    common = dict(criterion_kwargs=dict(smoothing=args.smoothing), device=device, verbose=utils.is_primary(args))
    if args.kd_model_name is None and not args.kd_checkpoint:
        return ClassificationTask(model, **common).to(device)
    return create_distillation_task(args, model, **common).to(device)


def create_task_optimizer(task: TrainingTask, args: argparse.Namespace) -> torch.optim.Optimizer:
    """timm's optimizer (``--opt``, ``--lr``, ``--weight-decay``, ...) over what the task trains.

    That is the task's ``trainable_module``, as timm's ``train.py`` does: the student itself for the logit, token
    and SHD tasks, and the student plus its projector for timm's feature task (an optimizer over the student alone
    would leave the projector at its initialisation).
    """
    return create_optimizer_v2(utils.unwrap_model(task.trainable_module), **optimizer_kwargs(cfg=args),
                               **args.opt_kwargs)


def resolve_amp(args: argparse.Namespace, device: torch.device) -> tuple[Callable, Any]:
    """Autocast context factory and loss scaler: float16 + scaler on CUDA, bfloat16 without scaler elsewhere."""
    if not args.amp:
        return nullcontext, None
    dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' or device.type != 'cuda' else torch.float16
    scaler = utils.NativeScaler(device=device.type) if dtype == torch.float16 else None
    if utils.is_primary(args):
        _logger.info(f'AMP: autocast to {dtype}{" with loss scaling" if scaler else ""}.')
    return partial(torch.autocast, device_type=device.type, dtype=dtype), scaler


def resolve_lr(args: argparse.Namespace) -> float:
    """``args.lr``, or ``--lr-base`` scaled by the global batch as timm's ``train.py`` does; sets ``args.lr``.

    ``lr = lr_base * (global_batch * grad_accum_steps / lr_base_size)``, under a square root for adaptive
    optimizers (``ada*``, ``lamb``) unless ``--lr-base-scale`` says otherwise.
    """
    if not args.lr:
        global_batch = args.batch_size * args.world_size * args.grad_accum_steps
        batch_ratio = global_batch / args.lr_base_size
        scale = args.lr_base_scale or ('sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear')
        args.lr = args.lr_base * (batch_ratio ** 0.5 if scale == 'sqrt' else batch_ratio)
        if utils.is_primary(args):
            _logger.info(f'Learning rate {args.lr:.3g} from --lr-base {args.lr_base} and global batch '
                         f'{global_batch} ({scale} scaling).')
    return args.lr


def reduce_sums(values: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """Sum a float64 vector over ranks, in place (identity without distribution)."""
    if args.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def setup_training(args: argparse.Namespace) -> dict[str, Any]:
    """Everything before the first step: checks, output directory, student, task, train and validation loaders.

    ``args`` are those of :func:`~shd_plugins.timm.parse_train_args` after ``utils.init_distributed_device``
    (``rank``, ``world_size``, ``distributed``).

    Returns:
        ``dict(model, task, device, output_dir, train_loader, sampler, eval_loader)``; ``eval_loader`` is None
        without a validation split.

    Raises:
        ValueError, FileNotFoundError: A wrong path, data folder or option; the message names it and the fix.
    """
    if not args.data_dir:
        raise ValueError('No data: pass --data-dir DIR (an ImageFolder root with a train split).')
    check_file(args.initial_checkpoint, '--initial-checkpoint', 'pass the path of an existing checkpoint.')
    check_file(args.kd_checkpoint, '--kd-checkpoint',
               'pass the path of the local teacher weights (state_dict, .safetensors or timm train checkpoint).')
    if args.resume and args.resume != 'auto':
        check_file(args.resume, '--resume', "pass an existing checkpoint, or 'auto' for the latest in --output.")
        read_checkpoint_metadata(args.resume)  # a truncated file fails here, named, before any model is built
    train_dir = resolve_split_dir(args.data_dir, args.train_split)
    val_dir = resolve_val_dir(args.data_dir, args.val_split)
    output_dir = resolve_output_dir(args)
    device = torch.device(args.device)

    utils.random_seed(args.seed, args.rank)
    model = create_student(args)
    data_config = resolve_input_data_config(
        model, dict(img_size=args.img_size, in_chans=args.in_chans, mean=args.mean, std=args.std))
    eval_config = resolve_eval_data_config(
        model, img_size=args.img_size, in_chans=args.in_chans, crop_pct=args.crop_pct,
        interpolation=args.interpolation or None, mean=args.mean, std=args.std)
    model.to(device)
    if utils.is_primary(args):
        _logger.info(f'Model {args.model} created, param count: {sum(p.numel() for p in model.parameters())}; '
                     f'data config {data_config}')
    task = create_task(args, model, data_config, device)

    train_loader, sampler = build_train_loader(train_dir, data_config, args)
    eval_loader = None
    if val_dir is not None:  # each rank scores its own shard; validate() sums the counts
        eval_loader = build_eval_loader(
            val_dir, model, split='', data_config=eval_config, batch_size=args.validation_batch_size or args.batch_size,
            workers=args.workers, rank=args.rank, world_size=args.world_size, pin_memory=args.pin_mem)
    if eval_loader is None and utils.is_primary(args):
        _logger.warning(f'No validation split ({args.val_split} or val) in {args.data_dir}: checkpoints are unranked.')
    return dict(model=model, task=task, device=device, output_dir=output_dir, train_loader=train_loader,
                sampler=sampler, eval_loader=eval_loader)


def train_one_epoch(
        epoch: int,
        task: TrainingTask,
        loader: torch.utils.data.DataLoader,
        optimizer: torch.optim.Optimizer,
        args: argparse.Namespace,
        *,
        device: torch.device,
        lr_scheduler: Any,
        saver: TrainStateSaver | None,
        loss_scaler: Any,
        amp_autocast: Callable,
        num_updates: int,
        start_batch: int,
        batches_per_epoch: int,
) -> tuple[dict[str, float], int]:
    """One epoch (or its remainder from ``start_batch``) of optimizer steps; returns metrics and the step count.

    Gradients accumulate over ``args.grad_accum_steps`` batches (DDP syncs only on the last); the EMA and the
    per-update LR schedule follow each optimizer step; ``saver`` (primary rank only) writes a recovery checkpoint
    every ``args.recovery_interval`` steps with the position to resume from. The metrics are the epoch means of
    the :data:`LOSS_KEYS` the task returns, over all ranks, plus ``steps``.
    """
    accum = args.grad_accum_steps
    last_accum_steps = batches_per_epoch % accum or accum
    last_batch_idx_to_accum = batches_per_epoch - last_accum_steps
    updates_per_epoch = math.ceil(batches_per_epoch / accum)
    global_batch = args.batch_size * args.world_size

    sums = torch.zeros(len(LOSS_KEYS) + 1, dtype=torch.float64, device=device)
    returned = set()  # loss components this task reports (fixed per task, so summary columns are stable)
    task.train()
    optimizer.zero_grad()
    bar = tqdm(total=updates_per_epoch, initial=start_batch // accum, desc=f'train {epoch}',
               disable=args.no_progress or not utils.is_primary(args), dynamic_ncols=True, leave=False)
    for batch_idx, (input, target) in enumerate(loader, start=start_batch):
        last_batch = batch_idx == batches_per_epoch - 1
        need_update = last_batch or (batch_idx + 1) % accum == 0
        accum_steps = last_accum_steps if batch_idx >= last_batch_idx_to_accum else accum
        input, target = input.to(device), target.to(device)

        with task.no_sync() if args.distributed and not need_update else nullcontext():
            with amp_autocast():
                result = task(input, target)
            loss = result['loss'] / accum_steps
            if loss_scaler is not None:
                loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                            parameters=task.get_clip_parameters(), need_update=need_update)
            else:
                loss.backward()
                if need_update:
                    if args.clip_grad is not None:
                        utils.dispatch_clip_grad(task.get_clip_parameters(), value=args.clip_grad, mode=args.clip_mode)
                    optimizer.step()
        returned.update(k for k in LOSS_KEYS if k in result)
        with torch.no_grad():
            batch = torch.stack([result[k].detach().double() if k in result else sums.new_zeros(())
                                 for k in LOSS_KEYS] + [sums.new_ones(())]) * input.shape[0]
            sums += batch
        if not need_update:
            continue

        num_updates += 1
        optimizer.zero_grad()
        task.update_ema(step=num_updates)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates)
        bar.update(1)
        if num_updates % args.log_interval == 0 or last_batch:
            lr = optimizer.param_groups[0]['lr']
            bar.set_postfix(step=num_updates, loss=f'{(sums[0] / sums[-1]).item():.4f}', lr=f'{lr:.2e}')
        recovery_due = args.recovery_interval and num_updates % args.recovery_interval == 0
        if saver is not None and recovery_due and not last_batch:
            saver.set_position(
                num_updates=num_updates, resume_epoch=epoch, epoch_samples=(batch_idx + 1) * global_batch)
            saver.save_recovery(epoch, batch_idx=batch_idx)
    bar.close()

    sums = reduce_sums(sums, args)
    count = sums[-1].clamp_min(1)
    metrics = OrderedDict((k, round((sums[i] / count).item(), 6)) for i, k in enumerate(LOSS_KEYS) if k in returned)
    metrics['steps'] = num_updates
    return metrics, num_updates


def validate(
        model: nn.Module,
        loader: torch.utils.data.DataLoader,
        args: argparse.Namespace,
        device: torch.device,
) -> dict[str, float]:
    """Top-1/top-5/loss over the whole validation split: each rank scores its shard, the counts are summed."""
    local = evaluate_classifier(
        model, loader, device=device, amp=args.amp, progress=not args.no_progress and utils.is_primary(args))
    n = local['num_samples']
    sums = reduce_sums(torch.tensor(
        [local['top1_correct'], local['top5_correct'], local['loss'] * n, n], dtype=torch.float64, device=device), args)
    top1, top5, loss, n = sums.tolist()
    return OrderedDict(loss=round(loss / n, 6), top1=round(100.0 * top1 / n, 4), top5=round(100.0 * top5 / n, 4))
