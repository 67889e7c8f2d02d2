"""Hopper kernel (flash_cuda.hopper), CPU tier: every shipped variant compiles for sm_90a as intended.

Needs only libnvrtc (``pip install flash-cuda[nvrtc]``); skipped with the reason when it is missing.
For every variant the table can launch: ptxas's report shows no spill and no stack frame; with a
disassembler at hand (cuobjdump on PATH or in Triton's wheel), the SASS shows wgmma (HGMMA, fp8
QGMMA), TMA loads (UTMALDG), register reallocation (USETMAXREG, i.e. no warning C7508), no local
memory, and the softmax of a key block still scheduled between the two wgmma waits (the
intra-warpgroup overlap survived ptxas). The same for the fp8 V^T pre-pass. Also checks the table, the
launchers' argument lists against the kernels', and the host-side helpers.
"""

from __future__ import annotations

import ctypes
import re

import pytest

hopper = pytest.importorskip("flash_cuda.hopper")

from flash_cuda import hopper_tiles, hopper_variants, nvrtc, tensor_map  # noqa: E402
from flash_cuda.sources import read_kernel_file  # noqa: E402
from tests.backends.hopper_compile import Compiled, compile_all  # noqa: E402
from tests.backends.hopper_compile import sass as hopper_sass  # noqa: E402
from tests.backends.kernel_signatures import parameter_kinds, parameter_names  # noqa: E402


@pytest.fixture(scope="module")
def compiled() -> dict[hopper_variants.HopperVariant, Compiled]:
    results = compile_all(hopper_variants.shipped_variants(), hopper_variants.source, hopper_variants.KERNEL_NAME)
    print(f"\nNVRTC {nvrtc.version()}:")
    for variant, (res, _, _) in results.items():
        print(f"  {variant.label():34s} {res.registers:3d} regs at entry, smem {variant.launch_smem} B")
    return results


def test_every_shipped_variant_compiles_without_spilling(compiled):
    for variant, (res, _, log) in compiled.items():
        assert res.arch == "sm_90a"
        assert not res.spills and not res.stack_frame, f"{variant.label()}: {res}"
        # __launch_bounds__(threads, 1): the whole register file at entry, before setmaxnreg
        assert res.registers == min(255, 65536 // variant.threads // 8 * 8), variant.label()
        assert "C7508" not in log and "setmaxnreg" not in log.lower(), f"setmaxnreg ignored: {log}"
        assert "serialized" not in log, f"{variant.label()}: ptxas serialised the wgmma pipeline:\n{log}"


def test_sass_has_wgmma_tma_setmaxnreg_and_the_overlap(compiled):
    for variant, (_, cubin, _) in compiled.items():
        sass = hopper_sass(cubin)
        if variant.fp8:  # 8-bit wgmma, both operands K-major
            assert "QGMMA.64x" in sass and "HGMMA" not in sass, f"{variant.label()}: no fp8 wgmma"
            # V^T is TMA-loaded from the pre-pass: no shared-memory stores
            assert not re.search(r"\bSTS\b", sass), f"{variant.label()}: shared stores"
        else:
            assert "HGMMA.64x" in sass and ".tnspB" in sass, (
                f"{variant.label()}: no wgmma (S from smem, P V with N-major V)"
            )
        assert "UTMALDG" in sass, f"{variant.label()}: no TMA loads"
        assert "USETMAXREG.DEALLOC" in sass and "USETMAXREG.TRY_ALLOC" in sass, f"{variant.label()}: no setmaxnreg"
        assert not re.search(r"\b(LDL|STL)\b", sass), f"{variant.label()}: local memory"
        # mask kind 3: a padding mask's bytes (holes) are read a key per lane and shared by ballot; the
        # other kinds read nothing but Q, K and V (TMA) and the scalars
        byte_loads = re.findall(r"LDG\.E\.U8", sass)
        if variant.mask == hopper_tiles.MASK_INTERVALS:
            assert byte_loads and "VOTE.ANY" in sass, f"{variant.label()}: no shared key bytes"
        else:
            assert not byte_loads, f"{variant.label()}: byte loads"
        # In the steady-state loop, the softmax (MUFU.EX2 of BN/2 scores per thread) runs between
        # waiting for S (wait_group 1) and waiting for O += P V (wait_group 0).
        ops = re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x([01])|(MUFU\.EX2)", sass)
        between, inside, best = 0, False, 0
        for depbar, ex2 in ops:
            if depbar == "1":
                inside, between = True, 0
            elif depbar == "0":
                best = max(best, between if inside else 0)
                inside = False
            elif inside and ex2:
                between += 1
        assert best >= variant.block_n // 2, f"{variant.label()}: only {best} exponentials overlap O += P V"


def test_source_is_header_free_and_one_extern_c_kernel():
    variant = hopper_variants.shipped_variants()[0]
    text = hopper_variants.source(variant)
    assert "#include" not in text
    assert text.count('extern "C" __global__') == 1 and hopper_variants.KERNEL_NAME in text
    assert "struct Wgmma<" in text  # the generated instructions went in


def test_table_rows_fit_and_say_where_they_come_from():
    for table, dtypes, head_dims, masks in (
        (hopper_tiles.TABLE, ("bf16", "fp16"), hopper_tiles.SHIPPED_HEAD_DIMS, hopper_tiles.FORWARD_MASK_NAMES),
        (hopper_tiles.FP8_TABLE, hopper_variants.FP8_INPUTS, hopper_tiles.FP8_HEAD_DIMS, hopper_tiles.MASK_NAMES),
    ):
        classes = set()
        for row in table:
            assert row.provenance.startswith(("measured:", "unmeasured:")), row
            assert row.config.order in (*hopper_tiles.ORDERS, "auto")
            for dtype in dtypes:
                variant = hopper_variants.make_variant(row.config, row.head_dim, dtype, row.mask)
                assert variant.launch_smem <= hopper_variants.MAX_SMEM
            if row.max_seqlen_k is None:
                classes.add((row.head_dim, row.mask))
        # every (head dim, mask) has a row for any length
        assert classes == {(d, m) for d in head_dims for m in masks}
    # no dead knobs: each option of the table takes more than one value in it
    assert {row.config.consumers for row in hopper_tiles.TABLE} == {2, 3}
    assert len({row.config.order for row in hopper_tiles.TABLE}) > 1
    assert {row.config.q_stages for row in hopper_tiles.TABLE} == {1, 2}
    assert len({row.config.block_n for row in hopper_tiles.TABLE}) > 1


def test_problem_classes():
    assert [hopper_tiles.compiled_head_dim(d) for d in (8, 64, 72, 96, 128, 136, 192, 200, 256)] == [
        64, 64, 96, 96, 128, 192, 192, 256, 256,
    ]  # fmt: skip
    assert hopper_tiles.mask_kind((-1, -1)) == hopper_tiles.MASK_NONE
    assert hopper_tiles.mask_kind((-1, 0)) == hopper_tiles.MASK_RIGHT
    assert hopper_tiles.mask_kind((-1, 7)) == hopper_tiles.MASK_RIGHT
    assert hopper_tiles.mask_kind((5, -1)) == hopper_tiles.MASK_BOTH
    assert hopper_tiles.config_for(80, (-1, 0)) == hopper_tiles.table_row(96, hopper_tiles.MASK_RIGHT).config
    # rows with key intervals take the one interval kind whatever the window (it applies both edges)
    for window in ((-1, -1), (-1, 0), (5, 3)):
        assert hopper_tiles.mask_kind(window, intervals=True) == hopper_tiles.MASK_INTERVALS
        assert hopper_tiles.config_for(128, window, 8192, intervals=True).order == "blocks"
    with pytest.raises(ValueError, match="intervals: 16-bit"):
        hopper_variants.make_variant(hopper_tiles.HopperConfig(2, 128), 128, "e4m3", hopper_tiles.MASK_INTERVALS)
    # block lists: one kind (no window), 16-bit, tiles of one 128-row block row, power-of-two key blocks
    assert hopper_tiles.mask_kind((-1, -1), lists=True) == hopper_tiles.MASK_LISTS
    for d in hopper_tiles.SHIPPED_HEAD_DIMS:
        config = hopper_tiles.config_for(d, lists=True)
        assert config.block_m == hopper_tiles.BLOCK_SPARSE_ROWS and config.block_n & (config.block_n - 1) == 0
    for config, dtype in ((hopper_tiles.HopperConfig(2, 128), "e4m3"), (hopper_tiles.HopperConfig(3, 128), "bf16"),
                          (hopper_tiles.HopperConfig(2, 96), "bf16")):  # fmt: skip
        with pytest.raises(ValueError, match=r"16-bit|block lists"):
            hopper_variants.make_variant(config, 128, dtype, hopper_tiles.MASK_LISTS)
    short = [row for row in hopper_tiles.TABLE if row.max_seqlen_k is not None]
    for row in short:  # a bucketed row serves short sequences, the catch-all row long ones
        assert hopper_tiles.table_row(row.head_dim, row.mask, row.max_seqlen_k) == row
        assert hopper_tiles.table_row(row.head_dim, row.mask, row.max_seqlen_k + 1) != row
        assert hopper_tiles.table_row(row.head_dim, row.mask).max_seqlen_k is None
    with pytest.raises(ValueError):
        hopper_tiles.compiled_head_dim(264)


def test_launch_parameters_match_the_kernel_signature():
    text = hopper_variants.source(hopper_variants.shipped_variants()[0])
    assert parameter_kinds(text, hopper_variants.KERNEL_NAME) == list(hopper.PARAMETERS.kinds)
    vt = read_kernel_file(hopper.VT_FILE)
    assert parameter_kinds(vt, hopper.VT_KERNEL) == list(hopper.VT_PARAMETERS.kinds)
    layout = hopper.PARAMETERS
    assert layout.offsets[:4] == [0, 128, 256, 384] and layout.size == sum(layout.sizes) == 676
    names = parameter_names(text, hopper_variants.KERNEL_NAME)
    scalars = hopper.scalar_arguments(
        (2 * 100 * 4 * 64, 4 * 64, 64), (4 * 100, 100, 1), varlen=False, seqlen_q=100, seqlen_k=100, total_q=100,
        total_k=100, heads_q=4, heads_kv=2, head_dim=64, m_blocks=1, tiles=8, window=(-1, 0), order="blocks",
        softcap=0.0, scale=0.125,
    )  # fmt: skip
    assert len(scalars) == names.index("q_descale") - names.index("o_sb")
    values = dict(zip(names[names.index("o_sb") :], scalars))
    assert values["win_right"] == 0 and values["win_left"] == hopper.UNBOUNDED_REACH
    assert values["group"] == 2 and values["o_ss"] == 4 * 64 and values["l_sh"] == 100
    assert values["score_log2"] == pytest.approx(0.125 * hopper.LOG2E) and values["softcap_in"] == 0
    assert values["blocks_outer"] == 1


def test_packed_launch_points_each_parameter_at_its_value(monkeypatch):
    """PackedLaunch (behind a fake driver): a 1-D grid, and a parameter array whose entries point at the
    packed values in order, of the kinds' sizes; the driver's sizes are checked where it reports them."""
    seen: dict = {}

    class FakeDriver:
        def cuLaunchKernel(self, function, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
            seen.update(function=function, grid=(gx, gy, gz), block=(bx, by, bz), smem=smem, stream=stream)
            kinds = (ctypes.c_uint64, ctypes.c_int32, ctypes.c_float, ctypes.c_int64)
            seen["values"] = [ctypes.cast(params[i], ctypes.POINTER(k)).contents.value for i, k in enumerate(kinds)]
            seen["map"] = ctypes.string_at(params[4], 128)
            return 0

        def cuFuncGetParamInfo(self, function, index, offset, size):
            # never past the last one: the driver's error for it is what compute-sanitizer reports
            assert index < 5, f"asked for parameter {index} of a kernel with 5"
            size._obj.value = (8, 4, 4, 8, 128)[index]
            return 0

    monkeypatch.setattr(tensor_map, "driver", FakeDriver)
    packed = tensor_map.PackedLaunch(1234, tensor_map.ParamLayout(("ptr", "i32", "f32", "i64", "map")))
    packed(77, 384, 5000, 99, (2**40 + 3, -5, 0.5, -(2**40), b"\7" * 128))
    assert seen == {
        "function": 1234, "grid": (77, 1, 1), "block": (384, 1, 1), "smem": 5000, "stream": 99,
        "values": [2**40 + 3, -5, 0.5, -(2**40)], "map": b"\7" * 128,
    }  # fmt: skip
    with pytest.raises(tensor_map.DriverError, match="parameter 1 is 4 bytes; the launch packs 8"):
        tensor_map.PackedLaunch(1234, tensor_map.ParamLayout(("ptr", "i64", "f32", "i64", "map")))


def test_auto_order_follows_the_balance_of_the_heads_order():
    pytest.importorskip("torch")
    auto = hopper_tiles.HopperConfig(2, 128, "auto")
    common = {"grid": 132, "varlen": False}
    # 64 query blocks x 32 (batch, head) pairs, causal: heads order balances to 0.97 -> heads
    assert (
        hopper_tiles.tile_order(auto, m_blocks=64, pairs=32, seqlen_q=8192, seqlen_k=8192, window=(-1, 0), **common)
        == "heads"
    )
    # 64 x 16 pairs: heads order would balance to 0.66 -> longest work first
    assert (
        hopper_tiles.tile_order(auto, m_blocks=64, pairs=16, seqlen_q=8192, seqlen_k=8192, window=(-1, 0), **common)
        == "blocks"
    )
    # no mask: every tile costs the same, heads order
    assert (
        hopper_tiles.tile_order(auto, m_blocks=64, pairs=16, seqlen_q=8192, seqlen_k=8192, window=(-1, -1), **common)
        == "heads"
    )
    assert hopper_tiles.tile_order(auto, m_blocks=64, pairs=16, seqlen_q=8192, seqlen_k=8192, window=(-1, 0),
                                   grid=132, varlen=True) == "blocks"  # fmt: skip
    assert hopper_tiles.tile_order(hopper_tiles.HopperConfig(2, 128, "heads"), m_blocks=64, pairs=16,
                                   seqlen_q=8192, seqlen_k=8192, window=(-1, 0), **common) == "heads"  # fmt: skip


def test_tensor_map_limits_and_strides():
    torch = pytest.importorskip("torch")
    assert tensor_map.tensor_map_problems(1024, [128, 4, 100, 2], [256, 1024, 102400], [64, 1, 128, 1], 128, 2) == []
    assert tensor_map.tensor_map_problems(8, [128, 4, 100, 2], [256, 1024, 102400], [64, 1, 128, 1], 128, 2)
    assert tensor_map.tensor_map_problems(1024, [128, 4, 100, 2], [250, 1024, 102400], [64, 1, 128, 1], 128, 2)
    assert tensor_map.tensor_map_problems(1024, [128, 4, 100, 2], [256, 1024, 102400], [128, 1, 128, 1], 128, 2)
    # heads-outer (bhsd) view, and size-1 dimensions get an acceptable stride
    t = torch.zeros(2, 4, 100, 64, dtype=torch.bfloat16).transpose(1, 2)
    assert hopper._map_strides(t) == [100 * 64 * 2, 64 * 2, 4 * 100 * 64 * 2]
    one = torch.zeros(1, 7, 1, 64, dtype=torch.bfloat16)
    assert all(s % 16 == 0 and s > 0 for s in hopper._map_strides(one))


def test_unsupported_reasons_without_a_gpu():
    torch = pytest.importorskip("torch")
    q = torch.zeros(1, 8, 2, 64, dtype=torch.bfloat16)
    lse = torch.zeros(1, 2, 8)
    reasons = hopper.unsupported_reasons(
        q, q, q, q, lse, seqlen_q=8, seqlen_k=8, heads_q=2, heads_kv=2, head_dim=64, scale=0.125
    )
    assert reasons and "CUDA" in reasons[0]


def _fake_driver(monkeypatch, torch) -> tuple[list, list]:
    """hopper.forward's module loading, tensor maps and launches replaced by stand-ins for CPU tensors:
    the launches (packed, device, grid, threads, smem, values) and the encoded maps (address, dtype,
    dims, strides, box, swizzle) it made. The forward kernel's function is 7, the pre-pass's 8."""
    from flash_cuda import modules

    launches: list = []
    maps: list = []

    def encode(address, dtype, dims, strides, box, swizzle):
        maps.append((address, dtype, tuple(dims), tuple(strides), tuple(box), swizzle))
        return tensor_map.TensorMap()

    functions = lambda key, device, build, names, smem=0: (8,) if names == (hopper.VT_KERNEL,) else (7,)  # noqa: E731
    monkeypatch.setattr(modules, "functions", functions)
    monkeypatch.setattr(tensor_map, "encode_tiled", encode)
    monkeypatch.setattr(tensor_map, "driver", object)  # no cuFuncGetParamInfo: nothing to check
    monkeypatch.setattr(hopper, "on_current_stream", lambda packed, *rest: launches.append((packed, *rest)))
    monkeypatch.setattr(hopper, "_sm_count", lambda device: 132)
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: 0)
    monkeypatch.setattr(hopper, "_launches", {})
    hopper.map_bytes.cache_clear()
    return launches, maps


def test_forward_launches_what_the_kernel_takes(monkeypatch):
    """hopper.forward on CPU tensors behind stand-ins (module loading, tensor maps, the launch): one launch
    with the layout's parameters, the call's own output and LSE, the problem's sizes; decided once per
    problem (a second call with other outputs reuses the launch and passes the new addresses)."""
    torch = pytest.importorskip("torch")
    launches, _ = _fake_driver(monkeypatch, torch)
    b, s, h, hkv, d = 2, 300, 4, 2, 128
    q = torch.randn(b, s, h, d, dtype=torch.bfloat16)
    k, v = (torch.randn(b, 500, hkv, d, dtype=torch.bfloat16) for _ in range(2))
    outputs = [(torch.empty_like(q), torch.empty(b, h, s)) for _ in range(2)]
    for out, lse in outputs:
        hopper.forward(q, k, v, out, lse, seqlen_q=s, seqlen_k=500, heads_q=h, heads_kv=hkv, head_dim=d,
                       window=(-1, 0), scale=0.125)  # fmt: skip
    assert len(hopper._launches) == 1 and len(launches) == 2
    names = parameter_names(hopper_variants.source(hopper_variants.shipped_variants()[0]), hopper_variants.KERNEL_NAME)
    config = hopper_tiles.config_for(d, (-1, 0), 500)
    for (out, lse), (packed, _, grid, threads, smem, values) in zip(outputs, launches):
        variant = hopper_variants.make_variant(config, d, "bf16", hopper_tiles.MASK_RIGHT)
        assert (threads, smem) == (variant.threads, variant.launch_smem)
        assert packed.function == 7 and len(values) == len(names)
        packed.layout.format.pack(*values)  # every value fits its kind
        named = dict(zip(names, values))
        assert (named["o"], named["lse"], named["cu_q"], named["cu_k"]) == (out.data_ptr(), lse.data_ptr(), 0, 0)
        assert (named["o_ss"], named["l_sh"], named["seqlen_k"], named["group"]) == (h * d, s, 500, 2)
        assert named["win_right"] == 0 and named["score_log2"] == pytest.approx(0.125 * hopper.LOG2E)
        m_blocks = -(-s // config.block_m)
        assert named["tiles"] == m_blocks * h * b and grid == min(named["tiles"], 132)
        assert all(len(values[i]) == 128 for i in range(3))


@pytest.mark.parametrize("varlen", [False, True])
def test_fp8_forward_launches_the_prepass_then_the_kernel_on_its_v_transpose(monkeypatch, varlen):
    """fp8: the V^T pre-pass first (its parameters as the kernel declares them, V's strides and sizes,
    V^T's row of whole 32-key steps), then the forward, whose V map is V^T at the pre-pass's output:
    boxes of block_n keys by the compiled head dim, swizzled by block_n bytes."""
    torch = pytest.importorskip("torch")
    launches, maps = _fake_driver(monkeypatch, torch)
    hq, hkv, d, sk = 4, 2, 120, 500
    lengths = [200, 13, 287]
    b, sq = (1, sum(lengths)) if varlen else (2, 300)
    cu = torch.tensor([0, 200, 213, 500], dtype=torch.int32) if varlen else None
    q = torch.randn(b, sq, hq, d).to(torch.float8_e4m3fn)
    k, v = (torch.randn(b, sk, hkv, d).to(torch.float8_e4m3fn) for _ in range(2))
    out, lse = torch.empty(b, sq, hq, d, dtype=torch.bfloat16), torch.empty(b, hq, sq)
    common = {"seqlen_q": 287 if varlen else sq, "seqlen_k": 287 if varlen else sk, "heads_q": hq, "heads_kv": hkv,
              "head_dim": d, "window": (-1, 0), "scale": 0.1, "cu_seqlens_q": cu, "cu_seqlens_k": cu}  # fmt: skip
    hopper.forward(q, k, v, out, lse, **common)
    (pre, _, grid, threads, smem, values), (main, *_, main_values) = launches
    assert (pre.function, main.function, threads, smem) == (8, 7, hopper.VT_THREADS, 0)
    pre.layout.format.pack(*values)  # every value fits its kind
    named = dict(zip(parameter_names(read_kernel_file(hopper.VT_FILE), hopper.VT_KERNEL), values))
    columns = 32 * (-(-sk // 32) + 3) if varlen else 512
    chunks = hopper.vt_chunks(common["seqlen_k"], varlen)
    assert (named["v"], named["cu_k"]) == (v.data_ptr(), cu.data_ptr() if varlen else 0)
    assert (named["v_ss"], named["v_sh"], named["vt_row"], named["total_k"]) == (hkv * d, d, columns, sk)
    sequences = 3 if varlen else b
    assert (named["sequences"], named["chunks"], named["items"]) == (sequences, chunks, sequences * hkv * chunks)
    assert grid == min(named["items"], hopper.VT_BLOCKS_PER_SM * 132)
    variant = hopper_variants.make_variant(hopper_tiles.config_for(d, (-1, 0), common["seqlen_k"], True), d, "e4m3",
                                           hopper_tiles.MASK_RIGHT)  # fmt: skip
    vt_batches = 1 if varlen else b
    assert (named["vt"], "u8", (columns, d, hkv, vt_batches), (columns, d * columns, hkv * d * columns),
            (variant.block_n, 128, 1, 1), variant.block_n) in maps  # fmt: skip
    assert launches[1][4] == variant.launch_smem and len(main_values) == len(hopper.PARAMETERS.kinds)


def test_prepass_compiles_without_spilling_and_moves_16_bytes_at_a_time():
    reason = nvrtc.unavailable_reason()
    if reason:
        pytest.skip(reason)
    compiled = nvrtc.compile_cubin(hopper.vt_source(), (*hopper.vt_options(), "-Xptxas=-v"))
    (res,) = nvrtc.parse_ptxas(compiled.log).values()
    assert res.function == hopper.VT_KERNEL and res.arch == "sm_90a"
    assert not res.spills and not res.stack_frame, res
    sass = hopper_sass(compiled.cubin)
    assert re.search(r"LDG\.E\.128", sass) and re.search(r"STG\.E\.128", sass) and "STS.128" in sass, sass


def test_fp8_problem_reasons_bound_the_v_transpose():
    common = {"capability": (9, 0), "head_dim": 128, "heads_q": 1, "heads_kv": 1, "seqlen_q": 1, "seqlen_k": 1,
              "total_q": 1, "total_k": 1, "scale": 0.1}  # fmt: skip
    torch = pytest.importorskip("torch")
    assert hopper.problem_reasons(dtype=torch.float8_e4m3fn, batch=2**25 - 1, **common) == []
    reasons = hopper.problem_reasons(dtype=torch.float8_e4m3fn, batch=2**25, **common)
    assert len(reasons) == 1 and "V^T" in reasons[0]
    assert hopper.problem_reasons(dtype=torch.bfloat16, batch=2**25, **common) == []


@pytest.mark.parametrize("source", ["key_intervals", "key_padding"])
def test_forward_passes_the_intervals_of_mask_kind_3(monkeypatch, source):
    """hopper.forward with a block mask's key_intervals (one interval per row, batch broadcast) or a
    key-padding mask (key_runs: one per sequence, and the mask's bytes): the interval variant, its table
    row's tiles, the tile order, the tensors' addresses and the strides the kernel reads them with
    (Params::iv...)."""
    torch = pytest.importorskip("torch")
    launches, _ = _fake_driver(monkeypatch, torch)
    b, s, h, d = 2, 300, 4, 128
    q, k, v = (torch.randn(b, s, h, d, dtype=torch.bfloat16) for _ in range(3))
    out, lse = torch.empty_like(q), torch.empty(b, h, s)
    if source == "key_intervals":
        lo = torch.arange(s, dtype=torch.int32) // 50 * 50  # documents of 50 tokens, causal
        tensors = {"key_intervals": torch.stack((lo, torch.arange(1, s + 1, dtype=torch.int32)))[None]}
        expected = (0, 0, 0, 1, s, s)  # iv_sb (broadcast), keys_sb, keys_sk, iv_ss, iv_hi, iv_full
    else:
        mask = (torch.arange(s) < torch.tensor([[s], [7]]))[:, None, None, :]
        mask[0, ..., 3] = False  # a hole
        tensors = {"key_runs": flash_key_runs(mask, s), "key_mask": mask}
        expected = (4, s, 1, 0, 1, 3)
    hopper.forward(q, k, v, out, lse, seqlen_q=s, seqlen_k=s, heads_q=h, heads_kv=h, head_dim=d, scale=0.1,
                   **tensors)  # fmt: skip
    ((packed, _, _, threads, smem, values),) = launches
    packed.layout.format.pack(*values)  # every value fits its kind
    named = dict(zip(parameter_names(hopper_variants.source(hopper_variants.shipped_variants()[0]),
                                     hopper_variants.KERNEL_NAME), values))  # fmt: skip
    row = hopper_tiles.table_row(d, hopper_tiles.MASK_INTERVALS)
    variant = hopper_variants.make_variant(row.config, d, "bf16", hopper_tiles.MASK_INTERVALS)
    assert (threads, smem) == (variant.threads, variant.launch_smem)
    # block masks' intervals walk longest first (the table's order); a padding mask head by head
    assert named["tiles"] == -(-s // variant.block_m) * h * b
    assert named["blocks_outer"] == (1 if source == "key_intervals" else 0)
    iv = tensors.get("key_intervals", tensors.get("key_runs"))
    assert (named["iv"], named["keys"]) == (
        iv.data_ptr(),
        tensors["key_mask"].data_ptr() if "key_mask" in tensors else 0,
    )
    assert tuple(named[n] for n in ("iv_sb", "keys_sb", "keys_sk", "iv_ss", "iv_hi", "iv_full")) == expected
    assert (named["win_left"], named["win_right"]) == (hopper.UNBOUNDED_REACH,) * 2  # no window: both unbounded


def flash_key_runs(mask, seqlen_k):
    from flash.masking import key_runs

    return key_runs(mask, seqlen_k)


def test_interval_reasons():
    torch = pytest.importorskip("torch")
    q = torch.zeros(2, 8, 2, 64, dtype=torch.bfloat16)
    runs, mask = torch.zeros(2, 4, dtype=torch.int32), torch.ones(2, 1, 1, 8, dtype=torch.bool)
    assert hopper._interval_reasons(q, None, runs, mask, varlen=False) == []
    assert "cu_seqlens" in hopper._interval_reasons(q, None, runs, mask, varlen=True)[0]
    assert "key_runs with key_mask" in hopper._interval_reasons(q, None, runs, None, varlen=False)[0]
    assert "int32" in hopper._interval_reasons(q, runs.long(), None, None, varlen=False)[0]
    assert "bool" in hopper._interval_reasons(q, None, runs, mask.int(), varlen=False)[0]
    common = {"capability": (9, 0), "head_dim": 128, "heads_q": 1, "heads_kv": 1, "seqlen_q": 1, "seqlen_k": 1,
              "total_q": 1, "total_k": 1, "scale": 0.1, "batch": 1, "intervals": True}  # fmt: skip
    assert hopper.problem_reasons(dtype=torch.bfloat16, **common) == []
    assert "fp8 inputs with a key-padding mask" in hopper.problem_reasons(dtype=torch.float8_e5m2, **common)[0]


def _block_pattern_lists(torch, batch, heads, s, block_size):
    """A block-sparse mask's forward lists: block_pattern's blocks (batch, heads None: broadcast), made per
    sequence and head by shifting the query blocks so that they differ."""
    from flash import BlockMask
    from flash.testing.mod_examples import block_pattern

    def mod(b, h, q, kv):
        return block_pattern(None, None, q + 128 * (b + h), kv)

    mask = BlockMask.from_mask_mod(mod, batch=batch, heads=heads, seqlen_q=s, seqlen_k=s, block_size=block_size)
    return mask.lists


@pytest.mark.parametrize(("batch", "heads", "d"), [(None, None, 128), (2, 4, 256)])
def test_forward_passes_the_block_lists(monkeypatch, batch, heads, d):
    """hopper.forward with a block-sparse mask's lists (broadcast, or one per sequence and head): the block-list
    variant of its table row, the lists' addresses and the strides the kernel reads them with (Params::bl...):
    list rows per sequence and head, indices per list, kernel blocks per mask block (d256: 64-key blocks, two
    per 128-key mask block)."""
    torch = pytest.importorskip("torch")
    launches, _ = _fake_driver(monkeypatch, torch)
    b, s, h = 2, 300, 4
    q, k, v = (torch.randn(b, s, h, d, dtype=torch.bfloat16) for _ in range(3))
    out, lse = torch.empty_like(q), torch.empty(b, h, s)
    lists = _block_pattern_lists(torch, batch, heads, s, (128, 128))
    tensors = {"kv_counts": lists.kv_counts, "kv_indices": lists.kv_indices, "block_size": (128, 128)}
    hopper.forward(q, k, v, out, lse, seqlen_q=s, seqlen_k=s, heads_q=h, heads_kv=h, head_dim=d, scale=0.1,
                   **tensors)  # fmt: skip
    ((packed, _, _, threads, smem, values),) = launches
    packed.layout.format.pack(*values)
    named = dict(zip(parameter_names(hopper_variants.source(hopper_variants.shipped_variants()[0]),
                                     hopper_variants.KERNEL_NAME), values))  # fmt: skip
    row = hopper_tiles.table_row(d, hopper_tiles.MASK_LISTS)
    variant = hopper_variants.make_variant(row.config, d, "bf16", hopper_tiles.MASK_LISTS)
    assert (threads, smem) == (variant.threads, variant.launch_smem) and variant.block_m == 128
    assert (named["bl_counts"], named["bl_index"]) == (lists.kv_counts.data_ptr(), lists.kv_indices.data_ptr())
    n_q, n_k = 3, 3
    strides = (0, 0) if batch is None else (h * n_q, n_q)
    shift = {128: 0, 256: 1}[d]
    assert (named["bl_sb"], named["bl_sh"], named["bl_nk"], named["bl_shift"]) == (*strides, n_k, shift)
    assert named["tiles"] == n_q * h * b and named["iv"] == 0


def test_block_list_reasons():
    """What hopper.forward says of block lists it cannot read and block sizes it cannot tile."""
    torch = pytest.importorskip("torch")
    q = torch.zeros(2, 300, 4, 128, dtype=torch.bfloat16)
    lists = _block_pattern_lists(torch, None, None, 300, (128, 128))
    shape = (2, 4, 300, 300)
    good = (lists.kv_counts, lists.kv_indices, (128, 128))
    assert hopper._list_reasons(q, good, shape, varlen=False) == []
    assert hopper._list_reasons(q, (None, None, None), shape, varlen=False) == []
    assert "together" in hopper._list_reasons(q, (*good[:2], None), shape, varlen=False)[0]
    assert "without cu_seqlens" in hopper._list_reasons(q, good, shape, varlen=True)[0]
    assert "kv_counts (batch|1" in hopper._list_reasons(q, good, (2, 4, 500, 300), varlen=False)[0]
    assert "int32" in hopper._list_reasons(q, (good[0].long(), good[1], good[2]), shape, varlen=False)[0]
    common = {"capability": (9, 0), "heads_q": 1, "heads_kv": 1, "seqlen_q": 1, "seqlen_k": 1, "total_q": 1,
              "total_k": 1, "scale": 0.1, "batch": 1}  # fmt: skip
    for d, block_size, why in ((128, (128, 128), None), (256, (128, 64), None), (128, (128, 64), "128x64 blocks"),
                               (64, (64, 128), "64x128 blocks"), (128, (256, 256), "256x256 blocks")):  # fmt: skip
        found = hopper.problem_reasons(dtype=torch.bfloat16, head_dim=d, block_size=block_size, **common)
        assert found == [] if why is None else why in found[0], (d, block_size, found)
    found = hopper.problem_reasons(dtype=torch.float8_e4m3fn, head_dim=128, block_size=(128, 128), window=(-1, 0),
                                   **common)  # fmt: skip
    assert "fp8 inputs with a block-sparse mask" in found[0] and "causal or a window" in found[1]


@pytest.mark.parametrize("block_n", [128, 64])
def test_block_list_walk_replays_the_mask(block_n):
    """A replay of the kernel's walk (make_tile's counts, key_block's steps) over the lists as list_scalars
    lays them out: each tile's kernel blocks, partial steps first, cover exactly the key blocks its rows see,
    once each, and only partial steps reach past seqlen_k (the tail mask)."""
    torch = pytest.importorskip("torch")
    b, h, s = 2, 3, 300
    lists = _block_pattern_lists(torch, b, h, s, (128, 128))
    counts, index = lists.kv_counts.flatten().tolist(), lists.kv_indices.flatten().tolist()
    sb, sh, nk, shift = hopper.list_scalars(lists.kv_counts, lists.kv_indices, 128, block_n)
    from flash.testing.mod_examples import block_pattern

    idx = torch.arange(s)
    for batch in range(b):
        for head in range(h):
            seen = block_pattern(None, None, idx[:, None] + 128 * (batch + head), idx[None, :])
            for m in range(-(-s // 128)):
                row = batch * sb + head * sh + m
                partial_steps = counts[2 * row] << shift
                steps = partial_steps + (counts[2 * row + 1] << shift)
                walked = []
                for j in range(steps):
                    kind = int(j >= partial_steps)
                    k = j - (partial_steps if kind else 0)
                    n = (index[(2 * row + kind) * nk + (k >> shift)] << shift) + (k & ((1 << shift) - 1))
                    assert kind == 0 or (n + 1) * block_n <= s, "a full step past seqlen_k"
                    walked.append(n)
                keys = seen[128 * m : 128 * (m + 1)].any(dim=0)
                expect = {n for n in range(-(-s // block_n)) if keys[n * block_n : (n + 1) * block_n].any()}
                past_end = {n for n in walked if n * block_n >= s}  # the second half of a tail mask block
                assert len(walked) == len(set(walked)) and set(walked) - past_end == expect, (batch, head, m)
