"""Input normalisation shared by the timm task and the timm FID feature extractor."""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ['per_channel']


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
