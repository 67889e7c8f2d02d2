"""The KV-cache kernels: append (with rotary), split-KV attention over a contiguous or paged cache, combine.

Decoding reads the whole cache once per step and does little arithmetic per byte, so the design is
about memory bandwidth:

* **GQA packing.** One program owns one KV head of one sequence and *all* its query heads: the
  rows of its tile are (new token, query head of the group) pairs, ``group * seqlen_q`` of them
  (padded to 16, what ``tl.dot`` needs; more rows are cut into row blocks), so each K/V tile is read
  once for the whole group and feeds a real matrix product.
* **Split-KV.** The keys a program's rows see are cut into ``NUM_SPLITS`` runs of whole tiles that
  run as separate programs (grid: splits x KV heads x row blocks x sequences), so a small batch
  still fills every SM. Each writes its partial output (float32, already normalised) and LSE;
  :func:`kv_combine_kernel` merges them exactly (the math of :func:`flash.merge_states`) and adds
  the sink logits. With one split the decode kernel writes the output itself.
* **Paged loads.** A contiguous cache is one page per sequence: a tile's rows are one base address
  plus row offsets fixed for the whole loop (:func:`tile_rows`). In a paged cache each key's row is
  found through the block table (page numbers clamped into the pool); the head dim stays
  contiguous, so every row is a 16-byte vector load; ``num_stages`` keeps several tiles of loads in
  flight, the table's entries a stage ahead of the rows they locate. A page size that is a power
  of two is a compile-time constant (:func:`page_rows`): a page holding the whole tile is one
  table entry and one base address, as in a contiguous cache; a smaller page's keys take their
  entries at a shift of their position and their slots from their place in the tile, so the loop
  does no division. Other page sizes divide each key's position (:func:`table_page`).
* **Masks only where needed.** A tile whose keys every row sees runs without masks; tiles at the
  edges (window, causality among new tokens, the split's and the sequence's ends) and the
  sink-token tiles are masked, and their loads zero every key no row sees, so unused slots
  (garbage) are never multiplied in. With several new tokens a key some rows do not see goes
  through :func:`flash_triton.tiles.guarded_dot` (no NaN leaks across rows).
* **fp8 caches.** Tiles are converted to the queries' dtype in registers; the per-(sequence, head)
  descale of K is folded into the score scale and that of V into the output.

Lengths, page numbers and batch indices are clamped as :mod:`flash.kvspec` documents: no access
leaves the tensors whatever they hold.
"""

from __future__ import annotations

import triton
import triton.language as tl

from flash_triton.forward_kernel import load_rows
from flash_triton.runtime import interpreting
from flash_triton.tiles import LN2, LOG2E, fold_sink, guarded_dot, tanh

INTERPRETED = interpreting()


@triton.jit
def cache_length(CacheSeqlens, b, room):
    """Keys sequence ``b`` holds before the call, clamped into ``[0, room]``."""
    return tl.minimum(tl.maximum(tl.load(CacheSeqlens + b), 0), room)


@triton.jit
def locate(
    positions, ok, b, BlockTable, BatchIdx, sbtb, sbtp, sbi, page_size, pages,
    PAGED: tl.constexpr, BATCH_IDX: tl.constexpr,
):  # fmt: skip
    """(page, slot) of key ``positions`` of sequence ``b`` (``ok``: positions the table may be read at)."""
    if PAGED:
        page, slot = table_page(positions, ok, b, BlockTable, sbtb, sbtp, page_size, pages)
    else:
        page = sequence_page(b, BatchIdx, sbi, pages, BATCH_IDX)
        slot = positions.to(tl.int64)
    return page, slot


@triton.jit
def table_page(positions, ok, b, BlockTable, sbtb, sbtp, page_size, pages):
    """:func:`locate` in a paged cache of any page size: each key divides its position."""
    entry = tl.load(BlockTable + b.to(tl.int64) * sbtb + (positions // page_size) * sbtp, mask=ok, other=0)
    page = tl.minimum(tl.maximum(entry, 0), pages - 1)
    return page.to(tl.int64), (positions % page_size).to(tl.int64)


@triton.jit
def sequence_page(b, BatchIdx, sbi, pages, BATCH_IDX: tl.constexpr):
    """The row of a contiguous cache (one page per sequence) that sequence ``b`` reads: ``b``, or its
    batch index clamped into the cache."""
    if BATCH_IDX:  # noqa: SIM108 - a constexpr branch: no load at all without batch indices
        page = tl.minimum(tl.maximum(tl.load(BatchIdx + b * sbi), 0), pages - 1)
    else:
        page = b
    return page.to(tl.int64)


@triton.jit
def tile_rows(page_base, first, row_stride, offs_n):
    """Row pointers of the keys ``first + offs_n`` of one page, ``page_base`` its head's first row: one
    base per tile, and row offsets that do not change from tile to tile. The offsets are int32 (the
    backend's ``token_stride`` limit keeps them in range): int64 ones kept across the loop cost an
    fp8 cache's kernel 128 -> 255 registers on sm_90."""
    return (page_base + tl.cast(first, tl.int64) * row_stride) + (offs_n * row_stride).to(tl.int64)


@triton.jit
def page_rows(
    j0, key_ok, cache, offs_n,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """K and V row pointers of the keys ``j0 + offs_n`` (``j0`` a multiple of ``BLOCK_N``) of a paged cache
    whose pages hold ``PAGE`` keys, a power of two. A page holding the whole tile is one table entry
    and one base for every row; smaller pages take each key's entry at a shift of its position and
    its slot from its place in the tile: no division, and the slots' offsets do not change from tile
    to tile. Page numbers are clamped into the pool; a masked tile reads the table only for its
    ``key_ok`` keys (the others may lie past the table's row)."""
    b, hk, KCache, VCache, BlockTable, _, k_str, v_str, sbtb, sbtp, _, pages = cache
    table_row = BlockTable + b.to(tl.int64) * sbtb
    if PAGE >= BLOCK_N:  # j0 < the sequence's length <= the table's keys: its entry is in the row
        entry = tl.load(table_row + (j0 // PAGE) * sbtp)
    else:
        entries = table_row + (j0 // PAGE + offs_n // PAGE) * sbtp
        entry = tl.load(entries, mask=key_ok, other=0) if MASKED else tl.load(entries)
    page = tl.maximum(tl.minimum(entry, pages - 1), 0).to(tl.int64)
    k_rows = _rows_in_pages(KCache, page, j0, k_str, hk, offs_n, PAGE, BLOCK_N)
    v_rows = _rows_in_pages(VCache, page, j0, v_str, hk, offs_n, PAGE, BLOCK_N)
    return k_rows, v_rows


@triton.jit
def _rows_in_pages(Cache, page, j0, strides, hk, offs_n, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """:func:`page_rows` for one cache (``page``: the tile's page, or each key's)."""
    if PAGE >= BLOCK_N:
        rows = tile_rows(Cache + page * strides[0] + hk * strides[2], j0 % PAGE, strides[1], offs_n)
    else:  # j0 starts a page
        rows = Cache + page * strides[0] + ((offs_n % PAGE).to(tl.int64) * strides[1] + hk * strides[2])
    return rows


@triton.jit
def rotated_row(
    base, offs_d, position, Cos, Sin, scs, sss,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr,
):  # fmt: skip
    """The row at ``base`` in float32, its first ``2 * HALF`` elements rotated at ``position``
    (:mod:`flash.rotary`): each element takes its pair partner from memory, no register shuffle."""
    d_ok = offs_d < HEAD_DIM
    x = tl.load(base + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    if ROTARY:
        turned = offs_d < 2 * HALF
        if INTERLEAVED:
            partner = offs_d ^ 1
            freq = offs_d // 2
            sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
        else:
            partner = tl.where(offs_d < HALF, offs_d + HALF, offs_d - HALF)
            freq = tl.where(offs_d < HALF, offs_d, offs_d - HALF)
            sign = tl.where(offs_d < HALF, -1.0, 1.0)
        y = tl.load(base + partner, mask=turned, other=0.0).to(tl.float32)
        c = tl.load(Cos + position * scs + freq, mask=turned, other=1.0).to(tl.float32)
        s = tl.load(Sin + position * sss + freq, mask=turned, other=0.0).to(tl.float32)
        x = tl.where(turned, x * c + sign * y * s, x)
    return x


@triton.jit
def kv_append_kernel(
    Q, QRot, K, V, KCache, VCache, CacheSeqlens, BlockTable, BatchIdx, Cos, Sin, KDescale, VDescale,
    sqb, sqs, sqh, srb, srs, srh, skb, sks, skh, svb, svs, svh,
    skcp, skct, skch, svcp, svct, svch, sbtb, sbtp, sbi, scs, sss, sdkb, sdkh, sdvb, sdvh,
    seqlen_q, seqlen_new, heads_kv, capacity, page_size, pages, positions,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HALF: tl.constexpr, ROTARY: tl.constexpr,
    INTERLEAVED: tl.constexpr, ROTATE_Q: tl.constexpr, APPEND: tl.constexpr, PAGED: tl.constexpr,
    BATCH_IDX: tl.constexpr, DESCALE: tl.constexpr,
):  # fmt: skip
    """Grid: (tokens, heads, batch). Rotates query ``(b, t, h)`` into ``QRot`` and writes new key and
    value ``(b, t, h)`` (rotated; divided by the descale and rounded for an fp8 cache) at position
    ``cache_seqlens[b] + t``."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    length = cache_length(CacheSeqlens, b, capacity - seqlen_new)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    last = tl.maximum(positions - 1, 0)
    if ROTATE_Q:  # noqa: SIM102 - a constexpr test outside, a runtime one inside
        if t < seqlen_q:
            where = tl.minimum(tl.maximum(length + seqlen_new - seqlen_q + t, 0), last)
            x = rotated_row(Q + b64 * sqb + t * sqs + h * sqh, offs_d, where, Cos, Sin, scs, sss,
                            HEAD_DIM, HALF, ROTARY, INTERLEAVED)  # fmt: skip
            tl.store(QRot + b64 * srb + t * srs + h * srh + offs_d, x.to(QRot.dtype.element_ty), mask=d_ok)
    if APPEND:  # noqa: SIM102 - a constexpr test outside, a runtime one inside
        if (t < seqlen_new) & (h < heads_kv):
            position = length + t
            page, slot = locate(position, position >= 0, b, BlockTable, BatchIdx, sbtb, sbtp, sbi, page_size, pages,
                                PAGED, BATCH_IDX)  # fmt: skip
            where = tl.minimum(position, last)
            k = rotated_row(K + b64 * skb + t * sks + h * skh, offs_d, where, Cos, Sin, scs, sss,
                            HEAD_DIM, HALF, ROTARY, INTERLEAVED)  # fmt: skip
            v = tl.load(V + b64 * svb + t * svs + h * svh + offs_d, mask=d_ok, other=0.0).to(tl.float32)
            if DESCALE:  # an fp8 cache holds value / descale
                k = k / tl.load(KDescale + b * sdkb + h * sdkh)
                v = v / tl.load(VDescale + b * sdvb + h * sdvh)
            tl.store(KCache + page * skcp + slot * skct + h * skch + offs_d, k.to(KCache.dtype.element_ty), mask=d_ok)
            tl.store(VCache + page * svcp + slot * svct + h * svch + offs_d, v.to(VCache.dtype.element_ty), mask=d_ok)


@triton.jit
def _decode_tile(
    carry, j0, ctx,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    PAGED: tl.constexpr, PAGE: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, MULTI_TOKEN: tl.constexpr,
):  # fmt: skip
    """Fold the keys ``j0 .. j0 + BLOCK_N - 1`` into the rows' running ``carry = (acc, m, l)``, log2 domain.
    ``PAGE``: :func:`kv_decode_kernel`'s.

    The values travel as tuples, ``ctx = (q, cache, rows, bounds, scores, offs)``: ``cache`` (b, hk,
    KCache, VCache, BlockTable, the sequence's page of a contiguous cache (:func:`sequence_page`), the
    caches' (page, slot, head) strides, the table's strides, page size, pages),
    ``rows`` (each row's position, row valid), ``bounds`` (lo, hi, len_k, left, right, sink tokens:
    see :func:`kv_decode_kernel`), ``scores`` (scale, softcap scale, softcap log2 factor) and
    ``offs`` (key offsets, head-dim offsets, head-dim valid)."""
    acc, m_i, l_i = carry
    q, cache, rows, bounds, scores, offs = ctx
    b, hk, KCache, VCache, BlockTable, home, k_str, v_str, sbtb, sbtp, page_size, pages = cache
    pos, row_ok = rows
    lo, hi, len_k, left, right, sink_tokens = bounds
    qk_scale, softcap_scale, softcap_log2 = scores
    offs_n, offs_d, d_ok = offs
    cols = j0 + offs_n
    if MASKED:  # keys no row sees (past the sequence, outside every row's window) load as zeros
        key_ok = cols < hi
        if HAS_LEFT:
            key_ok = key_ok & ((cols >= lo) | (cols < sink_tokens))
    else:
        key_ok = cols >= 0
    if not PAGED:  # one page per sequence: one base per tile, like a page holding the tile
        k_rows = tile_rows(KCache + home * k_str[0] + hk * k_str[2], j0, k_str[1], offs_n)
        v_rows = tile_rows(VCache + home * v_str[0] + hk * v_str[2], j0, v_str[1], offs_n)
    elif PAGE > 0:
        k_rows, v_rows = page_rows(j0, key_ok, cache, offs_n, PAGE, BLOCK_N, MASKED)
    else:
        page, slot = table_page(cols, key_ok, b, BlockTable, sbtb, sbtp, page_size, pages)
        k_rows = KCache + page * k_str[0] + slot * k_str[1] + hk * k_str[2]
        v_rows = VCache + page * v_str[0] + slot * v_str[1] + hk * v_str[2]
    # full tiles load unmasked: 16-byte vector loads along the head dim
    k = load_rows(k_rows[:, None] + offs_d[None, :], key_ok, d_ok, HEAD_DIM, D_PAD, MASKED).to(q.dtype)
    qk = tl.dot(q, tl.trans(k))
    if SOFTCAP:  # noqa: SIM108 - a constexpr branch: no tanh without softcap
        s = tanh(qk * softcap_scale) * softcap_log2
    else:
        s = qk * qk_scale
    if MASKED:
        seen = row_ok[:, None] & key_ok[None, :] & (cols[None, :] < len_k)
        if HAS_LEFT:
            seen = seen & ((cols[None, :] >= pos[:, None] - left) | (cols[None, :] < sink_tokens))
        if HAS_RIGHT:
            seen = seen & (cols[None, :] <= pos[:, None] + right)
        s = tl.where(seen, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet: exp2 gives 0
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = load_rows(v_rows[:, None] + offs_d[None, :], key_ok, d_ok, HEAD_DIM, D_PAD, MASKED).to(q.dtype)
    acc = acc * alpha[:, None]
    if MASKED and MULTI_TOKEN:  # noqa: SIM108 - constexpr; a key hidden from some rows only: no NaN crosses
        acc = guarded_dot(p, v, seen, acc)
    else:
        acc = tl.dot(p.to(q.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["left", "right", "sink_tokens"])
def kv_decode_kernel(
    Q, KCache, VCache, CacheSeqlens, BlockTable, BatchIdx, Sinks, KDescale, VDescale, Out, Lse, OutPart, LsePart,
    sqb, sqs, sqh, skcp, skct, skch, svcp, svct, svch, sbtb, sbtp, sbi, sdkb, sdkh, sdvb, sdvh,
    sob, sos, soh, slb, slh, sls, spp, spb, sps, sph, slpp, slpb, slph, slps,
    seqlen_q, seqlen_new, group, row_blocks, capacity, page_size, pages,
    left, right, sink_tokens, scale_log2, softcap_scale, softcap_log2,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr, BATCH_IDX: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, SINKS: tl.constexpr,
    DESCALE: tl.constexpr, MULTI_TOKEN: tl.constexpr,
):  # fmt: skip
    """Grid: (splits, heads_kv * row_blocks, batch). ``PAGE``: the page size of a paged cache whose pages
    hold a power of two of keys, a compile-time constant (:func:`page_rows`), or 0: each key finds
    its page with a division (:func:`locate`)."""
    split = tl.program_id(0)
    hk = tl.program_id(1) // row_blocks
    row0 = (tl.program_id(1) % row_blocks) * BLOCK_M
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    len_k = cache_length(CacheSeqlens, b, capacity - seqlen_new) + seqlen_new
    offset = len_k - seqlen_q
    n_rows = group * seqlen_q
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    t = rows // group
    h = hk * group + rows % group
    pos = offset + t  # each row's position among the keys (bottom-right aligned)
    t_first = row0 // group
    t_last = (tl.minimum(row0 + BLOCK_M, n_rows) - 1) // group

    # Keys some row sees: [lo, hi) (plus the sink tokens); keys every row sees: [lo_all, hi_all).
    if HAS_LEFT:
        lo = tl.minimum(tl.maximum(offset + t_first - left, 0), len_k)
        lo_all = tl.minimum(tl.maximum(offset + t_last - left, 0), len_k)
    else:
        lo = len_k * 0
        lo_all = len_k * 0
    if HAS_RIGHT:
        hi = tl.minimum(tl.maximum(offset + t_last + right + 1, 0), len_k)
        hi_all = tl.minimum(tl.maximum(offset + t_first + right + 1, 0), len_k)
    else:
        hi = len_k
        hi_all = len_k
    start = (lo // BLOCK_N) * BLOCK_N
    per_split = tl.cdiv(tl.cdiv(tl.maximum(hi - start, 0), NUM_SPLITS), BLOCK_N) * BLOCK_N
    first = start + split * per_split
    end = tl.maximum(tl.minimum(first + per_split, hi), first)
    full_lo = tl.minimum(tl.maximum(tl.cdiv(lo_all, BLOCK_N) * BLOCK_N, first), end)
    full_hi = tl.minimum(tl.maximum((hi_all // BLOCK_N) * BLOCK_N, full_lo), end)

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    q_ptrs = Q + b64 * sqb + t[:, None].to(tl.int64) * sqs + h[:, None] * sqh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    qk_scale = scale_log2
    soft = softcap_scale
    v_scale = 1.0
    if DESCALE:  # K's factor scales the scores, V's the output
        k_scale = tl.load(KDescale + b * sdkb + hk * sdkh)
        qk_scale = qk_scale * k_scale
        soft = soft * k_scale
        v_scale = tl.load(VDescale + b * sdvb + hk * sdvh)

    carry = (tl.zeros([BLOCK_M, D_PAD], tl.float32), tl.full([BLOCK_M], float("-inf"), tl.float32),
             tl.zeros([BLOCK_M], tl.float32))  # fmt: skip
    if PAGED:  # noqa: SIM108 - a constexpr branch: the block table locates every tile
        home = b64
    else:  # read once, not per tile
        home = sequence_page(b, BatchIdx, sbi, pages, BATCH_IDX)
    cache = (b, hk, KCache, VCache, BlockTable, home, (skcp, skct, skch), (svcp, svct, svch), sbtb, sbtp, page_size,
             pages)  # fmt: skip
    ctx = (q, cache, (pos, row_ok), (lo, hi, len_k, left, right, sink_tokens), (qk_scale, soft, softcap_log2),
           (offs_n, offs_d, d_ok))  # fmt: skip
    if HAS_LEFT:  # the sink-token tiles before the window: split 0's
        sink_end = tl.where(split == 0, tl.minimum(tl.cdiv(sink_tokens, BLOCK_N) * BLOCK_N, start), 0)
        for j0 in range(0, sink_end, BLOCK_N):
            carry = _decode_tile(carry, j0, ctx, HEAD_DIM, D_PAD, BLOCK_N, True, PAGED, PAGE, HAS_LEFT,
                                 HAS_RIGHT, SOFTCAP, MULTI_TOKEN)  # fmt: skip
    for j0 in range(first, full_lo, BLOCK_N):  # masked: the window's (or the keys') edge
        carry = _decode_tile(carry, j0, ctx, HEAD_DIM, D_PAD, BLOCK_N, True, PAGED, PAGE, HAS_LEFT,
                             HAS_RIGHT, SOFTCAP, MULTI_TOKEN)  # fmt: skip
    for j0 in range(full_lo, full_hi, BLOCK_N):  # every row sees every key: no mask at all
        carry = _decode_tile(carry, j0, ctx, HEAD_DIM, D_PAD, BLOCK_N, False, PAGED, PAGE, HAS_LEFT,
                             HAS_RIGHT, SOFTCAP, MULTI_TOKEN)  # fmt: skip
    for j0 in range(full_hi, end, BLOCK_N):  # masked: causality among new tokens, the sequence's end
        carry = _decode_tile(carry, j0, ctx, HEAD_DIM, D_PAD, BLOCK_N, True, PAGED, PAGE, HAS_LEFT,
                             HAS_RIGHT, SOFTCAP, MULTI_TOKEN)  # fmt: skip
    acc, m_i, l_i = carry

    if NUM_SPLITS == 1 and SINKS:  # the sink logit joins the denominator with no value (splits: the combine's)
        acc, m_i, l_i = fold_sink(acc, m_i, l_i, tl.load(Sinks + h, mask=row_ok, other=float("-inf")) * LOG2E)
    empty = l_i == 0.0  # saw no key (a NaN sum is not empty: NaN propagates)
    out = acc * (tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i)) * v_scale)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    keep = row_ok[:, None] & d_ok[None, :]
    t64 = t.to(tl.int64)
    if NUM_SPLITS == 1:
        o_ptrs = Out + b64 * sob + t64[:, None] * sos + h[:, None] * soh + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=keep)
        tl.store(Lse + b64 * slb + h * slh + t64 * sls, lse, mask=row_ok)
    else:
        base = OutPart + split.to(tl.int64) * spp + b64 * spb
        tl.store(base + t64[:, None] * sps + h[:, None] * sph + offs_d[None, :], out, mask=keep)
        lse_base = LsePart + split.to(tl.int64) * slpp + b64 * slpb
        tl.store(lse_base + h * slph + t64 * slps, lse, mask=row_ok)


@triton.jit
def kv_combine_kernel(
    OutPart, LsePart, Sinks, Out, Lse,
    spp, spb, sps, sph, slpp, slpb, slph, slps, sob, sos, soh, slb, slh, sls,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
    SINKS: tl.constexpr,
):  # fmt: skip
    """Grid: (seqlen_q, heads_q, batch). ``lse = log(sum_i exp(lse_i) [+ exp(sink)])`` and
    ``out = sum_i exp(lse_i - lse) out_i``; a row no part saw gets 0 and -inf (or the sink's logit)."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    parts = tl.arange(0, SPLITS_PAD)
    lse_row = LsePart + b * slpb + h * slph + t * slps
    lses = tl.load(lse_row + parts * slpp, mask=parts < NUM_SPLITS, other=float("-inf"))
    top = tl.max(lses, 0)
    if SINKS:
        sink = tl.load(Sinks + h)
        top = tl.maximum(top, sink)
    shift = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(tl.exp(lses - shift), 0)
    if SINKS:
        total += tl.exp(sink - shift)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    acc = tl.zeros([D_PAD], tl.float32)
    out_row = OutPart + b * spb + t * sps + h * sph + offs_d
    for i in range(NUM_SPLITS):  # a fixed order: bit-identical run to run
        weight = tl.exp(tl.load(lse_row + i * slpp) - shift)
        acc += weight * tl.load(out_row + i * spp, mask=d_ok, other=0.0)
    empty = total == 0.0
    out = tl.where(empty, 0.0, acc / tl.where(empty, 1.0, total))
    tl.store(Out + b * sob + t * sos + h * soh + offs_d, out.to(Out.dtype.element_ty), mask=d_ok)
    lse = tl.where(empty, float("-inf"), tl.log(tl.where(empty, 1.0, total)) + shift)
    tl.store(Lse + b * slb + h * slh + t * sls, lse)
