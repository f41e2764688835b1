"""Class-conditional sampling from a trained diffusers DiT, following DiT's FID-50K protocol.

`sample_class_conditional` is `diffusers.DiTPipeline.__call__` written as a function, so the same loop serves
latent-space DiTs (decoded by an `AutoencoderKL`) and pixel-space DiTs (no VAE, e.g. the digits demo), with any
diffusers scheduler. It differs from the pipeline in three deliberate ways, none of which changes its output for
the same random draws:

* the null (unconditional) class id is `transformer.config.num_embeds_ada_norm` (the pipeline hard-codes 1000,
  which is only right for ImageNet);
* the generator is also handed to `scheduler.step` when the scheduler takes one, so stochastic samplers (DDPM)
  are reproducible from the generator alone; with `generator=None` both draw from the global RNG identically;
* a `DDPMScheduler` configured with `variance_type="learned"/"learned_range"` receives the learned-sigma channels
  (DiT's own sampler uses them); the pipeline would crash on such a config.

`generate_samples` adds the protocol around it, as DiT's `sample_ddp.py`: fixed class labels, one generator per
rank seeded `seed * world_size + rank`, batches split over `accelerate` processes and gathered in order.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
)
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from .model_folder import DiTComponents

__all__ = [
    'SCHEDULERS',
    'build_scheduler',
    'class_labels_for_protocol',
    'generate_samples',
    'rank_seed',
    'sample_class_conditional',
    'to_uint8_images',
]

SCHEDULERS: dict[str, type] = {
    'ddpm': DDPMScheduler,
    'ddim': DDIMScheduler,
    'dpm': DPMSolverMultistepScheduler,
}
_LEARNED_VARIANCE_TYPES = ('learned', 'learned_range')


def build_scheduler(name: str, config: Any) -> Any:
    """Builds the sampling scheduler `name` (ddpm, ddim, dpm) from the trained scheduler's config.

    DPM-Solver reads `variance_type="learned*"` as "keep the first 3 channels" (a DeepFloyd-IF convention), which
    breaks 4-channel latents, so the learned variance is dropped for it; DDIM ignores the field.
    """
    if name not in SCHEDULERS:
        raise ValueError(f'Unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}.')
    overrides: dict[str, Any] = {}
    if name == 'dpm' and config.get('variance_type') in _LEARNED_VARIANCE_TYPES:
        overrides['variance_type'] = None
    return SCHEDULERS[name].from_config(config, **overrides)


# --------------------------------------------------------------------------------------------------------------
# The sampling loop (DiTPipeline.__call__)
# --------------------------------------------------------------------------------------------------------------


def to_uint8_images(samples: torch.Tensor) -> torch.Tensor:
    """[-1, 1] NCHW -> uint8 NHWC on CPU, rounding as `DiffusionPipeline.numpy_to_pil` does."""
    samples = (samples / 2 + 0.5).clamp(0, 1)
    samples = samples.cpu().permute(0, 2, 3, 1).float()
    return (samples * 255).round().to(torch.uint8)


def _step_accepts_generator(scheduler: Any) -> bool:
    return 'generator' in inspect.signature(scheduler.step).parameters


def _uses_learned_variance(scheduler: Any) -> bool:
    return isinstance(scheduler, DDPMScheduler) and scheduler.config.variance_type in _LEARNED_VARIANCE_TYPES


def _timesteps_for(t: Any, model_input: torch.Tensor) -> torch.Tensor:
    """The scheduler's timestep as a batch tensor, converted exactly as DiTPipeline does."""
    if not torch.is_tensor(t):
        dtype = torch.float64 if isinstance(t, float) else torch.int64
        if model_input.device.type in ('mps', 'npu'):
            dtype = torch.float32 if isinstance(t, float) else torch.int32
        t = torch.tensor([t], dtype=dtype, device=model_input.device)
    elif t.dim() == 0:
        t = t[None].to(model_input.device)
    return t.expand(model_input.shape[0])


def _apply_guidance(noise_pred: torch.Tensor, latent_channels: int, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance on the eps channels only; the learned-sigma channels pass through (as DiT)."""
    eps, rest = noise_pred[:, :latent_channels], noise_pred[:, latent_channels:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
    eps = torch.cat([half_eps, half_eps], dim=0)
    return torch.cat([eps, rest], dim=1)


@torch.no_grad()
def sample_class_conditional(
    transformer: DiTTransformer2DModel,
    scheduler: Any,
    class_labels: Sequence[int] | torch.Tensor,
    *,
    vae: AutoencoderKL | None = None,
    guidance_scale: float = 1.5,
    num_inference_steps: int = 250,
    generator: torch.Generator | list[torch.Generator] | None = None,
    latent_size: int | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Samples one image per class label, as `DiTPipeline.__call__` (see the module docstring for differences).

    Args:
        transformer: Class-conditional DiT; its `num_embeds_ada_norm` is the null class id for guidance.
        scheduler: Any diffusers scheduler (DDPM for the DiT protocol; DDIM/DPM-Solver for fewer steps).
        class_labels: One class id per image.
        vae: Decoder for latent-space models; `None` means the transformer denoises pixels in [-1, 1].
        guidance_scale: Classifier-free guidance scale; `<= 1` disables guidance (no batch doubling).
        num_inference_steps: Denoising steps.
        generator: Source of the initial noise and of the scheduler's noise; `None` uses the global RNG.
        latent_size: Spatial size of the latents (default: `transformer.config.sample_size`).
        progress: Show a progress bar over the denoising steps.

    Returns:
        uint8 images, NHWC, on CPU.
    """
    device = transformer.device
    batch_size = len(class_labels)
    latent_size = latent_size or transformer.config.sample_size
    latent_channels = transformer.config.in_channels
    use_cfg = guidance_scale > 1
    null_class = transformer.config.num_embeds_ada_norm

    latents = randn_tensor(
        shape=(batch_size, latent_channels, latent_size, latent_size),
        generator=generator,
        device=device,
        dtype=transformer.dtype,
    )
    latent_model_input = torch.cat([latents] * 2) if use_cfg else latents

    class_labels = torch.as_tensor(class_labels, device=device).reshape(-1)
    class_null = torch.tensor([null_class] * batch_size, device=device)
    class_labels_input = torch.cat([class_labels, class_null], 0) if use_cfg else class_labels

    step_kwargs = {'generator': generator} if _step_accepts_generator(scheduler) else {}
    keep_learned_variance = _uses_learned_variance(scheduler)
    learned_sigma = transformer.config.out_channels // 2 == latent_channels

    scheduler.set_timesteps(num_inference_steps)
    for t in tqdm(scheduler.timesteps, disable=not progress, desc='Denoising', leave=False):
        if use_cfg:
            half = latent_model_input[: len(latent_model_input) // 2]
            latent_model_input = torch.cat([half, half], dim=0)
        latent_model_input = scheduler.scale_model_input(latent_model_input, t)

        timesteps = _timesteps_for(t, latent_model_input)
        noise_pred = transformer(latent_model_input, timestep=timesteps, class_labels=class_labels_input).sample
        if use_cfg:
            noise_pred = _apply_guidance(noise_pred, latent_channels, guidance_scale)

        if learned_sigma and not keep_learned_variance:
            model_output, _ = torch.split(noise_pred, latent_channels, dim=1)
        else:
            model_output = noise_pred
        latent_model_input = scheduler.step(model_output, t, latent_model_input, **step_kwargs).prev_sample

    latents = latent_model_input.chunk(2, dim=0)[0] if use_cfg else latent_model_input
    if vae is None:
        return to_uint8_images(latents)
    latents = 1 / vae.config.scaling_factor * latents
    return to_uint8_images(vae.decode(latents.to(vae.dtype)).sample)


# --------------------------------------------------------------------------------------------------------------
# The FID-50K protocol
# --------------------------------------------------------------------------------------------------------------


def rank_seed(seed: int, rank: int, world_size: int) -> int:
    """Per-rank seed of DiT's `sample_ddp.py`: distinct across ranks, fixed for a given world size."""
    return seed * world_size + rank


def class_labels_for_protocol(num_samples: int, num_classes: int, *, mode: str = 'even', seed: int = 0) -> np.ndarray:
    """Class label of every sample.

    Args:
        num_samples: Total samples.
        num_classes: Labels are drawn from `range(num_classes)`.
        mode: `even` cycles through the classes (50 per class for 50k ImageNet samples, the balanced set FID
            references are made of); `random` draws uniformly with `seed` (DiT's `sample_ddp.py`).
        seed: Seed for `random`.
    """
    if mode == 'even':
        return np.arange(num_samples, dtype=np.int64) % num_classes
    if mode == 'random':
        return np.random.default_rng(seed).integers(0, num_classes, size=num_samples, dtype=np.int64)
    raise ValueError(f"Unknown class label mode {mode!r}; use 'even' or 'random'.")


def _rounds(num_samples: int, batch_size: int, world_size: int) -> list[tuple[int, int, int]]:
    """Splits the samples into rounds of `(start, round_size, per_rank_batch)`.

    In one round every rank generates `per_rank_batch` images for the contiguous global indices
    `start + rank * per_rank_batch + j`; gathering (rank-major) then restores the global order. Only the last
    round is smaller, padded to a multiple of the world size (the padding is generated and dropped).
    """
    rounds = []
    start = 0
    while start < num_samples:
        size = min(batch_size * world_size, num_samples - start)
        rounds.append((start, size, math.ceil(size / world_size)))
        start += size
    return rounds


def generate_samples(
    components: DiTComponents,
    num_samples: int,
    *,
    batch_size: int,
    seed: int,
    guidance_scale: float,
    num_inference_steps: int,
    scheduler_name: str = 'ddpm',
    class_ids: Sequence[int] | np.ndarray | None = None,
    class_label_mode: str = 'even',
    accelerator: Any | None = None,
    gather_on_all_ranks: bool = False,
) -> np.ndarray:
    """Generates `num_samples` class-conditional images with DiT's FID protocol.

    Args:
        components: From `load_dit_components`.
        num_samples: Total images over all ranks.
        batch_size: Images per forward batch on each rank (doubled internally by guidance).
        seed: Global seed; rank `r` of `W` uses `seed * W + r`, so results depend on the number of processes.
        guidance_scale: Classifier-free guidance scale (DiT's FID-50K: 1.5).
        num_inference_steps: Denoising steps (DiT's FID-50K: 250 DDPM steps).
        scheduler_name: `ddpm`, `ddim` or `dpm`, built from the trained scheduler's config.
        class_ids: Explicit label per sample (length `num_samples`); overrides `class_label_mode`.
        class_label_mode: `even` or `random`, see `class_labels_for_protocol`.
        accelerator: An `accelerate.Accelerator`; its processes split the work. `None` means one process.
        gather_on_all_ranks: Return every image on every rank; otherwise non-main ranks return an empty array
            (50k 256px images are ~10 GB, which every rank need not hold).

    Returns:
        uint8 NHWC images in label order (on the main rank, or all ranks with `gather_on_all_ranks`).
    """
    if num_samples <= 0 or batch_size <= 0:
        raise ValueError(f'num_samples ({num_samples}) and batch_size ({batch_size}) must be positive.')
    if class_ids is None:
        labels = class_labels_for_protocol(num_samples, components.num_classes, mode=class_label_mode, seed=seed)
    else:
        labels = np.asarray(class_ids, dtype=np.int64).reshape(-1)
        if len(labels) != num_samples:
            raise ValueError(f'class_ids has {len(labels)} labels for num_samples={num_samples}; give one per sample.')
        if labels.min() < 0 or labels.max() >= components.num_classes:
            raise ValueError(
                f'class_ids must lie in [0, {components.num_classes}); got {labels.min()}..{labels.max()}.'
            )

    world_size = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    is_main = rank == 0
    device = accelerator.device if accelerator is not None else components.transformer.device
    if accelerator is not None:
        components.transformer.to(device)
        if components.vae is not None:
            components.vae.to(device)

    scheduler = build_scheduler(scheduler_name, components.scheduler.config)
    generator = torch.Generator('cpu').manual_seed(rank_seed(seed, rank, world_size))

    kept: list[np.ndarray] = []
    with tqdm(total=num_samples, disable=not is_main, desc='Sampling', unit='img') as bar:
        for start, size, per_rank in _rounds(num_samples, batch_size, world_size):
            first = start + rank * per_rank
            batch_labels = labels[np.minimum(np.arange(first, first + per_rank), num_samples - 1)]
            images = sample_class_conditional(
                components.transformer,
                scheduler,
                torch.from_numpy(batch_labels),
                vae=components.vae,
                guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps,
                generator=generator,
                progress=False,
            )
            if accelerator is not None and world_size > 1:
                images = accelerator.gather(images.to(device).contiguous()).cpu()
            if is_main or gather_on_all_ranks:
                kept.append(images[:size].numpy())
            bar.update(size)

    if not kept:
        return np.zeros((0, components.image_size, components.image_size, components.image_channels), np.uint8)
    return np.concatenate(kept, axis=0)
