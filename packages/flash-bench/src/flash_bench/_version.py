"""The package version, read from the installed metadata (pyproject.toml is the one source)."""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("flash-bench")
except metadata.PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.1.0"
