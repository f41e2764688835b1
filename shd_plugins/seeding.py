"""Random augmentation that a resumed run repeats exactly: seeded per sample, off the training generators.

Both recipes resume bit-exactly on CPU. Augmentations drawn from the process-global generators would depend on when
each sample is fetched (a loader reads ahead, workers interleave, a resumed run starts mid-epoch) and would move the
generators that draw dropout, noise, timesteps and label dropout. Here sample ``i`` of epoch ``e`` is augmented with
generators seeded by ``(seed, e, i)``: the torch generator is forked (the model draws dropout from it), ``random`` and
numpy are reseeded for every sample and left so.
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

__all__ = ['sample_seed', 'SeededSamples', 'batches_off_the_training_rng']


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed that depends only on ``(seed, epoch, index)`` (numpy's ``SeedSequence`` mixing)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class SeededSamples(torch.utils.data.Dataset):
    """A dataset whose random transform of sample ``index`` in epoch ``epoch`` depends only on ``(seed, epoch, index)``.

    The torch CPU, ``random`` and numpy generators are seeded for the sample, so timm's transforms (``random``) and
    torchvision's (``torch``) are covered. The torch generator is restored afterwards: the model's dropout, noise
    and timesteps draw from it. ``random`` and numpy are left seeded by the last sample fetched instead of being
    restored (saving and restoring numpy's state cost 0.18 ms per sample, most of this wrapper's cost): what the
    main process draws from them after a fetch (timm's mixup uses numpy) is then a function of the batch, the same
    in an uninterrupted and a resumed run.

    Args:
        dataset: The map-style dataset with its random ``transform``.
        seed: Base seed (``--seed``).

    Keys are a sample index (the epoch is the one of :meth:`set_epoch`) or an ``(epoch, index)`` pair, as a sampler
    that knows the epoch yields (:class:`shd_plugins.timm.ResumableSampler` with ``keyed=True``).
    """

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        seed = sample_seed(self.seed, epoch, index)
        random.seed(seed)
        np.random.seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed costs ~0.5 ms (every backend)
            return self.dataset[index]


def batches_off_the_training_rng(dataloader: Iterable[Any]) -> Iterator[Any]:
    """The batches of ``dataloader``, fetched without moving the global CPU generator.

    Creating a DataLoader iterator draws a seed from the global generator; a resumed run creates it at another point of
    the stream than the uninterrupted run did. Fetching on a forked generator keeps that stream for the training step.
    """
    iterator = iter(dataloader)
    while True:
        with torch.random.fork_rng(devices=[]):
            batch = next(iterator, None)
        if batch is None:
            return
        yield batch
