// Packed (varlen) batches in the Hopper backward (issue 14): where sequence b lies in the packed
// tensors (cu_seqlens), and where its query rows lie in the per-row buffers (LSE_2, delta) and in
// dQ's workspace. Shared by the main kernel (hopper_bwd.cuh) and the passes around it
// (hopper_bwd_rows.cu), which must agree on it.
//
// The buffers hold whole blocks of BLOCK rows per head (a sequence's last block padded: LSE_2 +inf,
// delta 0); sequence b's ceil(len_b / BLOCK) blocks start at block start_b / BLOCK + b. Only the
// query offsets are needed, and consecutive sequences never share a block:
//   first_{b+1} = (start_b + len_b) / BLOCK + b + 1 >= start_b / BLOCK + ceil(len_b / BLOCK) + b.
// With offsets clamped into [0, total] and start + len <= total, every block of every sequence lies
// below total / BLOCK + batch (the buffers' blocks per head), whatever the offsets say.
#pragma once

#include "primitives.cuh"

namespace flash_cuda {
namespace packed {

constexpr int BLOCK = 64;  // query rows per block (the main kernel's BM)

// The first buffer block of the sequence b that starts at packed row `start`.
__device__ __forceinline__ int first_block(int start, int b) { return start / BLOCK + b; }

// The packed row that row `row` of a head's buffer holds, or -1 (padding: past a sequence's end, or
// a block no sequence owns). A binary search for the last sequence whose first block is at or before
// the row's block (first blocks increase with b; inconsistent offsets give some sequence's row, or
// -1, never a row outside the tensor).
__device__ __forceinline__ int packed_row(const int* cu, int batch, int total, int max_len, int row) {
  const int block = row / BLOCK;
  int lo = 0, hi = batch - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (first_block(min(max(cu[mid], 0), total), mid) <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const PackedRange s = packed_range(cu, lo, total, max_len);
  const int r = row - first_block(s.start, lo) * BLOCK;
  return r >= 0 && r < s.len ? s.start + r : -1;
}

}  // namespace packed
}  // namespace flash_cuda
