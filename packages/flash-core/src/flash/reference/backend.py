"""The ``reference`` backend: the tiled pure-torch algorithm, every spec option, any device.

It is what runs where no kernel backend can (a machine without a GPU, an option
no kernel supports), and the backward of last resort for any forward, through
the shared LSE contract.
"""

from __future__ import annotations

from flash import heuristics
from flash._version import __version__
from flash.backend import Backend, BackwardArgs, ForwardArgs
from flash.reference import tiled
from flash.spec import AttentionSpec


class ReferenceBackend(Backend):
    name = "reference"
    version = __version__
    priority = 0  # anything faster that supports the problem wins

    def forward_reasons(self, spec: AttentionSpec) -> list[str]:
        return []

    def backward_reasons(self, spec: AttentionSpec) -> list[str]:
        if spec.is_fp8:
            return ["fp8 attention is inference-only (no backward)"]
        return []

    def _blocks(self, spec: AttentionSpec, pass_: str) -> tuple[int, int]:
        config = heuristics.config_for(self, spec, pass_)
        return config.block_m, config.block_n

    def tuning_candidates(self, spec: AttentionSpec, pass_: str) -> list[heuristics.KernelConfig]:
        return [heuristics.KernelConfig(m, n) for m, n in ((128, 256), (256, 256), (256, 512), (512, 512))]

    def forward(self, spec: AttentionSpec, args: ForwardArgs) -> None:
        tiled.forward(spec, args, *self._blocks(spec, "forward"))

    def backward(self, spec: AttentionSpec, args: BackwardArgs) -> None:
        tiled.backward(spec, args, *self._blocks(spec, "backward"))
