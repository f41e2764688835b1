"""DiT models for distillation: loading, DiT's weight init, label handling, and the teacher/student checks.

The checks fail before training on what would otherwise surface as a shape error deep in a forward (or not at
all): a student that does not fit the data, a teacher that sees another token grid or class set. Loading accepts
the layouts our recipes write (a model folder with ``transformer/``), bare ``save_pretrained`` folders, and hub ids.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from diffusers import AutoencoderKL, DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding

__all__ = [
    'builtin_label_dropout',
    'check_local_path',
    'check_student_matches_data',
    'check_teacher_compatible',
    'disable_builtin_label_dropout',
    'initialize_dit_weights',
    'learns_sigma',
    'load_transformer',
    'load_vae',
    'read_json',
    'read_model_config',
    'resolve_transformer_folder',
]

_TRANSFORMER_CLASS_NAMES = ('DiTTransformer2DModel', 'Transformer2DModel')


# --------------------------------------------------------------------------------------------------------------
# Building and initialising
# --------------------------------------------------------------------------------------------------------------


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON file as a dict; a syntax error becomes a ValueError naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f'{path} is not valid JSON ({e}).') from e


def read_model_config(path: str | Path) -> dict[str, Any]:
    """A ``DiTTransformer2DModel`` config from JSON, without comment keys (a leading '_', except ``_class_name``).

    The files of ``recipes/configs/`` document themselves with ``_comment`` keys, which ``from_config`` would warn
    about.
    """
    config = read_json(path)
    class_name = config.get('_class_name', 'DiTTransformer2DModel')
    if class_name != 'DiTTransformer2DModel':
        raise ValueError(f'Model config {path} describes a {class_name}; expected a DiTTransformer2DModel config.')
    return {k: v for k, v in config.items() if not k.startswith('_')}


def initialize_dit_weights(model: DiTTransformer2DModel) -> None:
    """DiT's ``initialize_weights``: xavier-uniform linears, normal(0.02) embeddings, adaLN-Zero.

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


def builtin_label_dropout(model: nn.Module) -> float:
    """The label dropout probability diffusers' DiT applies by itself in train mode (0 when none)."""
    return max((m.dropout_prob for m in model.modules() if isinstance(m, LabelEmbedding)), default=0.0)


def disable_builtin_label_dropout(model: nn.Module) -> None:
    """Stop diffusers' DiT from dropping labels by itself in train mode.

    Each diffusers DiT block owns a ``LabelEmbedding`` that, in train mode, independently replaces labels by the null
    class with probability 0.1. That makes the blocks disagree on the label and hides the dropped labels from the
    teacher (in eval mode). Drop labels once, explicitly (:func:`~shd_plugins.diffusers.drop_class_labels`), and hand
    the same labels to both models.
    """
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0


def learns_sigma(model: DiTTransformer2DModel) -> bool:
    """DiT's learned-sigma layout: ``out_channels == 2 * in_channels`` (eps channels first, then the variance)."""
    in_channels, out_channels = model.config.in_channels, model.config.out_channels or model.config.in_channels
    if out_channels == in_channels:
        return False
    if out_channels == 2 * in_channels:
        return True
    raise ValueError(
        f'out_channels={out_channels} must be in_channels ({in_channels}) or 2 * in_channels (learned sigma).')


# --------------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------------


def _num_tokens(config: Any, input_size: int) -> tuple[int, str]:
    """Tokens a DiT makes from ``input_size`` inputs, and the formula (for error messages)."""
    side = input_size // config.patch_size
    return side * side, f'({input_size} / patch_size {config.patch_size})^2 = {side * side}'


def check_student_matches_data(student: DiTTransformer2DModel, input_size: int, input_channels: int,
                               num_classes: int, space: str = 'training') -> None:
    """The student must take the training inputs (size, channels) and embed every class of the data.

    Args:
        student: The DiT to train.
        input_size: Side of the (latent or pixel) inputs.
        input_channels: Channels of the inputs.
        num_classes: Classes of the training data.
        space: How the inputs are described in error messages (e.g. ``'pixel-space'``).
    """
    config = student.config
    if config.sample_size != input_size:
        raise ValueError(
            f"The student's sample_size is {config.sample_size} but the {space} inputs are {input_size}x{input_size}"
            f': set sample_size={input_size} in the model config or change the training resolution.')
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
            f'The training data has {num_classes} classes but the student embeds only num_embeds_ada_norm='
            f'{config.num_embeds_ada_norm}: raise num_embeds_ada_norm to >= {num_classes}.')


def check_teacher_compatible(teacher: DiTTransformer2DModel, student: DiTTransformer2DModel) -> None:
    """The teacher must accept the student's exact inputs and produce attention maps over the same tokens.

    Raises:
        ValueError: Another token grid (sample_size / patch_size), other input channels or another class set
            (the null class id is ``num_embeds_ada_norm``); the message says which config to change.
    """
    t, s = teacher.config, student.config
    input_size = s.sample_size
    _, t_formula = _num_tokens(t, t.sample_size)
    _, s_formula = _num_tokens(s, input_size)
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
            f'the same inputs (same VAE latents or same image channels).')
    if t.num_embeds_ada_norm != s.num_embeds_ada_norm:
        raise ValueError(
            f"Teacher num_embeds_ada_norm={t.num_embeds_ada_norm} differs from the student's {s.num_embeds_ada_norm}:"
            f' the null (dropped) class id is num_embeds_ada_norm, so both must use the same class set.')


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def _looks_local(path: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else (absolute, ./, ~, deeper paths) must be a local path."""
    return (os.path.isabs(path) or path.startswith(('.', '~')) or path.count('/') > 1 or '\\' in path
            or os.path.exists(path))


def check_local_path(path: str | Path, flag: str, what: str) -> None:
    """Fail early when ``path`` can only be meant as a local path (see :func:`_looks_local`) and does not exist.

    Args:
        path: A local path or a hub id.
        flag: How the path is named in the message (a script's flag).
        what: What should be there (``'VAE'``, ``'teacher DiT'``).
    """
    path = str(path)
    if _looks_local(path) and not os.path.exists(os.path.expanduser(path)):
        raise ValueError(f'{flag} {path} does not exist: give an existing local {what} folder or a hub id.')


def _is_transformer_folder(path: Path) -> bool:
    config = path / 'config.json'
    return config.is_file() and read_json(config).get('_class_name') in _TRANSFORMER_CLASS_NAMES


def resolve_transformer_folder(path: str | Path) -> tuple[Path, Path | None]:
    """Returns ``(transformer_folder, model_folder)``; ``model_folder`` is ``None`` for a bare transformer folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f'Model path {path} does not exist. Expected a trained model folder with a `transformer/` subfolder '
            f'(DiTTransformer2DModel.save_pretrained), or a transformer folder itself.')
    if (path / 'transformer').is_dir():
        if not _is_transformer_folder(path / 'transformer'):
            raise ValueError(
                f"{path / 'transformer'} has no config.json of a DiTTransformer2DModel; it is not a saved DiT "
                f'transformer (expected `_class_name` in {_TRANSFORMER_CLASS_NAMES}).')
        return path / 'transformer', path
    if _is_transformer_folder(path):
        return path, None
    raise FileNotFoundError(
        f"No DiT transformer found in {path}: expected {path / 'transformer'}/ (DiTTransformer2DModel."
        f"save_pretrained) or {path / 'config.json'} with `_class_name` DiTTransformer2DModel.")


def load_transformer(
        name_or_path: str | Path,
        *,
        revision: str | None = None,
        dtype: torch.dtype | None = None,
        flag: str = 'Model path',
) -> DiTTransformer2DModel:
    """A DiT from a model folder (``transformer/`` inside), a transformer folder, or a hub id with ``transformer/``.

    Args:
        name_or_path: Local folder or hub id (e.g. ``facebook/DiT-XL-2-256``).
        revision: Hub revision.
        dtype: Weights dtype (None keeps the saved one).
        flag: How the path is named in error messages (a script's flag).
    """
    name_or_path = str(name_or_path)
    local = Path(os.path.expanduser(name_or_path))
    if local.is_dir():
        try:
            transformer_folder, _ = resolve_transformer_folder(local)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f'{flag} {name_or_path}: {e}') from None
        return DiTTransformer2DModel.from_pretrained(transformer_folder, torch_dtype=dtype)
    check_local_path(name_or_path, flag, 'DiT')
    try:
        return DiTTransformer2DModel.from_pretrained(
            name_or_path, subfolder='transformer', revision=revision, torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise ValueError(
            f'{flag} {name_or_path}: no such local folder, and no DiT transformer could be loaded from the hub under '
            f'that id ({str(e).splitlines()[0]}).') from e


def load_vae(
        name_or_path: str | Path,
        *,
        revision: str | None = None,
        dtype: torch.dtype | None = None,
        flag: str = 'VAE path',
) -> AutoencoderKL:
    """An ``AutoencoderKL`` from a VAE folder, a pipeline folder with ``vae/``, or a hub id.

    Args:
        name_or_path: Local folder or hub id (e.g. ``stabilityai/sd-vae-ft-ema``).
        revision: Hub revision.
        dtype: Weights dtype (None keeps the saved one).
        flag: How the path is named in error messages (a script's flag).

    Raises:
        FileNotFoundError: A local folder without ``config.json`` (nor ``vae/config.json``).
        ValueError: A missing local path, or a hub id that cannot be loaded.
    """
    name_or_path = str(name_or_path)
    local = Path(os.path.expanduser(name_or_path))
    if local.is_dir():
        if (local / 'vae' / 'config.json').is_file():  # a pipeline folder
            local = local / 'vae'
        if not (local / 'config.json').is_file():
            raise FileNotFoundError(
                f'{flag} {name_or_path} has no config.json (nor vae/config.json); expected an AutoencoderKL.'
                f'save_pretrained folder (or a pipeline folder with a `vae/` subfolder).')
        return AutoencoderKL.from_pretrained(local, torch_dtype=dtype)
    check_local_path(name_or_path, flag, 'VAE')
    errors = []
    for subfolder in (None, 'vae'):
        try:
            return AutoencoderKL.from_pretrained(name_or_path, subfolder=subfolder, revision=revision,
                                                 torch_dtype=dtype)
        except (OSError, ValueError) as e:
            errors.append(str(e).splitlines()[0])
    raise ValueError(
        f"{flag} {name_or_path}: no such local folder, and no AutoencoderKL could be loaded from the hub under that "
        f"id ({'; '.join(errors)}). Give a local folder with config.json, or a hub id such as "
        f'stabilityai/sd-vae-ft-ema.')
