// What the fp8 Hopper forward (hopper_fwd.cuh) and its V^T pre-pass (hopper_fwd_vt.cu) agree on: the
// order of the keys within a k32 step of P, and where each sequence's keys start in V^T.
#pragma once

#include "primitives.cuh"

namespace flash_cuda {
namespace hopper {

// The key that column k of a k32 step of P holds, relative to the step's first key (the forward's
// to_operand): columns 16h + 4t + m hold key 16h + 8 (m / 2) + 2t + m % 2.
__device__ __forceinline__ int fp8_key(int k) {
  const int h = k / 16, t = (k % 16) / 4, m = k % 4;
  return 16 * h + 8 * (m / 2) + 2 * t + m % 2;
}

// V^T column of sequence `sequence`'s first key in a packed batch whose keys start at `k_start`: a
// multiple of 32, so that the kernel's key blocks start on a permuted step, and at least a padded
// sequence past the previous one's start (ceil((a + n) / 32) <= ceil(a / 32) + ceil(n / 32)).
__device__ __forceinline__ i64 vt_sequence_start(int k_start, int sequence) {
  return 32 * ((i64)(k_start + 31) / 32 + sequence);
}

}  // namespace hopper
}  // namespace flash_cuda
