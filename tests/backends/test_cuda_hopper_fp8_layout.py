"""The fp8 Hopper kernel's data movement, replayed in numpy (CPU tier).

For O += P V with 8-bit operands, the kernel (kernels/hopper_fwd.cuh) packs P from the S accumulator
into the A operand without crossing lanes (``to_operand``); V^T holds the keys in the matching order
(``fp8_key``), written to global memory by the pre-pass (kernels/hopper_fwd_vt.cu) and TMA-loaded.
These tests replay those index maps -- the accumulator and 8-bit A-operand
register layouts of PTX's wgmma, the pre-pass's chunks and varlen columns, the 64/128-byte swizzles
of TMA and of the wgmma descriptors -- for random P and V and check that the product the tensor
cores would form is P V. The formulas are transcribed from the kernels; the GPU tier runs them.
"""

from __future__ import annotations

import numpy as np
import pytest

hopper = pytest.importorskip("flash_cuda.hopper")
VT_CHUNK, vt_chunks, vt_columns = hopper.VT_CHUNK, hopper.vt_chunks, hopper.vt_columns


def swizzled(offset: int, span: int) -> int:
    return offset ^ (((offset >> 7) & (span // 16 - 1)) << 4)


def fp8_key(k: int) -> int:
    h, t, m = k // 16, (k % 16) // 4, k % 4
    return 16 * h + 8 * (m // 2) + 2 * t + m % 2


def a_operand(p: np.ndarray) -> np.ndarray:
    """The 64 x block_n A operand that to_operand packs from the S accumulator holding ``p``: register
    4j + 2h + row of thread (w, l) holds n8 tiles 4j + 2h and 4j + 2h + 1 of its row, columns
    2 (l % 4) + c; PTX's 8-bit A fragment reads register r as row (r % 2), columns 4 (l % 4) +
    16 (r // 2) .. + 3 of k32 step j."""
    block_n = p.shape[1]
    a = np.full(p.shape, -99, dtype=np.int64)
    for w in range(4):
        for lane in range(32):
            rows = (16 * w + lane // 4, 16 * w + lane // 4 + 8)
            for j in range(block_n // 32):
                for h in range(2):
                    for row in range(2):
                        tiles = (4 * j + 2 * h, 4 * j + 2 * h + 1)
                        packed = [p[rows[row], 8 * i + 2 * (lane % 4) + c] for i in tiles for c in range(2)]
                        r = 2 * h + row
                        cols = [32 * j + 16 * (r // 2) + 4 * (lane % 4) + byte for byte in range(4)]
                        a[rows[r % 2], cols] = packed
    assert (a >= 0).all()
    return a


def b_operand(vt_tile: np.ndarray, block_n: int, head_dim: int) -> np.ndarray:
    """wgmma's K-major B (block_n x head_dim) through VtTile's descriptors: k32 step kk reads row n
    (head dim), keys 32kk .. + 31 of the block_n-byte swizzled rows."""
    b = np.zeros((block_n, head_dim), dtype=np.int64)
    for kk in range(block_n // 32):
        for n in range(head_dim):
            for k in range(32):
                b[32 * kk + k, n] = vt_tile[swizzled(n * block_n + 32 * kk + k, block_n)]
    return b


# ------------------------------------------------------------------ the pre-pass (kernels/hopper_fwd_vt.cu)


def vt_sequence_start(k_start: int, sequence: int) -> int:
    return 32 * ((k_start + 31) // 32 + sequence)


def prepass(v: np.ndarray, cu_k: list[int] | None, seqlen_k: int, chunks: int, columns: int) -> np.ndarray:
    """flash_fwd_vt's index arithmetic over (sequence, head, chunk) items: V (batch, keys, heads,
    head_dim) into V^T (batch, heads, head_dim, columns), starting from a buffer of -1 ("NaN")."""
    batch, total_k, heads, head_dim = v.shape
    sequences = batch if cu_k is None else len(cu_k) - 1
    vt = np.full((1 if cu_k else batch, heads, head_dim, columns), -1, dtype=np.int64)
    for item in range(sequences * heads * chunks):
        h, s = item // chunks % heads, item // chunks // heads
        if cu_k is None:
            src, dst, start, length, span = v[s, :, h], vt[s, h], 0, min(seqlen_k, total_k), columns
        else:
            k_start = min(max(cu_k[s], 0), total_k)
            length = min(min(max(cu_k[s + 1], k_start), total_k) - k_start, seqlen_k)
            start = vt_sequence_start(k_start, s)
            end = vt_sequence_start(min(max(cu_k[s + 1], 0), total_k), s + 1) if s + 1 < sequences else columns
            src, dst, span = v[0, k_start:, h], vt[0, h], end - start
        for key0 in range((item % chunks) * VT_CHUNK, span, chunks * VT_CHUNK):
            tile = np.zeros((VT_CHUNK, head_dim), dtype=np.int64)
            for key in range(VT_CHUNK):
                if key0 + key < length:
                    tile[key] = src[key0 + key]
            for part in range(VT_CHUNK // 16):
                if key0 + 16 * part >= span:
                    continue
                for j in range(16 * part, 16 * part + 16):
                    dst[:, start + key0 + j] = tile[32 * (j // 32) + fp8_key(j % 32)]
    return vt


def tma_box(vt: np.ndarray, batch: int, head: int, column: int, block_n: int, d: int) -> np.ndarray:
    """The shared-memory image of one V^T box (D rows of block_n bytes, swizzled by block_n): elements
    outside the tensor arrive as zeros."""
    rows, columns = vt.shape[2:]
    tile = np.zeros(d * block_n, dtype=np.int64)
    for n in range(min(d, rows)):
        for k in range(block_n):
            if column + k < columns:
                tile[swizzled(n * block_n + k, block_n)] = vt[batch, head, n, column + k]
    return tile


@pytest.mark.parametrize(
    ("block_n", "d", "head_dim", "lengths", "varlen"),
    [
        (128, 128, 128, [517, 300], False),
        (64, 256, 240, [200, 1, 77, 513, 0], True),
        (128, 64, 48, [33, 64, 95], True),
        (128, 192, 192, [130], False),
    ],
)
def test_prepass_v_transpose_as_tma_loads_it_multiplies_to_p_v(block_n, d, head_dim, lengths, varlen) -> None:
    """The pre-pass's V^T, TMA-loaded block by block into the layout VtTile describes, against P's
    registers: A B = P V for every key block of every sequence, every V^T column written (zeros past
    the keys: no "NaN" byte reaches a product), blocks from sequence starts that are not multiples of 32."""
    rng = np.random.default_rng(block_n + d + len(lengths))
    heads = 2
    seqlen_k = max(lengths)
    if varlen:
        cu_k = [0, *np.cumsum(lengths).tolist()]
        v = rng.integers(0, 7, size=(1, cu_k[-1], heads, head_dim))
    else:
        cu_k = None
        v = rng.integers(0, 7, size=(len(lengths), seqlen_k, heads, head_dim))
    columns = vt_columns(seqlen_k, v.shape[1], len(lengths), varlen)
    vt = prepass(v, cu_k, seqlen_k, vt_chunks(seqlen_k, varlen), columns)
    assert (vt >= 0).all()  # every column written

    for s, length in enumerate(lengths):
        k_start = cu_k[s] if cu_k else 0
        column0 = vt_sequence_start(k_start, s) if cu_k else 0
        keys = v[0, k_start : k_start + length] if cu_k else v[s, :length]
        for h in range(heads):
            for n in range(-(-length // block_n)):
                tile = tma_box(vt, 0 if cu_k else s, h, column0 + n * block_n, block_n, d)
                block = range(n * block_n, min(length, (n + 1) * block_n))
                p = np.zeros((64, block_n), dtype=np.int64)  # P = 0 past the keys (masked scores)
                p[:, : len(block)] = rng.integers(0, 7, size=(64, len(block)))
                expected = p[:, : len(block)] @ keys[block.start : block.stop, h]
                got = a_operand(p) @ b_operand(tile, block_n, d)
                np.testing.assert_array_equal(got[:, :head_dim], expected)
                assert not got[:, head_dim:].any()  # head dims past head_dim: zeros from TMA


def test_prepass_writes_no_column_twice_and_stays_in_its_rows() -> None:
    """Varlen sequences' V^T columns (vt_sequence_start up to the next start) are disjoint, in order and
    inside the row, whatever the lengths."""
    rng = np.random.default_rng(5)
    for _ in range(200):
        lengths = rng.integers(0, 100, size=rng.integers(1, 8)).tolist()
        cu = [0, *np.cumsum(lengths).tolist()]
        starts = [vt_sequence_start(cu[s], s) for s in range(len(lengths) + 1)]
        columns = vt_columns(max(lengths), cu[-1], len(lengths), varlen=True)
        for s, length in enumerate(lengths):
            assert starts[s] % 32 == 0
            assert starts[s] + 32 * -(-length // 32) <= starts[s + 1] <= columns


def test_fp8_key_is_a_permutation_of_each_step() -> None:
    assert sorted(fp8_key(k) for k in range(32)) == list(range(32))


@pytest.mark.parametrize(("lengths", "varlen"), [([517, 300], False), ([200, 1, 77, 0, 513], True)])
def test_the_gpu_tiers_torch_reference_is_the_replayed_prepass(lengths: list[int], varlen: bool) -> None:
    """scripts/hopper_check.py's vt_reference (torch ops; the GPU tier compares the pre-pass with it
    byte for byte) writes what the replay of the pre-pass writes."""
    torch = pytest.importorskip("torch")
    from tests.backends.hopper_harness import load_script

    hc = load_script("hopper_check")
    rng = np.random.default_rng(len(lengths))
    heads, head_dim, seqlen_k = 3, 48, max(lengths)
    if varlen:
        cu = [0, *np.cumsum(lengths).tolist()]
        v = rng.integers(0, 256, size=(1, cu[-1], heads, head_dim))
        cu_k = torch.tensor(cu, dtype=torch.int32)
    else:
        cu, cu_k = None, None
        v = rng.integers(0, 256, size=(len(lengths), seqlen_k, heads, head_dim))
    columns = vt_columns(seqlen_k, v.shape[1], len(lengths), varlen)
    replay = prepass(v, cu, seqlen_k, vt_chunks(seqlen_k, varlen), columns)
    v8 = torch.tensor(v, dtype=torch.uint8).view(torch.float8_e4m3fn)
    reference = hc.vt_reference(v8, cu_k, seqlen_k, replay.shape).view(torch.uint8)
    np.testing.assert_array_equal(reference.numpy(), replay)
