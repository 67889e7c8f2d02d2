"""Hopper backward (flash_cuda.hopper_bwd, issue 14), CPU tier: every variant compiles for sm_90a.

Needs only libnvrtc; skipped with the reason when it is missing. For every shipped variant (fixed
length and packed/varlen): ptxas
reports no spill and no stack frame; with a disassembler at hand the SASS shows the five products as
HGMMA (64xBM for S^T and dP^T, 64x64 for dQ, 64xD for dV and dK), TMA and bulk loads, register
reallocation, dQ staged by 8-byte stores and sent by bulk reductions, and no local memory. Also the launch arguments
against the kernel's signature, the declared support, and a layout replay of the dS^T tile.
"""

from __future__ import annotations

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
    assert len(compiled) == structures * len(hopper_bwd.DTYPES) * len(hopper_tiles.MASK_NAMES) * 2  # x varlen
    for variant, (res, _, log) in compiled.items():
        assert res.arch == "sm_90a"
        assert res.stack_frame == 0 and not res.spills, f"{variant.label()}: {res}"
        assert variant.launch_smem <= hopper_variants.MAX_SMEM
        # C7514: a wgmma issued under a run-time condition in the loop serialises every wgmma (walk())
        assert "C7514" not in log and "serialized" not in log, f"{variant.label()}: wgmma serialised\n{log}"
    for d in hopper_bwd.HEAD_DIMS:
        for varlen in (False, True):
            assert hopper_bwd.BwdVariant(d, "bf16", 0, hopper_bwd.PIPELINED[d], varlen) in compiled


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
        assert variant.smem_bytes == 2 * kv + 4 * qt + 4 * ds + 2 * dq + 4 * rows + 8 * 9  # 9 mbarriers


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
    for change, words in (
        ({"capability": (10, 0)}, "sm_90"),
        ({"capability": (8, 0)}, "sm_90"),
        ({"dtype": torch.float8_e4m3fn}, "float16 and bfloat16"),
        ({"head_dim": 192}, "head dims up to 128"),
        ({"varlen": True, "batch": 6, "total_q": big}, "padded"),
        ({"varlen": True, "total_k": hopper.MAX_SEQLEN + 1}, "packed keys"),
        ({"total_q": 0}, "empty"),
        ({"softcap": 30.0}, "softcap"),
        ({"dropout": True}, "dropout"),
        ({"deterministic": True}, "atomic"),
        ({"heads_kv": 3}, "multiple"),
        ({"seqlen_k": 0}, "empty"),
    ):
        reasons = hopper_bwd.problem_reasons(**{**ok, **change})
        assert any(words in r for r in reasons), (change, reasons)


def test_backward_is_declared():
    import torch

    from flash_cuda import backend

    support = backend.CudaBackend.backward_support
    assert support is not None and support.min_capability == (9, 0)
    assert support.dtypes == frozenset({torch.float16, torch.bfloat16})
    assert "varlen" in support.features
    assert {"softcap", "dropout", "deterministic"}.isdisjoint(support.features)


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
    assert rows_values[-3:] == (0, 0, 0)  # fixed length: no cu_seqlens_q
    lse2, delta = rows_values[3:5]
    assert rows_grid == b * h * s_pad // 8 and rows_threads == 256
    assert values[4:9] == (dk.data_ptr(), dv.data_ptr(), values[6], lse2, delta)
    assert values[9:15] == (*dk.stride()[:3], *dv.stride()[:3])
    assert values[15:23] == (s, 150, s_pad, h, h // hkv, d, hopper.UNBOUNDED_REACH, 0)
    assert values[23:25] == (0.125 * hopper.LOG2E, 0.125)
    assert values[25:] == (0, 0, 0, 0)  # fixed length: no cu_seqlens, no packed token counts
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
    assert rows_values[19:] == (cu_q.data_ptr(), 4, tq)
    assert values[15:21] == (130, 300, s_pad, h, h // hkv, d)
    assert values[25:] == (cu_q.data_ptr(), cu_k.data_ptr(), tq, tk)
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
