"""In-kernel logic shared by the forward and backward kernels: sequence bounds, which tiles a mask
hides, the mask of a partial tile, softcap and the dropout hash.

The mask is :mod:`flash.masking`'s: query row ``i`` of a sequence with ``len_q`` queries and ``len_k``
keys sees key ``j`` iff ``i + off - left <= j <= i + off + right`` with ``off = len_k - len_q``; a side
is present only when its ``HAS_LEFT``/``HAS_RIGHT`` flag is set (causal is ``right = 0``).

Sink tokens ride in the left reach: its high 32 bits hold their count ``n`` (see
:func:`flash_triton.launch.pack_left`), so the kernels keep passing two ints. The first ``n`` keys
are exempt from the left bound; :func:`visible` and :func:`block_range` unpack it.

A kernel that holds a block of rows fixed and walks the blocks of the other axis asks
:func:`block_range` which blocks to visit. The answer splits them in three runs::

    [start, min(full_lo, end))            partial: compute, then mask
    [full_lo, full_hi)                    fully visible: no mask at all
    [max(full_lo, full_hi), end)          partial

and every block outside ``[start, end)`` is hidden for every row of the fixed block, so it is
never loaded or computed. The same function serves the transposed walk of the dK/dV kernel
(keys fixed, query blocks walked): a key ``j`` is seen by queries ``i`` with
``j - off - right <= i <= j - off + left``, the same form with ``off -> -off`` and the two
reaches swapped.

A key-padding ``attn_mask`` (one row for all queries) clips those runs to the sequence's visible
keys (:func:`clip_to_key_runs`, :func:`key_block_runs`): no block list, the walk stays the dense one.

With a block list (a :class:`flash.BlockMask`, or the summary of a dense boolean ``attn_mask``)
the walk visits the listed partial blocks, then the listed full ones; :func:`window_tile` still
classifies each against causal/window, so the two masks combine.

:func:`score_tile` is the one place where a tile's scores get their terms (softcap, ALiBi, an
additive mask, ``score_mod``) and its masks (window, dense boolean mask, ``mask_mod``), in the
order of :mod:`flash.terms`; the forward and both backward kernels call it, so the three passes
cannot disagree. The values it needs travel as tuples:

* ``seq = (b, h, len_q, len_k, offset)``: the sequence, query head and lengths;
* ``win = (left, right)``: the window reach (used where ``HAS_LEFT``/``HAS_RIGHT``);
* ``terms = (scale_log2, softcap_scale, softcap_log2, slope_log2, mask_ptr, mask_si, mask_sj)``:
  the softmax scale, softcap factors, the head's ALiBi slope times log2(e), and the dense mask of
  this (sequence, head) with its query and key strides.

Imported only by the kernel modules, after ``TRITON_INTERPRET`` is settled (see :mod:`flash_triton.runtime`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from flash_triton.runtime import interpreting

#: The mode the functions below were decorated in (see :func:`flash_triton.runtime.kernels`).
INTERPRETED = interpreting()

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def sequence_bounds(b, CuQ, CuK, seqlen_q, seqlen_k, total_q, total_k, VARLEN: tl.constexpr):
    """(q_start, len_q, k_start, len_k) of sequence ``b``.

    Varlen offsets are clamped into ``[0, total]`` and made non-decreasing, so nothing outside
    the packed tensors is ever addressed whatever ``cu_seqlens`` hold.
    """
    if VARLEN:
        q0 = tl.load(CuQ + b)
        q1 = tl.load(CuQ + b + 1)
        k0 = tl.load(CuK + b)
        k1 = tl.load(CuK + b + 1)
        q0 = tl.minimum(tl.maximum(q0, 0), total_q)
        q1 = tl.minimum(tl.maximum(q1, q0), total_q)
        k0 = tl.minimum(tl.maximum(k0, 0), total_k)
        k1 = tl.minimum(tl.maximum(k1, k0), total_k)
        return q0, q1 - q0, k0, k1 - k0
    else:
        return 0, seqlen_q, 0, seqlen_k


@triton.jit
def split_reach(packed):
    """(reach, sink tokens) of a reach whose high 32 bits carry a sink-token count (0 for none)."""
    wide = packed.to(tl.int64)
    return (wide & 0xFFFFFFFF).to(tl.int32), (wide >> 32).to(tl.int32)


@triton.jit
def block_range(
    first, last, length, offset, left, right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK: tl.constexpr
):
    """Blocks of the walked axis (``[0, length)``) seen by fixed rows ``first..last`` (inclusive, valid).

    Returns ``(start, full_lo, full_hi, end)``; see the module docstring for the three runs.
    Every value is non-negative, so integer division rounds the same way on the GPU and in the
    interpreter. Sink tokens in the left reach start the walk at 0 (the keys between them and the
    window are walked masked); in the right reach (the transposed walk, where they sit in the
    fixed block) they extend it to the end: every later query sees them.
    """
    if HAS_LEFT:
        left, sinks_lo = split_reach(left)
        lo_first = tl.minimum(tl.maximum(first + offset - left, 0), length)
        lo_last = tl.minimum(tl.maximum(last + offset - left, 0), length)
        lo_first = tl.where(sinks_lo > 0, 0, lo_first)
    else:  # tensors, not constants: the loop bounds stay scalars of one kind (the interpreter needs it)
        lo_first = first * 0
        lo_last = first * 0
    if HAS_RIGHT:
        right, sinks_hi = split_reach(right)
        hi_first = tl.minimum(tl.maximum(first + offset + right + 1, 0), length)
        hi_last = tl.minimum(tl.maximum(last + offset + right + 1, 0), length)
        hi_last = tl.where(first < sinks_hi, length, hi_last)
    else:
        hi_first = first * 0 + length
        hi_last = first * 0 + length
    start = (lo_first // BLOCK) * BLOCK
    full_lo = ((lo_last + BLOCK - 1) // BLOCK) * BLOCK
    full_hi = (hi_first // BLOCK) * BLOCK
    return start, full_lo, full_hi, hi_last


@triton.jit
def clip_to_key_runs(bounds, runs, BLOCK: tl.constexpr):
    """``bounds`` (:func:`block_range`'s runs of a walk over key blocks) within a key-padding mask's
    ``runs = (lo, hi, full_lo, full_hi)`` pointer (:func:`flash_triton.mask_args.key_runs`).

    Both are intervals, so their intersection is one: blocks before ``lo`` or from ``hi`` on are not
    walked, and a block is unmasked only if it is fully visible for both.
    """
    start, full_lo, full_hi, end = bounds
    lo = tl.load(runs)
    hi = tl.load(runs + 1)
    start = tl.maximum(start, (lo // BLOCK) * BLOCK)
    end = tl.minimum(end, hi)
    full_lo = tl.maximum(full_lo, ((tl.load(runs + 2) + BLOCK - 1) // BLOCK) * BLOCK)
    full_hi = tl.minimum(full_hi, (tl.load(runs + 3) // BLOCK) * BLOCK)
    return start, full_lo, full_hi, end


@triton.jit
def key_block_runs(bounds, runs, first, last):
    """``bounds`` (:func:`block_range`'s runs of a walk over query blocks, keys ``first..last`` fixed)
    under a key-padding mask's ``runs`` pointer: nothing to walk if no key of the block is visible,
    every block masked unless all of them are."""
    start, full_lo, full_hi, end = bounds
    hidden = (last < tl.load(runs)) | (first >= tl.load(runs + 1))
    full = (first >= tl.load(runs + 2)) & (last < tl.load(runs + 3))
    end = tl.where(hidden, start, end)
    return start, tl.where(full, full_lo, end), tl.where(full, full_hi, end), end


@triton.jit
def visible(rows, cols, len_q, len_k, offset, left, right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """True where query ``rows`` sees key ``cols`` (broadcast shapes); padding rows/cols are hidden."""
    seen = (rows < len_q) & (cols < len_k)
    if HAS_LEFT:
        reach, sinks = split_reach(left)
        seen = seen & ((cols >= rows + offset - reach) | (cols < sinks))
    if HAS_RIGHT:
        seen = seen & (cols <= rows + offset + right)
    return seen


@triton.jit
def fold_sink(acc, m_i, l_i, sink):
    """Fold a sink logit (log2 domain of the scaled scores) into running (acc, m, l): one more term of
    the denominator, with no value, so the LSE includes it. A row that saw no key ends with output 0
    and LSE equal to the sink's logit."""
    m_top = tl.maximum(m_i, sink)
    m_shift = tl.where(m_top == float("-inf"), 0.0, m_top)
    alpha = tl.math.exp2(m_i - m_shift)
    return acc * alpha[:, None], m_top, l_i * alpha + tl.math.exp2(sink - m_shift)


@triton.jit
def window_tile(start, BLOCK: tl.constexpr, bounds):
    """(visited, fully visible) for the walked block at ``start`` against ``bounds = block_range(...)``."""
    lo, full_lo, full_hi, end = bounds
    visit = (start < end) & (start + BLOCK > lo)
    full = (start >= full_lo) & (start + BLOCK <= full_hi)
    return visit, full


@triton.jit
def walk(
    TILE: tl.constexpr, carry, ctx, bounds, lists,
    BLOCK: tl.constexpr, SPARSE_BLOCK: tl.constexpr, SPARSE: tl.constexpr, ELEMENTWISE: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, TMA: tl.constexpr, DROPOUT: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, TERMS: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, MASK: tl.constexpr, SCORE_MOD: tl.constexpr, SCORE_MOD_GRAD: tl.constexpr,
    MASK_MOD: tl.constexpr, PASS_FLAG: tl.constexpr, AHEAD: tl.constexpr = False,
):  # fmt: skip
    """The inner loop of every pass: ``carry = TILE(carry, start, ctx, MASKED, ...)`` for each walked block
    that is not hidden, masked only where it must be.

    ``bounds`` are :func:`block_range`'s runs for the program's fixed rows. Without a block list
    (``SPARSE`` False) the walk is the three runs (all masked with ``ELEMENTWISE``: a mask that may
    hide any key). With one (``lists = (partial count, full count, partial list, full list)`` of
    ``SPARSE_BLOCK``-sized blocks, ``BLOCK`` dividing it), the listed partial blocks, then the full
    ones, each still classified against the window. The constexprs after ``ELEMENTWISE`` pass
    through to ``TILE`` unchanged (``PASS_FLAG`` is the pass's own switch: dK/dV's bias gradient, the
    forward's guard of masked tiles against non-finite values). ``AHEAD``: read the partial list's next
    index one iteration ahead too (the forward: Triton 3.6 made its partial loop wait for every copy,
    num 0 -> 1 in TTGIR, sm_90; the dK/dV kernel pipelines that loop without it and spills 26 -> 152
    with it).
    """
    start, full_lo, full_hi, end = bounds
    if not SPARSE:
        if ELEMENTWISE:
            full_lo = end
            full_hi = end
        for s in range(start, tl.minimum(full_lo, end), BLOCK):
            carry = TILE(carry, s, ctx, True, BLOCK, HEAD_DIM, D_PAD, TMA, DROPOUT, HAS_LEFT, HAS_RIGHT, TERMS,
                         SOFTCAP, ALIBI, MASK, SCORE_MOD, SCORE_MOD_GRAD, MASK_MOD, PASS_FLAG)  # fmt: skip
        for s in range(full_lo, full_hi, BLOCK):
            carry = TILE(carry, s, ctx, False, BLOCK, HEAD_DIM, D_PAD, TMA, DROPOUT, HAS_LEFT, HAS_RIGHT, TERMS,
                         SOFTCAP, ALIBI, MASK, SCORE_MOD, SCORE_MOD_GRAD, MASK_MOD, PASS_FLAG)  # fmt: skip
        for s in range(tl.maximum(full_lo, full_hi), end, BLOCK):
            carry = TILE(carry, s, ctx, True, BLOCK, HEAD_DIM, D_PAD, TMA, DROPOUT, HAS_LEFT, HAS_RIGHT, TERMS,
                         SOFTCAP, ALIBI, MASK, SCORE_MOD, SCORE_MOD_GRAD, MASK_MOD, PASS_FLAG)  # fmt: skip
    else:
        # One flat loop per list (a block of the list is SUBS walked blocks): one tile body per loop, so
        # the loop pipelines as the dense one does and shared memory holds one set of buffers.
        SUBS: tl.constexpr = SPARSE_BLOCK // BLOCK
        n_partial, n_full, partial, full = lists
        if AHEAD:
            upcoming = tl.load(partial, mask=n_partial > 0, other=0)
        for i in range(n_partial * SUBS):
            if AHEAD:  # as in the full loop below
                s = upcoming * SPARSE_BLOCK + (i % SUBS) * BLOCK
                upcoming = tl.load(partial + (i + 1) // SUBS, mask=i + 1 < n_partial * SUBS, other=0)
            else:
                s = tl.load(partial + i // SUBS) * SPARSE_BLOCK + (i % SUBS) * BLOCK
            if HAS_LEFT or HAS_RIGHT:
                visit, _ = window_tile(s, BLOCK, bounds)
                if visit:
                    carry = TILE(carry, s, ctx, True, BLOCK, HEAD_DIM, D_PAD, TMA, DROPOUT, HAS_LEFT, HAS_RIGHT,
                                 TERMS, SOFTCAP, ALIBI, MASK, SCORE_MOD, SCORE_MOD_GRAD, MASK_MOD,
                                 PASS_FLAG)  # fmt: skip
            else:
                carry = TILE(carry, s, ctx, True, BLOCK, HEAD_DIM, D_PAD, TMA, DROPOUT, HAS_LEFT, HAS_RIGHT, TERMS,
                             SOFTCAP, ALIBI, MASK, SCORE_MOD, SCORE_MOD_GRAD, MASK_MOD, PASS_FLAG)  # fmt: skip
        upcoming = tl.load(full, mask=n_full > 0, other=0)
        for i in range(n_full * SUBS):
            # The block index is read one iteration ahead, into a register. Loaded where it is used,
            # Triton 3.6 made it an asynchronous copy, the newest group, so each iteration waited for
            # every copy and only one K/V tile was in flight (TTGIR, sm_90); loop-carried, the K/V
            # copies run as far ahead as in the dense walk.
            s = upcoming * SPARSE_BLOCK + (i % SUBS) * BLOCK
            upcoming = tl.load(full + (i + 1) // SUBS, mask=i + 1 < n_full * SUBS, other=0)
            if ELEMENTWISE:  # a mask beyond the list's: every block is partial
                visit, _ = window_tile(s, BLOCK, bounds)
                if visit:
                    carry = TILE(carry, s, ctx, True, BLOCK, HEAD_DIM, D_PAD, TMA, DROPOUT, HAS_LEFT, HAS_RIGHT,
                                 TERMS, SOFTCAP, ALIBI, MASK, SCORE_MOD, SCORE_MOD_GRAD, MASK_MOD,
                                 PASS_FLAG)  # fmt: skip
            elif HAS_LEFT or HAS_RIGHT:  # full for the list, maybe not for the window: decide per block
                visit, in_window = window_tile(s, BLOCK, bounds)
                if in_window:
                    carry = TILE(carry, s, ctx, False, BLOCK, HEAD_DIM, D_PAD, TMA, DROPOUT, HAS_LEFT, HAS_RIGHT,
                                 TERMS, SOFTCAP, ALIBI, MASK, SCORE_MOD, SCORE_MOD_GRAD, MASK_MOD,
                                 PASS_FLAG)  # fmt: skip
                elif visit:
                    carry = TILE(carry, s, ctx, True, BLOCK, HEAD_DIM, D_PAD, TMA, DROPOUT, HAS_LEFT, HAS_RIGHT,
                                 TERMS, SOFTCAP, ALIBI, MASK, SCORE_MOD, SCORE_MOD_GRAD, MASK_MOD,
                                 PASS_FLAG)  # fmt: skip
            else:  # no branch: the loop pipelines like the dense one
                carry = TILE(carry, s, ctx, False, BLOCK, HEAD_DIM, D_PAD, TMA, DROPOUT, HAS_LEFT, HAS_RIGHT, TERMS,
                             SOFTCAP, ALIBI, MASK, SCORE_MOD, SCORE_MOD_GRAD, MASK_MOD, PASS_FLAG)  # fmt: skip
    return carry


@triton.jit
def block_list(Counts, Indices, b, h, row, c_str, i_str):
    """(partial count, full count, partial list, full list) of block-list row ``row`` of (b, h).

    ``Counts`` is (B, H, rows, 2) and ``Indices`` (B, H, rows, 2, n) int32, strides ``c_str`` and
    ``i_str`` for (B, H, rows) (0 where broadcast); the last two axes are contiguous.
    """
    c = Counts + b * c_str[0] + h * c_str[1] + row * c_str[2]
    i = Indices + b * i_str[0] + h * i_str[1] + row * i_str[2]
    n = i_str[3]
    return tl.load(c), tl.load(c + 1), i, i + n


@triton.jit
def head_terms(Mask, Alibi, m_str, a_str, b, h, scale_log2, softcap_scale, softcap_log2, ALIBI: tl.constexpr):
    """The ``terms`` tuple of sequence ``b``, query head ``h``: ``m_str`` are the mask's (batch, head,
    query, key) strides, ``a_str`` ALiBi's (batch, head)."""
    slope_log2 = 0.0
    if ALIBI:
        slope_log2 = tl.load(Alibi + b * a_str[0] + h * a_str[1]) * LOG2E
    mask_ptr = Mask + b.to(tl.int64) * m_str[0] + h.to(tl.int64) * m_str[1]
    return scale_log2, softcap_scale, softcap_log2, slope_log2, mask_ptr, m_str[2], m_str[3]


@triton.jit
def score_tile(
    qk, rows, cols, seq, win, terms,
    MASKED: tl.constexpr, GRAD: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    TERMS: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK: tl.constexpr,
    SCORE_MOD: tl.constexpr, SCORE_MOD_GRAD: tl.constexpr, MASK_MOD: tl.constexpr,
):  # fmt: skip
    """The scores of one tile, with every term and mask of the call: ``(s, seen, d_mod, d_cap)``.

    ``qk`` holds raw ``q . k`` for query ``rows`` and key ``cols`` (index tensors broadcast to the
    tile, either orientation). ``s`` is the score in the log2 domain; without terms (``TERMS``
    False) it is ``qk`` itself and the caller folds ``scale_log2`` into its ``exp2`` (one multiply-add).
    ``MASK``: 0 none, 1 boolean (read in masked tiles), 2 additive (read in every tile), 3 document ids
    (a :class:`flash.BlockMask` from document ids: ``mask_ptr`` holds the sequence's ids, compared in masked
    tiles), 4 a boolean key-padding mask (one row for every query: a vector of keys, read in masked tiles), 5 a
    document mask whose documents are runs of tokens (one interval of keys per query, :func:`document_run`).
    ``MASKED`` applies the masks (window, boolean mask, ``mask_mod``, sequence ends): ``seen`` is
    True where the query sees the key and ``s`` is -inf elsewhere. With ``GRAD``, ``d_mod`` is
    ``score_mod_grad`` at the score before ``score_mod`` and ``d_cap = 1 - tanh^2`` of softcap
    (each 1.0 when absent): the backward multiplies dS by them.
    """
    b, h, len_q, len_k, offset = seq
    scale_log2, softcap_scale, softcap_log2, slope_log2, mask_ptr, mask_si, mask_sj = terms
    d_mod = 1.0
    d_cap = 1.0
    s = qk
    if TERMS:
        if SOFTCAP:
            t = tanh(qk * softcap_scale)
            s = t * softcap_log2
            if GRAD:
                d_cap = 1.0 - t * t
        else:
            s = qk * scale_log2
        if ALIBI:  # positions converted as vectors, not per score (an int-to-float per score is slow)
            distance = (rows + offset).to(tl.float32) - cols.to(tl.float32)  # exact below 2**24
            s = s - slope_log2 * tl.abs(distance)
        if MASK == 2:
            inside = (rows < len_q) & (cols < len_k)
            bias = tl.load(mask_ptr + rows * mask_si + cols * mask_sj, mask=inside, other=0.0)
            s = s + bias.to(tl.float32) * LOG2E
        if SCORE_MOD is not None:
            natural = s * LN2
            if GRAD:
                d_mod = SCORE_MOD_GRAD(natural, b, h, rows, cols)
            s = SCORE_MOD(natural, b, h, rows, cols).to(tl.float32) * LOG2E
    seen = rows < len_q  # placeholder where MASKED is off: the caller does not use it
    if MASKED:
        if MASK == 5:  # the runs hold the sequence's ends: no bounds test of their own
            seen = document_run(rows, cols, len_q, mask_ptr, mask_si, mask_sj)
            if HAS_LEFT or HAS_RIGHT:
                seen = seen & visible(rows, cols, len_q, len_k, offset, win[0], win[1], HAS_LEFT, HAS_RIGHT)
        else:
            seen = visible(rows, cols, len_q, len_k, offset, win[0], win[1], HAS_LEFT, HAS_RIGHT)
        if MASK == 1:
            keep = tl.load(mask_ptr + rows * mask_si + cols * mask_sj, mask=seen, other=0)
            seen = seen & (keep != 0)
        if MASK == 4:  # a key-padding mask: one row for every query, loaded as a vector of keys
            keep = tl.load(mask_ptr + cols * mask_sj, mask=cols < len_k, other=0)
            seen = seen & (keep != 0)
        if MASK == 3:  # document ids: one vector per axis, not a tile of mask bytes
            q_doc = tl.load(mask_ptr + rows * mask_si, mask=rows < len_q, other=-1)
            k_doc = tl.load(mask_ptr + cols * mask_sj, mask=cols < len_k, other=-1)
            seen = seen & (q_doc == k_doc)
        if MASK_MOD is not None:
            seen = seen & MASK_MOD(b, h, rows, cols)
        s = tl.where(seen, s, float("-inf"))
    return s, seen, d_mod, d_cap


@triton.jit
def document_run(rows, cols, len_q, runs, row_stride, stop_offset):
    """True where query ``rows`` sees key ``cols`` under a document mask whose documents are runs of tokens
    (``MASK == 5``): ``runs`` holds each query's first visible key, ``stop_offset`` elements later one past
    its last (:func:`flash.block_mask.document_runs`). One unsigned compare per score tests both ends, the
    sequence's end (stops never pass it) and, in the stops, causality; a padding row's empty run hides it."""
    inside = rows < len_q
    first = tl.load(runs + rows * row_stride, mask=inside, other=0)
    stop = tl.load(runs + stop_offset + rows * row_stride, mask=inside, other=0)
    return (cols - first).to(tl.uint32) < (stop - first).to(tl.uint32)


@triton.jit
def tanh(x):
    """tanh through exp2 (fast path, saturates cleanly to +-1 for large |x|, no NaN)."""
    e = tl.math.exp2(x * (2.0 * LOG2E))
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def fmix32(x):
    """MurmurHash3's 32-bit finaliser on uint32 values (products wrap modulo 2**32)."""
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def dropout_row_hash(seed_lo, seed_hi, batch, head):
    """``fmix32(sequence ^ head)`` of :mod:`flash.dropout` for sequence ``batch`` and query ``head``."""
    lo = seed_lo.to(tl.uint32, bitcast=True)
    hi = seed_hi.to(tl.uint32, bitcast=True)
    sequence = fmix32(lo ^ fmix32(hi ^ fmix32(batch.to(tl.uint32))))
    return fmix32(sequence ^ head.to(tl.uint32))


@triton.jit
def dropout_keep(head_hash, rows, cols, threshold):
    """True where the element (query ``rows``, key ``cols``, positions inside the sequence) is kept."""
    row_hash = fmix32(head_hash ^ rows.to(tl.uint32))
    key_hash = cols.to(tl.uint32) * 0x9E3779B1
    bits = fmix32(row_hash ^ key_hash)
    return (bits >> 8) >= threshold.to(tl.uint32)


@triton.jit
def visible_dot(p, v, seen, acc):
    """``acc + p @ v`` where a key a row does not see (``seen`` False, ``p`` 0) adds nothing, even a
    NaN or inf value (``0 * nan`` is NaN: one garbage value would poison every row of the tile).

    A tile whose values are all finite (nearly every tile) takes the ordinary product straight from
    the loaded tile: the check costs one pass over the values and a reduction, not a second product.
    Otherwise :func:`guarded_dot` puts IEEE's results on exactly the rows that see those values.
    """
    wide = v.to(tl.float32)  # (comparisons on bf16 tiles are not supported by Triton's interpreter)
    bad = (wide != wide) | (tl.abs(wide) == float("inf"))  # noqa: PLR0124 - NaN is the one value unequal to itself
    if tl.max(bad.to(tl.int32)) == 0:  # noqa: SIM108 - a branch, not a select: run one product, not both
        acc = tl.dot(p.to(v.dtype), v, acc)
    else:
        acc = guarded_dot(p, v, seen, acc)
    return acc


@triton.jit
def guarded_dot(p, v, seen, acc):
    """:func:`visible_dot` without the all-finite shortcut (the KV-cache kernel's choice: the branch
    costs its multi-token variant registers it does not have).

    Finite values take the ordinary product. Which rows see a NaN, a +inf or a -inf in each column
    is counted with one more product of 0/1 operands, the three counts packed as powers of 256 (exact in
    bf16 operands and an fp32 accumulator while a block has fewer than 256 keys); the counts put
    IEEE's results on exactly those rows: NaN wins, +inf and -inf together make NaN.
    """
    inf = float("inf")
    wide = v.to(tl.float32)
    nan = wide != wide  # noqa: PLR0124 - NaN is the one value unequal to itself
    pos = wide == inf
    neg = wide == -inf
    acc = tl.dot(p.to(v.dtype), tl.where(nan | pos | neg, 0.0, v).to(v.dtype), acc)
    code = nan.to(tl.float32) + pos.to(tl.float32) * 256.0 + neg.to(tl.float32) * 65536.0
    counts = tl.dot(seen.to(tl.bfloat16), code.to(tl.bfloat16))
    n_neg = tl.floor(counts / 65536.0)
    n_pos = tl.floor((counts - n_neg * 65536.0) / 256.0)
    n_nan = counts - n_neg * 65536.0 - n_pos * 256.0
    acc = tl.where(n_pos > 0, inf, acc)
    acc = tl.where(n_neg > 0, -inf, acc)
    return tl.where((n_nan > 0) | ((n_pos > 0) & (n_neg > 0)), float("nan"), acc)
