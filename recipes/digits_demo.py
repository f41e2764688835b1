#!/usr/bin/env python3
"""The embedded default (digits, CPU, no downloads) end to end: ``make demo`` runs this script.

The demo lives in :mod:`shd_plugins.demo` (``python -m shd_plugins.demo`` is the same); see ``--help``.

    python recipes/digits_demo.py            # the full demo (about 12 minutes on 2 CPU cores)
    python recipes/digits_demo.py --quick    # the short version (about 3 minutes): fewer steps, 2 heads only
"""
from shd_plugins.demo.run import main

if __name__ == '__main__':
    main()
