"""The KV-cache call (CPU tier): conformance of every backend, bad input, clamps, the per-step path.

Every backend that declares a KV-cache pass runs every case of :func:`flash.testing.kvcache.kv_cpu_cases`
against the independent float64 oracle, with poisoned outputs and guarded caches (the reference
backend must support every case). The rest holds the call to its contract: errors that name the
argument before any kernel, the documented clamps for values only the device knows, a per-step path
that never reads a tensor value on the host, plans made once per batch composition.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

import flash
from flash import InvalidInputError, kvplan
from flash.heuristics import decode as decode_heuristics
from flash.testing.kvcache import (
    KVCase,
    check_kvcache,
    kv_cpu_cases,
    kv_declared_reasons,
    kv_oracle,
    make_kv_inputs,
    run_kvcache,
)
from flash.testing.tolerance import assert_within_rule
from tests.conftest import require_usable

CASES = kv_cpu_cases()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_conformance(backend: str, case: KVCase, seed: int) -> None:
    require_usable(backend)
    reasons = kv_declared_reasons(backend, case, "cpu")
    if reasons:
        if backend == "reference":
            pytest.fail(f"the reference backend must support every case; it says: {'; '.join(reasons)}")
        pytest.skip(f"{backend} declares: {'; '.join(reasons)}")
    check_kvcache(backend, case, "cpu", seed)


def _small(dtype: torch.dtype = torch.float16, batch: int = 2, capacity: int = 16) -> dict:
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(dtype)

    return dict(
        q=randn(batch, 1, 4, 16),
        k_cache=randn(batch, capacity, 2, 16),
        v_cache=randn(batch, capacity, 2, 16),
        k=randn(batch, 1, 2, 16),
        v=randn(batch, 1, 2, 16),
        cache_seqlens=torch.tensor([3, 7][:batch], dtype=torch.int32),
    )


def _call(backend: str = "reference", **changes) -> torch.Tensor:
    args = _small()
    args.update(changes)
    tensors = [args.pop(name) for name in ("q", "k_cache", "v_cache", "k", "v")]
    return flash.attention_with_kvcache(*tensors, backend=backend, **args)


def _paged(pages: int = 6, page_size: int = 4) -> dict:
    args = _small()
    args["k_cache"] = torch.randn(pages, page_size, 2, 16).half()
    args["v_cache"] = torch.randn(pages, page_size, 2, 16).half()
    args["block_table"] = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    return args


BAD_INPUTS = [
    ("cache_seqlens", dict(cache_seqlens=torch.tensor([3, 16], dtype=torch.int32))),  # no room for the new key
    ("cache_seqlens", dict(cache_seqlens=torch.tensor([-1, 2], dtype=torch.int32))),
    ("cache_seqlens", dict(cache_seqlens=torch.tensor([3, 7], dtype=torch.int64))),
    ("cache_seqlens", dict(cache_seqlens=16)),
    ("k", dict(k=torch.randn(2, 17, 2, 16).half(), v=torch.randn(2, 17, 2, 16).half())),  # more than the capacity
    ("v", dict(v=None)),
    ("v_cache", dict(v_cache=torch.randn(2, 15, 2, 16).half())),
    ("k_cache", dict(k_cache=torch.randn(2, 16, 3, 16).half(), v_cache=torch.randn(2, 16, 3, 16).half())),
    ("k_cache", dict(k_cache=torch.randn(3, 16, 2, 16).half(), v_cache=torch.randn(3, 16, 2, 16).half())),
    ("cache_batch_idx", dict(cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32))),
    ("cache_batch_idx", dict(cache_batch_idx=torch.tensor([1, 1], dtype=torch.int32))),  # both append to row 1
    ("rotary_sin", dict(rotary_cos=torch.ones(16, 8))),
    ("rotary_cos", dict(rotary_cos=torch.ones(16, 9), rotary_sin=torch.zeros(16, 9))),  # rotary_dim 18 > 16
    ("rotary_cos", dict(rotary_cos=torch.ones(5, 8), rotary_sin=torch.zeros(5, 8))),  # too few positions
    ("sinks", dict(sinks=torch.zeros(2))),
    ("sinks", dict(sinks=torch.zeros(4, dtype=torch.float16))),
    ("sink_tokens", dict(sink_tokens=-1)),
    ("num_splits", dict(num_splits=0)),
    ("k_descale", dict(k_descale=torch.ones(()), v_descale=torch.ones(()))),  # not an fp8 cache
    ("window", dict(window=(4, 2), causal=True)),
    ("return_lse", dict(return_lse=1)),
]


@pytest.mark.parametrize("argument, changes", BAD_INPUTS, ids=[f"{a}-{i}" for i, (a, _) in enumerate(BAD_INPUTS)])
def test_bad_input_names_the_argument_before_any_kernel(argument: str, changes: dict, monkeypatch) -> None:
    ran = []
    monkeypatch.setattr(kvplan, "run_decode", lambda *a, **k: ran.append(1))
    with pytest.raises(InvalidInputError) as raised:
        _call(**changes)
    assert raised.value.argument == argument
    assert not ran


PAGED_BAD = [
    ("block_table", dict(block_table=torch.tensor([[0, 1, 2], [3, 9, 5]], dtype=torch.int32))),  # page 9 of 6
    ("block_table", dict(block_table=torch.tensor([[0, 1], [3, 4]], dtype=torch.int64))),
    ("k_cache", dict(k_cache=torch.randn(6, 300, 2, 16).half(), v_cache=torch.randn(6, 300, 2, 16).half())),
    ("cache_batch_idx", dict(cache_batch_idx=torch.tensor([0, 1], dtype=torch.int32))),
    ("cache_seqlens", dict(cache_seqlens=torch.tensor([3, 12], dtype=torch.int32))),  # 3 pages of 4 are full
]


@pytest.mark.parametrize("argument, changes", PAGED_BAD, ids=[f"{a}-{i}" for i, (a, _) in enumerate(PAGED_BAD)])
def test_bad_paged_input_names_the_argument(argument: str, changes: dict) -> None:
    args = _paged()
    args.update(changes)
    with pytest.raises(InvalidInputError) as raised:
        _call(**args)
    assert raised.value.argument == argument


def test_unused_block_table_entries_may_hold_padding(backend: str) -> None:
    """Padding past the pages a sequence uses (vLLM writes -1 there) is no error and changes nothing."""
    require_usable(backend)
    clean = _paged()
    padded = {name: t.clone() if isinstance(t, torch.Tensor) else t for name, t in clean.items()}
    padded["block_table"][0, 1:] = torch.tensor([1 << 30, -1], dtype=torch.int32)  # sequence 0 uses one page
    if flash.explain_kvcache(padded["q"], padded["k_cache"], padded["v_cache"], cache_seqlens=padded["cache_seqlens"],
                             block_table=padded["block_table"], backend=backend).decode.chosen is None:  # fmt: skip
        pytest.skip(f"{backend} has no KV-cache pass here")
    assert torch.equal(_call(backend, **padded), _call(backend, **clean))


def test_inference_only() -> None:
    with pytest.raises(InvalidInputError, match="no_grad") as raised:
        _call(q=torch.randn(2, 1, 4, 16, dtype=torch.float16, requires_grad=True))
    assert raised.value.argument == "q"
    with torch.no_grad():
        _call(q=torch.randn(2, 1, 4, 16, dtype=torch.float16, requires_grad=True))


#: Page sizes against the triton kernel's tiles (16 keys in the interpreter, 64 on an H200): several
#: pages per tile, one, a tile per page or several; powers of two take the kernel's per-page path,
#: the others its per-key one.
PAGE_SIZES = (1, 4, 16, 64, 256, 12)
PAGED_BASE = KVCase("pages", lengths=(37, 0, 70, 5), capacity=80, seqlen_q=2, seqlen_new=2, causal=True,
                    num_splits=3, dtype=torch.bfloat16)  # fmt: skip
PAGED_OPTIONS = {"splits": {}, "window_sink_tokens": {"window": (20, 0), "sink_tokens": 3, "num_splits": 2}}


@pytest.mark.parametrize("options", PAGED_OPTIONS, ids=list(PAGED_OPTIONS))
@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_page_sizes(backend: str, page_size: int, options: str, seed: int) -> None:
    """Every page size against the oracle with guarded caches: tiles that span pages, start them, or
    lie inside one; full and masked tiles, splits and a window's edges among them."""
    case = dataclasses.replace(PAGED_BASE, name=f"pages_{page_size}", page_size=page_size, **PAGED_OPTIONS[options])
    require_usable(backend)
    if kv_declared_reasons(backend, case, "cpu"):
        pytest.skip(f"{backend} has no KV-cache pass for this case")
    check_kvcache(backend, case, "cpu", seed)


CLAMP_BASE = KVCase("clamp", lengths=(22, 0, 17), capacity=24, seqlen_new=2, seqlen_q=2, causal=True)


def _int32(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


CLAMPED = [  # (case, what replaces a checked argument: a function of the checked value)
    (dataclasses.replace(CLAMP_BASE, name="lengths"), "cache_seqlens", lambda t: _int32(1 << 30, -7, 17)),
    (dataclasses.replace(CLAMP_BASE, name="pages", page_size=5), "block_table",
     lambda t: torch.where(torch.arange(t.shape[1]) % 2 == 0, t, _int32(1 << 30, -3, 99)[:, None])),
    (dataclasses.replace(CLAMP_BASE, name="pages_4", page_size=4), "block_table",
     lambda t: torch.where(torch.arange(t.shape[1]) % 2 == 0, t, _int32(1 << 30, -3, 99)[:, None])),
    (dataclasses.replace(CLAMP_BASE, name="pages_16", page_size=16), "block_table",
     lambda t: torch.where(torch.arange(t.shape[1]) % 2 == 0, t, _int32(1 << 30, -3, 99)[:, None])),
    (dataclasses.replace(CLAMP_BASE, name="pages_64", page_size=64), "block_table",  # one page: all bad
     lambda t: _int32(1 << 30, -3, 99)[:, None].expand_as(t).contiguous()),
    (dataclasses.replace(CLAMP_BASE, name="rows", batch_idx=True), "cache_batch_idx", lambda t: _int32(-4, 99, 1)),
]  # fmt: skip


@pytest.mark.parametrize("case, argument, bad", CLAMPED, ids=[case.name for case, _, _ in CLAMPED])
def test_unchecked_values_are_clamped_and_nothing_outside_is_touched(
    backend: str, case: KVCase, argument: str, bad, seed: int
) -> None:
    check_clamped(backend, case, argument, bad, "cpu", seed)


def check_clamped(backend: str, case: KVCase, argument: str, bad, device: str, seed: int) -> None:
    """With value checks off (as on a GPU), out-of-range lengths, page numbers and cache rows are
    clamped the documented way: the result is the oracle's for the clamped values, and nothing is
    written outside the caches (they sit between NaN guards)."""
    require_usable(backend)
    if kv_declared_reasons(backend, case, device):
        pytest.skip(f"{backend} has no KV-cache pass for this case")
    inputs = make_kv_inputs(case, device, seed)
    inputs.options[argument] = bad(inputs.options[argument].cpu()).to(device)
    inputs.options["check_values"] = False
    out, lse = run_kvcache(backend, inputs)
    for buffer in inputs.buffers:
        assert torch.cat((buffer[:64], buffer[-64:])).float().isnan().all()
    if argument != "cache_seqlens":  # the oracle looks pages and rows up in the clamped tensors
        inputs.options[argument] = inputs.options[argument].clamp(0, inputs.k_cache.shape[0] - 1)
    oracle_out, oracle_lse = kv_oracle(case, inputs, torch.float64)
    naive_out, naive_lse = kv_oracle(case, inputs, case.dtype)
    assert_within_rule(f"{backend}/{case.name} out", out, oracle_out, naive_out, case.dtype)
    assert_within_rule(f"{backend}/{case.name} lse", lse, oracle_lse, naive_lse, case.dtype)


def test_a_step_reads_no_tensor_value_on_the_host(backend: str, monkeypatch) -> None:
    """With value checks off, the per-step path never copies a tensor value to the host (on a GPU,
    a synchronisation a CUDA graph cannot capture)."""
    require_usable(backend)
    case = KVCase("sync_free", lengths=(9, 2), seqlen_q=2, seqlen_new=2, causal=True, num_splits=2, page_size=4,
                  rotary="half", sinks=True)  # fmt: skip
    if kv_declared_reasons(backend, case, "cpu"):
        pytest.skip(f"{backend} has no KV-cache pass for this case")
    inputs = make_kv_inputs(case, "cpu", 0)
    inputs.options["check_values"] = False
    run_kvcache(backend, inputs)  # the first call plans (and may compile); the steps after it must not sync

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host")

    if backend == "triton":  # the interpreter hands tensors to numpy by design: record the launches instead
        from flash_triton import decode

        launched: list[str] = []

        class Kernel:
            def __init__(self, name: str) -> None:
                self.name = name

            def __getitem__(self, grid):
                return lambda *args, **kwargs: launched.append(self.name)

        fake = SimpleNamespace(**{name: Kernel(name) for name in ("kv_append_kernel", "kv_decode_kernel",
                                                                   "kv_combine_kernel")})  # fmt: skip
        monkeypatch.setattr(decode, "runtime", SimpleNamespace(kernels=lambda: SimpleNamespace(decode=fake)))
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    with torch.no_grad():
        tensors = (inputs.q, inputs.k_cache, inputs.v_cache, inputs.k, inputs.v)
        flash.attention_with_kvcache(*tensors, backend=backend, **inputs.options)
    if backend == "triton":
        assert launched == ["kv_append_kernel", "kv_decode_kernel", "kv_combine_kernel"]


def test_plans_are_made_once_per_batch_composition(monkeypatch) -> None:
    calls = []
    real = kvplan.build_kv_spec
    monkeypatch.setattr(kvplan, "build_kv_spec", lambda *a, **k: calls.append(1) or real(*a, **k))
    kvplan.forget()
    for length in (3, 4, 5):
        _call(cache_seqlens=torch.tensor([length, 1], dtype=torch.int32))
    assert len(calls) == 1
    _call(q=torch.randn(2, 2, 4, 16).half())  # another composition: another plan
    assert len(calls) == 2


def test_explain_kvcache_names_the_pass_and_the_splits() -> None:
    args = _paged()
    tensors = [args.pop(name) for name in ("q", "k_cache", "v_cache", "k", "v")]
    text = str(flash.explain_kvcache(*tensors, num_splits=3, **args))
    assert "3 splits" in text and "paged" in text and "decode:" in text
    explanation = flash.explain_kvcache(*tensors, backend="reference", **args)
    assert explanation.decode.chosen == "reference"
    if "cuda" in [info.name for info in flash.backends()]:
        cuda = dict((name, reasons) for name, _, reasons in explanation.decode.considered).get("cuda", ())
        assert any("KV-cache" in r or "cupy" in r or "GPU" in r for r in cuda)


@pytest.mark.parametrize(
    "batch, heads_kv, capacity, sms, want",
    [
        (16, 8, 32768, 132, 2),  # 128 programs: 2 splits fill one wave of 264 (2 per SM)
        (16, 8, 4096, 132, 2),
        (1, 8, 131072, 132, 33),
        (16, 8, 4096, 66, 1),  # half the SMs: one split is one whole wave
        (128, 8, 32768, 132, 1),  # the batch fills the GPU alone
        (1, 8, 1024, 132, 4),  # no split shorter than 256 keys
        (1, 1, 10**7, 132, 128),  # at most 128 splits
        (2, 2, 4096, 1, 1),  # a CPU: nothing to fill
    ],
)
def test_split_heuristic(monkeypatch, batch, heads_kv, capacity, sms, want) -> None:
    monkeypatch.setattr(decode_heuristics, "sm_count", lambda device: sms)
    assert decode_heuristics.num_splits(batch, heads_kv, capacity, torch.device("cpu")) == want


def test_split_count_does_not_change_the_result() -> None:
    """Split-KV is exact: every split count gives the unsplit answer to rounding (the merge of
    :func:`flash.merge_states`), on the reference path."""
    case = KVCase("splits", lengths=(31, 2, 40), capacity=48, dtype=torch.float64, sinks=True)
    results = []
    for splits in (1, 2, 5, 48):
        inputs = make_kv_inputs(dataclasses.replace(case, num_splits=splits), "cpu", 7)
        results.append(run_kvcache("reference", inputs))
    for out, lse in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse, results[0][1], rtol=1e-12, atol=1e-12)
