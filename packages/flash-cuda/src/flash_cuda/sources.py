"""The kernels' CUDA source as NVRTC compiles it: one text, every ``#include "..."`` of the
package's ``kernels/`` folder inlined once (NVRTC is given no include path)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from importlib import resources

_INCLUDE = re.compile(r'^#include "([A-Za-z0-9_.]+)"\s*$', re.MULTILINE)


def read_kernel_file(name: str) -> str:
    """The text of ``kernels/<name>`` as shipped in the package."""
    return resources.files("flash_cuda").joinpath("kernels").joinpath(name).read_text()


def inline_includes(entry: str, generated: Mapping[str, str] | None = None) -> str:
    """``kernels/<entry>`` with each include inlined once; ``generated`` maps include names to text
    made at run time instead of read from the folder."""
    generated = generated or {}
    seen: set[str] = set()

    def expand(text: str) -> str:
        def include(match: re.Match[str]) -> str:
            name = match.group(1)
            if name in seen:
                return f"// (already included: {name})"
            seen.add(name)
            body = generated[name] if name in generated else expand(read_kernel_file(name))
            return f"// ---- begin {name}\n{body}\n// ---- end {name}"

        return _INCLUDE.sub(include, text)

    return expand(read_kernel_file(entry)).replace("#pragma once\n", "")
