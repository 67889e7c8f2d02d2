// FlashAttention forward on tensor cores (mma.sync m16n8k16, sm_80+).
//
// One thread block computes BM query rows of one (batch, head): it walks the key blocks the mask
// leaves visible, BN keys at a time, and writes O and the LSE once at the end.
//
//  * Q: loaded once (cp.async) into shared memory, then into registers (QREG) or re-read per key
//    block with ldmatrix (!QREG, for large head dims where registers run out).
//  * K, V: a ring of STAGES shared-memory buffers filled by cp.async; block j+STAGES-1 is in flight
//    while block j is computed. One __syncthreads per key block.
//  * S = Q K^T and O += P V on tensor cores; S and P never leave registers (the S accumulator layout
//    of two neighbouring n8 tiles is exactly the A-operand layout of one k16 step of P V).
//  * Online softmax in base 2 with the softmax scale folded into one FFMA per score; row maxima
//    reduced across the 4 lanes of a quad; row sums kept per lane and reduced once at the end.
//  * Lazy rescaling: a row's reference max moves only when a key block's max exceeds it by
//    more than RESCALE_LOG2 (so every P stays <= 2^RESCALE_LOG2, harmless in fp32 and in bf16/fp16),
//    and the O rescale is skipped when no row of the warp moved (one warp vote per block). Exact:
//    O, the row sum and the LSE all use the same reference. (Rescaling every block measured slower.)
//  * Key blocks strictly inside the visible band branch around the mask code; the kind of mask
//    (MASK: none, right edge only = causal, both edges = window) is a template parameter.
//  * Epilogue: O normalised, staged through the warp's own Q rows in shared memory, stored with
//    16-byte coalesced writes; the LSE (natural log) is written once per row.
//  * Warp w owns rows [16*MT*w, 16*MT*(w+1)) of the block: softmax needs no cross-warp traffic.
//  * Shared rows are padded by 16 bytes (LD = D + 8 elements): the 8 row addresses of every ldmatrix
//    phase and the cp.async stores fall into distinct banks (needs D % 16 == 0).
//
// Masking (flash.masking): query row i (of len_q) sees key j (of len_k) iff
// -left <= j - i - (len_k - len_q) <= right. Key blocks outside the visible band are never loaded;
// blocks that are fully visible and in bounds skip the per-element mask.
#pragma once

#include "primitives.cuh"

namespace flash_cuda {

// A row's reference max (base 2) moves only when a block's max exceeds it by more than this.
constexpr float RESCALE_LOG2 = 8.f;

template <int D_, int BM_, int BN_, int NW_, int STAGES_>
struct FwdShape {
  static constexpr int D = D_;            // head dim as compiled (multiple of 16, >= the real one)
  static constexpr int BM = BM_;          // query rows per block
  static constexpr int BN = BN_;          // keys per block
  static constexpr int NW = NW_;          // warps per block
  static constexpr int STAGES = STAGES_;  // K/V ring depth
  static constexpr int THREADS = NW * 32;
  static constexpr int MT = BM / (16 * NW);  // m16 tiles per warp
  static constexpr int WARP_ROWS = 16 * MT;
  static constexpr int LD = D + 8;                // padded shared row, elements
  static constexpr int ROW_BYTES = LD * 2;
  static constexpr int KSTEPS = D / 16;           // k16 steps of Q K^T
  static constexpr int NT = BN / 8;               // n8 tiles of S
  static constexpr int DT = D / 8;                // n8 tiles of O
  static constexpr int CHUNKS = D / 8;            // 16-byte chunks per row
  static constexpr int Q_BYTES = BM * ROW_BYTES;
  static constexpr int TILE_BYTES = BN * ROW_BYTES;
  static constexpr int STAGE_BYTES = 2 * TILE_BYTES;  // K tile, then V tile
  static constexpr int SMEM_BYTES = Q_BYTES + STAGES * STAGE_BYTES;

  static_assert(D % 16 == 0 && D >= 16 && D <= 256, "head dim must be a multiple of 16 in [16, 256]");
  static_assert(BM % (16 * NW) == 0, "each warp owns whole m16 tiles");
  static_assert(BN % 16 == 0, "keys come in k16 steps");
  static_assert(STAGES >= 2, "at least double buffering");
};

// Copies (ROWS, D) tiles global -> shared with cp.async, 16 bytes per thread and step. Rows >=
// rows_valid and chunks >= chunks_valid are zero-filled without reading global memory.
//
// Each thread always copies the same column chunk, of rows row0, row0 + RSTEP, ...: its shared and
// global offsets are set up once and a chunk costs one 64-bit add. RSTEP * CHUNKS threads take part
// (all of them when CHUNKS divides THREADS; e.g. 120 of 128 for head dim 96).
template <int ROWS, class S>
struct TileCopy {
  static constexpr int RSTEP = S::THREADS / S::CHUNKS;  // rows per step
  static constexpr int ACTIVE = RSTEP * S::CHUNKS;      // threads that copy
  static constexpr int STEPS = (ROWS + RSTEP - 1) / RSTEP;
  static_assert(RSTEP >= 1, "a block must cover one row per step");

  int row0;
  u32 smem_offset;
  i64 global_offset, global_step;
  bool col_ok;

  __device__ __forceinline__ TileCopy(int tid, i64 stride, int chunks_valid) {
    row0 = tid / S::CHUNKS;
    const int col = tid - row0 * S::CHUNKS;
    smem_offset = (u32)(row0 * S::ROW_BYTES + col * 16);
    global_offset = row0 * stride + col * 8;
    global_step = RSTEP * stride;
    col_ok = col < chunks_valid && (ACTIVE == S::THREADS || tid < ACTIVE);
  }

  // `src`: the tile's first row (always a mapped address); `dst`: shared address of the tile.
  __device__ __forceinline__ void operator()(u32 dst, const u16* __restrict__ src, int rows_valid) const {
    const u16* p = src + global_offset;
#pragma unroll
    for (int it = 0; it < STEPS; ++it) {
      const int r = row0 + it * RSTEP;
      if ((ACTIVE == S::THREADS && ROWS % RSTEP == 0) || (r < ROWS && (ACTIVE == S::THREADS || row0 < RSTEP))) {
        const bool valid = col_ok && r < rows_valid;
        cp_async_16(dst + smem_offset + it * RSTEP * S::ROW_BYTES, valid ? p : src, valid);
      }
      p += global_step;
    }
  }
};

// MASK: 0 no mask, 1 right edge only (causal, or a window open to the left), 2 both edges.
template <int D, int BM, int BN, int NW, int STAGES, bool QREG, bool BF16, int MASK>
__device__ __forceinline__ void flash_fwd_block(
    const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v, u16* __restrict__ o,
    float* __restrict__ lse, const int* __restrict__ cu_q, const int* __restrict__ cu_k,
    i64 q_sb, i64 q_ss, i64 q_sh, i64 k_sb, i64 k_ss, i64 k_sh, i64 v_sb, i64 v_ss, i64 v_sh,
    i64 o_sb, i64 o_ss, i64 o_sh, i64 l_sb, i64 l_sh, i64 l_ss,
    int seqlen_q, int seqlen_k, int total_q, int total_k, int heads_q, int group, int head_dim,
    int m_blocks, int win_left, int win_right, float scale_log2) {
  using S = FwdShape<D, BM, BN, NW, STAGES>;
  constexpr int MT = S::MT, NT = S::NT, DT = S::DT, KSTEPS = S::KSTEPS;
  constexpr float LN2 = 0.6931471805599453f;

  extern __shared__ __attribute__((aligned(128))) unsigned char smem[];
  const u32 s_q = shared_address(smem);
  const u32 s_kv = s_q + S::Q_BYTES;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;

  // Block -> (query block, head, batch). Query blocks vary fastest so that the blocks of one head,
  // which stream the same K/V, run together and share L2; the last query block (the most work
  // under a causal mask) starts first.
  int bid = blockIdx.x;
  const int m_block = m_blocks - 1 - bid % m_blocks;
  bid /= m_blocks;
  const int h = bid % heads_q;
  const int b = bid / heads_q;

  // Sequence bounds: the padded batch, or one sequence of a varlen batch (offsets clamped, so that
  // inconsistent offsets never address memory outside the tensors).
  int q_start = 0, k_start = 0, len_q = seqlen_q, len_k = seqlen_k;
  if (cu_q != nullptr) {
    q_start = min(max(cu_q[b], 0), total_q);
    k_start = min(max(cu_k[b], 0), total_k);
    len_q = min(min(max(cu_q[b + 1], q_start), total_q) - q_start, seqlen_q);
    len_k = min(min(max(cu_k[b + 1], k_start), total_k) - k_start, seqlen_k);
  }
  const int m0 = m_block * BM;
  if (m0 >= len_q) return;

  const int hk = h / group;
  const u16* q_ptr = q + b * q_sb + (q_start + m0) * q_ss + h * q_sh;
  const u16* k_ptr = k + b * k_sb + k_start * k_ss + hk * k_sh;
  const u16* v_ptr = v + b * v_sb + k_start * v_ss + hk * v_sh;
  const int rows_valid = min(BM, len_q - m0);
  const int chunks_valid = head_dim >> 3;

  // Visible key range of the whole block: [key_lo, key_hi).
  const int off = len_k - len_q;
  int key_lo = 0, key_hi = len_k;
  if constexpr (MASK >= 1) {
    const i64 hi = (i64)(m0 + rows_valid - 1) + off + win_right + 1;
    key_hi = (int)max((i64)0, min(hi, (i64)len_k));
  }
  if constexpr (MASK == 2) {
    const i64 lo = (i64)m0 + off - win_left;
    key_lo = (int)max((i64)0, min(lo, (i64)len_k));
  }
  const int nb_lo = key_lo / BN;
  const int n_iters = key_hi > key_lo ? (key_hi + BN - 1) / BN - nb_lo : 0;

  // This warp's rows and this lane's place in the mma fragments.
  const int warp_row = warp * S::WARP_ROWS;
  const int g = lane >> 2;  // accumulator row within an m16 tile (and row + 8)
  const int t = lane & 3;   // accumulator column pair within an n8 tile
  // ldmatrix row addresses of this lane; the four 8x8 matrices of one x4 load are
  //   A (Q):         (rows 0-7, k 0-7) (rows 8-15, k 0-7) (rows 0-7, k 8-15) (rows 8-15, k 8-15)
  //   B (K):         (keys 0-7, d 0-7) (keys 0-7, d 8-15) (keys 8-15, d 0-7) (keys 8-15, d 8-15)
  //   B (V, .trans): (keys 0-7, d 0-7) (keys 8-15, d 0-7) (keys 0-7, d 8-15) (keys 8-15, d 8-15)
  // i.e. a0..a3 of one m16k16 A tile, and b0 b1 of two neighbouring n8 tiles of B.
  const u32 q_lane = (u32)(((lane & 7) + ((lane >> 3) & 1) * 8) * S::ROW_BYTES + (lane >> 4) * 16);
  const u32 k_lane = (u32)(((lane & 7) + ((lane >> 4) & 1) * 8) * S::ROW_BYTES + ((lane >> 3) & 1) * 16);
  const u32 v_lane = (u32)(((lane & 7) + ((lane >> 3) & 1) * 8) * S::ROW_BYTES + ((lane >> 4) & 1) * 16);
  const u32 q_warp = s_q + warp_row * S::ROW_BYTES;

  float acc_o[MT][DT][4];
  float row_ref[MT][2];  // reference max of the row, base-2 scaled units (-inf: no key seen yet)
  float row_sum[MT][2];  // per-lane partial sums: reduced across the quad once, at the end
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] = 0.f;
    }
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      row_ref[mt][hh] = neg_inf();
      row_sum[mt][hh] = 0.f;
    }
  }

  if (n_iters > 0) {
    const TileCopy<BN, S> copy_k(tid, k_ss, chunks_valid);
    const TileCopy<BN, S> copy_v(tid, v_ss, chunks_valid);
    auto load_kv = [&](int block, int stage) {
      const int n0 = (nb_lo + block) * BN;
      const u32 dst = s_kv + stage * S::STAGE_BYTES;
      copy_k(dst, k_ptr + n0 * k_ss, len_k - n0);
      copy_v(dst + S::TILE_BYTES, v_ptr + n0 * v_ss, len_k - n0);
    };
    auto stage_of = [&](int block) { return s_kv + (u32)((block % STAGES) * S::STAGE_BYTES); };

    // Prologue: group 0 = Q + K/V block 0; group j = block j, for j < STAGES - 1 (empty past the end).
    TileCopy<BM, S>(tid, q_ss, chunks_valid)(s_q, q_ptr, rows_valid);
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
      if (st < n_iters) load_kv(st, st);
      cp_async_commit();
    }

    u32 q_frag[QREG ? MT : 1][QREG ? KSTEPS : 1][4];
    auto load_q = [&]() {
      if constexpr (QREG) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
          for (int kk = 0; kk < KSTEPS; ++kk) {
            ldmatrix_x4(q_warp + mt * 16 * S::ROW_BYTES + kk * 32 + q_lane, q_frag[mt][kk]);
          }
        }
      }
    };

    // acc = Q K^T for the K tile at shared address s_k (raw dot products: the scale is folded
    // into the exponent of the softmax).
    auto compute_s = [&](float (&acc)[MT][NT][4], u32 s_k) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
        }
      }
#pragma unroll
      for (int kk = 0; kk < KSTEPS; ++kk) {
        u32 a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          if constexpr (QREG) {
#pragma unroll
            for (int e = 0; e < 4; ++e) a[mt][e] = q_frag[mt][kk][e];
          } else {
            ldmatrix_x4(q_warp + mt * 16 * S::ROW_BYTES + kk * 32 + q_lane, a[mt]);
          }
        }
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
          u32 bk[4];
          ldmatrix_x4(s_k + np * 16 * S::ROW_BYTES + kk * 32 + k_lane, bk);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma_m16n8k16<BF16>(acc[mt][2 * np], a[mt], bk[0], bk[1]);
            mma_m16n8k16<BF16>(acc[mt][2 * np + 1], a[mt], bk[2], bk[3]);
          }
        }
      }
    };

    // Which key blocks need the per-element mask: those that cross the band's left edge (a prefix,
    // windows only) and those that cross its right edge or the sequence end (a suffix). Blocks
    // [mask_lo, mask_hi) are fully visible to every row of the query block.
    int mask_lo = 0, mask_hi;
    {
      const i64 base = (i64)nb_lo * BN;
      // right: block n0 needs the mask iff n0 > last_free
      i64 last_free = (i64)len_k - BN;
      if constexpr (MASK >= 1) last_free = min(last_free, (i64)m0 + off + win_right + 1 - BN);
      if constexpr (MASK == 2) {
        // left: block n0 needs the mask iff n0 < first_free
        const i64 first_free = (i64)m0 + BM - 1 + off - win_left;
        mask_lo = (int)min(max(first_free - base + BN - 1, (i64)0) / BN, (i64)n_iters);
      }
      mask_hi = last_free < base ? 0 : (int)min((last_free - base) / BN + 1, (i64)n_iters);
    }
    auto block_masked = [&](int it) { return it < mask_lo || it >= mask_hi; };

    // -inf where the key block starting at n0 is out of bounds or hidden by the mask.
    // Per element: key col = n0 + nt*8 + 2t + (e&1) of row m0 + warp_row + mt*16 + g + 8(e>>1);
    // visible iff col < len_k and -win_left <= col - row - off <= win_right.
    auto mask_s = [&](float (&acc)[MT][NT][4], int n0) {
      const int col0 = n0 + 2 * t;
      const int delta0 = col0 - (m0 + warp_row + g) - off;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int dcol = nt * 8 + (e & 1);
            const int delta = delta0 + dcol - mt * 16 - (e >> 1) * 8;
            bool visible = col0 + dcol < len_k;
            if constexpr (MASK >= 1) visible = visible && delta <= win_right;
            if constexpr (MASK == 2) visible = visible && delta >= -win_left;
            if (!visible) acc[mt][nt][e] = neg_inf();
          }
        }
      }
    };

    // Online softmax (base 2) of one masked score tile, then O += P V with V at shared address s_v.
    auto softmax_pv = [&](float (&acc)[MT][NT][4], u32 s_v) {
      float block_max[MT][2];  // row maxima of this block, base-2 scaled (-inf stays -inf: scale > 0)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          float mx = neg_inf();
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(acc[mt][nt][2 * hh], acc[mt][nt][2 * hh + 1]));
          block_max[mt][hh] = quad_max(mx) * scale_log2;
        }
      }
      // Move a reference (also from -inf, once the row sees a key) only past the margin; one warp
      // vote decides whether anything needs rescaling at all.
      bool moved = false;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) moved = moved || block_max[mt][hh] > row_ref[mt][hh] + RESCALE_LOG2;
      }
      if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const float ref = row_ref[mt][hh];
            const bool move = block_max[mt][hh] > ref + RESCALE_LOG2;
            const float correction = move ? exp2_approx(ref - block_max[mt][hh]) : 1.f;  // 0 from -inf
            row_ref[mt][hh] = move ? block_max[mt][hh] : ref;
            row_sum[mt][hh] *= correction;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
              acc_o[mt][dt][2 * hh] *= correction;
              acc_o[mt][dt][2 * hh + 1] *= correction;
            }
          }
        }
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          // A row that has seen no key yet keeps -inf: subtract 0 so that exp2 gives 0, not NaN.
          const float shift = row_ref[mt][hh] == neg_inf() ? 0.f : row_ref[mt][hh];
          float sum = 0.f;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
            for (int e = 2 * hh; e < 2 * hh + 2; ++e) {
              const float p = exp2_approx(fmaf(acc[mt][nt][e], scale_log2, -shift));
              acc[mt][nt][e] = p;
              sum += p;
            }
          }
          row_sum[mt][hh] += sum;
        }
      }
      // The S accumulators of n8 tiles 2kk and 2kk+1 are exactly the A fragment of k16 step kk.
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        u32 a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          a[mt][0] = pack2<BF16>(acc[mt][2 * kk][0], acc[mt][2 * kk][1]);
          a[mt][1] = pack2<BF16>(acc[mt][2 * kk][2], acc[mt][2 * kk][3]);
          a[mt][2] = pack2<BF16>(acc[mt][2 * kk + 1][0], acc[mt][2 * kk + 1][1]);
          a[mt][3] = pack2<BF16>(acc[mt][2 * kk + 1][2], acc[mt][2 * kk + 1][3]);
        }
#pragma unroll
        for (int dp = 0; dp < DT / 2; ++dp) {
          u32 bv[4];
          ldmatrix_x4_trans(s_v + kk * 16 * S::ROW_BYTES + dp * 32 + v_lane, bv);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma_m16n8k16<BF16>(acc_o[mt][2 * dp], a[mt], bv[0], bv[1]);
            mma_m16n8k16<BF16>(acc_o[mt][2 * dp + 1], a[mt], bv[2], bv[3]);
          }
        }
      }
    };

    // Block `ahead` goes into the stage that every warp finished with before the last barrier.
    auto prefetch = [&](int ahead) {
      if (ahead < n_iters) load_kv(ahead, ahead % STAGES);
      cp_async_commit();
    };

    if constexpr (QREG) {
      cp_async_wait<STAGES - 2>();
      __syncthreads();
      load_q();
    }
    for (int it = 0; it < n_iters; ++it) {
      // Block `it` has landed (own copies); after the barrier everyone's copies are visible and
      // every warp is done with the stage the prefetch overwrites (the one of block it - 1).
      cp_async_wait<STAGES - 2>();
      __syncthreads();
      prefetch(it + STAGES - 1);
      const u32 s_k = stage_of(it);
      float acc_s[MT][NT][4];
      compute_s(acc_s, s_k);
      if (block_masked(it)) mask_s(acc_s, (nb_lo + it) * BN);  // a uniform branch, skipped inside the band
      softmax_pv(acc_s, s_k + S::TILE_BYTES);
    }
    cp_async_wait<0>();  // only empty groups can remain; keeps the exit path obviously clean
  }

  // ---- epilogue: normalise, write the LSE, stage O through this warp's own Q rows, store 16 B/lane
  // (output pointers formed only now: kernel parameters live in constant memory, not in registers
  // across the main loop)
  i64 out_row;  // (batch, first row) offset, recomputed here rather than kept live across the loop
  {
    const int mb = blockIdx.x % m_blocks;  // (the blockIdx arithmetic of the prologue, once more)
    const int bh = blockIdx.x / m_blocks;
    const int bb = bh / heads_q;
    int qs = 0;
    if (cu_q != nullptr) qs = min(max(load_once(cu_q + bb), 0), total_q);
    out_row = (i64)qs + (m_blocks - 1 - mb) * BM;
    o = o + bb * o_sb + (bh - bb * heads_q) * o_sh;
    lse = lse + bb * l_sb + (bh - bb * heads_q) * l_sh;
  }
  u16* o_ptr = o + out_row * o_ss;
  float* l_ptr = lse + out_row * l_ss;
  __syncwarp();
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const float total = quad_sum(row_sum[mt][hh]);
      // total == 0: the row saw no key (output 0, LSE -inf). NaN inputs propagate as NaN.
      const float inv = total == 0.f ? 0.f : 1.f / total;
      const int row = warp_row + mt * 16 + g + hh * 8;
      if (t == 0 && row < rows_valid) {
        const float lse_row = total == 0.f ? neg_inf() : (row_ref[mt][hh] + log2_approx(total)) * LN2;
        l_ptr[row * l_ss] = lse_row;
      }
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        const u32 packed = pack2<BF16>(acc_o[mt][dt][2 * hh] * inv, acc_o[mt][dt][2 * hh + 1] * inv);
        store_shared_u32(s_q + row * S::ROW_BYTES + (dt * 8 + 2 * t) * 2, packed);
      }
    }
  }
  __syncwarp();
  constexpr int OUT_TOTAL = S::WARP_ROWS * S::CHUNKS;
#pragma unroll
  for (int it = 0; it < (OUT_TOTAL + 31) / 32; ++it) {
    const int idx = lane + it * 32;
    if (OUT_TOTAL % 32 == 0 || idx < OUT_TOTAL) {
      const int r = warp_row + idx / S::CHUNKS;
      const int c = idx % S::CHUNKS;
      if (r < rows_valid && c < chunks_valid) {
        const Chunk chunk = load_shared_chunk(s_q + r * S::ROW_BYTES + c * 16);
        *reinterpret_cast<Chunk*>(o_ptr + r * o_ss + c * 8) = chunk;
      }
    }
  }
}

}  // namespace flash_cuda
