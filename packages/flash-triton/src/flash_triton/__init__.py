"""flash-triton: the Triton backend of flash (registry name ``triton``).

Importing this package imports neither triton nor any kernel: the kernels are
``@triton.jit`` functions whose module must be imported after ``TRITON_INTERPRET``
is settled, so :mod:`flash_triton.runtime` imports them on first use.
"""

from __future__ import annotations

from flash_triton._version import __version__

__all__ = ["__version__"]
