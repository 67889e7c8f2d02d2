"""Does compute-sanitizer's racecheck follow a bulk copy's mbarrier? A minimal producer/consumer ring.

The Hopper backward's racecheck report (tests/backends/test_cuda_sanitizer.py, BACKWARD_FINDINGS) pairs
the producer's 1-D bulk copies (UBLKCP) of the LSE/delta ring with the consumers' ordinary shared-memory
loads of it, although every such pair is ordered by the ring's full/empty mbarriers. This kernel does
only that: one producer thread bulk-copies 256 bytes per round into one of two stages (waiting on the
stage's empty barrier), four consumer warps wait on the stage's full barrier, read it with ordinary
loads and release it (a warp's leader arrives after __syncwarp; ``--fence``: after a proxy fence too).
The result is checked, so the protocol is right; if racecheck still reports hazards here, it does not
model the bulk copy's completion through the mbarrier, and the backward's report is the tool's.

    compute-sanitizer --tool racecheck python3 packages/flash-cuda/scripts/racecheck_probe.py [--fence]
"""

from __future__ import annotations

import argparse
import os

SOURCE = r"""
#include "hopper_primitives.cuh"
using namespace flash_cuda;
using namespace flash_cuda::sm90;

extern "C" __global__ void __launch_bounds__(160) probe(const float* src, float* out, int rounds) {
  __shared__ __align__(128) float ring[2][64];
  __shared__ __align__(8) unsigned long long bars[4];  // full 0, full 1, empty 0, empty 1
  const u32 full0 = shared_address(&bars[0]), empty0 = shared_address(&bars[2]);
  if (threadIdx.x == 0) {
    for (int s = 0; s < 2; ++s) {
      mbarrier_init(full0 + 8 * s, 1);
      mbarrier_init(empty0 + 8 * s, 4);
    }
    fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x < 32) {  // the producer warp: one thread issues the copies
    if (threadIdx.x == 0) {
      for (int r = 0; r < rounds; ++r) {
        const int s = r & 1;
        mbarrier_wait(empty0 + 8 * s, ((r >> 1) & 1) ^ 1);
        mbarrier_arrive_expect(full0 + 8 * s, 256);
        bulk_load(shared_address(ring[s]), src + 64 * r, 256, full0 + 8 * s);
      }
    }
    return;
  }
  const int t = threadIdx.x - 32;
  float sum = 0.f;
  for (int r = 0; r < rounds; ++r) {
    const int s = r & 1;
    mbarrier_wait(full0 + 8 * s, (r >> 1) & 1);
    sum += __uint_as_float(ld_shared_u32(shared_address(&ring[s][t % 64])));
#ifdef PROBE_FENCE
    fence_proxy_async();
#endif
    __syncwarp();
    if (t % 32 == 0) mbarrier_arrive(empty0 + 8 * s);
  }
  out[t] = sum;
}
"""


def main() -> None:
    import cupy as cp
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fence", action="store_true", help="a proxy fence before each release")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    kernels = os.path.join(os.path.dirname(__file__), "..", "src", "flash_cuda", "kernels")
    options = ("-std=c++17", "-arch=sm_90a", f"-I{os.path.abspath(kernels)}")
    if args.fence:
        options += ("-DPROBE_FENCE",)
    kernel = cp.RawModule(code=SOURCE, options=options).get_function("probe")
    src = cp.arange(64 * args.rounds, dtype=cp.float32)
    out = cp.zeros(128, dtype=cp.float32)
    kernel((1,), (160,), (src, out, np.int32(args.rounds)))
    cp.cuda.Device().synchronize()
    expected = src.reshape(args.rounds, 64).sum(0).get()
    got = out.get()
    assert np.array_equal(got, np.concatenate([expected, expected])), (got, expected)
    print(f"probe ok ({args.rounds} rounds, fence={args.fence})")


if __name__ == "__main__":
    main()
