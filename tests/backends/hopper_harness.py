"""The flash-cuda device harnesses (packages/flash-cuda/scripts/*_check.py) as modules for the GPU tier,
and the skip that the Hopper kernels' GPU tests share."""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

import pytest
import torch

SCRIPTS = os.path.join(os.path.dirname(__file__), "..", "..", "packages", "flash-cuda", "scripts")


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` imported as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, f"{name}.py"))
    assert spec is not None and spec.loader is not None, name
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def require_hopper(what: str) -> None:
    """Skip unless an sm_90 GPU and CuPy are here (``what``: the kernel, for the message)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip(f"{what} needs an sm_90 GPU")
    pytest.importorskip("cupy")
