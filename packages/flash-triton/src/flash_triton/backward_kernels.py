"""The backward kernels: recomputation from the saved LSE, P is never stored.

Three launches:

* :func:`attention_backward_preprocess_kernel`: ``delta = rowsum(dO * O)`` and the LSE moved to
  the log2 domain (``lse * log2(e)``, with ``-inf`` turned into ``+inf`` so that a row that saw no
  key recomputes ``P = exp2(s - inf) = 0`` instead of NaN).
* :func:`attention_backward_dkdv_kernel` (K/V-stationary): one program owns ``BLOCK_N`` keys of
  one K/V head and walks, for every query head of its GQA group in a fixed order, the query
  blocks that can see those keys; dK and dV accumulate in registers and are written once. With
  ``ATOMIC_DQ`` it also adds each tile's ``dS K`` into a float32 dQ buffer with atomics (fewer
  matrix products, but the summation order then varies run to run).
* :func:`attention_backward_dq_kernel` (Q-stationary): one program owns ``BLOCK_M`` query rows
  and walks their key blocks like the forward; no atomics, so gradients are bit-identical run to
  run (the ``deterministic=True`` path).

Per tile, with ``s`` the scaled (soft-capped) scores in the log2 domain::

    P  = exp2(s - lse2)           dV += P^T dO
    dP = dO V^T                   dS  = P * (dP - delta)   (* (1 - tanh^2) with softcap)
    dK += dS^T Q                  dQ += dS K               (both times the softmax scale)

Dropout (optional) multiplies P and dP by the kept elements' ``1 / (1 - p)``, recomputing the same
hash as the forward.
"""

from __future__ import annotations

import triton
import triton.language as tl

from flash_triton.forward_kernel import load_rows
from flash_triton.runtime import interpreting
from flash_triton.tiles import LOG2E, block_range, dropout_keep, dropout_row_hash, sequence_bounds, tanh, visible

INTERPRETED = interpreting()


@triton.jit
def attention_backward_preprocess_kernel(
    Out,
    DO,
    Lse,
    Delta,
    Lse2,
    CuQ,
    sob,
    sos,
    soh,
    sdob,
    sdos,
    sdoh,
    slb,
    slh,
    sls,
    sbb,
    sbh,
    sbs,
    seqlen_q,
    total_q,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """Grid: (query blocks, heads_q, batch). ``Delta``/``Lse2`` share the strides ``sb*``."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, len_q, _, _ = sequence_bounds(b, CuQ, CuQ, seqlen_q, seqlen_q, total_q, total_q, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= len_q:
        return
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    rows_ok = m0 + offs_m < len_q
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    row64 = (q_start + m0).to(tl.int64)
    o = load_rows(Out + b64 * sob + h64 * soh + row64 * sos + offs_m[:, None] * sos + offs_d[None, :],
                  rows_ok, d_ok, HEAD_DIM, D_PAD, True)  # fmt: skip
    do = load_rows(DO + b64 * sdob + h64 * sdoh + row64 * sdos + offs_m[:, None] * sdos + offs_d[None, :],
                   rows_ok, d_ok, HEAD_DIM, D_PAD, True)  # fmt: skip
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse = tl.load(Lse + b64 * slb + h64 * slh + row64 * sls + offs_m * sls, mask=rows_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    buf = b64 * sbb + h64 * sbh + row64 * sbs + offs_m * sbs
    tl.store(Delta + buf, delta, mask=rows_ok)
    tl.store(Lse2 + buf, lse2, mask=rows_ok)


@triton.jit
def _dkdv_tile(
    dk,
    dv,
    k,
    v,
    start_m,
    zero64,
    q_base,
    do_base,
    l_base,
    d_base,
    dq_base,
    q_desc,
    do_desc,
    q_row0,
    q_col0,
    do_row0,
    do_col0,
    sqs,
    sdos,
    sls,
    sdqs,
    cols,
    offs_m,
    offs_d,
    d_ok,
    len_q,
    len_k,
    offset,
    left,
    right,
    scale,
    scale_log2,
    softcap_scale,
    softcap_log2,
    head_hash,
    drop_threshold,
    drop_scale,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    MASKED: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr,
    TMA: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
):
    """Fold the query block starting at ``start_m`` into the (dK, dV) of the program's keys."""
    rows = start_m + offs_m
    rows_ok = rows < len_q
    row64 = start_m + zero64
    if TMA and not MASKED:
        q = q_desc.load([q_row0 + start_m, q_col0])
        do = do_desc.load([do_row0 + start_m, do_col0])
    else:
        q = load_rows(q_base + row64 * sqs + offs_m[:, None] * sqs + offs_d[None, :], rows_ok, d_ok,
                      HEAD_DIM, D_PAD, MASKED)  # fmt: skip
        do = load_rows(do_base + row64 * sdos + offs_m[:, None] * sdos + offs_d[None, :], rows_ok, d_ok,
                       HEAD_DIM, D_PAD, MASKED)  # fmt: skip
    if MASKED:
        lse2 = tl.load(l_base + rows * sls, mask=rows_ok, other=float("inf"))
        delta = tl.load(d_base + rows * sls, mask=rows_ok, other=0.0)
    else:
        lse2 = tl.load(l_base + rows * sls)
        delta = tl.load(d_base + rows * sls)
    qk_t = tl.dot(k, tl.trans(q))  # (keys, queries)
    if SOFTCAP:
        t = tanh(qk_t * softcap_scale)
        p_t = tl.math.exp2(t * softcap_log2 - lse2[None, :])
    else:
        p_t = tl.math.exp2(qk_t * scale_log2 - lse2[None, :])
    if MASKED:
        seen = visible(rows[None, :], cols[:, None], len_q, len_k, offset, left, right, HAS_LEFT, HAS_RIGHT)
        p_t = tl.where(seen, p_t, 0.0)
    dp_t = tl.dot(v, tl.trans(do))
    if DROPOUT:
        keep = dropout_keep(head_hash, rows[None, :], cols[:, None], drop_threshold)
        dv = tl.dot(tl.where(keep, p_t * drop_scale, 0.0).to(do.dtype), do, dv)
        dp_t = tl.where(keep, dp_t * drop_scale, 0.0)
    else:
        dv = tl.dot(p_t.to(do.dtype), do, dv)
    ds_t = p_t * (dp_t - delta[None, :])
    if SOFTCAP:
        ds_t = ds_t * (1.0 - t * t)
    ds_t = ds_t.to(q.dtype)
    dk = tl.dot(ds_t, q, dk)
    if ATOMIC_DQ:
        dq = tl.dot(tl.trans(ds_t), k) * scale
        dq_ptrs = dq_base + row64 * sdqs + offs_m[:, None] * sdqs + offs_d[None, :]
        tl.atomic_add(dq_ptrs, dq, mask=rows_ok[:, None] & d_ok[None, :], sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "drop_threshold", "left", "right"])
def attention_backward_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    DQacc,
    Lse2,
    Delta,
    CuQ,
    CuK,
    q_desc,
    do_desc,
    sqb,
    sqs,
    sqh,
    skb,
    sks,
    skh,
    svb,
    svs,
    svh,
    sdob,
    sdos,
    sdoh,
    sdkb,
    sdks,
    sdkh,
    sdvb,
    sdvs,
    sdvh,
    sdqb,
    sdqs,
    sdqh,
    slb,
    slh,
    sls,
    seqlen_q,
    seqlen_k,
    total_q,
    total_k,
    group,
    q_rb,
    q_rh,
    q_ch,
    do_rb,
    do_rh,
    do_ch,
    scale,
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
    ATOMIC_DQ: tl.constexpr,
):
    """Grid: (key blocks, heads_kv, batch). ``Lse2``/``Delta`` share the strides ``sl*``."""
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    q_start, len_q, k_start, len_k = sequence_bounds(b, CuQ, CuK, seqlen_q, seqlen_k, total_q, total_k, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= len_k:
        return
    offset = len_k - len_q
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    cols = n0 + offs_n
    cols_ok = cols < len_k

    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    key64 = (k_start + n0).to(tl.int64)
    zero64 = b64 * 0
    q_start64 = zero64 + q_start
    k = load_rows(K + b64 * skb + hk64 * skh + key64 * sks + offs_n[:, None] * sks + offs_d[None, :],
                  cols_ok, d_ok, HEAD_DIM, D_PAD, True)  # fmt: skip
    v = load_rows(V + b64 * svb + hk64 * svh + key64 * svs + offs_n[:, None] * svs + offs_d[None, :],
                  cols_ok, d_ok, HEAD_DIM, D_PAD, True)  # fmt: skip
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)

    last = tl.minimum(n0 + BLOCK_N, len_k) - 1
    # Keys fixed, query blocks walked: the mask seen from the keys (offset negated, reaches swapped).
    start, full_lo, full_hi, end = block_range(n0, last, len_q, -offset, right, left, HAS_RIGHT, HAS_LEFT, BLOCK_M)
    for g in range(group):
        h = hk * group + g
        h64 = h.to(tl.int64)
        q_base = Q + b64 * sqb + h64 * sqh + q_start64 * sqs
        do_base = DO + b64 * sdob + h64 * sdoh + q_start64 * sdos
        l_base = Lse2 + b64 * slb + h64 * slh + q_start64 * sls
        d_base = Delta + b64 * slb + h64 * slh + q_start64 * sls
        dq_base = DQacc + b64 * sdqb + h64 * sdqh + q_start64 * sdqs
        q_row0 = b * q_rb + h * q_rh + q_start
        q_col0 = h * q_ch
        do_row0 = b * do_rb + h * do_rh + q_start
        do_col0 = h * do_ch
        if DROPOUT:  # noqa: SIM108 - a constexpr branch: the kernel without dropout never computes the hash
            head_hash = dropout_row_hash(seed_lo, seed_hi, b, h)
        else:
            head_hash = 0
        for start_m in range(start, tl.minimum(full_lo, end), BLOCK_M):
            dk, dv = _dkdv_tile(
                dk, dv, k, v, start_m, zero64, q_base, do_base, l_base, d_base, dq_base, q_desc, do_desc,
                q_row0, q_col0, do_row0, do_col0, sqs, sdos, sls, sdqs, cols, offs_m, offs_d, d_ok,
                len_q, len_k, offset, left, right, scale, scale_log2, softcap_scale, softcap_log2,
                head_hash, drop_threshold, drop_scale,
                HEAD_DIM, D_PAD, True, HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, TMA, ATOMIC_DQ,
            )  # fmt: skip
        for start_m in range(full_lo, full_hi, BLOCK_M):
            dk, dv = _dkdv_tile(
                dk, dv, k, v, start_m, zero64, q_base, do_base, l_base, d_base, dq_base, q_desc, do_desc,
                q_row0, q_col0, do_row0, do_col0, sqs, sdos, sls, sdqs, cols, offs_m, offs_d, d_ok,
                len_q, len_k, offset, left, right, scale, scale_log2, softcap_scale, softcap_log2,
                head_hash, drop_threshold, drop_scale,
                HEAD_DIM, D_PAD, False, HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, TMA, ATOMIC_DQ,
            )  # fmt: skip
        for start_m in range(tl.maximum(full_lo, full_hi), end, BLOCK_M):
            dk, dv = _dkdv_tile(
                dk, dv, k, v, start_m, zero64, q_base, do_base, l_base, d_base, dq_base, q_desc, do_desc,
                q_row0, q_col0, do_row0, do_col0, sqs, sdos, sls, sdqs, cols, offs_m, offs_d, d_ok,
                len_q, len_k, offset, left, right, scale, scale_log2, softcap_scale, softcap_log2,
                head_hash, drop_threshold, drop_scale,
                HEAD_DIM, D_PAD, True, HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, TMA, ATOMIC_DQ,
            )  # fmt: skip

    dk = dk * scale
    mask = cols_ok[:, None] & d_ok[None, :]
    dk_ptrs = DK + b64 * sdkb + hk64 * sdkh + key64 * sdks + offs_n[:, None] * sdks + offs_d[None, :]
    dv_ptrs = DV + b64 * sdvb + hk64 * sdvh + key64 * sdvs + offs_n[:, None] * sdvs + offs_d[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _dq_tile(
    dq,
    q,
    do,
    lse2,
    delta,
    start_n,
    zero64,
    k_base,
    v_base,
    k_desc,
    v_desc,
    k_row0,
    k_col0,
    v_row0,
    v_col0,
    sks,
    svs,
    rows,
    offs_n,
    offs_d,
    d_ok,
    len_q,
    len_k,
    offset,
    left,
    right,
    scale_log2,
    softcap_scale,
    softcap_log2,
    head_hash,
    drop_threshold,
    drop_scale,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    MASKED: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr,
    TMA: tl.constexpr,
):
    """Fold the key block starting at ``start_n`` into the dQ of the program's query rows."""
    cols = start_n + offs_n
    cols_ok = cols < len_k
    col64 = start_n + zero64
    if TMA and not MASKED:
        k = k_desc.load([k_row0 + start_n, k_col0])
        v = v_desc.load([v_row0 + start_n, v_col0])
    else:
        k = load_rows(k_base + col64 * sks + offs_n[:, None] * sks + offs_d[None, :], cols_ok, d_ok,
                      HEAD_DIM, D_PAD, MASKED)  # fmt: skip
        v = load_rows(v_base + col64 * svs + offs_n[:, None] * svs + offs_d[None, :], cols_ok, d_ok,
                      HEAD_DIM, D_PAD, MASKED)  # fmt: skip
    qk = tl.dot(q, tl.trans(k))
    if SOFTCAP:
        t = tanh(qk * softcap_scale)
        p = tl.math.exp2(t * softcap_log2 - lse2[:, None])
    else:
        p = tl.math.exp2(qk * scale_log2 - lse2[:, None])
    if MASKED:
        seen = visible(rows[:, None], cols[None, :], len_q, len_k, offset, left, right, HAS_LEFT, HAS_RIGHT)
        p = tl.where(seen, p, 0.0)
    dp = tl.dot(do, tl.trans(v))
    if DROPOUT:
        keep = dropout_keep(head_hash, rows[:, None], cols[None, :], drop_threshold)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return tl.dot(ds.to(k.dtype), k, dq)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "drop_threshold", "left", "right"])
def attention_backward_dq_kernel(
    Q,
    K,
    V,
    DO,
    DQ,
    Lse2,
    Delta,
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
    sdob,
    sdos,
    sdoh,
    sdqb,
    sdqs,
    sdqh,
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
    scale,
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
    """Grid: (query blocks, heads_q, batch)."""
    pid_m = tl.program_id(0)
    if REVERSE:
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
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)
    row64 = (q_start + m0).to(tl.int64)
    zero64 = b64 * 0
    k_start64 = zero64 + k_start
    q = load_rows(Q + b64 * sqb + h64 * sqh + row64 * sqs + offs_m[:, None] * sqs + offs_d[None, :],
                  rows_ok, d_ok, HEAD_DIM, D_PAD, True)  # fmt: skip
    do = load_rows(DO + b64 * sdob + h64 * sdoh + row64 * sdos + offs_m[:, None] * sdos + offs_d[None, :],
                   rows_ok, d_ok, HEAD_DIM, D_PAD, True)  # fmt: skip
    l_off = b64 * slb + h64 * slh + row64 * sls + offs_m * sls
    lse2 = tl.load(Lse2 + l_off, mask=rows_ok, other=float("inf"))
    delta = tl.load(Delta + l_off, mask=rows_ok, other=0.0)
    k_base = K + b64 * skb + hk64 * skh + k_start64 * sks
    v_base = V + b64 * svb + hk64 * svh + k_start64 * svs
    k_row0 = b * k_rb + hk * k_rh + k_start
    k_col0 = hk * k_ch
    v_row0 = b * v_rb + hk * v_rh + k_start
    v_col0 = hk * v_ch
    head_hash = 0
    if DROPOUT:
        head_hash = dropout_row_hash(seed_lo, seed_hi, b, h)

    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    last = tl.minimum(m0 + BLOCK_M, len_q) - 1
    start, full_lo, full_hi, end = block_range(m0, last, len_k, offset, left, right, HAS_LEFT, HAS_RIGHT, BLOCK_N)
    for start_n in range(start, tl.minimum(full_lo, end), BLOCK_N):
        dq = _dq_tile(
            dq, q, do, lse2, delta, start_n, zero64, k_base, v_base, k_desc, v_desc, k_row0, k_col0, v_row0, v_col0,
            sks, svs, rows, offs_n, offs_d, d_ok, len_q, len_k, offset, left, right,
            scale_log2, softcap_scale, softcap_log2, head_hash, drop_threshold, drop_scale,
            HEAD_DIM, D_PAD, True, HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, TMA,
        )  # fmt: skip
    for start_n in range(full_lo, full_hi, BLOCK_N):
        dq = _dq_tile(
            dq, q, do, lse2, delta, start_n, zero64, k_base, v_base, k_desc, v_desc, k_row0, k_col0, v_row0, v_col0,
            sks, svs, rows, offs_n, offs_d, d_ok, len_q, len_k, offset, left, right,
            scale_log2, softcap_scale, softcap_log2, head_hash, drop_threshold, drop_scale,
            HEAD_DIM, D_PAD, False, HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, TMA,
        )  # fmt: skip
    for start_n in range(tl.maximum(full_lo, full_hi), end, BLOCK_N):
        dq = _dq_tile(
            dq, q, do, lse2, delta, start_n, zero64, k_base, v_base, k_desc, v_desc, k_row0, k_col0, v_row0, v_col0,
            sks, svs, rows, offs_n, offs_d, d_ok, len_q, len_k, offset, left, right,
            scale_log2, softcap_scale, softcap_log2, head_hash, drop_threshold, drop_scale,
            HEAD_DIM, D_PAD, True, HAS_LEFT, HAS_RIGHT, SOFTCAP, DROPOUT, TMA,
        )  # fmt: skip

    dq = dq * scale
    dq_ptrs = DQ + b64 * sdqb + h64 * sdqh + row64 * sdqs + offs_m[:, None] * sdqs + offs_d[None, :]
    if HEAD_DIM == D_PAD:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=rows_ok[:, None])
    else:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=rows_ok[:, None] & d_ok[None, :])
