"""The seeds' worked example (n = 4, d = 2, B_r = B_c = 2, no 1/sqrt(d) scaling), computed at build time.

Nothing here is typed by hand but the three input matrices: the scores, running maxima,
normalisers and outputs are what :func:`flash.reference.tiled.forward` reports to its observer,
and the final result is checked against the dense oracle.
"""

from __future__ import annotations

import math

import torch
from docutils import nodes
from sphinx.util.docutils import SphinxDirective

from flash_docs.rst import list_table

# The seeds' section 4.3 inputs.
Q = [[1, 0], [0, 1], [2, 1], [1, 2]]
K = [[1, 1], [0, 2], [1, 0], [2, 1]]
V = [[1, 0], [0, 1], [2, 1], [1, 2]]
BLOCK = 2


def num(x: float) -> str:
    """An integer as an integer, anything else with 4 decimals; -inf as a minus-infinity sign."""
    if x == float("-inf"):
        return "−∞"
    if abs(x - round(x)) < 1e-12:
        return str(round(x)).replace("-", "−")
    return f"{x:.4f}".replace("-", "−")


def tex_num(x: float) -> str:
    if x == float("-inf"):
        return r"-\infty"
    if abs(x - round(x)) < 1e-12:
        return str(round(x))
    return f"{x:.4f}"


def bmatrix(rows: list[list[float]]) -> str:
    body = r" \\ ".join(" & ".join(tex_num(x) for x in row) for row in rows)
    return r"\begin{bmatrix} " + body + r" \end{bmatrix}"


def run_example() -> dict:
    """Run the tiled forward with an observer; return inputs, steps, outputs and the oracle's."""
    from flash.backend import ForwardArgs
    from flash.reference import tiled
    from flash.reference.oracle import dense_attention
    from flash.spec import build_spec, canonical, canonical_lse

    q, k, v = (torch.tensor(m, dtype=torch.float64)[None, :, None, :] for m in (Q, K, V))  # (1, 4, 1, 2)
    spec = build_spec(q, k, v, scale=1.0)  # the seeds' example has no 1/sqrt(d)
    out = torch.empty_like(q)
    lse = torch.empty(spec.lse_shape(), dtype=spec.lse_dtype)
    steps: list = []
    args = ForwardArgs(
        canonical(q, spec), canonical(k, spec), canonical(v, spec), canonical(out, spec), canonical_lse(lse, spec)
    )
    tiled.forward(spec, args, BLOCK, BLOCK, observer=steps.append)
    dense_out, dense_lse = dense_attention(spec, q, k, v)
    return {
        "spec": spec,
        "steps": steps,
        "out": out[0, :, 0].tolist(),
        "lse": lse[0, 0].tolist(),
        "dense_out": dense_out[0, :, 0].tolist(),
        "dense_lse": dense_lse[0, 0].tolist(),
        "error": max((out - dense_out).abs().max().item(), (lse - dense_lse).abs().max().item()),
    }


def _step_rst(step, previous_max: list[float] | None) -> str:
    i, j = step.query_block, step.key_block
    scores = step.scores[0, 0].tolist()
    new_max = step.row_max[0, 0].tolist()
    row_sum = step.row_sum[0, 0].tolist()
    output = step.output[0, 0].tolist()
    bi, bj = i + 1, j + 1  # the seeds number blocks from 1
    out = [
        f"**Query block** :math:`Q_{bi}` **with key block** :math:`K_{bj}, V_{bj}`",
        "",
        ".. math::",
        "",
        f"   S_{{{bi}{bj}}} = Q_{bi} K_{bj}^T = {bmatrix(scores)}",
        "",
    ]
    rows = []
    for r in range(len(scores)):
        tile_max = max(scores[r])
        old = previous_max[r] if previous_max is not None else float("-inf")
        if old == float("-inf"):
            alpha = "— (first tile)"
        else:
            diff = old - new_max[r]
            alpha = f"e^{num(diff)} = {num(math.exp(diff))}" if diff else "1"
        rows.append(
            [
                str(i * BLOCK + r + 1),
                num(tile_max),
                f"max({num(old)}, {num(tile_max)}) = {num(new_max[r])}",
                alpha,
                num(row_sum[r]),
                "(" + ", ".join(num(x) for x in output[r]) + ")",
            ]
        )
    out.append(
        list_table(
            ["row", "tile max", "running max m", "rescale α = e^(m_old − m)", "normaliser ℓ", "output acc / ℓ"],
            rows,
            widths=[6, 10, 24, 24, 14, 22],
            classes="flash-numbers",
        )
    )
    return "\n".join(out)


class WorkedExample(SphinxDirective):
    """Render the seeds' worked example as computed by the reference tiled forward."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        self.env.note_reread()  # depends on flash's code, not on this page's text
        result = run_example()
        text = [
            "Inputs (the seeds' section 4.3), split into blocks of two rows:",
            "",
            ".. math::",
            "",
            f"   Q = {bmatrix(Q)}, \\quad K = {bmatrix(K)}, \\quad V = {bmatrix(V)}",
            "",
            "The full score matrix, for reference (the tiled algorithm never forms it):",
            "",
            ".. math::",
            "",
            f"   S = Q K^T = {bmatrix([[sum(a * b for a, b in zip(qr, kr)) for kr in K] for qr in Q])}",
            "",
        ]
        previous: dict[int, list[float]] = {}
        for step in result["steps"]:
            text.append(_step_rst(step, previous.get(step.query_block)))
            previous[step.query_block] = step.row_max[0, 0].tolist()
        rows = [
            [
                str(r + 1),
                "(" + ", ".join(num(x) for x in result["out"][r]) + ")",
                num(result["lse"][r]),
                "(" + ", ".join(num(x) for x in result["dense_out"][r]) + ")",
                num(result["dense_lse"][r]),
            ]
            for r in range(len(Q))
        ]
        text += [
            "**Result.** After the last key block the output of each row is final. The tiled result "
            "next to the dense oracle (:func:`flash.reference.oracle.dense_attention`, which forms "
            "the full :math:`S` and takes its softmax):",
            "",
            list_table(
                ["row", "tiled output", "tiled LSE = m + log ℓ", "dense output", "dense LSE"],
                rows,
                classes="flash-numbers",
            ),
            f"Largest difference between the two, over outputs and LSEs, in float64: ``{result['error']:.1e}``.",
            "",
        ]
        return self.parse_text_to_nodes("\n".join(text))
