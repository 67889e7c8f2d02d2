// Hopper (sm_90a) primitives of the flash CUDA backend: mbarriers, TMA tile loads, wgmma, register
// reallocation and named barriers, each one inline function over built-in types.
//
// Like primitives.cuh this needs no CUDA header: a tensor map is 128 opaque bytes the host encodes
// (flash_cuda/tensor_map.py), 16-bit values are raw u16/u32 bits. The wgmma instructions themselves,
// whose operand lists run to 128 accumulator registers, are written out per tile width by
// flash_cuda/hopper.py (struct Wgmma<N> below is only declared here).
#pragma once

#include "primitives.cuh"

typedef unsigned long long u64;

namespace flash_cuda {
namespace sm90 {

// A CUtensorMap as cuTensorMapEncodeTiled writes it: opaque, 64-byte aligned, passed by value as a
// __grid_constant__ kernel parameter so that TMA can read it from parameter space.
struct alignas(64) TensorMap {
  u64 opaque[16];
};

// ---------------------------------------------------------------- mbarriers

__device__ __forceinline__ void mbarrier_init(u32 bar, u32 arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
}

// Orders the barrier initialisations before their first use by other threads and by the TMA unit.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// One arrival that also tells the barrier to wait for `bytes` bytes of TMA writes in this phase.
__device__ __forceinline__ void mbarrier_arrive_expect(u32 bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbarrier_arrive(u32 bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// Spin until the phase with parity `parity` has completed; what was written before it completed
// (by threads or by TMA) is visible afterwards. A fresh barrier counts its phase "1" as complete.
__device__ __forceinline__ void mbarrier_wait(u32 bar, u32 parity) {
  u32 done;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}

// ---------------------------------------------------------------- TMA (bulk tensor copies)

__device__ __forceinline__ void tma_prefetch_map(const TensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<u64>(map)) : "memory");
}

// One box of a 4-D tensor (coordinates innermost first) into shared memory at `dst`, counted as
// transaction bytes on barrier `bar`. Elements outside the tensor arrive as zeros.
__device__ __forceinline__ void tma_load_4d(u32 dst, const TensorMap* map, u32 bar, int c0, int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], "
      "[%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<u64>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}

// The same box into L2 only (no shared memory, no barrier): a hint that it is needed soon.
__device__ __forceinline__ void tma_prefetch_4d(const TensorMap* map, int c0, int c1, int c2, int c3) {
  asm volatile("cp.async.bulk.prefetch.tensor.4d.L2.global.tile [%0, {%1, %2, %3, %4}];\n" ::"l"(
                   reinterpret_cast<u64>(map)),
               "r"(c0), "r"(c1), "r"(c2), "r"(c3)
               : "memory");
}

// `bytes` contiguous bytes of global memory into shared memory at `dst` (both 16-byte aligned,
// `bytes` a multiple of 16), counted as transaction bytes on barrier `bar` (a 1-D bulk copy).
__device__ __forceinline__ void bulk_load(u32 dst, const void* src, u32 bytes, u32 bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
               "l"(reinterpret_cast<u64>(src)), "r"(bytes), "r"(bar)
               : "memory");
}

// ---------------------------------------------------------------- bulk reductions (shared -> global)

// global[dst .. + bytes) += shared[src .. + bytes) as fp32, element-wise atomic, asynchronous (a 1-D
// bulk reduction; both 16-byte aligned, `bytes` a multiple of 16). Completes in bulk groups.
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, u32 src, u32 bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst), "r"(src),
               "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }

// Wait until at most PENDING bulk groups of this thread still read their shared-memory sources.
template <int PENDING>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(PENDING) : "memory");
}

// Wait until at most PENDING bulk groups of this thread are still running.
template <int PENDING>
__device__ __forceinline__ void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(PENDING) : "memory");
}

// ---------------------------------------------------------------- counters between thread blocks

// A GPU-scope acquire load: later accesses of this thread see what the releasing writer had seen.
__device__ __forceinline__ int ld_acquire_gpu(const int* address) {
  int x;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(x) : "l"(address) : "memory");
  return x;
}

// *address += 1 at GPU scope, released: ordered after every access this thread saw before it.
__device__ __forceinline__ void red_release_gpu_inc(int* address) {
  asm volatile("red.release.gpu.global.add.s32 [%0], 1;\n" ::"l"(address) : "memory");
}

// Orders this thread's global-memory accesses of the generic proxy (the counters) with those of
// the async proxy (bulk reductions), both ways.
__device__ __forceinline__ void fence_proxy_async_global() {
  asm volatile("fence.proxy.async.global;\n" ::: "memory");
}

__device__ __forceinline__ void st_shared_v2_f32(u32 address, float a, float b) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(address), "f"(a), "f"(b) : "memory");
}

// ---------------------------------------------------------------- shared memory by threads

// Byte offset `offset` of a tile, 1024-byte aligned, that TMA or wgmma see with the SPAN-byte swizzle
// (64 or 128): the 16-byte chunk index within each span-sized row XORed with the row's index mod 8
// (128) or half of it mod 4 (64).
template <int SPAN>
__device__ __forceinline__ u32 swizzled(u32 offset) {
  static_assert(SPAN == 128 || SPAN == 64, "128- or 64-byte swizzle");
  return offset ^ (((offset >> 7) & (SPAN / 16 - 1)) << 4);
}

__device__ __forceinline__ u32 ld_shared_u32(u32 address) {
  u32 x;
  asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(x) : "r"(address) : "memory");
  return x;
}

__device__ __forceinline__ void st_shared_u32(u32 address, u32 x) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(address), "r"(x) : "memory");
}

// Orders this thread's shared-memory writes before later reads of them by the async proxy (wgmma).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// ---------------------------------------------------------------- fp8 conversion

// Four floats rounded to e4m3 (saturating), a in the lowest byte.
__device__ __forceinline__ u32 pack4_e4m3(float a, float b, float c, float d) {
  u32 out;
  // cvt puts its first source in the upper byte of the pair
  asm("{\n .reg .b16 lo, hi;\n cvt.rn.satfinite.e4m3x2.f32 lo, %2, %1;\n cvt.rn.satfinite.e4m3x2.f32 hi, %4, %3;\n"
      " mov.b32 %0, {lo, hi};\n}\n"
      : "=r"(out)
      : "f"(a), "f"(b), "f"(c), "f"(d));
  return out;
}

// ---------------------------------------------------------------- wgmma

// Registers written by ordinary instructions must be fenced before a wgmma reads them.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }

__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

// Wait until at most PENDING committed groups of this warpgroup are still running.
template <int PENDING>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(PENDING) : "memory");
}

// The compiler sees a wgmma as an ordinary instruction that has finished when issued. This empty
// asm pins a register's value at this point of the program, so that no use of an accumulator moves
// above the wgmma_wait that completes it (and no write below the issue of the wgmma that reads it).
__device__ __forceinline__ void pin(float& x) { asm volatile("" : "+f"(x)::"memory"); }
__device__ __forceinline__ void pin(u32& x) { asm volatile("" : "+r"(x)::"memory"); }

// Shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format"): start address, leading and
// stride byte offsets (all >> 4) and the swizzle mode. Tiles start on a swizzle-pattern boundary,
// so the base-offset field stays 0.
template <int SWIZZLE_BYTES>
__device__ __forceinline__ u64 smem_descriptor(u32 address, u32 leading_bytes, u32 stride_bytes) {
  static_assert(SWIZZLE_BYTES == 128 || SWIZZLE_BYTES == 64, "tiles use 128- or 64-byte swizzling");
  constexpr u64 mode = SWIZZLE_BYTES == 128 ? 1 : 2;
  return (u64)((address & 0x3FFFF) >> 4) | ((u64)(leading_bytes >> 4) << 16) | ((u64)(stride_bytes >> 4) << 32) |
         (mode << 62);
}

// D (64 x N, fp32) (+)= A (64 x k) B (k x N), k = 32 bytes (16 16-bit or 32 fp8 values), one
// warpgroup, asynchronous. Specialisations are generated per N: ss(d, desc_a, desc_b, accumulate)
// with both operands K-major in shared memory, rs(d, a0..a3, desc_b, accumulate) with A in registers
// and B in shared memory (N-major for 16-bit values, K-major for fp8).
template <int N>
struct Wgmma;

// ---------------------------------------------------------------- warp specialisation

// Give registers back to (DEC) or take them from (INC) the SM's pool, for the whole warpgroup.
template <int REGS>
__device__ __forceinline__ void registers_decrease() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS));
}
template <int REGS>
__device__ __forceinline__ void registers_increase() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS));
}

// Named barriers: `threads` threads in all, of which some sync (wait) and the others only arrive.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// ---------------------------------------------------------------- math

__device__ __forceinline__ float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace sm90
}  // namespace flash_cuda
