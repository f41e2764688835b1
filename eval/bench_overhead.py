"""Step-time and peak-memory overhead of SHD for a tiny timm ViT and a tiny diffusers DiT.

Three training steps are compared for each model and token count:
  (a) the student alone (task loss),
  (b) + the teacher's forward and logit KD (ViT) / output MSE (DiT),
  (c) + SHD on every student layer.
Times are medians over interleaved rounds (a, b, c, a, b, c, ...) in one process so that machine noise hits
all three alike; the report is the ratios c/b and b/a. Memory per mode is the CUDA peak allocation, or on CPU
the bytes autograd saves for backward in one step (see :func:`memory_of_mode`).

    python eval/bench_overhead.py --output runs/bench_overhead.json
"""
import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel

from shd_plugins import SHDDistiller, logit_kd_loss, output_mse_loss

MODES = ('a', 'b', 'c')
# tokens -> (ViT image size with patch 4, DiT sample size with patch 2)
TOKEN_SETTINGS = {64: (32, 16), 256: (64, 32)}


def build_models(kind: str, tokens: int, device: torch.device):
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
    vit_size, dit_size = TOKEN_SETTINGS[tokens]
    gen = torch.Generator().manual_seed(1)
    if kind == 'vit':
        return {'x': torch.randn(batch_size, 3, vit_size, vit_size, generator=gen).to(device),
                'y': torch.randint(0, 10, (batch_size,), generator=gen).to(device)}
    return {'x': torch.randn(batch_size, 4, dit_size, dit_size, generator=gen).to(device),
            't': torch.randint(0, 1000, (batch_size,), generator=gen).to(device),
            'y': torch.randint(0, 10, (batch_size,), generator=gen).to(device),
            'noise': torch.randn(batch_size, 4, dit_size, dit_size, generator=gen).to(device)}


def make_step(kind: str, mode: str, teacher, student, optimizer, batch) -> Callable[[], None]:
    """One optimisation step of the given mode (the distiller, for mode c, is installed by the caller)."""
    def forward(model, no_grad: bool = False):
        with torch.set_grad_enabled(not no_grad):
            if kind == 'vit':
                return model(batch['x'])
            return model(batch['x'], timestep=batch['t'], class_labels=batch['y']).sample

    def step(distiller=None) -> None:
        with distiller.recording() if distiller is not None else contextlib.nullcontext():
            output = forward(student)
            teacher_output = forward(teacher, no_grad=True) if mode in ('b', 'c') else None
        loss = F.cross_entropy(output, batch['y']) if kind == 'vit' else F.mse_loss(output, batch['noise'])
        if mode in ('b', 'c'):
            loss = loss + (logit_kd_loss(output, teacher_output) if kind == 'vit'
                           else output_mse_loss(output, teacher_output))
        if mode == 'c':
            loss = loss + distiller.compute_loss().loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def time_modes(kind: str, tokens: int, args, device: torch.device) -> dict[str, float]:
    teacher, student = build_models(kind, tokens, device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    batch = make_batch(kind, tokens, args.batch_size, device)
    steps = {mode: make_step(kind, mode, teacher, student, optimizer, batch) for mode in MODES}
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for round_index in range(args.warmup + args.steps):
        for mode in MODES:
            distiller = SHDDistiller(teacher, student, layers='uniform') if mode == 'c' else None
            sync(device)
            start = time.perf_counter()
            steps[mode](distiller)
            sync(device)
            if round_index >= args.warmup:
                times[mode].append(time.perf_counter() - start)
            if distiller is not None:
                distiller.remove()
    return {mode: statistics.median(values) * 1000 for mode, values in times.items()}


def memory_of_mode(kind: str, tokens: int, mode: str, args, device: torch.device) -> float:
    """Memory (MiB) of one step of a mode.

    CUDA: peak allocated bytes above what the models, batch and optimizer state hold. CPU has no allocator
    statistics and peak RSS is too coarse for a few MiB of difference, so there it is the bytes of the distinct
    tensors autograd saves for backward during the step: the activation memory, where SHD's recomputed maps land.
    """
    teacher, student = build_models(kind, tokens, device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    batch = make_batch(kind, tokens, args.batch_size, device)
    step = make_step(kind, mode, teacher, student, optimizer, batch)
    distiller = SHDDistiller(teacher, student, layers='uniform') if mode == 'c' else None
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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['vit', 'dit'], choices=['vit', 'dit'])
    parser.add_argument('--tokens', nargs='+', type=int, default=[64, 256], choices=sorted(TOKEN_SETTINGS))
    parser.add_argument('--batch_size', type=int, default=16)
    parser.add_argument('--steps', type=int, default=15, help='timed rounds per mode')
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--no_memory', action='store_true', help='skip the peak-memory measurement')
    parser.add_argument('--output', type=Path, default=None, help='also write the JSON here')
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    results = []
    for kind in args.models:
        for tokens in args.tokens:
            times = time_modes(kind, tokens, args, device)
            row = {'model': kind, 'tokens': tokens, 'batch_size': args.batch_size,
                   **{f'step_ms_{m}': round(times[m], 3) for m in MODES},
                   'time_ratio_c_over_b': round(times['c'] / times['b'], 4),
                   'time_ratio_b_over_a': round(times['b'] / times['a'], 4)}
            if not args.no_memory:
                memory = {mode: memory_of_mode(kind, tokens, mode, args, device) for mode in MODES}
                row.update({f'mem_mib_{m}': round(memory[m], 2) for m in MODES})
                row['mem_ratio_c_over_b'] = round(memory['c'] / memory['b'], 4)
            results.append(row)
            print(json.dumps(row), flush=True)
    memory_measure = ('peak allocated (torch.cuda.max_memory_allocated)' if device.type == 'cuda'
                      else 'tensors saved for backward in one step (CPU has no allocator peak)')
    report = {'device': str(device), 'torch': torch.__version__, 'timm': timm.__version__,
              'memory_measure': None if args.no_memory else memory_measure,
              'threads': torch.get_num_threads(), 'steps': args.steps, 'results': results}
    print(json.dumps(report, indent=2))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2))
    return report


if __name__ == '__main__':
    main()
