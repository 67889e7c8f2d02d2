// The fp8 Hopper forward's pre-pass (flash_cuda/hopper.py), memory-bound: V (keys x head dims per
// batch and KV head, any strides with 16-byte rows) into V^T (head_dim rows of keys, key stride 1),
// the keys of each 32-key step in the order P's registers hold them (fp8_key). The forward then
// TMA-loads V^T boxes as the K-major B operand of O += P V.
//
// V^T is (batch, heads_kv, head_dim, columns) contiguous; a row's columns are padded to a multiple of
// 32 (whole steps, 16-byte TMA strides) and hold zeros past the keys: P is 0 there, but 0 x NaN would
// not be, and a byte of uninitialised memory may be a NaN. Varlen (cu_k): batch 1, sequence s from
// column vt_sequence_start(its first key, s) up to the next sequence's start (zeros between).
//
// A block moves chunks of 64 keys of one (sequence, head): 16-byte loads of V's rows into shared
// memory, then 16-byte stores of 16 V^T columns of one head dim each.
#include "hopper_vt.cuh"

namespace {

constexpr int KEYS = 64;  // keys per chunk: two permuted steps
constexpr int MAX_D = 256;
constexpr int THREADS = 256;

}  // namespace

using namespace flash_cuda;
using namespace flash_cuda::hopper;

// grid: any size; block x takes items x, x + gridDim.x, ... of sequences * heads_kv * chunks (chunk c
// of a sequence also takes columns c + chunks, ... when its columns run past chunks * KEYS).
extern "C" __global__ void __launch_bounds__(THREADS)
flash_fwd_vt(const unsigned char* __restrict__ v, unsigned char* __restrict__ vt, const int* __restrict__ cu_k,
             i64 v_sb, i64 v_ss, i64 v_sh, i64 vt_row, int seqlen_k, int total_k, int heads_kv, int head_dim,
             int sequences, int chunks, i64 items) {
  __shared__ Chunk tile[KEYS][MAX_D / 16];  // V of one chunk: keys x head dims
  const int row_chunks = head_dim / 16;
  for (i64 item = blockIdx.x; item < items; item += gridDim.x) {
    const int h = (int)(item / chunks % heads_kv), s = (int)(item / chunks / heads_kv);
    // the sequence's keys in V, and its V^T columns [0, columns) from dst
    const unsigned char* src = v + h * v_sh;
    unsigned char* dst = vt + (i64)h * head_dim * vt_row;
    int len = min(seqlen_k, total_k);
    i64 columns = vt_row;
    if (cu_k != nullptr) {
      const PackedRange keys = packed_range(cu_k, s, total_k, seqlen_k);
      const i64 start = vt_sequence_start(keys.start, s);
      const i64 end =
          s + 1 < sequences ? vt_sequence_start(packed_range(cu_k, s + 1, total_k, seqlen_k).start, s + 1) : vt_row;
      src += keys.start * v_ss;
      dst += start;
      len = keys.len;
      columns = end - start;  // negative only for inconsistent cu_seqlens: nothing to write
    } else {
      src += s * v_sb;
      dst += (i64)s * heads_kv * head_dim * vt_row;
    }
    for (i64 key0 = (item % chunks) * KEYS; key0 < columns; key0 += (i64)chunks * KEYS) {
      __syncthreads();  // the previous chunk's tile has been read
      for (int i = threadIdx.x; i < KEYS * row_chunks; i += THREADS) {
        const int key = i / row_chunks, part = i % row_chunks;
        Chunk x = {0u, 0u, 0u, 0u};
        if (key0 + key < len) x = *reinterpret_cast<const Chunk*>(src + (key0 + key) * v_ss + 16 * part);
        tile[key][part] = x;
      }
      __syncthreads();
      // thread: V^T columns 16 part .. + 15 of the chunk, head dim d
      for (int i = threadIdx.x; i < head_dim * (KEYS / 16); i += THREADS) {
        const int d = i % head_dim, part = i / head_dim;
        if (key0 + 16 * part >= columns) continue;  // columns is a multiple of 32: whole parts
        const unsigned char* column = reinterpret_cast<const unsigned char*>(tile) + d;
        u32 w[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          w[e] = 0u;
#pragma unroll
          for (int b = 0; b < 4; ++b) {
            const int j = 16 * part + 4 * e + b;  // column within the chunk
            w[e] |= (u32)column[(32 * (j / 32) + fp8_key(j % 32)) * MAX_D] << (8 * b);
          }
        }
        *reinterpret_cast<Chunk*>(dst + d * vt_row + key0 + 16 * part) = {w[0], w[1], w[2], w[3]};
      }
    }
  }
}
