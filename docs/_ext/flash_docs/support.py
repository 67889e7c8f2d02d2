"""What each installed backend supports, in the backend's own words, asked at build time.

The problems are :class:`flash.spec.AttentionSpec` objects built directly (no tensors, no GPU
needed) for device ``cuda``; every backend's declarations are read by :func:`flash.support.reasons`
(what dispatch uses) on each. A ✓ means no reason; otherwise
the reasons are shown verbatim. The declarations depend on the problem only, so no GPU is needed to ask.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from docutils import nodes
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

from flash_docs.rst import code, esc, list_table

logger = logging.getLogger(__name__)

OK = "✓"


def base_spec():
    """A bf16 problem on ``cuda``: batch 2, seqlen 1024, 16 heads of 128, contiguous bshd."""
    from flash.spec import AttentionSpec

    b, s, h, d = 2, 1024, 16, 128
    strides = (s * h * d, h * d, d, 1)
    return AttentionSpec(
        batch=b,
        seqlen_q=s,
        seqlen_k=s,
        heads_q=h,
        heads_kv=h,
        head_dim=d,
        dtype=torch.bfloat16,
        device=torch.device("cuda"),
        layout="bshd",
        varlen=False,
        total_q=b * s,
        total_k=b * s,
        causal=False,
        window=(-1, -1),
        softcap=0.0,
        scale=d**-0.5,
        dropout_p=0.0,
        dropout_seed=0,
        deterministic=False,
        descale="none",
        q_strides=strides,
        k_strides=strides,
        v_strides=strides,
        aligned16=True,
    )


def _heads(spec, heads_q: int, heads_kv: int):
    s, d = spec.seqlen_q, spec.head_dim
    q = (s * heads_q * d, heads_q * d, d, 1)
    kv = (spec.seqlen_k * heads_kv * d, heads_kv * d, d, 1)
    return dataclasses.replace(spec, heads_q=heads_q, heads_kv=heads_kv, q_strides=q, k_strides=kv, v_strides=kv)


def _head_dim(spec, d: int):
    h, s = spec.heads_q, spec.seqlen_q
    strides = (s * h * d, h * d, d, 1)
    return dataclasses.replace(spec, head_dim=d, scale=d**-0.5, q_strides=strides, k_strides=strides, v_strides=strides)


def _lengths(spec, seqlen_q: int, seqlen_k: int):
    h, d, b = spec.heads_q, spec.head_dim, spec.batch
    q = (seqlen_q * h * d, h * d, d, 1)
    kv = (seqlen_k * spec.heads_kv * d, spec.heads_kv * d, d, 1)
    return dataclasses.replace(
        spec,
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
        total_q=b * seqlen_q,
        total_k=b * seqlen_k,
        q_strides=q,
        k_strides=kv,
        v_strides=kv,
    )


def _varlen(spec):
    h, d = spec.heads_q, spec.head_dim
    strides = (0, h * d, d, 1)
    return dataclasses.replace(
        spec, varlen=True, batch=4, total_q=2500, total_k=2500, q_strides=strides, k_strides=strides, v_strides=strides
    )


def _bhsd(spec):
    s, h, d = spec.seqlen_q, spec.heads_q, spec.head_dim
    strides = (h * s * d, d, s * d, 1)  # (b, h, s, d) memory, seen in canonical (b, s, h, d) order
    return dataclasses.replace(spec, layout="bhsd", q_strides=strides, k_strides=strides, v_strides=strides)


r = dataclasses.replace
#: (label, how the problem differs from the baseline)
CASES: list[tuple[str, Callable]] = [
    ("bf16, head_dim 128, seqlen 1024 (baseline)", lambda s: s),
    ("fp16", lambda s: r(s, dtype=torch.float16)),
    ("fp32", lambda s: r(s, dtype=torch.float32)),
    ("fp64", lambda s: r(s, dtype=torch.float64)),
    ("fp8 e4m3, per-tensor descale", lambda s: r(s, dtype=torch.float8_e4m3fn, descale="tensor")),
    ("fp8 e4m3, per-head descale", lambda s: r(s, dtype=torch.float8_e4m3fn, descale="head")),
    (
        "fp8 e4m3, out_dtype=torch.float16",
        lambda s: r(s, dtype=torch.float8_e4m3fn, descale="head", chosen_out_dtype=torch.float16),
    ),
    ("head_dim 32", lambda s: _head_dim(s, 32)),
    ("head_dim 64", lambda s: _head_dim(s, 64)),
    ("head_dim 96", lambda s: _head_dim(s, 96)),
    ("head_dim 256", lambda s: _head_dim(s, 256)),
    ("causal", lambda s: r(s, causal=True)),
    ("causal, 256 queries, 1024 keys", lambda s: r(_lengths(s, 256, 1024), causal=True)),
    ("sliding window (256, 0)", lambda s: r(s, window=(256, 0))),
    ("window (128, 128)", lambda s: r(s, window=(128, 128))),
    ("softcap 30", lambda s: r(s, softcap=30.0)),
    ("GQA: 32 query heads, 8 KV heads", lambda s: _heads(s, 32, 8)),
    ("MQA: 32 query heads, 1 KV head", lambda s: _heads(s, 32, 1)),
    ("variable-length batch (cu_seqlens)", _varlen),
    ("decoding: 1 query, 32768 keys, GQA 32/8", lambda s: _heads(_lengths(s, 1, 32768), 32, 8)),
    ("dropout p = 0.1", lambda s: r(s, dropout_p=0.1, dropout_seed=1234)),
    ("deterministic=True", lambda s: r(s, deterministic=True)),
    ("layout bhsd", _bhsd),
    ("tensors not 16-byte aligned", lambda s: r(s, aligned16=False)),
]


def base_kv_spec():
    """A bf16 KV-cache call on ``cuda``: 16 sequences of up to 32768 keys, GQA 32/8, head_dim 128, one new token."""
    from flash.kvspec import KVCacheSpec

    return KVCacheSpec(
        batch=16,
        seqlen_q=1,
        seqlen_new=1,
        heads_q=32,
        heads_kv=8,
        head_dim=128,
        dtype=torch.bfloat16,
        cache_dtype=torch.bfloat16,
        device=torch.device("cuda"),
        paged=False,
        page_size=32768,
        pages=16,
        capacity=32768,
        batch_idx=False,
        causal=True,
        window=(-1, -1),
        softcap=0.0,
        scale=128**-0.5,
        sinks=False,
        sink_tokens=0,
        rotary="none",
        rotary_dim=0,
        rotary_positions=0,
        descale=False,
        num_splits=4,
        aligned16=True,
        token_stride=8 * 128,
    )


#: KV-cache calls: (label, how the call differs from the baseline)
KV_CASES: list[tuple[str, Callable]] = [
    ("bf16, GQA 32/8, head_dim 128, 32k keys, append 1 (baseline)", lambda s: s),
    ("fp16", lambda s: r(s, dtype=torch.float16, cache_dtype=torch.float16)),
    ("fp32", lambda s: r(s, dtype=torch.float32, cache_dtype=torch.float32)),
    ("paged, 16 keys per page", lambda s: r(s, paged=True, page_size=16, pages=32768, capacity=32768)),
    ("paged, 7 keys per page", lambda s: r(s, paged=True, page_size=7, pages=80000, capacity=32767)),
    ("fp8 e4m3 cache, per-head descale", lambda s: r(s, cache_dtype=torch.float8_e4m3fn, descale=True)),
    ("rotary (GPT-NeoX pairs)", lambda s: r(s, rotary="half", rotary_dim=128, rotary_positions=32768)),
    ("sink logits", lambda s: r(s, sinks=True)),
    ("window (4096, 0) + 4 sink tokens", lambda s: r(s, window=(4096, 0), sink_tokens=4)),
    ("8 new tokens, causal, softcap 30", lambda s: r(s, seqlen_q=8, seqlen_new=8, softcap=30.0)),
    ("cache_batch_idx", lambda s: r(s, batch_idx=True, pages=64)),
]


def _ask(check: Callable, spec) -> list[str]:
    try:
        return [str(x) for x in check(spec)]
    except Exception as error:  # a broken declaration is shown, not hidden
        return [f"support check raised {type(error).__name__}: {error}"]


def survey() -> dict:
    """Every installed backend's verdicts on :data:`CASES`: {"loaded", "errors", "verdicts"}."""
    from flash.errors import BackendError
    from flash.registry import REGISTRY
    from flash.support import reasons

    result: dict = {"loaded": {}, "errors": {}, "verdicts": {}, "decode": {}}
    ordered = REGISTRY.by_priority()
    base, kv_base = base_spec(), base_kv_spec()
    for name in ordered + [n for n in REGISTRY.names() if n not in ordered]:
        try:
            backend = REGISTRY.get(name)
        except BackendError as error:
            result["errors"][name] = str(error)
            continue
        result["loaded"][name] = str(getattr(backend, "version", "?"))
        result["verdicts"][name] = {
            label: [_ask(lambda s: reasons(backend, s, "forward"), make(base)),
                    _ask(lambda s: reasons(backend, s, "backward"), make(base))]
            for label, make in CASES
        }  # fmt: skip
        result["decode"][name] = {
            label: _ask(lambda s: reasons(backend, s, "decode"), make(kv_base)) for label, make in KV_CASES
        }
    return result


def _cell(reasons: list[str]) -> str:
    return OK if not reasons else esc("; ".join(reasons))


class BackendSupport(SphinxDirective):
    """The support matrix, then one table of reasons per backend."""

    def run(self) -> list[nodes.Node]:
        self.env.note_reread()
        result = survey()
        loaded, errors, verdicts = result["loaded"], result["errors"], result["verdicts"]
        out = [
            "Every problem is declared for a CUDA device; what depends on the GPU itself (its compute "
            "capability) is checked when a backend is loaded on a machine that has one.",
            "",
        ]
        if loaded:
            rows = []
            for label, _ in CASES:
                row = [esc(label)]
                for name in loaded:
                    fwd, bwd = verdicts[name][label]
                    row.append(f"{'✓' if not fwd else '✗'} / {'✓' if not bwd else '✗'}")
                rows.append(row)
            out.append(
                list_table(
                    ["problem (forward / backward)", *[code(n) for n in loaded]],
                    rows,
                    title="Support matrix",
                    classes="flash-support",
                )
            )
        if loaded:
            kv_rows = [[esc(label)] + [_cell(result["decode"][n][label]) for n in loaded] for label, _ in KV_CASES]
            out.append(
                list_table(
                    ["KV-cache call (:func:`flash.attention_with_kvcache`)", *[code(n) for n in loaded]],
                    kv_rows,
                    title="KV-cache pass",
                    classes="flash-reasons",
                )
            )
        for name, version in loaded.items():
            out += [
                f".. rubric:: ``{name}`` {esc(version)}",
                "",
                list_table(
                    ["problem", "forward", "backward"],
                    [[esc(label), _cell(f), _cell(b)] for label, (f, b) in verdicts[name].items()],
                    widths=[34, 33, 33],
                    classes="flash-reasons",
                ),
            ]
        for name, error in errors.items():
            out.append(f".. rubric:: ``{name}``\n\nThis backend is installed but did not load: {esc(error)}\n")
        if not loaded:
            out.append("No backend could be loaded while these docs were built.\n")
        return self.parse_text_to_nodes("\n".join(out))


class InstalledBackends(SphinxDirective):
    """``flash.backends()`` as seen by the machine that built these docs."""

    def run(self) -> list[nodes.Node]:
        import flash
        from flash.backend import PLUGIN_API_VERSION
        from flash.registry import REGISTRY

        self.env.note_reread()
        rows = []
        for info in flash.backends():
            try:
                api = str(getattr(REGISTRY.get(info.name), "plugin_api", "?"))
            except Exception:
                api = "?"
            rows.append(
                [
                    code(info.name),
                    esc(info.distribution or "in-process"),
                    esc(info.version or "?"),
                    esc(info.priority if info.priority is not None else "—"),
                    esc(api),
                    OK if info.usable else esc("; ".join(info.reasons)),
                ]
            )
        table = list_table(
            ["backend", "package", "version", "priority", "plugin API", "usable on the docs build machine"],
            rows,
            classes="flash-reasons",
        )
        note = f"This flash-core speaks plugin API version {PLUGIN_API_VERSION}.\n"
        return self.parse_text_to_nodes(table + "\n" + note)
