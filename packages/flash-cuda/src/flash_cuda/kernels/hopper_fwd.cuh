// FlashAttention forward for Hopper (sm_90a): TMA loads, wgmma, warp specialisation, persistent tiles.
//
// A thread block is resident on one SM for the whole launch and walks a static list of tiles
// (BM query rows of one sequence and head). Its warpgroups have fixed roles:
//
//  * warpgroup 0, the producer: one thread issues TMA loads, Q once per tile, K and V once per
//    key block, into shared-memory rings of STAGES buffers; mbarriers count the bytes in ("full")
//    and the consumers' releases ("empty"). The producer gives its registers to the consumers.
//  * warpgroups 1..CONSUMERS, the consumers: each owns 64 query rows of the tile and runs, per key
//    block, S = Q K^T (wgmma, Q and K in shared memory), the online softmax in registers, and
//    O += P V (wgmma, P from registers, V read N-major from shared memory by the descriptor).
//
// The softmax hides behind the tensor cores in two ways (FlashAttention-3):
//  * within a warpgroup, S of block j is issued before O += P V of block j - 1, and the softmax of
//    block j runs while that product is in flight;
//  * between warpgroups, a turn passes round on named barriers: a warpgroup issues its products in
//    its turn and passes the turn straight after issuing, so the others' softmax overlaps them.
//
// The pipeline runs across tiles: the first S of the next tile is issued with the last O += P V of
// the current one, and Q can be double-buffered (Q_STAGES), so a tile boundary costs little more
// than a key block. Key blocks are visited from the last to the first, so the blocks that need a
// mask (the causal diagonal, the sequence end) come first. O is rescaled lazily: a row's
// reference max moves only when it grows by more than RESCALE_LOG2 (base 2), so most blocks leave
// O alone.
//
// Tiles are (ROWS x D) shared-memory images written by TMA with the 128-byte (64-byte when a row is
// not a multiple of 128 bytes) swizzle, in slabs of SLAB columns; head dims short of D arrive
// zero-filled (TMA's out-of-bounds fill), rows past a tensor's end likewise. O and the LSE go
// straight from registers to global memory, rows past the sequence end and columns past head_dim
// skipped.
//
// fp8 inputs (e4m3, e5m2) use the same pipeline with Hopper's 8-bit wgmma (k = 32 bytes per step),
// which reads both operands K-major: for O += P V that means V with the keys contiguous, in the order
// P's registers hold them (fp8_key), so that P goes from the S accumulator to the 8-bit A operand
// without crossing lanes. A pre-pass (hopper_fwd_vt.cu) writes that V^T to global memory and the
// producer TMA-loads its tiles into the V ring (measured faster than transposing V in shared memory
// with the producer's spare warps, PERF_NOTES.md). The descale factors of Q and K fold into the
// tile's score scale, that of V into the output's normalisation.
//
// Masking (flash.masking, bottom-right aligned): query row i of a sequence sees key j iff
// j < len_k and -left <= j - i - (len_k - len_q) <= right. Mask kind 3 also bounds each row by an
// interval of keys read from global memory, [lo_i, hi_i) with neither end moving left as i grows
// (a key-padding mask: one interval per sequence; a block mask's key_intervals: one per row). A
// tile then walks only the key blocks of [lo of its first row, hi of its last), and a block needs
// the element mask only where it leaves [lo of the last row, hi of the first): the rest cost what
// they cost unmasked. A padded sequence with holes walks every block masked, its keys tested
// against the mask's bytes. Mask kind 4 walks a block-sparse mask's lists instead of a range: the
// tile (BM rows, one block row of the mask) visits the key blocks its partial and full lists name,
// each mask block split into kernel blocks, and masks no score but past len_k (the host sends only
// masks whose partial blocks are partial by reaching past a sequence's end).
#pragma once

#include "hopper_primitives.cuh"
#include "hopper_vt.cuh"

namespace flash_cuda {
namespace hopper {

using namespace sm90;

// A row's reference max (base 2) moves only when a block's max exceeds it by more than this.
constexpr float RESCALE_LOG2 = 8.f;
constexpr float LN2 = 0.6931471805599453f;
// Named barrier 0 is __syncthreads; the consumers' turns use 1..CONSUMERS.
constexpr int TURN_BARRIER = 1;
// Input element types (Shape::INPUT).
constexpr int INPUT_F16 = 0, INPUT_BF16 = 1, INPUT_E4M3 = 2, INPUT_E5M2 = 3;

template <int D_, int CONSUMERS_, int BN_, int Q_STAGES_, int INPUT_, bool OUT_BF16_, int MASK_>
struct Shape {
  static constexpr int D = D_;                  // head dim as compiled (>= the problem's)
  static constexpr int CONSUMERS = CONSUMERS_;  // consumer warpgroups, 64 query rows each
  static constexpr int BN = BN_;                // keys per block
  static constexpr int Q_STAGES = Q_STAGES_;    // Q buffers: 2 loads the next tile's Q during this one
  // Depth of the K and V rings: the widest tiles fill shared memory with two, and a third stage
  // measured no faster where it fits (PERF_NOTES.md).
  static constexpr int STAGES = 2;
  static constexpr int INPUT = INPUT_;
  static constexpr bool FP8 = INPUT == INPUT_E4M3 || INPUT == INPUT_E5M2;
  static constexpr bool OUT_BF16 = OUT_BF16_;  // the output's type: bf16, else fp16
  // 0 none, 1 right edge (causal), 2 both edges (sliding window), 3 both edges and each row's
  // interval of keys (key padding, key intervals; the window's reach is "unbounded" where unused),
  // 4 a block-sparse mask's lists of key blocks (no window)
  static constexpr int MASK = MASK_;
  static constexpr bool RIGHT_EDGE = MASK >= 1 && MASK <= 3;
  static constexpr bool LEFT_EDGE = MASK == 2 || MASK == 3;
  static constexpr bool INTERVALS = MASK == 3;
  static constexpr bool LISTS = MASK == 4;
  static constexpr int BM = 64 * CONSUMERS;
  static constexpr int THREADS = 128 * (CONSUMERS + 1);
  static constexpr int ELEM = FP8 ? 1 : 2;                          // bytes per input element
  static constexpr int SWIZZLE = (D * ELEM) % 128 == 0 ? 128 : 64;  // bytes of a slab row, the swizzle span
  static constexpr int SLAB = SWIZZLE / ELEM;                       // columns of one swizzle slab
  // Shared memory (from a 1024-byte aligned base): the Q, K and V rings (fp8: V^T tiles as the
  // pre-pass wrote them), then the mbarriers.
  static constexpr int Q_BYTES = BM * D * ELEM;
  static constexpr int KV_BYTES = BN * D * ELEM;
  static constexpr int K_OFFSET = Q_STAGES * Q_BYTES;
  static constexpr int V_OFFSET = K_OFFSET + STAGES * KV_BYTES;
  static constexpr int BARRIER_OFFSET = V_OFFSET + STAGES * KV_BYTES;
  static constexpr int BARRIERS = 2 * Q_STAGES + 4 * STAGES;
  static constexpr int SMEM_BYTES = BARRIER_OFFSET + 8 * BARRIERS;
  // Register split of the 64K-register file: the producer keeps the minimum.
  static constexpr int PRODUCER_REGISTERS = CONSUMERS == 2 ? 24 : 32;
  static constexpr int CONSUMER_REGISTERS = CONSUMERS == 2 ? 240 : 160;
  // What each thread holds at launch (__launch_bounds__(THREADS, 1): the register file, in 8s).
  static constexpr int ENTRY_REGISTERS = (65536 / THREADS) / 8 * 8;

  static_assert(D % SLAB == 0 && D >= 64 && D <= 256, "head dim: whole slabs, in [64, 256]");
  static_assert(!FP8 || BN == 64 || BN == 128, "fp8: a V^T row (BN keys) is one 64- or 128-byte swizzle span");
  static_assert(CONSUMERS == 2 || CONSUMERS == 3, "2 or 3 consumer warpgroups");
  static_assert(MASK >= 0 && MASK <= 4, "mask kind 0..4");
  static_assert(!LISTS || (!FP8 && CONSUMERS == 2), "block lists: 16-bit inputs, tiles of one 128-row block row");
  static_assert(Q_STAGES == 1 || Q_STAGES == 2, "one or two Q buffers");
  static_assert(BN % 16 == 0 && BN >= 16 && BN <= 256, "key block: a multiple of 16, at most 256 (wgmma N, TMA box)");
  static_assert(PRODUCER_REGISTERS * 128 + CONSUMER_REGISTERS * 128 * CONSUMERS <= 65536, "register file");
  // setmaxnreg.inc waits until the pool holds the registers it asks for: the consumers may take only
  // what the producer gave back (asking for more hangs the kernel; seen on the H200 with 48/232).
  static_assert((CONSUMER_REGISTERS - ENTRY_REGISTERS) * CONSUMERS <= ENTRY_REGISTERS - PRODUCER_REGISTERS,
                "the consumers take more registers than the producer frees");
};

// ------------------------------------------------------------------ register tiles

// The fp32 accumulator of a 64 x N wgmma product as a warpgroup holds it. Thread (warp w, lane l)
// has rows 16w + l/4 (its row 0) and 16w + l/4 + 8 (its row 1) and, in n8 tile i, the columns
// 8i + 2(l%4) + c, c < 2: element (i, row, c) is v[4i + 2 row + c] (mma.sync's m16n8 layout,
// repeated along N).
template <int N>
struct Acc {
  static constexpr int TILES = N / 8;
  float v[N / 2];
  __device__ __forceinline__ float& at(int i, int row, int c) { return v[4 * i + 2 * row + c]; }
};

// A 64 x N tile in wgmma's register layout of operand A, of ELEM-byte values. Its k step j (32
// bytes of a row: k16 for 16-bit values, k32 for fp8) is v[4j .. 4j + 3]. 16-bit: the same (row,
// column) elements as n8 tiles 2j and 2j + 1 of an Acc<N>. fp8: those of n8 tiles 4j .. 4j + 3,
// keys reordered (fp8_key).
template <int N, int ELEM>
struct Operand {
  u32 v[N * ELEM / 8];
};

template <int N>
__device__ __forceinline__ void fill(Acc<N>& a, float x) {
#pragma unroll
  for (int e = 0; e < N / 2; ++e) a.v[e] = x;
}

template <int N>
__device__ __forceinline__ void pin(Acc<N>& a) {
#pragma unroll
  for (int e = 0; e < N / 2; ++e) sm90::pin(a.v[e]);
}

template <int N, int ELEM>
__device__ __forceinline__ void pin(Operand<N, ELEM>& a) {
#pragma unroll
  for (int e = 0; e < N * ELEM / 8; ++e) sm90::pin(a.v[e]);
}

// Each of the thread's two rows times its factor.
template <int N>
__device__ __forceinline__ void scale_rows(Acc<N>& a, const float (&factor)[2]) {
#pragma unroll
  for (int i = 0; i < Acc<N>::TILES; ++i) {
#pragma unroll
    for (int row = 0; row < 2; ++row) {
      a.at(i, row, 0) *= factor[row];
      a.at(i, row, 1) *= factor[row];
    }
  }
}

// The largest element of each of the thread's two rows, over the whole 64 x N tile.
template <int N>
__device__ __forceinline__ void row_max(Acc<N>& s, float (&mx)[2]) {
#pragma unroll
  for (int row = 0; row < 2; ++row) {
    float m = neg_inf();
#pragma unroll
    for (int i = 0; i < Acc<N>::TILES; ++i) m = fmaxf(m, fmaxf(s.at(i, row, 0), s.at(i, row, 1)));
    mx[row] = quad_max(m);
  }
}

// Rounded to 16 bits in the operand layout (the accumulator of one product is the A of the next).
template <bool BF16, int N>
__device__ __forceinline__ void to_operand(Acc<N>& s, Operand<N, 2>& p) {
#pragma unroll
  for (int e = 0; e < N / 4; ++e) p.v[e] = pack2<BF16>(s.v[2 * e], s.v[2 * e + 1]);
}

// Rounded to e4m3 in the 8-bit operand layout. Register r of k32 step j holds 4 keys of one of the
// thread's rows (row r % 2): in an 8-bit A operand those are columns 4 (lane % 4) .. + 3 (r < 2) or
// 16 + 4 (lane % 4) .. + 3 (r >= 2) of the step. The thread has the keys 8i + 2 (lane % 4) + c of n8
// tiles i = 4j .. 4j + 3; putting tiles 4j + 2h and 4j + 2h + 1 into register 2h + row takes no
// shuffles, and V^T stores its keys in the same order (fp8_key).
template <bool BF16, int N>  // BF16 unused: P is e4m3 whatever the inputs' fp8 type
__device__ __forceinline__ void to_operand(Acc<N>& s, Operand<N, 1>& p) {
#pragma unroll
  for (int j = 0; j < N / 32; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int row = 0; row < 2; ++row) {
        const int i = 4 * j + 2 * h;
        p.v[4 * j + 2 * h + row] =
            pack4_e4m3(s.at(i, row, 0), s.at(i, row, 1), s.at(i + 1, row, 0), s.at(i + 1, row, 1));
      }
    }
  }
}

// ------------------------------------------------------------------ shared-memory tiles and products

// A (ROWS x D) tile as TMA leaves it: D / SLAB slabs of ROWS rows of SWIZZLE bytes, the 16-byte
// chunks of each row permuted by the swizzle; wgmma reads it through descriptors that name the same
// swizzle. Every slab starts on a 1024-byte boundary (the swizzle pattern's period).
template <int ROWS, class S>
struct SmemTile {
  static constexpr int SLAB_BYTES = ROWS * S::SWIZZLE;
  u32 base;

  // K-major operand of k step kk: bytes 32kk .. 32kk + 31 of rows row0 onwards, consecutive 8-row
  // groups 8 rows apart (Q as A and K as B of S = Q K^T).
  __device__ __forceinline__ u64 k_major(int row0, int kk) const {
    const int byte = 32 * kk;
    const u32 address = base + (byte / S::SWIZZLE) * SLAB_BYTES + row0 * S::SWIZZLE + byte % S::SWIZZLE;
    return smem_descriptor<S::SWIZZLE>(address, 16, 8 * S::SWIZZLE);
  }

  // N-major operand of k16 step kk: rows 16kk .. 16kk + 15 and every column, the slabs SLAB_BYTES
  // apart (V as B of O += P V, in its natural (key, head dim) layout).
  __device__ __forceinline__ u64 n_major(int kk) const {
    return smem_descriptor<S::SWIZZLE>(base + 16 * kk * S::SWIZZLE, SLAB_BYTES, 8 * S::SWIZZLE);
  }
};

// V^T of an fp8 key block: D rows of BN keys, one slab of BN-byte rows (the swizzle span), the keys
// of each k32 step in fp8_key order (as TMA leaves a box of the pre-pass's V^T).
template <class S>
struct VtTile {
  u32 base;
  // K-major B operand of k32 step kk: keys 32kk .. 32kk + 31 of every row.
  __device__ __forceinline__ u64 k_major(int kk) const { return smem_descriptor<S::BN>(base + 32 * kk, 16, 8 * S::BN); }
};

// Issue S = Q K^T for the warpgroup's 64 query rows from row0 (raw dot products: the softmax scale
// goes into the exponent).
template <class S>
__device__ __forceinline__ void issue_qk(Acc<S::BN>& s, const SmemTile<S::BM, S>& q, int row0,
                                         const SmemTile<S::BN, S>& k) {
  pin(s);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < S::D * S::ELEM / 32; ++kk) Wgmma<S::BN>::ss(s.v, q.k_major(row0, kk), k.k_major(0, kk), kk > 0);
  wgmma_commit();
  pin(s);
}

// Issue O += P V: 16-bit V read N-major in place, fp8 V from its transpose.
template <class S>
__device__ __forceinline__ void issue_pv(Acc<S::D>& o, const Operand<S::BN, S::ELEM>& p, const SmemTile<S::BN, S>& v,
                                         const VtTile<S>& vt) {
  pin(o);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < S::BN * S::ELEM / 32; ++kk) {
    u64 b;
    if constexpr (S::FP8) {
      b = vt.k_major(kk);
    } else {
      b = v.n_major(kk);
    }
    Wgmma<S::D>::rs(o.v, p.v[4 * kk], p.v[4 * kk + 1], p.v[4 * kk + 2], p.v[4 * kk + 3], b, 1);
  }
  wgmma_commit();
  pin(o);
}

// ------------------------------------------------------------------ softmax

// Online softmax of the thread's two rows, in base 2: scores times score_log2 (scale * log2(e)).
struct OnlineSoftmax {
  float ref[2];         // reference max of the row (-inf until the row sees a key)
  float sum[2];         // this lane's part of the row sum of exp2(score - ref)
  float correction[2];  // what O must be multiplied by before its next product (1: unchanged row)
  bool rescale;         // some row of the warp moved its reference (warp-uniform)

  __device__ __forceinline__ void reset() {
#pragma unroll
    for (int row = 0; row < 2; ++row) {
      ref[row] = neg_inf();
      sum[row] = 0.f;
      correction[row] = 1.f;
    }
    rescale = false;
  }

  // Replace a block of scores by their exponentials and add them to the row sums. A reference
  // moves only past the margin (so P stays <= 2^RESCALE_LOG2, harmless in fp32 and 16 bits); the
  // O correction it implies waits in `correction` for the next product, and one warp vote decides
  // whether that rescale runs at all.
  template <int N>
  __device__ __forceinline__ void update(Acc<N>& s, float score_log2) {
    float mx[2];
    row_max(s, mx);
    bool moved = false;
    float shift[2];
#pragma unroll
    for (int row = 0; row < 2; ++row) {
      const float block_max = mx[row] * score_log2;  // -inf stays -inf
      const bool move = block_max > ref[row] + RESCALE_LOG2;
      correction[row] = move ? exp2_approx(ref[row] - block_max) : 1.f;  // 0 when the row had no key yet
      ref[row] = move ? block_max : ref[row];
      sum[row] *= correction[row];
      moved = moved || move;
      shift[row] = ref[row] == neg_inf() ? 0.f : ref[row];  // a row without keys: exp2(-inf) = 0, not NaN
    }
    rescale = __any_sync(0xffffffffu, moved);
#pragma unroll
    for (int row = 0; row < 2; ++row) {
      float part = 0.f;
#pragma unroll
      for (int i = 0; i < Acc<N>::TILES; ++i) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float p = exp2_approx(fmaf(s.at(i, row, c), score_log2, -shift[row]));
          s.at(i, row, c) = p;
          part += p;
        }
      }
      sum[row] += part;
    }
  }
};

template <int N>
__device__ __forceinline__ void negate(Acc<N>& a) {
#pragma unroll
  for (int e = 0; e < N / 2; ++e) a.v[e] = -a.v[e];
}

// cap * tanh(score * scale / cap), the scale (and cap * log2(e)) left to the exponent.
template <int N>
__device__ __forceinline__ void softcap(Acc<N>& s, float softcap_in) {
#pragma unroll
  for (int e = 0; e < N / 2; ++e) s.v[e] = tanh_approx(s.v[e] * softcap_in);
}

// -inf for the scores the thread's rows must not see. `row`: the thread's row 0 in its sequence;
// `col0`: the key of its element (0, row, 0).
template <bool RIGHT_EDGE, bool LEFT_EDGE, int N>
__device__ __forceinline__ void mask_scores(Acc<N>& s, int row, int col0, int len_k, int off, int left, int right) {
#pragma unroll
  for (int i = 0; i < Acc<N>::TILES; ++i) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int col = col0 + 8 * i + c;
        const int delta = col - (row + 8 * r) - off;
        bool visible = col < len_k;
        if constexpr (RIGHT_EDGE) visible = visible && delta <= right;
        if constexpr (LEFT_EDGE) visible = visible && delta >= -left;
        if (!visible) s.at(i, r, c) = neg_inf();
      }
    }
  }
}

// -inf for the scores outside the thread's rows' key intervals [lo, hi) (the window and len_k
// folded in). `col0`: the key of its element (0, row, 0).
template <int N>
__device__ __forceinline__ void mask_intervals(Acc<N>& s, int col0, const int (&lo)[2], const int (&hi)[2]) {
#pragma unroll
  for (int i = 0; i < Acc<N>::TILES; ++i) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int col = col0 + 8 * i + c;
        if (col < lo[r] || col >= hi[r]) s.at(i, r, c) = neg_inf();
      }
    }
  }
}

// -inf for the keys of the block from key0 whose mask byte is 0 (a key-padding mask with holes).
// The warp reads the block's bytes once, a key per lane, and shares them as ballot bits: one load
// per 32 keys instead of one per key and thread (those held the registers of every load in flight).
// Called by whole warps; keys past len_k are not read (the intervals hide them already).
template <int N>
__device__ __forceinline__ void mask_key_bytes(Acc<N>& s, int key0, int quad_col, int len_k,
                                               const unsigned char* keys, i64 key_stride) {
  const int lane = threadIdx.x % 32;
  u32 seen[(N + 31) / 32];
#pragma unroll
  for (int w = 0; w < (N + 31) / 32; ++w) {
    const int key = key0 + 32 * w + lane;
    const bool on = 32 * w + lane < N && key < len_k && __ldg(keys + key * key_stride) != 0;
    seen[w] = __ballot_sync(0xffffffffu, on);
  }
#pragma unroll
  for (int i = 0; i < Acc<N>::TILES; ++i) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int col = 8 * i + quad_col + c;  // within the block; 8i .. 8i + 7 share one word
      if (!((seen[i / 4] >> (col % 32)) & 1u)) {
        s.at(i, 0, c) = neg_inf();
        s.at(i, 1, c) = neg_inf();
      }
    }
  }
}

// ------------------------------------------------------------------ work: tiles and their order

// Kernel arguments other than the tensor maps (see hopper_fwd.cu and flash_cuda/hopper.py).
struct Params {
  u16* o;
  float* lse;
  const int* cu_q;
  const int* cu_k;
  i64 o_sb, o_ss, o_sh, l_sb, l_sh, l_ss;
  int seqlen_q, seqlen_k, total_q, total_k, heads_q, group, head_dim, m_blocks, tiles;
  int win_left, win_right;  // window reach (a large value for an unbounded side)
  int blocks_outer;         // tile order: query blocks outermost (longest work first) instead of heads
  float score_log2;         // exponent (base 2) per unit of (capped) score: scale * log2(e), or cap * log2(e)
  float softcap_in;         // tanh argument per unit of raw score, scale / cap; 0: no softcap
  // fp8: descale factors at [batch * stride_b + head * stride_h] (strides 0 for one per tensor; K's
  // and V's indexed by the K/V head); null: 1 (and always for 16-bit inputs).
  const float* q_descale;
  const float* k_descale;
  const float* v_descale;
  i64 qd_sb, qd_sh, kd_sb, kd_sh, vd_sb, vd_sh;
  // Mask kind 3: row i of sequence b sees keys [lo, hi), lo at iv[b * iv_sb + i * iv_ss] and hi iv_hi
  // elements after it (key padding: one interval per sequence, iv_ss 0). A sequence whose fully
  // visible keys end (iv_full elements after lo; key intervals: hi itself) short of hi has holes:
  // its keys are also tested against their bytes keys[b * keys_sb + j * keys_sk].
  const int* iv;
  const unsigned char* keys;
  i64 iv_sb, keys_sb, keys_sk;
  int iv_ss, iv_hi, iv_full;
  // Mask kind 4: list row r = b * bl_sb + h * bl_sh + query block (strides 0 where the mask is
  // broadcast) has bl_counts[2r], bl_counts[2r + 1] partial and full mask blocks, listed ascending at
  // bl_index[(2r + kind) * bl_nk ...]; a mask block is 2^bl_shift kernel blocks.
  const int* bl_counts;
  const int* bl_index;
  int bl_sb, bl_sh, bl_nk, bl_shift;
};

// Where row `row` of sequence `batch` finds its interval of keys (mask kind 3).
__device__ __forceinline__ const int* row_interval(const Params& p, int batch, int row) {
  return p.iv + batch * p.iv_sb + (i64)row * p.iv_ss;
}

// BM query rows of one (sequence, head), and the key blocks they see.
struct Tile {
  int batch, head;
  int batch_coord;  // TMA coordinate of the batch dimension (0 in a packed varlen batch)
  int m0;           // first query row, within the sequence
  int q_start, k_start, len_q, len_k;
  int n_lo, n_hi;  // key blocks [n_lo, n_hi) hold every key a row of the tile sees (mask kind 4: steps)
  int list_row, partial_steps;  // mask kind 4: the tile's list row; steps [0, partial_steps) walk its partial list

  __device__ __forceinline__ bool has_rows() const { return m0 < len_q; }
  __device__ __forceinline__ bool has_keys() const { return n_hi > n_lo; }
};

// Where tile `index` of the list lies: its sequence, head and rows (no key blocks yet). Query blocks go heaviest first (under a causal mask the last query
// block sees the most keys). By default the (sequence, head) pairs are outermost, so that the
// blocks at work at one time share few heads' K and V in L2; with blocks_outer the query blocks
// are, so that all pairs' heaviest blocks come first (longest work first, for causal masks and
// uneven varlen batches).
template <class S>
__device__ __forceinline__ Tile locate_tile(const Params& p, int index) {
  Tile t;
  int m_block, bh;
  if (p.blocks_outer) {
    const int pairs = p.tiles / p.m_blocks;
    m_block = p.m_blocks - 1 - index / pairs;
    bh = index % pairs;
  } else {
    m_block = p.m_blocks - 1 - index % p.m_blocks;
    bh = index / p.m_blocks;
  }
  t.head = bh % p.heads_q;
  t.batch = bh / p.heads_q;
  t.batch_coord = t.batch;
  t.m0 = m_block * S::BM;
  t.q_start = 0;
  t.k_start = 0;
  t.len_q = p.seqlen_q;
  t.len_k = p.seqlen_k;
  if (p.cu_q != nullptr) {
    const PackedRange q = packed_range(p.cu_q, t.batch, p.total_q, p.seqlen_q);
    const PackedRange k = packed_range(p.cu_k, t.batch, p.total_k, p.seqlen_k);
    t.q_start = q.start;
    t.len_q = q.len;
    t.k_start = k.start;
    t.len_k = k.len;
    t.batch_coord = 0;
  }
  t.n_lo = t.n_hi = 0;
  t.list_row = t.partial_steps = 0;
  return t;
}

// Tile `index` of the list with the key blocks its rows see.
template <class S>
__device__ __forceinline__ Tile make_tile(const Params& p, int index) {
  Tile t = locate_tile<S>(p, index);
  if (!t.has_rows()) return t;
  if constexpr (S::LISTS) {
    t.list_row = t.batch * p.bl_sb + t.head * p.bl_sh + t.m0 / S::BM;
    t.partial_steps = p.bl_counts[2 * t.list_row] << p.bl_shift;
    t.n_hi = t.partial_steps + (p.bl_counts[2 * t.list_row + 1] << p.bl_shift);
    return t;
  }
  const i64 rows = min(S::BM, t.len_q - t.m0);
  const i64 off = (i64)t.len_k - t.len_q;
  i64 key_lo = 0, key_hi = t.len_k;
  if constexpr (S::RIGHT_EDGE) key_hi = max((i64)0, min((i64)t.m0 + rows - 1 + off + p.win_right + 1, key_hi));
  if constexpr (S::LEFT_EDGE) key_lo = max((i64)0, min((i64)t.m0 + off - p.win_left, (i64)t.len_k));
  if constexpr (S::INTERVALS) {  // both ends move right with the row: the first row's lo, the last row's hi
    key_lo = max(key_lo, (i64)row_interval(p, t.batch, t.m0)[0]);
    key_hi = min(key_hi, (i64)row_interval(p, t.batch, t.m0 + (int)rows - 1)[p.iv_hi]);
  }
  if (key_hi > key_lo) {
    t.n_lo = (int)(key_lo / S::BN);
    t.n_hi = (int)((key_hi + S::BN - 1) / S::BN);
  }
  return t;
}

// The key block of step j of a tile's walk: j itself, or (mask kind 4) the kernel block of the list's
// entries: the partial list's blocks at steps [0, partial_steps), then the full list's.
template <class S>
__device__ __forceinline__ int key_block(const Params& p, int list_row, int partial_steps, int j) {
  if constexpr (!S::LISTS) return j;
  const int kind = j >= partial_steps;
  const int k = j - (kind ? partial_steps : 0);
  const int listed = p.bl_index[(2 * (i64)list_row + kind) * p.bl_nk + (k >> p.bl_shift)];
  return (listed << p.bl_shift) + (k & ((1 << p.bl_shift) - 1));
}

// The block's tile in round r of the persistent walk. Rounds alternate direction (boustrophedon):
// a block that took a heavy causal tile in one round takes a light one in the next, and each round
// covers consecutive tiles, i.e. few heads, whose K and V stay in L2.
__device__ __forceinline__ int tile_index(int round) {
  const int i = (round & 1) ? (int)(gridDim.x - 1 - blockIdx.x) : (int)blockIdx.x;
  return round * (int)gridDim.x + i;
}

// ------------------------------------------------------------------ shared memory and pipelines

template <class S>
struct Smem {
  u32 base;  // 1024-byte aligned
  __device__ __forceinline__ SmemTile<S::BM, S> q(int stage) const { return {base + stage * S::Q_BYTES}; }
  __device__ __forceinline__ SmemTile<S::BN, S> k(int stage) const { return {base + S::K_OFFSET + stage * S::KV_BYTES}; }
  __device__ __forceinline__ SmemTile<S::BN, S> v(int stage) const { return {base + S::V_OFFSET + stage * S::KV_BYTES}; }
  // fp8: the V ring's buffer holds V^T as the pre-pass wrote it.
  __device__ __forceinline__ VtTile<S> vt(int stage) const { return {base + S::V_OFFSET + stage * S::KV_BYTES}; }
  __device__ __forceinline__ u32 barrier(int i) const { return base + S::BARRIER_OFFSET + 8 * i; }
  __device__ __forceinline__ u32 q_full(int stage) const { return barrier(stage); }
  __device__ __forceinline__ u32 q_empty(int stage) const { return barrier(S::Q_STAGES + stage); }
  __device__ __forceinline__ u32 k_full(int stage) const { return barrier(2 * S::Q_STAGES + stage); }
  __device__ __forceinline__ u32 k_empty(int stage) const { return barrier(2 * S::Q_STAGES + S::STAGES + stage); }
  __device__ __forceinline__ u32 v_full(int stage) const { return barrier(2 * S::Q_STAGES + 2 * S::STAGES + stage); }
  __device__ __forceinline__ u32 v_empty(int stage) const { return barrier(2 * S::Q_STAGES + 3 * S::STAGES + stage); }

  // Full barriers take the producer's one arrival (plus the TMA bytes); empty ones one arrival per
  // consumer warp, each after its own wgmma_wait.
  __device__ void init() const {
#pragma unroll
    for (int st = 0; st < S::Q_STAGES; ++st) {
      mbarrier_init(q_full(st), 1);
      mbarrier_init(q_empty(st), 4 * S::CONSUMERS);
    }
#pragma unroll
    for (int st = 0; st < S::STAGES; ++st) {
      mbarrier_init(k_full(st), 1);
      mbarrier_init(k_empty(st), 4 * S::CONSUMERS);
      mbarrier_init(v_full(st), 1);
      mbarrier_init(v_empty(st), 4 * S::CONSUMERS);
    }
    fence_barrier_init();
  }
};

// Position in a ring of STAGES buffers; the phase flips at every wrap. Consumers wait for a full
// barrier's current phase, the producer for the empty barrier's previous one (complete at start).
template <int STAGES>
struct Ring {
  int stage = 0;
  u32 phase = 0;
  __device__ __forceinline__ void advance() {
    if (++stage == STAGES) {
      stage = 0;
      phase ^= 1;
    }
  }
  __device__ __forceinline__ Ring next() const {
    Ring r = *this;
    r.advance();
    return r;
  }
  __device__ __forceinline__ Ring prev() const {
    Ring r = *this;
    if (r.stage-- == 0) {
      r.stage = STAGES - 1;
      r.phase ^= 1;
    }
    return r;
  }
};

// Prefetches Q of the tile into L2.
template <class S>
__device__ __forceinline__ void prefetch_q(const TensorMap* map, const Tile& t) {
#pragma unroll
  for (int slab = 0; slab < S::D / S::SLAB; ++slab) {
    tma_prefetch_4d(map, slab * S::SLAB, t.head, t.q_start + t.m0, t.batch_coord);
  }
}

// Loads all slabs of one (ROWS x D) box: rows from `row` of (head, batch_coord).
template <int ROWS, class S>
__device__ __forceinline__ void tma_load_tile(const SmemTile<ROWS, S>& dst, const TensorMap* map, u32 bar, int head,
                                              int row, int batch_coord) {
#pragma unroll
  for (int slab = 0; slab < S::D / S::SLAB; ++slab) {
    tma_load_4d(dst.base + slab * SmemTile<ROWS, S>::SLAB_BYTES, map, bar, slab * S::SLAB, head, row, batch_coord);
  }
}

// ------------------------------------------------------------------ producer

template <class S>
__device__ void produce(const Params& p, const Smem<S>& sm, const TensorMap* q_map, const TensorMap* k_map,
                        const TensorMap* v_map) {
  tma_prefetch_map(q_map);
  tma_prefetch_map(k_map);
  tma_prefetch_map(v_map);
  Ring<S::STAGES> ring;
  Ring<S::Q_STAGES> q_ring;
  for (int round = 0; round * (int)gridDim.x < p.tiles; ++round) {
    const int index = tile_index(round);
    if (index >= p.tiles) continue;
    const Tile t = make_tile<S>(p, index);
    if (!t.has_keys()) continue;
    const int kv_head = t.head / p.group;
    // fp8: the pre-pass's V^T column of the tile's first key
    const int vt_start = p.cu_q != nullptr ? (int)vt_sequence_start(t.k_start, t.batch) : 0;
    auto load_kv = [&](int j) {
      const int n = key_block<S>(p, t.list_row, t.partial_steps, j);
      const int row = t.k_start + n * S::BN;
      mbarrier_wait(sm.k_empty(ring.stage), ring.phase ^ 1);
      mbarrier_arrive_expect(sm.k_full(ring.stage), S::KV_BYTES);
      tma_load_tile(sm.k(ring.stage), k_map, sm.k_full(ring.stage), kv_head, row, t.batch_coord);
      mbarrier_wait(sm.v_empty(ring.stage), ring.phase ^ 1);
      mbarrier_arrive_expect(sm.v_full(ring.stage), S::KV_BYTES);
      if constexpr (S::FP8) {
        // one box of V^T: D rows (head dims) of BN keys
        tma_load_4d(sm.vt(ring.stage).base, v_map, sm.v_full(ring.stage), vt_start + n * S::BN, 0, kv_head,
                    t.batch_coord);
      } else {
        tma_load_tile(sm.v(ring.stage), v_map, sm.v_full(ring.stage), kv_head, row, t.batch_coord);
      }
      ring.advance();
    };
    // With one Q buffer, Q frees only when the consumers have issued the previous tile's last
    // Q K^T: the first key block goes first, so that the new tile's loads overlap the old tile.
    if (S::Q_STAGES == 1) load_kv(t.n_hi - 1);
    mbarrier_wait(sm.q_empty(q_ring.stage), q_ring.phase ^ 1);
    mbarrier_arrive_expect(sm.q_full(q_ring.stage), S::Q_BYTES);
    tma_load_tile(sm.q(q_ring.stage), q_map, sm.q_full(q_ring.stage), t.head, t.q_start + t.m0, t.batch_coord);
    q_ring.advance();
    // Q of the next tile is read from DRAM; fetched into L2 now, its load later is short.
    const int next = tile_index(round + 1);
    if (next < p.tiles) {
      const Tile u = make_tile<S>(p, next);
      if (u.has_keys()) prefetch_q<S>(q_map, u);
    }
    for (int n = t.n_hi - (S::Q_STAGES == 1 ? 2 : 1); n >= t.n_lo; --n) load_kv(n);
  }
}

// ------------------------------------------------------------------ consumers

// The consumer warpgroups' turn to issue products, passed round in order on named barriers
// (measured: issuing without turns was 0.4-6% slower at every tile, PERF_NOTES.md).
template <int CONSUMERS>
struct Turn {
  int wg;
  // The last warpgroup hands warpgroup 0 its first turn.
  __device__ __forceinline__ void start() const {
    if (wg == CONSUMERS - 1) named_barrier_arrive(TURN_BARRIER, 256);
  }
  __device__ __forceinline__ void wait() const { named_barrier_sync(TURN_BARRIER + wg, 256); }
  __device__ __forceinline__ void pass() const { named_barrier_arrive(TURN_BARRIER + (wg + 1) % CONSUMERS, 256); }
  // Every warpgroup took the same number of turns: the last hand-over is still pending at
  // warpgroup 0's barrier; take it so that no barrier is left half-arrived.
  __device__ __forceinline__ void finish() const {
    if (wg == 0) named_barrier_sync(TURN_BARRIER, 256);
  }
};

// A tile as a consumer thread walks it: its key blocks, and which of them need the element mask.
// Kept small (registers are short at the widest tiles): where the output goes is derived again
// from `index` at the end.
template <class S>
struct TileRows {
  int index;  // in the tile list
  int n_lo, n_hi;
  int len_k;
  int row;  // the thread's row 0 in the sequence (row 1 is row + 8)
  int off;  // len_k - len_q
  // Block n needs the mask iff n * BN > last_free (it reaches past len_k or past the right edge of
  // the tile's first row) or n * BN < first_free (it starts before the left edge of its last row).
  // Both fit in 32 bits: |m0|, |off| < 2^29 and window reaches <= 2^30.
  int last_free, first_free;
  int list_row, partial_steps;  // mask kind 4: as the Tile's
  // Mask kind 3: the thread's two rows' keys [lo, hi) (window and len_k folded in); the sequence
  // whose mask bytes are read (it has holes), else -1 (an index, not a pointer: one register less
  // where both tiles' rows are live).
  int lo[2], hi[2];
  int holes_batch;
  // The score scaling of this tile (the descale factors of Q and K folded in for fp8); `flip`: their
  // product is negative, so the scores are negated and the scale made positive (the row maxima are
  // taken before scaling).
  float score_log2, softcap_in;
  bool flip;

  __device__ __forceinline__ void set(const Params& p, int tile_index, const Tile& t, int wg, int lane_row) {
    index = tile_index;
    score_log2 = p.score_log2;
    softcap_in = p.softcap_in;
    flip = false;
    if constexpr (S::FP8) {
      const int kv_head = t.head / p.group;
      const float qk = (p.q_descale ? p.q_descale[t.batch * p.qd_sb + t.head * p.qd_sh] : 1.f) *
                       (p.k_descale ? p.k_descale[t.batch * p.kd_sb + kv_head * p.kd_sh] : 1.f);
      if (softcap_in != 0.f) {
        softcap_in *= qk;  // the sign goes through tanh
      } else {
        score_log2 *= fabsf(qk);
        flip = qk < 0.f;
      }
    }
    n_lo = t.n_lo;
    n_hi = t.n_hi;
    list_row = t.list_row;
    partial_steps = t.partial_steps;
    len_k = t.len_k;
    row = t.m0 + 64 * wg + lane_row;
    off = t.len_k - t.len_q;
    i64 free_right = (i64)t.len_k - S::BN;
    if constexpr (S::RIGHT_EDGE) free_right = min(free_right, (i64)t.m0 + off + p.win_right + 1 - S::BN);
    i64 free_left = S::LEFT_EDGE ? (i64)t.m0 + S::BM - 1 + off - p.win_left : 0;
    if constexpr (S::INTERVALS) set_intervals(p, t, free_right, free_left);
    last_free = (int)free_right;
    first_free = (int)free_left;
  }

  // Mask kind 3: a block is free of the mask only inside [lo of the tile's last row, hi of its first);
  // the thread's rows' intervals, clipped to the window and len_k; holes mask every block.
  __device__ __forceinline__ void set_intervals(const Params& p, const Tile& t, i64& free_right, i64& free_left) {
    const int* first = row_interval(p, t.batch, t.m0);
    free_right = min(free_right, (i64)first[p.iv_hi] - S::BN);
    free_left = max(free_left, (i64)row_interval(p, t.batch, min(t.m0 + S::BM, t.len_q) - 1)[0]);
    const bool holes = first[p.iv_full] < first[p.iv_hi];
    holes_batch = holes ? t.batch : -1;
    if (holes) free_right = -1;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int seq_row = min(row + 8 * r, t.len_q - 1);  // rows past the end are not stored
      const int* own = row_interval(p, t.batch, seq_row);
      lo[r] = (int)max((i64)own[0], (i64)seq_row + off - p.win_left);
      hi[r] = (int)min(min((i64)own[p.iv_hi], (i64)seq_row + off + p.win_right + 1), (i64)len_k);
    }
  }

  // Whether step n of the walk may need the mask (kind 4: only partial blocks may reach past len_k).
  __device__ __forceinline__ bool masked(int n) const {
    if constexpr (S::LISTS) return n < partial_steps;
    const int n0 = n * S::BN;
    return n0 > last_free || (S::LEFT_EDGE && n0 < first_free);
  }

  // -inf for the scores of step n's block that the thread's rows must not see.
  __device__ __forceinline__ void mask(Acc<S::BN>& s, int n, int quad_col, const Params& p) const {
    if constexpr (S::LISTS) n = key_block<S>(p, list_row, partial_steps, n);
    const int col0 = n * S::BN + quad_col;
    if constexpr (S::LISTS) {
      if ((n + 1) * S::BN > len_k) mask_scores<false, false>(s, row, col0, len_k, off, p.win_left, p.win_right);
    } else if constexpr (S::INTERVALS) {
      mask_intervals(s, col0, lo, hi);
      if (holes_batch >= 0) mask_key_bytes(s, n * S::BN, quad_col, len_k, p.keys + holes_batch * p.keys_sb, p.keys_sk);
    } else {
      mask_scores<S::RIGHT_EDGE, S::LEFT_EDGE>(s, row, col0, len_k, off, p.win_left, p.win_right);
    }
  }
};

// O / row sum as 16-bit values and the LSE (natural log), straight from registers; rows past the
// sequence end and columns past head_dim are not written. A row that saw no key gets O = 0 and
// LSE = -inf.
template <class S>
__device__ __forceinline__ void store_output(const Params& p, const Tile& t, int row, int quad_col, Acc<S::D>& o,
                                             const OnlineSoftmax& sm) {
  float v_scale = 1.f;
  if (S::FP8 && p.v_descale) v_scale = p.v_descale[t.batch * p.vd_sb + (t.head / p.group) * p.vd_sh];
  float total[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) total[r] = quad_sum(sm.sum[r]);  // every lane: shuffles before the row branches
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int seq_row = row + 8 * r;
    if (seq_row >= t.len_q) continue;
    const float inv = total[r] == 0.f ? 0.f : v_scale / total[r];
    const i64 out_row = (i64)t.q_start + seq_row;
    u16* dst = p.o + t.batch * p.o_sb + out_row * p.o_ss + t.head * p.o_sh;
#pragma unroll
    for (int i = 0; i < Acc<S::D>::TILES; ++i) {
      const int col = 8 * i + quad_col;
      if (col < p.head_dim) {
        *reinterpret_cast<u32*>(dst + col) = pack2<S::OUT_BF16>(o.at(i, r, 0) * inv, o.at(i, r, 1) * inv);
      }
    }
    if (quad_col == 0) {
      const float lse = total[r] == 0.f ? neg_inf() : (sm.ref[r] + log2_approx(total[r])) * LN2;
      p.lse[t.batch * p.l_sb + t.head * p.l_sh + out_row * p.l_ss] = lse;
    }
  }
}

// The rows of a tile that sees no key at all: O = 0, LSE = -inf.
template <class S>
__device__ __forceinline__ void store_empty(const Params& p, const Tile& t, int row, int quad_col) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int seq_row = row + 8 * r;
    if (seq_row >= t.len_q) continue;
    const i64 out_row = (i64)t.q_start + seq_row;
    u16* dst = p.o + t.batch * p.o_sb + out_row * p.o_ss + t.head * p.o_sh;
#pragma unroll
    for (int i = 0; i < Acc<S::D>::TILES; ++i) {
      if (8 * i + quad_col < p.head_dim) *reinterpret_cast<u32*>(dst + 8 * i + quad_col) = 0u;
    }
    if (quad_col == 0) p.lse[t.batch * p.l_sb + t.head * p.l_sh + out_row * p.l_ss] = neg_inf();
  }
}

template <class S>
__device__ void consume(const Params& p, const Smem<S>& sm, int wg) {
  const int tid = threadIdx.x % 128;
  const int warp = tid / 32, lane = tid % 32;
  const int lane_row = 16 * warp + lane / 4;  // the thread's row 0 within the warpgroup's 64
  const int quad_col = 2 * (lane % 4);        // column of the thread's element (0, row, 0) in an n8 tile
  const bool warp_leader = lane == 0;
  const Turn<S::CONSUMERS> turn{wg};
  const bool softcapped = p.softcap_in != 0.f;
  turn.start();

  Ring<S::STAGES> ring;      // K and V of the next block to multiply
  Ring<S::Q_STAGES> q_ring;  // Q of the current tile
  Acc<S::D> o;
  Acc<S::BN> s;
  Operand<S::BN, S::ELEM> pm;
  OnlineSoftmax softmax;

  // The block's next tile that has keys; the rows of tiles without keys are written on the way.
  int round = 0;
  auto next_tile = [&](TileRows<S>& w) -> bool {
    for (; round * (int)gridDim.x < p.tiles; ++round) {
      const int index = tile_index(round);
      if (index >= p.tiles) continue;
      const Tile t = make_tile<S>(p, index);
      if (!t.has_rows()) continue;
      if (!t.has_keys()) {
        store_empty<S>(p, t, t.m0 + 64 * wg + lane_row, quad_col);
        continue;
      }
      ++round;
      w.set(p, index, t, wg, lane_row);
      return true;
    }
    return false;
  };

  // Softcap, mask, exponentiate: block n of tile w's scores becomes P.
  auto scores_to_p = [&](const TileRows<S>& w, int n) {
    if (S::FP8 && w.flip) negate(s);
    if (softcapped) softcap(s, w.softcap_in);
    if (w.masked(n)) w.mask(s, n, quad_col, p);
    softmax.update(s, w.score_log2);
  };

  // Wait for K of the block after n (if the tile has one) before waiting for O += P V: the spin
  // loop ends the basic block, which keeps ptxas from scheduling that wgmma_wait above the softmax
  // (it would serialise the softmax after the product). The wait is due next anyway.
  auto wait_next_k = [&](const TileRows<S>& w, int n) {
    if (n > w.n_lo) {
      const Ring<S::STAGES> next = ring.next();
      mbarrier_wait(sm.k_full(next.stage), next.phase);
    }
  };

  // The output of the tile whose row statistics are in `softmax`.
  auto store = [&](const TileRows<S>& w) {
    const Tile t = locate_tile<S>(p, w.index);
    store_output<S>(p, t, w.row, quad_col, o, softmax);
  };

  TileRows<S> cur;
  if (!next_tile(cur)) {
    turn.finish();
    return;
  }

  // The first tile's first key block: S only.
  fill(o, 0.f);
  softmax.reset();
  int n = cur.n_hi - 1;
  mbarrier_wait(sm.q_full(q_ring.stage), q_ring.phase);
  mbarrier_wait(sm.k_full(ring.stage), ring.phase);
  issue_qk<S>(s, sm.q(q_ring.stage), 64 * wg, sm.k(ring.stage));
  wgmma_wait<0>();
  pin(s);
  if (warp_leader) mbarrier_arrive(sm.k_empty(ring.stage));
  scores_to_p(cur, n);
  to_operand<S::INPUT == INPUT_BF16>(s, pm);
  ring.advance();  // from here on, V of the block whose P is in pm is at ring.prev()

  while (true) {
    // Steady state: S of block n, then O += P V of block n + 1, then the softmax of block n while
    // that product runs.
    for (--n; n >= cur.n_lo; --n) {
      mbarrier_wait(sm.k_full(ring.stage), ring.phase);
      turn.wait();
      issue_qk<S>(s, sm.q(q_ring.stage), 64 * wg, sm.k(ring.stage));
      if (softmax.rescale) scale_rows(o, softmax.correction);
      mbarrier_wait(sm.v_full(ring.prev().stage), ring.prev().phase);
      issue_pv<S>(o, pm, sm.v(ring.prev().stage), sm.vt(ring.prev().stage));
      turn.pass();
      wgmma_wait<1>();
      pin(s);
      if (warp_leader) mbarrier_arrive(sm.k_empty(ring.stage));
      scores_to_p(cur, n);
      wait_next_k(cur, n);
      wgmma_wait<0>();
      pin(pm);  // P is read until its product completes: its registers must not be reused before
      pin(o);
      if (warp_leader) mbarrier_arrive(sm.v_empty(ring.prev().stage));
      to_operand<S::INPUT == INPUT_BF16>(s, pm);
      ring.advance();
    }
    // Every Q K^T of the tile has completed: its Q buffer may take a later tile's.
    if (warp_leader) mbarrier_arrive(sm.q_empty(q_ring.stage));
    q_ring.advance();

    TileRows<S> next;
    if (!next_tile(next)) break;

    // Across the tile boundary: S of the next tile's first block and O += P V of this tile's last
    // block in one turn, then this tile's output and the next one's first softmax (in turn with the
    // other warpgroups' products; holding both tiles' state through the softmax would spill).
    n = next.n_hi - 1;
    mbarrier_wait(sm.q_full(q_ring.stage), q_ring.phase);
    mbarrier_wait(sm.k_full(ring.stage), ring.phase);
    turn.wait();
    issue_qk<S>(s, sm.q(q_ring.stage), 64 * wg, sm.k(ring.stage));
    if (softmax.rescale) scale_rows(o, softmax.correction);
    mbarrier_wait(sm.v_full(ring.prev().stage), ring.prev().phase);
    issue_pv<S>(o, pm, sm.v(ring.prev().stage), sm.vt(ring.prev().stage));
    turn.pass();
    wgmma_wait<0>();
    pin(s);
    pin(pm);
    pin(o);
    if (warp_leader) {
      mbarrier_arrive(sm.k_empty(ring.stage));
      mbarrier_arrive(sm.v_empty(ring.prev().stage));
    }
    store(cur);
    cur = next;
    fill(o, 0.f);
    softmax.reset();
    scores_to_p(cur, n);
    to_operand<S::INPUT == INPUT_BF16>(s, pm);
    ring.advance();
  }

  // The last tile's last block.
  if (softmax.rescale) scale_rows(o, softmax.correction);
  mbarrier_wait(sm.v_full(ring.prev().stage), ring.prev().phase);
  issue_pv<S>(o, pm, sm.v(ring.prev().stage), sm.vt(ring.prev().stage));
  wgmma_wait<0>();
  pin(o);
  if (warp_leader) mbarrier_arrive(sm.v_empty(ring.prev().stage));
  store(cur);
  turn.finish();
}

// ------------------------------------------------------------------ kernel body

template <class S>
__device__ __forceinline__ void forward(const Params& p, const TensorMap* q_map, const TensorMap* k_map,
                                        const TensorMap* v_map) {
  extern __shared__ __attribute__((aligned(1024))) unsigned char smem_raw[];
  const Smem<S> sm{(shared_address(smem_raw) + 1023u) & ~1023u};  // the launch adds 1 KB of slack
  const int wg = threadIdx.x / 128;
  if (threadIdx.x == 0) sm.init();
  __syncthreads();
  // Each role is one branch, so that setmaxnreg applies to whole warpgroups.
  if (wg == 0) {
    registers_decrease<S::PRODUCER_REGISTERS>();
    if (threadIdx.x == 0) produce<S>(p, sm, q_map, k_map, v_map);
  } else {
    registers_increase<S::CONSUMER_REGISTERS>();
    consume<S>(p, sm, wg - 1);
  }
}

}  // namespace hopper
}  // namespace flash_cuda
