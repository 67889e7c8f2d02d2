"""Which backend is fastest for a problem class, as measured: the order ``backend="auto"`` tries.

Priorities say which backend a package *prefers* to be; the ranking says which one *was faster*
in one benchmark run on one kind of GPU, per problem class (architecture, pass, dtype, head-dim
bucket, causal). ``ranking.json`` beside this module holds the rows, each with its provenance; a
class without a row falls back to the priorities, and so does every class once the user has
overridden a priority (:func:`flash.set_backend_priority`).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources

import torch

from flash.heuristics import Pass, Provenance, _as_list, dtype_name, head_dim_bucket
from flash.spec import AttentionSpec

_RANKED_DTYPES = (torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class Ranking:
    order: tuple[str, ...]  # backend names, fastest first
    provenance: Provenance


@functools.cache
def table() -> dict[tuple[str, Pass, str, int, bool], Ranking]:
    """The rows of ``ranking.json``, expanded to one entry per (arch, pass, dtype, head-dim bucket, causal)."""
    rows = json.loads(resources.files("flash.heuristics").joinpath("ranking.json").read_text())["entries"]
    out: dict[tuple[str, Pass, str, int, bool], Ranking] = {}
    for row in rows:
        ranking = Ranking(tuple(row["order"]), Provenance(**row["provenance"]))
        for dtype in _as_list(row["dtype"]):
            for head_dim in _as_list(row["head_dim"]):
                for causal in _as_list(row["causal"]):
                    key = (row["arch"], row["pass"], dtype, head_dim, causal)
                    if key in out:
                        raise ValueError(f"ranking table: duplicate entry for {key}")
                    out[key] = ranking
    return out


def ranking_for(spec: AttentionSpec, pass_: Pass) -> Ranking | None:
    """The measured order for ``spec``'s problem class, if one was measured."""
    from flash.support import device_capability

    capability = device_capability(spec.device)  # None off CUDA, or without a GPU to ask
    if capability is None or spec.dtype not in _RANKED_DTYPES or spec.head_dim > 256:
        return None
    arch = "sm_{}{}".format(*capability)
    return table().get((arch, pass_, dtype_name(spec.dtype), head_dim_bucket(spec.head_dim), spec.causal))
