"""Top-1/top-5 evaluation of timm classifiers on an ImageFolder, following timm's ``validate.py``.

The preprocessing comes from the model itself (``timm.data.resolve_input_data_config``: input size and
channels the model actually accepts, crop, interpolation, mean/std from its pretrained cfg), the metrics
from ``timm.utils.accuracy`` and batch-size-weighted ``AverageMeter``s, so numbers here are comparable with
numbers timm's ``validate.py`` prints for the same model and data.
"""
from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.data import create_dataset, create_transform, resolve_input_data_config
from timm.models import create_model, load_checkpoint, resolve_model_input_args
from timm.utils import AverageMeter, accuracy
from tqdm import tqdm

from ..imagefolder import check_imagefolder
from .checkpoints import check_checkpoint_args

__all__ = [
    'check_weights_source',
    'create_eval_model',
    'resolve_split_dir',
    'input_img_mode',
    'resolve_eval_data_config',
    'build_eval_loader',
    'evaluate_classifier',
]

_logger = logging.getLogger(__name__)


def check_weights_source(checkpoint: str | Path | None, pretrained: bool = False) -> None:
    """Fail early and clearly on a missing checkpoint: timm's loader raises a bare ``FileNotFoundError``.

    Raises:
        FileNotFoundError: ``checkpoint`` is given but is not a file.
        ValueError: Neither a checkpoint nor ``pretrained`` (hub) weights: there would be nothing to evaluate.
    """
    if checkpoint:
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(
                f'--checkpoint {checkpoint}: no such file. Pass the path of a state_dict or timm train '
                'checkpoint (e.g. runs/<exp>/model_best.pth.tar).'
            )
    elif not pretrained:
        raise ValueError(
            'No weights to evaluate: pass --checkpoint PATH (state_dict or timm train checkpoint), or '
            '--pretrained to download hub weights (needs internet).'
        )


def create_eval_model(
    model_name: str,
    *,
    checkpoint: str | Path | None = None,
    use_ema: bool = False,
    pretrained: bool = False,
    num_classes: int | None = None,
    in_chans: int | None = None,
    img_size: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Create the model as ``validate.py`` does and load ``checkpoint`` (its EMA weights with ``use_ema``).

    ``img_size``/``in_chans`` go through ``resolve_model_input_args``, as in timm's scripts, so a model's saved input
    settings stay the defaults and only explicit requests change them.

    Raises:
        FileNotFoundError, ValueError: See ``check_weights_source``; ``check_checkpoint_args`` (head counts that
            differ from the ones the checkpoint records); a checkpoint that cannot be read or loaded (named).
    """
    check_weights_source(checkpoint, pretrained)
    model = create_model(
        **resolve_model_input_args(
            model_name,
            {'img_size': img_size, 'in_chans': in_chans},
            pretrained=pretrained,
            num_classes=num_classes,
            **(model_kwargs or {}),
        )
    )
    if checkpoint:
        check_checkpoint_args(checkpoint, model, model_name)
        try:
            load_checkpoint(model, str(checkpoint), use_ema=use_ema)
        except (RuntimeError, OSError, EOFError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
            raise ValueError(f'Could not load checkpoint {checkpoint} into {model_name!r}: {e}') from e
    return model


def resolve_split_dir(data_dir: str | Path, split: str = 'val') -> Path:
    """Return the ImageFolder to evaluate: ``data_dir/split`` if it exists, else ``data_dir`` itself.

    This lets ``--data-dir`` point either at a dataset root holding ``train/`` and ``val/`` or directly at
    one split folder.

    Raises:
        ValueError: The resolved folder is not an ImageFolder (the message names it and the layout).
    """
    data_dir = Path(data_dir)
    split_dir = data_dir / split if split and (data_dir / split).is_dir() else data_dir
    try:
        return check_imagefolder(split_dir)
    except ValueError as e:
        if split and split_dir == data_dir:
            note = f" (There is no '{split}' subfolder in {data_dir}, so it was read as the split.)"
            raise ValueError(f'{e}{note}') from None
        raise


def input_img_mode(data_config: dict[str, Any]) -> str:
    """Read images as grayscale for a 1-channel model, RGB otherwise (as timm's scripts do)."""
    return 'L' if data_config['input_size'][0] == 1 else 'RGB'


def resolve_eval_data_config(
    model: nn.Module,
    *,
    img_size: int | None = None,
    in_chans: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Resolve the eval preprocessing for ``model``, with optional command-line style overrides.

    ``resolve_input_data_config`` (rather than plain ``resolve_data_config``) reads the channels and size the
    model was built with: a ViT created with ``img_size=32, in_chans=1`` keeps a pretrained cfg that says
    ``(3, 224, 224)``, which plain resolution would feed it.

    Raises:
        ValueError: An override contradicts the model (e.g. ``in_chans=3`` for a 1-channel model).
    """
    args = dict(
        img_size=img_size,
        in_chans=in_chans,
        crop_pct=crop_pct,
        interpolation=interpolation or None,
        mean=tuple(mean) if mean is not None else None,
        std=tuple(std) if std is not None else None,
    )
    return resolve_input_data_config(model, {k: v for k, v in args.items() if v is not None}, use_test_size=True)


def build_eval_loader(
    data_dir: str | Path,
    model: nn.Module,
    *,
    split: str = 'val',
    batch_size: int = 64,
    workers: int = 0,
    in_chans: int | None = None,
    data_config: dict[str, Any] | None = None,
    img_size: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """Build an ordered, non-augmenting loader over one ImageFolder split, preprocessed for ``model``.

    Images are read as grayscale ("L") when the model takes one channel and converted to RGB otherwise, as
    ``validate.py`` does. No prefetcher: the tensors are exactly those of ``timm.data.create_transform(**data_config)``
    applied image by image (no device-side normalization), so the loader serves any device.

    In a distributed run each rank takes every ``world_size``-th image starting at ``rank``: together the ranks see
    every image exactly once. (timm's ``OrderedDistributedSampler`` pads the ranks to equal length by repeating
    images, which shifts the accuracy slightly.) Sum the per-rank correct counts, not the per-rank accuracies.

    Args:
        data_dir: Dataset root holding ``<split>/``, or a split folder itself.
        model: The model to evaluate; its data config drives the preprocessing.
        split: Name of the split subfolder (used only if it exists under ``data_dir``).
        batch_size: Images per batch.
        workers: DataLoader worker processes (0 loads in the main process).
        in_chans: Expected input channels; must match the model if given.
        data_config: A config from ``resolve_eval_data_config``; resolved from the model and the overrides
            below when None.
        img_size, crop_pct, interpolation, mean, std: Overrides of the model's data config.
        rank, world_size: This process's shard of the images (``range(rank, len(dataset), world_size)``).
        pin_memory: Pin the batches for faster host-to-GPU copies.

    Raises:
        ValueError: The split folder is not an ImageFolder, an override contradicts the model, or ``rank`` is not
            in ``[0, world_size)``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f'rank={rank} must be in [0, world_size={world_size}).')
    split_dir = resolve_split_dir(data_dir, split)
    if data_config is None:
        data_config = resolve_eval_data_config(
            model,
            img_size=img_size,
            in_chans=in_chans,
            crop_pct=crop_pct,
            interpolation=interpolation,
            mean=mean,
            std=std,
        )
    elif in_chans is not None and data_config['input_size'][0] != in_chans:
        raise ValueError(f"in_chans={in_chans} but data_config['input_size'] is {data_config['input_size']}.")
    dataset = create_dataset(
        '', root=str(split_dir), is_training=False, search_split=False, input_img_mode=input_img_mode(data_config))
    dataset.transform = create_transform(
        data_config['input_size'],
        is_training=False,
        interpolation=data_config['interpolation'],
        mean=data_config['mean'],
        std=data_config['std'],
        crop_pct=data_config['crop_pct'],
        crop_mode=data_config['crop_mode'],
    )
    if world_size > 1:
        dataset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
    )


def _amp_context(device: torch.device, amp: bool, amp_dtype: torch.dtype | None):
    """Autocast context for eval: float16 on CUDA, bfloat16 elsewhere (CPU autocast lacks float16 kernels)."""
    if not amp:
        return nullcontext()
    dtype = amp_dtype or (torch.float16 if device.type == 'cuda' else torch.bfloat16)
    return torch.autocast(device_type=device.type, dtype=dtype)


def evaluate_classifier(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: str | torch.device,
    amp: bool = False,
    amp_dtype: torch.dtype | None = None,
    topk: tuple[int, int] = (1, 5),
    progress: bool = True,
) -> dict[str, Any]:
    """Compute top-k accuracy (percent) and mean cross-entropy of ``model`` over ``loader``.

    Per batch this is ``validate.py``'s loop: ``timm.utils.accuracy`` (which clips k to the number of classes,
    so top-5 of a 3-class model is 100) and ``AverageMeter``s weighted by batch size. The reported accuracies
    are computed from the integer counts of correct samples, i.e. the meters' averages without float drift,
    so they can be compared exactly with any other loop over the same images.

    Args:
        model: Classifier returning logits of shape (batch, num_classes).
        loader: Yields ``(images, targets)``; ``targets`` are class indices.
        device: Device to run on; batches are moved there.
        amp: Run the forward under autocast.
        amp_dtype: Autocast dtype; float16 on CUDA and bfloat16 elsewhere when None.
        topk: The two k of the reported accuracies (keys ``top1``/``top5`` for the default (1, 5)).
        progress: Show a tqdm bar with running metrics.

    Returns:
        ``{"top1", "top5", "loss", "num_samples", "top1_correct", "top5_correct"}`` (keys follow ``topk``).
    """
    device = torch.device(device)
    criterion = nn.CrossEntropyLoss()
    losses = AverageMeter()
    meters = {k: AverageMeter() for k in topk}
    correct = {k: 0 for k in topk}
    num_samples = 0

    model.eval()
    total = len(loader) if hasattr(loader, '__len__') else None
    bar = tqdm(loader, total=total, desc='eval', disable=not progress, leave=False)
    with torch.inference_mode():
        for images, targets in bar:
            images, targets = images.to(device), targets.to(device)
            with _amp_context(device, amp, amp_dtype):
                output = model(images)
                loss = criterion(output, targets)
            batch_size = output.shape[0]
            accs = accuracy(output.detach().float(), targets, topk=topk)
            losses.update(loss.item(), batch_size)
            for k, acc in zip(topk, accs):
                meters[k].update(acc.item(), batch_size)
                correct[k] += int(round(acc.item() * batch_size / 100.0))
            num_samples += batch_size
            bar.set_postfix(loss=f'{losses.avg:.4f}', **{f'top{k}': f'{meters[k].avg:.2f}' for k in topk})

    if num_samples == 0:
        raise ValueError('The loader yielded no samples: nothing to evaluate.')
    results: dict[str, Any] = {}
    for k in topk:
        results[f'top{k}'] = round(100.0 * correct[k] / num_samples, 4)
    results['loss'] = round(losses.avg, 6)
    results['num_samples'] = num_samples
    for k in topk:
        results[f'top{k}_correct'] = correct[k]
    return results
