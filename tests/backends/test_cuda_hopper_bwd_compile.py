"""Hopper backward (flash_cuda.hopper_bwd, issue 14), CPU tier: every variant compiles for sm_90a.

Needs only libnvrtc; skipped with the reason when it is missing. For every shipped variant (fixed
length and packed/varlen, with and without the deterministic dQ order and softcap: hopper_bwd.OPTIONS;
extra masks; ALiBi): ptxas reports no spill and no stack frame; with a disassembler at hand the SASS shows
the five products as HGMMA (64xBM for S^T and dP^T, 64x64 for dQ, 64xD for dV and dK), TMA and bulk loads,
register reallocation, dQ staged by 8-byte stores and sent by bulk reductions (deterministic: behind an
acquire spin, then a released increment), tanh and log2 with softcap, one FADD more per score with ALiBi,
and no local memory. Also the launch
arguments against the kernel's signature, the declared support, layout replays of the dS^T tile, and
replays of the deterministic turns.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

hopper_bwd = pytest.importorskip("flash_cuda.hopper_bwd")

from flash_cuda import hopper, hopper_tiles, hopper_variants, nvrtc  # noqa: E402
from flash_cuda.sources import read_kernel_file  # noqa: E402
from tests.backends.hopper_compile import Compiled, compile_all  # noqa: E402
from tests.backends.hopper_compile import sass as hopper_sass  # noqa: E402
from tests.backends.kernel_signatures import parameter_kinds  # noqa: E402


@pytest.fixture(scope="module")
def compiled() -> dict[hopper_bwd.BwdVariant, Compiled]:
    return compile_all(hopper_bwd.shipped_variants(), hopper_bwd.source, hopper_bwd.KERNEL_NAME)


def test_every_variant_compiles_without_spilling_or_serialised_wgmma(compiled):
    structures = len(hopper_bwd.HEAD_DIMS) + len(hopper_bwd.PIPELINED_HEAD_DIMS)
    with_options = (len(hopper_bwd.OPTIONS) - 1) * len(hopper_bwd.HEAD_DIMS)  # the launched structure only
    combinations = structures + with_options
    # the launched structure with an extra mask, causal and window only (extra_window)
    extra = len(hopper_bwd.HEAD_DIMS) * len(hopper_bwd.EXTRA_MASK_KINDS)
    alibi = len(hopper_bwd.HEAD_DIMS) * len(hopper_bwd.ALIBI_MASK_KINDS)  # the launched structure, no option
    assert len(compiled) == (combinations * len(hopper_tiles.MASK_NAMES) + extra + alibi) * len(hopper_bwd.DTYPES)
    for variant, (res, _, log) in compiled.items():
        assert res.arch == "sm_90a"
        assert res.stack_frame == 0 and not res.spills, f"{variant.label()}: {res}"
        assert variant.launch_smem <= hopper_variants.MAX_SMEM
        # C7514: a wgmma issued under a run-time condition in the loop serialises every wgmma (walk())
        assert "C7514" not in log and "serialized" not in log, f"{variant.label()}: wgmma serialised\n{log}"
    for d in hopper_bwd.HEAD_DIMS:
        for options in hopper_bwd.OPTIONS:
            assert hopper_bwd.BwdVariant(d, "bf16", 0, hopper_bwd.PIPELINED[d], *options) in compiled


def test_sass_has_the_five_products_tma_and_vector_reductions(compiled):
    for variant, (_, cubin, _) in compiled.items():
        sass = hopper_sass(cubin)
        found = re.findall(r"HGMMA\.(64x\d+x16)\.F32(\.BF16)?\b", sass)
        assert all((ty == ".BF16") == (variant.dtype == "bf16") for _, ty in found), f"{variant.label()}: input type"
        kinds = {shape for shape, _ in found}
        assert {f"64x{hopper_bwd.BLOCK_M}x16", f"64x{variant.head_dim}x16"} <= kinds, f"{variant.label()}: {kinds}"
        assert "UTMALDG.4D" in sass and "UBLKCP" in sass, f"{variant.label()}: TMA / bulk copies missing"
        assert "USETMAXREG.DEALLOC" in sass and "USETMAXREG.TRY_ALLOC" in sass, f"{variant.label()}: no setmaxnreg"
        assert "UBLKRED.G.S.ADD.F32" in sass, f"{variant.label()}: dQ not sent by bulk reductions"
        assert "STS.64" in sass, f"{variant.label()}: dQ not staged 8 bytes per store"
        assert not re.search(r"\b(LDL|STL)\b", sass), f"{variant.label()}: local memory"
        # deterministic: the dQ writer's acquire spin and released increment of the turn counters
        ordered = "LDG.E.STRONG.GPU" in sass and "REDG.E.ADD.S32.STRONG.GPU" in sass
        assert ordered == variant.deterministic, f"{variant.label()}: turn counters"
        capped = "MUFU.TANH" in sass and "MUFU.LG2" in sass
        assert capped == variant.softcap, f"{variant.label()}: softcap's tanh and log2"


def test_alibi_costs_one_fadd_per_score(compiled):
    """ALiBi's per-key part is one FADD per score (an exponential each, MUFU.EX2), nothing else counted
    here changes against the same variant without it: no more exponentials, FFMAs or products."""
    count = lambda pattern, text: len(re.findall(pattern, text))  # noqa: E731
    alibi = [v for v in compiled if v.alibi]
    assert alibi
    for variant in alibi:
        plain = hopper_bwd.BwdVariant(variant.head_dim, variant.dtype, variant.mask, variant.pipelined)
        with_bias, without = hopper_sass(compiled[variant][1]), hopper_sass(compiled[plain][1])
        scores = count(r"MUFU\.EX2", with_bias)
        assert scores == count(r"MUFU\.EX2", without) > 0, variant.label()
        assert count(r"\bFADD\b", with_bias) - count(r"\bFADD\b", without) == scores, variant.label()
        for pattern in (r"\bFFMA\b", r"\bHGMMA\b"):
            assert count(pattern, with_bias) == count(pattern, without), (variant.label(), pattern)


def test_source_is_header_free_and_one_extern_c_kernel():
    source = hopper_bwd.source(hopper_bwd.BwdVariant(128, "bf16", hopper_tiles.MASK_RIGHT))
    assert "#include <" not in source
    assert source.count('extern "C"') == 1 and hopper_bwd.KERNEL_NAME in source
    assert "ss_t" in source and "p, 1, 1, 1, 1" in source  # dQ: A M-major and B N-major


def test_forward_wgmma_source_is_unchanged_by_the_transposed_method():
    # the forward's generated instructions must not depend on the backward's addition
    for variant in hopper_variants.shipped_variants()[:4]:
        assert "ss_t" not in hopper_variants.wgmma_source(variant)


def test_launch_parameters_match_the_kernel_signatures():
    main = read_kernel_file(hopper_bwd.ENTRY_FILE)
    assert parameter_kinds(main, hopper_bwd.KERNEL_NAME) == list(hopper_bwd.PARAMETERS.kinds)
    rows = read_kernel_file(hopper_bwd.ROWS_FILE)
    assert parameter_kinds(rows, "flash_bwd_rows") == list(hopper_bwd.ROWS_PARAMETERS.kinds)
    assert parameter_kinds(rows, "flash_bwd_dq") == list(hopper_bwd.DQ_PARAMETERS.kinds)


def test_smem_bytes_match_the_shape():
    for variant in hopper_bwd.shipped_variants():
        d = variant.head_dim
        kv, qt, ds, dq, rows = 128 * d * 2, 64 * d * 2, 64 * 64 * 2, 64 * 64 * 4, 64 * 4
        barriers = 9 + (4 if variant.deterministic else 0)  # the dQ writer's full/empty per consumer
        keys = 128 * 8 if variant.extra else 0  # each key's query range
        slopes = 16 if variant.alibi else 0  # the slope of each stage's step
        assert variant.smem_bytes == 2 * kv + 4 * qt + 4 * ds + 2 * dq + 4 * rows + keys + slopes + 8 * barriers


def test_problem_reasons():
    import torch

    ok = dict(
        capability=(9, 0), dtype=torch.bfloat16, head_dim=128, heads_q=8, heads_kv=2, batch=2, seqlen_q=100,
        seqlen_k=300, total_q=200, total_k=600, scale=0.1,
    )  # fmt: skip
    assert hopper_bwd.problem_reasons(**ok) == []
    assert hopper_bwd.problem_reasons(**{**ok, "head_dim": 40}) == []
    assert hopper_bwd.problem_reasons(**{**ok, "varlen": True, "total_q": 150, "total_k": 301}) == []
    big = hopper.MAX_SEQLEN - 64 * 5  # the packed rows: one padding block per sequence on top of the tokens
    assert hopper_bwd.problem_reasons(**{**ok, "varlen": True, "batch": 4, "total_q": big}) == []
    assert hopper_bwd.problem_reasons(**{**ok, "softcap": 30.0}) == []
    assert hopper_bwd.problem_reasons(**{**ok, "alibi": True, "window": (-1, 0)}) == []
    assert hopper_bwd.problem_reasons(**{**ok, "alibi": True, "window": (100, 0)}) == []
    for change, words in (
        ({"capability": (10, 0)}, "sm_90"),
        ({"capability": (8, 0)}, "sm_90"),
        ({"dtype": torch.float8_e4m3fn}, "float16 and bfloat16"),
        ({"head_dim": 192}, "head dims up to 128"),
        ({"varlen": True, "batch": 6, "total_q": big}, "padded"),
        ({"varlen": True, "total_k": hopper.MAX_SEQLEN + 1}, "packed keys"),
        ({"varlen": True, "deterministic": True, "total_q": 150, "total_k": 301}, "deterministic with varlen"),
        ({"total_q": 0}, "empty"),
        ({"softcap": -1.0}, "softcap"),
        ({"softcap": math.inf}, "softcap"),
        ({"dropout": True}, "dropout"),
        ({"heads_kv": 3}, "multiple"),
        ({"seqlen_k": 0}, "empty"),
        ({"alibi": True}, "alibi with right reach -1"),
        ({"alibi": True, "window": (4, 3)}, "alibi with right reach 3"),
        ({"alibi": True, "window": (-1, 0), "softcap": 2.0}, "alibi with softcap"),
        ({"alibi": True, "window": (-1, 0), "deterministic": True}, "alibi with deterministic"),
        ({"alibi": True, "window": (-1, 0), "varlen": True}, "alibi with varlen"),
        ({"alibi": True, "window": (-1, 0), "key_padding": True}, "alibi with key padding"),
    ):
        reasons = hopper_bwd.problem_reasons(**{**ok, **change})
        assert any(words in r for r in reasons), (change, reasons)


def test_backward_is_declared():
    import torch

    from flash_cuda import backend

    support = backend.CudaBackend.backward_support
    assert support is not None and support.min_capability == (9, 0)
    assert support.dtypes == frozenset({torch.float16, torch.bfloat16})
    assert {"varlen", "softcap", "deterministic"} <= support.features
    assert "dropout" not in support.features


def test_ds_tile_store_matches_the_m_major_operand_layout():
    """Replay where the consumers store dS^T (the S^T accumulator's elements, swizzled 128-byte rows
    of 64 queries per key) and where wgmma reads A = dS (64 queries x 16 keys per k step) through the
    M-major descriptor (start + 16 kk rows, 8-row groups 1024 bytes apart, 128-byte swizzle): every
    (query, key) must be read from where it was written."""
    tile = np.full(64 * 128 // 2, -1, dtype=np.int64)  # u16 slots of the 8 KB tile
    for warp in range(4):
        for lane in range(32):
            lane_row, quad_col = 16 * warp + lane // 4, 2 * (lane % 4)
            for i in range(8):
                for r in range(2):
                    key, query = lane_row + 8 * r, 8 * i + quad_col
                    offset = key * 128 + query * 2
                    swz = offset ^ (((offset >> 7) & 7) << 4)
                    for c in range(2):
                        tile[swz // 2 + c] = key * 64 + query + c  # (key, query + c)
    assert (tile >= 0).all()
    # canonical M-major 128B-swizzle layout: element (m, k) of k step kk at
    # start + (k // 8) * SBO + (k % 8) * 128 + m * 2, swizzled (m < 64: one swizzle row)
    for kk in range(4):
        start = kk * 16 * 128
        for k in range(16):
            for m in range(64):
                offset = start + (k // 8) * 1024 + (k % 8) * 128 + m * 2
                swz = offset ^ (((offset >> 7) & 7) << 4)
                assert tile[swz // 2] == (16 * kk + k) * 64 + m


@pytest.mark.parametrize("head_dim", hopper_bwd.HEAD_DIMS)
def test_dq_workspace_fragment_order_is_undone(head_dim):
    """Replay the consumers' staging stores (float ((2 i + r) * 128 + t) * 2 + c of a slab tile holds the
    accumulator element (i, r, c) of thread t) into the workspace, then dq_rows must give every row
    and column back."""
    import torch

    batch, heads, s_pad = 2, 3, 128
    slabs = head_dim // 64
    truth = torch.arange(batch * heads * s_pad * head_dim, dtype=torch.float32).view(batch, heads, s_pad, head_dim)
    work = torch.full((batch, heads, s_pad * head_dim), -1.0)
    for block in range(s_pad // 64):
        for slab in range(slabs):
            tile = (block * slabs + slab) * 64 * 64
            for t in range(128):
                for i in range(8):
                    for r in range(2):
                        for c in range(2):
                            row = 64 * block + 16 * (t // 32) + (t % 32) // 4 + 8 * r
                            col = 64 * slab + 8 * i + 2 * (t % 4) + c
                            work[:, :, tile + ((2 * i + r) * 128 + t) * 2 + c] = truth[:, :, row, col]
    assert (work >= 0).all()
    assert torch.equal(hopper_bwd.dq_rows(work, s_pad, head_dim), truth)


@pytest.mark.parametrize("dtype", hopper_bwd.DTYPES)
def test_row_passes_compile_without_spilling(dtype):
    reason = nvrtc.unavailable_reason()
    if reason:
        pytest.skip(reason)
    compiled = nvrtc.compile_cubin(hopper_bwd.row_source(), (*hopper_bwd.row_options(dtype), "-Xptxas=-v"))
    report = nvrtc.parse_ptxas(compiled.log)
    assert set(report) == set(hopper_bwd.ROWS_KERNELS)
    assert all(not r.spills and r.stack_frame == 0 for r in report.values()), report


def test_dq_pass_index_arithmetic_matches_dq_rows():
    """flash_bwd_dq's decomposition of a float pair's index (replayed here) lands where dq_rows puts it."""
    import torch

    batch, heads, s_pad, d = 2, 3, 128, 128
    work = torch.arange(batch * heads * s_pad * d, dtype=torch.float32).view(batch, heads, -1)
    rows = hopper_bwd.dq_rows(work, s_pad, d)
    flat = work.view(-1)
    slabs, blocks = d // 64, s_pad // 64
    for f in range(0, flat.numel() // 2, 37):
        tile, within = divmod(f, 2048)
        ir, t = divmod(within, 128)
        i, r = divmod(ir, 2)
        tb, slab = divmod(tile, slabs)
        bh, block = divmod(tb, blocks)
        b, h = divmod(bh, heads)
        row = block * 64 + 16 * (t // 32) + (t % 32) // 4 + 8 * r
        col = slab * 64 + 8 * i + 2 * (t % 4)
        assert rows[b, h, row, col] == flat[2 * f] and rows[b, h, row, col + 1] == flat[2 * f + 1]


def test_the_pipelined_consumer_is_refused_where_it_spills():
    with pytest.raises(ValueError, match="spills"):
        hopper_bwd.BwdVariant(128, "bf16", 0, True)


def _walk(steps: int, slabs: int, wg: int, lag: int) -> list[tuple[int, bool]]:
    """Replay of walk() in hopper_bwd.cuh: (step, computes a dQ) in order."""
    out = []
    if slabs == 2:
        return [(it, True) for it in range(steps)]
    it = 0
    while it + 1 < steps:
        out += [(it, wg == lag), (it + 1, wg != lag)]
        it += 2
    if it < steps:
        out.append((it, wg == lag))
    return out


def _turn(t: int, slabs: int, wg: int) -> bool:
    return (t & 1) == wg if slabs == 1 else True  # dq_turn (t & 1 of -1 is 1)


@pytest.mark.parametrize("slabs", [1, 2])
@pytest.mark.parametrize("lag", [0, 1])
def test_walk_gives_every_step_one_dq_per_slab(slabs, lag):
    """Each step t's dQ slab is computed exactly once (d64: by one warpgroup, in turn; d128: by both,
    one slab each), by step t (lag 0) or by step t + 1 and the pipelined tail (lag 1), and the
    compile-time flags equal dq_turn(it - lag) at every step."""
    for steps in range(0, 9):
        for wg in (0, 1):
            walked = _walk(steps, slabs, wg, lag)
            assert [it for it, _ in walked] == list(range(steps))
            for it, dq in walked:
                assert dq == _turn(it - lag, slabs, wg), (steps, wg, it)
        done = []
        for wg in (0, 1):
            done += [it - lag for it, dq in _walk(steps, slabs, wg, lag) if dq]
            if lag == 1 and steps > 0 and _turn(steps - 1, slabs, wg):
                done.append(steps - 1)  # the tail after the walk
        # lag 1: step 0 also computes the zero step -1 (nothing when there is no step)
        expected = sorted(list(range(-lag if steps else 0, steps)) * (2 if slabs == 2 else 1))
        assert sorted(done) == expected, (steps, slabs)


def _dq_sends(t: int, slabs: int) -> int:
    return t if slabs == 2 else t >> 1  # dq_sends in hopper_bwd.cuh


@pytest.mark.parametrize("slabs", [1, 2])
@pytest.mark.parametrize("lag", [0, 1])
def test_the_dq_writer_takes_the_slabs_in_the_order_the_consumers_send_them(slabs, lag):
    """Deterministic mode: each consumer warpgroup's sends (consume: the walk's dQ steps; the
    pipelined consumer: step it - 1's slab at step it, not the zero step, then the tail) reach its
    staging tile as uses k = 0, 1, 2, ... (the parity of its dq_full/dq_empty waits), in the order
    write_dq takes them: per step t, warpgroup slab (d128) or t % 2 (d64)."""
    if slabs == 2 and lag == 1:
        return  # the pipelined consumer is d64 only
    for steps in range(0, 9):
        for wg in (0, 1):
            sent = []
            for it, dq in _walk(steps, slabs, wg, lag):
                if dq and it - lag >= 0:
                    sent.append((it - lag, _dq_sends(it - lag, slabs)))
            if lag == 1 and steps > 0 and _turn(steps - 1, slabs, wg):
                sent.append((steps - 1, _dq_sends(steps - 1, slabs)))
            writer = [
                (t, _dq_sends(t, slabs))
                for t in range(steps)
                for slab in range(slabs)
                if (slab if slabs == 2 else t & 1) == wg
            ]
            assert sent == writer, (steps, wg, sent, writer)
            assert [k for _, k in sent] == list(range(len(sent))), (steps, wg, sent)


def _stand_ins(monkeypatch) -> list[tuple]:
    """hopper_bwd's launches on CPU tensors behind stand-ins (modules, tensor maps, the launch itself):
    the list each launch is appended to, as (packed launch, device, grid, threads, smem, values)."""
    import torch

    from flash_cuda import modules, tensor_map

    launches: list[tuple] = []
    handles = {hopper_bwd.KERNEL_NAME: 11, "flash_bwd_rows": 22, "flash_bwd_dq": 33}
    loaded = lambda key, device, build, names, smem=0: tuple(handles[n] for n in names)  # noqa: E731
    monkeypatch.setattr(modules, "functions", loaded)
    monkeypatch.setattr(tensor_map, "encode_tiled", lambda address, *rest: tensor_map.TensorMap())
    monkeypatch.setattr(tensor_map, "driver", object)  # no cuFuncGetParamInfo: nothing to check
    monkeypatch.setattr(hopper_bwd, "run", lambda packed, *rest: launches.append((packed, *rest)))
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: 0)
    monkeypatch.setattr(hopper_bwd, "_launches", {})
    return launches


def test_backward_launches_what_the_kernels_take(monkeypatch):
    """hopper_bwd.backward behind stand-ins: the rows pass, the main kernel and the dQ conversion, in
    that order, each with its layout's parameters, the buffers one pass writes being the ones the next
    reads."""
    import torch

    launches = _stand_ins(monkeypatch)
    b, s, h, hkv, d = 2, 100, 4, 2, 64
    q, out, dout = (torch.randn(b, s, h, d, dtype=torch.bfloat16) for _ in range(3))
    k, v = (torch.randn(b, 150, hkv, d, dtype=torch.bfloat16) for _ in range(2))
    lse = torch.randn(b, h, s)
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    hopper_bwd.backward(q, k, v, out, lse, dout, dq, dk, dv, heads_q=h, heads_kv=hkv, head_dim=d, window=(-1, 0),
                        scale=0.125)  # fmt: skip
    (rows, _, rows_grid, rows_threads, _, rows_values), (main, _, grid, threads, smem, values), dq_launch = launches
    assert smem == hopper_bwd._variant(64, "bf16", hopper_tiles.MASK_RIGHT, hopper_bwd.PIPELINED[64]).launch_smem
    assert [p.function for p in (rows, main, dq_launch[0])] == [22, 11, 33]
    for packed, launch_values in ((rows, rows_values), (main, values), (dq_launch[0], dq_launch[-1])):
        assert len(launch_values) == len(packed.layout.kinds)
        packed.layout.format.pack(*launch_values)  # every value fits its kind
    s_pad = 128
    assert rows_values[:3] == (out.data_ptr(), dout.data_ptr(), lse.data_ptr())
    assert rows_values[-6:] == (0, 0, 0, 0, 0, 0)  # fixed length: no cu_seqlens_q; no ALiBi
    lse2, delta = rows_values[3:5]
    assert rows_grid == b * h * s_pad // 8 and rows_threads == 256
    assert values[4:9] == (dk.data_ptr(), dv.data_ptr(), values[6], lse2, delta)
    assert values[9:15] == (*dk.stride()[:3], *dv.stride()[:3])
    assert values[15:23] == (s, 150, s_pad, h, h // hkv, d, hopper.UNBOUNDED_REACH, 0)
    assert values[23:25] == (0.125 * hopper.LOG2E, 0.125)
    # no cu_seqlens, turn counters, softcap, mask, ALiBi
    assert values[25:] == (0, 0, 0, 0, 0, 0.0, 0.0, 0, 0, 0, 0, 0, 0, 0)
    assert grid == 2 * hkv * b and threads == hopper_bwd.THREADS
    dq_values = dq_launch[-1]
    assert dq_values[:2] == (values[6], dq.data_ptr())  # the workspace the main kernel adds to
    assert dq_values[2:] == (*dq.stride()[:3], h, s, s_pad, 64, d, 0.125, b * h * s_pad * 64 // 2, 0, 0, 0)
    # a second call of the problem: the same decisions, this call's own gradients
    grads = [torch.empty_like(t) for t in (q, k, v)]
    hopper_bwd.backward(q, k, v, out, lse, dout, *grads, heads_q=h, heads_kv=hkv, head_dim=d, window=(-1, 0),
                        scale=0.125)  # fmt: skip
    assert len(hopper_bwd._launches) == 1
    assert launches[4][-1][4:6] == (grads[1].data_ptr(), grads[2].data_ptr())
    assert launches[5][-1][1] == grads[0].data_ptr()
    # softcap and the deterministic order: another variant, the cap in the exponent's factor, the
    # turn counters right after the workspace (zeroed with it)
    hopper_bwd.backward(q, k, v, out, lse, dout, dq, dk, dv, heads_q=h, heads_kv=hkv, head_dim=d, window=(-1, 0),
                        scale=0.125, softcap=30.0, deterministic=True)  # fmt: skip
    assert len(hopper_bwd._launches) == 2
    _, (main, _, _, _, smem, values), dq_launch = launches[6:]
    variant = hopper_bwd._variant(64, "bf16", hopper_tiles.MASK_RIGHT, hopper_bwd.PIPELINED[64], False, True, True)
    assert smem == variant.launch_smem and smem > launches[1][4]
    main.layout.format.pack(*values)
    assert values[23:25] == (30.0 * hopper.LOG2E, 0.125) and values[30:32] == (0.125 / 30.0, values[23] ** -2)
    assert values[29] == values[6] + b * h * s_pad * 64 * 4
    assert dq_launch[-1][0] == values[6]


def test_varlen_backward_launches_the_packed_variant(monkeypatch):
    """A packed batch behind the stand-ins: the varlen variant, tensor maps of one batch row over the
    packed tokens, a grid of (sequence, KV head, key block of the longest sequence), buffers of
    packed_rows rows per head, the longest query sequence where the passes clip rows, and the offsets
    with the token counts as each kernel's last parameters."""
    import itertools

    import torch

    launches = _stand_ins(monkeypatch)
    lengths_q, lengths_k = [70, 0, 130, 1], [90, 5, 0, 300]
    h, hkv, d = 4, 2, 64
    cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(n)], dtype=torch.int32) for n in (lengths_q, lengths_k))
    tq, tk = sum(lengths_q), sum(lengths_k)
    q, out, dout = (torch.randn(1, tq, h, d, dtype=torch.bfloat16) for _ in range(3))
    k, v = (torch.randn(1, tk, hkv, d, dtype=torch.bfloat16) for _ in range(2))
    lse = torch.randn(1, h, tq)
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    hopper_bwd.backward(q, k, v, out, lse, dout, dq, dk, dv, heads_q=h, heads_kv=hkv, head_dim=d, scale=0.125,
                        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=130, max_seqlen_k=300)  # fmt: skip
    (rows, _, rows_grid, _, _, rows_values), (main, _, grid, _, smem, values), dq_launch = launches
    dq_pass, dq_values = dq_launch[0], dq_launch[-1]
    for packed, launch_values in ((rows, rows_values), (main, values), (dq_pass, dq_values)):
        packed.layout.format.pack(*launch_values)
    (plan,) = hopper_bwd._launches.values()
    assert plan.variant == hopper_bwd.BwdVariant(64, "bf16", hopper_tiles.MASK_NONE, hopper_bwd.PIPELINED[64], True)
    assert smem == plan.variant.launch_smem
    assert all(g.dims[3] == 1 and g.dims[2] == rows for g, rows in zip(plan.maps, (tq, tk, tk, tq)))
    s_pad = hopper_bwd.packed_rows(tq, 4)
    assert s_pad == (tq // 64 + 4) * 64 == plan.s_pad
    assert grid == 3 * hkv * 4  # ceil(300 / 128) key blocks per (sequence, KV head)
    assert rows_grid == h * s_pad // 8
    assert rows_values[14:19] == (h, 130, s_pad, d, h * s_pad)
    assert rows_values[19:] == (cu_q.data_ptr(), 4, tq, 0, 0, 0)
    assert values[15:21] == (130, 300, s_pad, h, h // hkv, d)
    assert values[25:] == (cu_q.data_ptr(), cu_k.data_ptr(), tq, tk, 0, 0.0, 0.0, 0, 0, 0, 0, 0, 0, 0)
    assert dq_values[5:7] == (h, 130) and dq_values[-3:] == (cu_q.data_ptr(), 4, tq)
    assert dq_values[-4] == h * s_pad * 64 // 2  # float pairs of the workspace


@pytest.mark.parametrize(
    "change, words",
    [
        ({"cu_seqlens_k": None}, "both or neither"),
        ({"cu_seqlens_q": "int64"}, "cu_seqlens_q: a 1-D int32"),
        ({"cu_seqlens_k": "short"}, "cu_seqlens_k: batch + 1 offsets"),
        ({"max_seqlen_k": None}, "max_seqlen_k"),
        ({"q": "batch 2"}, "q: a packed batch"),
    ],
)
def test_varlen_arguments_are_named_before_any_launch(monkeypatch, change, words):
    import torch

    launches = _stand_ins(monkeypatch)
    q = torch.randn(1, 30, 2, 64, dtype=torch.float16)
    k = torch.randn(1, 40, 2, 64, dtype=torch.float16)
    cu = torch.tensor([0, 10, 30], dtype=torch.int32)
    args = {"q": q, "cu_seqlens_q": cu, "cu_seqlens_k": torch.tensor([0, 0, 40], dtype=torch.int32)}
    args |= {"max_seqlen_q": 20, "max_seqlen_k": 40}
    fixes = {"int64": cu.long(), "short": cu[:2], "batch 2": q.expand(2, -1, -1, -1)}
    args |= {name: fixes.get(value, value) for name, value in change.items()}
    q = args.pop("q")
    lse = torch.randn(q.shape[0], 2, 30)
    with pytest.raises(ValueError, match=re.escape(words)):
        hopper_bwd.backward(q, k, k, q, lse, q, q, k, k, heads_q=2, heads_kv=2, head_dim=64, scale=0.1, **args)
    assert launches == []


def test_workspace_holds_the_turn_counters_after_dq():
    import torch

    dq_acc, turns = hopper_bwd.workspace(2, 3, 128, 128, False, "cpu")
    assert dq_acc.shape == (2, 3, 128 * 128) and turns is None and not dq_acc.any()
    dq_acc, turns = hopper_bwd.workspace(2, 3, 128, 128, True, "cpu")
    assert dq_acc.shape == (2, 3, 128 * 128) and turns.dtype == torch.int32
    assert turns.numel() == 2 * 3 * (128 // 64) * (128 // 64)  # one per 64 x 64 dQ tile
    assert turns.data_ptr() == dq_acc.data_ptr() + dq_acc.numel() * 4 and not turns.any()


def _key_block_range(sq: int, sk: int, window: tuple[int, int], mask: int, n0: int) -> tuple[int, int]:
    """Replay of Block::set: the query blocks [m_lo, m_hi) that key block n0 / 128 walks."""
    off = sk - sq
    left, right = (hopper.UNBOUNDED_REACH if w < 0 else w for w in window)
    q_lo, q_hi = 0, sq
    if mask >= 1:
        q_lo = max(0, n0 - off - right)
    if mask == 2:
        q_hi = min(q_hi, min(n0 + 128, sk) - 1 - off + left + 1)
    return (q_lo // 64, -(-q_hi // 64)) if q_hi > q_lo else (0, 0)


def _block_turn(sq: int, sk: int, window: tuple[int, int], mask: int, kb: int, m: int) -> int:
    """Replay of Block::turn."""
    last = -(-sk // 128) - 1
    if mask >= 1:
        right = hopper.UNBOUNDED_REACH if window[1] < 0 else window[1]
        last = min(last, -(-((m + 1) * 64 + sk - sq + right) // 128) - 1)
    return last - kb


TURN_CASES = [
    (sq, sk, window)
    for sq, sk in ((1, 1), (64, 64), (100, 300), (300, 100), (333, 200), (1000, 1), (1, 1000), (700, 900), (513, 640))
    for window in ((-1, -1), (-1, 0), (40, 7), (16, 16), (100, -1), (60, 3), (0, 0), (-1, 200), (300, 0))
]


@pytest.mark.parametrize("sq, sk, window", TURN_CASES)
def test_deterministic_turns_follow_the_launch_order(sq, sk, window):
    """Per query block, the key blocks that add to its dQ tiles (Block::set's ranges) take turns 0, 1,
    ... in the order their thread blocks are launched (key_block: reversed), so that the counter
    reaches every turn and a block only ever waits for lower blockIdx.x (no deadlock)."""
    mask = hopper_tiles.mask_kind(window)
    key_blocks = -(-sk // 128)
    seen: dict[int, list[tuple[int, int]]] = {}  # m -> (position in the launch order, turn)
    for position in range(key_blocks):
        kb = key_blocks - 1 - position  # key_block() in deterministic mode
        m_lo, m_hi = _key_block_range(sq, sk, window, mask, kb * 128)
        for m in range(m_lo, m_hi):
            seen.setdefault(m, []).append((position, _block_turn(sq, sk, window, mask, kb, m)))
    for m, pairs in seen.items():
        assert [turn for _, turn in sorted(pairs)] == list(range(len(pairs))), (m, pairs)


@pytest.mark.parametrize("softcap", [0.0, 30.0, 2.0])
def test_the_kernels_score_arithmetic_gives_the_oracles_gradients(softcap):
    """The consumers' arithmetic replayed in float64 with the host's constants (score_constants):
    S^T -> t = tanh(S^T softcap_in) -> masked -> P^T = exp2(t score_log2 - LSE_2); dS^T = P^T (dP^T -
    delta) (1 - t^2), t^2 from log2 P^T + LSE_2 (capped_dp_to_ds: max(., 0) where P^T = 0, NaN included);
    dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO. Rows past the sequence: LSE_2 = +inf. Against
    float64 autograd of softcapped, causally masked attention."""
    import torch

    g = torch.Generator().manual_seed(0)
    sq, sk, d, scale = 40, 56, 16, 0.7
    q, k, v, do = (torch.randn(n, d, generator=g, dtype=torch.float64) for n in (sq, sk, sk, sq))
    seen = (torch.arange(sk)[None, :] - torch.arange(sq)[:, None] - (sk - sq)) <= 0  # causal
    qa, ka, va = (t.clone().requires_grad_() for t in (q, k, v))
    s = qa @ ka.T * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    out = torch.softmax(s.masked_fill(~seen, -math.inf), -1) @ va
    lse = torch.logsumexp(s.masked_fill(~seen, -math.inf), -1).detach()
    exact = torch.autograd.grad(out, (qa, ka, va), do)

    score_log2, softcap_in, softcap_t2 = hopper_bwd.score_constants(scale, softcap)
    lse2 = torch.cat([lse * hopper.LOG2E, torch.full((8,), math.inf, dtype=torch.float64)])  # 8 padded rows
    qp, dop = torch.cat([q, torch.zeros(8, d, dtype=q.dtype)]), torch.cat([do, torch.zeros(8, d, dtype=q.dtype)])
    seen_p = torch.cat([seen, torch.ones(8, sk, dtype=torch.bool)])
    st = k @ qp.T  # S^T: keys x queries
    if softcap:
        st = torch.tanh(st * softcap_in)
    st = st.masked_fill(~seen_p.T, -math.inf)
    pt = torch.exp2(st * score_log2 - lse2[None, :])
    delta = (dop * torch.cat([out.detach(), torch.zeros(8, d, dtype=q.dtype)])).sum(-1)
    dpt = v @ dop.T
    factor = torch.ones_like(pt)
    if softcap:
        u = torch.log2(pt) + lse2[None, :]
        factor = torch.clamp(1 - u * u * softcap_t2, min=0).nan_to_num(0.0)
    dst = pt * (dpt - delta[None, :]) * factor
    assert torch.isfinite(dst).all()
    got = (scale * dst.T @ k)[:sq], scale * dst @ qp, pt @ dop
    for name, a, b in zip(("dq", "dk", "dv"), got, exact):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-7), name


def _random_intervals(g, sq: int, sk: int):
    """Monotone key intervals (a prefix of rows that see nothing: [0, 0))."""
    import torch

    lo = torch.sort(torch.randint(0, sk, (sq,), generator=g)).values
    hi = torch.minimum(torch.sort(torch.randint(1, sk + 1, (sq,), generator=g)).values + lo // 3, torch.tensor(sk))
    hi = torch.maximum(hi, lo)
    empty = torch.arange(sq) < int(torch.randint(0, 3, (1,), generator=g))
    lo, hi = torch.where(empty | (hi == lo), 0, lo), torch.where(empty | (hi == lo), 0, hi)
    keep = (hi[1:] >= hi[:-1]).all() and (lo[1:] >= lo[:-1]).all()
    return torch.stack((lo, hi))[None].to(torch.int32) if keep else None


def _check_tables(seen, blocks, keys, sq: int, sk: int) -> None:
    """The tables against the dense mask ``seen`` (sq, sk): per key block the walked query blocks hold
    every one with a visible score and nothing past it; the unmasked ones see all; per key the query
    interval is exactly the visible queries."""
    for kb in range(-(-sk // 128)):
        sub = seen[:, kb * 128 : (kb + 1) * 128]
        m_lo, m_hi, free_lo, free_hi = blocks[kb].tolist()
        for m in range(-(-sq // 64)):
            rows = sub[m * 64 : (m + 1) * 64]
            if rows.any():
                assert m_lo <= m < m_hi, (kb, m, blocks[kb])
            free = free_lo <= m < free_hi
            assert not free or rows.all(), (kb, m, blocks[kb])
            assert free or not rows.all(), ("a fully visible block walked masked", kb, m, blocks[kb])
    q = np.arange(sq)[:, None]
    lo, hi = keys[:, 0].numpy()[None, :], keys[:, 1].numpy()[None, :]
    assert np.array_equal((q >= lo) & (q < hi), seen.numpy())


@pytest.mark.parametrize("sq, sk", [(1, 1), (64, 64), (100, 300), (333, 200), (700, 900), (129, 1000)])
def test_interval_tables_match_the_dense_mask(sq, sk):
    import torch

    g = torch.Generator().manual_seed(sq * 7 + sk)
    done = 0
    while done < 4:
        iv = _random_intervals(g, sq, sk)
        if iv is None:
            continue
        blocks, keys = hopper_bwd.make_interval_tables(iv, sq, sk)
        j = torch.arange(sk)[None, :]
        seen = (j >= iv[0, 0][:, None]) & (j < iv[0, 1][:, None])
        _check_tables(seen, blocks[0], keys[0], sq, sk)
        done += 1


@pytest.mark.parametrize("pattern", ["right", "left", "holes", "none", "all"])
def test_padding_tables_match_the_dense_mask(pattern):
    import torch

    sq, sk = 200, 333
    g = torch.Generator().manual_seed(1)
    row = {
        "right": torch.arange(sk) < 250, "left": torch.arange(sk) >= 77, "holes": torch.rand(sk, generator=g) < 0.7,
        "none": torch.zeros(sk, dtype=torch.bool), "all": torch.ones(sk, dtype=torch.bool),
    }[pattern]  # fmt: skip
    blocks, keys = hopper_bwd.make_padding_tables(row.view(1, 1, 1, sk), sq, sk)
    _check_tables(row[None, :].expand(sq, sk), blocks[0], keys[0], sq, sk)


def test_extra_mask_arguments_are_named_before_any_launch(monkeypatch):
    import torch

    launches = _stand_ins(monkeypatch)
    q = torch.randn(2, 30, 2, 64, dtype=torch.float16)
    k = torch.randn(2, 40, 2, 64, dtype=torch.float16)
    lse = torch.randn(2, 2, 30)
    base = dict(heads_q=2, heads_kv=2, head_dim=64, scale=0.1)
    for change, words in (
        ({"key_padding": torch.ones(2, 1, 1, 40)}, "key_padding: bool"),
        ({"key_padding": torch.ones(3, 1, 1, 40, dtype=torch.bool)}, "key_padding: bool"),
        ({"key_intervals": torch.zeros(2, 2, 31, dtype=torch.int32)}, "key_intervals: int32"),
        ({"key_intervals": torch.zeros(1, 2, 30, dtype=torch.int32),
          "key_padding": torch.ones(1, 1, 1, 40, dtype=torch.bool)}, "one mask"),
        ({"key_padding": torch.ones(1, 1, 1, 40, dtype=torch.bool), "deterministic": True}, "extra mask"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(words)):
            hopper_bwd.backward(q, k, k, q, lse, q, q, k, k, **base, **change)
    assert launches == []
    hopper_bwd.backward(q, k, k, q, lse, q, q, k, k, **base, key_padding=torch.ones(1, 1, 1, 40, dtype=torch.bool))
    (plan,) = hopper_bwd._launches.values()
    assert plan.variant.extra and launches[1][-1][-5:-3] == (0, 0)  # one mask row for the batch: strides 0
    # no causal/window: the causal variant with a right reach no key exceeds (extra_window)
    assert plan.variant.mask == hopper_tiles.MASK_RIGHT and hopper.UNBOUNDED_REACH in plan.sizes


def test_alibi_backward_launches_the_alibi_variant_with_the_slopes(monkeypatch):
    """ALiBi behind the stand-ins: the alibi variant of the causal/window kind, the slopes and their
    (batch, head) strides in floats as the last parameters of the rows pass and the main kernel (per
    head: batch stride 0; a strided per-(batch, head) view: its own strides), the rest as without."""
    import torch

    launches = _stand_ins(monkeypatch)
    b, s, h, hkv, d = 2, 100, 4, 2, 128
    q, out, dout = (torch.randn(b, s, h, d, dtype=torch.float16) for _ in range(3))
    k, v = (torch.randn(b, 150, hkv, d, dtype=torch.float16) for _ in range(2))
    lse = torch.randn(b, h, s)
    grads = [torch.empty_like(t) for t in (q, k, v)]
    per_head = torch.rand(h)
    wide = torch.rand(h, b).T  # (batch, heads) with strides (1, batch)
    for slopes, window, strides in ((per_head, (-1, 0), (0, 1)), (wide, (7, 0), (1, b))):
        launches.clear()
        hopper_bwd.backward(q, k, v, out, lse, dout, *grads, heads_q=h, heads_kv=hkv, head_dim=d, window=window,
                            scale=0.125, alibi_slopes=slopes)  # fmt: skip
        (rows, *_, rows_values), (main, *_, smem, values), _ = launches
        rows.layout.format.pack(*rows_values)
        main.layout.format.pack(*values)
        mask = hopper_tiles.mask_kind(window)
        variant = hopper_bwd._variant(d, "fp16", mask, hopper_bwd.PIPELINED[d], False, False, False, False, True)
        assert smem == variant.launch_smem
        assert rows_values[-3:] == values[-3:] == (slopes.data_ptr(), *strides)
        assert values[25:-3] == (0, 0, 0, 0, 0, 0.0, 0.0, 0, 0, 0, 0)
    assert len(hopper_bwd._launches) == 2


def test_alibi_arguments_are_named_before_any_launch(monkeypatch):
    import torch

    launches = _stand_ins(monkeypatch)
    q = torch.randn(2, 30, 4, 64, dtype=torch.float16)
    k = torch.randn(2, 40, 2, 64, dtype=torch.float16)
    lse = torch.randn(2, 4, 30)
    base = dict(heads_q=4, heads_kv=2, head_dim=64, scale=0.1, window=(-1, 0))
    for change, words in (
        ({"alibi_slopes": torch.rand(4, dtype=torch.float64)}, "alibi_slopes: float32"),
        ({"alibi_slopes": torch.rand(2)}, "alibi_slopes: float32 (4,) or (2, 4)"),
        ({"alibi_slopes": torch.rand(3, 4)}, "alibi_slopes: float32"),
        ({"alibi_slopes": torch.rand(4), "window": (-1, -1)}, "alibi_slopes: alibi with right reach -1"),
        ({"alibi_slopes": torch.rand(4), "window": (3, 1)}, "alibi_slopes: alibi with right reach 1"),
        ({"alibi_slopes": torch.rand(4), "softcap": 5.0}, "alibi with softcap"),
        ({"alibi_slopes": torch.rand(4), "deterministic": True}, "alibi with deterministic"),
        ({"alibi_slopes": torch.rand(4), "key_padding": torch.ones(1, 1, 1, 40, dtype=torch.bool)}, "key padding"),
    ):
        with pytest.raises(ValueError, match=re.escape(words)):
            hopper_bwd.backward(q, k, k, q, lse, q, q, k, k, **{**base, **change})
    assert launches == []


@pytest.mark.parametrize("sq, sk", [(40, 56), (130, 70), (1, 200)])
def test_the_kernels_alibi_split_gives_the_oracles_gradients(sq, sk):
    """ALiBi's arithmetic replayed in float64 with the kernels' split (causal): the rows pass adds
    slope2 (i % 64) to LSE_2, the consumers add slope2 (j - m0 - off) per score (m0 = 64 (i // 64), the
    query block's first row), P^T = exp2(S^T score_log2 + that - LSE_2); against float64 autograd of
    attention with core's bias -slope |i + off - j| (flash.terms). Rows past the sequence: LSE_2 = +inf."""
    import torch

    g = torch.Generator().manual_seed(sq + sk)
    d, scale, slope = 16, 0.3, 0.37
    q, k, v, do = (torch.randn(n, d, generator=g, dtype=torch.float64) for n in (sq, sk, sk, sq))
    off = sk - sq
    i, j = torch.arange(sq, dtype=torch.float64)[:, None], torch.arange(sk, dtype=torch.float64)[None, :]
    seen = j - i - off <= 0
    qa, ka, va = (t.clone().requires_grad_() for t in (q, k, v))
    s = (qa @ ka.T * scale - slope * (i + off - j).abs()).masked_fill(~seen, -math.inf)
    lse = torch.logsumexp(s, -1).detach()
    some = seen.any(-1, keepdim=True)  # rows that see no key: P = 0 (no NaN through softmax)
    out = torch.softmax(torch.where(some, s, 0.0), -1) * some @ va
    exact = torch.autograd.grad(out, (qa, ka, va), do)

    s_pad = -(-sq // 64) * 64
    slope2 = slope * hopper.LOG2E
    rows = torch.arange(s_pad, dtype=torch.float64)
    lse2 = torch.full((s_pad,), math.inf, dtype=torch.float64)
    lse2[:sq] = torch.where(lse.isinf(), math.inf, lse * hopper.LOG2E) + slope2 * (rows[:sq] % 64)
    pad = lambda t: torch.cat([t, torch.zeros(s_pad - sq, d, dtype=t.dtype)])  # noqa: E731
    qp, dop = pad(q), pad(do)
    key_bias = slope2 * (j.T - 64 * (rows[None, :] // 64) - off)  # keys x queries
    visible = (j.T - rows[None, :] - off <= 0) & (rows[None, :] < sq)
    st = (k @ qp.T).masked_fill(~visible, -math.inf)
    pt = torch.exp2(st * scale * hopper.LOG2E + key_bias - lse2[None, :])
    delta = (dop * pad(out.detach())).sum(-1)
    dst = pt * (v @ dop.T - delta[None, :])
    assert torch.isfinite(dst).all()
    got = (scale * dst.T @ k)[:sq], scale * dst @ qp, pt @ dop
    for name, a, b in zip(("dq", "dk", "dv"), got, exact):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-7), name
