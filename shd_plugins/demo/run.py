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
    python -m shd_plugins.demo --quick       # the same, from a source checkout
"""
from __future__ import annotations

import argparse
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from ..cli import user_errors
from .data import write_digits_imagefolder
from .jobs import REPO, Settings, check_checkout, dit_jobs, run_jobs, vit_jobs
from .report import write_report

__all__ = ['parse_args', 'main']

_logger = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--output', type=Path, default=REPO / 'runs' / 'demo', help='where runs and the report go')
    parser.add_argument('--quick', action='store_true', help='the ~3 minute version (fewer steps, 2 heads, 1 seed)')
    parser.add_argument('--workers', type=int, default=2, help='runs in parallel (one CPU thread each)')
    parser.add_argument('--fresh', action='store_true', help='delete earlier runs in --output first')
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f'--workers must be at least 1, got {args.workers}')
    return args


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> Path:
    """Write the data, run (or find cached) every job, then write the report; returns the path of REPORT.md.

    Args:
        argv: Command-line words (``sys.argv[1:]`` when None).
        prog: Program name in usage and error lines (the script's file name when None, as argparse).
    """
    args = parse_args(argv, prog)
    with user_errors(prog):
        check_checkout()
        settings = Settings.quick() if args.quick else Settings()
        out = args.output.resolve()
        if args.fresh and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        started = time.time()
        print(f"[demo] writing digits to {out / 'data'}")
        write_digits_imagefolder(out / 'data', image_size=32)  # for the ViTs (8x8 patches: 16 tokens)
        write_digits_imagefolder(out / 'data8', image_size=8)  # the digits' native size, for the DiTs (16 tokens)
        jobs = vit_jobs(out, out / 'data', settings) + dit_jobs(out, out / 'data8', settings)
        seconds = run_jobs(jobs, args.workers)
        report = write_report(out, jobs, seconds, settings, quick=args.quick, total_seconds=time.time() - started)
    print(f'[demo] report: {report}')
    return report
