"""The forward kernel: one pass over K/V per query tile, online softmax in base 2, O and LSE written once.

One program owns ``BLOCK_M`` query rows of one query head of one sequence. It keeps the rows'
running maximum ``m`` and sum ``l`` (both in the log2 domain of the scaled scores: the softmax
scale times log2(e) is folded into one multiply-add before ``exp2``) and a float32 accumulator,
walks the key blocks that :func:`flash_triton.tiles.block_range` says are not hidden, and
applies the mask only on the partial blocks. Rows that see no key end with ``l = 0``: their output
is 0 and their LSE ``-inf``.

GQA/MQA: the program reads the K/V head ``h // group`` in place (K/V are never repeated).
Head dims that are not powers of two are padded to ``D_PAD`` in registers with masked loads
and stores. With ``TMA`` the fully visible key blocks come through tensor descriptors (Hopper's
bulk tensor copies); partial blocks always use masked pointer loads, so a descriptor never
reads rows of another sequence into a result.
"""

from __future__ import annotations

import triton
import triton.language as tl

from flash_triton.runtime import interpreting
from flash_triton.tiles import (
    LN2,
    block_range,
    dropout_keep,
    dropout_row_hash,
    sequence_bounds,
    tanh,
    visible,
    visible_dot,
)

INTERPRETED = interpreting()


@triton.jit
def load_rows(ptrs, rows_ok, d_ok, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ROW_MASK: tl.constexpr):
    """Load a (rows, D_PAD) tile, masking padding rows (``ROW_MASK``) and padding head-dim columns."""
    if ROW_MASK:
        if HEAD_DIM == D_PAD:
            tile = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    elif HEAD_DIM == D_PAD:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return tile


@triton.jit
def load_kv(
    desc, base, row0, col0, start_n, zero64, stride, cols, len_k, offs_n, offs_d, d_ok,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """The (BLOCK_N, D_PAD) K or V tile at ``start_n``: a descriptor copy for a fully visible block with TMA,
    else pointer loads (rows past ``len_k`` masked in partial blocks)."""
    if TMA and not MASKED:
        tile = desc.load([row0 + start_n, col0])
    else:
        ptrs = base + (start_n + zero64) * stride + offs_n[:, None] * stride + offs_d[None, :]
        tile = load_rows(ptrs, cols < len_k, d_ok, HEAD_DIM, D_PAD, MASKED)
    return tile


@triton.jit
def _softmax(
    qk, m_i, l_i, rows, cols, len_q, len_k, offset, left, right, scale_log2, softcap_scale, softcap_log2,
    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    """Online-softmax update for one tile of raw scores ``qk``: (p, new max, new sum, rescale factor).

    Everything is in the log2 domain of the scaled scores. Without softcap the scale is applied
    inside the ``exp2`` argument (one multiply-add per score).
    """
    if SOFTCAP:
        qk = tanh(qk * softcap_scale) * softcap_log2
        if MASKED:
            seen = visible(rows[:, None], cols[None, :], len_q, len_k, offset, left, right, HAS_LEFT, HAS_RIGHT)
            qk = tl.where(seen, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = m_new
        if MASKED:  # a row that has seen no key yet keeps m = -inf: shift by 0 so exp2 gives 0, not NaN
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_use[:, None])
    else:
        if MASKED:
            seen = visible(rows[:, None], cols[None, :], len_q, len_k, offset, left, right, HAS_LEFT, HAS_RIGHT)
            qk = tl.where(seen, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
        m_use = m_new
        if MASKED:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk * scale_log2 - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, m_new, l_i, alpha


@triton.jit
def _forward_tile(
    acc, m_i, l_i, q, k_desc, v_desc, start_n, zero64, k_base, v_base, k_row0, k_col0, v_row0, v_col0, sks, svs,
    rows, offs_n, offs_d, d_ok, len_q, len_k, offset, left, right, scale_log2, softcap_scale, softcap_log2,
    head_hash, drop_threshold,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """Fold the key block starting at ``start_n`` into the running (acc, m, l) of the query rows."""
    cols = start_n + offs_n
    k = load_kv(k_desc, k_base, k_row0, k_col0, start_n, zero64, sks, cols, len_k, offs_n, offs_d, d_ok,
                HEAD_DIM, D_PAD, MASKED, TMA)  # fmt: skip
    qk = tl.dot(q, tl.trans(k))
    p, m_i, l_i, alpha = _softmax(qk, m_i, l_i, rows, cols, len_q, len_k, offset, left, right, scale_log2,
                                  softcap_scale, softcap_log2, MASKED, HAS_LEFT, HAS_RIGHT, SOFTCAP)  # fmt: skip
    acc = acc * alpha[:, None]
    if DROPOUT:
        p = tl.where(dropout_keep(head_hash, rows[:, None], cols[None, :], drop_threshold), p, 0.0)
    v = load_kv(v_desc, v_base, v_row0, v_col0, start_n, zero64, svs, cols, len_k, offs_n, offs_d, d_ok,
                HEAD_DIM, D_PAD, MASKED, TMA)  # fmt: skip
    if MASKED:  # keys some rows do not see: their values must not reach those rows, not even as NaN
        seen = visible(rows[:, None], cols[None, :], len_q, len_k, offset, left, right, HAS_LEFT, HAS_RIGHT)
        acc = visible_dot(p, v, seen, acc)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "drop_threshold", "left", "right"])
def attention_forward_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    CuQ,
    CuK,
    k_desc,
    v_desc,
    sqb,
    sqs,
    sqh,
    skb,
    sks,
    skh,
    svb,
    svs,
    svh,
    sob,
    sos,
    soh,
    slb,
    slh,
    sls,
    seqlen_q,
    seqlen_k,
    total_q,
    total_k,
    group,
    k_rb,
    k_rh,
    k_ch,
    v_rb,
    v_rh,
    v_ch,
    scale_log2,
    softcap_scale,
    softcap_log2,
    left,
    right,
    seed_lo,
    seed_hi,
    drop_threshold,
    drop_scale,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr,
    TMA: tl.constexpr,
    REVERSE: tl.constexpr,
):
    """Grid: (query blocks, heads_q, batch). Strides are in elements; batch strides are 0 for varlen."""
    pid_m = tl.program_id(0)
    if REVERSE:  # masked problems: the longest rows first, so the short ones fill the tail
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    b = tl.program_id(2)
    hk = h // group
    q_start, len_q, k_start, len_k = sequence_bounds(b, CuQ, CuK, seqlen_q, seqlen_k, total_q, total_k, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= len_q:
        return
    offset = len_k - len_q

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    rows = m0 + offs_m
    rows_ok = rows < len_q

    b64 = b.to(tl.int64)
    zero64 = b64 * 0  # loop counters are plain ints in the interpreter: widen them by adding this
    q_base = Q + b64 * sqb + h.to(tl.int64) * sqh + (q_start + m0).to(tl.int64) * sqs
    k_base = K + b64 * skb + hk.to(tl.int64) * skh + (zero64 + k_start) * sks
    v_base = V + b64 * svb + hk.to(tl.int64) * svh + (zero64 + k_start) * svs
    k_row0 = b * k_rb + hk * k_rh + k_start
    k_col0 = hk * k_ch
    v_row0 = b * v_rb + hk * v_rh + k_start
    v_col0 = hk * v_ch

    q = load_rows(q_base + offs_m[:, None] * sqs + offs_d[None, :], rows_ok, d_ok, HEAD_DIM, D_PAD, True)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    head_hash = 0
    if DROPOUT:
        head_hash = dropout_row_hash(seed_lo, seed_hi, b, h)

    last = tl.minimum(m0 + BLOCK_M, len_q) - 1
    start, full_lo, full_hi, end = block_range(m0, last, len_k, offset, left, right, HAS_LEFT, HAS_RIGHT, BLOCK_N)

    for start_n in range(start, tl.minimum(full_lo, end), BLOCK_N):
        acc, m_i, l_i = _forward_tile(
            acc, m_i, l_i, q, k_desc, v_desc, start_n, zero64, k_base, v_base, k_row0, k_col0, v_row0, v_col0,
            sks, svs, rows, offs_n, offs_d, d_ok, len_q, len_k, offset, left, right,
            scale_log2, softcap_scale, softcap_log2, head_hash, drop_threshold,
            HEAD_DIM, D_PAD, True, HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, TMA,
        )  # fmt: skip
    for start_n in range(full_lo, full_hi, BLOCK_N):
        acc, m_i, l_i = _forward_tile(
            acc, m_i, l_i, q, k_desc, v_desc, start_n, zero64, k_base, v_base, k_row0, k_col0, v_row0, v_col0,
            sks, svs, rows, offs_n, offs_d, d_ok, len_q, len_k, offset, left, right,
            scale_log2, softcap_scale, softcap_log2, head_hash, drop_threshold,
            HEAD_DIM, D_PAD, False, HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, TMA,
        )  # fmt: skip
    for start_n in range(tl.maximum(full_lo, full_hi), end, BLOCK_N):
        acc, m_i, l_i = _forward_tile(
            acc, m_i, l_i, q, k_desc, v_desc, start_n, zero64, k_base, v_base, k_row0, k_col0, v_row0, v_col0,
            sks, svs, rows, offs_n, offs_d, d_ok, len_q, len_k, offset, left, right,
            scale_log2, softcap_scale, softcap_log2, head_hash, drop_threshold,
            HEAD_DIM, D_PAD, True, HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, TMA,
        )  # fmt: skip

    # l = 0 only for a row that saw no key (output 0, LSE -inf); a NaN score makes l NaN and the
    # row NaN, as in the oracle, so test for exactly 0 rather than for l > 0.
    empty = l_i == 0.0
    inv = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    if DROPOUT:
        inv = inv * drop_scale
    out = acc * inv[:, None]
    o_base = Out + b64 * sob + h.to(tl.int64) * soh + (q_start + m0).to(tl.int64) * sos
    o_ptrs = o_base + offs_m[:, None] * sos + offs_d[None, :]
    if HEAD_DIM == D_PAD:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=rows_ok[:, None])
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=rows_ok[:, None] & d_ok[None, :])
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    l_base = Lse + b64 * slb + h.to(tl.int64) * slh + (q_start + m0).to(tl.int64) * sls
    tl.store(l_base + offs_m * sls, lse, mask=rows_ok)
