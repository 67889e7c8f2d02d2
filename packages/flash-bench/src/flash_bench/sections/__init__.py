"""The benchmark's sections: each is one module with a :class:`~flash_bench.base.Section` object,
listed in :data:`SECTIONS`. A new measurement (decode bandwidth, fp8, masks...) is a new module
here and one more entry in that list; the command line and the JSON file need nothing else.
"""

from __future__ import annotations

import torch

from flash_bench.base import Section
from flash_bench.sections import attention, cpu, decode, fp8, masks, overhead

#: Every section, by name, in the order they run.
SECTIONS: dict[str, Section] = {
    s.name: s for s in (attention.SECTION, decode.SECTION, overhead.SECTION, cpu.SECTION, masks.SECTION, fp8.SECTION)
}


def defaults(device: torch.device) -> list[str]:
    """The sections that run on ``device`` when none are named."""
    return [name for name, s in SECTIONS.items() if s.default and device.type in s.devices]
