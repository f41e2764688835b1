#!/usr/bin/env python
"""Train a class-conditional DiT with diffusers, optionally distilled from a larger DiT with SHD.

In the style of diffusers' `examples/` training scripts (`train_text_to_image.py`, `train_unconditional.py`):
underscore flags, `accelerate` for devices/precision/accumulation/checkpoints, and the training math imported
from the library (`shd_plugins.diffusers`, as the examples import `diffusers.training_utils`).

The objective is DiT's (Peebles & Xie, 2023) plus two distillation terms
(`shd_plugins.diffusers.DiTDistillationObjective`):

    L = L_diffusion(student) + output_kd_weight * MSE(student_eps, teacher_eps) + shd_weight * L_SHD

* `L_diffusion` is MSE on the predicted noise; for learned-sigma models (`out_channels == 2 * in_channels`) DiT's
  hybrid loss adds the variational bound on the variance channels, with the predicted mean detached.
* The teacher (`--shd_teacher_model_name_or_path`) is frozen and sees exactly the student's noisy inputs,
  timesteps and (dropped) class labels. `L_SHD` squeezes each distilled teacher layer's M attention maps into the
  student's N <= M maps (`shd_plugins.SHDDistiller`, forward hooks only: any attention processor works). The
  `--shd_*` flags are `shd_plugins.SHDConfig`'s options.

Data: an ImageFolder (`<train_data_dir>/<class>/<image>`), trained in latent space through a VAE
(`--pretrained_vae_model_name_or_path`) or in pixel space when no VAE is given (images in [-1, 1], as many
channels as the model's `in_channels`: 1 = grayscale, 3 = RGB).

Output (`--output_dir`): `transformer/`, `scheduler/`, `sample_config.json` (and `vae/` + `model_index.json`,
i.e. a `DiTPipeline` folder, for latent models), `checkpoint-<step>/` folders, and `train_log.jsonl` (one JSON
object per optimisation step: the loss terms, `shd_loss` unweighted as timm's `kd_loss`, and per-layer SHD
losses / merge weights). A user error (a wrong path, flag or model config) ends the script with
`train_dit.py: error: <message>` and exit status 2.

Checkpoints and resume (`shd_plugins.diffusers.checkpoints`): a checkpoint is written to `checkpoint-<step>.partial`
and renamed into place once complete (its `checkpoint.json` lists every file's size); older ones are pruned after.
`--resume_from_checkpoint latest` takes the newest complete checkpoint of the run in `run.json`, logging what it
skipped and why. A resumed run is bit-identical on CPU to an uninterrupted one: augmentations are seeded per
(seed, epoch, sample) and the loader never moves the RNG that draws noise, timesteps and label dropout. An
`--output_dir` holding another run (a model or checkpoints) is refused without `--resume_from_checkpoint` or
`--overwrite_output_dir`.

Example (the digits setting of the demo, CPU):

    accelerate launch --num_processes 1 --cpu recipes/train_dit.py \
      --train_data_dir runs/demo/data8/train --resolution 8 \
      --model_config recipes/configs/digits_dit_student_h4.json \
      --shd_teacher_model_name_or_path runs/digits_teacher \
      --train_batch_size 64 --max_train_steps 2000 --output_dir runs/digits_student_h4_shd
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import diffusers
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, broadcast_object_list, set_seed
from diffusers import AutoencoderKL, DiTTransformer2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import is_tensorboard_available
from diffusers.utils.import_utils import is_xformers_available
from PIL import Image
from torchvision import datasets, transforms
from tqdm.auto import tqdm

from shd_plugins import SHDConfig
from shd_plugins.cli import user_errors
from shd_plugins.diffusers import (
    DiTDistillationObjective,
    check_output_dir,
    check_student_matches_data,
    commit_checkpoint,
    default_dit_scheduler,
    find_checkpoint,
    initialize_dit_weights,
    learns_sigma,
    load_transformer,
    load_vae,
    prune_checkpoints,
    read_model_config,
    read_run_id,
    run_contents,
    sample_class_conditional,
    save_model_folder,
    staging_dir,
    start_run,
    write_sample_config,
)
from shd_plugins.diffusers.models import check_local_path
from shd_plugins.imagefolder import check_imagefolder
from shd_plugins.seeding import SeededSamples, batches_off_the_training_rng

logger = get_logger(__name__, log_level='INFO')

TRAIN_LOG_NAME = 'train_log.jsonl'


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a class-conditional DiT, optionally distilled with SHD.')
    # Model
    parser.add_argument(
        '--model_config', type=str, default=None,
        help="JSON config of the student DiTTransformer2DModel (see recipes/configs/). Keys starting with '_' "
             "(other than _class_name) are comments and are dropped.")
    parser.add_argument(
        '--pretrained_model_name_or_path', type=str, default=None,
        help='Start the student from a trained DiT instead: a model folder with transformer/, a transformer '
             'folder, or a hub id with a transformer/ subfolder (e.g. facebook/DiT-XL-2-256).')
    parser.add_argument('--revision', type=str, default=None, help='Hub revision of the pretrained models.')
    parser.add_argument(
        '--weight_init', type=str, default='dit', choices=['dit', 'diffusers'],
        help="Initialisation of a student built from --model_config: 'dit' is DiT's (xavier linears, adaLN-Zero "
             "modulations and output layer zeroed); 'diffusers' keeps PyTorch's defaults.")
    parser.add_argument(
        '--pretrained_vae_model_name_or_path', type=str, default=None,
        help='AutoencoderKL (local folder, pipeline folder with vae/, or hub id such as stabilityai/sd-vae-ft-ema).'
             ' Without it the DiT is trained in pixel space.')
    # Data
    parser.add_argument(
        '--train_data_dir', type=str, required=True,
        help="ImageFolder with one sub-folder per class (e.g. data/digits/train, or ImageNet's train/).")
    parser.add_argument('--resolution', type=int, default=256, help='Side of the (square) training images.')
    parser.add_argument('--center_crop', action='store_true', help='Center-crop instead of random-crop.')
    parser.add_argument('--random_flip', action='store_true', help='Random horizontal flips (DiT on ImageNet).')
    parser.add_argument('--max_train_samples', type=int, default=None, help='Truncate the dataset (debugging).')
    parser.add_argument('--dataloader_num_workers', type=int, default=0)
    parser.add_argument(
        '--class_dropout_prob', type=float, default=0.1,
        help='Probability of replacing a label by the null class (id num_embeds_ada_norm), for classifier-free '
             'guidance (DiT: 0.1).')
    # Training
    parser.add_argument('--output_dir', type=str, default='dit-shd')
    parser.add_argument(
        '--overwrite_output_dir', action='store_true',
        help='Start a new run in an --output_dir that holds another run (a trained model or checkpoints); without it '
             'such a folder is refused unless --resume_from_checkpoint continues that run.')
    parser.add_argument('--seed', type=int, default=None)
    parser.add_argument('--train_batch_size', type=int, default=16, help='Batch size per device.')
    parser.add_argument('--num_train_epochs', type=int, default=100)
    parser.add_argument('--max_train_steps', type=int, default=None, help='Overrides --num_train_epochs.')
    parser.add_argument('--gradient_accumulation_steps', type=int, default=1)
    parser.add_argument('--gradient_checkpointing', action='store_true')
    parser.add_argument('--learning_rate', type=float, default=1e-4, help='DiT: 1e-4, constant.')
    parser.add_argument('--scale_lr', action='store_true',
                        help='Scale the learning rate by devices, accumulation steps and batch size.')
    parser.add_argument('--lr_scheduler', type=str, default='constant',
                        help='"linear", "cosine", "cosine_with_restarts", "polynomial", "constant", '
                             '"constant_with_warmup".')
    parser.add_argument('--lr_warmup_steps', type=int, default=0)
    parser.add_argument('--adam_beta1', type=float, default=0.9)
    parser.add_argument('--adam_beta2', type=float, default=0.999)
    parser.add_argument('--adam_weight_decay', type=float, default=0.0, help='DiT: 0.')
    parser.add_argument('--adam_epsilon', type=float, default=1e-08)
    parser.add_argument('--max_grad_norm', type=float, default=1.0)
    parser.add_argument('--use_ema', action='store_true', help='Keep an EMA of the student (saved as the model).')
    parser.add_argument('--ema_decay', type=float, default=0.9999)
    parser.add_argument('--allow_tf32', action='store_true', help='Allow TF32 on Ampere+ GPUs.')
    parser.add_argument('--mixed_precision', type=str, default=None, choices=['no', 'fp16', 'bf16'],
                        help='Overrides the accelerate config. The teacher and VAE run in this precision.')
    parser.add_argument('--enable_xformers_memory_efficient_attention', action='store_true')
    parser.add_argument(
        '--report_to', type=str, default=None,
        help='"tensorboard", "wandb", "all" or "none". Default: tensorboard when installed, else none. '
             f'{TRAIN_LOG_NAME} in --output_dir is always written.')
    parser.add_argument('--logging_dir', type=str, default='logs', help='Tracker dir, relative to --output_dir.')
    parser.add_argument('--checkpointing_steps', type=int, default=500,
                        help='Save the training state (resumable with --resume_from_checkpoint) every X steps.')
    parser.add_argument('--checkpoints_total_limit', type=int, default=None, help='Keep at most this many.')
    parser.add_argument(
        '--resume_from_checkpoint', type=str, default=None,
        help='A checkpoint folder (a name in --output_dir or a path), or "latest" for the newest complete checkpoint '
             'of the run in --output_dir (incomplete or truncated ones are skipped, with the reason logged).')
    parser.add_argument(
        '--sample_variance_type', type=str, default='fixed_small', choices=['fixed_small', 'learned_range'],
        help="variance_type of the saved DDPMScheduler. 'learned_range' samples with a learned-sigma model's "
             "variance (DiT's sampler; shd_plugins.diffusers samples it) but DiTPipeline cannot run it, as it drops "
             "the sigma channels.")
    # Validation
    parser.add_argument('--validation_steps', type=int, default=None, help='Sample a grid every X steps.')
    parser.add_argument('--num_validation_images', type=int, default=10)
    parser.add_argument('--validation_inference_steps', type=int, default=50)
    parser.add_argument('--validation_guidance_scale', type=float, default=1.5)
    # Distillation
    parser.add_argument(
        '--shd_teacher_model_name_or_path', type=str, default=None,
        help='Teacher DiT (model folder with transformer/, transformer folder or hub id). It must see the same '
             'number of tokens, classes and input channels as the student, and have >= heads in distilled layers.')
    parser.add_argument('--output_kd_weight', type=float, default=1.0,
                        help='lambda_out: MSE between student and teacher noise predictions (eps channels).')
    SHDConfig.add_args(parser, style='diffusers', title='SHD attention distillation (with a teacher)')

    args = parser.parse_args(input_args)
    validate_args(args)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Fail before any model is loaded on mistakes a long run would hit late (or never report)."""
    if (args.model_config is None) == (args.pretrained_model_name_or_path is None):
        raise ValueError('Give exactly one of --model_config (a new student) or --pretrained_model_name_or_path.')
    if args.model_config is not None and not Path(args.model_config).is_file():
        raise ValueError(f'--model_config {args.model_config} is not a file; see recipes/configs/ for examples.')
    check_imagefolder(args.train_data_dir)
    if args.pretrained_vae_model_name_or_path is not None:
        check_local_path(args.pretrained_vae_model_name_or_path, '--pretrained_vae_model_name_or_path', 'VAE')
    if args.shd_teacher_model_name_or_path is not None:
        check_local_path(args.shd_teacher_model_name_or_path, '--shd_teacher_model_name_or_path', 'teacher DiT')
    try:
        SHDConfig.from_args(args)
    except ValueError as e:
        raise ValueError(f'--shd_* flags: {e}') from None
    if args.output_kd_weight < 0:
        raise ValueError(f'--output_kd_weight must be >= 0, got {args.output_kd_weight}.')
    if not 0.0 <= args.class_dropout_prob < 1.0:
        raise ValueError(f'--class_dropout_prob must be in [0, 1), got {args.class_dropout_prob}.')
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError(f'--checkpoints_total_limit must be >= 1, got {args.checkpoints_total_limit}.')
    check_output_dir(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    if args.report_to is None:
        args.report_to = 'tensorboard' if is_tensorboard_available() else 'none'


# ----------------------------------------------------------------------------------------------------------------
# Data, logs, validation
# ----------------------------------------------------------------------------------------------------------------


class ConvertImageMode:
    """PIL mode conversion as a picklable transform (dataloader workers)."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.convert(self.mode)


def build_dataset(args: argparse.Namespace, image_channels: int) -> datasets.ImageFolder:
    mode = {1: 'L', 3: 'RGB'}.get(image_channels)
    if mode is None:
        raise ValueError(f'Images need 1 (grayscale) or 3 (RGB) channels; the model expects {image_channels}.')
    steps = [
        ConvertImageMode(mode),
        transforms.Resize(args.resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(args.resolution) if args.center_crop else transforms.RandomCrop(args.resolution),
    ]
    if args.random_flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize([0.5] * image_channels, [0.5] * image_channels)]
    dataset = datasets.ImageFolder(args.train_data_dir, transform=transforms.Compose(steps))
    if args.max_train_samples is not None:
        generator = torch.Generator().manual_seed(args.seed or 0)
        keep = torch.randperm(len(dataset), generator=generator)[: args.max_train_samples].tolist()
        dataset.samples = [dataset.samples[i] for i in sorted(keep)]
        dataset.targets = [s[1] for s in dataset.samples]
        dataset.imgs = dataset.samples
    return dataset


class JsonlLog:
    """Appends one JSON object per line to `train_log.jsonl` on the main process (resumed runs append)."""

    def __init__(self, path: str, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, 'a') as f:
                f.write(json.dumps(record) + '\n')


def tracker_config(args: argparse.Namespace) -> dict[str, Any]:
    """Trackers (tensorboard hparams) accept scalars only."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}


@torch.no_grad()
def log_validation(args: argparse.Namespace, accelerator: Accelerator, transformer: DiTTransformer2DModel,
                   vae: AutoencoderKL | None, num_classes: int, step: int) -> None:
    """Sample a class-conditional grid with the current weights and save it under `<output_dir>/validation/`."""
    from torchvision.utils import make_grid, save_image

    was_training = transformer.training
    transformer.eval()
    generator = torch.Generator('cpu').manual_seed(args.seed or 0)
    labels = torch.arange(args.num_validation_images) % num_classes
    images = sample_class_conditional(
        transformer, default_dit_scheduler(args.sample_variance_type), labels, vae=vae,
        guidance_scale=args.validation_guidance_scale, num_inference_steps=args.validation_inference_steps,
        generator=generator, progress=False)
    transformer.train(was_training)
    grid = make_grid(images.permute(0, 3, 1, 2).float() / 255.0, nrow=min(len(images), num_classes))
    os.makedirs(os.path.join(args.output_dir, 'validation'), exist_ok=True)
    save_image(grid, os.path.join(args.output_dir, 'validation', f'step-{step}.png'))
    for tracker in accelerator.trackers:
        if tracker.name == 'tensorboard':
            tracker.writer.add_images('validation', images.permute(0, 3, 1, 2).numpy(), step, dataformats='NCHW')


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def save_checkpoint(accelerator: Accelerator, args: argparse.Namespace, step: int, run_id: str) -> None:
    """accelerate's state in a staging folder, renamed to ``checkpoint-<step>`` when complete; then pruning."""
    staging = staging_dir(args.output_dir, step, remove_leftover=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()  # every process's random states are written
    if accelerator.is_main_process:
        path = commit_checkpoint(staging, step, run_id)
        prune_checkpoints(args.output_dir, args.checkpoints_total_limit, run_id, keep=path)
        logger.info(f'Saved state to {path}')
    accelerator.wait_for_everyone()


def main(args: argparse.Namespace) -> None:
    logging_dir = Path(args.output_dir, args.logging_dir)
    accelerator_project_config = ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == 'none' else args.report_to,
        project_config=accelerator_project_config,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format='%(asctime)s - %(levelname)s - %(name)s - %(message)s',
                        datefmt='%m/%d/%Y %H:%M:%S', level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        diffusers.utils.logging.set_verbosity_info()
    else:
        diffusers.utils.logging.set_verbosity_error()
    if args.seed is not None:
        set_seed(args.seed)  # same init on every process; reseeded per process below for noise and dropout
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    # Student, VAE, teacher.
    if args.model_config is not None:
        student = DiTTransformer2DModel.from_config(read_model_config(args.model_config))
        if args.weight_init == 'dit':
            initialize_dit_weights(student)
    else:
        student = load_transformer(args.pretrained_model_name_or_path, revision=args.revision,
                                   flag='--pretrained_model_name_or_path')
    learned_sigma = learns_sigma(student)
    if args.sample_variance_type == 'learned_range' and not learned_sigma:
        raise ValueError('--sample_variance_type learned_range needs a learned-sigma model (out_channels = 2 * in).')

    vae = None
    if args.pretrained_vae_model_name_or_path is not None:
        vae = load_vae(args.pretrained_vae_model_name_or_path, revision=args.revision,
                       flag='--pretrained_vae_model_name_or_path')
        vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        if args.resolution % vae_scale:
            raise ValueError(f"--resolution {args.resolution} is not divisible by the VAE's downsampling {vae_scale}.")
        input_size, input_channels, image_channels = args.resolution // vae_scale, vae.config.latent_channels, 3
        space = f'latent (resolution {args.resolution} / VAE factor {vae_scale})'
    else:
        input_size, input_channels = args.resolution, student.config.in_channels
        image_channels = input_channels
        space = 'pixel-space'

    train_dataset = build_dataset(args, image_channels)
    class_names = list(train_dataset.classes)
    check_student_matches_data(student, input_size, input_channels, len(class_names), space)

    shd_config = SHDConfig.from_args(args)
    teacher = None
    if args.shd_teacher_model_name_or_path is not None:
        if not shd_config.enabled and args.output_kd_weight == 0:
            logger.warning('A teacher was given but --shd_weight and --output_kd_weight are 0: it is unused.')
        else:
            teacher = load_transformer(args.shd_teacher_model_name_or_path, revision=args.revision,
                                       flag='--shd_teacher_model_name_or_path')
    noise_scheduler = default_dit_scheduler(args.sample_variance_type)
    if vae is not None:
        vae.requires_grad_(False)
        vae.eval()

    ema_model = None
    if args.use_ema:
        ema_model = EMAModel(student.parameters(), decay=args.ema_decay, model_cls=DiTTransformer2DModel,
                             model_config=student.config)

    if args.enable_xformers_memory_efficient_attention:
        if not is_xformers_available():
            raise ValueError('xformers is not available. Make sure it is installed correctly (pip install xformers).')
        student.enable_xformers_memory_efficient_attention()
        if teacher is not None:
            teacher.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()

    # Checkpoints hold the student as a transformer folder (and its EMA), plus accelerate's state.
    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            if ema_model is not None:
                ema_model.save_pretrained(os.path.join(output_dir, 'transformer_ema'))
            for model in models:
                accelerator.unwrap_model(model).save_pretrained(os.path.join(output_dir, 'transformer'))
            noise_scheduler.save_pretrained(os.path.join(output_dir, 'scheduler'))
            write_sample_config(output_dir, class_names, vae is None, image_channels)  # sample with --vae_path
        for _ in range(len(weights)):
            weights.pop()  # saved above: accelerate must not save the model again

    def load_model_hook(models, input_dir):
        if ema_model is not None:
            loaded = EMAModel.from_pretrained(os.path.join(input_dir, 'transformer_ema'), DiTTransformer2DModel)
            ema_model.load_state_dict(loaded.state_dict())
            ema_model.to(accelerator.device)
            del loaded
        for _ in range(len(models)):
            model = accelerator.unwrap_model(models.pop())
            loaded = DiTTransformer2DModel.from_pretrained(input_dir, subfolder='transformer')
            model.register_to_config(**loaded.config)
            model.load_state_dict(loaded.state_dict())
            del loaded

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    train_samples = SeededSamples(train_dataset, args.seed if args.seed is not None else torch.initial_seed())
    train_dataloader = torch.utils.data.DataLoader(
        train_samples, shuffle=True, batch_size=args.train_batch_size, num_workers=args.dataloader_num_workers,
        drop_last=len(train_dataset) >= args.train_batch_size * accelerator.num_processes)

    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / accelerator.num_processes
                                           / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)

    student, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        student, optimizer, train_dataloader, lr_scheduler)
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)

    weight_dtype = {'fp16': torch.float16, 'bf16': torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for frozen in (teacher, vae):
        if frozen is not None:
            frozen.to(accelerator.device)
            if weight_dtype != torch.float32:
                frozen.to(dtype=weight_dtype)
    if ema_model is not None:
        ema_model.to(accelerator.device)
    # The prepared (possibly DDP-wrapped) student, so the objective's forward synchronises gradients.
    objective = DiTDistillationObjective(student, teacher, shd_config, output_kd_weight=args.output_kd_weight,
                                         class_dropout_prob=args.class_dropout_prob, noise_scheduler=noise_scheduler)

    if accelerator.is_main_process:
        accelerator.init_trackers('train_dit_shd', config=tracker_config(args))
    train_log = JsonlLog(os.path.join(args.output_dir, TRAIN_LOG_NAME), accelerator.is_main_process)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info('***** Running training *****')
    logger.info(f'  Num examples = {len(train_dataset)} in {len(class_names)} classes; {space} inputs '
                f'{input_channels}x{input_size}x{input_size}; learned sigma: {learned_sigma}')
    logger.info(f'  Instantaneous batch size per device = {args.train_batch_size}; total = {total_batch_size}')
    logger.info(f'  Gradient accumulation steps = {args.gradient_accumulation_steps}')
    logger.info(f'  Total optimization steps = {args.max_train_steps}; epochs = {num_train_epochs}')
    logger.info(f'  Teacher: {args.shd_teacher_model_name_or_path}; output KD weight '
                f'{args.output_kd_weight if teacher is not None else 0}, SHD weight '
                f'{shd_config.weight if objective.distiller is not None else 0}; layer pairs {objective.layer_pairs}')

    if args.seed is not None:  # distinct noise/timesteps/dropout per process; a resume restores these RNG states
        set_seed(args.seed + accelerator.process_index)
    global_step, first_epoch, resume_step, resumed_from = 0, 0, 0, None
    run_id = read_run_id(args.output_dir) if args.resume_from_checkpoint else None
    if args.resume_from_checkpoint:
        checkpoint = find_checkpoint(args.output_dir, args.resume_from_checkpoint, flag='--resume_from_checkpoint',
                                     run_id=run_id)
        if checkpoint is None and run_contents(args.output_dir) and not args.overwrite_output_dir:
            raise ValueError(
                f"--resume_from_checkpoint {args.resume_from_checkpoint}: no complete checkpoint of the run in "
                f"{args.output_dir} (the log above says what was skipped), which holds "
                f"{', '.join(run_contents(args.output_dir))}. Pass --overwrite_output_dir to start a new run there.")
        if checkpoint is None:
            accelerator.print(f"No complete checkpoint '{args.resume_from_checkpoint}' of this run in "
                              f'{args.output_dir}. Starting a new training run.')
            args.resume_from_checkpoint, run_id = None, None
        else:
            accelerator.print(f'Resuming from checkpoint {checkpoint.path} (step {checkpoint.step})')
            accelerator.load_state(str(checkpoint.path))
            global_step, run_id = checkpoint.step, checkpoint.run_id
            first_epoch = global_step // num_update_steps_per_epoch
            resume_step = (global_step % num_update_steps_per_epoch) * args.gradient_accumulation_steps
            resumed_from = str(checkpoint.path)
    accelerator.wait_for_everyone()  # every process has read run.json before the main process rewrites it
    if accelerator.is_main_process:
        run_id = start_run(args.output_dir, run_id)
    run_id = broadcast_object_list([run_id])[0]
    train_log.write({'event': 'resume' if resumed_from else 'start', 'step': global_step,
                     'resumed_from': resumed_from, 'max_train_steps': args.max_train_steps,
                     'num_processes': accelerator.num_processes, 'total_batch_size': total_batch_size,
                     'layer_pairs': objective.layer_pairs, 'args': tracker_config(args)})

    progress_bar = tqdm(range(args.max_train_steps), initial=global_step, desc='Steps',
                        disable=not accelerator.is_local_main_process)
    accumulated: dict[str, torch.Tensor] = {}
    num_accumulated = 0

    for epoch in range(first_epoch, num_train_epochs):
        objective.train()  # the student; the teacher stays in eval mode
        dataloader = train_dataloader
        if epoch == first_epoch and resume_step > 0:
            dataloader = accelerator.skip_first_batches(train_dataloader, resume_step)
        dataloader.set_epoch(epoch)  # the shuffle's seed; a resumed run's loaders would count epochs from 0
        train_samples.set_epoch(epoch)
        for images, labels in batches_off_the_training_rng(dataloader):
            if global_step >= args.max_train_steps:  # e.g. resumed from a checkpoint at max_train_steps
                break
            with accelerator.accumulate(student):
                with torch.no_grad():
                    if vae is not None:
                        latents = vae.encode(images.to(weight_dtype)).latent_dist.sample()
                        latents = (latents * vae.config.scaling_factor).float()
                    else:
                        latents = images.float()
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                          device=latents.device)
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                with accelerator.autocast():  # the teacher runs in the weight dtype; the losses are float32
                    terms = objective(noisy_latents, timesteps, labels, noise=noise, latents=latents)
                terms.pop('output')

                accelerator.backward(terms['loss'])
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(student.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            for key, value in terms.items():
                accumulated[key] = accumulated.get(key, 0.0) + value.detach().float()
            num_accumulated += 1

            if accelerator.sync_gradients:
                if ema_model is not None:
                    ema_model.step(student.parameters())
                progress_bar.update(1)
                global_step += 1

                keys = sorted(accumulated)
                means = accelerator.reduce(torch.stack([accumulated[k] for k in keys]) / num_accumulated, 'mean')
                logs = dict(zip(keys, means.tolist()))
                logs['lr'] = lr_scheduler.get_last_lr()[0]
                accumulated, num_accumulated = {}, 0
                accelerator.log(logs, step=global_step)
                train_log.write({'step': global_step, 'epoch': epoch, **logs})
                progress_bar.set_postfix(loss=logs['loss'], lr=logs['lr'])

                if global_step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, args, global_step, run_id)

                if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                    model = accelerator.unwrap_model(student)
                    if ema_model is not None:
                        ema_model.store(model.parameters())
                        ema_model.copy_to(model.parameters())
                    log_validation(args, accelerator, model, vae, len(class_names), global_step)
                    if ema_model is not None:
                        ema_model.restore(model.parameters())

            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps:
            break
    progress_bar.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(student)
        if ema_model is not None:
            ema_model.copy_to(model.parameters())
        save_model_folder(args.output_dir, model, noise_scheduler, vae, class_names, image_channels)
        train_log.write({'event': 'end', 'step': global_step})
        logger.info(f'Saved the model folder to {args.output_dir}')
    objective.remove_hooks()
    accelerator.end_training()


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == '__main__':
    with user_errors(cleanup=_destroy_process_group):
        main(parse_args())
