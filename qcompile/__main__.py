"""`python -m qcompile quantize|report|bench`: the command line (see qcompile/cli.py)."""
from __future__ import annotations

import sys

from qcompile.cli import main

if __name__ == "__main__":
    sys.exit(main())
