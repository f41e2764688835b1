"""recipes/train_dit.py: DiT training with SHD through `accelerate launch`, resume, sampling and FID; clear errors.

The script runs as a user runs it (a subprocess); its pieces are tested from the library (`shd_plugins.diffusers`).
"""
from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel

from shd_plugins import SHDConfig
from shd_plugins.diffusers import (
    DiTDistillationObjective,
    LearnedSigmaVLB,
    default_dit_scheduler,
    disable_builtin_label_dropout,
    drop_class_labels,
    load_transformer,
    load_vae,
)
from shd_plugins.imagefolder import check_imagefolder

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'recipes' / 'train_dit.py'
IMAGE_SIZE = 32  # tests/conftest.py writes 32x32 digits
# Pixel-space, grayscale, learned sigma, 16 tokens (patch 8): the student has fewer heads and layers.
TINY = dict(in_channels=1, out_channels=2, sample_size=IMAGE_SIZE, patch_size=8, num_embeds_ada_norm=10)
TEACHER = dict(TINY, num_attention_heads=4, attention_head_dim=8, num_layers=3)
STUDENT = dict(TINY, num_attention_heads=2, attention_head_dim=8, num_layers=2)
VIT_KWARGS = {'patch_size': 8, 'embed_dim': 32, 'depth': 1, 'num_heads': 2}
TRAIN_LOG_NAME = 'train_log.jsonl'
ENV = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', TOKENIZERS_PARALLELISM='false')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _write_config(path: Path, config: dict) -> Path:
    path.write_text(json.dumps({'_class_name': 'DiTTransformer2DModel', '_comment': 'test', **config}))
    return path


@pytest.fixture(scope='module')
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny random teacher (a model folder with transformer/) and the student config."""
    root = tmp_path_factory.mktemp('train_dit_models')
    torch.manual_seed(0)
    DiTTransformer2DModel(**TEACHER).save_pretrained(root / 'teacher' / 'transformer')
    return {'teacher': root / 'teacher', 'student_config': _write_config(root / 'student.json', STUDENT)}


def _train_args(data: Path, models: dict[str, Path], output_dir: Path, *extra: str) -> list[str]:
    return [
        '--train_data_dir', str(data / 'train'), '--resolution', str(IMAGE_SIZE),
        '--model_config', str(models['student_config']),
        '--shd_teacher_model_name_or_path', str(models['teacher']),
        '--shd_weight', '1.0', '--output_kd_weight', '0.5', '--shd_temperature', '2.0',
        '--train_batch_size', '8', '--seed', '0', '--report_to', 'none', '--output_dir', str(output_dir), *extra,
    ]


def _launch(args: list[str], num_processes: int = 1, timeout: int = 240) -> subprocess.CompletedProcess:
    """`accelerate launch` on CPU: 1 process with --cpu; 2 CPU processes (gloo) via torchrun + ACCELERATE_USE_CPU."""
    env = dict(ENV)
    launch = [sys.executable, '-m', 'accelerate.commands.launch', '--num_processes', str(num_processes),
              '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no']
    if num_processes == 1:
        launch.append('--cpu')
    else:  # accelerate's --cpu path starts one process unless MPI is set up; this gives MULTI_CPU with gloo
        launch += ['--multi_gpu', '--main_process_port', str(_free_port())]
        env['ACCELERATE_USE_CPU'] = 'true'
    result = subprocess.run([*launch, str(SCRIPT), *args], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f'train_dit.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}'
    return result


def _run(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    """`python recipes/train_dit.py` (one process, no launcher): the in-process runs of the script."""
    result = subprocess.run([sys.executable, str(SCRIPT), *args], env=ENV, cwd=REPO, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f'train_dit.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}'
    return result


def _read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / TRAIN_LOG_NAME).read_text().splitlines()]


@pytest.mark.slow
def test_train_resume_sample_and_score(digits_imagefolder, models, tmp_path):
    out = tmp_path / 'run'
    _launch(_train_args(digits_imagefolder, models, out, '--max_train_steps', '2', '--checkpointing_steps', '2',
                        '--checkpoints_total_limit', '1', '--use_ema', '--gradient_checkpointing'))
    assert (out / 'checkpoint-2' / 'transformer_ema').is_dir()

    _launch(_train_args(digits_imagefolder, models, out, '--max_train_steps', '4', '--checkpointing_steps', '2',
                        '--checkpoints_total_limit', '1', '--use_ema', '--gradient_checkpointing',
                        '--resume_from_checkpoint', 'latest', '--validation_steps', '4',
                        '--num_validation_images', '2', '--validation_inference_steps', '2'))
    log = _read_log(out)
    resume = [r for r in log if r.get('event') == 'resume']
    assert len(resume) == 1 and resume[0]['step'] == 2 and resume[0]['resumed_from'].endswith('checkpoint-2')
    after = log[log.index(resume[0]) + 1:]
    assert [r['step'] for r in after if 'event' not in r] == [3, 4]
    assert after[-1] == {'event': 'end', 'step': 4}
    step = after[0]
    for key in ('loss', 'mse', 'vb', 'diffusion_loss', 'output_kd_loss', 'shd_loss', 'shd_loss/t1_s0',
                'shd_loss/t2_s1', 'shd_alpha_mean/t2_s1', 'lr'):
        assert math.isfinite(step[key]), key
    assert sorted(p.name for p in out.glob('checkpoint-*')) == ['checkpoint-4']  # limit 1 pruned checkpoint-2
    assert {'transformer', 'transformer_ema', 'scheduler', 'sample_config.json'} <= {
        p.name for p in (out / 'checkpoint-4').iterdir()}  # a checkpoint is also a sampler-readable folder
    assert (out / 'validation' / 'step-4.png').is_file()

    # The model folder the sampler reads: pixel space, grayscale, the digits' classes.
    sample_config = json.loads((out / 'sample_config.json').read_text())
    assert sample_config['pixel_space'] and sample_config['image_channels'] == 1
    assert sample_config['num_classes'] == 10
    assert DiTTransformer2DModel.from_pretrained(out / 'transformer').config.num_attention_heads == 2

    # Sample and score with eval/fid.py, features from a (random, tiny) timm classifier checkpoint.
    vit = timm.create_model('vit_tiny_patch16_224', num_classes=10, in_chans=1, img_size=IMAGE_SIZE, **VIT_KWARGS)
    torch.save(vit.state_dict(), tmp_path / 'vit.pth')
    fid_dir = tmp_path / 'fid'
    cmd = [sys.executable, str(REPO / 'eval' / 'fid.py'), '--model_path', str(out), '--num_samples', '10',
           '--num_inference_steps', '3', '--batch_size', '10', '--reference', str(digits_imagefolder / 'val'),
           '--metrics', 'fid', '--feature_extractor', 'timm', '--fe_model_name', 'vit_tiny_patch16_224',
           '--fe_checkpoint', str(tmp_path / 'vit.pth'), '--fe_num_classes', '10', '--fe_in_chans', '1',
           '--fe_img_size', str(IMAGE_SIZE), '--fe_model_kwargs',
           *[f'{k}={v}' for k, v in VIT_KWARGS.items()], '--output_dir', str(fid_dir), '--no_progress']
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1')
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((fid_dir / 'fid_results.json').read_text())
    assert results['num_samples'] == 10 and np.load(fid_dir / 'samples.npz')['arr_0'].shape == (10, 32, 32, 1)
    fid = [v for k, v in results['metrics'].items() if 'frechet' in k or k == 'fid']
    assert fid and all(math.isfinite(v) and v >= 0 for v in fid)


@pytest.mark.slow
def test_two_cpu_processes(digits_imagefolder, models, tmp_path):
    out = tmp_path / 'ddp'
    _launch(_train_args(digits_imagefolder, models, out, '--max_train_steps', '2', '--checkpointing_steps', '2',
                        '--use_ema'), num_processes=2)
    log = _read_log(out)
    assert log[0]['event'] == 'start' and log[0]['num_processes'] == 2 and log[0]['total_batch_size'] == 16
    assert [r['step'] for r in log if 'event' not in r] == [1, 2] and log[-1] == {'event': 'end', 'step': 2}
    assert {p.name for p in (out / 'checkpoint-2').glob('random_states_*.pkl')} == {
        'random_states_0.pkl', 'random_states_1.pkl'}
    assert (out / 'transformer' / 'config.json').is_file() and (out / 'scheduler').is_dir()


# ----------------------------------------------------------------------------------------------------------------
# Latent training, errors, loss pieces
# ----------------------------------------------------------------------------------------------------------------


def test_latent_training_saves_a_dit_pipeline(digits_imagefolder, tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * 2,
                        up_block_types=('UpDecoderBlock2D',) * 2, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=4, sample_size=IMAGE_SIZE)
    vae.save_pretrained(tmp_path / 'vae')
    latent = dict(in_channels=4, out_channels=8, sample_size=IMAGE_SIZE // 2, patch_size=4, num_embeds_ada_norm=10)
    DiTTransformer2DModel(**latent, num_attention_heads=4, attention_head_dim=8, num_layers=2).save_pretrained(
        tmp_path / 'teacher')
    config = _write_config(tmp_path / 'student.json', dict(latent, num_attention_heads=2, attention_head_dim=8,
                                                          num_layers=1))
    out = tmp_path / 'latent'
    _run([
        '--train_data_dir', str(digits_imagefolder / 'train'), '--resolution', str(IMAGE_SIZE),
        '--pretrained_vae_model_name_or_path', str(tmp_path / 'vae'), '--model_config', str(config),
        '--shd_teacher_model_name_or_path', str(tmp_path / 'teacher'), '--max_train_steps', '1',
        '--train_batch_size', '4', '--report_to', 'none', '--output_dir', str(out), '--seed', '0'])

    assert json.loads((out / 'sample_config.json').read_text())['pixel_space'] is False
    pipe = DiTPipeline.from_pretrained(out)
    assert pipe.transformer.config.num_attention_heads == 2 and pipe.vae.config.latent_channels == 4
    # guidance_scale=1: DiTPipeline hard-codes the null class id 1000 (ImageNet), out of range for 10 classes.
    images = pipe(class_labels=[0, 3], num_inference_steps=2, guidance_scale=1.0,
                  generator=torch.Generator().manual_seed(0), output_type='np').images
    assert images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and np.isfinite(images).all()


@pytest.mark.parametrize('case', ['token_count', 'sample_size', 'heads', 'channels', 'classes', 'vae', 'empty_data'])
def test_clear_errors(case, digits_imagefolder, models, tmp_path):
    """What the script builds from its flags fails with a ValueError that names the problem and the fix."""
    teacher, student = load_transformer(models['teacher']), DiTTransformer2DModel(**STUDENT)
    if case == 'token_count':
        teacher = DiTTransformer2DModel(**dict(TEACHER, patch_size=4))  # 64 tokens instead of the student's 16
        message = r'different token grids.*patch_size=4 gives \(32 / patch_size 4\)\^2 = 64'
    elif case == 'sample_size':
        teacher = DiTTransformer2DModel(**dict(TEACHER, sample_size=64, patch_size=16))
        message = 'different token grids.*sample_size=64'
    elif case == 'heads':
        student = DiTTransformer2DModel(**dict(STUDENT, num_attention_heads=8, attention_head_dim=4))
        message = 'has 4 heads but student layer .* has 8'
    elif case == 'channels':
        teacher = DiTTransformer2DModel(**dict(TEACHER, in_channels=3, out_channels=6))  # RGB vs grayscale
        message = "Teacher in_channels=3 differs from the student's 1"
    elif case == 'classes':
        teacher = DiTTransformer2DModel(**dict(TEACHER, num_embeds_ada_norm=20))
        message = "Teacher num_embeds_ada_norm=20 differs from the student's 10.*null .*class id"
    elif case == 'vae':
        message = '--pretrained_vae_model_name_or_path .*no_such_vae does not exist'
    else:
        (tmp_path / 'empty').mkdir()
        message = 'is not an ImageFolder: it has no class subfolders'
    with pytest.raises(ValueError, match=message):
        if case == 'vae':
            load_vae(tmp_path / 'no_such_vae', flag='--pretrained_vae_model_name_or_path')
        elif case == 'empty_data':
            check_imagefolder(tmp_path / 'empty')
        else:
            DiTDistillationObjective(student, teacher, SHDConfig(temperature=2.0), output_kd_weight=0.5)


def test_user_error_ends_the_script_as_argparse_does(digits_imagefolder, models, tmp_path):
    """One `train_dit.py: error: <message>` line on stderr, exit status 2, no traceback."""
    config = _write_config(tmp_path / 'wide.json', dict(STUDENT, num_attention_heads=8, attention_head_dim=4))
    args = _train_args(digits_imagefolder, models, tmp_path / 'out', '--max_train_steps', '1')
    args[args.index('--model_config') + 1] = str(config)
    result = subprocess.run([sys.executable, str(SCRIPT), *args], env=ENV, cwd=REPO, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 2, result.stderr[-4000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith('train_dit.py: error: ')]
    assert len(errors) == 1 and 'Traceback' not in result.stderr, result.stderr[-4000:]
    assert re.search('has 4 heads but student layer .* has 8', errors[0]), errors[0]


def test_learned_sigma_vlb_is_zero_at_the_true_posterior():
    """With the true noise and the posterior variance (var_values = -1), p(x_{t-1}|x_t) is q's posterior: KL = 0."""
    scheduler = default_dit_scheduler()
    vlb = LearnedSigmaVLB(scheduler.betas)
    x0 = torch.rand(3, 1, 8, 8) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([1, 500, 999])
    x_t = scheduler.add_noise(x0, noise, t)
    exact = vlb(noise, -torch.ones_like(x0), x0, x_t, t)
    assert torch.allclose(exact, torch.zeros(3), atol=1e-3)
    off = vlb(noise + 0.5, torch.zeros_like(x0), x0, x_t, t)
    assert (off > exact).all()
    nll = vlb(noise, torch.zeros_like(x0), x0, scheduler.add_noise(x0, noise, torch.zeros(3, dtype=torch.long)),
              torch.zeros(3, dtype=torch.long))  # t = 0: discretised decoder NLL, positive bits
    assert (nll > 0).all()


def test_labels_are_dropped_once_for_teacher_and_student():
    """diffusers' DiT drops labels per block in train mode; the script disables that and drops them itself."""
    torch.manual_seed(0)
    model = DiTTransformer2DModel(**STUDENT).train()  # PyTorch init: labels change the output from step 0
    x, t, labels = torch.randn(16, 1, 32, 32), torch.randint(0, 1000, (16,)), torch.arange(16) % 10
    with torch.no_grad():  # built-in dropout: two calls see different labels
        assert not torch.equal(model(x, timestep=t, class_labels=labels).sample,
                               model(x, timestep=t, class_labels=labels).sample)
    disable_builtin_label_dropout(model)
    with torch.no_grad():
        assert torch.equal(model(x, timestep=t, class_labels=labels).sample,
                           model(x, timestep=t, class_labels=labels).sample)
    dropped = drop_class_labels(labels, 0.5, null_class=10)
    assert ((dropped == labels) | (dropped == 10)).all() and (dropped == 10).any()
    assert torch.equal(drop_class_labels(labels, 0.0, 10), labels)
