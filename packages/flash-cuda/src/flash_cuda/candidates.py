"""The tile configurations worth timing, per head-dim bucket (those that compile without spilling;
PERF_NOTES.md tells how they were chosen). Used by ``python -m flash_cuda.tune`` to write the table,
and by autotuning (``FLASH_AUTOTUNE=1``) through :meth:`CudaBackend.tuning_candidates`."""

from __future__ import annotations

from flash.heuristics import KernelConfig


def _config(bm: int, bn: int, nw: int, st: int, qreg: bool, mb: int, bn_window: int | None = None) -> KernelConfig:
    extra: dict[str, bool | int] = {"min_blocks": mb, "q_in_regs": qreg}
    if bn_window is not None:
        extra["block_n_window"] = bn_window
    return KernelConfig(bm, bn, nw, st, tuple(sorted(extra.items())))


#: Candidate tiles per head-dim bucket (the ones that compile without spilling; see PERF_NOTES.md).
CANDIDATES: dict[int, list[KernelConfig]] = {
    64: [
        _config(128, 64, 4, 2, True, 2),
        _config(128, 64, 4, 3, True, 2),
    ],
    128: [
        _config(128, 64, 4, 2, False, 2, bn_window=32),
        _config(128, 32, 4, 2, False, 2),
    ],
}
