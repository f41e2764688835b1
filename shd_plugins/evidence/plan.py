"""What ``make evidence`` runs: its sizes, its paired runs, and the time they are planned to take.

Every run is a command of the recipes and evaluators the digits demo uses (``recipes/train_timm.py``,
``recipes/train_dit.py``, ``eval/top1.py``, ``eval/fid.py``), built with the demo's helpers
(:func:`~shd_plugins.demo.jobs.vit_variant_flags`, :func:`~shd_plugins.demo.jobs.dit_variant_flags`) and run by its
scheduler (:func:`~shd_plugins.demo.jobs.run_jobs`: cached, resumable). Runs are paired by design: every variant of a
(model, token scale, heads, seed) cell gets the same ``--seed``, hence the same initialisation and data order, and
the same hyperparameters (chosen once, on KD, in the demo; nothing here is tuned toward SHD).

A ViT's top-1 is read from the recipe's own validation of its last epoch (``summary.csv``), not from the best
epoch: choosing the best epoch on the split that is reported would favour whichever variant is noisiest. That
validation is the computation ``eval/top1.py`` does; the first seed of a few variants is re-evaluated with
``eval/top1.py`` on ``last.pth.tar`` and the report shows that both agree.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..core.heads import merge_schedule
from ..demo.jobs import (
    REPO,
    VIT_NAME,
    VIT_STUDENT_KWARGS,
    VIT_TEACHER_KWARGS,
    Job,
    dit_variant_flags,
    kwargs_flags,
    vit_variant_flags,
)

__all__ = ['VIT_VARIANTS', 'DIT_VARIANTS', 'PATCH_OF_TOKENS', 'TEACHER_HEADS', 'UNIT_SECONDS', 'EvidenceSettings',
           'vit_kwargs', 'identical_groupings', 'evidence_jobs', 'estimate_seconds']

VIT_VARIANTS = ('none', 'kd', 'kd_shd', 'kd_mean', 'kd_select', 'kd_shd_per_row', 'kd_shd_balanced', 'kd_shd_mse',
                'feature')
DIT_VARIANTS = VIT_VARIANTS[:-1]  # timm's feature task has no diffusers counterpart
#: ViT token count -> patch size on the 32x32 digits.
PATCH_OF_TOKENS = {16: 8, 64: 4}
TEACHER_HEADS = VIT_TEACHER_KWARGS['num_heads']
#: Seconds per unit measured on this 2-core machine, one thread per run, with little else running (EVIDENCE.md's
#: compute section compares them with the run): process start-up (imports, data, model, checkpoints) and one epoch /
#: step / sample-step. ``parallel`` is the slow-down of two runs side by side (shared caches and memory bandwidth).
UNIT_SECONDS = {'vit_start': 6.0, 'vit_epoch_16': 1.9, 'vit_epoch_64': 4.5, 'vit_teacher_epoch_16': 2.8,
                'vit_teacher_epoch_64': 6.5, 'top1_start': 6.0, 'dit_start': 7.0, 'dit_step': 0.09,
                'dit_teacher_step': 0.1, 'fid_start': 8.0, 'fid_sample_step': 0.0015, 'parallel': 1.15}


@dataclass
class EvidenceSettings:
    """Sizes of ``make evidence``; ``quick`` shrinks them to check the plumbing in a few minutes."""
    heads: Sequence[int] = (2, 4)
    vit_tokens: Sequence[int] = (16, 64)
    vit_seeds: Sequence[int] = (0, 1, 2, 3, 4)
    vit_variants: Sequence[str] = VIT_VARIANTS
    vit_teacher_epochs: int = 30
    vit_student_epochs: Mapping[int, int] = field(default_factory=lambda: {16: 6, 64: 6})
    vit_shd_weight: float = 10.0
    top1_check_variants: Sequence[str] = ('kd_shd',)
    dit_seeds: Sequence[int] = (0, 1, 2)
    dit_variants: Sequence[str] = DIT_VARIANTS
    dit_teacher_steps: int = 2000
    dit_student_steps: int = 300
    dit_shd_weight: float = 1.0
    dit_lr: float = 1e-3
    fid_samples: int = 200
    fid_steps: int = 20
    #: Point 4 of issue 13: KD students with a smaller output-KD weight, at the smallest head count, every DiT seed.
    investigate_kd_weights: Sequence[float] = (0.25,)
    #: Point 4: the no-distillation and KD students at the smallest head count also sampled without guidance.
    investigate_unguided: bool = True

    @classmethod
    def quick(cls) -> EvidenceSettings:
        """The demo's quick sizes, two seeds (a paired test needs two), two variants per model: plumbing only."""
        return cls(heads=(2,), vit_seeds=(0, 1), vit_variants=('kd_shd', 'feature'), vit_teacher_epochs=3,
                   vit_student_epochs={16: 2, 64: 1}, top1_check_variants=('kd_shd',), dit_seeds=(0, 1),
                   dit_variants=('kd', 'kd_shd'), dit_teacher_steps=60, dit_student_steps=30, fid_samples=100,
                   fid_steps=10, investigate_kd_weights=(),
                   investigate_unguided=False)


def vit_kwargs(tokens: int, heads: int | None = None) -> dict[str, int]:
    """timm kwargs of the teacher (``heads=None``) or a student at ``tokens`` tokens: the demo's, re-patched.

    Raises:
        ValueError: A token count with no patch size (see ``PATCH_OF_TOKENS``) or an unknown student head count.
    """
    if tokens not in PATCH_OF_TOKENS:
        raise ValueError(f'No ViT scale with {tokens} tokens; choose one of {sorted(PATCH_OF_TOKENS)}.')
    if heads is not None and heads not in VIT_STUDENT_KWARGS:
        raise ValueError(f'No ViT student with {heads} heads; choose one of {sorted(VIT_STUDENT_KWARGS)}.')
    base = VIT_TEACHER_KWARGS if heads is None else VIT_STUDENT_KWARGS[heads]
    return {**base, 'patch_size': PATCH_OF_TOKENS[tokens]}


def identical_groupings(heads: Sequence[int]) -> dict[int, list]:
    """Student head counts whose balanced and progressive merge schedules are the same (training them twice would
    give identical runs), with that schedule."""
    return {h: merge_schedule(TEACHER_HEADS, h, 'progressive') for h in heads
            if merge_schedule(TEACHER_HEADS, h, 'progressive') == merge_schedule(TEACHER_HEADS, h, 'balanced')}


def _trained_variants(variants: Sequence[str], heads: int) -> list[str]:
    """The variants trained at ``heads``: balanced grouping is dropped where it equals progressive."""
    return [v for v in variants if not (v == 'kd_shd_balanced' and heads in identical_groupings([heads]))]


def _vit_jobs(out: Path, data: Path, s: EvidenceSettings, tokens: int) -> tuple[Job, dict[int, list[Job]]]:
    """The teacher of one token scale and its students grouped by seed (each followed by its top-1 check)."""
    root = out / f'vit{tokens}'
    train = [sys.executable, str(REPO / 'recipes/train_timm.py'), '-c', str(REPO / 'recipes/configs/digits_vit.yaml'),
             '--data-dir', str(data)]
    resume = ['--resume', 'auto']
    teacher_kwargs = vit_kwargs(tokens)
    teacher = Job(f'vit{tokens}/teacher', train + ['--model-kwargs', *kwargs_flags(teacher_kwargs), '--epochs',
                                                    str(s.vit_teacher_epochs), '--seed', '0', '--output',
                                                    str(root / 'teacher')],
                  root / 'teacher', resume_args=resume,
                  info={'kind': 'vit', 'tokens': tokens, 'role': 'teacher', 'heads': TEACHER_HEADS, 'seed': 0,
                        'epochs': s.vit_teacher_epochs})
    checks = []
    by_seed: dict[int, list[Job]] = {seed: [] for seed in s.vit_seeds}
    for seed in s.vit_seeds:
        for heads in s.heads:
            for variant in _trained_variants(s.vit_variants, heads):
                name = f'vit{tokens}/h{heads}_{variant}_s{seed}'
                run_dir = root / f'h{heads}_{variant}_s{seed}'
                epochs = s.vit_student_epochs[tokens]
                command = train + ['--model-kwargs', *kwargs_flags(vit_kwargs(tokens, heads)), '--epochs',
                                   str(epochs), '--seed', str(seed), '--output', str(run_dir)]
                command += vit_variant_flags(variant, root / 'teacher' / 'last.pth.tar', s.vit_shd_weight,
                                             teacher_kwargs)
                job = Job(name, command, run_dir, deps=[teacher.name], resume_args=resume,
                          info={'kind': 'vit', 'tokens': tokens, 'role': 'student', 'heads': heads,
                                'variant': variant, 'seed': seed, 'epochs': epochs})
                by_seed[seed].append(job)
                if seed == s.vit_seeds[0] and variant in s.top1_check_variants:
                    checks.append(_top1_check(job, data, vit_kwargs(tokens, heads)))
    by_seed[s.vit_seeds[0]] += checks
    return teacher, by_seed


def _top1_check(job: Job, data: Path, kwargs: Mapping[str, int]) -> Job:
    """``eval/top1.py`` on the run's last checkpoint: the evaluator must agree with the recipe's last validation."""
    eval_dir = job.run_dir / 'top1_last'
    command = [sys.executable, str(REPO / 'eval/top1.py'), '--model', VIT_NAME, '--model-kwargs', *kwargs_flags(kwargs),
               '--num-classes', '10', '--in-chans', '1', '--img-size', '32', '-j', '0', '--checkpoint',
               str(job.run_dir / 'last.pth.tar'), '--data-dir', str(data), '--split', 'val', '--no-progress',
               '--results-file', str(eval_dir / 'top1.json')]
    return Job(f'{job.name}/top1', command, eval_dir, deps=[job.name], info={**job.info, 'eval': 'top1'})


def _fid_features(out: Path, data8: Path) -> list[str]:
    """``eval/fid.py`` words shared by every FID: the validation digits as reference, the 16-token ViT teacher's
    features (a digits classifier; the Inception network would need a download)."""
    return ['--reference', str(data8 / 'val'), '--feature_extractor', 'timm', '--fe_model_name', VIT_NAME,
            '--fe_checkpoint', str(out / 'vit16' / 'teacher' / 'last.pth.tar'), '--fe_num_classes', '10',
            '--fe_in_chans', '1', '--fe_img_size', '32', '--fe_model_kwargs', *kwargs_flags(vit_kwargs(16)),
            '--no_progress']


def _fid_job(job: Job, out: Path, data8: Path, s: EvidenceSettings, guidance: float = 1.5) -> Job:
    """``eval/fid.py`` of one DiT; sampling seed = training seed; ``eval`` is ``fid`` at the reported guidance 1.5,
    ``fid_g<guidance>`` otherwise (point 4's unguided samples)."""
    name = 'fid' if guidance == 1.5 else f'fid_g{guidance:g}'
    eval_dir = job.run_dir / name
    command = [sys.executable, str(REPO / 'eval/fid.py'), '--model_path', str(job.run_dir), '--num_samples',
               str(s.fid_samples), '--scheduler', 'ddim', '--num_inference_steps', str(s.fid_steps),
               '--guidance_scale', f'{guidance:g}', '--batch_size', '250', '--seed', str(job.info['seed']),
               *_fid_features(out, data8), '--output_dir', str(eval_dir)]
    return Job(f'{job.name}/{name}', command, eval_dir, deps=[job.name, 'vit16/teacher'],
               info={**job.info, 'eval': name})


def _real_data_fid(out: Path, data8: Path) -> Job:
    """The FID of the training digits themselves against the validation digits: the floor a perfect generator
    reaches with these features (with all training images, so below what a few hundred samples can reach)."""
    eval_dir = out / 'dit' / 'real_data_fid'
    command = [sys.executable, str(REPO / 'eval/fid.py'), '--samples', str(data8 / 'train'),
               *_fid_features(out, data8), '--output_dir', str(eval_dir)]
    return Job('dit/real_data_fid', command, eval_dir, deps=['vit16/teacher'],
               info={'kind': 'dit', 'tokens': 16, 'role': 'reference', 'eval': 'fid'})


def _dit_jobs(out: Path, data8: Path, s: EvidenceSettings) -> tuple[list[Job], dict[int, list[Job]]]:
    """The DiT teacher (and its FID), then per seed every student and its FID, then the KD investigation runs."""
    configs = REPO / 'recipes/configs'
    root = out / 'dit'
    train = [sys.executable, str(REPO / 'recipes/train_dit.py'), '--train_data_dir', str(data8 / 'train'),
             '--resolution', '8', '--train_batch_size', '64', '--learning_rate', str(s.dit_lr), '--lr_warmup_steps',
             '0', '--checkpointing_steps', '100', '--checkpoints_total_limit', '1']
    resume = ['--resume_from_checkpoint', 'latest']
    teacher = Job('dit/teacher', train + ['--model_config', str(configs / 'digits_dit_teacher.json'), '--seed', '0',
                                          '--max_train_steps', str(s.dit_teacher_steps), '--output_dir',
                                          str(root / 'teacher')],
                  root / 'teacher', resume_args=resume,
                  info={'kind': 'dit', 'tokens': 16, 'role': 'teacher', 'heads': TEACHER_HEADS, 'seed': 0,
                        'steps': s.dit_teacher_steps})
    by_seed: dict[int, list[Job]] = {seed: [] for seed in s.dit_seeds}

    def student(name: str, heads: int, seed: int, variant: str, flags: list[str], **info: object) -> None:
        command = train + ['--model_config', str(configs / f'digits_dit_student_h{heads}.json'), '--seed', str(seed),
                           '--max_train_steps', str(s.dit_student_steps), '--output_dir', str(root / name)] + flags
        job = Job(f'dit/{name}', command, root / name, deps=[teacher.name], resume_args=resume,
                  info={'kind': 'dit', 'tokens': 16, 'role': 'student', 'heads': heads, 'variant': variant,
                        'seed': seed, 'steps': s.dit_student_steps, **info})
        by_seed[seed] += [job, _fid_job(job, out, data8, s)]
        if s.investigate_unguided and heads == min(s.heads) and variant in ('none', 'kd'):
            by_seed[seed].append(_fid_job(job, out, data8, s, guidance=1.0))

    for seed in s.dit_seeds:
        for heads in s.heads:
            for variant in _trained_variants(s.dit_variants, heads):
                student(f'h{heads}_{variant}_s{seed}', heads, seed, variant,
                        dit_variant_flags(variant, teacher.run_dir, s.dit_shd_weight))
        for weight in s.investigate_kd_weights:
            heads = min(s.heads)
            student(f'h{heads}_kd_w{weight:g}_s{seed}', heads, seed, f'kd_w{weight:g}',
                    dit_variant_flags('kd', teacher.run_dir, s.dit_shd_weight, output_kd_weight=weight),
                    investigation=True, output_kd_weight=weight)
    return [teacher, _fid_job(teacher, out, data8, s), _real_data_fid(out, data8)], by_seed


def evidence_jobs(out: Path, data: Path, data8: Path, s: EvidenceSettings) -> list[Job]:
    """Every job, in the order the scheduler should prefer: teachers first (longest first), then seed by seed.

    Going seed by seed keeps the finished runs paired: an interrupted evidence run has whole seeds of every variant.
    """
    vit = {tokens: _vit_jobs(out, data, s, tokens) for tokens in s.vit_tokens}
    dit_teacher, dit_by_seed = _dit_jobs(out, data8, s)
    jobs = [vit[t][0] for t in sorted(vit, reverse=True)] + dit_teacher
    for seed in sorted({*s.vit_seeds, *s.dit_seeds}):
        for tokens in s.vit_tokens:
            jobs += vit[tokens][1].get(seed, [])
        jobs += dit_by_seed.get(seed, [])
    return jobs


def estimate_seconds(jobs: Sequence[Job], units: Mapping[str, float] = UNIT_SECONDS) -> dict[str, float]:
    """Planned core-seconds per job kind from the measured unit costs (``UNIT_SECONDS``).

    Returns:
        ``{'vit': ..., 'top1': ..., 'dit': ..., 'fid': ..., 'total': ...}`` in core-seconds (divide by the number of
        workers for the wall time, if the schedule keeps them busy).
    """
    plan = {'vit': 0.0, 'top1': 0.0, 'dit': 0.0, 'fid': 0.0}
    for job in jobs:
        info = job.info
        if info.get('eval') == 'top1':
            plan['top1'] += units['top1_start']
        elif info.get('role') == 'reference':
            plan['fid'] += units['fid_start']
        elif str(info.get('eval')).startswith('fid'):
            samples = int(job.command[job.command.index('--num_samples') + 1])
            steps = int(job.command[job.command.index('--num_inference_steps') + 1])
            plan['fid'] += units['fid_start'] + units['fid_sample_step'] * samples * steps
        elif info['kind'] == 'vit':
            role = 'vit_teacher_epoch' if info['role'] == 'teacher' else 'vit_epoch'
            plan['vit'] += units['vit_start'] + units[f"{role}_{info['tokens']}"] * int(info['epochs'])
        else:
            step = units['dit_teacher_step' if info['role'] == 'teacher' else 'dit_step']
            plan['dit'] += units['dit_start'] + step * int(info['steps'])
    plan = {key: value * units['parallel'] for key, value in plan.items()}
    plan['total'] = sum(plan.values())
    return plan
