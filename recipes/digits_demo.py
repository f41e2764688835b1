"""The embedded default: does SHD help on digits? Runs anywhere (CPU, no downloads), end to end.

1. writes scikit-learn's digits as an ImageFolder (train/val, 32x32 grayscale PNG);
2. trains a ViT teacher and a DiT teacher (8 heads each) from scratch;
3. trains students with 2 and 4 heads under: no distillation, logit/output KD, KD + SHD, and the paper's
   ablations KD + mean-merge and KD + head-select (ViT over several seeds);
4. evaluates top-1 (eval/top1.py) for the ViTs and FID with the digits classifier's features (eval/fid.py) for
   the DiTs;
5. writes REPORT.md (tables, the squeeze figure, merge-weight distributions, DiT sample grids) and results.json.

Every run is the same recipe and evaluator a user runs at scale (the commands are in the report). Finished runs
are cached (a marker records the exact command), interrupted ones resume from their last checkpoint.

    python recipes/digits_demo.py            # the full demo (about 12 minutes on 2 CPU cores)
    python recipes/digits_demo.py --quick    # the short version (about 3 minutes): fewer steps, 2 heads only
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shd_plugins.demo.data import write_digits_imagefolder  # noqa: E402

DONE_MARKER = 'demo_done.json'
STARTED_MARKER = 'demo_started.json'
VIT_NAME = 'vit_tiny_patch16_224'
VIT_TEACHER_KWARGS = 'patch_size=8 embed_dim=64 depth=4 num_heads=8'
VIT_STUDENT_KWARGS = {2: 'patch_size=8 embed_dim=32 depth=2 num_heads=2', 4: 'patch_size=8 embed_dim=32 depth=2 num_heads=4'}
VARIANTS = ('none', 'kd', 'kd_shd', 'kd_mean', 'kd_select')
VARIANT_LABELS = {'none': 'no distillation', 'kd': 'KD (logits / outputs)', 'kd_shd': 'KD + SHD',
                  'kd_mean': 'KD + mean-merge (ablation)', 'kd_select': 'KD + head-select (ablation)'}
MERGE_OF_VARIANT = {'kd_shd': 'shd', 'kd_mean': 'mean', 'kd_select': 'select'}


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
    def quick(cls) -> 'Settings':
        return cls(heads=(2,), vit_seeds=(0,), vit_teacher_epochs=3, vit_student_epochs=2, dit_teacher_steps=60,
                   dit_student_steps=30, fid_samples=100, fid_steps=10)


@dataclass
class Job:
    """One command of the demo; it is done when ``run_dir/demo_done.json`` records the same command."""
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


def run_jobs(jobs: list[Job], workers: int) -> dict[str, float]:
    """Run jobs respecting dependencies, ``workers`` at a time; returns wall seconds per job (cached: marker's)."""
    from tqdm import tqdm

    by_name = {job.name: job for job in jobs}
    seconds: dict[str, float] = {}
    pending = [job for job in jobs]
    running: dict[str, tuple] = {}
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'PYTHONPATH': str(REPO),
           'HF_HUB_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false'}
    bar = tqdm(total=len(jobs), desc='demo', unit='run', dynamic_ncols=True)
    while pending or running:
        for job in list(pending):
            if len(running) >= workers:
                break
            if any(dep in by_name and (dep not in seconds) for dep in job.deps):
                continue
            pending.remove(job)
            if job.is_done():
                seconds[job.name] = json.loads(job.marker().read_text())['seconds']
                bar.set_postfix_str(f'cached {job.name}')
                bar.update(1)
                continue
            started = job.run_dir / STARTED_MARKER
            recorded = [json.loads(m.read_text())['command'] for m in (started, job.marker()) if m.is_file()]
            if any(command != display_command(job.command) for command in recorded):
                shutil.rmtree(job.run_dir)  # an earlier, different run: its checkpoints must not be resumed
            resuming = started.is_file()
            command = job.command + (job.resume_args if resuming else [])
            job.run_dir.mkdir(parents=True, exist_ok=True)
            started.write_text(json.dumps({'command': display_command(job.command)}))
            log = open(job.run_dir / 'demo_log.txt', 'a')
            log.write(f'\n$ {display_command(command)}\n')
            log.flush()
            process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            running[job.name] = (process, time.time(), log)
            tqdm.write(f"[demo] {'resume' if resuming else 'start '} {job.name}")
        for name, (process, start, log) in list(running.items()):
            if process.poll() is None:
                continue
            log.close()
            del running[name]
            job = by_name[name]
            if process.returncode != 0:
                for other, _, other_log in running.values():
                    other.terminate()
                tail = (job.run_dir / 'demo_log.txt').read_text()[-3000:]
                raise RuntimeError(f'{name} failed (exit {process.returncode}); its log ends with:\n{tail}')
            seconds[name] = time.time() - start
            job.marker().write_text(json.dumps({'command': display_command(job.command), 'seconds': seconds[name]}))
            bar.update(1)
            tqdm.write(f'[demo] done  {name} in {seconds[name]:.0f}s')
        time.sleep(0.2)
    bar.close()
    return seconds


def vit_jobs(out: Path, data: Path, s: Settings) -> list[Job]:
    config = REPO / 'recipes/configs/digits_vit.yaml'
    train = [sys.executable, str(REPO / 'recipes/train_timm.py'), '-c', str(config), '--data-dir', str(data)]
    teacher_dir = out / 'vit' / 'teacher'
    jobs = [Job('vit/teacher', train + ['--model-kwargs', *VIT_TEACHER_KWARGS.split(), '--epochs',
                                        str(s.vit_teacher_epochs), '--seed', '0', '--output', str(teacher_dir)],
                teacher_dir, resume_args=['--resume', 'auto'], info={'kind': 'vit', 'role': 'teacher', 'heads': 8})]
    teacher_ckpt = teacher_dir / 'model_best.pth.tar'
    for heads in s.heads:
        for variant in VARIANTS:
            for seed in s.vit_seeds:
                run_dir = out / 'vit' / f'h{heads}_{variant}_s{seed}'
                command = train + ['--model-kwargs', *VIT_STUDENT_KWARGS[heads].split(), '--epochs',
                                   str(s.vit_student_epochs), '--seed', str(seed), '--output', str(run_dir)]
                if variant != 'none':
                    command += ['--kd-model-name', VIT_NAME, '--kd-checkpoint', str(teacher_ckpt)]
                    if variant == 'kd':
                        command += ['--kd-distill-type', 'logit']
                    else:
                        command += ['--kd-distill-type', 'shd', '--shd-merge', MERGE_OF_VARIANT[variant],
                                    '--shd-weight', str(s.vit_shd_weight)]
                jobs.append(Job(f'vit/h{heads}_{variant}_s{seed}', command, run_dir, deps=['vit/teacher'],
                                resume_args=['--resume', 'auto'],
                                info={'kind': 'vit', 'role': 'student', 'heads': heads, 'variant': variant,
                                      'seed': seed}))
    for job in list(jobs):
        kwargs = VIT_TEACHER_KWARGS if job.info['role'] == 'teacher' else VIT_STUDENT_KWARGS[job.info['heads']]
        eval_dir = job.run_dir / 'top1'
        jobs.append(Job(f'{job.name}/top1', [
            sys.executable, str(REPO / 'eval/top1.py'), '--model', VIT_NAME, '--model-kwargs', *kwargs.split(),
            '--num-classes', '10', '--in-chans', '1', '--img-size', '32', '-j', '0', '--checkpoint',
            str(job.run_dir / 'model_best.pth.tar'), '--data-dir', str(data), '--split', 'val', '--no-progress',
            '--results-file', str(eval_dir / 'top1.json')], eval_dir, deps=[job.name], info={**job.info, 'eval': 'top1'}))
    return jobs


def dit_jobs(out: Path, data: Path, s: Settings) -> list[Job]:
    configs = REPO / 'recipes/configs'
    train = [sys.executable, str(REPO / 'recipes/train_dit.py'), '--train_data_dir', str(data / 'train'),
             '--resolution', '8', '--train_batch_size', '64', '--learning_rate', str(s.dit_lr),
             '--lr_warmup_steps', '0', '--checkpointing_steps', '100', '--checkpoints_total_limit', '1']
    resume = ['--resume_from_checkpoint', 'latest']
    teacher_dir = out / 'dit' / 'teacher'
    jobs = [Job('dit/teacher', train + ['--model_config', str(configs / 'digits_dit_teacher.json'), '--seed', '0',
                                        '--max_train_steps', str(s.dit_teacher_steps), '--output_dir', str(teacher_dir)],
                teacher_dir, resume_args=resume, info={'kind': 'dit', 'role': 'teacher', 'heads': 8})]
    for heads in s.heads:
        for variant in VARIANTS:
            run_dir = out / 'dit' / f'h{heads}_{variant}'
            command = train + ['--model_config', str(configs / f'digits_dit_student_h{heads}.json'), '--seed', '0',
                               '--max_train_steps', str(s.dit_student_steps), '--output_dir', str(run_dir)]
            if variant != 'none':
                command += ['--shd_teacher_model_name_or_path', str(teacher_dir), '--output_kd_weight', '1.0',
                            '--shd_weight', '0' if variant == 'kd' else str(s.dit_shd_weight)]
                if variant != 'kd':
                    command += ['--shd_merge', MERGE_OF_VARIANT[variant]]
            jobs.append(Job(f'dit/h{heads}_{variant}', command, run_dir, deps=['dit/teacher'], resume_args=resume,
                            info={'kind': 'dit', 'role': 'student', 'heads': heads, 'variant': variant, 'seed': 0}))
    for job in list(jobs):
        eval_dir = job.run_dir / 'fid'
        jobs.append(Job(f'{job.name}/fid', [
            sys.executable, str(REPO / 'eval/fid.py'), '--model_path', str(job.run_dir),
            '--num_samples', str(s.fid_samples), '--scheduler', 'ddim', '--num_inference_steps', str(s.fid_steps),
            '--guidance_scale', '1.5', '--batch_size', '250', '--seed', '0', '--reference', str(data / 'val'),
            '--feature_extractor', 'timm', '--fe_model_name', VIT_NAME,
            '--fe_checkpoint', str(out / 'vit' / 'teacher' / 'model_best.pth.tar'), '--fe_num_classes', '10',
            '--fe_in_chans', '1', '--fe_img_size', '32', '--fe_model_kwargs', *VIT_TEACHER_KWARGS.split(),
            '--no_progress', '--output_dir', str(eval_dir)], eval_dir, deps=[job.name, 'vit/teacher'],
            info={**job.info, 'eval': 'fid'}))
    return jobs


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--output', type=Path, default=REPO / 'runs' / 'demo', help='where runs and the report go')
    parser.add_argument('--quick', action='store_true', help='the ~3 minute version (fewer steps, 2 heads, 1 seed)')
    parser.add_argument('--workers', type=int, default=2, help='runs in parallel (one CPU thread each)')
    parser.add_argument('--fresh', action='store_true', help='delete earlier runs in --output first')
    return parser.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    settings = Settings.quick() if args.quick else Settings()
    out = args.output.resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    print(f'[demo] writing digits to {out / "data"}')
    write_digits_imagefolder(out / 'data', image_size=32)  # for the ViTs (8x8 patches: 16 tokens)
    write_digits_imagefolder(out / 'data8', image_size=8)  # the digits' native size, for the DiTs (patch 2: 16 tokens)
    jobs = vit_jobs(out, out / 'data', settings) + dit_jobs(out, out / 'data8', settings)
    seconds = run_jobs(jobs, args.workers)

    from digits_report import write_report  # the report half of the demo (figures, tables, JSON)
    report = write_report(out, jobs, seconds, settings, quick=args.quick, total_seconds=time.time() - started)
    print(f'[demo] report: {report}')
    return report


if __name__ == '__main__':
    main()
