"""``python -m shd_plugins.evidence [--quick]``: ``make evidence``, as ``recipes/evidence.py``."""
from __future__ import annotations

from .run import main

if __name__ == '__main__':
    main(prog='python -m shd_plugins.evidence')
