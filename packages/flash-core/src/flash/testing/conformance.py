"""Conformance checks: run a backend on a case and hold it to the tolerance rule.

These are what ``tests/test_conformance.py`` calls for every registered backend;
a third-party backend can call them from its own tests too::

    from flash.testing import cpu_cases, check_forward, check_backward
    for case in cpu_cases():
        if not declared_reasons("mybackend", case, "cuda", "forward"):
            check_forward("mybackend", case, "cuda", seed=1234)
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator

import torch

import flash
from flash import dispatch, plan
from flash.dispatch import Pass
from flash.plan import CallMasks
from flash.reference.oracle import dense_attention
from flash.spec import FP8_DTYPES, AttentionSpec, build_spec
from flash.testing.cases import Case, Inputs, make_inputs
from flash.testing.tolerance import assert_within_rule

_TENSOR_OPTIONS = ("cu_seqlens_q", "cu_seqlens_k", "q_descale", "k_descale", "v_descale", "sinks")
_MASK_OPTIONS = ("attn_mask", "alibi_slopes", "block_mask", "score_mod", "score_mod_grad", "mask_mod")


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Fill every output with NaN before the backend runs, so an element it never writes fails the check
    (a recycled allocation could otherwise still hold a previous, correct result)."""
    previous, plan.POISON_OUTPUTS = plan.POISON_OUTPUTS, True
    try:
        yield
    finally:
        plan.POISON_OUTPUTS = previous


def spec_of(inputs: Inputs) -> AttentionSpec:
    """The spec of a case's inputs."""
    return build_spec(inputs.q, inputs.k, inputs.v, **inputs.options)


def declared_reasons(backend: str, case: Case, device: torch.device | str, pass_: Pass) -> list[str]:
    """Why ``backend`` declares it cannot run ``pass_`` of ``case`` on ``device`` (empty: it must pass)."""
    spec = spec_of(make_inputs(case, device, seed=0))
    return dispatch.rejection_reasons(backend, spec, pass_)


def naive_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision of the naive computation a kernel is compared with."""
    return torch.bfloat16 if dtype in FP8_DTYPES else dtype


def naive_p_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """What the naive computation rounds P to before P V: e4m3 for fp8 inputs, as an fp8 matrix
    product takes it (FlashAttention-3's FP8 definition; the issue's accuracy test does the same)."""
    return torch.float8_e4m3fn if dtype in FP8_DTYPES else None


def _dense(
    inputs: Inputs,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dtype: torch.dtype,
    sinks: torch.Tensor | None = None,
    p_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = {name: inputs.options[name] for name in _TENSOR_OPTIONS if name in inputs.options}
    if sinks is not None:
        tensors["sinks"] = sinks
    options = inputs.options
    masks = CallMasks(**{f: options.get(f) for f in _MASK_OPTIONS}).tensors()
    return dense_attention(spec_of(inputs), q, k, v, compute_dtype=dtype, masks=masks, p_dtype=p_dtype, **tensors)


#: Oracle and naive results of the last few (case, device, seed, pass): every backend checked on the
#: same inputs shares them (the float64 oracle dominates the GPU tier's time at real sizes).
_references: OrderedDict[tuple, tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] = OrderedDict()
_REFERENCES_KEPT = 4


def _reference(key: tuple, compute: Callable[[], tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]):
    found = _references.get(key)
    if found is None:
        found = _references[key] = compute()
        while len(_references) > _REFERENCES_KEPT:
            _references.popitem(last=False)
    return found


def check_forward(backend: str, case: Case, device: torch.device | str, seed: int) -> None:
    """Output and LSE of ``backend`` against the float64 oracle, within the rule."""
    inputs = make_inputs(case, device, seed)
    with poisoned_outputs():
        out, lse = flash.attention(inputs.q, inputs.k, inputs.v, backend=backend, return_lse=True, **inputs.options)
    spec = spec_of(inputs)
    if out.shape != inputs.q.shape or out.dtype != spec.out_dtype:
        raise AssertionError(
            f"out: shape {tuple(out.shape)} {out.dtype}, expected {tuple(inputs.q.shape)} {spec.out_dtype}"
        )
    if lse.shape != spec.lse_shape() or lse.dtype != spec.lse_dtype:
        raise AssertionError(f"lse: shape {tuple(lse.shape)} {lse.dtype}, expected {spec.lse_shape()} {spec.lse_dtype}")
    (oracle_out, oracle_lse), (naive_out, naive_lse) = _reference(
        (case, str(device), seed, "forward"),
        lambda: (
            _dense(inputs, inputs.q, inputs.k, inputs.v, torch.float64),
            _dense(inputs, inputs.q, inputs.k, inputs.v, naive_dtype(case.dtype), p_dtype=naive_p_dtype(case.dtype)),
        ),
    )
    where = f"{backend}/{case.name} (seed {seed})"
    assert_within_rule(f"{where} out", out, oracle_out, naive_out, case.dtype)
    assert_within_rule(f"{where} lse", lse, oracle_lse, naive_lse, case.dtype)


def _dense_of(inputs: Inputs, tensors: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
    """The dense output of ``(q, k, v)`` or ``(q, k, v, sinks)`` in ``dtype``."""
    q, k, v, *sinks = tensors
    return _dense(inputs, q, k, v, dtype, sinks[0] if sinks else None)[0]


def _grads(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], dout: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(out, inputs, dout)


def check_backward(backend: str, case: Case, device: torch.device | str, seed: int) -> None:
    """dq, dk, dv through ``backend``'s forward (and whichever backward dispatch pairs with it)."""
    inputs = make_inputs(case, device, seed, requires_grad=True)
    sinks = inputs.options.get("sinks")
    wrt = (inputs.q, inputs.k, inputs.v) + ((sinks,) if sinks is not None else ())  # sink logits learn too
    names = ("q", "k", "v", "sinks")[: len(wrt)]
    with poisoned_outputs():
        out = flash.attention(inputs.q, inputs.k, inputs.v, backend=backend, **inputs.options)
        grads = _grads(out, wrt, inputs.dout)
        if case.deterministic:
            again = flash.attention(inputs.q, inputs.k, inputs.v, backend=backend, **inputs.options)
            for name, first, second in zip(names, grads, _grads(again, wrt, inputs.dout)):
                if not torch.equal(first, second):
                    raise AssertionError(f"{backend}/{case.name}: d{name} differs between two deterministic runs")

    def references() -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        exact = tuple(t.detach().to(torch.float64).requires_grad_() for t in wrt)
        rough = tuple(t.detach().clone().requires_grad_() for t in wrt)
        naive_dt = naive_dtype(case.dtype)
        return (
            _grads(_dense_of(inputs, exact, torch.float64), exact, inputs.dout.to(torch.float64)),
            _grads(_dense_of(inputs, rough, naive_dt), rough, inputs.dout.to(naive_dt)),
        )

    oracle, naive = _reference((case, str(device), seed, "backward"), references)
    where = f"{backend}/{case.name} (seed {seed})"
    for name, got, exact, rough, given in zip(names, grads, oracle, naive, wrt):
        if got.shape != exact.shape or got.dtype != given.dtype:
            raise AssertionError(f"{where} d{name}: shape {tuple(got.shape)} {got.dtype}")
        assert_within_rule(f"{where} d{name}", got, exact, rough, case.dtype)
