"""Host-path timings on the CPU: what one tiny attention call costs the host before any kernel runs.

``python -m flash_bench.hostpath`` times the overhead problem of :mod:`flash_bench.sections.overhead`
(1 query, 16 keys, 8 heads, head_dim 64, bf16) on CPU tensors, with the GPU work taken out:

* ``core fwd``: :func:`flash.attention` (automatic dispatch) through a registered backend whose
  forward and backward do nothing (:class:`StubBackend`), so only core's path is timed: plan
  lookup, allocation of the outputs, the backend call;
* ``core fwd+bwd``: ``torch.autograd.grad`` of that call (core's autograd path, both passes stubbed);
* ``core decode step``: :func:`flash.attention_with_kvcache` appending one token to a 64-key cache,
  the KV-cache pass stubbed likewise;
* ``triton launch fwd`` / ``triton launch bwd``: flash-triton's host launch code on the kernels
  decorated for the GPU, behind a fake Triton driver (:func:`fake_triton_driver`): Triton's own
  ``JITFunction.run`` binds, specialises and looks the compiled kernel up as on a GPU, but the
  compiled kernel is a stand-in whose launch does nothing. What is *not* timed: the C launcher
  packing the arguments and ``cuLaunchKernel``, and the GPU driver's current-device and stream
  queries (real ones run on a GPU);
* ``cuda launch fwd`` / ``cuda launch bwd``: flash-cuda's Hopper forward and backward launches
  (``flash_cuda.hopper.forward``, ``flash_cuda.hopper_bwd.backward``) behind a fake CUDA driver
  (:func:`fake_cuda_driver`): every host step as on an H200 but the driver calls (tensor-map
  encoding, ``cuLaunchKernel``), module loading and torch's stream query, which are stand-ins;
* ``sdpa fwd`` / ``sdpa fwd+bwd``: PyTorch's attention on the same CPU tensors, for scale (its CPU
  kernel computes the tiny problem, so this is an upper bound on its host path).

Each row is the least over repeats of the mean time per call of ``--calls`` back-to-back calls.
These are CPU host-path numbers, not GPU results: a GPU adds the launches themselves.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

import flash
from flash import heuristics, plan
from flash.backend import FEATURES, Backend, BackwardArgs, DecodeArgs, ForwardArgs, Support
from flash.heuristics import KernelConfig
from flash.kvspec import KVCacheSpec
from flash.reference.backend import DECODE_FEATURES
from flash.registry import REGISTRY
from flash.spec import AttentionSpec, canonical, canonical_lse

BATCH, SEQLEN_Q, SEQLEN_K, HEADS, HEAD_DIM = 1, 1, 16, 8, 64
#: Keys in the cache of the ``core decode step`` row (a decoding step appending one token).
CACHE_KEYS = 64
DTYPE = torch.bfloat16
#: The architecture whose heuristics-table entries the Triton launch rows use (the H200's).
TRITON_ARCH = "sm_90"


class StubBackend(Backend):
    """A backend that accepts every CPU problem and computes nothing: core's path alone."""

    name = "host-stub"
    priority = 1_000_000  # above every installed backend, so automatic dispatch picks it
    forward_support = Support(
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}), features=FEATURES, devices=frozenset({"cpu"})
    )
    backward_support = forward_support
    decode_support = Support(dtypes=frozenset({torch.float16, torch.bfloat16}), features=DECODE_FEATURES,
                             devices=frozenset({"cpu"}))  # fmt: skip

    def forward(self, spec: AttentionSpec, args: ForwardArgs, config: KernelConfig) -> None:
        pass

    def backward(self, spec: AttentionSpec, args: BackwardArgs, config: KernelConfig) -> None:
        pass

    def decode(self, spec: KVCacheSpec, args: DecodeArgs, config: KernelConfig) -> None:
        pass


@contextlib.contextmanager
def stub_backend() -> Iterator[None]:
    """:class:`StubBackend` registered for the ``with`` block (plans made meanwhile are dropped after)."""
    REGISTRY.register(StubBackend())
    try:
        yield
    finally:
        REGISTRY.unregister(StubBackend.name)
        plan.forget()


def per_call_us(fn: Callable[[], object], *, calls: int, repeats: int) -> float:
    """The least over ``repeats`` of the mean wall time of ``calls`` back-to-back calls, in microseconds
    (the least, as ``timeit`` advises: other processes on the machine only ever add time)."""
    for _ in range(min(calls, 200)):
        fn()
    means = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter_ns() - start) / calls / 1e3)
    return min(means)


def inputs() -> tuple[torch.Tensor, ...]:
    """q, k, v and an output gradient of the overhead problem, (batch, seqlen, heads, head_dim)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(BATCH, SEQLEN_Q, HEADS, HEAD_DIM)] + [(BATCH, SEQLEN_K, HEADS, HEAD_DIM)] * 2
    q, k, v = (torch.randn(shape, generator=gen).to(DTYPE) for shape in shapes)
    return q, k, v, torch.randn(q.shape, generator=gen).to(DTYPE)


# ----------------------------------------------------------------------------- Triton behind a fake driver


class _StandInKernel:
    """What ``JITFunction.run`` finds in its cache: the attributes it reads, and a launch that does nothing."""

    function = 0
    packed_metadata = ()

    def launch_metadata(self, *args: Any) -> None:
        return None

    def run(self, *args: Any) -> None:
        return None


class _FakeDriver:
    """The Triton driver calls ``JITFunction.run`` makes, answered for an sm_90 GPU that is not there."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


def _compile_stand_in(self: Any, key: str, signature: Any, device: int, *args: Any, **kwargs: Any) -> _StandInKernel:
    """``JITFunction._do_compile`` without the compiler: caches a stand-in where the compiled kernel would go."""
    kernel = _StandInKernel()
    self.device_caches[device][0][key] = kernel
    return kernel


@contextlib.contextmanager
def fake_triton_driver(compile_stand_in: Callable[..., Any] = _compile_stand_in) -> Iterator[None]:
    """Triton kernels "launch" on CPU tensors: the driver is faked and ``JITFunction._do_compile`` is
    ``compile_stand_in`` (by default, one that caches a ``_StandInKernel``)."""
    try:
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction
    except ImportError:  # no Triton: nothing to fake (its rows are left out)
        yield
        return
    from flash_triton import replay

    compile_, active, gpu = JITFunction._do_compile, driver._active, replay._gpu
    driver.set_active(_FakeDriver())
    JITFunction._do_compile = compile_stand_in
    replay._gpu = lambda: True  # type: ignore[assignment]  # the fake driver stands in for a GPU
    try:
        yield
    finally:
        JITFunction._do_compile = compile_
        driver._active = active  # not reset_active(): without a GPU, Triton has no default driver
        replay._gpu = gpu


def triton_config(spec: AttentionSpec, pass_: str) -> KernelConfig:
    backend = REGISTRY.get("triton")
    entry = heuristics.lookup(backend, TRITON_ARCH, heuristics.dtype_name(spec.dtype), spec.head_dim, False, pass_)  # type: ignore[arg-type]
    return entry.config


def triton_launches(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor
) -> dict[str, Callable[[], object]]:
    """flash-triton's forward and backward launch on preallocated tensors (call inside :func:`fake_triton_driver`)."""
    from flash_triton import launch

    spec = flash.build_spec(q, k, v)
    out, lse = torch.empty_like(q), torch.empty(spec.lse_shape(), dtype=torch.float32)
    c = canonical
    fwd = ForwardArgs(c(q, spec), c(k, spec), c(v, spec), c(out, spec), canonical_lse(lse, spec))
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    bwd = BackwardArgs(
        c(q, spec), c(k, spec), c(v, spec), c(out, spec), canonical_lse(lse, spec), c(dout, spec),
        c(dq, spec), c(dk, spec), c(dv, spec),
    )  # fmt: skip
    fwd_config, bwd_config = triton_config(spec, "forward"), triton_config(spec, "backward")
    return {
        "triton launch fwd": lambda: launch.forward(spec, fwd, fwd_config),
        "triton launch bwd": lambda: launch.backward(spec, bwd, bwd_config),
    }


# ----------------------------------------------------------------------------- flash-cuda behind a fake driver


class _FakeLibcuda:
    """The libcuda calls of flash_cuda.tensor_map, answered without a GPU (and without doing anything)."""

    def cuTensorMapEncodeTiled(self, *args: Any) -> int:
        return 0

    def cuLaunchKernel(self, *args: Any) -> int:
        return 0


@contextlib.contextmanager
def fake_cuda_driver() -> Iterator[None]:
    """flash-cuda's Hopper launches run on CPU tensors: libcuda, module loading, the SM count and torch's
    stream query are stand-ins (a launch does nothing). Each stand-in replaces the name where the code
    that calls it looks it up: the backward launches through its own import of ``on_current_stream``
    (``hopper_bwd.run``)."""
    try:
        from flash_cuda import hopper, hopper_bwd, modules, tensor_map
    except ImportError:  # no flash-cuda: nothing to fake (its rows are left out)
        yield
        return

    def on_current_stream(packed: Any, device: int, grid: int, threads: int, smem: int, values: tuple) -> None:
        packed(grid, threads, smem, 0, values)

    stand_ins = [
        (tensor_map, "driver", _FakeLibcuda),
        (modules, "functions", lambda key, device, build, names, smem=0: tuple(range(1, len(names) + 1))),
        (hopper, "_sm_count", lambda device: 132),
        (hopper, "on_current_stream", on_current_stream),
        (hopper_bwd, "run", on_current_stream),
    ]
    saved = [(module, name, getattr(module, name)) for module, name, _ in stand_ins]
    for module, name, value in stand_ins:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def cuda_launches(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor
) -> dict[str, Callable[[], object]]:
    """flash-cuda's Hopper forward and backward launches on preallocated tensors (inside :func:`fake_cuda_driver`)."""
    from flash_cuda import hopper, hopper_bwd

    spec = flash.build_spec(q, k, v)
    out, lse = torch.empty_like(q), torch.empty(spec.lse_shape(), dtype=torch.float32)
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    h, d, scale = HEADS, HEAD_DIM, spec.scale
    return {
        "cuda launch fwd": lambda: hopper.forward(
            q, k, v, out, lse, seqlen_q=SEQLEN_Q, seqlen_k=SEQLEN_K, heads_q=h, heads_kv=h, head_dim=d, scale=scale
        ),
        "cuda launch bwd": lambda: hopper_bwd.backward(
            q, k, v, out, lse, dout, dq, dk, dv, heads_q=h, heads_kv=h, head_dim=d, scale=scale
        ),
    }


# ----------------------------------------------------------------------------- the rows


def rows() -> dict[str, Callable[[], object]]:
    """Every row's call, by name (run them inside :func:`stub_backend`, :func:`fake_triton_driver` and
    :func:`fake_cuda_driver`)."""
    q, k, v, dout = inputs()
    lq, lk, lv = leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    # SDPA gets its own (batch, heads, seqlen, head_dim) layout: views, made once.
    qt, kt, vt, dout_t = (t.transpose(1, 2) for t in (q, k, v, dout))
    tq, tk, tv = leaves_t = [t.transpose(1, 2) for t in leaves]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    k_cache, v_cache = (torch.randn(BATCH, CACHE_KEYS, HEADS, HEAD_DIM).to(DTYPE) for _ in range(2))
    lengths = torch.full((BATCH,), CACHE_KEYS - 1, dtype=torch.int32)
    new_k, new_v = k[:, :1].clone(), v[:, :1].clone()

    def decode_step() -> object:
        with torch.inference_mode():
            # check_values=False: a GPU's default (its values would need a host sync); a CPU's checks them
            step = flash.attention_with_kvcache
            return step(q, k_cache, v_cache, new_k, new_v, cache_seqlens=lengths, check_values=False)

    calls: dict[str, Callable[[], object]] = {
        "core fwd": lambda: flash.attention(q, k, v),
        "core decode step": decode_step,
        "core fwd+bwd": lambda: torch.autograd.grad(flash.attention(lq, lk, lv), leaves, dout),
        "sdpa fwd": lambda: sdpa(qt, kt, vt),
        "sdpa fwd+bwd": lambda: torch.autograd.grad(sdpa(tq, tk, tv), leaves_t, dout_t),
    }
    with contextlib.suppress(ImportError):
        import triton  # noqa: F401

        calls.update(triton_launches(q, k, v, dout))
    with contextlib.suppress(ImportError):
        import flash_cuda  # noqa: F401

        calls.update(cuda_launches(q, k, v, dout))
    return calls


def measure(calls: int, repeats: int, only: str | None = None) -> dict[str, float]:
    """Microseconds per call of every row (or of the rows whose name contains ``only``)."""
    results = {}
    with stub_backend(), fake_triton_driver(), fake_cuda_driver():
        for name, fn in rows().items():
            if only is None or only in name:
                results[name] = per_call_us(fn, calls=calls, repeats=repeats)
    return results


def profile(name: str, calls: int) -> None:
    """cProfile of ``calls`` calls of row ``name``, the 25 most expensive functions by own time."""
    import cProfile
    import pstats

    with stub_backend(), fake_triton_driver(), fake_cuda_driver():
        fn = rows()[name]
        for _ in range(200):
            fn()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            fn()
        profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flash_bench.hostpath", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2_000, help="calls per repeat (default 2000)")
    parser.add_argument("--repeats", type=int, default=10, help="repeats; the least is reported (default 10)")
    parser.add_argument("--only", help="time only the rows whose name contains this")
    parser.add_argument("--profile", metavar="ROW", help="print a cProfile of this row instead of timing")
    options = parser.parse_args(argv)
    if options.profile:
        profile(options.profile, options.calls)
        return
    torch.set_num_threads(1)  # the tiny SDPA rows gain nothing from threads, and threads add noise
    print(f"host us per call, CPU, {BATCH}x{SEQLEN_Q}x{SEQLEN_K}, {HEADS} heads, d{HEAD_DIM}, bf16")
    for name, us in measure(options.calls, options.repeats, options.only).items():
        print(f"{name:<20} {us:8.1f}")


if __name__ == "__main__":
    main()
