"""The seeds' worked example (n=4, d=2, B_r=B_c=2, scores Q K^T without 1/sqrt(d)), step by step.

The running max m, the normaliser l and the output after every key block come
from the reference implementation's tiled forward (the same code the
``reference`` backend runs), observed tile by tile.
"""

from __future__ import annotations

import math

import pytest
import torch

import flash
from flash.backend import ForwardArgs
from flash.reference import dense_attention
from flash.reference.tiled import TileStep, forward

E = math.e
Q = [[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [1.0, 2.0]]
K = [[1.0, 1.0], [0.0, 2.0], [1.0, 0.0], [2.0, 1.0]]
V = [[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [1.0, 2.0]]


@pytest.fixture(scope="module")
def example() -> tuple[list[TileStep], torch.Tensor, torch.Tensor]:
    q, k, v = (torch.tensor(m, dtype=torch.float64).reshape(1, 4, 1, 2) for m in (Q, K, V))
    spec = flash.build_spec(q, k, v, scale=1.0)
    out, lse = torch.empty_like(q), torch.empty(1, 1, 4, dtype=torch.float64)
    steps: list[TileStep] = []
    forward(spec, ForwardArgs(q, k, v, out, lse), block_q=2, block_k=2, observer=steps.append)
    return steps, out, lse


def test_block_order(example) -> None:
    steps, _, _ = example
    assert [(s.query_block, s.key_block) for s in steps] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_q1_first_key_block(example) -> None:
    step = example[0][0]
    # S11 = Q1 K1^T = [[1, 0], [1, 2]]
    assert step.scores.reshape(2, 2).tolist() == [[1.0, 0.0], [1.0, 2.0]]
    # m = rowmax(S11) = [1, 2]; l = [1 + e^-1, e^-1 + 1] ~ 1.368
    assert step.row_max.flatten().tolist() == [1.0, 2.0]
    assert step.row_sum.flatten().tolist() == pytest.approx([1 + 1 / E, 1 + 1 / E])
    assert step.row_sum.flatten().tolist() == pytest.approx([1.368, 1.368], abs=5e-4)
    # O = P~ V1 / l = [[0.731, 0.269], [0.269, 0.731]]
    a = E / (E + 1)
    assert step.output.flatten().tolist() == pytest.approx([a, 1 - a, 1 - a, a])
    assert step.output.flatten().tolist() == pytest.approx([0.731, 0.269, 0.269, 0.731], abs=5e-4)


def test_q1_second_key_block(example) -> None:
    step = example[0][1]
    # S12 = Q1 K2^T = [[1, 2], [0, 1]]; m = max([1, 2], [2, 1]) = [2, 2]
    assert step.scores.reshape(2, 2).tolist() == [[1.0, 2.0], [0.0, 1.0]]
    assert step.row_max.flatten().tolist() == [2.0, 2.0]
    # alpha = exp(m_old - m_new) = [e^-1, 1] rescales the old sum: l = l_old * alpha + rowsum(exp(S12 - m))
    l_old = 1 + 1 / E
    expected_l = [l_old / E + (1 / E + 1), l_old * 1 + (1 / E**2 + 1 / E)]
    assert step.row_sum.flatten().tolist() == pytest.approx(expected_l)
    assert expected_l == pytest.approx([(1 + 1 / E) ** 2] * 2)  # both rows: (1 + e^-1)^2
    # After both blocks the rows of Q1 are exact: softmax over all four keys.
    scores = torch.tensor([[1.0, 0.0, 1.0, 2.0], [1.0, 2.0, 0.0, 1.0]], dtype=torch.float64)
    expected = scores.softmax(-1) @ torch.tensor(V, dtype=torch.float64)
    assert step.output.flatten().tolist() == pytest.approx(expected.flatten().tolist())


def test_q2_blocks_and_final_output(example) -> None:
    steps, out, lse = example
    s21, s22 = steps[2], steps[3]
    # Q2 = [[2, 1], [1, 2]]: S21 = Q2 K1^T = [[3, 2], [3, 4]], S22 = Q2 K2^T = [[2, 5], [1, 4]]
    assert s21.scores.reshape(2, 2).tolist() == [[3.0, 2.0], [3.0, 4.0]]
    assert s21.row_max.flatten().tolist() == [3.0, 4.0]
    assert s22.scores.reshape(2, 2).tolist() == [[2.0, 5.0], [1.0, 4.0]]
    assert s22.row_max.flatten().tolist() == [5.0, 4.0]
    q, k, v = (torch.tensor(m, dtype=torch.float64).reshape(1, 4, 1, 2) for m in (Q, K, V))
    exact_out, exact_lse = dense_attention(flash.build_spec(q, k, v, scale=1.0), q, k, v)
    assert out.flatten().tolist() == pytest.approx(exact_out.flatten().tolist(), abs=1e-15)
    assert lse.flatten().tolist() == pytest.approx(exact_lse.flatten().tolist(), abs=1e-15)
    # and the public API gives the same numbers
    assert flash.attention(q, k, v, scale=1.0).flatten().tolist() == pytest.approx(
        exact_out.flatten().tolist(), abs=1e-15
    )
