#!/usr/bin/env python3
"""FID (and IS, KID, precision/recall) of a trained class-conditional DiT, with DiT's FID-50K protocol.

Generate 50k samples (250 DDPM steps, guidance 1.5, fixed per-rank seeds) and score them with torch-fidelity::

    accelerate launch --num_processes 8 eval/fid.py --model_path runs/dit-shd/final \\
        --vae_path weights/sd-vae-ft-ema --reference weights/VIRTUAL_imagenet256_labeled.npz \\
        --inception_weights weights/weights-inception-2015-12-05-6726825d.pth --output_dir runs/dit-shd/fid50k

Score existing samples (an image folder or an ADM `.npz`) on a small dataset with a timm classifier's features::

    python eval/fid.py --samples runs/digits-dit/samples.npz --reference data/digits/val \\
        --feature_extractor timm --fe_model_name vit_tiny_patch16_224 --fe_checkpoint runs/vit/model_best.pth.tar \\
        --fe_num_classes 10 --fe_in_chans 1 --fe_img_size 32 --fe_model_kwargs patch_size=8 depth=6 \\
        --output_dir runs/digits-dit/fid

`--output_dir` receives `samples.npz` (`arr_0`, uint8 NHWC: ADM's evaluator reads it), `samples_grid.png` and
`fid_results.json` (metrics, the tool and its version, the feature extractor, every setting). Before any sample is
generated, the Inception weights are verified (a file whose pickle would run code is refused) and the whole reference
is checked against what will be scored: `.npz` dtypes and shapes, image size against the model's output (or the
samples'), precomputed statistics' width against the feature extractor's. Under
`accelerate launch` the generation is split across processes; metrics run on the main process only.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch_fidelity.defaults import DEFAULTS

from shd_plugins.cli import ParseKwargs, user_errors
from shd_plugins.diffusers import SCHEDULERS, DiTComponents, generate_samples, load_dit_components, rank_seed
from shd_plugins.evaluation import (
    INCEPTION,
    METRICS,
    check_reference,
    compute_metrics,
    feature_size,
    load_images,
    register_timm_feature_extractor,
    resolve_inception_weights,
    save_image_grid,
    save_npz,
)

_logger = logging.getLogger('eval.fid')
DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    source = parser.add_argument_group('what to score (one of)')
    source.add_argument('--model_path', help='trained DiT folder (transformer/, scheduler/, vae/, sample_config.json)')
    source.add_argument('--samples', help='existing samples: image folder or .npz with arr_0')

    gen = parser.add_argument_group('generation (with --model_path)')
    gen.add_argument('--vae_path', help='AutoencoderKL folder, if not <model_path>/vae')
    gen.add_argument('--num_samples', type=int, default=50_000, help='total samples (default: 50000)')
    gen.add_argument('--num_inference_steps', type=int, default=250, help='denoising steps (default: 250)')
    gen.add_argument('--guidance_scale', type=float, default=1.5,
                     help='classifier-free guidance; <=1 disables it (default: 1.5)')
    gen.add_argument('--scheduler', choices=sorted(SCHEDULERS), default='ddpm', help='sampler (default: ddpm)')
    gen.add_argument('--batch_size', type=int, default=32, help='samples per batch on each process (default: 32)')
    gen.add_argument('--seed', type=int, default=0, help='global seed; process r of W uses seed*W+r')
    gen.add_argument('--class_labels', choices=('even', 'random'), default='even',
                     help='labels spread evenly over the classes, or uniform random with the seed')
    gen.add_argument('--dtype', choices=sorted(DTYPES), default='float32', help='model weights dtype')

    ref = parser.add_argument_group('metrics')
    ref.add_argument('--reference', help='image folder, .npz of images (arr_0), or .npz with mu/sigma; '
                                         'without it only the samples are written')
    ref.add_argument('--metrics', nargs='+', choices=METRICS, default=list(METRICS), help='metrics to compute')
    ref.add_argument('--fid_batch_size', type=int, default=DEFAULTS['batch_size'],
                     help='feature extraction batch size (default: %(default)s)')
    ref.add_argument('--kid_subset_size', type=int, default=DEFAULTS['kid_subset_size'],
                     help='KID subset size, clipped to the sets (default: %(default)s)')
    ref.add_argument('--kid_subsets', type=int, default=DEFAULTS['kid_subsets'],
                     help='KID subsets (default: %(default)s)')
    ref.add_argument('--feature_extractor', choices=('inception', 'timm'), default='inception',
                     help="inception: torch-fidelity's inception-v3-compat; timm: a classifier checkpoint")
    ref.add_argument('--inception_weights', metavar='PATH',
                     help='weights-inception-2015-12-05-6726825d.pth (default: $TORCH_HOME/hub/checkpoints/); read '
                          'with weights_only=True and checked (keys, shapes, published hash), never unpickled')
    ref.add_argument('--allow_download', action='store_true',
                     help='download missing Inception weights (torch.hub, checked against the published hash)')

    fe = parser.add_argument_group('timm feature extractor (with --feature_extractor timm)')
    fe.add_argument('--fe_model_name', help='timm model name, e.g. vit_tiny_patch16_224')
    fe.add_argument('--fe_checkpoint', help='state_dict file or timm train checkpoint')
    fe.add_argument('--fe_num_classes', type=int, help="classes of the checkpoint's head (0: headless, no IS)")
    fe.add_argument('--fe_in_chans', type=int, default=3, help='input channels (1 for grayscale)')
    fe.add_argument('--fe_img_size', type=int, help='input size the model was built with')
    fe.add_argument('--fe_model_kwargs', nargs='+', default={}, action=ParseKwargs,
                    help='extra create_model kwargs, k=v (e.g. patch_size=8 depth=6)')
    fe.add_argument('--fe_use_ema', action='store_true', help='use state_dict_ema of a train checkpoint')
    fe.add_argument('--fe_mean', type=float, nargs='+', help='override the normalization mean')
    fe.add_argument('--fe_std', type=float, nargs='+', help='override the normalization std')
    fe.add_argument('--fe_interpolation', help='override the resize interpolation')

    out = parser.add_argument_group('output')
    out.add_argument('--output_dir', required=True, help='where samples.npz, samples_grid.png, fid_results.json go')
    out.add_argument('--grid_size', type=int, default=64, help='images in the sample grid (default: 64)')
    out.add_argument('--no_progress', action='store_true', help='quiet torch-fidelity')
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if bool(args.model_path) == bool(args.samples):
        parser.error('pass exactly one of --model_path (generate) and --samples (score existing samples)')
    if args.feature_extractor == 'timm':
        missing = [f for f in ('fe_model_name', 'fe_checkpoint', 'fe_num_classes') if getattr(args, f) is None]
        if missing:
            parser.error('--feature_extractor timm needs ' + ', '.join('--' + m for m in missing))


def resolve_feature_extractor(args: argparse.Namespace) -> str:
    """The torch-fidelity extractor name; verifies the Inception weights before any sampling, so failures (a missing
    file, one whose pickle would run code) come early."""
    if args.feature_extractor == 'inception':
        if args.reference:
            resolve_inception_weights(args.inception_weights, allow_download=args.allow_download)
        return INCEPTION
    name, _ = register_timm_feature_extractor(
        args.fe_model_name,
        args.fe_checkpoint,
        num_classes=args.fe_num_classes,
        in_chans=args.fe_in_chans,
        img_size=args.fe_img_size,
        model_kwargs=args.fe_model_kwargs,
        use_ema=args.fe_use_ema,
        mean=args.fe_mean,
        std=args.fe_std,
        interpolation=args.fe_interpolation,
    )
    return name


def generate(
    args: argparse.Namespace, accelerator: Accelerator, components: DiTComponents
) -> tuple[np.ndarray, dict[str, Any]]:
    start = time.perf_counter()
    images = generate_samples(
        components,
        args.num_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.num_inference_steps,
        scheduler_name=args.scheduler,
        class_label_mode=args.class_labels,
        accelerator=accelerator,
    )
    world = accelerator.num_processes
    info = {
        'num_processes': world,
        'rank_seeds': [rank_seed(args.seed, r, world) for r in range(world)],
        'num_classes': components.num_classes,
        'null_class_id': int(components.transformer.config.num_embeds_ada_norm),
        'pixel_space': components.pixel_space,
        'trained_scheduler': type(components.scheduler).__name__,
        'sampler': args.scheduler,
        'seconds': round(time.perf_counter() - start, 2),
    }
    return images, info


def evaluate(args: argparse.Namespace) -> dict[str, Any] | None:
    """Generate (or read) the samples, score them and write `--output_dir`; None on processes other than the main."""
    # Several processes without CUDA (torchrun on a CPU box) need accelerate's gloo backend.
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get('WORLD_SIZE', '1')) > 1
    accelerator = Accelerator(cpu=multi_cpu)
    feature_extractor = resolve_feature_extractor(args)
    components, images = None, None
    if args.model_path:
        components = load_dit_components(args.model_path, vae_path=args.vae_path, dtype=DTYPES[args.dtype])
    elif accelerator.is_main_process:
        images = load_images(args.samples)
        if len(images) == 0:
            raise ValueError(f'--samples {args.samples} holds no images.')
    if args.reference and (components is not None or images is not None):
        # The whole reference against what will be scored (sizes, dtypes, statistics' width), before any sampling.
        size = (components.image_size,) * 2 if components is not None else images.shape[1:3]
        check_reference(args.reference, image_size=size, feature_dim=feature_size(feature_extractor))

    generation = None
    if components is not None:
        images, generation = generate(args, accelerator, components)
    if not accelerator.is_main_process:  # its share is gathered; scoring runs on the main process alone
        return None

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    samples_npz = save_npz(images, output_dir / 'samples.npz')
    grid = save_image_grid(images, output_dir / 'samples_grid.png', args.grid_size)
    _logger.info('wrote %d samples to %s and a grid to %s', len(images), samples_npz, grid)

    results: dict[str, Any] = {'metrics': {}}
    if args.reference:
        results = compute_metrics(
            images,
            args.reference,
            feature_extractor=feature_extractor,
            **{m: m in args.metrics for m in METRICS},
            batch_size=args.fid_batch_size,
            kid_subset_size=args.kid_subset_size,
            kid_subsets=args.kid_subsets,
            inception_weights=args.inception_weights,
            allow_download=args.allow_download,
            verbose=not args.no_progress,
        )
        results['metric_settings'] = results.pop('settings')
    else:
        _logger.info('no --reference: samples written, no metrics computed')
    results.update(
        num_samples=len(images),
        samples_source=args.samples or args.model_path,
        samples_npz=str(samples_npz),
        samples_grid=str(grid),
        generation=generation,
        args=vars(args),
    )
    results_file = output_dir / 'fid_results.json'
    with open(results_file, 'w') as f:
        json.dump(results, f, indent=2, default=str)
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Command-line entry point: user errors end as `fid.py: error: ...` with exit status 2, as argparse's."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    with user_errors():
        results = evaluate(args)
    if results is not None:
        for key, value in results['metrics'].items():
            print(f'{key}: {value:.6g}')
        print(f"results: {Path(args.output_dir) / 'fid_results.json'}")
    return results


if __name__ == '__main__':
    main()
