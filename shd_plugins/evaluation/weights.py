"""Weight files that are not ours to trust, read without running their pickle, and the Inception weights' checks.

torch-fidelity loads its Inception-v3 weights with ``torch.load(weights_only=False)``: a file passed as
``--inception_weights`` or left in ``$TORCH_HOME/hub/checkpoints/`` would run whatever code its pickle asks for.
Here such a file is read once with ``weights_only=True`` (tensors and plain containers only; anything else is refused,
naming the file), checked against the Inception architecture (keys and shapes, the strict load torch-fidelity does
later, done before any sampling) and against the SHA-256 prefix torch-fidelity publishes in the file name, as
``torch.hub`` does. torch-fidelity is then handed a copy of those tensors that we wrote ourselves, so the file it
unpickles is never the untrusted one, and a file swapped after the check changes nothing.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch.hub import HASH_REGEX
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

__all__ = [
    'INCEPTION_FILE_NAME',
    'INCEPTION_SHA256_PREFIX',
    'UntrustedWeightsError',
    'file_sha256',
    'load_tensors',
    'trusted_inception_copy',
    'verified_inception_state_dict',
]

_logger = logging.getLogger(__name__)

#: torch-fidelity's release file name, `weights-inception-2015-12-05-6726825d.pth`.
INCEPTION_FILE_NAME = os.path.basename(urlparse(URL_INCEPTION_V3).path)
#: The SHA-256 prefix torch-fidelity publishes in that name (torch.hub's `name-<sha256 prefix>.ext` convention).
INCEPTION_SHA256_PREFIX = HASH_REGEX.search(INCEPTION_FILE_NAME).group(1)


class UntrustedWeightsError(ValueError):
    """A weights file whose loading could run code, or that is not the file it claims to be."""


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def _unsafe_globals(source: str | Path | io.BytesIO) -> str:
    """The globals a checkpoint's pickle would import, for the refusal message (read without unpickling)."""
    try:
        if isinstance(source, io.BytesIO):
            source.seek(0)
        names = torch.serialization.get_unsafe_globals_in_checkpoint(source)
    except Exception:  # a legacy (non-zip) pickle: the globals cannot be listed without running it
        names = []
    return ', '.join(names) if names else 'globals other than tensors (or it is no torch.save file)'


def load_tensors(source: str | Path | io.BytesIO, name: str | Path) -> dict[str, torch.Tensor]:
    """A state dict of tensors read with ``torch.load(weights_only=True)``: a pickle asking for code is refused.

    Args:
        source: The file, or its bytes already read (so that what is checked is what is used).
        name: The file's name for the messages.

    Raises:
        UntrustedWeightsError: The pickle needs globals ``weights_only`` does not allow, or holds no tensor dict.
        ValueError: The file is truncated or not a torch file.
    """
    try:
        state_dict = torch.load(source, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise UntrustedWeightsError(
            f'Refusing to load {name}: its pickle asks for {_unsafe_globals(source)}, which '
            f'torch.load(weights_only=True) does not allow, so unpickling it could run code. Use a file that holds '
            f'tensors only (torch.save(model.state_dict())), such as the published {URL_INCEPTION_V3}.'
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f'Could not read {name} as a torch weights file ({e}); is it truncated or corrupt?') from e
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UntrustedWeightsError(f'{name} is not a state dict of tensors (got {type(state_dict).__name__}).')
    return dict(state_dict)


def _check_inception_keys(state_dict: dict[str, torch.Tensor], name: str | Path) -> None:
    """torch-fidelity's strict ``load_state_dict`` on a meta-device Inception: same keys and shapes, no memory."""

    class _Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # the constructor's own load; the check is below
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    with torch.device('meta'):
        skeleton = _Skeleton('inception-v3-compat', ['2048'], feature_extractor_weights_path=empty)
    try:
        torch.nn.Module.load_state_dict(skeleton, state_dict, strict=True, assign=True)
    except RuntimeError as e:
        detail = ' '.join(str(e).split())[:600]
        raise ValueError(
            f'{name} is not an Inception-v3 state dict for torch-fidelity ({detail}). Download {URL_INCEPTION_V3}.'
        ) from e


def verified_inception_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """Inception weights read safely from ``path`` and checked; returns them and the file's SHA-256.

    A file named as torch-fidelity's release must carry its published SHA-256 prefix (a corrupted or replaced
    download); any file must hold tensors only, with the keys and shapes of torch-fidelity's Inception-v3.

    Raises:
        UntrustedWeightsError: A pickle needing code, or a release-named file with another hash (both hashes named).
        ValueError: A truncated file, or a state dict of another architecture.
    """
    data = Path(path).read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    if Path(path).name == INCEPTION_FILE_NAME and not sha256.startswith(INCEPTION_SHA256_PREFIX):
        raise UntrustedWeightsError(
            f'{path} has SHA-256 {sha256}, but torch-fidelity publishes {INCEPTION_FILE_NAME} with SHA-256 '
            f'{INCEPTION_SHA256_PREFIX}...: the file is corrupt or not the published one. Download it again from '
            f'{URL_INCEPTION_V3}.'
        )
    state_dict = load_tensors(io.BytesIO(data), path)
    _check_inception_keys(state_dict, path)
    return state_dict, sha256


@contextmanager
def trusted_inception_copy(path: str | Path) -> Iterator[tuple[str, str]]:
    """A private copy of verified Inception weights, for torch-fidelity's ``weights_only=False`` load.

    Yields:
        ``(copy_path, sha256)``: the copy holds only the tensors read from ``path`` and lives in a temporary folder
        removed on exit.
    """
    state_dict, sha256 = verified_inception_state_dict(path)
    with tempfile.TemporaryDirectory(prefix='shd_inception_') as folder:
        copy = os.path.join(folder, INCEPTION_FILE_NAME)
        torch.save(state_dict, copy)
        del state_dict
        _logger.debug('verified %s (sha256 %s); torch-fidelity reads the copy %s', path, sha256, copy)
        yield copy, sha256
