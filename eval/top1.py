#!/usr/bin/env python3
"""Top-1/top-5 validation of a timm classifier checkpoint on an ImageFolder, like timm's ``validate.py``.

Example (the embedded digits data, a tiny 1-channel ViT trained by a recipe)::

    python eval/top1.py --model vit_tiny_patch16_224 --num-classes 10 --in-chans 1 --img-size 32 \\
        --model-kwargs patch_size=8 embed_dim=192 depth=6 num_heads=3 \\
        --checkpoint runs/student/model_best.pth.tar --use-ema \\
        --data-dir data/digits --split val --results-file runs/student/top1.json

The machines this runs on are offline, so weights come from ``--checkpoint`` (a state_dict file or a timm
train checkpoint dict); ``--pretrained`` (hub download) is never implied. A timm train checkpoint records the
``args`` it was trained with: a model built here with other head counts (equal weight shapes, so timm would load it
without a word) is refused, naming both; an unreadable checkpoint is an error naming the file. Results are printed
as JSON after a ``--result`` line, as ``validate.py`` does, and written to ``--results-file`` if given.
"""
from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from shd_plugins.cli import ParseKwargs, user_errors
from shd_plugins.evaluation import (
    build_eval_loader,
    create_eval_model,
    evaluate_classifier,
    resolve_eval_data_config,
    resolve_split_dir,
)

_logger = logging.getLogger('eval.top1')


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags, named as in timm's ``validate.py``."""
    parser = argparse.ArgumentParser(description='Top-1/top-5 validation of a timm classifier on an ImageFolder')
    parser.add_argument('--model', '-m', required=True, metavar='NAME', help='timm model name')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                        help='extra create_model kwargs, k=v (e.g. patch_size=8 depth=2)')
    parser.add_argument('--num-classes', type=int, default=None, help='number of classes of the checkpoint')
    parser.add_argument('--in-chans', type=int, default=None, help='image input channels (1 reads grayscale)')
    parser.add_argument('--img-size', type=int, default=None, help='input image size (model default if empty)')
    parser.add_argument('--checkpoint', default='', metavar='PATH',
                        help='state_dict file or timm train checkpoint (.pth, .pth.tar, .safetensors)')
    parser.add_argument('--use-ema', action='store_true', help='use the EMA weights of the checkpoint if present')
    parser.add_argument('--pretrained', action='store_true',
                        help='load hub pretrained weights (needs internet; off unless given)')
    parser.add_argument('--data-dir', required=True, metavar='DIR',
                        help='dataset root holding <split>/, or an ImageFolder split directory itself')
    parser.add_argument('--split', default='val', help='split subfolder of --data-dir (default: val)')
    parser.add_argument('-b', '--batch-size', type=int, default=256, help='mini-batch size (default: 256)')
    parser.add_argument('-j', '--workers', type=int, default=2, help='data loading workers (default: 2)')
    parser.add_argument('--crop-pct', type=float, default=None, help='center crop pct (model default if empty)')
    parser.add_argument('--interpolation', default='', help='resize interpolation (model default if empty)')
    parser.add_argument('--mean', type=float, nargs='+', default=None, help='override normalization mean')
    parser.add_argument('--std', type=float, nargs='+', default=None, help='override normalization std')
    parser.add_argument('--amp', action='store_true', help='autocast (float16 on CUDA, bfloat16 on CPU)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='device (default: cuda if available, else cpu)')
    parser.add_argument('--results-file', default='', metavar='PATH.json', help='write the results JSON here')
    parser.add_argument('--no-progress', action='store_true', help='hide the progress bar')
    return parser


def validate(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate ``args.model`` on ``args.data_dir``/``args.split``; return the results dict."""
    resolve_split_dir(args.data_dir, args.split)  # fail on a bad --data-dir before building the model
    device = torch.device(args.device)
    model = create_eval_model(
        args.model,
        checkpoint=args.checkpoint,
        use_ema=args.use_ema,
        pretrained=args.pretrained,
        num_classes=args.num_classes,
        in_chans=args.in_chans,
        img_size=args.img_size,
        model_kwargs=args.model_kwargs,
    ).to(device)
    data_config = resolve_eval_data_config(
        model,
        img_size=args.img_size,
        in_chans=args.in_chans,
        crop_pct=args.crop_pct,
        interpolation=args.interpolation,
        mean=args.mean,
        std=args.std,
    )
    _logger.info('Data config: %s', data_config)
    loader = build_eval_loader(
        args.data_dir,
        model,
        split=args.split,
        batch_size=args.batch_size,
        workers=args.workers,
        data_config=data_config,
    )
    metrics = evaluate_classifier(model, loader, device=device, amp=args.amp, progress=not args.no_progress)
    return {
        'model': args.model,
        'checkpoint': args.checkpoint or None,
        'top1': metrics['top1'],
        'top5': metrics['top5'],
        'loss': metrics['loss'],
        'num_samples': metrics['num_samples'],
        'img_size': data_config['input_size'][-1],
        'crop_pct': data_config['crop_pct'],
        'interpolation': data_config['interpolation'],
        'split': args.split,
        'top1_correct': metrics['top1_correct'],
        'top5_correct': metrics['top5_correct'],
        'use_ema': args.use_ema,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry point: validate, write ``--results-file``, print the JSON after ``--result``.

    User errors (a missing checkpoint, a folder that is not an ImageFolder) end as ``top1.py: error: ...`` with exit
    status 2, as argparse's own errors do.
    """
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    args = build_parser().parse_args(argv)
    with user_errors():
        results = validate(args)
        if args.results_file:
            Path(args.results_file).parent.mkdir(parents=True, exist_ok=True)
            Path(args.results_file).write_text(json.dumps(results, indent=4) + '\n')
    print(f'--result\n{json.dumps(results, indent=4)}')
    return results


if __name__ == '__main__':
    main()
