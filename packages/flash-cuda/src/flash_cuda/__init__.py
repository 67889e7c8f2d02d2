"""flash-cuda: the CUDA backend of flash (raw CUDA C++ on tensor cores, compiled at run time by NVRTC).

Importing this package imports neither CuPy nor any CUDA library: the backend loads them the
first time it is asked whether it can run.
"""

from flash_cuda._version import __version__

__all__ = ["__version__"]
