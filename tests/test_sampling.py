"""Class-conditional DiT sampling: equal to diffusers' DiTPipeline, deterministic, and split over ranks correctly."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
)

from shd_plugins.diffusers import (
    DiTComponents,
    build_scheduler,
    class_labels_for_protocol,
    default_dit_scheduler,
    generate_samples,
    load_dit_components,
    rank_seed,
    sample_class_conditional,
)


def tiny_transformer(in_channels: int = 4, num_classes: int = 1000, sample_size: int = 8) -> DiTTransformer2DModel:
    """Tiny learned-sigma DiT. DiTPipeline hard-codes the null class 1000, hence 1000 classes by default."""
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=in_channels,
        out_channels=2 * in_channels,
        num_layers=2,
        sample_size=sample_size,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
        norm_num_groups=8,
    ).eval()


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=('DownEncoderBlock2D', 'DownEncoderBlock2D'),
        up_block_types=('UpDecoderBlock2D', 'UpDecoderBlock2D'),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=0.5,
    ).eval()


@pytest.fixture(scope='module')
def latent_model() -> tuple[DiTTransformer2DModel, AutoencoderKL]:
    torch.manual_seed(0)
    transformer, vae = tiny_transformer(), tiny_vae()
    # Random ada-norm-zero init makes every block the identity; perturb so guidance and sigma matter.
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return transformer, vae


def pipeline_images(pipe: DiTPipeline, labels: list[int], **kwargs) -> np.ndarray:
    """DiTPipeline output as uint8, rounded the way `numpy_to_pil` does."""
    images = pipe(class_labels=labels, output_type='np', **kwargs).images
    return (images * 255).round().astype('uint8')


@pytest.mark.parametrize('scheduler_cls', [DDIMScheduler, DPMSolverMultistepScheduler])
@pytest.mark.parametrize('guidance_scale', [1.0, 1.5])
def test_matches_dit_pipeline_with_generator(latent_model, scheduler_cls, guidance_scale):
    transformer, vae = latent_model
    scheduler = scheduler_cls.from_config(default_dit_scheduler().config)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    labels = [3, 999, 0]
    expected = pipeline_images(
        pipe, labels, guidance_scale=guidance_scale, num_inference_steps=3, generator=torch.Generator().manual_seed(7)
    )
    ours = sample_class_conditional(
        transformer,
        scheduler,
        labels,
        vae=vae,
        guidance_scale=guidance_scale,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(7),
        progress=False,
    )
    assert ours.dtype == torch.uint8 and ours.shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(ours.numpy(), expected)


def test_matches_dit_pipeline_ddpm_global_rng(latent_model):
    # DiTPipeline draws DDPM's step noise from the global RNG; with generator=None we draw the same numbers.
    transformer, vae = latent_model
    scheduler = default_dit_scheduler()
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(11)
    expected = pipeline_images(pipe, [5, 6], guidance_scale=1.5, num_inference_steps=3)
    torch.manual_seed(11)
    ours = sample_class_conditional(
        transformer, scheduler, [5, 6], vae=vae, guidance_scale=1.5, num_inference_steps=3, progress=False
    )
    np.testing.assert_array_equal(ours.numpy(), expected)


def test_ddpm_is_reproducible_from_the_generator(latent_model):
    transformer, vae = latent_model
    scheduler = default_dit_scheduler()

    def run() -> torch.Tensor:
        return sample_class_conditional(
            transformer, scheduler, [1, 2], vae=vae, num_inference_steps=3,
            generator=torch.Generator().manual_seed(3), progress=False,
        )

    first = run()
    torch.manual_seed(12345)  # the global RNG must not matter
    np.testing.assert_array_equal(first.numpy(), run().numpy())


def test_learned_range_ddpm_uses_sigma_channels(latent_model):
    transformer, vae = latent_model
    fixed = default_dit_scheduler()
    learned = DDPMScheduler.from_config(fixed.config, variance_type='learned_range')
    kwargs = dict(vae=vae, num_inference_steps=3, progress=False)
    a = sample_class_conditional(transformer, fixed, [4], generator=torch.Generator().manual_seed(0), **kwargs)
    b = sample_class_conditional(transformer, learned, [4], generator=torch.Generator().manual_seed(0), **kwargs)
    assert a.shape == b.shape and not torch.equal(a, b)
    # DPM-Solver built from such a config must not slice channels IF-style.
    assert build_scheduler('dpm', learned.config).config.variance_type is None


@pytest.fixture(scope='module')
def pixel_components() -> DiTComponents:
    torch.manual_seed(1)
    transformer = tiny_transformer(in_channels=1, num_classes=10)
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return DiTComponents(transformer, default_dit_scheduler(), None, num_classes=10, pixel_space=True, image_channels=1)


def test_pixel_space_generation_is_deterministic_uint8_nhwc(pixel_components):
    kwargs = dict(batch_size=4, seed=5, guidance_scale=1.5, num_inference_steps=2)
    first = generate_samples(pixel_components, 10, **kwargs)
    again = generate_samples(pixel_components, 10, **kwargs)
    other = generate_samples(pixel_components, 10, **{**kwargs, 'seed': 6})
    assert first.dtype == np.uint8 and first.shape == (10, 8, 8, 1)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    for scheduler_name in ('ddim', 'dpm'):
        assert generate_samples(pixel_components, 3, scheduler_name=scheduler_name, **kwargs).shape == (3, 8, 8, 1)


def test_generation_equals_direct_sampling_in_label_order(pixel_components):
    # One process: batches consume one generator seeded `seed`, labels cycle through the classes.
    images = generate_samples(pixel_components, 5, batch_size=3, seed=2, guidance_scale=1.5, num_inference_steps=2)
    generator = torch.Generator().manual_seed(rank_seed(2, 0, 1))
    scheduler = build_scheduler('ddpm', pixel_components.scheduler.config)
    direct = [
        sample_class_conditional(
            pixel_components.transformer, scheduler, labels, guidance_scale=1.5, num_inference_steps=2,
            generator=generator, progress=False,
        )
        for labels in ([0, 1, 2], [3, 4])
    ]
    np.testing.assert_array_equal(images, torch.cat(direct).numpy())


class FakeRank:
    """The slice of `accelerate.Accelerator` that `generate_samples` reads: one rank of a simulated world.

    `gather` stands in for the collective by repeating this rank's batch, which keeps the shapes right.
    """

    def __init__(self, rank: int, world_size: int):
        self.process_index, self.num_processes, self.device = rank, world_size, torch.device('cpu')

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor] * self.num_processes)


def test_per_rank_seeds_and_split():
    assert [rank_seed(3, r, 4) for r in range(4)] == [12, 13, 14, 15]
    assert len({rank_seed(s, r, 2) for s in range(3) for r in range(2)}) == 6
    labels = class_labels_for_protocol(7, 3)
    assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    random_labels = class_labels_for_protocol(100, 3, mode='random', seed=1)
    assert set(random_labels.tolist()) == {0, 1, 2}
    np.testing.assert_array_equal(random_labels, class_labels_for_protocol(100, 3, mode='random', seed=1))


def test_two_ranks_cover_every_label_in_order(pixel_components, monkeypatch):
    # Record the labels each rank is asked for; together, rank-major per round, they must be the global order.
    import shd_plugins.diffusers.sampling as sampling

    seen: dict[int, list[list[int]]] = {0: [], 1: []}
    seeds: dict[int, int] = {}
    original = sampling.sample_class_conditional

    def recording(transformer, scheduler, class_labels, *, generator, **kwargs):
        rank = current['rank']
        seeds.setdefault(rank, generator.initial_seed())
        seen[rank].append(class_labels.tolist())
        return original(transformer, scheduler, class_labels, generator=generator, **kwargs)

    monkeypatch.setattr(sampling, 'sample_class_conditional', recording)
    current = {}
    outputs = {}
    for rank in (0, 1):
        current['rank'] = rank
        outputs[rank] = generate_samples(
            pixel_components, 7, batch_size=2, seed=4, guidance_scale=1.5, num_inference_steps=1,
            accelerator=FakeRank(rank, 2),
        )
    assert seeds == {0: 8, 1: 9}
    # Rounds of 2 ranks x 2 images, the last of 3 images padded to 2 + 2 (index 7 clamps to the last label).
    assert seen[0] == [[0, 1], [4, 5]] and seen[1] == [[2, 3], [6, 6]]
    assert outputs[1].shape == (0, 8, 8, 1)


def save_tiny_model(root: Path, *, pixel_space: bool) -> Path:
    transformer = tiny_transformer(in_channels=1 if pixel_space else 4, num_classes=10)
    transformer.save_pretrained(root / 'transformer')
    DDIMScheduler.from_config(default_dit_scheduler().config).save_pretrained(root / 'scheduler')
    if not pixel_space:
        tiny_vae().save_pretrained(root / 'vae')
    (root / 'sample_config.json').write_text(json.dumps({'num_classes': 10, 'pixel_space': pixel_space}))
    return root


def test_load_components_layouts(tmp_path):
    latent = load_dit_components(save_tiny_model(tmp_path / 'latent', pixel_space=False))
    assert isinstance(latent.scheduler, DDIMScheduler) and latent.vae is not None
    assert (latent.num_classes, latent.pixel_space, latent.image_channels, latent.image_size) == (10, False, 3, 16)

    pixel = load_dit_components(save_tiny_model(tmp_path / 'pixel', pixel_space=True))
    assert pixel.vae is None and pixel.pixel_space and pixel.image_channels == 1

    bare = load_dit_components(tmp_path / 'pixel' / 'transformer')  # a transformer folder itself
    assert isinstance(bare.scheduler, DDPMScheduler) and bare.scheduler.config.beta_end == 0.02

    # Latent transformer without its VAE folder, then with an explicit one.
    with pytest.raises(ValueError, match='vae_path'):
        load_dit_components(tmp_path / 'latent' / 'transformer')
    assert load_dit_components(tmp_path / 'latent' / 'transformer', vae_path=tmp_path / 'latent').vae is not None


def test_load_components_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_dit_components(tmp_path / 'missing')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='transformer'):
        load_dit_components(tmp_path / 'empty')
    latent = save_tiny_model(tmp_path / 'latent', pixel_space=False)
    with pytest.raises(FileNotFoundError, match='config.json'):
        load_dit_components(latent, vae_path=tmp_path / 'empty')
    pixel = save_tiny_model(tmp_path / 'pixel', pixel_space=True)
    with pytest.raises(ValueError, match='pixel-space'):
        load_dit_components(pixel, vae_path=latent / 'vae')


@pytest.mark.slow
def test_two_processes_gather_in_label_order(tmp_path, pixel_components):
    """Real 2-process run (torchrun, gloo on CPU): the gathered set equals the per-rank samples interleaved."""
    import subprocess
    import sys

    model_dir = tmp_path / 'model'
    pixel_components.transformer.save_pretrained(model_dir / 'transformer')
    (model_dir / 'sample_config.json').write_text(json.dumps({'num_classes': 10, 'pixel_space': True}))
    repo = Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', str(repo / 'eval' / 'fid.py'),
        '--model_path', str(model_dir), '--num_samples', '7', '--batch_size', '2', '--num_inference_steps', '2',
        '--seed', '3', '--output_dir', str(tmp_path / 'out'),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / 'out' / 'fid_results.json').read_text())
    assert results['generation']['num_processes'] == 2 and results['generation']['rank_seeds'] == [6, 7]

    scheduler = build_scheduler('ddpm', pixel_components.scheduler.config)

    def rank_images(seed: int, batches: list[list[int]]) -> list[np.ndarray]:
        generator = torch.Generator().manual_seed(seed)
        return [
            sample_class_conditional(
                pixel_components.transformer, scheduler, labels, guidance_scale=1.5, num_inference_steps=2,
                generator=generator, progress=False,
            ).numpy()
            for labels in batches
        ]

    # Rounds of 2 ranks x 2 images; the last round (3 images) gives each rank 2, the padding is dropped.
    rank0, rank1 = rank_images(6, [[0, 1], [4, 5]]), rank_images(7, [[2, 3], [6, 6]])
    expected = np.concatenate([rank0[0], rank1[0], rank0[1], rank1[1][:1]])
    np.testing.assert_array_equal(np.load(tmp_path / 'out' / 'samples.npz')['arr_0'], expected)
