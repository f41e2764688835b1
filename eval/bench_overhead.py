"""Step-time and memory overhead of SHD, dense and streamed, for tiny models and the paper's pairs at real size.

Training steps compared for each model and token count:
  (a) the student alone (task loss),
  (b) + the teacher's forward and logit KD (ViT) / output MSE (DiT),
  (c) + SHD on every student layer, streamed (the default: no N x N tensor is held),
  (d) + SHD on every student layer, dense (score maps of both models, the reference).
Times are medians over interleaved rounds (a, b, c, d, a, ...) in one process so that machine noise hits all modes
alike; the report is the ratios c/b, d/b and b/a. Memory per mode is the CUDA peak allocation, or on CPU the bytes
autograd saves for backward in one step (see :func:`memory_of_mode`); with ``--rss`` also the peak RSS of a fresh
subprocess per mode (CPU).

Tiny models (seconds)::

    python eval/bench_overhead.py --output runs/bench_overhead.json

The paper's pairs at real size with random weights (no download): DeiT-S -> DeiT-Ti at 224 px (197 tokens, batch 8),
DiT-XL/2 -> DiT-S/2 at 256 and 1024 tokens, and DiT-XL/2 width at 4096 tokens (4 -> 2 layers, memory)::

    python eval/bench_overhead.py --pairs deit dit256 dit1024 --steps 5 --warmup 1 --rss
    python eval/bench_overhead.py --pairs dit4096 --no_time --rss

``--depth_divisor k`` divides both depths by k (the SHD layers per teacher layer stay the same) where full depth is
too slow for the machine.
"""
import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel

from shd_plugins import SHDDistiller, logit_kd_loss, output_mse_loss

MODES = ('a', 'b', 'c', 'd')
DISTILLED = {'c': False, 'd': True}  # mode -> dense
# tokens -> (ViT image size with patch 4, DiT sample size with patch 2)
TOKEN_SETTINGS = {64: (32, 16), 256: (64, 32)}
# The paper's pairs at real size: kind, tokens, batch, and (heads, head_dim, depth) of teacher and student.
PAIRS = {
    'deit': dict(kind='vit', tokens=197, batch_size=8, teacher='deit_small_patch16_224',
                 student='deit_tiny_patch16_224', depths=(12, 12)),
    'dit256': dict(kind='dit', tokens=256, batch_size=2, teacher=(16, 72), student=(6, 64), depths=(28, 12)),
    'dit1024': dict(kind='dit', tokens=1024, batch_size=1, teacher=(16, 72), student=(6, 64), depths=(28, 12)),
    'dit4096': dict(kind='dit', tokens=4096, batch_size=1, teacher=(16, 72), student=(6, 64), depths=(4, 2)),
}


def _dit(heads: int, head_dim: int, layers: int, sample_size: int, classes: int, learn_sigma: bool = False):
    return DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                 out_channels=8 if learn_sigma else 4, num_layers=layers, sample_size=sample_size,
                                 patch_size=2, num_embeds_ada_norm=classes, norm_type='ada_norm_zero')


def build_pair(name: str, depth_divisor: int, device: torch.device):
    """Teacher and student of a paper pair with random weights (timm/diffusers configs, no download)."""
    spec = PAIRS[name]
    torch.manual_seed(0)
    depths = [max(1, depth // depth_divisor) for depth in spec['depths']]
    if spec['kind'] == 'vit':
        teacher = timm.create_model(spec['teacher'], pretrained=False, depth=depths[0])
        student = timm.create_model(spec['student'], pretrained=False, depth=depths[1])
    else:
        sample_size = int(round(spec['tokens'] ** 0.5)) * 2
        teacher = _dit(*spec['teacher'], depths[0], sample_size, 1000, learn_sigma=True)
        student = _dit(*spec['student'], depths[1], sample_size, 1000, learn_sigma=True)
    return teacher.to(device).eval().requires_grad_(False), student.to(device).train()


def build_models(kind: str, tokens: int, device: torch.device, depth_divisor: int = 1):
    if kind in PAIRS:
        return build_pair(kind, depth_divisor, device)
    vit_size, dit_size = TOKEN_SETTINGS[tokens]
    torch.manual_seed(0)
    if kind == 'vit':
        def vit(embed_dim, depth, heads):
            return timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=vit_size, patch_size=4,
                                     embed_dim=embed_dim, depth=depth, num_heads=heads, num_classes=10)
        teacher, student = vit(256, 6, 8), vit(128, 4, 4)
    else:
        def dit(heads, layers):
            return DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=32, in_channels=4,
                                         out_channels=4, num_layers=layers, sample_size=dit_size, patch_size=2,
                                         num_embeds_ada_norm=10, norm_type='ada_norm_zero')
        teacher, student = dit(8, 6), dit(4, 4)
    return teacher.to(device).eval().requires_grad_(False), student.to(device).train()


def make_batch(kind: str, tokens: int, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    if kind in PAIRS:
        spec = PAIRS[kind]
        vit_size, dit_size, classes, kind = 224, int(round(spec['tokens'] ** 0.5)) * 2, 1000, spec['kind']
    else:
        (vit_size, dit_size), classes = TOKEN_SETTINGS[tokens], 10
    gen = torch.Generator().manual_seed(1)
    if kind == 'vit':
        return {'x': torch.randn(batch_size, 3, vit_size, vit_size, generator=gen).to(device),
                'y': torch.randint(0, classes, (batch_size,), generator=gen).to(device)}
    return {'x': torch.randn(batch_size, 4, dit_size, dit_size, generator=gen).to(device),
            't': torch.randint(0, 1000, (batch_size,), generator=gen).to(device),
            'y': torch.randint(0, classes, (batch_size,), generator=gen).to(device),
            'noise': torch.randn(batch_size, 4, dit_size, dit_size, generator=gen).to(device)}


def make_step(kind: str, mode: str, teacher, student, optimizer, batch) -> Callable[[], None]:
    """One optimisation step of the given mode (the distiller, for modes c and d, is installed by the caller)."""
    kind = PAIRS[kind]['kind'] if kind in PAIRS else kind

    def forward(model, no_grad: bool = False):
        with torch.set_grad_enabled(not no_grad):
            if kind == 'vit':
                return model(batch['x'])
            output = model(batch['x'], timestep=batch['t'], class_labels=batch['y']).sample
            return output[:, :batch['noise'].shape[1]]  # the noise prediction of learned-sigma DiTs

    def step(distiller=None) -> None:
        with distiller.recording() if distiller is not None else contextlib.nullcontext():
            output = forward(student)
            teacher_output = forward(teacher, no_grad=True) if mode != 'a' else None
        loss = F.cross_entropy(output, batch['y']) if kind == 'vit' else F.mse_loss(output, batch['noise'])
        if mode != 'a':
            loss = loss + (logit_kd_loss(output, teacher_output) if kind == 'vit'
                           else output_mse_loss(output, teacher_output))
        if mode in DISTILLED:
            loss = loss + distiller.compute_loss().loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def batch_size_of(kind: str, args) -> int:
    """``--batch_size``, else the pair's own batch (the issue's table), else 16 for the tiny models."""
    return args.batch_size or PAIRS.get(kind, {}).get('batch_size', 16)


def make_distiller(mode: str, teacher, student) -> SHDDistiller | None:
    if mode not in DISTILLED:
        return None
    return SHDDistiller(teacher, student, layers='uniform', dense=DISTILLED[mode])


def time_modes(kind: str, tokens: int, modes, args, device: torch.device) -> dict[str, float]:
    teacher, student = build_models(kind, tokens, device, args.depth_divisor)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    batch = make_batch(kind, tokens, batch_size_of(kind, args), device)
    steps = {mode: make_step(kind, mode, teacher, student, optimizer, batch) for mode in modes}
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    # One distiller per mode for the whole run, as in training: its first step runs the one-off finiteness check (a
    # device sync over every recorded tensor), which a fresh distiller per step would repeat in every timed step.
    # Hooks outside their distiller's recording() block do nothing, so the two distillers do not disturb each other.
    distillers = {mode: make_distiller(mode, teacher, student) for mode in modes}
    try:
        for round_index in range(args.warmup + args.steps):
            for mode in modes:
                sync(device)
                start = time.perf_counter()
                steps[mode](distillers[mode])
                sync(device)
                if round_index >= args.warmup:
                    times[mode].append(time.perf_counter() - start)
    finally:
        for distiller in distillers.values():
            if distiller is not None:
                distiller.remove()
    return {mode: statistics.median(values) * 1000 for mode, values in times.items()}


def memory_of_mode(kind: str, tokens: int, mode: str, args, device: torch.device) -> float:
    """Memory (MiB) of one step of a mode.

    CUDA: peak allocated bytes above what the models, batch and optimizer state hold. CPU has no allocator
    statistics and peak RSS is too coarse for a few MiB of difference, so there it is the bytes of the distinct
    tensors autograd saves for backward during the step: the activation memory, where SHD's recomputed maps land.
    """
    teacher, student = build_models(kind, tokens, device, args.depth_divisor)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    batch = make_batch(kind, tokens, batch_size_of(kind, args), device)
    step = make_step(kind, mode, teacher, student, optimizer, batch)
    distiller = make_distiller(mode, teacher, student)
    if device.type == 'cuda':
        step(distiller)  # optimizer state exists before the measured step
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(distiller)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step(distiller)
    return sum(saved.values()) / 2 ** 20


def flops_of_mode(kind: str, tokens: int, mode: str, args, device: torch.device) -> float:
    """Matmul/attention GFLOP of one step of a mode (``torch.utils.flop_counter``: elementwise work not counted).

    Why: the ratio of these between modes is the floor the step-time ratio cannot go below where the step is
    matmul-bound; the step-time ratio minus it is what the loss's elementwise passes (softmax, merge, KL) cost.
    """
    from torch.utils.flop_counter import FlopCounterMode

    teacher, student = build_models(kind, tokens, device, args.depth_divisor)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    batch = make_batch(kind, tokens, batch_size_of(kind, args), device)
    step = make_step(kind, mode, teacher, student, optimizer, batch)
    distiller = make_distiller(mode, teacher, student)
    counter = FlopCounterMode(display=False)
    with counter:
        step(distiller)
    return counter.get_total_flops() / 1e9


def peak_rss_of_mode(kind: str, mode: str, args) -> float:
    """Peak RSS (MiB) of a fresh CPU process over two steps of one mode (after the pair is built; Linux)."""
    command = [sys.executable, __file__, '--rss_child', kind, mode, '--depth_divisor', str(args.depth_divisor)]
    if args.batch_size:
        command += ['--batch_size', str(args.batch_size)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f'RSS run of {kind}/{mode} failed:\n{result.stderr[-2000:]}')
    return float(result.stdout.strip().splitlines()[-1])


def rss_child(kind: str, mode: str, args) -> None:
    device = torch.device('cpu')
    teacher, student = build_models(kind, 0, device, args.depth_divisor)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    batch = make_batch(kind, 0, batch_size_of(kind, args), device)
    step = make_step(kind, mode, teacher, student, optimizer, batch)
    distiller = make_distiller(mode, teacher, student)
    # Model construction (weight init) can peak above the training step: restart the high-water mark after it, so
    # the peak is the largest RSS during the steps (models, optimizer state and the step's activations).
    Path('/proc/self/clear_refs').write_text('5')
    for _ in range(2):
        step(distiller)
    status = Path('/proc/self/status').read_text()
    print(int(next(line for line in status.splitlines() if line.startswith('VmHWM:')).split()[1]) / 1024)  # kB


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['vit', 'dit'], choices=['vit', 'dit'])
    parser.add_argument('--tokens', nargs='+', type=int, default=[64, 256], choices=sorted(TOKEN_SETTINGS))
    parser.add_argument('--pairs', nargs='+', default=[], choices=sorted(PAIRS),
                        help="the paper's pairs at real size (random weights) instead of the tiny models")
    parser.add_argument('--depth_divisor', type=int, default=1, help='divide both depths of a pair by this')
    parser.add_argument('--batch_size', type=int, default=None, help="default: 16 (tiny), the pair's own (pairs)")
    parser.add_argument('--steps', type=int, default=15, help='timed rounds per mode')
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--no_time', action='store_true', help='skip the step-time measurement')
    parser.add_argument('--no_memory', action='store_true', help='skip the saved-bytes / CUDA peak measurement')
    parser.add_argument('--rss', action='store_true', help='peak RSS of a fresh process per mode (CPU)')
    parser.add_argument('--flops', action='store_true',
                        help='matmul GFLOP of one step per mode: the floor of the time ratios where matmuls dominate')
    parser.add_argument('--modes', nargs='+', default=None, choices=MODES,
                        help='modes to run (default: a b c d for the tiny models, b c d for the pairs); e.g. '
                             '--modes b c times the streamed loss against its baseline in less time')
    parser.add_argument('--rss_child', nargs=2, metavar=('PAIR', 'MODE'), help=argparse.SUPPRESS)
    parser.add_argument('--output', type=Path, default=None, help='also write the JSON here')
    return parser.parse_args(argv)


def _ratios(row: dict, key: str, values: dict[str, float]) -> None:
    for mode in ('c', 'd'):
        if mode in values and values.get('b'):
            row[f'{key}_ratio_{mode}_over_b'] = round(values[mode] / values['b'], 4)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.rss_child:
        rss_child(*args.rss_child, args)
        return {}
    device = torch.device(args.device)
    chosen = tuple(mode for mode in MODES if mode in args.modes) if args.modes else None
    runs = [(pair, PAIRS[pair]['tokens'], chosen or ('b', 'c', 'd')) for pair in args.pairs] or [
        (kind, tokens, chosen or MODES) for kind in args.models for tokens in args.tokens]
    results = []
    for kind, tokens, modes in runs:
        batch_size = batch_size_of(kind, args)
        row = {'model': kind, 'tokens': tokens, 'batch_size': batch_size, 'depth_divisor': args.depth_divisor}
        if not args.no_time:
            times = time_modes(kind, tokens, modes, args, device)
            row.update({f'step_ms_{m}': round(times[m], 3) for m in modes})
            _ratios(row, 'time', times)
            if 'a' in times:
                row['time_ratio_b_over_a'] = round(times['b'] / times['a'], 4)
        if not args.no_memory:
            memory = {mode: memory_of_mode(kind, tokens, mode, args, device) for mode in modes}
            row.update({f'mem_mib_{m}': round(memory[m], 2) for m in modes})
            _ratios(row, 'mem', memory)
        if args.flops:
            flops = {mode: flops_of_mode(kind, tokens, mode, args, device) for mode in modes}
            row.update({f'gflop_{m}': round(flops[m], 2) for m in modes})
            _ratios(row, 'flop', flops)
        if args.rss and device.type == 'cpu' and kind in PAIRS:
            rss = {mode: peak_rss_of_mode(kind, mode, args) for mode in modes}
            row.update({f'peak_rss_mib_{m}': round(rss[m], 1) for m in modes})
            _ratios(row, 'rss', rss)
        results.append(row)
        print(json.dumps(row), flush=True)
    memory_measure = ('peak allocated (torch.cuda.max_memory_allocated)' if device.type == 'cuda'
                      else 'tensors saved for backward in one step (CPU has no allocator peak)')
    report = {'device': str(device), 'torch': torch.__version__, 'timm': timm.__version__,
              'memory_measure': None if args.no_memory else memory_measure,
              'modes': {'a': 'student', 'b': '+ teacher, output KD', 'c': '+ SHD streamed', 'd': '+ SHD dense'},
              'threads': torch.get_num_threads(), 'steps': args.steps, 'results': results}
    print(json.dumps(report, indent=2))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2))
    return report


if __name__ == '__main__':
    main()
