// The Hopper backward's two passes around its main kernel (flash_cuda/hopper_bwd.py), memory-bound:
//
//  * flash_bwd_rows: per (batch, head, row) of the padded workspace, LSE_2 = LSE * log2(e) (+inf
//    where the LSE is -inf: a row that saw no key has P = 0, and past the sequence) and delta =
//    rowsum(dO o O) in fp32 (0 past the sequence). One warp per row, 16-byte loads. ALiBi (slopes
//    non-null): LSE_2 also holds the bias's per-query part, slope log2(e) (row % BLOCK) (see
//    scores_to_p in hopper_bwd.cuh for the per-key part).
//  * flash_bwd_dq: the fp32 dQ workspace (64 x 64 tiles in the accumulator's fragment order, see
//    hopper_bwd.cuh) times scale into dQ in the inputs' dtype, any strides.
//
// Packed (varlen) batches: cu_q non-null, batch 1 in the tensors and buffers, a buffer row's packed
// row found from cu_q (hopper_bwd_packed.cuh); null: batch rows, the sequence's first seqlen_q rows.
// BWD_BF16 (0/1) picks the 16-bit type. Like the other kernels: no CUDA header.
#include "hopper_bwd_packed.cuh"

#ifndef BWD_BF16
#error "compiled through flash_cuda.hopper_bwd, which defines BWD_BF16"
#endif

using namespace flash_cuda;

namespace {

__device__ __forceinline__ float to_float(u32 bits16) {
#if BWD_BF16
  return __uint_as_float(bits16 << 16);
#else
  float f;
  asm("{\n .reg .b16 h;\n cvt.u16.u32 h, %1;\n cvt.f32.f16 %0, h;\n}\n" : "=f"(f) : "r"(bits16));
  return f;
#endif
}

__device__ __forceinline__ float dot_pair(u32 a, u32 b) {
  return to_float(a & 0xffffu) * to_float(b & 0xffffu) + to_float(a >> 16) * to_float(b >> 16);
}

// The tensors' row that buffer row `row` holds, or -1 (padding).
__device__ __forceinline__ int tensor_row(const int* cu_q, int batch, int total_q, int seqlen_q, int row) {
  if (cu_q != nullptr) return packed::packed_row(cu_q, batch, total_q, seqlen_q, row);
  return row < seqlen_q ? row : -1;
}

}  // namespace

// grid: ceil(batch * heads * s_pad / 8) blocks of 256 threads (8 warps, one row each).
extern "C" __global__ void __launch_bounds__(256) flash_bwd_rows(
    const u16* __restrict__ out, const u16* __restrict__ dout, const float* __restrict__ lse,
    float* __restrict__ lse2, float* __restrict__ delta, i64 o_sb, i64 o_ss, i64 o_sh, i64 do_sb, i64 do_ss,
    i64 do_sh, i64 l_sb, i64 l_sh, i64 l_ss, int heads, int seqlen_q, int s_pad, int head_dim, i64 rows,
    const int* __restrict__ cu_q, int batch, int total_q, const float* __restrict__ slopes, i64 slopes_sb,
    i64 slopes_sh) {
  const i64 row_id = (i64)blockIdx.x * 8 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row_id >= rows) return;  // warp-uniform
  const int row = (int)(row_id % s_pad);
  const i64 bh = row_id / s_pad;
  const int h = (int)(bh % heads), b = (int)(bh / heads);
  const int token = tensor_row(cu_q, batch, total_q, seqlen_q, row);
  float sum = 0.f;
  if (token >= 0) {
    const u16* o = out + b * o_sb + token * o_ss + h * o_sh;
    const u16* g = dout + b * do_sb + token * do_ss + h * do_sh;
    // 8 elements (16 bytes) per lane and round; head_dim is a multiple of 8
    for (int col = 8 * lane; col < head_dim; col += 256) {
      const Chunk x = *reinterpret_cast<const Chunk*>(o + col);
      const Chunk y = *reinterpret_cast<const Chunk*>(g + col);
      sum += dot_pair(x.x, y.x) + dot_pair(x.y, y.y) + dot_pair(x.z, y.z) + dot_pair(x.w, y.w);
    }
  }
#pragma unroll
  for (int m = 16; m > 0; m /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, m);
  if (lane == 0) {
    float l2 = __int_as_float(0x7f800000);  // +inf
    if (token >= 0) {
      const float l = lse[b * l_sb + h * l_sh + token * l_ss];
      if (l != neg_inf()) l2 = l * 1.4426950408889634f;
      if (slopes != nullptr) {
        const float slope2 = slopes[b * slopes_sb + h * slopes_sh] * 1.4426950408889634f;
        l2 += slope2 * (float)(row % packed::BLOCK);  // +inf stays +inf
      }
    }
    lse2[row_id] = l2;
    delta[row_id] = sum;
  }
}

// grid: ceil(floats / 2 / 256) blocks of 256 threads, one pair of floats each.
extern "C" __global__ void __launch_bounds__(256)
    flash_bwd_dq(const float* __restrict__ dq_acc, u16* __restrict__ dq, i64 q_sb, i64 q_ss, i64 q_sh, int heads,
                 int seqlen_q, int s_pad, int d, int head_dim, float scale, i64 pairs, const int* __restrict__ cu_q,
                 int batch, int total_q) {
  const i64 f = (i64)blockIdx.x * 256 + threadIdx.x;
  if (f >= pairs) return;
  const int slabs = d / 64, blocks = s_pad / 64;
  const i64 tile = f / 2048;
  const int within = (int)(f % 2048);
  const int ir = within / 128, t = within % 128;
  const int i = ir / 2, r = ir % 2;
  const int slab = (int)(tile % slabs);
  const i64 tb = tile / slabs;
  const int block = (int)(tb % blocks);
  const i64 bh = tb / blocks;
  const int h = (int)(bh % heads), b = (int)(bh / heads);
  const int row = block * 64 + 16 * (t / 32) + (t % 32) / 4 + 8 * r;
  const int col = slab * 64 + 8 * i + 2 * (t % 4);
  if (col >= head_dim) return;
  const int token = tensor_row(cu_q, batch, total_q, seqlen_q, row);
  if (token < 0) return;
  const float x = dq_acc[2 * f], y = dq_acc[2 * f + 1];
  *reinterpret_cast<u32*>(dq + b * q_sb + token * q_ss + h * q_sh + col) =
      pack2<(BWD_BF16 != 0)>(x * scale, y * scale);
}
