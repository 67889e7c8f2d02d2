"""``python -m flash``: the command line (:mod:`flash.cli`)."""

from __future__ import annotations

import sys

from flash.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
