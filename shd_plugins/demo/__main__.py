"""``python -m shd_plugins.demo [--quick]``: the digits demo, as ``recipes/digits_demo.py``."""
from __future__ import annotations

from .run import main

if __name__ == '__main__':
    main(prog='python -m shd_plugins.demo')
