#!/usr/bin/env python3
"""Paired evidence on the digits (issue 13): ``make evidence`` runs this script.

The code lives in :mod:`shd_plugins.evidence` (``python -m shd_plugins.evidence`` is the same); see ``--help``.

    python recipes/evidence.py            # about an hour on 2 CPU cores
    python recipes/evidence.py --quick    # a few minutes: the plumbing only, numbers mean nothing
"""
from shd_plugins.evidence.run import main

if __name__ == '__main__':
    main()
