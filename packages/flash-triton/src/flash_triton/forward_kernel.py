"""The forward kernel: one pass over K/V per query tile, online softmax in base 2, O and LSE written once.

One program owns ``BLOCK_M`` query rows of one query head of one sequence. It keeps the rows'
running maximum ``m`` and sum ``l`` (both in the log2 domain of the scaled scores: the softmax
scale times log2(e) is folded into one multiply-add before ``exp2``) and a float32 accumulator,
and walks the key blocks that are not hidden (:func:`flash_triton.tiles.walk`): the three runs of
:func:`flash_triton.tiles.block_range`, or a block list. Each block is one :func:`forward_tile`,
whose scores come from :func:`flash_triton.tiles.score_tile`; masks apply only to partial blocks.
Rows that see no key end with ``l = 0``: their output is 0 and their LSE ``-inf``.

GQA/MQA: the program reads the K/V head ``h // group`` in place (K/V are never repeated).
Head dims that are not powers of two are padded to ``D_PAD`` in registers with masked loads
and stores. With ``TMA`` the fully visible key blocks come through tensor descriptors (Hopper's
bulk tensor copies); partial blocks always use masked pointer loads, so a descriptor never
reads rows of another sequence into a result.

Tuples (see :mod:`flash_triton.tiles` for ``seq``, ``win`` and ``terms``): a K or V source is
``(desc, base, row0, col0, stride, zero64)``: its descriptor and descriptor coordinates of the
sequence's first key, its pointer to that key and token stride; ``drop = (head_hash, threshold)``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from flash_triton.runtime import interpreting
from flash_triton.tiles import (
    LN2,
    LOG2E,
    block_list,
    block_range,
    clip_to_key_runs,
    dropout_keep,
    dropout_row_hash,
    fold_sink,
    guarded_dot,
    head_terms,
    score_tile,
    sequence_bounds,
    visible_dot,
    walk,
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
def load_block(src, start, length, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
               MASKED: tl.constexpr, TMA: tl.constexpr):  # fmt: skip
    """The (BLOCK, D_PAD) tile of ``src`` (a source tuple) at token ``start``: a descriptor copy for a
    fully visible block with TMA, else pointer loads (tokens past ``length`` masked in partial blocks)."""
    desc, base, row0, col0, stride, zero64 = src
    if TMA and not MASKED:
        tile = desc.load([row0 + start, col0])
    else:
        offs = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, D_PAD)
        ptrs = base + (start + zero64) * stride + offs[:, None] * stride + offs_d[None, :]
        tile = load_rows(ptrs, start + offs < length, offs_d < HEAD_DIM, HEAD_DIM, D_PAD, MASKED)
    return tile


@triton.jit
def forward_tile(
    carry, start_n, ctx,
    MASKED: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, TMA: tl.constexpr,
    DROPOUT: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, TERMS: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK: tl.constexpr, SCORE_MOD: tl.constexpr,
    SCORE_MOD_GRAD: tl.constexpr, MASK_MOD: tl.constexpr, GUARD: tl.constexpr,
):  # fmt: skip
    """Fold the key block at ``start_n`` into ``carry = (acc, m, l)`` of the query rows.

    ``ctx = (q, k_src, v_src, rows, seq, win, terms, drop)``. ``GUARD``: how a masked tile keeps a hidden
    key's NaN or inf value from the rows: 1 checks the tile (:func:`flash_triton.tiles.visible_dot`), 2
    always takes the guarded product (:func:`flash_triton.tiles.guarded_dot`), 0 not at all, when the
    launch knows V holds none (the tile's V is then a plain operand, pipelined like a full tile's).
    """
    acc, m_i, l_i = carry
    q, k_src, v_src, rows, seq, win, terms, drop = ctx
    len_k = seq[3]
    cols = start_n + tl.arange(0, BLOCK_N)
    k = load_block(k_src, start_n, len_k, BLOCK_N, HEAD_DIM, D_PAD, MASKED, TMA)
    s, seen, _, _ = score_tile(tl.dot(q, tl.trans(k)), rows[:, None], cols[None, :], seq, win, terms, MASKED, False,
                               HAS_LEFT, HAS_RIGHT, TERMS, SOFTCAP, ALIBI, MASK, SCORE_MOD, None, MASK_MOD)  # fmt: skip
    # Online softmax in the log2 domain; without terms the scale folds into exp2's multiply-add.
    m_new = tl.maximum(m_i, tl.max(s, 1)) if TERMS else tl.maximum(m_i, tl.max(s, 1) * terms[0])
    m_use = m_new
    if MASKED:  # a row that has seen no key yet keeps m = -inf: shift by 0 so exp2 gives 0, not NaN
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_use[:, None]) if TERMS else tl.math.exp2(s * terms[0] - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DROPOUT:
        p = tl.where(dropout_keep(drop[0], rows[:, None], cols[None, :], drop[1]), p, 0.0)
    v = load_block(v_src, start_n, len_k, BLOCK_N, HEAD_DIM, D_PAD, MASKED, TMA)
    if v.dtype.is_fp8():  # fp8: Q K^T on the fp8 tensor cores; P stays bf16 (3 mantissa bits would
        v = v.to(tl.bfloat16)  # round every weight), so V is widened in registers for P V
    # Keys some rows do not see: their values must not reach those rows, not even as NaN.
    if MASKED and GUARD == 1:
        acc = visible_dot(p, v, seen, acc)
    elif MASKED and GUARD == 2:
        acc = guarded_dot(p, v, seen, acc)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def forward_epilogue(
    acc, m_i, l_i, Out, Lse, o_base, l_base, o_stride, l_stride, rows_ok, drop_scale,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, DROPOUT: tl.constexpr,
):  # fmt: skip
    """Normalise and store the rows' output and LSE.

    Terms of the softmax denominator that are not keys (an attention sink's logit, say) belong
    here: add ``exp2(logit2 - m)`` to ``l`` after the walk, before normalising.
    """
    # l = 0 only for a row that saw no key (output 0, LSE -inf); a NaN score makes l NaN and the
    # row NaN, as in the oracle, so test for exactly 0 rather than for l > 0.
    empty = l_i == 0.0
    inv = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    if DROPOUT:
        inv = inv * drop_scale
    out = acc * inv[:, None]
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    o_ptrs = o_base + offs_m[:, None] * o_stride + offs_d[None, :]
    if HEAD_DIM == D_PAD:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=rows_ok[:, None])
    else:
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=rows_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    tl.store(l_base + offs_m * l_stride, lse, mask=rows_ok)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "drop_threshold", "left", "right"])
def attention_forward_kernel(
    Q, K, V, Out, Lse, CuQ, CuK, k_desc, v_desc, Mask, Alibi, Counts, Indices, Runs, Sinks, QD, KD, VD, VFinite,
    q_str, k_str, v_str, o_str, l_str, m_str, a_str, c_str, i_str, r_str, d_str,
    seqlen_q, seqlen_k, total_q, total_k, group, k_map, v_map,
    scale_log2, softcap_scale, softcap_log2, left, right, seed_lo, seed_hi, drop_threshold, drop_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr, TMA: tl.constexpr, REVERSE: tl.constexpr, TERMS: tl.constexpr, ALIBI: tl.constexpr,
    MASK: tl.constexpr, SCORE_MOD: tl.constexpr, MASK_MOD: tl.constexpr, SPARSE: tl.constexpr,
    SPARSE_FIXED: tl.constexpr, SPARSE_WALK: tl.constexpr, ELEMENTWISE: tl.constexpr, KEY_RUNS: tl.constexpr,
    SINKS: tl.constexpr, DESCALE: tl.constexpr, V_CHECKED: tl.constexpr, TILE_GUARD: tl.constexpr,
):  # fmt: skip
    """Grid: (query blocks, heads_q, batch). Strides are in elements, as (batch, token, head) tuples
    (``*_str``; batch 0 for varlen), the mask's as (batch, head, query, key), ALiBi's (batch, head),
    the block lists' as (batch, head, row[, list length]); ``*_map`` are descriptor (rb, rh, ch).
    ``KEY_RUNS``: ``Runs`` holds a key-padding mask's visible keys per sequence (batch stride ``r_str``).
    ``DESCALE`` (fp8 inputs): ``QD``, ``KD``, ``VD`` hold the descale factors, ``d_str`` their (batch,
    head) strides, q's then k's then v's (0 for one factor per tensor).
    ``V_CHECKED``: ``VFinite`` says (nonzero) that V holds no NaN or inf: masked tiles skip the guard;
    otherwise they guard as ``TILE_GUARD`` says (see :func:`forward_tile`)."""
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
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    rows = m0 + offs_m
    rows_ok = rows < len_q

    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    zero64 = b64 * 0  # loop counters are plain ints in the interpreter: widen them by adding this
    k_src = (k_desc, K + b64 * k_str[0] + hk.to(tl.int64) * k_str[2] + (zero64 + k_start) * k_str[1],
             b * k_map[0] + hk * k_map[1] + k_start, hk * k_map[2], k_str[1], zero64)  # fmt: skip
    v_src = (v_desc, V + b64 * v_str[0] + hk.to(tl.int64) * v_str[2] + (zero64 + k_start) * v_str[1],
             b * v_map[0] + hk * v_map[1] + k_start, hk * v_map[2], v_str[1], zero64)  # fmt: skip
    q_base = Q + b64 * q_str[0] + h64 * q_str[2] + (q_start + m0).to(tl.int64) * q_str[1]
    q = load_rows(q_base + offs_m[:, None] * q_str[1] + offs_d[None, :], rows_ok, offs_d < HEAD_DIM, HEAD_DIM, D_PAD,
                  True)  # fmt: skip

    seq = (b, h, len_q, len_k, len_k - len_q)
    if DESCALE:  # (q * dq) . (k * dk) = dq * dk * (q . k): once per program, on the score scale
        qk_descale = tl.load(QD + b * d_str[0] + h * d_str[1]) * tl.load(KD + b * d_str[2] + hk * d_str[3])
        scale_log2 = scale_log2 * qk_descale
        softcap_scale = softcap_scale * qk_descale
    terms = head_terms(Mask, Alibi, m_str, a_str, b, h, scale_log2, softcap_scale, softcap_log2, ALIBI)
    head_hash = 0
    if DROPOUT:
        head_hash = dropout_row_hash(seed_lo, seed_hi, b, h)
    lists = (0, 0, Indices, Indices)
    if SPARSE:
        lists = block_list(Counts, Indices, b, h, m0 // SPARSE_FIXED, c_str, i_str)

    win = (left, right)
    bounds = block_range(m0, tl.minimum(m0 + BLOCK_M, len_q) - 1, len_k, len_k - len_q, left, right, HAS_LEFT,
                         HAS_RIGHT, BLOCK_N)  # fmt: skip
    if KEY_RUNS:
        bounds = clip_to_key_runs(bounds, Runs + b * r_str, BLOCK_N)
    carry = (tl.zeros([BLOCK_M, D_PAD], tl.float32), tl.full([BLOCK_M], float("-inf"), tl.float32),
             tl.zeros([BLOCK_M], tl.float32))  # fmt: skip
    ctx = (q, k_src, v_src, rows, seq, win, terms, (head_hash, drop_threshold))
    finite = False
    if V_CHECKED:
        finite = tl.load(VFinite) != 0
    if finite:  # one branch per program: each walk's loops stay free of it
        acc, m_i, l_i = walk(forward_tile, carry, ctx, bounds, lists, BLOCK_N, SPARSE_WALK, SPARSE, ELEMENTWISE,
                             HEAD_DIM, D_PAD, TMA, DROPOUT, HAS_LEFT, HAS_RIGHT, TERMS, SOFTCAP, ALIBI, MASK,
                             SCORE_MOD, None, MASK_MOD, 0, True)  # fmt: skip
    else:
        acc, m_i, l_i = walk(forward_tile, carry, ctx, bounds, lists, BLOCK_N, SPARSE_WALK, SPARSE, ELEMENTWISE,
                             HEAD_DIM, D_PAD, TMA, DROPOUT, HAS_LEFT, HAS_RIGHT, TERMS, SOFTCAP, ALIBI, MASK,
                             SCORE_MOD, None, MASK_MOD, TILE_GUARD, True)  # fmt: skip

    if DESCALE:  # P (v * dv) = dv * (P v)
        acc = acc * tl.load(VD + b * d_str[4] + hk * d_str[5])
    if SINKS:  # the head's sink logit joins the denominator with no value; the LSE includes it
        acc, m_i, l_i = fold_sink(acc, m_i, l_i, tl.load(Sinks + h) * LOG2E)
    o_base = Out + b64 * o_str[0] + h64 * o_str[2] + (q_start + m0).to(tl.int64) * o_str[1]
    l_base = Lse + b64 * l_str[0] + h64 * l_str[1] + (q_start + m0).to(tl.int64) * l_str[2]
    forward_epilogue(acc, m_i, l_i, Out, Lse, o_base, l_base, o_str[1], l_str[2], rows_ok, drop_scale, BLOCK_M,
                     HEAD_DIM, D_PAD, DROPOUT)  # fmt: skip
