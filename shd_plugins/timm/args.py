"""The command line of a timm ``train.py``-style SHD training script: timm's flag names plus ``add_shd_args``.

Two parsers, as timm's ``train.py``: the first reads only ``-c FILE``, whose YAML values become the defaults of the
second, so flags given on the command line win over the file. Every flag keeps timm's name and meaning, so a
``train.py`` YAML file (restricted to these flags) and its ``args.yaml`` read the same here.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import torch
import yaml

from ..cli import ParseKwargs
from .task import KD_DISTILL_TYPES, add_shd_args

__all__ = ['build_train_parsers', 'parse_train_args']


def build_train_parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
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
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
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
    group.add_argument('--opt-kwargs', nargs='*', default={}, action=ParseKwargs)

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


def parse_train_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, str]:
    """Two-stage parse as timm's ``train.py``: ``-c`` YAML values become defaults, command-line flags win."""
    config_parser, parser = build_train_parsers()
    args_config, remaining = config_parser.parse_known_args(argv)
    if args_config.config:
        if not os.path.isfile(args_config.config):
            parser.error(f"-c/--config '{args_config.config}' does not exist: pass a YAML file of this script's flags.")
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
