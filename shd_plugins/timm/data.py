"""Data for a timm training loop: input normalisation, a resumable rank-sharded sampler, the train/val loaders."""
from __future__ import annotations

import argparse
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from timm.data import create_dataset, create_transform

from ..evaluation.top1 import input_img_mode
from ..imagefolder import check_imagefolder
from ..seeding import SeededSamples

__all__ = ['per_channel', 'ResumableSampler', 'build_train_loader', 'resolve_val_dir']


def per_channel(values: torch.Tensor | Sequence[float], in_chans: int | None) -> torch.Tensor:
    """Mean/std as a float32 (1, C, 1, 1) tensor for ``in_chans`` channels.

    A pretrained cfg always lists 3 values; a 1-channel model is fed data normalised with their mean (timm's
    ``resolve_input_data_config`` policy), so buffers must match or re-normalisation would broadcast a grey image
    to 3 channels. A single value is expanded to every channel.
    """
    values = torch.as_tensor(values, dtype=torch.float32).flatten()
    if in_chans is not None and values.numel() not in (1, in_chans):
        values = values.mean().reshape(1)
    if in_chans is not None:
        values = values.expand(in_chans)
    return values.reshape(1, -1, 1, 1).clone()


class ResumableSampler(torch.utils.data.Sampler):
    """Shuffled, rank-sharded sampler that can begin an epoch part-way through.

    Epoch ``e`` visits a fixed permutation drawn from ``seed + e`` (the same for any world size), padded to a
    multiple of the world size, and rank ``r`` takes every ``world_size``-th index, as ``DistributedSampler`` does.
    ``set_epoch(e, start=n)`` skips the first ``n`` samples of that permutation, so a run resumed from a mid-epoch
    checkpoint sees exactly the samples the epoch had not yet visited.

    Args:
        num_samples: Size of the dataset.
        num_replicas: World size.
        rank: This process's rank.
        seed: Base seed of the per-epoch permutations.
        keyed: Yield ``(epoch, index)`` keys for a :class:`~shd_plugins.seeding.SeededSamples` dataset instead of
            bare indices.
    """

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, keyed: bool = False):
        self.keyed = keyed
        self.num_samples = num_samples
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.start = 0
        self.total_size = math.ceil(num_samples / num_replicas) * num_replicas

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Visit epoch ``epoch``'s permutation from its ``start``-th sample (counted over all ranks)."""
        if start % self.num_replicas:
            raise ValueError(f'start={start} must be a multiple of the world size {self.num_replicas}.')
        self.epoch, self.start = epoch, start

    def samples_per_rank(self, start: int = 0) -> int:
        """Samples one rank draws in an epoch begun at ``start``."""
        return (self.total_size - start) // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        order += order[:self.total_size - len(order)]
        order = order[self.start:][self.rank::self.num_replicas]
        return iter([(self.epoch, i) for i in order] if self.keyed else order)

    def __len__(self) -> int:
        return self.samples_per_rank(self.start)


def build_train_loader(
        train_dir: str | Path,
        data_config: dict[str, Any],
        args: argparse.Namespace,
) -> tuple[torch.utils.data.DataLoader, ResumableSampler]:
    """Training loader with timm's train transforms and a :class:`ResumableSampler`.

    Reads timm ``train.py``'s flags from ``args``: ``batch_size``, ``workers``, ``pin_mem``, ``seed``, ``rank``,
    ``world_size`` and the augmentation ones (``no_aug``, ``scale``, ``ratio``, ``hflip``, ``color_jitter``, ``aa``,
    ``train_interpolation``, ``reprob``). Batches are whole (``drop_last``), so every rank takes as many steps.
    Augmentation is seeded per sample (:class:`~shd_plugins.seeding.SeededSamples`) and the loader has its own
    generator, so a resumed run sees the same augmented batches as an uninterrupted one.

    Raises:
        ValueError: The split holds fewer than one batch per process.
    """
    dataset = create_dataset(
        '', root=str(train_dir), is_training=True, search_split=False, input_img_mode=input_img_mode(data_config))
    dataset.transform = create_transform(
        data_config['input_size'],
        is_training=True,
        no_aug=args.no_aug,
        scale=tuple(args.scale),
        ratio=tuple(args.ratio),
        hflip=args.hflip,
        color_jitter=args.color_jitter,
        auto_augment=args.aa,
        interpolation=args.train_interpolation,
        mean=data_config['mean'],
        std=data_config['std'],
        re_prob=args.reprob,
    )
    sampler = ResumableSampler(
        len(dataset), num_replicas=args.world_size, rank=args.rank, seed=args.seed, keyed=True)
    if sampler.samples_per_rank() < args.batch_size:
        raise ValueError(
            f'{train_dir} has {len(dataset)} images: fewer than one batch of {args.batch_size} per process '
            f'({args.world_size} processes). Lower --batch-size.')
    loader = torch.utils.data.DataLoader(
        SeededSamples(dataset, args.seed),
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.workers,
        pin_memory=args.pin_mem,
        drop_last=True,
        persistent_workers=args.workers > 0,
        generator=torch.Generator().manual_seed(args.seed),  # creating an iterator must not draw from the global RNG
    )
    return loader, sampler


def resolve_val_dir(data_dir: str | Path, val_split: str) -> Path | None:
    """The validation ImageFolder: ``<data_dir>/<val_split>``, else ``validation`` or ``val``; None if absent.

    Raises:
        ValueError: The split folder exists but is not an ImageFolder.
    """
    for split in dict.fromkeys((val_split, 'validation', 'val')):
        if split and (Path(data_dir) / split).is_dir():
            return check_imagefolder(Path(data_dir) / split)
    return None
