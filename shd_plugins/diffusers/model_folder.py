"""The trained-model folder: what training writes and what sampling and FID read.

Layout (``save_model_folder`` / ``load_dit_components``)::

    <folder>/transformer/          DiTTransformer2DModel.save_pretrained (required)
    <folder>/scheduler/            the training scheduler (else DiT's default DDPM schedule)
    <folder>/vae/, model_index.json  latent-space models: also a DiTPipeline folder
    <folder>/sample_config.json    what the transformer does not say: num_classes, pixel_space, image_channels
    <folder>/checkpoint-<step>/    resumable training states (each also holds transformer/, scheduler/ and
                                   sample_config.json, so a checkpoint can be sampled too; see ``checkpoints``)

``DiTPipeline`` can load a latent model folder, but it hard-codes the null class id 1000 for guidance (right for
ImageNet only) and needs a VAE; :func:`~shd_plugins.diffusers.sample_class_conditional` reads both layouts.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel

from .losses import default_dit_scheduler
from .models import load_vae, read_json, resolve_transformer_folder

__all__ = [
    'SAMPLE_CONFIG_NAME',
    'DiTComponents',
    'load_dit_components',
    'save_model_folder',
    'write_sample_config',
]

_logger = logging.getLogger(__name__)

SAMPLE_CONFIG_NAME = 'sample_config.json'


@dataclass
class DiTComponents:
    """What sampling needs from a trained model folder.

    Attributes:
        transformer: The class-conditional denoiser.
        scheduler: The scheduler it was trained with (its config seeds DDPM/DDIM/DPM-Solver at sampling time).
        vae: Decoder for latent-space models; ``None`` for pixel-space models.
        num_classes: Labels to sample from (``< num_embeds_ada_norm`` when only a subset should be drawn).
        pixel_space: Whether the transformer denoises pixels directly.
        image_channels: Channels of the decoded images (1 for grayscale pixel-space models).
    """

    transformer: DiTTransformer2DModel
    scheduler: Any
    vae: AutoencoderKL | None
    num_classes: int
    pixel_space: bool
    image_channels: int

    @property
    def latent_size(self) -> int:
        return int(self.transformer.config.sample_size)

    @property
    def image_size(self) -> int:
        """Side of the generated images: the latent side times the VAE's upsampling factor."""
        if self.vae is None:
            return self.latent_size
        return self.latent_size * 2 ** (len(self.vae.config.block_out_channels) - 1)


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------


def write_sample_config(output_dir: str | Path, class_names: list[str], pixel_space: bool,
                        image_channels: int) -> None:
    """What the sampler cannot read from the transformer: classes to draw, pixel vs latent space, image channels."""
    sample_config = {'num_classes': len(class_names), 'pixel_space': pixel_space, 'image_channels': image_channels,
                     'class_names': class_names}
    Path(output_dir, SAMPLE_CONFIG_NAME).write_text(json.dumps(sample_config, indent=2) + '\n')


def save_model_folder(output_dir: str | Path, transformer: DiTTransformer2DModel, scheduler: Any,
                      vae: AutoencoderKL | None, class_names: list[str], image_channels: int) -> None:
    """Write the model folder :func:`load_dit_components` reads; with a VAE it is also a ``DiTPipeline`` folder."""
    if vae is not None:
        id2label = {i: name for i, name in enumerate(class_names)}
        pipeline = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
        pipeline.save_pretrained(output_dir)
    else:  # DiTPipeline requires a VAE: save the parts it would
        transformer.save_pretrained(os.path.join(output_dir, 'transformer'))
        scheduler.save_pretrained(os.path.join(output_dir, 'scheduler'))
    write_sample_config(output_dir, class_names, vae is None, image_channels)


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


def _load_scheduler(model_folder: Path | None) -> Any:
    """The scheduler saved with the model, else DiT's default DDPM schedule."""
    folder = model_folder / 'scheduler' if model_folder is not None else None
    if folder is None or not folder.is_dir():
        return default_dit_scheduler()
    config_file = folder / 'scheduler_config.json'
    if not config_file.is_file():
        raise FileNotFoundError(f'{folder} exists but has no scheduler_config.json (save it with save_pretrained).')
    class_name = read_json(config_file).get('_class_name', 'DDPMScheduler')
    scheduler_cls = getattr(diffusers, class_name, None)
    if scheduler_cls is None:
        raise ValueError(f'{config_file} names scheduler class {class_name!r}, which diffusers does not provide.')
    return scheduler_cls.from_pretrained(folder)


def _find_vae(vae_path: str | Path | None, model_folder: Path | None,
              dtype: torch.dtype | None) -> AutoencoderKL | None:
    if vae_path is not None:
        return load_vae(vae_path, dtype=dtype, flag='VAE path')
    if model_folder is not None and (model_folder / 'vae' / 'config.json').is_file():
        return load_vae(model_folder / 'vae', dtype=dtype)
    return None


def load_dit_components(
        path: str | Path,
        vae_path: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
) -> DiTComponents:
    """Loads a trained DiT folder for sampling.

    Layout: ``<path>/transformer/`` (required), ``<path>/scheduler/`` (else DiT's DDPM defaults), ``<path>/vae/`` or
    ``vae_path`` (latent-space models), ``<path>/sample_config.json`` (optional ``num_classes``, ``pixel_space``,
    ``image_channels``). ``path`` may also be a bare transformer folder. Without ``pixel_space`` in
    ``sample_config.json``, a model with no VAE is taken as pixel-space only if it has 1 or 3 input channels.

    Args:
        path: Trained model folder, or a transformer folder.
        vae_path: VAE folder overriding ``<path>/vae/`` (e.g. ``stabilityai/sd-vae-ft-ema`` saved locally).
        device: Where to put the modules.
        dtype: Weights dtype (``None`` keeps the saved dtype).

    Returns:
        The loaded components, in eval mode.
    """
    transformer_folder, model_folder = resolve_transformer_folder(Path(path))
    sample_config: dict[str, Any] = {}
    if model_folder is not None and (model_folder / SAMPLE_CONFIG_NAME).is_file():
        sample_config = read_json(model_folder / SAMPLE_CONFIG_NAME)

    transformer = DiTTransformer2DModel.from_pretrained(transformer_folder, torch_dtype=dtype)
    scheduler = _load_scheduler(model_folder)

    pixel_space = sample_config.get('pixel_space')
    if pixel_space and vae_path is not None:
        raise ValueError(
            f'{path} is a pixel-space model (sample_config.json: pixel_space=true) but vae_path={vae_path} was '
            f'given; drop the VAE.')
    vae = None if pixel_space else _find_vae(vae_path, model_folder, dtype)
    if pixel_space is None:  # undeclared: without a VAE, only 1- or 3-channel inputs can be images
        pixel_space = vae is None and transformer.config.in_channels in (1, 3)
    if not pixel_space and vae is None:
        raise ValueError(
            f"{path} is a latent-space model but no VAE was found: put an AutoencoderKL in {Path(path) / 'vae'}/ "
            f'or pass vae_path (--vae_path).')

    num_embeds = transformer.config.num_embeds_ada_norm
    if num_embeds is None:
        raise ValueError(f'{transformer_folder} is not class-conditional (num_embeds_ada_norm is None).')
    num_classes = int(sample_config.get('num_classes', num_embeds))
    if not 0 < num_classes <= num_embeds:
        raise ValueError(
            f'sample_config.json num_classes={num_classes} must be in [1, {num_embeds}] '
            f"(the transformer's num_embeds_ada_norm).")
    default_channels = transformer.config.in_channels if pixel_space else vae.config.out_channels
    image_channels = int(sample_config.get('image_channels', default_channels))

    transformer.eval()
    if vae is not None:
        vae.eval()
    if device is not None:
        transformer.to(device)
        if vae is not None:
            vae.to(device)
    return DiTComponents(transformer, scheduler, vae, num_classes, bool(pixel_space), image_channels)
