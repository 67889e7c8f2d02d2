"""flash-bench: flash's benchmarks, ``python -m flash bench`` (or ``python -m flash_bench``).

The benchmark is a list of named sections (:mod:`flash_bench.sections`), each one module that
adds its own options and its own keys to the results JSON: ``attention`` (TFLOP/s against
PyTorch's SDPA flash and cuDNN kernels and FlexAttention, and memory against naive attention),
``overhead`` (host time per call of a tiny problem) and ``cpu`` (the reference backend against
PyTorch's CPU attention). Timing and the FLOP convention come from :mod:`flash.timing`.
"""

from __future__ import annotations

from flash_bench._version import __version__
from flash_bench.cli import main

__all__ = ["__version__", "main"]
