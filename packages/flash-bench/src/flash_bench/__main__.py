"""``python -m flash_bench``: the same as ``python -m flash bench``."""

from __future__ import annotations

import sys

from flash_bench.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m flash_bench"))
