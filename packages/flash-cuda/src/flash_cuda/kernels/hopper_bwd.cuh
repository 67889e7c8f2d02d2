// FlashAttention backward for Hopper (sm_90a): TMA loads, wgmma, a producer warpgroup and two
// consumer warpgroups (issue 14).
//
// One thread block per (batch, KV head, key block of BN = 128 keys). K and V of the block are loaded
// once (TMA) and stay in shared memory; dK and dV accumulate in registers. The block walks every query
// head of its KV head's GQA group and, per head, every block of BM = 64 query rows that sees one of
// its keys, streaming Q, dO and the per-row LSE (base 2) and delta = rowsum(dO o O) through a ring of
// STAGES buffers (TMA for the tiles, 1-D bulk copies for the rows' values).
//
//  * warpgroup 0, the producer: one thread issues the loads; the warpgroup gives its registers away.
//  * warpgroups 1 and 2, the consumers: each owns 64 of the block's keys and, per query block, runs
//      S^T  = K Q^T          (wgmma, both operands K-major in shared memory; rows are keys)
//      dP^T = V dO^T         (likewise)
//      P^T  = exp2(S^T * scale * log2 e - LSE_2[query])      (masked scores: -inf)
//      dS^T = P^T o (dP^T - delta[query])
//      dV  += P^T dO         (A = P^T from registers, B = dO N-major in shared memory)
//      dK  += dS^T Q         (A = dS^T from registers, B = Q N-major)
//      dQ   = dS K           (A = dS^T of both warpgroups, stored to shared memory and read M-major
//                             through the descriptor's transpose bit, B = K N-major: all 128 keys,
//                             so the two warpgroups' parts are summed before they leave the SM)
//    The accumulator of S^T already has the register layout of the A operand of dV += P^T dO (as
//    P in the forward's O += P V), so P^T and dS^T never cross lanes.
//    dQ is split by 64-column slabs of the head dim: warpgroup w takes slab w (d128); with one slab
//    (d64) the warpgroups take turns, step by step (walk(): compile-time turns). The slab's 64 x 64
//    fp32 tile goes to shared memory in the accumulator's fragment order (conflict-free 8-byte
//    stores) and from there, by one 16 KB bulk reduction (cp.reduce.async.bulk .add.f32), into a
//    workspace laid out in the same order.
//    Two consumer structures: consume (order per step: dV, a barrier for both dS^T, dQ, dK; dQ is
//    staged and sent while dK runs) and consume_pipelined (the dQ of step t - 1 between dV and dK of
//    step t, mbarriers on double-buffered dS^T instead of the per-step barrier; d64 only, it spills
//    at d128).
// Two compile-time options (Shape): SOFTCAP (scores cap * tanh(raw * scale / cap): tanh before the
// exponential, dS^T times 1 - t^2 with t recovered from P^T, capped_dp_to_ds) and DETERMINISTIC
// (dQ's bulk reductions into each tile in a fixed order of the key blocks: the consumers only stage
// their slab, a writer thread of the producer warpgroup issues the reductions in turn, write_dq).
// Around the kernel (kernels/hopper_bwd_rows.cu): a rows pass writes LSE_2 and delta into buffers
// padded to whole query blocks, and a dQ pass converts the workspace (times scale, fragment order
// undone) to the inputs' dtype. dK is stored times scale.
//
// Rows past the query sequence get LSE_2 = +inf (P = 0) from the padded buffers, so only the key
// bound and the causal/window edges are masked here. Masking (flash.masking, bottom-right
// aligned): query row i sees key j iff j < len_k and -left <= j - i - (len_k - len_q) <= right.
//
// A mask beyond causal/window (Shape::EXTRA), intersected with them: a key-padding mask or key
// intervals (query i sees keys [lo_i, hi_i), neither end moving left as i grows), both read through
// two tables the host makes (flash_cuda/hopper_bwd.py): per key block, the query blocks that see one
// of its keys and those that see all of them (Block::narrow intersects the walk with the first,
// Block::masked the unmasked blocks with the second: key blocks that no query sees walk nothing and
// write dK = dV = 0, fully visible steps cost two comparisons more); per key, the queries that see
// it, an interval in both cases (the intervals' ends never move left), tested per score in masked
// steps only (mask_transposed).
//
// ALiBi (Shape::ALIBI, causal/window with right reach 0 only): the bias -slope |i + off - j| is
// i + off - j where any key is seen, split into a per-query part folded into LSE_2 by the rows pass
// and a per-key part added per score (scores_to_p); dS^T is unchanged (the slopes take no gradient).
//
// Packed (varlen) batches (Shape::VARLEN): q/dO and k/v hold the sequences back to back (batch 1,
// offsets cu_seqlens); the grid covers the longest sequence's key blocks, and a block past its own
// sequence's keys exits before the first barrier. TMA reads at the sequence's row offset, so the
// tiles past a sequence's end hold the next sequence's rows instead of zeros: its query rows meet
// LSE_2 = +inf and delta = 0 (P = dS = 0 exactly, for finite inputs), its keys the key-bound mask.
// The per-row buffers and dQ's workspace keep whole query blocks per sequence (hopper_bwd_packed.cuh).
#pragma once

#include "hopper_bwd_packed.cuh"
#include "hopper_fwd.cuh"

namespace flash_cuda {
namespace hopper_bwd {

using namespace sm90;
using hopper::Acc;
using hopper::Operand;
using hopper::Ring;
using hopper::SmemTile;

// Named barriers (0 is __syncthreads): 1 + w for consumer warpgroup w alone, BOTH_BARRIER for both.
constexpr int BOTH_BARRIER = 3;

template <int D_, int INPUT_, int MASK_, bool PIPELINED_, bool VARLEN_ = false, bool DETERMINISTIC_ = false,
          bool SOFTCAP_ = false, bool EXTRA_ = false, bool ALIBI_ = false>
struct Shape {
  static constexpr bool PIPELINED = PIPELINED_;          // consume_pipelined, else consume
  static constexpr bool VARLEN = VARLEN_;                // packed sequences (Params::cu_q, cu_k)
  static constexpr bool DETERMINISTIC = DETERMINISTIC_;  // dQ's reductions in a fixed order (write_dq)
  static constexpr bool SOFTCAP = SOFTCAP_;              // scores cap * tanh(raw * scale / cap)
  static_assert(!(VARLEN && DETERMINISTIC), "the deterministic turns (Block::turn) assume one length per batch");
  static constexpr bool EXTRA = EXTRA_;  // a mask beyond causal/window (Params::blocks, keys)
  static_assert(!EXTRA || !(VARLEN || DETERMINISTIC),
                "masks: a padded batch only, and Block::turn knows only the causal/window ranges");
  static constexpr int D = D_;
  static constexpr int INPUT = INPUT_;
  static constexpr int MASK = MASK_;  // 0 none, 1 right edge (causal), 2 both edges (window)
  static constexpr bool ALIBI = ALIBI_;  // scores - slope |i + off - j|, right reach 0 (scores_to_p)
  static_assert(!ALIBI || (MASK >= 1 && !(VARLEN || DETERMINISTIC || SOFTCAP || EXTRA)),
                "ALiBi: causal/window with right reach 0 (the host's), no other option compiled with it");
  static constexpr int BN = 128;      // keys per block: 64 per consumer warpgroup
  static constexpr int BM = 64;       // query rows per step (one 128-byte swizzle row of dS^T)
  static constexpr int CONSUMERS = 2;
  static constexpr int STAGES = 2;
  static constexpr int THREADS = 128 * (CONSUMERS + 1);
  static constexpr int ELEM = 2;
  static constexpr bool FP8 = false;
  static constexpr int SWIZZLE = (D * ELEM) % 128 == 0 ? 128 : 64;
  static constexpr int SLAB = SWIZZLE / ELEM;
  // Shared memory (1024-byte aligned base): K, V, the Q and dO rings, the consumers' dS^T tiles,
  // the LSE_2 and delta rings, the mbarriers.
  static constexpr int KV_BYTES = BN * D * ELEM;
  static constexpr int Q_BYTES = BM * D * ELEM;
  static constexpr int DS_BYTES = 64 * BM * ELEM;  // one warpgroup's dS^T (64 keys x BM queries)
  static constexpr int SLABS = D / SLAB;
  static constexpr int DQ_TILE = BM * SLAB;  // floats of one dQ slab tile (16 KB)
  static constexpr int ROW_BYTES = BM * 4;
  static constexpr int K_OFFSET = 0;
  static constexpr int V_OFFSET = KV_BYTES;
  static constexpr int Q_OFFSET = 2 * KV_BYTES;
  static constexpr int DO_OFFSET = Q_OFFSET + STAGES * Q_BYTES;
  static constexpr int DS_OFFSET = DO_OFFSET + STAGES * Q_BYTES;
  // dS^T tiles: two buffers (step parity) of both warpgroups', then one dQ staging tile per warpgroup
  static constexpr int DQ_OFFSET = DS_OFFSET + 2 * CONSUMERS * DS_BYTES;
  static constexpr int LSE_OFFSET = DQ_OFFSET + CONSUMERS * DQ_TILE * 4;
  static constexpr int DELTA_OFFSET = LSE_OFFSET + STAGES * ROW_BYTES;
  // EXTRA: per key of the block, the queries [lo, hi) that see it (all masks), staged once (stage_keys)
  static constexpr int KEYS_OFFSET = DELTA_OFFSET + STAGES * ROW_BYTES;
  // ALIBI: per stage, the step's slope times log2 e (the producer's; loaded per step by the consumers,
  // a register kept across the step made d128 spill)
  static constexpr int SLOPE_OFFSET = KEYS_OFFSET + (EXTRA ? BN * 8 : 0);
  static constexpr int BARRIER_OFFSET = SLOPE_OFFSET + (ALIBI ? 16 : 0);
  static constexpr int BARRIERS = 1 + 2 * STAGES + 4;  // kv_full, full/empty per stage, ds_full/ds_empty x 2
  static constexpr int DQ_BARRIERS = DETERMINISTIC ? 2 * CONSUMERS : 0;  // dq_full/dq_empty per consumer
  static constexpr int SMEM_BYTES = BARRIER_OFFSET + 8 * (BARRIERS + DQ_BARRIERS);
  static constexpr int PRODUCER_REGISTERS = 24;
  static constexpr int CONSUMER_REGISTERS = 240;
  static constexpr int ENTRY_REGISTERS = (65536 / THREADS) / 8 * 8;
  // Per query block: Q and dO tiles, LSE_2 and delta rows.
  static constexpr int STEP_BYTES = 2 * Q_BYTES + 2 * ROW_BYTES;

  static_assert(SWIZZLE == 128, "head dims whose rows are whole 128-byte swizzle spans (64, 128, 192, 256)");
  static_assert(D % SLAB == 0 && D >= 64 && D <= 256, "head dim");
  static_assert(BM * ELEM == 128, "a dS^T row is one 128-byte swizzle span");
  static_assert(STAGES * 4 <= 16, "ALiBi: the stages' slopes");
  static_assert(BM == packed::BLOCK, "the per-row buffers' blocks (and ALiBi's split of the bias) are query blocks");
  static_assert(SLABS <= CONSUMERS, "dQ: at most one 64-column slab per consumer warpgroup");
  static_assert(PRODUCER_REGISTERS * 128 + CONSUMER_REGISTERS * 128 * CONSUMERS <= 65536, "register file");
  static_assert((CONSUMER_REGISTERS - ENTRY_REGISTERS) * CONSUMERS <= ENTRY_REGISTERS - PRODUCER_REGISTERS,
                "the consumers take more registers than the producer frees");
};

// Kernel arguments other than the tensor maps (see hopper_bwd.cu and flash_cuda/hopper_bwd.py).
struct Params {
  u16* dk;
  u16* dv;
  float* dq_acc;       // (batch, heads_q, s_pad / BM, D / SLAB, BM * SLAB) fp32 in fragment order, zeroed
  const float* lse2;   // (batch, heads_q, s_pad): LSE * log2(e); +inf for rows without keys or past len_q
  const float* delta;  // (batch, heads_q, s_pad): rowsum(dO o O); 0 past len_q
  i64 dk_sb, dk_ss, dk_sh, dv_sb, dv_ss, dv_sh;
  int seqlen_q, seqlen_k, s_pad, heads_q, group, head_dim;
  int win_left, win_right;  // window reach (a large value for an unbounded side)
  float score_log2;         // scale * log2(e); softcap: cap * log2(e)
  float scale;              // softmax scale (dK is stored times it)
  // VARLEN: batch + 1 offsets of the sequences in the packed q/dO (total_q rows) and k/v (total_k);
  // seqlen_q/k are then the longest, s_pad the buffers' rows per head (hopper_bwd_packed.cuh).
  const int* cu_q;
  const int* cu_k;
  int total_q, total_k;
  int* dq_turns;            // deterministic: per dQ tile (indexed like dq_acc's), the reductions done; zeroed
  float softcap_in;         // softcap: tanh argument per unit of raw score, scale / cap
  float softcap_t2;         // softcap: 1 / (cap log2 e)^2, t^2 per squared log2 P + LSE_2 (capped_dp_to_ds)
  // EXTRA: int32 (batch|1, key blocks, 4): per key block, the query blocks [m_lo, m_hi) that see one
  // of its keys and [free_lo, free_hi) whose every query sees all of them; int32 (batch|1, seqlen_k,
  // 2): per key, the queries [lo, hi) that see it. Batch strides in ints, 0 for a shared mask.
  const int* blocks;
  const int* keys;
  i64 blocks_sb, keys_sb;
  // ALIBI: float32 slopes, slope of (batch, query head) at batch * slopes_sb + head * slopes_sh
  const float* slopes;
  i64 slopes_sb, slopes_sh;
};

// Two ints (the queries [lo, hi) that see a key, Params::keys).
struct IntPair {
  int lo, hi;
};

// Two ints of one 8-byte load issued here: the walk's steps read a key's pair again rather than keep
// it (hoisted out of the walk, the loads took four registers and d128 spilled 288 bytes).
__device__ __forceinline__ IntPair load_pair_once(const int* p) {
  IntPair v;
  asm volatile("ld.global.nc.v2.b32 {%0, %1}, [%2];\n" : "=r"(v.lo), "=r"(v.hi) : "l"(p));
  return v;
}

// Floor and ceiling of a / b for b > 0 and any sign of a.
__device__ __forceinline__ i64 floor_div(i64 a, i64 b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
__device__ __forceinline__ i64 ceil_div(i64 a, i64 b) { return -floor_div(-a, b); }

// The key block of the thread block at `position` among its (batch, KV head)'s: in order, reversed in
// deterministic mode, where the key blocks take their turns at a query block's dQ from the last to
// the first (write_dq): under a causal or window mask the later key blocks reach a query block
// first (fewer query blocks before it), and launching them first keeps a waiting block from
// waiting for one not yet launched.
template <class S>
__device__ __forceinline__ int key_block(int position, int key_blocks) {
  return S::DETERMINISTIC ? key_blocks - 1 - position : position;
}

// The key block's work: which query blocks see one of its keys, and which of them need the mask.
template <class S>
struct Block {
  // The walk: query blocks [first(p), m_hi); m_lo, its first by causal/window.
  int batch, kv_head, n0, m_lo, m_hi;
  // Query blocks m with free_lo <= m < free_hi need no element mask (every key of the block below
  // len_k and inside both edges for every row); two bounds, so that few values stay live.
  int free_lo, free_hi;
  // The sequence: its lengths, its first rows in q/dO and k/v, its first query block in the per-row
  // buffers, and the batch index of the tensors and buffers (0, and offsets, in a packed batch).
  int len_q, len_k, q_start, k_start, q_block0, batch_coord;

  // Where the block's sequence lies (fixed length: batch row `batch`, every length the same).
  __device__ __forceinline__ void locate(const Params& p) {
    if constexpr (S::VARLEN) {
      const PackedRange sq = packed_range(p.cu_q, batch, p.total_q, p.seqlen_q);
      const PackedRange sk = packed_range(p.cu_k, batch, p.total_k, p.seqlen_k);
      len_q = sq.len;
      len_k = sk.len;
      q_start = sq.start;
      k_start = sk.start;
      q_block0 = packed::first_block(sq.start, batch);
      batch_coord = 0;
    } else {
      len_q = p.seqlen_q;
      len_k = p.seqlen_k;
      q_start = k_start = q_block0 = 0;
      batch_coord = batch;
    }
  }

  // Whether the block holds keys of its sequence (always at fixed length: the grid is the keys').
  __device__ __forceinline__ bool has_keys() const { return S::VARLEN ? n0 < len_k : true; }

  // The first row of (this sequence, query head `head`) in the per-row buffers; / BM: in dQ's workspace.
  __device__ __forceinline__ i64 buffer_row(const Params& p, int head) const {
    return ((i64)batch_coord * p.heads_q + head) * p.s_pad + (i64)q_block0 * S::BM;
  }

  __device__ __forceinline__ void set(const Params& p) {
    // blockIdx.x = (batch * heads_kv + kv_head) * key_blocks + key block
    const int key_blocks = (p.seqlen_k + S::BN - 1) / S::BN, heads_kv = p.heads_q / p.group;
    const int pair = (int)blockIdx.x / key_blocks;
    n0 = key_block<S>((int)blockIdx.x - pair * key_blocks, key_blocks) * S::BN;
    kv_head = pair % heads_kv;
    batch = pair / heads_kv;
    locate(p);
    const i64 off = (i64)len_k - len_q;
    i64 q_lo = 0, q_hi = len_q;
    // key j is seen by query i iff j - i - off <= right (i >= j - off - right) and >= -left
    if constexpr (S::MASK >= 1) q_lo = max((i64)0, (i64)n0 - off - p.win_right);
    if constexpr (S::MASK == 2) {
      const i64 last_key = min((i64)n0 + S::BN, (i64)len_k) - 1;
      q_hi = min(q_hi, last_key - off + p.win_left + 1);
    }
    m_lo = m_hi = 0;
    if (q_hi > q_lo) {
      m_lo = (int)(q_lo / S::BM);
      m_hi = (int)((q_hi + S::BM - 1) / S::BM);
    }
    // right edge: (n0 + BN - 1) - m0 - off <= right for every element; left: n0 - (m0 + BM - 1) - off >= -left
    i64 lo = 0, hi = (i64)1 << 30;
    if constexpr (S::MASK >= 1) lo = ceil_div((i64)n0 + S::BN - 1 - off - p.win_right, S::BM);
    if constexpr (S::MASK == 2) hi = floor_div((i64)n0 - off + p.win_left - S::BM + 1, S::BM) + 1;
    if (n0 + S::BN > len_k) lo = hi;  // keys past len_k: every block masked
    free_lo = (int)max((i64)-1, min(lo, (i64)1 << 30));
    free_hi = (int)max((i64)-1, min(hi, (i64)1 << 30));
    if constexpr (S::EXTRA) narrow(p);
  }

  // Int k of the extra mask's four for this key block (Params::blocks), read where needed, not kept:
  // a value loaded, not computed, held across the walk took a register d128's consumers do not have.
  __device__ __forceinline__ int extra_row(const Params& p, int k) const {
    return load_once(p.blocks + batch * p.blocks_sb + (n0 / S::BN) * 4 + k);
  }

  // The walk [m_lo, m_hi) intersected with the extra mask's (both intervals of query blocks); its
  // first block is read again where needed (first), not kept in m_lo.
  __device__ __forceinline__ void narrow(const Params& p) {
    m_hi = min(m_hi, extra_row(p, 1));
    if (m_hi <= max(m_lo, extra_row(p, 0))) m_lo = m_hi = 0;
  }

  // The walk's first query block and its number of query blocks.
  __device__ __forceinline__ int first(const Params& p) const {
    if constexpr (S::EXTRA) return m_hi > 0 ? max(m_lo, extra_row(p, 0)) : 0;
    return m_lo;
  }
  __device__ __forceinline__ int blocks(const Params& p) const { return m_hi - first(p); }

  __device__ __forceinline__ bool masked(const Params& p, int m) const {
    if (m < free_lo || m >= free_hi) return true;
    if constexpr (S::EXTRA) return m < extra_row(p, 2) || m >= extra_row(p, 3);
    return false;
  }

  // Deterministic mode: how many key blocks add to query block m's dQ before this one, i.e. those
  // after it (key_block) that see a row of m. Those are consecutive (set's q_lo and q_hi do not
  // decrease with n0, and q_lo < q_hi for every key block past one that sees a row), so they run
  // up to the last whose q_lo is below m's end (m >= its m_lo), or the last of all (replayed
  // against set's ranges in tests/backends/test_cuda_hopper_bwd_compile.py).
  __device__ __forceinline__ int turn(const Params& p, int m) const {
    const int key_blocks = (p.seqlen_k + S::BN - 1) / S::BN;
    i64 last = key_blocks - 1;
    if constexpr (S::MASK >= 1) {
      // n0' - off - right < (m + 1) BM
      const i64 bound = (i64)(m + 1) * S::BM + ((i64)p.seqlen_k - p.seqlen_q) + p.win_right;
      last = min(last, ceil_div(bound, S::BN) - 1);
    }
    return (int)last - n0 / S::BN;
  }
};

template <class S>
struct Smem {
  u32 base;
  __device__ __forceinline__ SmemTile<S::BN, S> k() const { return {base + S::K_OFFSET}; }
  __device__ __forceinline__ SmemTile<S::BN, S> v() const { return {base + S::V_OFFSET}; }
  __device__ __forceinline__ SmemTile<S::BM, S> q(int st) const { return {base + S::Q_OFFSET + st * S::Q_BYTES}; }
  __device__ __forceinline__ SmemTile<S::BM, S> dout(int st) const { return {base + S::DO_OFFSET + st * S::Q_BYTES}; }
  __device__ __forceinline__ u32 ds(int buf, int wg) const {
    return base + S::DS_OFFSET + (buf * S::CONSUMERS + wg) * S::DS_BYTES;
  }
  __device__ __forceinline__ u32 dq(int wg) const { return base + S::DQ_OFFSET + wg * S::DQ_TILE * 4; }
  __device__ __forceinline__ u32 lse(int st) const { return base + S::LSE_OFFSET + st * S::ROW_BYTES; }
  __device__ __forceinline__ u32 delta(int st) const { return base + S::DELTA_OFFSET + st * S::ROW_BYTES; }
  __device__ __forceinline__ u32 keys(int wg) const { return base + S::KEYS_OFFSET + wg * 64 * 8; }
  __device__ __forceinline__ u32 slope(int st) const { return base + S::SLOPE_OFFSET + st * 4; }
  __device__ __forceinline__ u32 barrier(int i) const { return base + S::BARRIER_OFFSET + 8 * i; }
  __device__ __forceinline__ u32 kv_full() const { return barrier(0); }
  __device__ __forceinline__ u32 full(int st) const { return barrier(1 + st); }
  __device__ __forceinline__ u32 empty(int st) const { return barrier(1 + S::STAGES + st); }
  __device__ __forceinline__ u32 ds_full(int buf) const { return barrier(1 + 2 * S::STAGES + buf); }
  __device__ __forceinline__ u32 ds_empty(int buf) const { return barrier(3 + 2 * S::STAGES + buf); }
  // deterministic mode: warpgroup wg's dQ staging tile filled (for the writer) and read (for wg)
  __device__ __forceinline__ u32 dq_full(int wg) const { return barrier(S::BARRIERS + wg); }
  __device__ __forceinline__ u32 dq_empty(int wg) const { return barrier(S::BARRIERS + S::CONSUMERS + wg); }

  __device__ void init() const {
    mbarrier_init(kv_full(), 1);
#pragma unroll
    for (int st = 0; st < S::STAGES; ++st) {
      mbarrier_init(full(st), 1);
      mbarrier_init(empty(st), 4 * S::CONSUMERS);
    }
#pragma unroll
    for (int buf = 0; buf < 2; ++buf) {
      mbarrier_init(ds_full(buf), 4 * S::CONSUMERS);               // every consumer warp stored its dS^T
      mbarrier_init(ds_empty(buf), 4 * (S::SLABS == 1 ? 1 : 2));  // the warps of the dQ products done
    }
    if constexpr (S::DETERMINISTIC) {
#pragma unroll
      for (int wg = 0; wg < S::CONSUMERS; ++wg) {
        mbarrier_init(dq_full(wg), 1);
        mbarrier_init(dq_empty(wg), 1);
      }
    }
    fence_barrier_init();
  }
};

// ------------------------------------------------------------------ producer

template <class S>
__device__ void produce(const Params& p, const Smem<S>& sm, const Block<S>& blk, const TensorMap* q_map,
                        const TensorMap* k_map, const TensorMap* v_map, const TensorMap* do_map) {
  tma_prefetch_map(q_map);
  tma_prefetch_map(k_map);
  tma_prefetch_map(v_map);
  tma_prefetch_map(do_map);
  mbarrier_arrive_expect(sm.kv_full(), 2 * S::KV_BYTES);
  hopper::tma_load_tile(sm.k(), k_map, sm.kv_full(), blk.kv_head, blk.k_start + blk.n0, blk.batch_coord);
  hopper::tma_load_tile(sm.v(), v_map, sm.kv_full(), blk.kv_head, blk.k_start + blk.n0, blk.batch_coord);
  Ring<S::STAGES> ring;
  const int blocks = blk.blocks(p);
  // one loop over (query head of the group, query block): fewer values live across the steps
  for (int it = 0; it < p.group * blocks; ++it) {
    const int head = blk.kv_head * p.group + it / blocks, m = blk.first(p) + it % blocks;
    const i64 rows = blk.buffer_row(p, head);
    const int m0 = m * S::BM;
    mbarrier_wait(sm.empty(ring.stage), ring.phase ^ 1);
    if constexpr (S::ALIBI) {  // before the arrive below, which releases it to the consumers
      const float slope = p.slopes[blk.batch * p.slopes_sb + head * p.slopes_sh];
      st_shared_u32(sm.slope(ring.stage), __float_as_uint(slope * 1.4426950408889634f));
    }
    const u32 bar = sm.full(ring.stage);
    mbarrier_arrive_expect(bar, S::STEP_BYTES);
    hopper::tma_load_tile(sm.q(ring.stage), q_map, bar, head, blk.q_start + m0, blk.batch_coord);
    hopper::tma_load_tile(sm.dout(ring.stage), do_map, bar, head, blk.q_start + m0, blk.batch_coord);
    bulk_load(sm.lse(ring.stage), p.lse2 + rows + m0, S::ROW_BYTES, bar);
    bulk_load(sm.delta(ring.stage), p.delta + rows + m0, S::ROW_BYTES, bar);
    ring.advance();
  }
}

// ------------------------------------------------------------------ consumers

// Operand of a product whose B is read N-major from rows row0 .. of a (ROWS x D) tile, head-dim
// columns of slab `slab` only (dQ's B: 64 keys of K, one slab of columns).
template <int ROWS, class S>
__device__ __forceinline__ u64 n_major_rows(const SmemTile<ROWS, S>& t, int row0, int slab) {
  constexpr int SLAB_BYTES = SmemTile<ROWS, S>::SLAB_BYTES;
  return smem_descriptor<S::SWIZZLE>(t.base + slab * SLAB_BYTES + row0 * S::SWIZZLE, SLAB_BYTES, 8 * S::SWIZZLE);
}

// The -inf of the scores (rows: keys, columns: queries) no query may see. `key`: the thread's row 0
// key; `q0`: the query of its element (0, row, 0); EXTRA: `keys_row`, its row 0 key's pair in the
// table of stage_keys (two comparisons per score).
template <class S, int N>
__device__ __forceinline__ void mask_transposed(const Params& p, const Block<S>& blk, Acc<N>& s, int key, int q0,
                                                u32 keys_row) {
  const int off = blk.len_k - blk.len_q;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = key + 8 * r;
    IntPair seen{0, 0};
    if constexpr (S::EXTRA) {
      asm volatile("ld.shared.v2.b32 {%0, %1}, [%2];\n" : "=r"(seen.lo), "=r"(seen.hi) : "r"(keys_row + 64 * r));
    }
#pragma unroll
    for (int i = 0; i < Acc<N>::TILES; ++i) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int q = q0 + 8 * i + c;
        bool visible;
        if constexpr (S::EXTRA) {
          visible = q >= seen.lo && q < seen.hi;
        } else {
          const int delta = j - q - off;
          visible = j < blk.len_k;
          if constexpr (S::MASK >= 1) visible = visible && delta <= p.win_right;
          if constexpr (S::MASK == 2) visible = visible && delta >= -p.win_left;
        }
        if (!visible) s.at(i, r, c) = neg_inf();
      }
    }
  }
}

template <class S>
__device__ __forceinline__ float ld_shared_f32(u32 address) {
  return __uint_as_float(ld_shared_u32(address));
}

// 16-bit values of a (rows x D) accumulator (rows: the thread's two keys) to global memory, times `factor`.
template <class S>
__device__ __forceinline__ void store_rows(u16* base, i64 ss, int key, int len_k, int head_dim, int quad_col,
                                           Acc<S::D>& a, float factor) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = key + 8 * r;
    if (j >= len_k) continue;
    u16* dst = base + (i64)j * ss;
#pragma unroll
    for (int i = 0; i < Acc<S::D>::TILES; ++i) {
      const int col = 8 * i + quad_col;
      if (col < head_dim) {
        *reinterpret_cast<u32*>(dst + col) =
            pack2<S::INPUT == hopper::INPUT_BF16>(a.at(i, r, 0) * factor, a.at(i, r, 1) * factor);
      }
    }
  }
}

// What a consumer thread keeps about itself.
template <class S>
struct Lane {
  int wg, tid, lane_row, quad_col, key;
  bool warp_leader;
  __device__ __forceinline__ Lane(const Block<S>& blk, int wg_) : wg(wg_) {
    tid = threadIdx.x % 128;
    const int warp = tid / 32, lane = tid % 32;
    lane_row = 16 * warp + lane / 4;  // the thread's row 0 within the warpgroup's 64 keys
    quad_col = 2 * (lane % 4);
    warp_leader = lane == 0;
    key = blk.n0 + 64 * wg + lane_row;  // the thread's row-0 key
  }
  // The warp's leader arrives on `bar` for the whole warp once every lane is there, so that the
  // lanes' own shared-memory reads (LSE, delta) and writes (dS^T) come before the arrive that
  // lets another warpgroup or the producer at that memory (compute-sanitizer racecheck: without
  // the __syncwarp, lanes still reading were not ordered before the leader's release).
  __device__ __forceinline__ void warp_arrive(u32 bar) const {
    __syncwarp();
    if (warp_leader) mbarrier_arrive(bar);
  }
  // Releases a ring stage whose LSE/delta rows the lanes read with ordinary (generic-proxy) loads
  // to the producer, whose next bulk copy rewrites them through the async proxy: the proxy fence
  // orders the reads before that write (racecheck reported the pair without it).
  __device__ __forceinline__ void release_stage(u32 empty) const {
    fence_proxy_async();
    warp_arrive(empty);
  }
};

// A named barrier that threads may reach from different instructions: the two consumer warpgroups
// run two instantiations of one function, and bar.sync (barrier.sync.aligned) requires every thread
// to execute the same instruction (compute-sanitizer synccheck: "divergent threads" at BOTH_BARRIER).
// The unaligned form also takes a warp that an elected lane's wait left split.
__device__ __forceinline__ void shared_barrier(int id, int threads) {
  asm volatile("barrier.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// The step `it` of the (query head, query block) walk.
template <class S>
struct Step {
  int m;
  i64 rows;  // the (sequence, head)'s first row in the per-row buffers (Block::buffer_row)
  __device__ __forceinline__ Step(const Params& p, const Block<S>& blk, int it, int blocks) {
    const int head = blk.kv_head * p.group + it / blocks;
    m = blk.first(p) + it % blocks;
    rows = blk.buffer_row(p, head);
  }
  // The workspace's 64 x 64 dQ tile of (this query block, head-dim slab).
  __device__ __forceinline__ u64 dq_tile(int slab) const { return (u64)((rows / S::BM + m) * S::SLABS + slab); }
};

// Issue S^T = K Q^T and dP^T = V dO^T for the warpgroup's 64 keys, two groups.
template <class S>
__device__ __forceinline__ void issue_s_dp(Acc<S::BM>& s, Acc<S::BM>& dp, const SmemTile<S::BN, S>& kt,
                                           const SmemTile<S::BN, S>& vt, const SmemTile<S::BM, S>& qt,
                                           const SmemTile<S::BM, S>& dot, int wg) {
  hopper::pin(s);
  hopper::pin(dp);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < S::D * S::ELEM / 32; ++kk) Wgmma<S::BM>::ss(s.v, kt.k_major(64 * wg, kk), qt.k_major(0, kk), kk > 0);
  wgmma_commit();
#pragma unroll
  for (int kk = 0; kk < S::D * S::ELEM / 32; ++kk) Wgmma<S::BM>::ss(dp.v, vt.k_major(64 * wg, kk), dot.k_major(0, kk), kk > 0);
  wgmma_commit();
  hopper::pin(s);
  hopper::pin(dp);
}

// EXTRA: the queries [lo, hi) that see each of the thread's two keys, by every mask (each gives an
// interval: causal/window j - off - right <= q <= j - off + left), to the warpgroup's shared table
// once per block; the masked steps read them back (held in registers, d128 spilled). Each of the
// quad's lanes writes the same pair; its warp alone reads it back.
template <class S>
__device__ __forceinline__ void stage_keys(const Params& p, const Block<S>& blk, const Lane<S>& ln, u32 table) {
  const int off = blk.len_k - blk.len_q;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = ln.key + 8 * r;
    IntPair seen{0, 0};
    if (j < blk.len_k) seen = load_pair_once(p.keys + blk.batch * p.keys_sb + 2 * j);
    if constexpr (S::MASK >= 1) seen.lo = (int)max((i64)seen.lo, (i64)j - off - p.win_right);
    if constexpr (S::MASK == 2) seen.hi = (int)min((i64)seen.hi, (i64)j - off + p.win_left + 1);
    asm volatile("st.shared.v2.b32 [%0], {%1, %2};\n" ::"r"(table + (ln.lane_row + 8 * r) * 8), "r"(seen.lo),
                 "r"(seen.hi)
                 : "memory");
  }
  __syncwarp();
}

// P^T = exp2(S^T * scale log2 e - LSE_2), in place (masked scores first). Softcap: the scores are
// cap * t, t = tanh(raw * scale / cap), and p.score_log2 = cap log2 e; t replaces S^T first.
// ALIBI (right reach 0: every visible key has j <= i + off, so |i + off - j| = i + off - j): the bias
// -slope2 (i + off - j) splits around the query block's first row m0 into a per-query part the rows
// pass added to LSE_2, slope2 (i - m0), and a per-key part, slope2 (j - m0 - off), one FADD per
// score. Both parts stay small for the scores that matter (j - m0 - off < BM where visible), where
// folding absolute positions would cancel values of slope * seqlen in fp32.
template <class S>
__device__ __forceinline__ void scores_to_p(const Params& p, const Block<S>& blk, const Lane<S>& ln, int m, u32 lse_row,
                                            Acc<S::BM>& s, u32 keys_row, u32 slope_at) {
  if constexpr (S::SOFTCAP) hopper::softcap(s, p.softcap_in);
  if (blk.masked(p, m)) {
    mask_transposed<S>(p, blk, s, ln.key, m * S::BM + ln.quad_col, keys_row);
  }
  float key_bias[2] = {0.f, 0.f};
  if constexpr (S::ALIBI) {
    const float slope2 = ld_shared_f32<S>(slope_at);
    const int j0 = ln.key - m * S::BM - (blk.len_k - blk.len_q);
#pragma unroll
    for (int r = 0; r < 2; ++r) key_bias[r] = __fmul_rn(slope2, (float)(j0 + 8 * r));  // 2 registers, not 3
  }
#pragma unroll
  for (int i = 0; i < Acc<S::BM>::TILES; ++i) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const float l = ld_shared_f32<S>(lse_row + 4 * (8 * i + ln.quad_col + c));
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        // without ALiBi no FADD: 0 - l is not folded to -l (signed zeros)
        const float shift = S::ALIBI ? key_bias[r] - l : -l;
        s.at(i, r, c) = exp2_approx(fmaf(s.at(i, r, c), p.score_log2, shift));
      }
    }
  }
}

// dS^T = P^T o (dP^T - delta), in place of dP^T.
template <class S>
__device__ __forceinline__ void dp_to_ds(const Lane<S>& ln, u32 delta_row, const Acc<S::BM>& pt, Acc<S::BM>& dp) {
#pragma unroll
  for (int i = 0; i < Acc<S::BM>::TILES; ++i) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const float dl = ld_shared_f32<S>(delta_row + 4 * (8 * i + ln.quad_col + c));
#pragma unroll
      for (int r = 0; r < 2; ++r) dp.at(i, r, c) = pt.v[4 * i + 2 * r + c] * (dp.at(i, r, c) - dl);
    }
  }
}

// Softcap: dS^T = P^T o (dP^T - delta) o (1 - t^2), the derivative of cap * tanh(raw * scale / cap)
// (its factor scale is applied to dQ and dK at the end, as without softcap). t is not kept beside
// P^T (32 more registers; keeping 1 - t^2 packed beside it spilled 72 bytes at d128): it comes back
// from P^T, t * cap log2 e = log2(P^T) + LSE_2, one more MUFU op per element (p.softcap_t2 is the
// host's 1 / (cap log2 e)^2: a division here took a register d128's window variant did not have).
// Where P^T = 0 (masked, or a row past the sequence: LSE_2 = +inf) the factor is -inf or NaN, which
// max(., 0) turns into 0 (max returns its non-NaN operand).
template <class S>
__device__ __forceinline__ void capped_dp_to_ds(const Params& p, const Lane<S>& ln, u32 lse_row, u32 delta_row,
                                                const Acc<S::BM>& pt, Acc<S::BM>& dp) {
#pragma unroll
  for (int i = 0; i < Acc<S::BM>::TILES; ++i) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int q = 8 * i + ln.quad_col + c;
      const float l = ld_shared_f32<S>(lse_row + 4 * q), dl = ld_shared_f32<S>(delta_row + 4 * q);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float pr = pt.v[4 * i + 2 * r + c], u = log2_approx(pr) + l;  // u = t * cap log2 e
        dp.at(i, r, c) = pr * fmaxf(fmaf(-u * u, p.softcap_t2, 1.f), 0.f) * (dp.at(i, r, c) - dl);
      }
    }
  }
}

// dS^T to the warpgroup's tile: row = key (64 rows), 64 queries of 2 bytes per row (128-byte
// swizzle). Operand register 2i + r holds row r, queries 8i + quad_col, + 1.
template <class S>
__device__ __forceinline__ void store_ds(const Lane<S>& ln, u32 tile, const Operand<S::BM, 2>& dsm) {
#pragma unroll
  for (int i = 0; i < Acc<S::BM>::TILES; ++i) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const u32 offset = (u32)(ln.lane_row + 8 * r) * 128u + (u32)(8 * i + ln.quad_col) * 2u;
      st_shared_u32(tile + swizzled<128>(offset), dsm.v[2 * i + r]);
    }
  }
}

// D (+)= A B with A from registers (P^T or dS^T) and B = a (BM x D) tile read N-major (dO or Q).
template <class S>
__device__ __forceinline__ void issue_rs(Acc<S::D>& acc, const Operand<S::BM, 2>& a, const SmemTile<S::BM, S>& b) {
#pragma unroll
  for (int kk = 0; kk < S::BM / 16; ++kk) {
    Wgmma<S::D>::rs(acc.v, a.v[4 * kk], a.v[4 * kk + 1], a.v[4 * kk + 2], a.v[4 * kk + 3], b.n_major(kk), 1);
  }
}

// Issue dQ = dS K for one slab: A = both warpgroups' dS^T of buffer `buf` read M-major, B = all
// 128 keys of K read N-major.
template <class S>
__device__ __forceinline__ void issue_dq(Acc<S::SLAB>& dq, const Smem<S>& sm, int buf, const SmemTile<S::BN, S>& kt,
                                         int slab) {
  hopper::pin(dq);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < S::BN / 16; ++kk) {
    const u64 a = smem_descriptor<128>(sm.ds(buf, kk / 4) + (kk % 4) * 16 * 128, S::DS_BYTES, 8 * 128);
    Wgmma<S::SLAB>::ss_t(dq.v, a, n_major_rows(kt, 16 * kk, slab), kk > 0);
  }
  wgmma_commit();
  hopper::pin(dq);
}

// A completed dQ slab to the workspace: staged in the fragment order (thread 0 of the warpgroup
// first waits until its last bulk reduction has read the staging tile), then one bulk reduction.
// Deterministic mode: the dQ writer (write_dq) issues the reduction; `k`: the warpgroup's k-th
// slab sent, that is the use of its staging tile (dq_sends).
template <class S>
__device__ __forceinline__ void send_dq(const Params& p, const Smem<S>& sm, const Lane<S>& ln, Acc<S::SLAB>& dq,
                                        u64 tile, int k) {
  if (ln.tid == 0) {
    if constexpr (S::DETERMINISTIC) {
      mbarrier_wait(sm.dq_empty(ln.wg), (k & 1) ^ 1);  // the writer has read use k - 1
    } else {
      bulk_wait_read<0>();
    }
  }
  shared_barrier(1 + ln.wg, 128);
  const u32 staging = sm.dq(ln.wg);
#pragma unroll
  for (int i = 0; i < Acc<S::SLAB>::TILES; ++i) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      st_shared_v2_f32(staging + (u32)(((2 * i + r) * 128 + ln.tid) * 8), dq.at(i, r, 0), dq.at(i, r, 1));
    }
  }
  fence_proxy_async();
  shared_barrier(1 + ln.wg, 128);
  if (ln.tid == 0) {
    if constexpr (S::DETERMINISTIC) {
      mbarrier_arrive(sm.dq_full(ln.wg));
    } else {
      bulk_reduce_add_f32(p.dq_acc + tile * S::DQ_TILE, staging, S::DQ_TILE * 4);
      bulk_commit();
    }
  }
}

// How many dQ slabs a consumer warpgroup has sent before step t's: one per step at d128 (its own
// slab), one every other step at d64 (the steps t with t % 2 == its index, dq_turn).
template <class S>
__device__ __forceinline__ int dq_sends(int t) {
  return S::SLABS == 2 ? t : t >> 1;
}

// Deterministic mode (S::DETERMINISTIC): the dQ writer, one thread of the producer warpgroup. The key
// blocks' bulk reductions into a dQ tile (query block, head-dim slab) happen in a fixed order, so
// that its fp32 sums are bit-identical run to run. Per tile a counter (p.dq_turns, zeroed, indexed
// like the tiles) holds how many key blocks' reductions into it have completed. Per step, in the
// consumers' order, the writer takes each slab the consumers staged (dq_full), spins (acquire)
// until the tile's counter equals the key block's turn (Block::turn), issues the reduction, hands
// the staging tile back once read (dq_empty), and once the reduction has COMPLETED (not only read
// shared memory) increments the counter (release). The consumers only stage and signal: waiting in
// their own threads took registers that d128's consumers do not have (ptxas spilled 176 bytes), and
// it would stall their products.
// Within a block every tile gets one reduction per slab: the steps are distinct (query head, query
// block) pairs; at d128 the warpgroups' slabs are different tiles with their own counters; at d64
// one warpgroup sends a step's slab (the pipelined consumer's zero step -1, whose zeros would go to
// step 0's tile, is not sent in this mode).
// Deadlock freedom: a block waits only for the key blocks after its own that see the query block,
// which have lower blockIdx.x of the same (batch, KV head) (key_block: reversed order). The hardware
// dispatches thread blocks in increasing blockIdx.x, so those are running or done, and they wait in
// turn only for lower ones: the lowest of a (batch, KV head) waits for none.
template <class S>
__device__ void write_dq(const Params& p, const Smem<S>& sm, const Block<S>& blk) {
  const int blocks = blk.blocks(p);
  for (int t = 0; t < p.group * blocks; ++t) {
    const Step<S> st(p, blk, t, blocks);
    const int turn = blk.turn(p, st.m), k = dq_sends<S>(t);
#pragma unroll
    for (int slab = 0; slab < S::SLABS; ++slab) {
      const int wg = S::SLABS == 2 ? slab : t & 1;
      const u64 tile = st.dq_tile(slab);
      mbarrier_wait(sm.dq_full(wg), k & 1);
      while (ld_acquire_gpu(p.dq_turns + tile) != turn) {
      }
      fence_proxy_async_global();  // the reduction (async proxy) after the acquire
      bulk_reduce_add_f32(p.dq_acc + tile * S::DQ_TILE, sm.dq(wg), S::DQ_TILE * 4);
      bulk_commit();
    }
    bulk_wait_read<0>();
#pragma unroll
    for (int slab = 0; slab < S::SLABS; ++slab) mbarrier_arrive(sm.dq_empty(S::SLABS == 2 ? slab : t & 1));
    bulk_wait<0>();
    fence_proxy_async_global();  // the reductions' writes before the release
#pragma unroll
    for (int slab = 0; slab < S::SLABS; ++slab) red_release_gpu_inc(p.dq_turns + st.dq_tile(slab));
  }
}

// dK (times scale) and dV of the warpgroup's keys, after the last bulk reduction is done.
template <class S>
__device__ __forceinline__ void finish(const Params& p, const Block<S>& blk, const Lane<S>& ln, Acc<S::D>& dk,
                                       Acc<S::D>& dv) {
  if (ln.tid == 0) bulk_wait<0>();  // the bulk reductions, before the block's shared memory goes
  const i64 key0 = blk.k_start;
  store_rows<S>(p.dk + (i64)blk.batch_coord * p.dk_sb + key0 * p.dk_ss + blk.kv_head * p.dk_sh, p.dk_ss, ln.key,
                blk.len_k, p.head_dim, ln.quad_col, dk, p.scale);
  store_rows<S>(p.dv + (i64)blk.batch_coord * p.dv_sb + key0 * p.dv_ss + blk.kv_head * p.dv_sh, p.dv_ss, ln.key,
                blk.len_k, p.head_dim, ln.quad_col, dv, 1.f);
}

// A compile-time flag for the generic step lambdas (C++17).
template <bool B>
struct Flag {
  static constexpr bool value = B;
};

// Whether warpgroup WG computes a dQ slab of step t: always for d128 (slab WG); for d64 (one
// slab) every other step, the warpgroups in turn (t = -1 is the pipelined consumer's zero step).
template <class S, int WG>
__device__ __forceinline__ bool dq_turn(int t) {
  return S::SLABS == 1 ? (t & 1) == WG : true;
}

// Runs step(Flag<dq>, it) for it = 0 .. steps - 1, dq = dq_turn(it - LAG): with LAG = 1 (the
// pipelined consumer) step it computes the dQ of step it - 1. Every branch on dq is resolved at
// compile time (two steps per round for d64): ptxas serialises every wgmma of the kernel (C7514)
// when one is issued under a run-time condition inside the loop, and peeling a step made it spill.
template <class S, int WG, int LAG, class Step>
__device__ __forceinline__ void walk(int steps, Step&& step) {
  if constexpr (S::SLABS == 2) {
    for (int it = 0; it < steps; ++it) step(Flag<true>{}, it);
  } else {
    // dq_turn(it - LAG) for even it: (LAG & 1) == WG
    int it = 0;
    for (; it + 1 < steps; it += 2) {
      step(Flag<WG == LAG>{}, it);
      step(Flag<WG != LAG>{}, it + 1);
    }
    if (it < steps) step(Flag<WG == LAG>{}, it);
  }
}

// The step-synchronous consumer: per step S^T and dP^T, P^T and dS^T, dV; then (both warpgroups'
// dS^T stored: a barrier) dQ of this step and dK, dQ staged and sent while dK runs.
template <class S, int WG>
__device__ void consume(const Params& p, const Smem<S>& sm, const Block<S>& blk) {
  constexpr bool BF16 = S::INPUT == hopper::INPUT_BF16;
  const Lane<S> ln(blk, WG);
  constexpr int slab = S::SLABS == 1 ? 0 : WG;
  Acc<S::D> dk, dv;
  hopper::fill(dk, 0.f);
  hopper::fill(dv, 0.f);
  Acc<S::BM> s, dp;
  Operand<S::BM, 2> pm, dsm;

  if constexpr (S::EXTRA) stage_keys<S>(p, blk, ln, sm.keys(WG));
  mbarrier_wait(sm.kv_full(), 0);
  const SmemTile<S::BN, S> kt = sm.k(), vt = sm.v();
  Ring<S::STAGES> ring;
  const int blocks = blk.blocks(p);
  // one walk over (query head of the group, query block): fewer values live across the steps
  walk<S, WG, 0>(p.group * blocks, [&](auto has_dq, int it) {
    constexpr bool DQ = decltype(has_dq)::value;
    const Step<S> st(p, blk, it, blocks);
    const SmemTile<S::BM, S> qt = sm.q(ring.stage), dot = sm.dout(ring.stage);
    mbarrier_wait(sm.full(ring.stage), ring.phase);
    issue_s_dp<S>(s, dp, kt, vt, qt, dot, WG);
    wgmma_wait<1>();
    hopper::pin(s);
    scores_to_p<S>(p, blk, ln, st.m, sm.lse(ring.stage), s, sm.keys(WG) + ln.lane_row * 8, sm.slope(ring.stage));
    wgmma_wait<0>();
    hopper::pin(dp);
    if constexpr (S::SOFTCAP) {
      capped_dp_to_ds<S>(p, ln, sm.lse(ring.stage), sm.delta(ring.stage), s, dp);
    } else {
      dp_to_ds<S>(ln, sm.delta(ring.stage), s, dp);
    }
    hopper::to_operand<BF16>(s, pm);
    hopper::to_operand<BF16>(dp, dsm);
    const int buf = it & 1;  // the step's dS^T buffer (both warpgroups count steps alike)
    store_ds<S>(ln, sm.ds(buf, WG), dsm);
    hopper::pin(dv);
    hopper::pin(dk);
    hopper::pin(pm);
    hopper::pin(dsm);
    wgmma_fence();
    issue_rs<S>(dv, pm, dot);
    wgmma_commit();
    hopper::pin(dv);
    fence_proxy_async();
    shared_barrier(BOTH_BARRIER, 256);
    Acc<S::SLAB> dq;
    if constexpr (DQ) issue_dq<S>(dq, sm, buf, kt, slab);
    wgmma_fence();
    issue_rs<S>(dk, dsm, qt);
    wgmma_commit();
    hopper::pin(dk);
    if constexpr (DQ) {
      wgmma_wait<1>();
      hopper::pin(dq);
      send_dq<S>(p, sm, ln, dq, st.dq_tile(slab), dq_sends<S>(it));
    }
    wgmma_wait<0>();
    hopper::pin(dv);
    hopper::pin(dk);
    hopper::pin(pm);
    hopper::pin(dsm);
    ln.release_stage(sm.empty(ring.stage));
    ring.advance();
  });
  finish<S>(p, blk, ln, dk, dv);
}

// The pipelined consumer: dQ of step it - 1 runs between dV and dK of step it and is sent while dK
// runs, so a warpgroup needs the other's dS^T of a step only one step later: the warpgroups meet
// through the dS^T buffers' mbarriers (ds_full: both warpgroups stored theirs; ds_empty: the dQ
// products that read it are done) instead of a barrier per step, and drift up to a step apart
// (one's exponentials under the other's products). Step 0 computes the dQ of a step -1 whose dS^T
// (buffer 1) is zeros, so that every step has the same shape (its zeros go to step 0's tile).
// Buffer b's k-th use is step t with k = (t + 1) >> 1 (t = -1, 1, 3, ... for buffer 1).
template <class S, int WG>
__device__ void consume_pipelined(const Params& p, const Smem<S>& sm, const Block<S>& blk) {
  constexpr bool BF16 = S::INPUT == hopper::INPUT_BF16;
  const Lane<S> ln(blk, WG);
  constexpr int slab = S::SLABS == 1 ? 0 : WG;
  Acc<S::D> dk, dv;
  hopper::fill(dk, 0.f);
  hopper::fill(dv, 0.f);
  Acc<S::BM> s, dp;
  Operand<S::BM, 2> pm, dsm;

  if constexpr (S::EXTRA) stage_keys<S>(p, blk, ln, sm.keys(WG));
  mbarrier_wait(sm.kv_full(), 0);
  const SmemTile<S::BN, S> kt = sm.k(), vt = sm.v();
  Ring<S::STAGES> ring;
  const int blocks = blk.blocks(p);
  const int steps = p.group * blocks;
  {  // step -1: zeros in buffer 1
    const u32 tile = sm.ds(1, WG) + ln.tid * (S::DS_BYTES / 128);
#pragma unroll
    for (int b = 0; b < S::DS_BYTES / 128; b += 4) st_shared_u32(tile + b, 0u);
    fence_proxy_async();
    ln.warp_arrive(sm.ds_full(1));
  }
  walk<S, WG, 1>(steps, [&](auto prev_dq, int it) {
    constexpr bool DQ = decltype(prev_dq)::value;  // this step computes dQ of step it - 1
    const Step<S> st(p, blk, it, blocks);
    const SmemTile<S::BM, S> qt = sm.q(ring.stage), dot = sm.dout(ring.stage);
    mbarrier_wait(sm.full(ring.stage), ring.phase);
    issue_s_dp<S>(s, dp, kt, vt, qt, dot, WG);
    wgmma_wait<1>();
    hopper::pin(s);
    scores_to_p<S>(p, blk, ln, st.m, sm.lse(ring.stage), s, sm.keys(WG) + ln.lane_row * 8, sm.slope(ring.stage));
    wgmma_wait<0>();
    hopper::pin(dp);
    if constexpr (S::SOFTCAP) {
      capped_dp_to_ds<S>(p, ln, sm.lse(ring.stage), sm.delta(ring.stage), s, dp);
    } else {
      dp_to_ds<S>(ln, sm.delta(ring.stage), s, dp);
    }
    hopper::to_operand<BF16>(s, pm);
    hopper::to_operand<BF16>(dp, dsm);
    const int buf = it & 1;
    if (it >= 1) mbarrier_wait(sm.ds_empty(buf), ((it - 1) >> 1) & 1);  // dQ of step it - 2 read it
    store_ds<S>(ln, sm.ds(buf, WG), dsm);
    fence_proxy_async();
    ln.warp_arrive(sm.ds_full(buf));
    hopper::pin(dv);
    hopper::pin(dk);
    hopper::pin(pm);
    hopper::pin(dsm);
    wgmma_fence();
    issue_rs<S>(dv, pm, dot);
    wgmma_commit();
    hopper::pin(dv);
    // dQ of the previous step (both warpgroups' dS^T of it stored long since)
    Acc<S::SLAB> dq;
    if constexpr (DQ) {
      const int t = it - 1;
      mbarrier_wait(sm.ds_full(t & 1), ((t + 1) >> 1) & 1);
      issue_dq<S>(dq, sm, t & 1, kt, slab);
    }
    wgmma_fence();
    issue_rs<S>(dk, dsm, qt);
    wgmma_commit();
    hopper::pin(dk);
    if constexpr (DQ) {
      wgmma_wait<1>();
      hopper::pin(dq);
      ln.warp_arrive(sm.ds_empty((it - 1) & 1));
      // deterministic: not step -1's zeros (the writer takes one slab per step and tile)
      if (!S::DETERMINISTIC || it >= 1) {
        send_dq<S>(p, sm, ln, dq, Step<S>(p, blk, max(it - 1, 0), blocks).dq_tile(slab), dq_sends<S>(it - 1));
      }
    }
    wgmma_wait<0>();
    hopper::pin(dv);
    hopper::pin(dk);
    hopper::pin(pm);
    hopper::pin(dsm);
    ln.release_stage(sm.empty(ring.stage));
    ring.advance();
  });
  if (steps > 0 && dq_turn<S, WG>(steps - 1)) {
    const int t = steps - 1;
    Acc<S::SLAB> dq;
    mbarrier_wait(sm.ds_full(t & 1), ((t + 1) >> 1) & 1);
    issue_dq<S>(dq, sm, t & 1, kt, slab);
    wgmma_wait<0>();
    hopper::pin(dq);
    send_dq<S>(p, sm, ln, dq, Step<S>(p, blk, t, blocks).dq_tile(slab), dq_sends<S>(t));
  }
  finish<S>(p, blk, ln, dk, dv);
}

template <class S>
__device__ __forceinline__ void backward(const Params& p, const TensorMap* q_map, const TensorMap* k_map,
                                         const TensorMap* v_map, const TensorMap* do_map) {
  extern __shared__ __attribute__((aligned(1024))) unsigned char smem_raw[];
  const Smem<S> sm{(shared_address(smem_raw) + 1023u) & ~1023u};  // the launch adds 1 KB of slack
  const int wg = threadIdx.x / 128;
  Block<S> blk;
  blk.set(p);
  if (!blk.has_keys()) return;  // a packed sequence shorter than the longest: the whole block, before any barrier
  if (threadIdx.x == 0) sm.init();
  __syncthreads();
  if (wg == 0) {
    registers_decrease<S::PRODUCER_REGISTERS>();
    if (threadIdx.x == 0) produce<S>(p, sm, blk, q_map, k_map, v_map, do_map);
    if constexpr (S::DETERMINISTIC) {
      if (threadIdx.x == 32) write_dq<S>(p, sm, blk);  // another warp: its waits do not hold up the loads
    }
  } else {
    registers_increase<S::CONSUMER_REGISTERS>();
    // the warpgroup is a template parameter: each one's dQ turns are known at compile time
    if constexpr (S::PIPELINED) {
      if (wg == 1) {
        consume_pipelined<S, 0>(p, sm, blk);
      } else {
        consume_pipelined<S, 1>(p, sm, blk);
      }
    } else {
      if (wg == 1) {
        consume<S, 0>(p, sm, blk);
      } else {
        consume<S, 1>(p, sm, blk);
      }
    }
  }
}

}  // namespace hopper_bwd
}  // namespace flash_cuda
