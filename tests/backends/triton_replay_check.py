"""Run by tests/backends/test_triton_replay.py in a process without ``TRITON_INTERPRET``: replayed
launches (:mod:`flash_triton.replay`) must reach the same compiled kernels with the same arguments as
``JITFunction.run``, whatever the tensors' alignment, strides and dtypes.

No GPU is needed: Triton's driver is faked and each "compiled kernel" is a stand-in named by
Triton's own cache key (so a different specialisation is a different stand-in) that logs its launches.
"""

from __future__ import annotations

import os
from typing import Any

import torch

import flash
from flash.backend import BackwardArgs, ForwardArgs
from flash.spec import AttentionSpec, canonical, canonical_lse
from flash_bench.hostpath import TRITON_ARCH, fake_triton_driver, triton_config
from flash_triton import launch, replay

LOG: list[tuple[str, tuple[int, ...], tuple[Any, ...]]] = []


class Kernel:
    """A compiled kernel's stand-in: logs (Triton's key, grid, arguments) of each launch."""

    function = 0
    packed_metadata = ()

    def __init__(self, key: str) -> None:
        self.key = key

    def launch_metadata(self, *args: Any) -> None:
        return None

    def run(self, gx: int, gy: int, gz: int, stream: int, function: int, packed: Any, *rest: Any) -> None:
        _metadata, _enter, _exit, *args = rest
        LOG.append((self.key, (gx, gy, gz), tuple(args)))


def compile_stand_in(self: Any, key: str, signature: Any, device: int, *args: Any, **kwargs: Any) -> Kernel:
    kernel = Kernel(key)
    self.device_caches[device][0][key] = kernel
    return kernel


def labelled(log: list, roles: dict[int, str]) -> list:
    """The log with each tensor as its role in the call (``roles``: id to name) or, for a buffer the launch
    code allocated, its call-local number; with shape, strides, dtype and alignment. Replays must hand
    the kernels the tensors of the call at hand, never those of the recorded one."""
    numbers: dict[int, int] = {}

    def label(x: Any) -> Any:
        if isinstance(x, tuple):
            return tuple(label(y) for y in x)
        if isinstance(x, torch.Tensor):
            role = roles.get(id(x)) or numbers.setdefault(id(x), len(numbers))
            return ("tensor", role, tuple(x.shape), x.stride(), x.dtype, x.data_ptr() % 16)
        return x

    return [(key, grid, label(args)) for key, grid, args in log]


def launches(call: Any) -> list:
    """What one call launched, labelled (``call()`` runs it and returns its tensors by role)."""
    start = len(LOG)
    roles = call()
    return labelled(LOG[start:], {id(t): name for name, t in roles.items()})


def check(name: str, run: Any) -> None:
    """``run`` replayed (recorded on a first call, then replayed) logs what ``JITFunction.run`` logs."""
    replay.forget()
    enabled = replay.enabled
    replay.enabled = lambda: False  # type: ignore[assignment]
    try:
        reference = launches(run)
    finally:
        replay.enabled = enabled  # type: ignore[assignment]
    recorded = launches(run)
    replayed = launches(run)
    assert reference, f"{name}: nothing launched"
    assert len(replay._recordings) == 1, f"{name}: not recorded"
    assert recorded == reference, f"{name}: the recording call launched something else"
    assert replayed == reference, f"{name}: the replay launched something else"
    print(f"ok {name}: {len(reference)} launches")


def tensors(shape_q: tuple[int, ...], shape_k: tuple[int, ...], offset: int = 0, dtype: torch.dtype = torch.bfloat16):
    """q, k, v (q ``offset`` elements into its storage) and an output gradient."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(offset + torch.Size(shape_q).numel(), generator=gen).to(dtype)
    q = base[offset:].view(shape_q)
    k, v = (torch.randn(shape_k, generator=gen).to(dtype) for _ in range(2))
    return q, k, v, torch.randn(shape_q, generator=gen).to(dtype)


def forward_call(spec: AttentionSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Any:
    """A forward call on fresh outputs (as core allocates them), returning its tensors by role."""
    config = triton_config(spec, "forward")

    def call() -> dict[str, torch.Tensor]:
        c = canonical
        out, lse = torch.empty(q.shape, dtype=spec.out_dtype), torch.empty(spec.lse_shape(), dtype=torch.float32)
        args = ForwardArgs(c(q, spec), c(k, spec), c(v, spec), c(out, spec), canonical_lse(lse, spec))
        launch.forward(spec, args, config)
        return {"q": args.q, "k": args.k, "v": args.v, "out": args.out, "lse": args.lse}

    return call


def backward_call(spec: AttentionSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor) -> Any:
    """A backward call on fresh gradients, returning its tensors by role."""
    config = triton_config(spec, "backward")
    out, lse = torch.empty_like(q), torch.empty(spec.lse_shape(), dtype=torch.float32)

    def call() -> dict[str, torch.Tensor]:
        c = canonical
        dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
        args = BackwardArgs(c(q, spec), c(k, spec), c(v, spec), c(out, spec), canonical_lse(lse, spec), c(dout, spec),
                            c(dq, spec), c(dk, spec), c(dv, spec))  # fmt: skip
        launch.backward(spec, args, config)
        names = ("q", "k", "v", "out", "lse", "dout", "dq", "dk", "dv")
        return {name: getattr(args, name) for name in names}

    return call


def decode_call(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, new: torch.Tensor | None = None, **options: Any
) -> Any:
    """A KV-cache step (appending ``new`` as k and a copy as v, if given) on fresh outputs and lengths,
    returning its tensors by role."""
    from flash.backend import DecodeArgs
    from flash.heuristics import lookup
    from flash.kvspec import build_kv_spec
    from flash.registry import REGISTRY
    from flash_triton import decode

    lengths = torch.tensor([5] * q.shape[0], dtype=torch.int32)
    new_v = None if new is None else new.clone()
    spec = build_kv_spec(q, k_cache, v_cache, new, new_v, cache_seqlens=lengths, **options)
    config = lookup(REGISTRY.get("triton"), TRITON_ARCH, "bf16", spec.head_dim, spec.causal, "decode").config
    extra = {name: options[name] for name in ("block_table", "rotary_cos", "rotary_sin") if name in options}

    def call() -> dict[str, torch.Tensor]:
        seqlens = lengths.clone()  # a new tensor each step, as an int cache_seqlens makes one
        out, lse = torch.empty(q.shape, dtype=q.dtype), torch.empty(spec.lse_shape(), dtype=torch.float32)
        args = DecodeArgs(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=seqlens, out=out, lse=lse, k=new,
                          v=new_v, **extra)  # fmt: skip
        decode.decode(spec, args, config)
        return {"q": q, "k_cache": k_cache, "v_cache": v_cache, "seqlens": seqlens, "out": out, "lse": lse, **extra}

    return call


def main() -> None:
    assert "TRITON_INTERPRET" not in os.environ, "run without TRITON_INTERPRET: the kernels must be JIT functions"
    replay._gpu = lambda: True  # type: ignore[assignment]  # the faked driver stands in for one
    if not replay.enabled():
        print("skip: replay is off for this Triton version")
        return
    small, keys = (1, 1, 8, 64), (1, 16, 8, 64)
    with fake_triton_driver(compile_stand_in):
        q, k, v, dout = tensors(small, keys)
        spec = flash.build_spec(q, k, v)
        check("forward", forward_call(spec, q, k, v))
        check("backward", backward_call(spec, q, k, v, dout))
        check("causal forward", forward_call(flash.build_spec(q, k, v, causal=True), q, k, v))

        # The same spec object with q moved off its 16-byte alignment: Triton specialises pointers on
        # it, so the replay must not reuse the aligned kernel.
        uq, *_ = tensors(small, keys, offset=1)
        aligned = launches(forward_call(spec, q, k, v))
        check("forward, q unaligned", forward_call(spec, uq, k, v))
        unaligned = launches(forward_call(spec, uq, k, v))
        assert aligned[0][0] != unaligned[0][0], "alignment did not change the kernel: the check proves nothing"
        assert launches(forward_call(spec, q, k, v))[0][0] == aligned[0][0]

        # Other strides (ints Triton specialises on) and a bhsd layout.
        qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        check("forward, head-major strides", forward_call(flash.build_spec(qt, kt, vt), qt, kt, vt))
        qb, kb, vb, db = (t.transpose(1, 2) for t in (q, k, v, dout))
        bhsd = flash.build_spec(qb, kb, vb, layout="bhsd")
        check("bhsd forward", forward_call(bhsd, qb, kb, vb))
        check("bhsd backward", backward_call(bhsd, qb, kb, vb, db))

        # One tensor in several roles (self-attention's attention(x, x, x)) replays too, and its
        # recording does not serve a call of the same spec whose tensors are distinct.
        xs = [torch.randn(keys).to(torch.bfloat16) for _ in range(3)]
        self_spec = flash.build_spec(xs[0], xs[0], xs[0])
        check("forward, q, k and v one tensor", forward_call(self_spec, xs[0], xs[0], xs[0]))
        distinct = forward_call(self_spec, *xs)
        first = launches(distinct)
        assert len(replay._recordings) == 2, "the aliased call's recording served distinct tensors"
        assert launches(distinct) == first, "distinct tensors after an aliased recording: other launches"

        # KV-cache steps: append + split-KV (three kernels, a workspace of the step's own), paged, rotary.
        cache, token = torch.randn(2, 64, 2, 64).to(torch.bfloat16), torch.randn(2, 1, 2, 64).to(torch.bfloat16)
        q1 = torch.randn(2, 1, 8, 64).to(torch.bfloat16)
        check("decode, append, 2 splits", decode_call(q1, cache, cache.clone(), token, num_splits=2))
        check("decode, one split", decode_call(q1, cache, cache.clone(), num_splits=1))
        pages, table = torch.randn(8, 16, 2, 64).to(torch.bfloat16), torch.arange(8, dtype=torch.int32).view(2, 4)
        check("decode, paged", decode_call(q1, pages, pages.clone(), token, block_table=table, num_splits=2))
        cos, sin = torch.rand(128, 32), torch.rand(128, 32)
        check("decode, rotary", decode_call(q1, cache, cache.clone(), token, rotary_cos=cos, rotary_sin=sin))

        # Recordings keep no tensor of the recorded call alive (its memory would be pinned).
        for recording in replay._recordings.values():
            for launch_ in recording.launches:
                assert not any(isinstance(a, torch.Tensor) for a in launch_.args), "a recording holds a tensor"

        # Dropout gives each call a new spec (its seed): nothing to record.
        replay.forget()
        launches(forward_call(flash.build_spec(q, k, v, dropout_p=0.1, dropout_seed=1), q, k, v))
        assert not replay._recordings, "a dropout call was recorded"

        # A hook Triton runs per launch turns replay off.
        from triton import knobs

        knobs.runtime.add_stages_inspection_hook = lambda: ("key", "hash")
        try:
            assert replay.signature("forward", (spec,), (q,)) is None
        finally:
            knobs.runtime.add_stages_inspection_hook = None
    print("all replay checks passed")


if __name__ == "__main__":
    main()
