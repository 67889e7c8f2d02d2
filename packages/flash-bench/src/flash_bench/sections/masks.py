"""``masks``: masks on the kernels against FlexAttention and PyTorch SDPA, measured in one process.

Three sections, each checked against the issue's targets (printed, never asserted):

* **examples**: FlexAttention's example set, bf16, head_dim 128, seqlen 8192, batch 2 x 16 heads:
  causal, causal sliding window 1024, causal document mask (12 documents), prefix-LM (2048-token
  prefix), causal ALiBi, causal tanh softcap 30. flash runs each the fastest way it offers (native
  causal/window/ALiBi/softcap; a :class:`flash.BlockMask` built once for the document and prefix-LM
  masks, the document one from the document ids, as Flex's mask function reads them); FlexAttention
  is ``torch.compile(flex_attention)`` with ``create_block_mask`` built once.
  Target: flash >= 1.1x FlexAttention, forward and forward+backward. The document mask also runs as
  ``flash_from_dense`` (a BlockMask from the dense (S, S) mask, whose partial blocks read it).
* **padding**: a key-padding mask (batch 8, seqlen 2048, random lengths) through
  :func:`flash.scaled_dot_product_attention` against PyTorch's SDPA with the same mask, and against
  flash's variable-length path on the same problem (K/V packed beforehand, not timed).
  Targets: >= 2x SDPA, within 10% of varlen.
* **sparse**: a block mask of 10% density (random 128 x 128 blocks) against the dense problem.
  Target: <= 15% of the dense time.

FLOPs count only visible work: ``4 * batch * heads * head_dim * visible (query, key) pairs`` for the
forward (the FlashAttention convention, which halves causal work, generalised to any mask),
3.5x that for forward+backward. Times are medians of CUDA-event timings after warm-up.

    python -m flash bench --sections masks --out masks.json
    TRITON_INTERPRET=1 python -m flash bench --sections masks --device cpu --masks-smoke  # code paths only

Results JSON: ``masks`` with ``rows`` (section, case, provider, mode, ms, TFLOP/s or a note) and
``targets`` (one line per target, met or not).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

import flash
from flash import timing
from flash_bench.base import Report, failure
from flash_bench.providers import compiled_flex_attention

HEAD_DIM = 128
WINDOW = 1024
DOCUMENTS = 12
PREFIX = 2048
SOFTCAP = 30.0


@dataclass
class Result:
    section: str
    case: str
    provider: str
    mode: str  # "fwd" or "fwd_bwd"
    ms: float | None
    tflops: float | None
    note: str = ""


def _visible_flops(pairs: float, batch: int, heads: int, mode: str) -> float:
    forward = 4.0 * batch * heads * HEAD_DIM * pairs
    return forward * (3.5 if mode == "fwd_bwd" else 1.0)


def _timed(fn: Callable[[], torch.Tensor], mode: str, inputs: tuple[torch.Tensor, ...], device: str) -> float:
    if mode == "fwd":

        def run() -> object:
            with torch.no_grad():
                return fn()
    else:
        dout = torch.randn_like(inputs[0])

        def run() -> object:
            return torch.autograd.grad(fn(), inputs, dout)

    if device == "cuda":
        return timing.measure(run, device=device)
    return timing.measure(run, device=device, warmup_ms=0.0, budget_ms=0.0, min_repeats=1, max_repeats=1)


# ----------------------------------------------------------------------------- the example set


def _doc_ids(seqlen: int, device: str, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(seqlen - 1, generator=gen)[: DOCUMENTS - 1] + 1
    ids = torch.zeros(seqlen, dtype=torch.int64)
    ids[cuts] = 1
    return ids.cumsum(0).to(device)


def examples(
    seqlen: int, heads: int, device: str
) -> dict[str, tuple[dict[str, Any], tuple[Any, Any], float, dict[str, dict[str, Any]]]]:
    """name: (flash options, FlexAttention's (score_mod, mask_mod), visible pairs, other flash variants
    by provider name) of each example."""
    docs = _doc_ids(seqlen, device)
    slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)], device=device)
    rows = torch.arange(seqlen, device=device)[:, None]
    cols = torch.arange(seqlen, device=device)[None, :]

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    def sliding(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx <= WINDOW)

    def document(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (docs[q_idx] == docs[kv_idx])

    def prefix_lm(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (kv_idx < PREFIX)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx)

    def softcap(score, b, h, q_idx, kv_idx):
        return SOFTCAP * torch.tanh(score / SOFTCAP)

    doc_dense = (cols <= rows) & (docs[:, None] == docs[None, :])
    prefix_blocks = flash.BlockMask.from_mask_mod(
        _prefix_lm_mod, batch=None, heads=None, seqlen_q=seqlen, seqlen_k=seqlen, device=device
    )
    ours: dict[str, dict[str, Any]] = {
        "causal": {"causal": True},
        "sliding_window": {"window": (WINDOW, 0)},
        "document": {"block_mask": flash.BlockMask.from_document_ids(docs, causal=True)},
        "prefix_lm": {"block_mask": prefix_blocks},
        "alibi": {"causal": True, "alibi_slopes": slopes},
        "softcap": {"causal": True, "softcap": SOFTCAP},
    }
    theirs: dict[str, tuple[Any, Any]] = {
        "causal": (None, causal),
        "sliding_window": (None, sliding),
        "document": (None, document),
        "prefix_lm": (None, prefix_lm),
        "alibi": (alibi, causal),
        "softcap": (softcap, causal),
    }
    pairs = {
        "causal": float(seqlen * (seqlen + 1) // 2),
        "sliding_window": float(((cols <= rows) & (rows - cols <= WINDOW)).sum()),
        "document": float(doc_dense.sum()),
        "prefix_lm": float(((cols <= rows) | (cols < PREFIX)).sum()),
        "alibi": float(seqlen * (seqlen + 1) // 2),
        "softcap": float(seqlen * (seqlen + 1) // 2),
    }
    variants = {"document": {"flash_from_dense": {"block_mask": flash.BlockMask.from_dense(doc_dense)}}}
    return {name: (ours[name], theirs[name], pairs[name], variants.get(name, {})) for name in ours}


def _prefix_lm_mod(b, h, q_idx, kv_idx):
    return (kv_idx <= q_idx) | (kv_idx < PREFIX)


def _flex_runner(score_mod, mask_mod, seqlen: int, device: str) -> Callable:
    from torch.nn.attention.flex_attention import create_block_mask

    compiled = compiled_flex_attention()
    block_mask = create_block_mask(mask_mod, None, None, seqlen, seqlen, device=device) if mask_mod else None
    return lambda q, k, v: compiled(q, k, v, score_mod=score_mod, block_mask=block_mask)


def bench_examples(seqlen: int, batch: int, heads: int, device: str, flex: bool, only: set[str]) -> list[Result]:
    """The example set, or its cases named in ``only`` (all when empty)."""
    cases = {name: case for name, case in examples(seqlen, heads, device).items() if not only or name in only}
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (batch, heads, seqlen, HEAD_DIM)
    q, k, v = (
        torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_() for _ in range(3)
    )
    out = []
    for name, (ours, (score_mod, mask_mod), pairs, variants) in cases.items():
        providers: dict[str, Callable] = {
            provider: lambda q, k, v, o=options: flash.attention(q, k, v, layout="bhsd", **o)
            for provider, options in {"flash": ours, **variants}.items()
        }
        if flex:
            providers["flex"] = _flex_runner(score_mod, mask_mod, seqlen, device)
        for provider, fn in providers.items():
            for mode in ("fwd", "fwd_bwd"):
                out.append(_result("examples", name, provider, mode, lambda f=fn: f(q, k, v), (q, k, v), pairs,
                                   batch, heads, device))  # fmt: skip
    return out


def _result(section, case, provider, mode, fn, inputs, pairs, batch, heads, device) -> Result:
    try:
        ms = _timed(fn, mode, inputs, device)
    except Exception as error:  # one failing provider must not hide the others' numbers
        return Result(section, case, provider, mode, None, None, failure(error))
    return Result(section, case, provider, mode, ms, _visible_flops(pairs, batch, heads, mode) / ms / 1e9)


# ----------------------------------------------------------------------------- padding and sparsity


def bench_padding(seqlen: int, batch: int, heads: int, device: str) -> list[Result]:
    gen = torch.Generator(device=device).manual_seed(1)
    lengths = torch.randint(seqlen // 4, seqlen + 1, (batch,), generator=gen, device=device)
    mask = (torch.arange(seqlen, device=device) < lengths[:, None])[:, None, None, :]  # (batch, 1, 1, seqlen)
    shape = (batch, heads, seqlen, HEAD_DIM)
    q, k, v = (
        torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_() for _ in range(3)
    )
    pairs = float(seqlen * lengths.sum()) / batch
    # The variable-length problem: every query, only the valid keys, K/V packed once (not timed).
    keep = mask[:, 0, 0, :].reshape(-1)
    qp = q.detach().transpose(1, 2).reshape(batch * seqlen, heads, HEAD_DIM).requires_grad_()
    kp, vp = (
        t.detach().transpose(1, 2).reshape(batch * seqlen, heads, HEAD_DIM)[keep].requires_grad_() for t in (k, v)
    )
    cu_q = torch.arange(0, batch * seqlen + 1, seqlen, device=device, dtype=torch.int32)
    cu_k = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    varlen: dict[str, Any] = {
        "cu_seqlens_q": cu_q,
        "cu_seqlens_k": cu_k,
        "max_seqlen_q": seqlen,
        "max_seqlen_k": int(lengths.max()),
    }
    runs = {
        "flash_sdpa": (lambda: flash.scaled_dot_product_attention(q, k, v, attn_mask=mask), (q, k, v)),
        "torch_sdpa": (lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask), (q, k, v)),
        "flash_varlen": (lambda: flash.attention(qp, kp, vp, **varlen), (qp, kp, vp)),
    }
    return [
        _result("padding", "key_padding", name, mode, fn, inputs, pairs, batch, heads, device)
        for name, (fn, inputs) in runs.items()
        for mode in ("fwd", "fwd_bwd")
    ]


def bench_sparse(seqlen: int, batch: int, heads: int, device: str, density: float = 0.1) -> list[Result]:
    gen = torch.Generator(device=device).manual_seed(2)
    n = seqlen // 128
    blocks = torch.rand(n, n, generator=gen, device=device) < density
    blocks[torch.arange(n), torch.arange(n)] = True  # every query block sees some key
    dense = blocks.repeat_interleave(128, 0).repeat_interleave(128, 1)
    block_mask = flash.BlockMask.from_dense(dense, block_size=(128, 128))
    shape = (batch, heads, seqlen, HEAD_DIM)
    q, k, v = (
        torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_() for _ in range(3)
    )
    runs = {
        "dense": (lambda: flash.attention(q, k, v, layout="bhsd"), float(seqlen * seqlen)),
        f"block_mask_{block_mask.density:.0%}": (
            lambda: flash.attention(q, k, v, layout="bhsd", block_mask=block_mask),
            float(dense.sum()),
        ),
    }
    return [
        _result("sparse", "block_sparse", name, mode, fn, (q, k, v), pairs, batch, heads, device)
        for name, (fn, pairs) in runs.items()
        for mode in ("fwd", "fwd_bwd")
    ]


# ----------------------------------------------------------------------------- targets


def _ms(results: list[Result], section: str, case: str, provider: str, mode: str) -> float | None:
    for r in results:
        if (r.section, r.case, r.provider, r.mode) == (section, case, provider, mode) and r.ms:
            return r.ms
    return None


def targets(results: list[Result]) -> list[str]:
    """The issue's targets against these numbers, one line each."""
    lines = []
    for case in sorted({r.case for r in results if r.section == "examples"}):
        for mode in ("fwd", "fwd_bwd"):
            ours, flex = (_ms(results, "examples", case, p, mode) for p in ("flash", "flex"))
            if ours and flex:
                verdict = "met" if flex / ours >= 1.1 else "NOT met"
                lines.append(
                    f"examples {case:<15} {mode:<8} flash {flex / ours:5.2f}x FlexAttention (>= 1.1x: {verdict})"
                )
    for mode in ("fwd", "fwd_bwd"):
        ours, theirs, varlen = (_ms(results, "padding", "key_padding", p, mode)
                                for p in ("flash_sdpa", "torch_sdpa", "flash_varlen"))  # fmt: skip
        if ours and theirs and varlen:
            ok = theirs / ours >= 2.0 and ours <= 1.1 * varlen
            lines.append(f"padding {mode:<8} {theirs / ours:5.2f}x torch SDPA (>= 2x), {ours / varlen:5.2f}x the "
                         f"varlen time (<= 1.1x): {'met' if ok else 'NOT met'}")  # fmt: skip
    for mode in ("fwd", "fwd_bwd"):
        dense = _ms(results, "sparse", "block_sparse", "dense", mode)
        sparse = next(
            (r.ms for r in results if r.section == "sparse" and r.provider != "dense" and r.mode == mode), None
        )
        if dense and sparse:
            lines.append(f"sparse {mode:<8} block mask {sparse / dense:5.1%} of dense (<= 15%: "
                         f"{'met' if sparse <= 0.15 * dense else 'NOT met'})")  # fmt: skip
    return lines


SIZES = {"examples": (8192, 2, 16), "padding": (2048, 8, 16), "sparse": (8192, 2, 16)}
SMOKE_SIZES = {"examples": (128, 1, 1), "padding": (64, 2, 1), "sparse": (256, 1, 1)}


def measure(
    parts: list[str], device: str, flex: bool, smoke: bool, cases: frozenset[str] = frozenset()
) -> list[Result]:
    """The named parts (examples, padding, sparse) at full size, or tiny with ``smoke``; ``cases`` picks
    examples by name (all when empty)."""
    global PREFIX, WINDOW
    if smoke:  # the examples' constants scaled to the tiny sequences
        PREFIX, WINDOW = 32, 48
    results: list[Result] = []
    for part in parts:
        seqlen, batch, heads = (SMOKE_SIZES if smoke else SIZES)[part]
        if part == "examples":
            results += bench_examples(seqlen, batch, heads, device, flex, set(cases))
        elif part == "padding":
            results += bench_padding(seqlen, batch, heads, device)
        else:
            results += bench_sparse(seqlen, batch, heads, device)
    return results


def summary(results: list[Result]) -> str:
    lines = ["masks:"]
    for r in results:
        timing_text = f"{r.ms:9.3f} ms {r.tflops:7.1f} TFLOP/s" if r.ms and r.tflops else f"failed: {r.note}"
        lines.append(f"  {r.section:<9} {r.case:<15} {r.provider:<20} {r.mode:<8} {timing_text}")
    lines.append("masks targets:")
    lines += [f"  {line}" for line in targets(results) or ["(none measurable here)"]]
    return "\n".join(lines)


class Masks:
    name = "masks"
    help = "masks on the kernels: FlexAttention's examples, a padding mask via SDPA, 10% block sparsity"
    devices: tuple[str, ...] = ("cuda", "cpu")
    default = False  # FlexAttention compiles once per mask: minutes

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--masks-parts", default="examples,padding,sparse", help="which parts (default all three)")
        group.add_argument("--masks-no-flex", action="store_true", help="skip FlexAttention")
        group.add_argument(
            "--masks-cases", default="", help="examples to run, comma-separated (e.g. document,prefix_lm; default all)"
        )
        group.add_argument("--masks-smoke", action="store_true", help="tiny sizes: checks the code paths only")

    def run(self, options: argparse.Namespace, device: torch.device) -> Report:
        flex = not options.masks_no_flex and device.type == "cuda"
        cases = frozenset(c for c in options.masks_cases.split(",") if c)
        results = measure(options.masks_parts.split(","), device.type, flex, options.masks_smoke, cases)
        rows = [asdict(r) for r in results]
        return Report({"masks": {"rows": rows, "targets": targets(results)}}, summary(results))


SECTION = Masks()
