"""Reading timm checkpoints before building a model from them: safely, and against what they were trained as.

Shared by the evaluators (top-1, the timm FID extractor) and the timm integration (resume, teachers), so a truncated
file is named the same way everywhere and nothing is unpickled beyond timm's ``weights_only`` allow-list.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.models import create_model, resolve_model_input_args
from timm.utils import load_checkpoint_metadata

__all__ = ['read_checkpoint_metadata', 'check_checkpoint_args']

_logger = logging.getLogger(__name__)


def read_checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """A checkpoint's non-tensor entries (``args``, ``arch``, ``epoch``, ``num_updates``), read as timm's
    ``load_checkpoint_metadata`` reads them (``weights_only=True``, tensors memory-mapped); ``{}`` for
    ``.safetensors`` files, which hold tensors only.

    Raises:
        FileNotFoundError: No file at ``path``.
        ValueError: The file is truncated, empty, a pickle that needs code, or not a checkpoint dict; the message
            names it (torch alone says ``failed finding central directory`` or ``[Errno 22] Invalid argument``).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint '{path}' does not exist.")
    if str(path).endswith('.safetensors'):
        return {}
    try:
        metadata = load_checkpoint_metadata(str(path))
    except Exception as e:
        raise ValueError(
            f"Checkpoint '{path}' ({os.path.getsize(path)} bytes) cannot be read: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'no detail'}. It is truncated or corrupt (an interrupted save "
            f'or copy) or not a PyTorch checkpoint: use another checkpoint of the run (checkpoint-<epoch>.pth.tar, '
            f'model_best.pth.tar; --resume auto falls back to the previous one).') from e
    if not isinstance(metadata, dict):
        raise ValueError(f"Checkpoint '{path}' holds a {type(metadata).__name__}, not a checkpoint dict.")
    return metadata


def _head_counts(model: nn.Module) -> dict[str, int]:
    return {name: m.num_heads for name, m in model.named_modules() if isinstance(getattr(m, 'num_heads', None), int)}


def _model_from_args(args: dict[str, Any]) -> nn.Module | None:
    """The model a train checkpoint's ``args`` describe, on the meta device (no memory, no weights)."""
    try:
        with torch.device('meta'):
            return create_model(**resolve_model_input_args(
                args['model'],
                {'img_size': args.get('img_size'), 'in_chans': args.get('in_chans')},
                num_classes=args.get('num_classes'),
                **(args.get('model_kwargs') or {}),
            ))
    except Exception as e:  # args of another timm version or script: nothing to compare with, say so
        _logger.warning('Could not rebuild the model from the checkpoint args (%s: %s); not compared.',
                        type(e).__name__, e)
        return None


def check_checkpoint_args(checkpoint: str | Path, model: nn.Module, model_name: str) -> None:
    """Refuses a model whose head counts differ from those the checkpoint was trained with.

    A ViT with 3 heads and one with 6 have the same weight shapes, so the checkpoint loads without a word and the
    evaluation measures a model that never existed. timm train checkpoints record their ``args``: the trained
    model is rebuilt from them on the meta device and its attention head counts compared with ``model``'s.

    Raises:
        ValueError: The head counts differ (both named, with the checkpoint's ``model``/``model_kwargs``), or the
            checkpoint cannot be read.
    """
    args = read_checkpoint_metadata(checkpoint).get('args')
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, dict) or not args.get('model'):
        return
    trained = _model_from_args(args)
    if trained is None:
        return
    expected, built = _head_counts(trained), _head_counts(model)
    if expected != built:
        def heads(counts: dict[str, int]) -> str:
            return ', '.join(sorted({str(v) for v in counts.values()})) or 'none'

        raise ValueError(
            f"Checkpoint {checkpoint} was trained as {args['model']!r} with model_kwargs "
            f"{args.get('model_kwargs') or {}} ({heads(expected)} attention heads per layer, {len(expected)} layers), "
            f"but the model built here, {model_name!r}, has {heads(built)} heads per layer ({len(built)} layers). "
            f"The weights have equal shapes, so they would load silently into the wrong model; pass the "
            f"checkpoint's --model-kwargs (e.g. num_heads={heads(expected)})."
        )
