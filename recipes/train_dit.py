#!/usr/bin/env python
"""Train a class-conditional DiT with diffusers, optionally distilled from a larger DiT with SHD.

In the style of diffusers' `examples/` training scripts (`train_text_to_image.py`, `train_unconditional.py`):
one self-contained script, underscore flags, `accelerate` for devices/precision/accumulation/checkpoints.

The objective is DiT's (Peebles & Xie, 2023) plus two distillation terms:

    L = L_diffusion(student) + output_kd_weight * MSE(student_eps, teacher_eps) + shd_weight * L_SHD

* `L_diffusion` is MSE on the predicted noise; for learned-sigma models (`out_channels == 2 * in_channels`) DiT's
  hybrid loss adds the variational bound on the variance channels, with the predicted mean detached.
* The teacher (`--shd_teacher_model_name_or_path`) is frozen and sees exactly the student's noisy inputs,
  timesteps and (dropped) class labels. `L_SHD` squeezes each distilled teacher layer's M attention maps into the
  student's N <= M maps (`shd_plugins.SHDDistiller`, forward hooks only: any attention processor works).

Data: an ImageFolder (`<train_data_dir>/<class>/<image>`), trained in latent space through a VAE
(`--pretrained_vae_model_name_or_path`) or in pixel space when no VAE is given (images in [-1, 1], as many
channels as the model's `in_channels`: 1 = grayscale, 3 = RGB).

Output (`--output_dir`): `transformer/`, `scheduler/`, `sample_config.json` (and `vae/` + `model_index.json`,
i.e. a `DiTPipeline` folder, for latent models), `checkpoint-<step>/` folders, and `train_log.jsonl` (one JSON
object per optimisation step: the loss terms and per-layer SHD losses / merge weights).

Example (the digits setting of the demo, CPU):

    accelerate launch --num_processes 1 --cpu recipes/train_dit.py \
      --train_data_dir runs/demo/data8/train --resolution 8 \
      --model_config recipes/configs/digits_dit_student_h4.json \
      --shd_teacher_model_name_or_path runs/digits_teacher \
      --train_batch_size 64 --max_train_steps 2000 --output_dir runs/digits_student_h4_shd
"""

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import diffusers
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, DDPMScheduler, DiTPipeline, DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import is_tensorboard_available
from diffusers.utils.import_utils import is_xformers_available
from PIL import Image
from torchvision import datasets, transforms
from tqdm.auto import tqdm

from shd_plugins import SHDDistiller, SHDOutput
from shd_plugins.core.losses import output_mse_loss
from shd_plugins.diffusers.sampling import resolve_transformer_folder
from shd_plugins.imagefolder import check_imagefolder

logger = get_logger(__name__, log_level='INFO')

TRAIN_LOG_NAME = 'train_log.jsonl'
SAMPLE_CONFIG_NAME = 'sample_config.json'


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
    parser.add_argument('--resume_from_checkpoint', type=str, default=None,
                        help='A checkpoint-<step> folder, or "latest" for the newest one in --output_dir.')
    parser.add_argument(
        '--sample_variance_type', type=str, default='fixed_small', choices=['fixed_small', 'learned_range'],
        help="variance_type of the saved DDPMScheduler. 'learned_range' samples with a learned-sigma model's "
             "variance (DiT's sampler; shd_plugins.sampling supports it) but DiTPipeline cannot run it, as it drops "
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
    parser.add_argument('--shd_weight', type=float, default=1.0, help='lambda_SHD; 0 disables attention KD.')
    parser.add_argument('--shd_temperature', type=float, default=1.0, help='tau of the softened attention maps.')
    parser.add_argument('--shd_layers', type=str, default='uniform',
                        help="'uniform', 'last:K' or explicit 'teacher:student' pairs such as '27:11,13:5'.")
    parser.add_argument('--shd_merge', type=str, default='shd', choices=['shd', 'mean', 'select'])
    parser.add_argument('--shd_loss', type=str, default='kl', choices=['kl', 'mse'])
    parser.add_argument('--shd_grouping', type=str, default='progressive', choices=['progressive', 'balanced'])

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
        _check_local_path(args.pretrained_vae_model_name_or_path, '--pretrained_vae_model_name_or_path', 'VAE')
    if args.shd_teacher_model_name_or_path is not None:
        _check_local_path(args.shd_teacher_model_name_or_path, '--shd_teacher_model_name_or_path', 'teacher DiT')
    if not 0.0 <= args.class_dropout_prob < 1.0:
        raise ValueError(f'--class_dropout_prob must be in [0, 1), got {args.class_dropout_prob}.')
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError(f'--checkpoints_total_limit must be >= 1, got {args.checkpoints_total_limit}.')
    if args.report_to is None:
        args.report_to = 'tensorboard' if is_tensorboard_available() else 'none'


def _looks_local(path: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else (absolute, ./, ~, deeper paths) must be a local path."""
    return (os.path.isabs(path) or path.startswith(('.', '~')) or path.count('/') > 1 or '\\' in path
            or os.path.exists(path))


def _check_local_path(path: str, flag: str, what: str) -> None:
    if _looks_local(path) and not os.path.exists(os.path.expanduser(path)):
        raise ValueError(f'{flag} {path} does not exist: give an existing local {what} folder or a hub id.')


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def read_model_config(path: str) -> dict[str, Any]:
    """A DiTTransformer2DModel config from JSON, without comment keys (a leading '_', except `_class_name`)."""
    try:
        config = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f'--model_config {path} is not valid JSON ({e}).') from e
    class_name = config.get('_class_name', 'DiTTransformer2DModel')
    if class_name != 'DiTTransformer2DModel':
        raise ValueError(f'--model_config {path} describes a {class_name}; this script trains DiTTransformer2DModel.')
    return {k: v for k, v in config.items() if not k.startswith('_')}


def load_transformer(name_or_path: str, flag: str, revision: str | None = None) -> DiTTransformer2DModel:
    """A DiT from a model folder (`transformer/` inside), a transformer folder, or a hub id with `transformer/`."""
    local = Path(os.path.expanduser(name_or_path))
    if local.is_dir():
        try:
            transformer_folder, _ = resolve_transformer_folder(local)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f'{flag} {name_or_path}: {e}') from None
        return DiTTransformer2DModel.from_pretrained(transformer_folder)
    _check_local_path(name_or_path, flag, 'DiT')
    try:
        return DiTTransformer2DModel.from_pretrained(name_or_path, subfolder='transformer', revision=revision)
    except (OSError, ValueError) as e:
        raise ValueError(
            f'{flag} {name_or_path}: no such local folder, and no DiT transformer could be loaded from the hub under '
            f'that id ({str(e).splitlines()[0]}).') from e


def load_vae(name_or_path: str, revision: str | None = None) -> AutoencoderKL:
    """An AutoencoderKL from a VAE folder, a pipeline folder with `vae/`, or a hub id."""
    flag = '--pretrained_vae_model_name_or_path'
    local = Path(os.path.expanduser(name_or_path))
    if local.is_dir():
        if (local / 'vae' / 'config.json').is_file():
            return AutoencoderKL.from_pretrained(local, subfolder='vae')
        if (local / 'config.json').is_file():
            return AutoencoderKL.from_pretrained(local)
        raise ValueError(
            f'{flag} {name_or_path} has no config.json (nor vae/config.json): not an AutoencoderKL folder.')
    _check_local_path(name_or_path, flag, 'VAE')
    errors = []
    for subfolder in (None, 'vae'):
        try:
            return AutoencoderKL.from_pretrained(name_or_path, subfolder=subfolder, revision=revision)
        except (OSError, ValueError) as e:
            errors.append(str(e).splitlines()[0])
    raise ValueError(
        f"{flag} {name_or_path}: no such local folder, and no AutoencoderKL could be loaded from the hub under that "
        f"id ({'; '.join(errors)}). Give a local folder with config.json, or a hub id such as "
        f"stabilityai/sd-vae-ft-ema.")


def initialize_dit_weights(model: DiTTransformer2DModel) -> None:
    """DiT's `initialize_weights`: xavier-uniform linears, normal(0.02) embeddings, adaLN-Zero.

    Zeroing the adaLN modulations and the output layer makes every block the identity at step 0, which DiT found
    to train markedly better than PyTorch's default init.
    """
    def basic_init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    model.apply(basic_init)
    proj = model.pos_embed.proj
    nn.init.xavier_uniform_(proj.weight.data.view(proj.weight.shape[0], -1))
    nn.init.zeros_(proj.bias)
    for block in model.transformer_blocks:
        emb = block.norm1.emb  # diffusers keeps one timestep/label embedder per block
        nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def disable_builtin_label_dropout(model: nn.Module) -> None:
    """Stop diffusers' DiT from dropping labels by itself in train mode.

    Each diffusers DiT block owns a `LabelEmbedding` that, in train mode, independently replaces labels by the null
    class with probability 0.1. That makes the blocks disagree on the label and hides the dropped labels from the
    teacher (in eval mode). The script drops labels once, explicitly, and hands the same labels to both models.
    """
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0


def learns_sigma(model: DiTTransformer2DModel) -> bool:
    """DiT's learned-sigma layout: `out_channels == 2 * in_channels` (eps channels first, then the variance)."""
    in_channels, out_channels = model.config.in_channels, model.config.out_channels or model.config.in_channels
    if out_channels == in_channels:
        return False
    if out_channels == 2 * in_channels:
        return True
    raise ValueError(
        f'out_channels={out_channels} must be in_channels ({in_channels}) or 2 * in_channels (learned sigma).')


def num_tokens(config: Any, input_size: int) -> tuple[int, str]:
    """Tokens a DiT makes from `input_size` inputs, and the formula (for error messages)."""
    side = input_size // config.patch_size
    return side * side, f'({input_size} / patch_size {config.patch_size})^2 = {side * side}'


def check_student_matches_data(student: DiTTransformer2DModel, input_size: int, input_channels: int,
                               num_classes: int, space: str) -> None:
    config = student.config
    if config.sample_size != input_size:
        raise ValueError(
            f"The student's sample_size is {config.sample_size} but the {space} inputs are {input_size}x{input_size}"
            f": set sample_size={input_size} in the model config or change --resolution.")
    if input_size % config.patch_size:
        raise ValueError(f"sample_size {input_size} is not divisible by the student's patch_size {config.patch_size}.")
    if config.in_channels != input_channels:
        raise ValueError(
            f'The student has in_channels={config.in_channels} but the {space} inputs have {input_channels} '
            f'channels: set in_channels={input_channels} (and out_channels={2 * input_channels} for learned sigma).')
    if config.num_embeds_ada_norm is None:
        raise ValueError('The student is not class-conditional: set num_embeds_ada_norm to the number of classes.')
    if num_classes > config.num_embeds_ada_norm:
        raise ValueError(
            f'--train_data_dir has {num_classes} classes but the student embeds only num_embeds_ada_norm='
            f'{config.num_embeds_ada_norm}: raise num_embeds_ada_norm to >= {num_classes}.')


def check_teacher_compatible(teacher: DiTTransformer2DModel, student: DiTTransformer2DModel) -> None:
    """The teacher must accept the student's exact inputs and produce attention maps over the same tokens."""
    t, s = teacher.config, student.config
    input_size = s.sample_size
    t_tokens, t_formula = num_tokens(t, t.sample_size)
    s_tokens, s_formula = num_tokens(s, input_size)
    if t.sample_size != s.sample_size or t.patch_size != s.patch_size:
        raise ValueError(
            f'Teacher and student see different token grids: teacher sample_size={t.sample_size}, patch_size='
            f'{t.patch_size} gives {t_formula} tokens; student sample_size={s.sample_size}, patch_size={s.patch_size}'
            f' gives {s_formula}. Both get the same noisy {input_size}x{input_size} inputs and SHD compares '
            f'token-by-token maps, so use a teacher trained at sample_size={s.sample_size} with patch_size='
            f'{s.patch_size} (or change the student config to match the teacher).')
    if t.in_channels != s.in_channels:
        raise ValueError(
            f"Teacher in_channels={t.in_channels} differs from the student's {s.in_channels}: they must denoise "
            f"the same inputs (same VAE latents or same image channels).")
    if t.num_embeds_ada_norm != s.num_embeds_ada_norm:
        raise ValueError(
            f"Teacher num_embeds_ada_norm={t.num_embeds_ada_norm} differs from the student's {s.num_embeds_ada_norm}:"
            f" the null (dropped) class id is num_embeds_ada_norm, so both must use the same class set.")


# ----------------------------------------------------------------------------------------------------------------
# DiT's hybrid loss (learned sigma)
# ----------------------------------------------------------------------------------------------------------------


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _discretized_gaussian_log_likelihood(
        x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] discretised to 256 bins (ADM/DiT `discretized_gaussian_log_likelihood`)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class LearnedSigmaVLB:
    """DiT's variational-bound term for learned-range variances (`GaussianDiffusion._vb_terms_bpd`).

    DiT's `training_losses` with `LEARNED_RANGE` variance adds this term to the eps MSE, feeding it the predicted
    eps *detached*, so the bound trains only the variance channels (Nichol & Dhariwal's hybrid loss). Returns bits
    per dimension for each sample: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, the decoder NLL at t = 0.
    Schedule constants are computed in float64 from the scheduler's betas, as DiT does.
    """

    def __init__(self, betas: torch.Tensor):
        betas = betas.double()
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.tables = {
            'posterior_log_variance_clipped': torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
            'log_betas': torch.log(betas),
            'posterior_mean_coef1': betas * torch.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            'posterior_mean_coef2': (1.0 - alphas_cumprod_prev) * torch.sqrt(alphas) / (1.0 - alphas_cumprod),
            'sqrt_recip_alphas_cumprod': torch.sqrt(1.0 / alphas_cumprod),
            'sqrt_recipm1_alphas_cumprod': torch.sqrt(1.0 / alphas_cumprod - 1.0),
        }
        self._device_tables: dict[torch.device, dict[str, torch.Tensor]] = {}

    def _extract(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        tables = self._device_tables.get(t.device)
        if tables is None:
            tables = {k: v.float().to(t.device) for k, v in self.tables.items()}
            self._device_tables[t.device] = tables
        return tables[name][t].view(-1, *([1] * (ndim - 1)))

    def __call__(self, eps: torch.Tensor, var_values: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor,
                 t: torch.Tensor) -> torch.Tensor:
        eps, var_values, x_start, x_t = eps.float(), var_values.float(), x_start.float(), x_t.float()
        ex = lambda name: self._extract(name, t, x_t.ndim)  # noqa: E731
        coef1, coef2 = ex('posterior_mean_coef1'), ex('posterior_mean_coef2')
        true_mean = coef1 * x_start + coef2 * x_t
        true_log_variance = ex('posterior_log_variance_clipped')
        # p(x_{t-1} | x_t): the variance interpolates (in log space) between the posterior's and beta_t.
        frac = (var_values + 1.0) / 2.0
        model_log_variance = frac * ex('log_betas') + (1.0 - frac) * true_log_variance
        pred_x_start = ex('sqrt_recip_alphas_cumprod') * x_t - ex('sqrt_recipm1_alphas_cumprod') * eps
        model_mean = coef1 * pred_x_start + coef2 * x_t

        kl = 0.5 * (-1.0 + model_log_variance - true_log_variance + torch.exp(true_log_variance - model_log_variance)
                    + (true_mean - model_mean) ** 2 * torch.exp(-model_log_variance))
        kl = kl.mean(dim=tuple(range(1, kl.ndim))) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_log_variance)
        nll = nll.mean(dim=tuple(range(1, nll.ndim))) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


def drop_class_labels(labels: torch.Tensor, prob: float, null_class: int) -> torch.Tensor:
    """DiT's label dropout: each label becomes the null class with probability `prob`."""
    if prob <= 0:
        return labels
    drop = torch.rand(labels.shape[0], device=labels.device) < prob
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def shd_log_tensors(output: SHDOutput, prefix: str = 'shd') -> dict[str, torch.Tensor]:
    """`SHDOutput.log_dict` as detached tensors, so logging does not sync the device every micro-step."""
    logs = {f'{prefix}_loss': output.loss.detach()}
    for (t, s), value in output.layer_losses.items():
        logs[f'{prefix}_loss/t{t}_s{s}'] = value.detach()
        alpha = output.alphas[(t, s)]
        if alpha.numel():
            logs[f'{prefix}_alpha_mean/t{t}_s{s}'] = alpha.float().mean()
            logs[f'{prefix}_alpha_std/t{t}_s{s}'] = alpha.float().std(unbiased=False)
    return logs


# ----------------------------------------------------------------------------------------------------------------
# Data and saving
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
    train_transforms = transforms.Compose(steps)
    dataset = datasets.ImageFolder(args.train_data_dir, transform=train_transforms)
    if args.max_train_samples is not None:
        generator = torch.Generator().manual_seed(args.seed or 0)
        keep = torch.randperm(len(dataset), generator=generator)[: args.max_train_samples].tolist()
        dataset.samples = [dataset.samples[i] for i in sorted(keep)]
        dataset.targets = [s[1] for s in dataset.samples]
        dataset.imgs = dataset.samples
    return dataset


def make_noise_scheduler(variance_type: str = 'fixed_small') -> DDPMScheduler:
    """DiT's diffusion: 1000 steps, linear betas 1e-4..0.02, eps prediction, no x0 clipping."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule='linear', beta_start=1e-4, beta_end=0.02,
                         clip_sample=False, prediction_type='epsilon', variance_type=variance_type)


def save_model_folder(output_dir: str, transformer: DiTTransformer2DModel, scheduler: DDPMScheduler,
                      vae: AutoencoderKL | None, class_names: list[str], image_channels: int) -> None:
    """The layout `shd_plugins.sampling` / `eval/fid.py` read; with a VAE also a `DiTPipeline` folder.

    `DiTPipeline` hard-codes the null class id 1000 for guidance, so guided sampling through it is only right for
    ImageNet's 1000 classes; `shd_plugins.sampling` uses `num_embeds_ada_norm` and reads both layouts.
    """
    if vae is not None:
        id2label = {i: name for i, name in enumerate(class_names)}
        pipeline = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
        pipeline.save_pretrained(output_dir)
    else:  # DiTPipeline requires a VAE: save the parts it would
        transformer.save_pretrained(os.path.join(output_dir, 'transformer'))
        scheduler.save_pretrained(os.path.join(output_dir, 'scheduler'))
    write_sample_config(output_dir, class_names, vae is None, image_channels)


def write_sample_config(output_dir: str, class_names: list[str], pixel_space: bool, image_channels: int) -> None:
    """What the sampler cannot read from the transformer: classes to draw, pixel vs latent space, image channels."""
    sample_config = {'num_classes': len(class_names), 'pixel_space': pixel_space, 'image_channels': image_channels,
                     'class_names': class_names}
    Path(output_dir, SAMPLE_CONFIG_NAME).write_text(json.dumps(sample_config, indent=2) + '\n')


def find_checkpoint(output_dir: str, which: str) -> str | None:
    """The path of a `checkpoint-<step>` folder; "latest" picks the highest step (None when there is none)."""
    if which != 'latest':
        path = which if os.path.isdir(which) else os.path.join(output_dir, which)
        if not os.path.isdir(path):
            raise ValueError(f'--resume_from_checkpoint {which}: no such checkpoint folder (looked in {path}).')
        return path
    dirs = [d for d in os.listdir(output_dir) if d.startswith('checkpoint-')] if os.path.isdir(output_dir) else []
    dirs = sorted(dirs, key=lambda d: int(d.split('-')[1]))
    return os.path.join(output_dir, dirs[-1]) if dirs else None


def prune_checkpoints(output_dir: str, limit: int | None) -> None:
    """Before saving a new checkpoint keep at most `limit - 1` old ones (diffusers examples' convention)."""
    if limit is None:
        return
    checkpoints = sorted((d for d in os.listdir(output_dir) if d.startswith('checkpoint-')),
                         key=lambda d: int(d.split('-')[1]))
    if len(checkpoints) >= limit:
        removing = checkpoints[: len(checkpoints) - limit + 1]
        logger.info(f"{len(checkpoints)} checkpoints exist, removing {len(removing)}: {', '.join(removing)}")
        for name in removing:
            shutil.rmtree(os.path.join(output_dir, name))


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

    from shd_plugins.diffusers.sampling import sample_class_conditional

    was_training = transformer.training
    transformer.eval()
    generator = torch.Generator('cpu').manual_seed(args.seed or 0)
    labels = torch.arange(args.num_validation_images) % num_classes
    images = sample_class_conditional(
        transformer, make_noise_scheduler(args.sample_variance_type), labels, vae=vae,
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
        student = load_transformer(args.pretrained_model_name_or_path, '--pretrained_model_name_or_path', args.revision)
    learned_sigma = learns_sigma(student)
    if args.sample_variance_type == 'learned_range' and not learned_sigma:
        raise ValueError('--sample_variance_type learned_range needs a learned-sigma model (out_channels = 2 * in).')

    vae = None
    if args.pretrained_vae_model_name_or_path is not None:
        vae = load_vae(args.pretrained_vae_model_name_or_path, args.revision)
    if vae is not None:
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
    null_class = student.config.num_embeds_ada_norm

    teacher, distiller = None, None
    if args.shd_teacher_model_name_or_path is not None:
        teacher = load_transformer(args.shd_teacher_model_name_or_path, '--shd_teacher_model_name_or_path',
                                   args.revision)
        check_teacher_compatible(teacher, student)
        teacher.requires_grad_(False)
        teacher.eval()
        if args.shd_weight > 0:
            distiller = SHDDistiller(
                teacher, student, layers=args.shd_layers, temperature=args.shd_temperature, weight=args.shd_weight,
                merge=args.shd_merge, loss=args.shd_loss, grouping=args.shd_grouping)
            logger.info(f'SHD layer pairs (teacher, student): {distiller.layer_pairs}')
        if args.shd_weight <= 0 and args.output_kd_weight <= 0:
            logger.warning('A teacher was given but --shd_weight and --output_kd_weight are 0: it is unused.')
            teacher = None

    disable_builtin_label_dropout(student)
    student.train()
    if vae is not None:
        vae.requires_grad_(False)
        vae.eval()
    noise_scheduler = make_noise_scheduler(args.sample_variance_type)
    vlb = LearnedSigmaVLB(noise_scheduler.betas) if learned_sigma else None

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
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset, shuffle=True, batch_size=args.train_batch_size, num_workers=args.dataloader_num_workers,
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
                f'{args.shd_weight if distiller is not None else 0}')

    if args.seed is not None:  # distinct noise/timesteps/dropout per process; a resume restores these RNG states
        set_seed(args.seed + accelerator.process_index)
    global_step, first_epoch, resume_step, resumed_from = 0, 0, 0, None
    if args.resume_from_checkpoint:
        path = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
        if path is None:
            accelerator.print(f"No checkpoint '{args.resume_from_checkpoint}' in {args.output_dir}. "
                              f"Starting a new training run.")
            args.resume_from_checkpoint = None
        else:
            accelerator.print(f'Resuming from checkpoint {path}')
            accelerator.load_state(path)
            global_step = int(os.path.basename(os.path.normpath(path)).split('-')[1])
            first_epoch = global_step // num_update_steps_per_epoch
            resume_step = (global_step % num_update_steps_per_epoch) * args.gradient_accumulation_steps
            resumed_from = path
    train_log.write({'event': 'resume' if resumed_from else 'start', 'step': global_step,
                     'resumed_from': resumed_from, 'max_train_steps': args.max_train_steps,
                     'num_processes': accelerator.num_processes, 'total_batch_size': total_batch_size,
                     'layer_pairs': distiller.layer_pairs if distiller is not None else [],
                     'args': tracker_config(args)})

    progress_bar = tqdm(range(args.max_train_steps), initial=global_step, desc='Steps',
                        disable=not accelerator.is_local_main_process)
    accumulated: dict[str, torch.Tensor] = {}
    num_accumulated = 0

    for epoch in range(first_epoch, num_train_epochs):
        student.train()
        dataloader = train_dataloader
        if epoch == first_epoch and resume_step > 0:
            dataloader = accelerator.skip_first_batches(train_dataloader, resume_step)
        for images, labels in dataloader:
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
                labels = drop_class_labels(labels, args.class_dropout_prob, null_class)

                teacher_output = None
                with distiller.recording() if distiller is not None else contextlib.nullcontext():
                    if teacher is not None:  # the same noisy inputs, timesteps and dropped labels as the student
                        with accelerator.autocast(), torch.no_grad():
                            teacher_output = teacher(noisy_latents.to(weight_dtype), timestep=timesteps,
                                                     class_labels=labels).sample
                    model_output = student(noisy_latents, timestep=timesteps, class_labels=labels).sample

                channels = latents.shape[1]
                eps = model_output[:, :channels]
                terms = {'mse': F.mse_loss(eps.float(), noise.float())}
                diffusion_loss = terms['mse']
                if vlb is not None:
                    variance = model_output[:, channels:]  # the bound trains the variance only: eps is detached
                    terms['vb'] = vlb(eps.detach(), variance, latents, noisy_latents, timesteps).mean()
                    diffusion_loss = diffusion_loss + terms['vb']
                terms['diffusion_loss'] = diffusion_loss
                loss = diffusion_loss
                if teacher_output is not None and args.output_kd_weight > 0:
                    terms['output_kd_loss'] = output_mse_loss(eps, teacher_output[:, :channels])
                    loss = loss + args.output_kd_weight * terms['output_kd_loss']
                if distiller is not None:
                    shd = distiller.compute_loss()
                    terms.update(shd_log_tensors(shd))
                    loss = loss + shd.loss
                terms['loss'] = loss

                accelerator.backward(loss)
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
                    if accelerator.is_main_process:
                        prune_checkpoints(args.output_dir, args.checkpoints_total_limit)
                    accelerator.wait_for_everyone()
                    save_path = os.path.join(args.output_dir, f'checkpoint-{global_step}')
                    accelerator.save_state(save_path)
                    logger.info(f'Saved state to {save_path}')

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
    if distiller is not None:
        distiller.remove()
    accelerator.end_training()


if __name__ == '__main__':
    main(parse_args())
