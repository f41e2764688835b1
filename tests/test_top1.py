"""Tests of top-1/top-5 evaluation: the ``eval/top1.py`` CLI against a plain per-image loop."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_transform, resolve_input_data_config
from timm.utils import natural_key

from shd_plugins.evaluation import build_eval_loader, create_eval_model, evaluate_classifier, resolve_split_dir

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / 'eval' / 'top1.py'
MODEL_NAME = 'vit_tiny_patch16_224'
MODEL_KWARGS = dict(patch_size=8, embed_dim=32, depth=2, num_heads=4)
MODEL_ARGS = [
    '--model', MODEL_NAME, '--num-classes', '10', '--in-chans', '1', '--img-size', '32',
    '--model-kwargs', *[f'{k}={v}' for k, v in MODEL_KWARGS.items()],
]


def _tiny_vit(num_classes: int = 10, in_chans: int = 1) -> torch.nn.Module:
    return timm.create_model(MODEL_NAME, num_classes=num_classes, in_chans=in_chans, img_size=32, **MODEL_KWARGS)


def _plain_loop(model: torch.nn.Module, split_dir: Path) -> dict[str, float]:
    """Reference: open each PNG, apply the model's create_transform, count argmax hits (timm's file order)."""
    transform = create_transform(**resolve_input_data_config(model, use_test_size=True))
    samples = [(p, int(p.parent.name)) for p in split_dir.glob('*/*.png')]
    samples.sort(key=lambda s: natural_key(str(s[0])))
    model.eval()
    correct1 = correct5 = 0
    loss_sum = 0.0
    with torch.inference_mode():
        for start in range(0, len(samples), 64):
            batch = samples[start:start + 64]
            images = torch.stack([transform(Image.open(p).convert('L')) for p, _ in batch])
            targets = torch.tensor([t for _, t in batch])
            logits = model(images)
            correct1 += int((logits.argmax(1) == targets).sum())
            correct5 += int((logits.topk(5, 1).indices == targets[:, None]).any(1).sum())
            loss_sum += float(F.cross_entropy(logits, targets, reduction='sum'))
    return {'correct1': correct1, 'correct5': correct5, 'loss': loss_sum / len(samples), 'n': len(samples)}


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(CLI), *MODEL_ARGS, '-b', '64', '-j', '0', '--device', 'cpu', '--no-progress', *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope='module')
def ema_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """A timm-train-style checkpoint dict with different ``state_dict`` and ``state_dict_ema`` weights."""
    torch.manual_seed(1)
    model, ema = _tiny_vit(), _tiny_vit()
    path = tmp_path_factory.mktemp('ckpt') / 'checkpoint.pth.tar'
    checkpoint = {'epoch': 3, 'arch': MODEL_NAME, 'state_dict': model.state_dict(), 'state_dict_ema': ema.state_dict()}
    torch.save(checkpoint, path)
    return path, model.state_dict(), ema.state_dict()


def test_cli_matches_plain_loop(digits_imagefolder: Path, tmp_path: Path) -> None:
    model = _tiny_vit()
    checkpoint = tmp_path / 'model.pth'
    torch.save(model.state_dict(), checkpoint)
    results_file = tmp_path / 'out' / 'top1.json'

    proc = _run_cli('--checkpoint', str(checkpoint), '--data-dir', str(digits_imagefolder),
                    '--results-file', str(results_file))
    assert proc.returncode == 0, proc.stderr
    results = json.loads(results_file.read_text())
    assert json.loads(proc.stdout.split('--result\n', 1)[1]) == results

    ref = _plain_loop(model, digits_imagefolder / 'val')
    assert results['num_samples'] == ref['n'] == 359
    assert results['top1_correct'] == ref['correct1']
    assert results['top1'] == round(100.0 * ref['correct1'] / ref['n'], 4)
    assert results['top5_correct'] == ref['correct5']
    assert results['loss'] == pytest.approx(ref['loss'], abs=1e-5)
    assert {k: results[k] for k in ('model', 'checkpoint', 'img_size', 'crop_pct', 'interpolation', 'split')} == {
        'model': MODEL_NAME, 'checkpoint': str(checkpoint), 'img_size': 32, 'crop_pct': 0.9,
        'interpolation': 'bicubic', 'split': 'val',
    }


def test_use_ema_loads_ema_weights(digits_imagefolder: Path, ema_checkpoint) -> None:
    path, state_dict, ema_state_dict = ema_checkpoint
    refs = {}
    for name, sd in (('model', state_dict), ('ema', ema_state_dict)):
        model = _tiny_vit()
        model.load_state_dict(sd)
        refs[name] = _plain_loop(model, digits_imagefolder / 'val')
    assert refs['model']['loss'] != pytest.approx(refs['ema']['loss'], abs=1e-4)

    proc = _run_cli('--checkpoint', str(path), '--use-ema', '--data-dir', str(digits_imagefolder))
    assert proc.returncode == 0, proc.stderr
    ema_results = json.loads(proc.stdout.split('--result\n', 1)[1])
    model = create_eval_model(MODEL_NAME, checkpoint=path, num_classes=10, in_chans=1, img_size=32,
                              model_kwargs=MODEL_KWARGS)  # the library path the CLI takes, without --use-ema
    loader = build_eval_loader(digits_imagefolder, model, batch_size=64)
    plain_results = evaluate_classifier(model, loader, device='cpu', progress=False)
    for results, ref in ((ema_results, refs['ema']), (plain_results, refs['model'])):
        assert results['top1_correct'] == ref['correct1']
        assert results['loss'] == pytest.approx(ref['loss'], abs=1e-5)


def test_missing_checkpoint_error(digits_imagefolder: Path, tmp_path: Path) -> None:
    missing = tmp_path / 'nope' / 'model_best.pth.tar'
    proc = _run_cli('--checkpoint', str(missing), '--data-dir', str(digits_imagefolder))
    assert proc.returncode == 2
    assert f'--checkpoint {missing}: no such file' in proc.stderr
    assert 'Traceback' not in proc.stderr
    # The one command-line convention (argparse's): a single `top1.py: error: <message>` line, exit status 2.
    lines = [line for line in proc.stderr.splitlines() if 'error:' in line]
    assert len(lines) == 1 and lines[0].startswith('top1.py: error: --checkpoint'), proc.stderr


def test_user_errors_name_the_fix(digits_imagefolder: Path, tmp_path: Path) -> None:
    """The errors the CLI prints (see test_missing_checkpoint_error for how), raised by the library it calls."""
    (tmp_path / 'flat').mkdir()
    Image.new('L', (8, 8)).save(tmp_path / 'flat' / '1.png')
    with pytest.raises(ValueError, match='No weights to evaluate: pass --checkpoint PATH'):
        create_eval_model(MODEL_NAME, num_classes=10, in_chans=1, img_size=32, model_kwargs=MODEL_KWARGS)
    flat = (f"{tmp_path / 'flat'} is not an ImageFolder: it holds 1 image file(s) at the top level (e.g. 1.png) but "
            'no class subfolders. Expected layout: <dir>/<class_name>/<image files>')
    no_split = f"There is no 'test' subfolder in {digits_imagefolder}"
    for (data_dir, split), message in (((tmp_path / 'flat', 'val'), flat), ((digits_imagefolder, 'test'), no_split)):
        with pytest.raises(ValueError) as info:
            resolve_split_dir(data_dir, split)
        assert message in str(info.value)


def test_sharded_loader_sees_every_image_once(digits_imagefolder: Path) -> None:
    """``rank``/``world_size`` split the images into interleaved shards, none repeated, none dropped."""
    model = _tiny_vit()
    full_images, full_targets = next(iter(build_eval_loader(digits_imagefolder, model, batch_size=512)))
    assert len(full_targets) == 359
    world_size = 3
    shards = [next(iter(build_eval_loader(digits_imagefolder, model, batch_size=512, rank=rank,
                                          world_size=world_size))) for rank in range(world_size)]
    assert sum(len(targets) for _, targets in shards) == len(full_targets)
    assert [len(targets) for _, targets in shards] == [120, 120, 119]
    for rank, (images, targets) in enumerate(shards):
        assert torch.equal(targets, full_targets[rank::world_size])
        assert torch.equal(images, full_images[rank::world_size])
    with pytest.raises(ValueError, match='rank=3 must be in'):
        build_eval_loader(digits_imagefolder, model, rank=3, world_size=3)


def test_rgb_loader_and_top5_clip(digits_imagefolder: Path) -> None:
    rgb_model = _tiny_vit(num_classes=10, in_chans=3)
    loader = build_eval_loader(digits_imagefolder, rgb_model, split='val', batch_size=16, workers=0)
    images, targets = next(iter(loader))
    assert images.shape == (16, 3, 32, 32) and targets.dtype == torch.int64
    assert torch.equal(images[:, 0], images[:, 1])  # grayscale PNGs converted to RGB

    three_class = _tiny_vit(num_classes=3)
    batches = [(torch.randn(8, 1, 32, 32), torch.randint(0, 3, (8,))) for _ in range(2)]
    results = evaluate_classifier(three_class, batches, device='cpu', progress=False)
    assert results['top5'] == 100.0 and results['num_samples'] == 16  # k clipped to num_classes
    with pytest.raises(ValueError, match='Requested 3 input channels'):
        build_eval_loader(digits_imagefolder, three_class, in_chans=3, batch_size=4)
