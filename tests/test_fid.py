"""FID machinery: torch-fidelity with a timm classifier extractor, reference kinds, offline Inception, the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import timm
import torch
from PIL import Image
from sklearn.datasets import load_digits
from tiny_models import tiny_dit
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from shd_plugins.evaluation import (
    INCEPTION,
    FeatureStats,
    MissingInceptionWeightsError,
    compute_metrics,
    default_inception_weights_path,
    extract_features,
    frechet_distance,
    load_images,
    load_reference,
    register_timm_feature_extractor,
    resolve_inception_weights,
    save_npz,
    save_reference_stats,
)

REPO = Path(__file__).resolve().parents[1]
VIT_KWARGS = {'patch_size': 4, 'embed_dim': 32, 'depth': 1, 'num_heads': 2}
TIMM = dict(num_classes=10, in_chans=1, img_size=16, model_kwargs=VIT_KWARGS)


def digits_uint8(classes: set[int], count: int) -> np.ndarray:
    """`count` sklearn digits of `classes` as 16x16 grayscale uint8 NHWC (8x8 upsampled by pixel repetition)."""
    digits = load_digits()
    pixels = digits.images[np.isin(digits.target, list(classes))][:count]
    images = np.kron(pixels, np.ones((2, 2))) * (255.0 / 16.0)
    return images.round().astype(np.uint8)[..., None]


@pytest.fixture(scope='module')
def low_digits() -> np.ndarray:
    return digits_uint8({0, 1, 2, 3, 4}, 120)


@pytest.fixture(scope='module')
def high_digits() -> np.ndarray:
    return digits_uint8({5, 6, 7, 8, 9}, 100)


@pytest.fixture(scope='module')
def timm_extractor(tmp_path_factory) -> str:
    """A tiny randomly initialised 1-channel ViT, saved as a timm train checkpoint and registered."""
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', num_classes=10, in_chans=1, img_size=16, **VIT_KWARGS)
    path = tmp_path_factory.mktemp('vit') / 'checkpoint.pth.tar'
    torch.save({'state_dict': model.state_dict(), 'epoch': 0}, path)
    name, layer = register_timm_feature_extractor('vit_tiny_patch16_224', path, **TIMM)
    assert layer == 'pre_logits'
    assert register_timm_feature_extractor('vit_tiny_patch16_224', path, **TIMM)[0] == name  # idempotent
    return name


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Textbook FID of two feature sets: |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b))."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


def test_fid_self_zero_other_larger_and_equal_to_scipy(timm_extractor, low_digits, high_digits):
    same = compute_metrics(low_digits, low_digits, feature_extractor=timm_extractor, verbose=False, kid_subsets=10)
    other = compute_metrics(low_digits, high_digits, feature_extractor=timm_extractor, verbose=False, kid_subsets=10)

    assert same['tool'] == 'torch-fidelity' and same['tool_version']
    assert same['feature_extractor'] == timm_extractor and same['feature_extractor_config']['kind'] == 'timm'
    assert (other['num_samples'], other['num_reference']) == (120, 100)
    assert other['settings']['kid_subset_size'] == 100  # clipped to the smaller set
    assert other['feature_layers'] == {'isc': 'logits', 'fid': 'pre_logits', 'kid': 'pre_logits', 'prc': 'pre_logits'}
    assert set(other['metrics']) >= {
        'frechet_inception_distance', 'inception_score_mean', 'kernel_inception_distance_mean', 'precision', 'recall',
    }
    assert abs(same['metrics']['frechet_inception_distance']) < 1e-3
    assert same['metrics']['precision'] == same['metrics']['recall'] == 1.0
    fid = other['metrics']['frechet_inception_distance']
    assert fid > 1000 * abs(same['metrics']['frechet_inception_distance'])

    features = [extract_features(x, timm_extractor)['pre_logits'] for x in (low_digits, high_digits)]
    assert features[0].shape == (120, VIT_KWARGS['embed_dim'])
    assert fid == pytest.approx(scipy_frechet(*features), rel=1e-4)
    json.dumps(other)  # JSON-ready


def test_reference_as_precomputed_statistics(tmp_path, timm_extractor, low_digits, high_digits):
    stats_npz = save_reference_stats(high_digits, tmp_path / 'ref_stats.npz', feature_extractor=timm_extractor)
    with_images = compute_metrics(
        low_digits, high_digits, feature_extractor=timm_extractor, isc=False, kid=False, prc=False, verbose=False
    )
    from_stats = compute_metrics(low_digits, stats_npz, feature_extractor=timm_extractor, verbose=False)
    assert from_stats['reference']['kind'] == 'statistics' and from_stats['num_reference'] is None
    assert from_stats['reference']['fid_from'] == 'precomputed mu/sigma'
    assert set(from_stats['skipped']) == {'kid', 'prc'}
    assert 'inception_score_mean' in from_stats['metrics']  # IS needs the samples only
    assert from_stats['metrics']['frechet_inception_distance'] == pytest.approx(
        with_images['metrics']['frechet_inception_distance'], rel=1e-6
    )

    # ADM reference batches hold both: FID from mu/sigma, KID and precision/recall from arr_0.
    npz = np.load(stats_npz)
    both = tmp_path / 'adm_style.npz'
    np.savez(both, arr_0=high_digits, mu=npz['mu'], sigma=npz['sigma'])
    full = compute_metrics(low_digits, both, feature_extractor=timm_extractor, isc=False, verbose=False, kid_subsets=5)
    assert full['reference']['kind'] == 'statistics+images' and not full['skipped']
    assert full['metrics']['frechet_inception_distance'] == pytest.approx(
        from_stats['metrics']['frechet_inception_distance'], rel=1e-9
    )
    assert {'kernel_inception_distance_mean', 'precision', 'recall'} <= set(full['metrics'])

    (tmp_path / 'inception.pth').write_bytes(b'')  # never read: the mismatch is found first
    with pytest.raises(ValueError, match='were made with'):
        compute_metrics(low_digits, stats_npz, inception_weights=tmp_path / 'inception.pth', verbose=False)

    wrong = tmp_path / 'wrong_dim.npz'
    np.savez(wrong, mu=np.zeros(7), sigma=np.eye(7))
    with pytest.raises(ValueError, match='statistics of 7 features, but the feature extractor gives 32'):
        compute_metrics(low_digits, wrong, feature_extractor=timm_extractor, isc=False, verbose=False)


def test_images_io(tmp_path, low_digits):
    path = save_npz(low_digits, tmp_path / 'samples.npz')
    with np.load(path) as npz:
        assert npz.files == ['arr_0'] and npz['arr_0'].dtype == np.uint8
    np.testing.assert_array_equal(load_images(path), low_digits)

    folder = tmp_path / 'folder' / 'nested'
    folder.mkdir(parents=True)
    for i, image in enumerate(low_digits[:5]):
        Image.fromarray(image[..., 0]).save(folder / f'{i:03d}.png')
    from_folder = load_images(tmp_path / 'folder')
    assert from_folder.shape == (5, 16, 16, 3)  # folders are read as RGB
    np.testing.assert_array_equal(from_folder[..., 1:2], low_digits[:5])
    assert len(load_reference(tmp_path / 'folder').images) == 5

    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='No images'):
        load_images(tmp_path / 'empty')
    with pytest.raises(ValueError, match='No images'):
        compute_metrics(tmp_path / 'empty', low_digits, feature_extractor=INCEPTION, inception_weights=path)
    with pytest.raises(ValueError, match='uint8'):
        save_npz(low_digits.astype(np.float32), tmp_path / 'bad.npz')
    (tmp_path / 'corrupt.npz').write_bytes(b'not a zip')
    with pytest.raises(ValueError, match='corrupt.npz'):
        load_reference(tmp_path / 'corrupt.npz')
    np.savez(tmp_path / 'other_keys.npz', x=np.zeros(3))
    with pytest.raises(ValueError, match='arr_0'):
        load_reference(tmp_path / 'other_keys.npz')
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_reference(tmp_path / 'missing.npz')


def test_missing_inception_weights_offline(tmp_path, monkeypatch, low_digits):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    expected = tmp_path / 'torch_home' / 'hub' / 'checkpoints' / 'weights-inception-2015-12-05-6726825d.pth'
    assert default_inception_weights_path() == expected
    with pytest.raises(MissingInceptionWeightsError) as info:
        compute_metrics(low_digits, low_digits, verbose=False)
    message = str(info.value)
    assert 'weights-inception-2015-12-05-6726825d.pth' in message
    assert str(expected.parent) in message and '--inception_weights PATH' in message
    assert not expected.exists()  # nothing was downloaded
    with pytest.raises(MissingInceptionWeightsError, match='nope.pth'):
        resolve_inception_weights(tmp_path / 'nope.pth')
    with pytest.raises(MissingInceptionWeightsError, match='Could not download'):  # offline: torch.hub's download
        resolve_inception_weights(allow_download=True)
    assert not expected.exists()  # no partial file left where the cache is looked up

    expected.write_bytes(b'')  # present, but no weights: refused, naming it (tests/test_eval_safety.py has more)
    with pytest.raises(ValueError, match=str(expected)):
        resolve_inception_weights()


def test_feature_stats_validation():
    with pytest.raises(ValueError, match='sigma'):
        FeatureStats(np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match=r'different feature sizes \(3 vs 4\)'):
        frechet_distance(FeatureStats(np.zeros(3), np.eye(3)), FeatureStats(np.zeros(4), np.eye(4)))


def _run_fid_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`eval/fid.py` as a user runs it, offline: TORCH_HOME points at an empty folder (no cached Inception)."""
    env = {**os.environ, 'TORCH_HOME': str(cwd / 'torch_home'), 'HF_HUB_OFFLINE': '1'}
    cmd = [sys.executable, str(REPO / 'eval' / 'fid.py'), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def _error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if 'error:' in line]


def test_cli_scores_samples_with_timm_extractor(tmp_path, timm_extractor, low_digits, high_digits):
    samples = save_npz(low_digits, tmp_path / 'in' / 'samples.npz')
    reference = tmp_path / 'reference'
    for i, image in enumerate(high_digits):
        (reference / str(i % 10)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0]).save(reference / str(i % 10) / f'{i}.png')
    checkpoint = tmp_path / 'vit_state_dict.pth'
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', num_classes=10, in_chans=1, img_size=16, **VIT_KWARGS)
    torch.save(model.state_dict(), checkpoint)
    out = tmp_path / 'out'
    proc = _run_fid_cli(
        '--samples', str(samples), '--reference', str(reference),
        '--feature_extractor', 'timm', '--fe_model_name', 'vit_tiny_patch16_224', '--fe_checkpoint', str(checkpoint),
        '--fe_num_classes', '10', '--fe_in_chans', '1', '--fe_img_size', '16',
        '--fe_model_kwargs', *(f'{k}={v}' for k, v in VIT_KWARGS.items()),
        '--kid_subsets', '10', '--output_dir', str(out), '--no_progress', cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / 'fid_results.json').read_text())
    assert results['tool'] == 'torch-fidelity' and results['feature_extractor'].startswith('timm-vit_tiny')
    assert results['num_samples'] == 120 and results['num_reference'] == 100
    assert results['reference']['kind'] == 'images'
    assert results['args']['fe_model_kwargs'] == VIT_KWARGS
    # Same model, same data: the CLI (PNG reference read by torch-fidelity) matches the in-process value.
    direct = compute_metrics(low_digits, high_digits, feature_extractor=timm_extractor, isc=False, kid=False,
                             prc=False, verbose=False)
    assert results['metrics']['frechet_inception_distance'] == pytest.approx(
        direct['metrics']['frechet_inception_distance'], rel=1e-5
    )
    np.testing.assert_array_equal(np.load(out / 'samples.npz')['arr_0'], low_digits)
    assert Image.open(out / 'samples_grid.png').size == (8 * 16, 8 * 16)

    # Offline without Inception weights: a clear error, before anything is written.
    proc = _run_fid_cli('--samples', str(samples), '--reference', str(reference), '--output_dir',
                        str(tmp_path / 'out2'), cwd=tmp_path)
    assert proc.returncode != 0 and '--inception_weights PATH' in proc.stderr
    assert not (tmp_path / 'out2').exists()
    # The one command-line convention: `fid.py: error: <message>`, exit status 2, no traceback.
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert len(_error_lines(proc)) == 1 and _error_lines(proc)[0].startswith('fid.py: error: ')


def test_cli_generates_from_a_trained_folder(tmp_path, timm_extractor, high_digits):
    model_dir = tmp_path / 'model'
    tiny_dit(num_heads=2, num_layers=1, in_channels=1, learn_sigma=True).save_pretrained(model_dir / 'transformer')
    (model_dir / 'sample_config.json').write_text(json.dumps({'num_classes': 10, 'pixel_space': True}))
    reference = save_npz(high_digits[:, ::2, ::2], tmp_path / 'ref.npz')  # 8x8, the model's output size
    checkpoint = FEATURE_EXTRACTORS_REGISTRY[timm_extractor].timm_config['checkpoint']
    proc = _run_fid_cli(
        '--model_path', str(model_dir), '--num_samples', '12', '--batch_size', '5', '--num_inference_steps', '2',
        '--reference', str(reference), '--metrics', 'fid', 'kid', '--kid_subsets', '5',
        '--feature_extractor', 'timm', '--fe_model_name', 'vit_tiny_patch16_224', '--fe_checkpoint', checkpoint,
        '--fe_num_classes', '10', '--fe_in_chans', '1', '--fe_img_size', '16',
        '--fe_model_kwargs', *(f'{k}={v}' for k, v in VIT_KWARGS.items()),
        '--output_dir', str(tmp_path / 'out'), '--no_progress', cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / 'out' / 'fid_results.json').read_text())
    assert results['num_samples'] == 12 and results['generation']['rank_seeds'] == [0]
    assert results['generation']['null_class_id'] == 10
    assert set(results['metrics']) == {'frechet_inception_distance', 'kernel_inception_distance_mean',
                                       'kernel_inception_distance_std'}
    assert f"results: {tmp_path / 'out' / 'fid_results.json'}" in proc.stdout
    samples = np.load(tmp_path / 'out' / 'samples.npz')['arr_0']
    assert samples.shape == (12, 8, 8, 1) and samples.dtype == np.uint8
    assert results['args']['num_inference_steps'] == 2 and results['metric_settings']['kid_subset_size'] == 12
    # DiT's FID-50K protocol is what a user gets without flags: DDPM, guidance 1.5, classes spread evenly, seed 0,
    # and (see --help) 50k samples of 250 steps.
    args = results['args']
    assert (args['scheduler'], args['guidance_scale'], args['class_labels'], args['seed']) == ('ddpm', 1.5, 'even', 0)
    help_text = ' '.join(_run_fid_cli('--help', cwd=tmp_path).stdout.split())
    assert 'total samples (default: 50000)' in help_text and 'denoising steps (default: 250)' in help_text
    assert 'disables it (default: 1.5)' in help_text and 'sampler (default: ddpm)' in help_text


@pytest.mark.slow
def test_inception_path_with_local_weights(tmp_path, low_digits, high_digits):
    """The default extractor end to end from a local weights file (random weights: plumbing, not values)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class RandomInception(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True):  # keep the random init: no weights exist offline
            return None

    torch.save({}, tmp_path / 'empty.pth')
    weights = tmp_path / 'inception_random.pth'
    random_init = RandomInception('x', ['2048'], feature_extractor_weights_path=str(tmp_path / 'empty.pth'))
    torch.save(random_init.state_dict(), weights)
    results = compute_metrics(low_digits[:5], high_digits[:5], inception_weights=weights, verbose=False, kid_subsets=2)
    assert results['feature_extractor'] == INCEPTION and results['feature_extractor_config']['weights'] == str(weights)
    assert results['feature_layers'] == {'isc': 'logits_unbiased', 'fid': '2048', 'kid': '2048', 'prc': '2048'}
    assert set(results['metrics']) >= {'frechet_inception_distance', 'inception_score_mean', 'precision'}
