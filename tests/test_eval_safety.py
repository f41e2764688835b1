"""The evaluators' reliability (issue 12, items 1, 6 and 10): weight files whose pickle would run code are refused
before torch-fidelity sees them, the whole reference is validated before any sample is generated, and a checkpoint
evaluated with another head count than it was trained with is refused."""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from tiny_models import tiny_dit
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from shd_plugins.evaluation import (
    INCEPTION_FILE_NAME,
    INCEPTION_SHA256_PREFIX,
    UntrustedWeightsError,
    check_reference,
    compute_metrics,
    create_eval_model,
    feature_size,
    register_timm_feature_extractor,
    resolve_inception_weights,
    save_npz,
)
from shd_plugins.evaluation.weights import trusted_inception_copy

REPO = Path(__file__).resolve().parents[1]
VIT = 'vit_tiny_patch16_224'
VIT_KWARGS = {'patch_size': 4, 'embed_dim': 32, 'depth': 1, 'num_heads': 2}


class _WritesMarker:
    """Unpickling this writes `path`: what a malicious weights file does, harmlessly."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f'open({self.path!r}, "w").write("pickle code ran")',)


def malicious_weights(path: Path, marker: Path) -> Path:
    torch.save({'Conv2d_1a_3x3.conv.weight': torch.zeros(1), 'payload': _WritesMarker(marker)}, path)
    return path


@pytest.fixture(scope='module')
def inception_state() -> dict[str, torch.Tensor]:
    """Random values with the keys and shapes of torch-fidelity's Inception-v3 (the real file cannot be downloaded)."""

    class _Random(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    torch.manual_seed(0)
    return _Random('x', ['2048'], feature_extractor_weights_path=empty).state_dict()


@pytest.fixture(scope='module')
def inception_file(tmp_path_factory, inception_state) -> Path:
    path = tmp_path_factory.mktemp('weights') / 'my_inception.pth'
    torch.save(inception_state, path)
    return path


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / 'marker'
    evil = malicious_weights(tmp_path / 'evil.pth', marker)
    with pytest.raises(UntrustedWeightsError, match='evil.pth') as info:
        resolve_inception_weights(evil)
    assert 'its pickle asks for builtins.exec' in str(info.value)
    images = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(UntrustedWeightsError, match='evil.pth'):
        compute_metrics(images, images, inception_weights=evil, verbose=False, cuda=False)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the control: torch-fidelity's own load would have run it
    assert marker.read_text() == 'pickle code ran'


def test_cached_file_with_the_published_name_but_another_hash_is_refused(tmp_path, monkeypatch, inception_state):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    cached = tmp_path / 'torch_home' / 'hub' / 'checkpoints' / INCEPTION_FILE_NAME
    cached.parent.mkdir(parents=True)
    marker = tmp_path / 'marker'
    malicious_weights(cached, marker)
    sha256 = hashlib.sha256(cached.read_bytes()).hexdigest()
    with pytest.raises(UntrustedWeightsError) as info:
        resolve_inception_weights()
    message = str(info.value)
    assert str(cached) in message and sha256 in message and INCEPTION_SHA256_PREFIX in message
    assert not marker.exists()
    torch.save(inception_state, cached)  # a legitimate tensor file, still not the published one
    with pytest.raises(UntrustedWeightsError, match=INCEPTION_SHA256_PREFIX):
        resolve_inception_weights()


def test_tensor_only_inception_file_is_verified_and_loaded(inception_file, inception_state):
    assert resolve_inception_weights(inception_file) == str(inception_file)
    with trusted_inception_copy(inception_file) as (copy, sha256):
        assert Path(copy) != inception_file and sha256 == hashlib.sha256(inception_file.read_bytes()).hexdigest()
        extractor = FeatureExtractorInceptionV3('inception-v3-compat', ['2048'], feature_extractor_weights_path=copy)
    assert not Path(copy).exists()  # the private copy is removed
    loaded = extractor.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in inception_state.items())


def test_truncated_or_foreign_weights_are_refused_naming_the_file(tmp_path, inception_file):
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(inception_file.read_bytes()[:100_000])
    with pytest.raises(ValueError, match='truncated.pth'):
        resolve_inception_weights(truncated)
    other = tmp_path / 'resnet.pth'
    torch.save({'fc.weight': torch.zeros(2, 2)}, other)
    with pytest.raises(ValueError, match='resnet.pth.*not an Inception-v3 state dict'):
        resolve_inception_weights(other)


def test_cli_refuses_a_malicious_inception_file_before_anything_runs(tmp_path):
    marker = tmp_path / 'marker'
    evil = malicious_weights(tmp_path / 'evil.pth', marker)
    samples = save_npz(np.zeros((4, 8, 8, 3), np.uint8), tmp_path / 'samples.npz')
    out = tmp_path / 'out'
    env = {**os.environ, 'TORCH_HOME': str(tmp_path / 'torch_home')}
    proc = subprocess.run(
        [sys.executable, str(REPO / 'eval' / 'fid.py'), '--samples', str(samples), '--reference', str(samples),
         '--inception_weights', str(evil), '--output_dir', str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    assert f'fid.py: error: Refusing to load {evil}' in proc.stderr
    assert not marker.exists() and not out.exists()


# The whole reference, before any sampling


def test_reference_npz_dtype_channels_and_size_are_checked_from_headers(tmp_path):
    floats = tmp_path / 'floats.npz'
    np.savez(floats, arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r'floats.npz:arr_0 must be uint8.*float32'):
        check_reference(floats)
    four = tmp_path / 'four_channels.npz'
    np.savez(four, arr_0=np.zeros((2, 8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match=r'1 or 3 channels.*\(2, 8, 8, 4\)'):
        check_reference(four)
    big = save_npz(np.zeros((2, 32, 32, 3), np.uint8), tmp_path / 'ref32.npz')
    assert check_reference(big, image_size=(32, 32)) == 'images'
    with pytest.raises(ValueError, match=r'samples are 8x8 images but the reference .*ref32.npz holds 32x32'):
        check_reference(big, image_size=(8, 8))
    folder = tmp_path / 'folder'
    folder.mkdir()
    Image.fromarray(np.zeros((32, 16, 3), np.uint8)).save(folder / 'a.png')
    with pytest.raises(ValueError, match=r'samples are 8x8 .* holds 32x16'):
        check_reference(folder, image_size=(8, 8))


def test_reference_statistics_shapes_against_the_extractor(tmp_path):
    stats = tmp_path / 'stats.npz'
    np.savez(stats, mu=np.zeros(7), sigma=np.eye(7))
    assert check_reference(stats, feature_dim=7) == 'statistics'
    with pytest.raises(ValueError, match='statistics of 7 features, but the feature extractor gives 2048'):
        check_reference(stats, feature_dim=feature_size('inception-v3-compat'))
    bad = tmp_path / 'bad_sigma.npz'
    np.savez(bad, mu=np.zeros(7), sigma=np.eye(6))
    with pytest.raises(ValueError, match=r'bad_sigma.npz: mu must be float \(D,\) and sigma float \(D, D\)'):
        check_reference(bad)


def test_compute_metrics_refuses_samples_and_reference_of_different_sizes(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(VIT, num_classes=10, in_chans=3, img_size=16, **VIT_KWARGS)
    torch.save(model.state_dict(), tmp_path / 'vit.pth')
    name, _ = register_timm_feature_extractor(VIT, tmp_path / 'vit.pth', num_classes=10, img_size=16,
                                              model_kwargs=VIT_KWARGS)
    assert feature_size(name) == VIT_KWARGS['embed_dim']
    small, large = np.zeros((4, 8, 8, 3), np.uint8), np.zeros((4, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match='samples are 8x8 images but the reference array holds 32x32'):
        compute_metrics(small, large, feature_extractor=name, verbose=False, cuda=False)


def test_cli_checks_the_reference_before_generating(tmp_path):
    """A 8x8 model scored against 32x32 references: an error naming both sizes, in seconds, with nothing written."""
    model_dir = tmp_path / 'model'
    tiny_dit(num_heads=2, num_layers=1, in_channels=1, learn_sigma=True).save_pretrained(model_dir / 'transformer')
    (model_dir / 'sample_config.json').write_text(json.dumps({'num_classes': 10, 'pixel_space': True}))
    reference = save_npz(np.zeros((4, 32, 32, 1), np.uint8), tmp_path / 'ref32.npz')
    torch.save(timm.create_model(VIT, num_classes=10, in_chans=1, img_size=16, **VIT_KWARGS).state_dict(),
               tmp_path / 'vit.pth')
    out = tmp_path / 'out'
    proc = subprocess.run(
        [sys.executable, str(REPO / 'eval' / 'fid.py'), '--model_path', str(model_dir), '--num_samples', '100000',
         '--reference', str(reference), '--feature_extractor', 'timm', '--fe_model_name', VIT,
         '--fe_checkpoint', str(tmp_path / 'vit.pth'), '--fe_num_classes', '10', '--fe_in_chans', '1',
         '--fe_img_size', '16', '--fe_model_kwargs', *(f'{k}={v}' for k, v in VIT_KWARGS.items()),
         '--output_dir', str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    assert 'samples are 8x8 images but the reference' in proc.stderr and 'holds 32x32' in proc.stderr
    assert 'Sampling' not in proc.stderr and not out.exists()


# Checkpoints that record their own args


def _train_checkpoint(path: Path, num_heads: int, **extra) -> Path:
    """A timm train checkpoint (`args` as train.py saves them) of a ViT with `num_heads` heads."""
    kwargs = {**VIT_KWARGS, 'num_heads': num_heads}
    model = timm.create_model(VIT, num_classes=10, in_chans=1, img_size=16, **kwargs)
    args = argparse.Namespace(model=VIT, model_kwargs=kwargs, num_classes=10, in_chans=1, img_size=16)
    torch.save({'epoch': 1, 'arch': VIT, 'state_dict': model.state_dict(), 'args': args, **extra}, path)
    return path


def test_head_count_that_differs_from_the_checkpoint_args_is_refused(tmp_path):
    checkpoint = _train_checkpoint(tmp_path / 'last.pth.tar', num_heads=2)
    build = dict(checkpoint=checkpoint, num_classes=10, in_chans=1, img_size=16)
    model = create_eval_model(VIT, model_kwargs={**VIT_KWARGS, 'num_heads': 2}, **build)
    assert model.blocks[0].attn.num_heads == 2
    with pytest.raises(ValueError) as info:  # equal weight shapes: timm alone loads this silently
        create_eval_model(VIT, model_kwargs={**VIT_KWARGS, 'num_heads': 4}, **build)
    message = str(info.value)
    assert str(checkpoint) in message and '2 attention heads' in message and 'has 4 heads' in message


def test_head_count_mismatch_is_refused_by_top1_cli_and_feature_extractor(tmp_path, digits_imagefolder):
    checkpoint = _train_checkpoint(tmp_path / 'model_best.pth.tar', num_heads=2)
    wrong = {**VIT_KWARGS, 'num_heads': 4}
    proc = subprocess.run(
        [sys.executable, str(REPO / 'eval' / 'top1.py'), '--model', VIT, '--num-classes', '10', '--in-chans', '1',
         '--img-size', '16', '--model-kwargs', *(f'{k}={v}' for k, v in wrong.items()), '--checkpoint',
         str(checkpoint), '--data-dir', str(digits_imagefolder), '--device', 'cpu', '-j', '0', '--no-progress'],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr and '--result' not in proc.stdout
    assert f'top1.py: error: Checkpoint {checkpoint} was trained as' in proc.stderr
    name, _ = register_timm_feature_extractor(VIT, checkpoint, num_classes=10, in_chans=1, img_size=16,
                                              model_kwargs=wrong)
    with pytest.raises(ValueError, match='has 4 heads per layer'):
        feature_size(name)  # eval/fid.py builds the extractor this way before sampling


def test_truncated_checkpoint_error_names_the_file(tmp_path):
    checkpoint = _train_checkpoint(tmp_path / 'last.pth.tar', num_heads=2)
    truncated = tmp_path / 'truncated.pth.tar'
    truncated.write_bytes(checkpoint.read_bytes()[:5000])
    with pytest.raises(ValueError, match='truncated.pth.tar'):
        create_eval_model(VIT, checkpoint=truncated, num_classes=10, in_chans=1, img_size=16, model_kwargs=VIT_KWARGS)
