"""The tolerance rule: a kernel is as exact as the naive computation in the same precision.

A result's max error against the float64 oracle must stay within ``factor``
(2) times the max error of the naive dense computation done in the inputs' own
precision, plus a tiny epsilon for the cases where the naive error is ~0.
Rows the oracle says are -inf (LSE of rows that see no key) must be -inf
exactly; NaN must appear exactly where the oracle has NaN.
"""

from __future__ import annotations

import math

import torch

#: Absolute slack added to the bound, per dtype of the inputs.
EPSILON = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 1e-5,
    torch.bfloat16: 1e-4,
    torch.float8_e4m3fn: 1e-4,
    torch.float8_e5m2: 1e-4,
}
FACTOR = 2.0


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max ``|actual - expected|`` over finite entries; inf if the pattern of -inf/+inf/NaN differs."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if not torch.equal(torch.isnan(actual), torch.isnan(expected)):
        return math.inf
    special = torch.isinf(expected)
    if not torch.equal(actual[special], expected[special]) or torch.isinf(actual[~special]).any():
        return math.inf
    finite = ~special & ~torch.isnan(expected)
    if not finite.any():
        return 0.0
    return (actual[finite] - expected[finite]).abs().max().item()


def bound(naive_error: float, dtype: torch.dtype, factor: float = FACTOR) -> float:
    """The largest error the rule allows, given the naive computation's error."""
    return factor * naive_error + EPSILON[dtype]


def assert_within_rule(
    what: str,
    actual: torch.Tensor,
    oracle: torch.Tensor,
    naive: torch.Tensor,
    dtype: torch.dtype,
    factor: float = FACTOR,
) -> None:
    """Fail unless ``actual`` is within ``factor`` x the naive error (+ epsilon) of the oracle."""
    err = max_error(actual, oracle)
    naive_err = max_error(naive, oracle)
    if math.isinf(naive_err):
        raise AssertionError(f"{what}: the naive computation itself disagrees with the oracle's inf/NaN pattern")
    limit = bound(naive_err, dtype, factor)
    if not err <= limit:
        raise AssertionError(
            f"{what}: max error {err:.3e} vs float64 oracle exceeds {factor}x naive error {naive_err:.3e} "
            f"+ {EPSILON[dtype]:.0e} = {limit:.3e}"
        )
