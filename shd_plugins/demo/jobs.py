"""The runs of the digits demo: what each one is, its command, and running them as subprocesses.

Every run is the recipe or evaluator a user runs at scale (``recipes/train_timm.py``, ``recipes/train_dit.py``,
``eval/top1.py``, ``eval/fid.py``), started as its own process with the same flags, so the demo exercises exactly
the command lines the report prints. A finished run leaves ``demo_done.json`` recording its command: a later demo
with the same command skips it (cached); a run that was started but not finished resumes from its checkpoint; a run
folder left by a different command is deleted before the new run starts, so its checkpoints are never resumed.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    'REPO', 'DONE_MARKER', 'STARTED_MARKER', 'VIT_NAME', 'VIT_TEACHER_KWARGS', 'VIT_STUDENT_KWARGS', 'VARIANTS',
    'VARIANT_LABELS', 'MERGE_OF_VARIANT', 'SHD_VARIANT_OPTIONS', 'Settings', 'Job', 'display_command', 'kwargs_flags',
    'check_checkout', 'vit_variant_flags', 'dit_variant_flags', 'vit_jobs', 'dit_jobs', 'run_jobs',
]

_logger = logging.getLogger(__name__)

#: The source checkout holding ``recipes/`` and ``eval/``: the demo runs those scripts, which are not installed.
REPO = Path(__file__).resolve().parents[2]
DONE_MARKER = 'demo_done.json'
STARTED_MARKER = 'demo_started.json'
_SCRIPTS = ('recipes/train_timm.py', 'recipes/train_dit.py', 'eval/top1.py', 'eval/fid.py')

VIT_NAME = 'vit_tiny_patch16_224'
#: timm ``create_model`` kwargs of the ViTs (32x32 digits, 8x8 patches: 16 tokens); rendered to ``k=v`` flags once.
VIT_TEACHER_KWARGS = {'patch_size': 8, 'embed_dim': 64, 'depth': 4, 'num_heads': 8}
VIT_STUDENT_KWARGS = {heads: {'patch_size': 8, 'embed_dim': 32, 'depth': 2, 'num_heads': heads} for heads in (2, 4)}
VARIANTS = ('none', 'kd', 'kd_shd', 'kd_mean', 'kd_select')
VARIANT_LABELS = {'none': 'no distillation', 'kd': 'KD (logits / outputs)', 'kd_shd': 'KD + SHD',
                  'kd_mean': 'KD + mean-merge (ablation)', 'kd_select': 'KD + head-select (ablation)',
                  # the further variants of ``make evidence`` (shd_plugins.evidence)
                  'kd_shd_per_row': 'KD + SHD, per-row weights', 'kd_shd_balanced': 'KD + SHD, balanced grouping',
                  'kd_shd_mse': 'KD + SHD, MSE map loss', 'feature': 'feature alignment (timm, projector)'}
MERGE_OF_VARIANT = {'kd_shd': 'shd', 'kd_mean': 'mean', 'kd_select': 'select'}
#: The SHD options of every KD + SHD variant, beyond the merge: rendered as the recipes' ``--shd-*`` flags.
SHD_VARIANT_OPTIONS: dict[str, dict[str, object]] = {
    **{variant: {'merge': merge} for variant, merge in MERGE_OF_VARIANT.items()},
    'kd_shd_per_row': {'merge': 'shd', 'per_row': True},
    'kd_shd_balanced': {'merge': 'shd', 'grouping': 'balanced'},
    'kd_shd_mse': {'merge': 'shd', 'loss': 'mse'},
}


@dataclass
class Settings:
    """Sizes of the demo; ``quick`` shrinks everything so the whole story runs in about three minutes."""
    heads: Sequence[int] = (2, 4)
    vit_seeds: Sequence[int] = (0, 1, 2)
    vit_teacher_epochs: int = 30
    vit_student_epochs: int = 12
    vit_shd_weight: float = 10.0
    dit_teacher_steps: int = 2000
    dit_student_steps: int = 1000
    dit_shd_weight: float = 1.0
    dit_lr: float = 1e-3
    fid_samples: int = 500
    fid_steps: int = 50

    @classmethod
    def quick(cls) -> Settings:
        return cls(heads=(2,), vit_seeds=(0,), vit_teacher_epochs=3, vit_student_epochs=2, dit_teacher_steps=60,
                   dit_student_steps=30, fid_samples=100, fid_steps=10)


@dataclass
class Job:
    """One command of the demo; it is done when ``run_dir/demo_done.json`` records the same command.

    ``info`` describes the run (kind, role, heads, variant, seed, eval) and becomes its record in ``results.json``.
    """
    name: str
    command: list[str]
    run_dir: Path
    deps: list[str] = field(default_factory=list)
    resume_args: list[str] = field(default_factory=list)  # added when an unfinished run_dir exists
    info: dict[str, object] = field(default_factory=dict)

    def marker(self) -> Path:
        return self.run_dir / DONE_MARKER

    def is_done(self) -> bool:
        if not self.marker().is_file():
            return False
        return json.loads(self.marker().read_text()).get('command') == display_command(self.command)


def display_command(command: Sequence[str]) -> str:
    """The command as a user would type it from the repository root."""
    parts = ['python' if c == sys.executable else os.path.relpath(c, REPO) if c.startswith(str(REPO)) else c
             for c in command]
    return ' '.join(parts)


def kwargs_flags(kwargs: Mapping[str, object]) -> list[str]:
    """``{'depth': 2}`` -> ``['depth=2']``: the ``k=v`` words timm's ``ParseKwargs`` flags read back."""
    return [f'{key}={value}' for key, value in kwargs.items()]


def check_checkout() -> None:
    """Fail early, naming the fix, when the scripts the demo runs are not beside the package.

    Raises:
        FileNotFoundError: ``shd_plugins`` was installed from a wheel rather than used from a source checkout.
    """
    missing = [script for script in _SCRIPTS if not (REPO / script).is_file()]
    if missing:
        raise FileNotFoundError(
            f'the digits demo runs the recipes and evaluators of a source checkout, but {REPO} has no '
            f"{', '.join(missing)}: clone the repository and install it editable (pip install -e '.[demo]').")


def _shd_option_flags(variant: str, dash: str) -> list[str]:
    """``--shd-per-row``/``--shd-grouping``/``--shd-loss`` words of a KD + SHD variant (``dash``: '-' or '_')."""
    options = SHD_VARIANT_OPTIONS[variant]
    flags = [f'--shd{dash}per{dash}row'] if options.get('per_row') else []
    for option in ('grouping', 'loss'):
        if option in options:
            flags += [f'--shd{dash}{option}', str(options[option])]
    return flags


def vit_variant_flags(variant: str, teacher_ckpt: Path, shd_weight: float,
                      teacher_kwargs: Mapping[str, object] | None = None) -> list[str]:
    """The ``recipes/train_timm.py`` words that make a student run ``variant`` (none for no distillation).

    ``teacher_kwargs`` adds ``--kd-model-kwargs`` (the config's teacher kwargs are the 16-token teacher's).

    Raises:
        ValueError: An unknown variant.
    """
    if variant == 'none':
        return []
    if variant not in VARIANT_LABELS:
        raise ValueError(f"Unknown variant '{variant}'; choose one of {', '.join(VARIANT_LABELS)}.")
    flags = ['--kd-model-name', VIT_NAME, '--kd-checkpoint', str(teacher_ckpt)]
    if teacher_kwargs is not None:
        flags += ['--kd-model-kwargs', *kwargs_flags(teacher_kwargs)]
    if variant in ('kd', 'feature'):
        return flags + ['--kd-distill-type', 'logit' if variant == 'kd' else 'feature']
    return flags + ['--kd-distill-type', 'shd', '--shd-merge', str(SHD_VARIANT_OPTIONS[variant]['merge']),
                    '--shd-weight', str(shd_weight)] + _shd_option_flags(variant, '-')


def dit_variant_flags(variant: str, teacher_dir: Path, shd_weight: float, output_kd_weight: float = 1.0) -> list[str]:
    """The ``recipes/train_dit.py`` words that make a student run ``variant`` (none for no distillation).

    Raises:
        ValueError: An unknown variant, or one the DiT recipe has no counterpart of (``feature``).
    """
    if variant == 'none':
        return []
    if variant not in SHD_VARIANT_OPTIONS and variant != 'kd':
        raise ValueError(f"Variant '{variant}' has no DiT counterpart; choose one of none, kd, "
                         f"{', '.join(SHD_VARIANT_OPTIONS)}.")
    flags = ['--shd_teacher_model_name_or_path', str(teacher_dir), '--output_kd_weight', str(output_kd_weight),
             '--shd_weight', '0' if variant == 'kd' else str(shd_weight)]
    if variant == 'kd':
        return flags
    return flags + ['--shd_merge', str(SHD_VARIANT_OPTIONS[variant]['merge'])] + _shd_option_flags(variant, '_')


def vit_jobs(out: Path, data: Path, s: Settings) -> list[Job]:
    """The ViT teacher, every student (heads x variants x seeds) and a top-1 evaluation of each."""
    config = REPO / 'recipes/configs/digits_vit.yaml'
    train = [sys.executable, str(REPO / 'recipes/train_timm.py'), '-c', str(config), '--data-dir', str(data)]
    resume = ['--resume', 'auto']
    teacher_dir = out / 'vit' / 'teacher'
    jobs = [Job('vit/teacher', train + ['--model-kwargs', *kwargs_flags(VIT_TEACHER_KWARGS), '--epochs',
                                        str(s.vit_teacher_epochs), '--seed', '0', '--output', str(teacher_dir)],
                teacher_dir, resume_args=resume, info={'kind': 'vit', 'role': 'teacher', 'heads': 8})]
    teacher_ckpt = teacher_dir / 'model_best.pth.tar'
    for heads in s.heads:
        for variant in VARIANTS:
            for seed in s.vit_seeds:
                run_dir = out / 'vit' / f'h{heads}_{variant}_s{seed}'
                command = train + ['--model-kwargs', *kwargs_flags(VIT_STUDENT_KWARGS[heads]), '--epochs',
                                   str(s.vit_student_epochs), '--seed', str(seed), '--output', str(run_dir)]
                command += vit_variant_flags(variant, teacher_ckpt, s.vit_shd_weight)
                jobs.append(Job(f'vit/h{heads}_{variant}_s{seed}', command, run_dir, deps=['vit/teacher'],
                                resume_args=resume, info={'kind': 'vit', 'role': 'student', 'heads': heads,
                                                          'variant': variant, 'seed': seed}))
    for job in list(jobs):
        kwargs = VIT_TEACHER_KWARGS if job.info['role'] == 'teacher' else VIT_STUDENT_KWARGS[job.info['heads']]
        eval_dir = job.run_dir / 'top1'
        command = [sys.executable, str(REPO / 'eval/top1.py'), '--model', VIT_NAME, '--model-kwargs',
                   *kwargs_flags(kwargs), '--num-classes', '10', '--in-chans', '1', '--img-size', '32', '-j', '0',
                   '--checkpoint', str(job.run_dir / 'model_best.pth.tar'), '--data-dir', str(data), '--split', 'val',
                   '--no-progress', '--results-file', str(eval_dir / 'top1.json')]
        jobs.append(Job(f'{job.name}/top1', command, eval_dir, deps=[job.name], info={**job.info, 'eval': 'top1'}))
    return jobs


def dit_jobs(out: Path, data: Path, s: Settings) -> list[Job]:
    """The DiT teacher, every student (heads x variants, one seed) and an FID evaluation of each.

    FID uses the ViT teacher's features (a digits classifier), so every FID job also waits for ``vit/teacher``.
    """
    configs = REPO / 'recipes/configs'
    train = [sys.executable, str(REPO / 'recipes/train_dit.py'), '--train_data_dir', str(data / 'train'),
             '--resolution', '8', '--train_batch_size', '64', '--learning_rate', str(s.dit_lr),
             '--lr_warmup_steps', '0', '--checkpointing_steps', '100', '--checkpoints_total_limit', '1']
    resume = ['--resume_from_checkpoint', 'latest']
    teacher_dir = out / 'dit' / 'teacher'
    jobs = [Job('dit/teacher', train + ['--model_config', str(configs / 'digits_dit_teacher.json'), '--seed', '0',
                                        '--max_train_steps', str(s.dit_teacher_steps), '--output_dir',
                                        str(teacher_dir)],
                teacher_dir, resume_args=resume, info={'kind': 'dit', 'role': 'teacher', 'heads': 8})]
    for heads in s.heads:
        for variant in VARIANTS:
            run_dir = out / 'dit' / f'h{heads}_{variant}'
            command = train + ['--model_config', str(configs / f'digits_dit_student_h{heads}.json'), '--seed', '0',
                               '--max_train_steps', str(s.dit_student_steps), '--output_dir', str(run_dir)]
            command += dit_variant_flags(variant, teacher_dir, s.dit_shd_weight)
            jobs.append(Job(f'dit/h{heads}_{variant}', command, run_dir, deps=['dit/teacher'], resume_args=resume,
                            info={'kind': 'dit', 'role': 'student', 'heads': heads, 'variant': variant, 'seed': 0}))
    for job in list(jobs):
        eval_dir = job.run_dir / 'fid'
        command = [sys.executable, str(REPO / 'eval/fid.py'), '--model_path', str(job.run_dir),
                   '--num_samples', str(s.fid_samples), '--scheduler', 'ddim', '--num_inference_steps',
                   str(s.fid_steps), '--guidance_scale', '1.5', '--batch_size', '250', '--seed', '0', '--reference',
                   str(data / 'val'), '--feature_extractor', 'timm', '--fe_model_name', VIT_NAME, '--fe_checkpoint',
                   str(out / 'vit' / 'teacher' / 'model_best.pth.tar'), '--fe_num_classes', '10', '--fe_in_chans',
                   '1', '--fe_img_size', '32', '--fe_model_kwargs', *kwargs_flags(VIT_TEACHER_KWARGS),
                   '--no_progress', '--output_dir', str(eval_dir)]
        jobs.append(Job(f'{job.name}/fid', command, eval_dir, deps=[job.name, 'vit/teacher'],
                        info={**job.info, 'eval': 'fid'}))
    return jobs


def _start(job: Job, env: Mapping[str, str]) -> tuple[subprocess.Popen, float, object, bool]:
    """Start one job, resuming an unfinished run of the same command; returns (process, start time, log, resumed)."""
    started = job.run_dir / STARTED_MARKER
    recorded = [json.loads(m.read_text())['command'] for m in (started, job.marker()) if m.is_file()]
    if any(command != display_command(job.command) for command in recorded):
        _logger.info('%s holds a run of another command: deleting it rather than resuming it', job.run_dir)
        shutil.rmtree(job.run_dir)
    resuming = started.is_file()
    command = job.command + (job.resume_args if resuming else [])
    job.run_dir.mkdir(parents=True, exist_ok=True)
    started.write_text(json.dumps({'command': display_command(job.command)}))
    log = open(job.run_dir / 'demo_log.txt', 'a')  # closed by run_jobs when the process ends
    log.write(f'\n$ {display_command(command)}\n')
    log.flush()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return process, time.time(), log, resuming


def run_jobs(jobs: list[Job], workers: int, tag: str = 'demo') -> dict[str, float]:
    """Run jobs respecting dependencies, ``workers`` at a time; returns wall seconds per job (cached: marker's).

    Each start and finish is logged as ``[tag] start|resume|done name (finished/total)``.

    Raises:
        RuntimeError: A job exited non-zero; the others are stopped and the message ends with its log's tail.
    """
    from tqdm import tqdm

    by_name = {job.name: job for job in jobs}
    seconds: dict[str, float] = {}
    pending = list(jobs)
    running: dict[str, tuple] = {}
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'PYTHONPATH': str(REPO),
           'HF_HUB_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false'}
    bar = tqdm(total=len(jobs), desc=tag, unit='run', dynamic_ncols=True)
    while pending or running:
        for job in list(pending):
            if len(running) >= workers:
                break
            if any(dep in by_name and dep not in seconds for dep in job.deps):
                continue
            pending.remove(job)
            if job.is_done():
                seconds[job.name] = json.loads(job.marker().read_text())['seconds']
                bar.set_postfix_str(f'cached {job.name}')
                bar.update(1)
                continue
            process, start, log, resuming = _start(job, env)
            running[job.name] = (process, start, log)
            tqdm.write(f"[{tag}] {'resume' if resuming else 'start '} {job.name} ({len(seconds)}/{len(jobs)} done)")
        for name, (process, start, log) in list(running.items()):
            if process.poll() is None:
                continue
            log.close()
            del running[name]
            job = by_name[name]
            if process.returncode != 0:
                for other, _, _ in running.values():
                    other.terminate()
                tail = (job.run_dir / 'demo_log.txt').read_text()[-3000:]
                raise RuntimeError(f'{name} failed (exit {process.returncode}); its log ends with:\n{tail}')
            seconds[name] = time.time() - start
            job.marker().write_text(json.dumps({'command': display_command(job.command), 'seconds': seconds[name]}))
            bar.update(1)
            tqdm.write(f'[{tag}] done  {name} in {seconds[name]:.0f}s ({len(seconds)}/{len(jobs)} done)')
        time.sleep(0.2)
    bar.close()
    return seconds
