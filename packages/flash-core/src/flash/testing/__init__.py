"""Conformance testing for flash backends: cases, random inputs, the float64 oracle and the tolerance rule.

Everything a backend author needs to hold a backend to the same standard as the
built-in ones (see ``tests/test_conformance.py`` for the suite that uses it).
"""

from flash.reference.oracle import dense_attention
from flash.testing.cases import Case, Inputs, cpu_cases, gpu_cases, make_inputs
from flash.testing.conformance import (
    check_backward,
    check_forward,
    declared_reasons,
    naive_dtype,
    poisoned_outputs,
    spec_of,
)
from flash.testing.tolerance import EPSILON, FACTOR, assert_within_rule, bound, max_error

__all__ = [
    "EPSILON",
    "FACTOR",
    "Case",
    "Inputs",
    "assert_within_rule",
    "bound",
    "check_backward",
    "check_forward",
    "cpu_cases",
    "declared_reasons",
    "dense_attention",
    "gpu_cases",
    "make_inputs",
    "max_error",
    "naive_dtype",
    "poisoned_outputs",
    "spec_of",
]
