"""The fp8 Hopper kernel's data movement, replayed in numpy (CPU tier).

For O += P V with 8-bit operands, the kernel (kernels/hopper_fwd.cuh) packs P from the S accumulator
into the A operand without crossing lanes (``to_operand``) and has its transposer warps write V^T
with the keys in the matching order (``fp8_key``, ``transpose_v``). This test replays those index
maps -- the accumulator and 8-bit A-operand register layouts of PTX's wgmma, the 64/128-byte
swizzles of TMA and of the wgmma descriptors -- for random P and V and checks that the product the
tensor cores would form is P V. The formulas are transcribed from the kernel; the GPU tier runs the
kernel itself.
"""

from __future__ import annotations

import numpy as np
import pytest


def swizzled(offset: int, span: int) -> int:
    return offset ^ (((offset >> 7) & (span // 16 - 1)) << 4)


def fp8_key(k: int) -> int:
    h, t, m = k // 16, (k % 16) // 4, k % 4
    return 16 * h + 8 * (m // 2) + 2 * t + m % 2


@pytest.mark.parametrize(("block_n", "head_dim"), [(128, 128), (128, 64), (64, 256), (128, 192)])
def test_p_registers_and_v_transpose_multiply_to_p_v(block_n: int, head_dim: int) -> None:
    rng = np.random.default_rng(block_n + head_dim)
    p = rng.integers(0, 7, size=(64, block_n))  # small integers: exact products
    v = rng.integers(0, 7, size=(block_n, head_dim))

    # S accumulator -> A operand registers (to_operand): register 4j + 2h + row of thread (w, l)
    # holds n8 tiles 4j + 2h and 4j + 2h + 1 of its row, columns 2 (l % 4) + c.
    a = np.full((64, block_n), -99)
    for w in range(4):
        for lane in range(32):
            rows = (16 * w + lane // 4, 16 * w + lane // 4 + 8)
            for j in range(block_n // 32):
                for h in range(2):
                    for row in range(2):
                        tiles = (4 * j + 2 * h, 4 * j + 2 * h + 1)
                        packed = [p[rows[row], 8 * i + 2 * (lane % 4) + c] for i in tiles for c in range(2)]
                        # PTX's 8-bit A fragment: register r holds row (r % 2) and columns
                        # 4 (lane % 4) + 16 (r // 2) .. + 3 of the k32 step
                        r = 2 * h + row
                        cols = [32 * j + 16 * (r // 2) + 4 * (lane % 4) + byte for byte in range(4)]
                        a[rows[r % 2], cols] = packed
    assert (a >= 0).all()

    # V as TMA leaves it (slabs of `span`-byte rows, swizzled), transposed by transpose_v
    span = 128 if head_dim % 128 == 0 else 64
    slab_bytes = block_n * span
    raw = np.zeros(block_n * head_dim, dtype=np.int64)
    for key in range(block_n):
        for col in range(head_dim):
            raw[(col // span) * slab_bytes + swizzled(key * span + col % span, span)] = v[key, col]
    vt = np.full(head_dim * block_n, -99, dtype=np.int64)
    steps, tasks = block_n // 32, (block_n // 32) * (head_dim // 16)
    for task in range(tasks):
        for lane in range(32):
            a_, b_ = lane % 8, lane // 8
            key0, col = 32 * (task % steps), 16 * (task // steps) + 4 * b_
            words = [
                [raw[(col // span) * slab_bytes + swizzled(k * span + (col + e) % span, span)] for e in range(4)]
                for k in (key0 + fp8_key(4 * a_ + i) for i in range(4))
            ]
            for e in range(4):  # out[e] byte i = in[i] byte e
                for i in range(4):
                    vt[swizzled((col + e) * block_n + key0 + 4 * a_ + i, block_n)] = words[i][e]
    assert (vt >= 0).all()  # every byte of V^T written

    # wgmma's K-major B through the descriptor of step kk: row n (head dim), keys 32kk .. + 31
    b = np.zeros((block_n, head_dim), dtype=np.int64)
    for kk in range(steps):
        for n in range(head_dim):
            for k in range(32):
                b[32 * kk + k, n] = vt[swizzled(n * block_n + 32 * kk + k, block_n)]
    np.testing.assert_array_equal(a @ b, p @ v)


def test_fp8_key_is_a_permutation_of_each_step() -> None:
    assert sorted(fp8_key(k) for k in range(32)) == list(range(32))
