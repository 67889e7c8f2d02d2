"""The ``reference`` backend: the tiled pure-torch algorithm, every spec option, any device.

It is what runs where no kernel backend can (a machine without a GPU, an option
no kernel supports), and the backward of last resort for any forward, through
the shared LSE contract.
"""

from __future__ import annotations

from typing import Any

from flash import heuristics
from flash._version import __version__
from flash.backend import FEATURES, Backend, BackwardArgs, ForwardArgs, Pass, Support
from flash.reference import tiled
from flash.spec import FP8_DTYPES, SUPPORTED_DTYPES, AttentionSpec

_ANY_DEVICE = frozenset({"cpu", "cuda"})


class ReferenceBackend(Backend):
    name = "reference"
    version = __version__
    priority = 0  # anything faster that supports the problem wins
    forward_support = Support(dtypes=frozenset(SUPPORTED_DTYPES), features=FEATURES, devices=_ANY_DEVICE)
    # fp8 attention is inference-only: no backward.
    backward_support = Support(
        dtypes=frozenset(SUPPORTED_DTYPES) - frozenset(FP8_DTYPES), features=FEATURES - {"fp8"}, devices=_ANY_DEVICE
    )

    def heuristics_rows(self) -> list[dict[str, Any]]:
        return heuristics.rows_from_json("flash.reference", "heuristics.json")

    def tuning_candidates(self, spec: AttentionSpec, pass_: Pass) -> list[heuristics.KernelConfig]:
        return [heuristics.KernelConfig(m, n) for m, n in ((128, 256), (256, 256), (256, 512), (512, 512))]

    def forward(self, spec: AttentionSpec, args: ForwardArgs, config: heuristics.KernelConfig) -> None:
        tiled.forward(spec, args, config.block_m, config.block_n)

    def backward(self, spec: AttentionSpec, args: BackwardArgs, config: heuristics.KernelConfig) -> None:
        tiled.backward(spec, args, config.block_m, config.block_n)
