#!/usr/bin/env python3
"""Train a timm classifier on an ImageFolder, optionally distilled from a teacher, with timm's ``train.py`` flags.

``--kd-distill-type`` takes timm's ``logit``, ``feature`` and ``token`` plus ``shd`` (Squeezing-Heads attention
distillation, :class:`shd_plugins.timm_task.SHDDistillationTask`). Options come from the command line and from a
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
``--recovery-interval`` optimizer steps. They also hold the LR scheduler, the optimizer step and the position in
the epoch, so ``--resume`` (a path, or ``auto`` for the latest checkpoint in the output directory) continues
from the saved step with the samples that epoch had not yet seen. ``summary.csv`` gets one row per epoch.
"""
import argparse
import csv
import logging
import math
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from timm import utils
from timm.data import create_dataset, create_transform, resolve_input_data_config
from timm.models import create_model, resolve_model_input_args
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import (
    ClassificationTask,
    FeatureDistillationTask,
    LogitDistillationTask,
    TokenDistillationTask,
    TrainingTask,
    load_task_ema_checkpoint,
    resume_task_checkpoint,
)
from timm.utils import CheckpointSaver, load_checkpoint_metadata
from tqdm import tqdm

from shd_plugins.evaluation.top1 import evaluate_classifier, input_img_mode, resolve_eval_data_config, resolve_split_dir
from shd_plugins.imagefolder import check_imagefolder
from shd_plugins.timm.task import KD_DISTILL_TYPES, SHDDistillationTask, add_shd_args, create_distillation_teacher

_logger = logging.getLogger('train')

LOSS_KEYS = ('loss', 'task_loss', 'kd_loss', 'shd_loss')
CHECKPOINT_EXT = '.pth.tar'


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------

def build_parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """``(config_parser, parser)``: the first reads only ``-c``, the second everything, with timm's flag names."""
    config_parser = argparse.ArgumentParser(description='Training Config', add_help=False)
    config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                               help='YAML config file specifying default arguments')

    parser = argparse.ArgumentParser(description='timm training with SHD attention distillation')
    parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                        help='YAML config file specifying default arguments')

    group = parser.add_argument_group('Dataset parameters')
    group.add_argument('--data-dir', metavar='DIR', default=None,
                       help='ImageFolder root holding <train-split>/<class>/<images> and optionally a val split')
    group.add_argument('--train-split', metavar='NAME', default='train', help='train split folder (default: train)')
    group.add_argument('--val-split', metavar='NAME', default='validation',
                       help="validation split folder; 'val' is tried too (default: validation)")
    group.add_argument('-j', '--workers', type=int, default=4, metavar='N',
                       help='data loading processes per training process (default: 4)')
    group.add_argument('--pin-mem', action='store_true', default=False, help='pin CPU memory in the DataLoader')

    group = parser.add_argument_group('Model parameters')
    group.add_argument('--model', default='vit_tiny_patch16_224', type=str, metavar='MODEL',
                       help='name of the model to train (default: vit_tiny_patch16_224)')
    group.add_argument('--pretrained', action='store_true', default=False,
                       help='start from the hub pretrained weights (needs internet)')
    group.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH',
                       help='initialize the model from this checkpoint')
    group.add_argument('--resume', default='', type=str, metavar='PATH',
                       help="resume model, optimizer, EMA, scheduler and step from this checkpoint; 'auto': the "
                            "latest checkpoint in the output directory (fresh start if there is none)")
    group.add_argument('--no-resume-opt', action='store_true', default=False,
                       help='do not resume the optimizer state')
    group.add_argument('--num-classes', type=int, default=None, metavar='N', help='number of classes')
    group.add_argument('--img-size', type=int, default=None, metavar='N', help='image size (model default if None)')
    group.add_argument('--in-chans', type=int, default=None, metavar='N',
                       help='image input channels (default: 3; 1 reads images as grayscale)')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='override dataset mean')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='override dataset std')
    group.add_argument('--interpolation', default='', type=str, metavar='NAME', help='eval resize interpolation')
    group.add_argument('--crop-pct', default=None, type=float, metavar='N', help='eval center crop pct')
    group.add_argument('-b', '--batch-size', type=int, default=128, metavar='N',
                       help='batch size per process (default: 128)')
    group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N',
                       help='validation batch size (default: --batch-size)')
    group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                       help='batches to accumulate per optimizer step (default: 1)')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=utils.ParseKwargs,
                       help='extra create_model kwargs, k=v (e.g. img_size=32 patch_size=8 depth=2)')
    group.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate (default: 0.)')
    group.add_argument('--drop-path', type=float, default=None, metavar='PCT', help='drop path rate')

    group = parser.add_argument_group('Optimizer parameters')
    group.add_argument('--opt', default='adamw', type=str, metavar='OPTIMIZER', help='optimizer (default: adamw)')
    group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON', help='optimizer epsilon')
    group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA', help='optimizer betas')
    group.add_argument('--momentum', type=float, default=0.9, metavar='M', help='optimizer momentum (default: 0.9)')
    group.add_argument('--weight-decay', type=float, default=0.05, help='weight decay (default: 0.05)')
    group.add_argument('--clip-grad', type=float, default=None, metavar='NORM', help='clip gradient norm')
    group.add_argument('--clip-mode', type=str, default='norm', help="clip mode: 'norm', 'value' or 'agc'")
    group.add_argument('--layer-decay', type=float, default=None, help='layer-wise learning rate decay')
    group.add_argument('--opt-kwargs', nargs='*', default={}, action=utils.ParseKwargs)

    group = parser.add_argument_group('Learning rate schedule parameters')
    group.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER',
                       help='LR scheduler (default: cosine)')
    group.add_argument('--sched-on-updates', action='store_true', default=False,
                       help='step the LR scheduler every optimizer update instead of every epoch')
    group.add_argument('--lr', type=float, default=None, metavar='LR', help='learning rate, overrides --lr-base')
    group.add_argument('--lr-base', type=float, default=5e-4, metavar='LR',
                       help='base learning rate: lr = lr_base * global_batch_size / lr_base_size (default: 5e-4)')
    group.add_argument('--lr-base-size', type=int, default=512, metavar='DIV',
                       help='batch size of --lr-base (default: 512)')
    group.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE',
                       help="'linear' or 'sqrt' batch scaling of --lr-base (default: by optimizer)")
    group.add_argument('--warmup-lr', type=float, default=1e-6, metavar='LR', help='warmup learning rate')
    group.add_argument('--min-lr', type=float, default=1e-5, metavar='LR', help='lower lr bound (default: 1e-5)')
    group.add_argument('--epochs', type=int, default=300, metavar='N', help='number of epochs (default: 300)')
    group.add_argument('--warmup-epochs', type=int, default=5, metavar='N', help='warmup epochs (default: 5)')
    group.add_argument('--warmup-prefix', action='store_true', default=False,
                       help='exclude the warmup period from the decay schedule')
    group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N', help='cooldown epochs at min_lr')
    group.add_argument('--decay-epochs', type=float, default=90, metavar='N', help='step scheduler decay interval')
    group.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES',
                       help='multistep scheduler milestones')
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE', help='LR decay rate')
    group.add_argument('--patience-epochs', type=int, default=10, metavar='N', help='plateau scheduler patience')

    group = parser.add_argument_group('Augmentation and regularization parameters')
    group.add_argument('--no-aug', action='store_true', default=False, help='disable training augmentation')
    group.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT',
                       help='random resize scale (default: 0.08 1.0)')
    group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO',
                       help='random resize aspect ratio (default: 0.75 1.33)')
    group.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability (default: 0.5)')
    group.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT', help='color jitter (default: 0.4)')
    group.add_argument('--aa', type=str, default=None, metavar='NAME', help='AutoAugment policy (default: None)')
    group.add_argument('--reprob', type=float, default=0., metavar='PCT', help='random erase prob (default: 0.)')
    group.add_argument('--train-interpolation', type=str, default='random',
                       help='training interpolation (default: random)')
    group.add_argument('--smoothing', type=float, default=0.1, help='label smoothing (default: 0.1)')

    group = parser.add_argument_group('Model exponential moving average parameters')
    group.add_argument('--model-ema', action='store_true', default=False, help='keep an EMA of the model weights')
    group.add_argument('--model-ema-force-cpu', action='store_true', default=False,
                       help='keep the EMA on CPU (it is then not validated)')
    group.add_argument('--model-ema-decay', type=float, default=0.9998, help='EMA decay (default: 0.9998)')
    group.add_argument('--model-ema-warmup', action='store_true', help='enable EMA decay warmup')

    group = parser.add_argument_group('Knowledge distillation parameters')
    group.add_argument('--kd-model-name', default=None, type=str, help='name of the teacher model')
    group.add_argument('--kd-distill-type', default='logit', type=str, choices=list(KD_DISTILL_TYPES),
                       help="'logit', 'feature', 'token' (timm's tasks) or 'shd' (attention maps + logits)")
    group.add_argument('--kd-loss-type', default='kl', type=str, help='logit distillation loss (default: kl)')
    group.add_argument('--distill-loss-weight', default=None, type=float,
                       help='weight of the distillation loss; with --task-loss-weight: independent weights, alone: '
                            'task weight 1')
    group.add_argument('--task-loss-weight', default=None, type=float,
                       help='weight of the task loss; alone: the distillation loss gets 1 - weight')
    group.add_argument('--kd-temperature', default=4.0, type=float, help='logit distillation temperature (default: 4)')
    group.add_argument('--kd-student-feature-dim', default=None, type=int, help='feature KD student dim')
    group.add_argument('--kd-teacher-feature-dim', default=None, type=int, help='feature KD teacher dim')
    group.add_argument('--kd-token-distill-type', default='soft', type=str, choices=['soft', 'hard'],
                       help="token distillation: 'soft' or 'hard' (default: soft)")
    add_shd_args(parser)

    group = parser.add_argument_group('Miscellaneous parameters')
    group.add_argument('--seed', type=int, default=42, metavar='S', help='random seed (default: 42)')
    group.add_argument('--log-interval', type=int, default=50, metavar='N',
                       help='optimizer steps between progress-bar loss updates (default: 50)')
    group.add_argument('--recovery-interval', type=int, default=0, metavar='N',
                       help='optimizer steps between recovery checkpoints (default: 0, off)')
    group.add_argument('--checkpoint-hist', type=int, default=10, metavar='N',
                       help='number of best checkpoints to keep (default: 10)')
    group.add_argument('--amp', action='store_true', default=False,
                       help='mixed precision (float16 + loss scaling on CUDA, bfloat16 on CPU)')
    group.add_argument('--amp-dtype', default='float16', type=str, help='AMP dtype on CUDA (default: float16)')
    group.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', type=str,
                       help='device (default: cuda if available); one process per device under torchrun')
    group.add_argument('--dist-backend', default=None, type=str, help='torch.distributed backend (default: by device)')
    group.add_argument('--output', default='runs/train', type=str, metavar='DIR',
                       help='run directory for checkpoints, summary.csv and logs (default: runs/train)')
    group.add_argument('--experiment', default='', type=str, metavar='NAME',
                       help='name of a subfolder of --output for this run')
    group.add_argument('--eval-metric', default='top1', type=str, metavar='EVAL_METRIC',
                       help="metric ranking checkpoints: 'top1', 'top5' or 'loss' (default: top1)")
    group.add_argument('--no-progress', action='store_true', default=False, help='hide the progress bars')
    return config_parser, parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, str]:
    """Two-stage parse as timm's ``train.py``: ``-c`` YAML values become defaults, command-line flags win."""
    config_parser, parser = build_parsers()
    args_config, remaining = config_parser.parse_known_args(argv)
    if args_config.config:
        with open(args_config.config) as f:
            cfg = yaml.safe_load(f) or {}
        unknown = sorted(set(cfg) - set(vars(parser.parse_args([]))))
        if unknown:
            parser.error(f'unknown option(s) in {args_config.config}: {", ".join(unknown)}')
        parser.set_defaults(**cfg)
    args = parser.parse_args(remaining)
    args.config = args_config.config
    args_text = yaml.safe_dump(args.__dict__, default_flow_style=False)
    return args, args_text


# ----------------------------------------------------------------------------------------------------------------
# Paths, data
# ----------------------------------------------------------------------------------------------------------------

def check_file(path: str, flag: str, hint: str) -> None:
    """Fail before any model is built when a checkpoint path is wrong (timm raises a bare FileNotFoundError)."""
    if path and not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} '{path}' does not exist: {hint}")


def resolve_val_dir(data_dir: str, val_split: str) -> Path | None:
    """The validation ImageFolder: ``<data-dir>/<val-split>``, else ``val`` or ``validation``; None if absent."""
    for split in dict.fromkeys((val_split, 'validation', 'val')):
        if split and (Path(data_dir) / split).is_dir():
            return check_imagefolder(Path(data_dir) / split)
    return None


def checkpoint_step(path: Path) -> int:
    """Optimizer step a checkpoint was saved at (-1 if it does not record one)."""
    try:
        return int(load_checkpoint_metadata(str(path)).get('num_updates', -1))
    except Exception as e:  # a truncated or foreign file must not stop the search
        _logger.warning(f"Skipping unreadable checkpoint '{path}': {e}")
        return -1


def find_latest_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint of ``output_dir`` with the most optimizer steps (``last`` wins ties over a recovery file)."""
    candidates = [output_dir / f'last{CHECKPOINT_EXT}', *sorted(output_dir.glob(f'recovery-*{CHECKPOINT_EXT}'))]
    steps = {path: checkpoint_step(path) for path in candidates if path.is_file()}
    steps = {path: step for path, step in steps.items() if step >= 0}
    return max(steps, key=steps.get) if steps else None


class ResumableSampler(torch.utils.data.Sampler):
    """Shuffled, rank-sharded sampler that can begin an epoch part-way through.

    Epoch ``e`` visits a fixed permutation drawn from ``seed + e`` (the same for any world size), padded to a
    multiple of the world size, and rank ``r`` takes every ``world_size``-th index, as ``DistributedSampler`` does.
    ``set_epoch(e, start=n)`` skips the first ``n`` samples of that permutation, so a run resumed from a mid-epoch
    checkpoint sees exactly the samples the epoch had not yet visited.
    """

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        self.num_samples = num_samples
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.start = 0
        self.total_size = math.ceil(num_samples / num_replicas) * num_replicas

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if start % self.num_replicas:
            raise ValueError(f'start={start} must be a multiple of the world size {self.num_replicas}.')
        self.epoch, self.start = epoch, start

    def samples_per_rank(self, start: int = 0) -> int:
        return (self.total_size - start) // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        order += order[:self.total_size - len(order)]
        return iter(order[self.start:][self.rank::self.num_replicas])

    def __len__(self) -> int:
        return self.samples_per_rank(self.start)


def build_train_loader(
        train_dir: Path,
        data_config: dict[str, Any],
        args: argparse.Namespace,
) -> tuple[torch.utils.data.DataLoader, ResumableSampler]:
    """Training loader with timm's train transforms and a :class:`ResumableSampler`."""
    dataset = create_dataset(
        '', root=str(train_dir), is_training=True, search_split=False, input_img_mode=input_img_mode(data_config))
    dataset.transform = create_transform(
        data_config['input_size'],
        is_training=True,
        no_aug=args.no_aug,
        scale=tuple(args.scale),
        ratio=tuple(args.ratio),
        hflip=args.hflip,
        color_jitter=args.color_jitter,
        auto_augment=args.aa,
        interpolation=args.train_interpolation,
        mean=data_config['mean'],
        std=data_config['std'],
        re_prob=args.reprob,
    )
    sampler = ResumableSampler(len(dataset), num_replicas=args.world_size, rank=args.rank, seed=args.seed)
    if sampler.samples_per_rank() < args.batch_size:
        raise ValueError(
            f'{train_dir} has {len(dataset)} images: fewer than one batch of {args.batch_size} per process '
            f'({args.world_size} processes). Lower --batch-size.')
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.workers,
        pin_memory=args.pin_mem,
        drop_last=True,
        persistent_workers=args.workers > 0,
    )
    return loader, sampler


def build_eval_loader(
        val_dir: Path,
        data_config: dict[str, Any],
        args: argparse.Namespace,
) -> torch.utils.data.DataLoader:
    """Validation loader (timm eval transforms); each rank takes every ``world_size``-th image, none twice."""
    dataset = create_dataset(
        '', root=str(val_dir), is_training=False, search_split=False, input_img_mode=input_img_mode(data_config))
    dataset.transform = create_transform(
        data_config['input_size'],
        is_training=False,
        interpolation=data_config['interpolation'],
        mean=data_config['mean'],
        std=data_config['std'],
        crop_pct=data_config['crop_pct'],
        crop_mode=data_config['crop_mode'],
    )
    shard = torch.utils.data.Subset(dataset, range(args.rank, len(dataset), args.world_size))
    return torch.utils.data.DataLoader(
        shard,
        batch_size=args.validation_batch_size or args.batch_size,
        shuffle=False,
        num_workers=args.workers,
        pin_memory=args.pin_mem,
        persistent_workers=args.workers > 0,
    )


# ----------------------------------------------------------------------------------------------------------------
# Model, task
# ----------------------------------------------------------------------------------------------------------------

def create_student(args: argparse.Namespace) -> nn.Module:
    """The model to train; never downloads weights unless ``--pretrained``."""
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
    """Classification, timm's logit/feature/token distillation, or SHD, from the KD flags."""
    common = dict(criterion_kwargs=dict(smoothing=args.smoothing), device=device, verbose=utils.is_primary(args))
    if args.kd_model_name is None:
        return ClassificationTask(model, **common).to(device)
    if args.kd_distill_type == 'shd':
        return SHDDistillationTask.from_args(args, model, **common).to(device)
    # timm's own tasks, with a teacher built from a local checkpoint and --kd-model-kwargs.
    teacher = create_distillation_teacher(
        args.kd_model_name,
        num_classes=model.num_classes,
        in_chans=data_config['input_size'][0],
        img_size=tuple(data_config['input_size'][1:]),
        pretrained_path=args.kd_checkpoint,
        model_kwargs=args.kd_model_kwargs,
        allow_download=args.kd_pretrained,
        device=device,
    )
    weights = dict(distill_loss_weight=args.distill_loss_weight, task_loss_weight=args.task_loss_weight)
    if args.kd_distill_type == 'logit':
        task = LogitDistillationTask(
            model, teacher, loss_type=args.kd_loss_type, temperature=args.kd_temperature, **weights, **common)
    elif args.kd_distill_type == 'feature':
        task = FeatureDistillationTask(
            model, teacher, student_feature_dim=args.kd_student_feature_dim,
            teacher_feature_dim=args.kd_teacher_feature_dim, **weights, **common)
    else:
        task = TokenDistillationTask(
            model, teacher, distill_type=args.kd_token_distill_type, temperature=args.kd_temperature,
            **weights, **common)
    return task.to(device)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------

class TrainStateSaver(CheckpointSaver):
    """timm's ``CheckpointSaver`` whose checkpoints also hold the LR scheduler and the position in the epoch.

    timm's recovery checkpoints resume at the start of the next epoch. Storing ``num_updates`` (optimizer steps
    so far), ``resume_epoch`` and ``epoch_samples`` (samples of that epoch already used, over all ranks) lets a
    resumed run continue from the exact step. Keys are otherwise timm's, so ``train.py`` can load these files.
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


def truncate_summary(path: Path, start_epoch: int) -> None:
    """Drop summary rows of epochs a resumed run will train again, so each epoch appears once."""
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


# ----------------------------------------------------------------------------------------------------------------
# Train / validate
# ----------------------------------------------------------------------------------------------------------------

def reduce_sums(values: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """Sum a float64 vector over ranks (identity without distribution)."""
    if args.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


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
    """One epoch (or its remainder from ``start_batch``) of optimizer steps; returns metrics and the step count."""
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


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------

def resolve_amp(args: argparse.Namespace, device: torch.device) -> tuple[Callable, Any]:
    """Autocast context factory and loss scaler: float16 + scaler on CUDA, bfloat16 without scaler elsewhere."""
    if not args.amp:
        return nullcontext, None
    dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' or device.type != 'cuda' else torch.float16
    scaler = utils.NativeScaler(device=device.type) if dtype == torch.float16 else None
    if utils.is_primary(args):
        _logger.info(f'AMP: autocast to {dtype}{" with loss scaling" if scaler else ""}.')
    return partial(torch.autocast, device_type=device.type, dtype=dtype), scaler


def resolve_output_dir(args: argparse.Namespace) -> Path:
    """``--output`` (plus ``--experiment``); refuses to overwrite another run's checkpoints unless resuming."""
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


def setup(args: argparse.Namespace) -> dict[str, Any]:
    """Everything before the first step; raises ValueError/FileNotFoundError with the fix on bad inputs."""
    if not args.data_dir:
        raise ValueError('No data: pass --data-dir DIR (an ImageFolder root with a train split).')
    check_file(args.initial_checkpoint, '--initial-checkpoint', 'pass the path of an existing checkpoint.')
    check_file(args.kd_checkpoint, '--kd-checkpoint',
               'pass the path of the local teacher weights (state_dict, .safetensors or timm train checkpoint).')
    if args.resume and args.resume != 'auto':
        check_file(args.resume, '--resume', "pass an existing checkpoint, or 'auto' for the latest in --output.")
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
    eval_loader = build_eval_loader(val_dir, eval_config, args) if val_dir is not None else None
    if eval_loader is None and utils.is_primary(args):
        _logger.warning(f'No validation split ({args.val_split} or val) in {args.data_dir}: checkpoints are unranked.')
    return dict(model=model, task=task, device=device, output_dir=output_dir, train_loader=train_loader,
                sampler=sampler, eval_loader=eval_loader)


def main(argv: Sequence[str] | None = None) -> int:
    utils.setup_default_logging()
    args, args_text = parse_args(argv)
    device = utils.init_distributed_device(args)
    args.grad_accum_steps = max(1, args.grad_accum_steps)
    if args.distributed:
        _logger.info(f'Process {args.rank} of {args.world_size} on {device} (distributed).')
    try:
        state = setup(args)
    except (FileNotFoundError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        if args.distributed:
            dist.destroy_process_group()
        return 2
    try:
        train(args, args_text, **state)
    finally:
        if args.distributed:
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
    if not args.lr:
        batch_ratio = global_batch * args.grad_accum_steps / args.lr_base_size
        scale = args.lr_base_scale or ('sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear')
        args.lr = args.lr_base * (batch_ratio ** 0.5 if scale == 'sqrt' else batch_ratio)
        if primary:
            _logger.info(f'Learning rate {args.lr:.3g} from --lr-base {args.lr_base} and global batch '
                         f'{global_batch * args.grad_accum_steps} ({scale} scaling).')
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    amp_autocast, loss_scaler = resolve_amp(args, device)

    resume = None
    if args.resume:
        resume_task_checkpoint(
            task, args.resume, optimizer=None if args.no_resume_opt else optimizer, loss_scaler=loss_scaler,
            log_info=primary)
        resume = load_checkpoint_metadata(args.resume)
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
        start_epoch = int(resume.get('resume_epoch', resume.get('epoch', -1) + 1))
        start_samples = int(resume.get('epoch_samples', 0))
        if start_samples % global_batch:
            _logger.warning(f'The checkpoint stopped after {start_samples} samples of epoch {start_epoch}, not a '
                            f'multiple of the global batch {global_batch} (batch size or world size changed): '
                            f'restarting at the previous whole batch.')
            start_samples -= start_samples % global_batch
        num_updates = int(resume.get('num_updates', start_epoch * updates_per_epoch))
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
