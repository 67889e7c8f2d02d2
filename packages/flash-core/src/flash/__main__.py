"""``python -m flash`` (or ``flash``): the main job. ``python -m flash bench``: the benchmarks."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "bench":
        from flash import bench

        return bench.main(args[1:])
    from flash import demo

    return demo.main(args)


if __name__ == "__main__":
    sys.exit(main())
