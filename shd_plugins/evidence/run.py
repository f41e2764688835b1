"""``make evidence``: paired seeds, the paper's variants and tested verdicts, on the digits, on CPU.

1. writes scikit-learn's digits as ImageFolders (32x32 for the ViTs, 8x8 for the DiTs), as the demo does;
2. trains the teachers (a ViT at 16 and at 64 tokens, a DiT), 8 heads each;
3. trains 2- and 4-head students under every variant of issue 13 (no distillation, KD, KD + SHD, KD + mean-merge,
   KD + head-select, KD + SHD with per-row weights / balanced grouping / MSE, and for the ViT timm's feature
   alignment), every variant with the same seeds (ViT 5, DiT 3), plus targeted DiT KD runs (point 4);
4. evaluates FID for every DiT (``eval/fid.py``) and re-checks a few ViTs with ``eval/top1.py``;
5. writes EVIDENCE.md (paired differences, t-test and sign-test p-values, one sentence per comparison, per-seed
   tables, compute, figures, commands) and results.json.

Every run is a recipe or evaluator run as a subprocess (the demo's scheduler): finished runs are cached, an
interrupted ``make evidence`` resumes where it stopped.

    python recipes/evidence.py            # about an hour on 2 CPU cores
    python recipes/evidence.py --quick    # a few minutes: the plumbing only, numbers mean nothing (runs/evidence_quick)
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..cli import user_errors
from ..demo.data import write_digits_imagefolder
from ..demo.jobs import REPO, check_checkout, run_jobs
from .plan import EvidenceSettings, estimate_seconds, evidence_jobs
from .report import write_evidence

__all__ = ['parse_args', 'main']

_logger = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--output', type=Path, default=None,
                        help='where runs and the report go (default: runs/evidence, with --quick runs/evidence_quick, '
                             'so a plumbing check never replaces the runs of the full evidence)')
    parser.add_argument('--quick', action='store_true', help='the plumbing check (tiny sizes, numbers mean nothing)')
    parser.add_argument('--workers', type=int, default=2, help='runs in parallel (one CPU thread each)')
    parser.add_argument('--fresh', action='store_true', help='delete earlier runs in --output first')
    parser.add_argument('--plan', action='store_true', help='print the jobs and the planned time, run nothing')
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f'--workers must be at least 1, got {args.workers}')
    return args


def _accumulated_wall(out: Path, seconds: float) -> float:
    """Add this invocation's wall seconds to those of earlier ones that ran jobs (``evidence_wall.json``): an
    interrupted and resumed evidence reports the time it really took, a fully cached one the time of the runs."""
    path = out / 'evidence_wall.json'
    total = (json.loads(path.read_text())['wall_seconds'] if path.is_file() else 0.0) + seconds
    path.write_text(json.dumps({'wall_seconds': total}))
    return total


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> Path | None:
    """Write the data, run (or find cached) every job, then write EVIDENCE.md; returns its path (None with --plan).

    Args:
        argv: Command-line words (``sys.argv[1:]`` when None).
        prog: Program name in usage and error lines (the script's file name when None, as argparse).
    """
    args = parse_args(argv, prog)
    words = sys.argv[1:] if argv is None else list(argv)
    with user_errors(prog):
        check_checkout()
        settings = EvidenceSettings.quick() if args.quick else EvidenceSettings()
        out = (args.output or REPO / 'runs' / ('evidence_quick' if args.quick else 'evidence')).resolve()
        jobs = evidence_jobs(out, out / 'data', out / 'data8', settings)
        plan = estimate_seconds(jobs)
        trained = sum('eval' not in job.info for job in jobs)
        print(f"[evidence] {len(jobs)} jobs ({trained} training runs); planned {plan['total']:.0f} core-seconds, "
              f"about {plan['total'] / args.workers / 60:.0f} min at {args.workers} runs at a time")
        if args.plan:
            for job in jobs:
                print(f'  {job.name}')
            return None
        if args.fresh and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        started = time.time()
        print(f"[evidence] writing digits to {out / 'data'} and {out / 'data8'}")
        write_digits_imagefolder(out / 'data', image_size=32)
        write_digits_imagefolder(out / 'data8', image_size=8)
        to_run = sum(not job.is_done() for job in jobs)
        seconds = run_jobs(jobs, args.workers, tag='evidence')
        report = write_evidence(out, jobs, seconds, settings, quick=args.quick,
                                total_seconds=_accumulated_wall(out, time.time() - started if to_run else 0.0),
                                workers=args.workers,
                                command_line=shlex.join(['python', 'recipes/evidence.py', *words]))
    print(f'[evidence] report: {report}')
    return report
