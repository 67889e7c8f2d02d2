// Device primitives of the flash CUDA backend: sm_80+ instructions wrapped as inline functions.
//
// Written against built-in types only (no cuda_fp16.h / cuda_bf16.h / cuda_runtime.h): half and
// bfloat16 values travel as raw 16-bit patterns (u16) and pairs of them as u32; every conversion is
// one PTX instruction. NVRTC then needs no CUDA headers at all, which keeps the CPU compile tier a
// single pip package (nvidia-cuda-nvrtc).
#pragma once

typedef unsigned int u32;
typedef unsigned short u16;
typedef long long i64;

namespace flash_cuda {

// 16 bytes: one cp.async chunk, one vectorised shared/global access.
struct alignas(16) Chunk {
  u32 x, y, z, w;
};

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000u); }

// 32-bit shared-memory address of a generic pointer into shared memory.
__device__ __forceinline__ u32 shared_address(const void* p) {
  u32 address;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(address) : "l"(p));
  return address;
}

// ------------------------------------------------------------------ asynchronous copies (sm_80)

// Copy 16 bytes global -> shared, bypassing L1. When `valid` is false nothing is read and the 16
// destination bytes are zero-filled (src-size 0); `src` must still be a mapped address.
__device__ __forceinline__ void cp_async_16(u32 dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Wait until at most N of this thread's most recent commit groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// A global load the compiler must issue here (not reuse from a register kept live since earlier).
__device__ __forceinline__ int load_once(const int* p) {
  int v;
  asm volatile("ld.global.nc.b32 %0, [%1];\n" : "=r"(v) : "l"(p));
  return v;
}

// ------------------------------------------------------------------ shared-memory matrix loads

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i receives it.
__device__ __forceinline__ void ldmatrix_x4(u32 address, u32 (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// Same, each matrix transposed on the way into registers.
__device__ __forceinline__ void ldmatrix_x4_trans(u32 address, u32 (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

__device__ __forceinline__ void store_shared_u32(u32 address, u32 value) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(address), "r"(value) : "memory");
}

__device__ __forceinline__ Chunk load_shared_chunk(u32 address) {
  Chunk c;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(c.x), "=r"(c.y), "=r"(c.z), "=r"(c.w)
               : "r"(address)
               : "memory");
  return c;
}

// ------------------------------------------------------------------ tensor cores

// D = A B + D for one m16n8k16 tile: A 16x16 (row), B 16x8 (col), fp32 accumulators.
template <bool BF16>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  if constexpr (BF16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// ------------------------------------------------------------------ conversions and math

// Two floats -> one register of two 16-bit values, `lo` in the low half (round to nearest even).
template <bool BF16>
__device__ __forceinline__ u32 pack2(float lo, float hi) {
  u32 r;
  if constexpr (BF16) {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  } else {
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  }
  return r;
}

__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float log2_approx(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Reductions over the four lanes of a quad (the lanes that share an accumulator row).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Sequence i of a packed (varlen) batch of batch + 1 offsets `cu`: its first row clamped into the
// packed tensor of `total` rows (inconsistent cu_seqlens never address outside it), its length
// capped at the batch's declared longest. The forward, its V^T pre-pass and the backward share it.
struct PackedRange {
  int start, len;
};

__device__ __forceinline__ PackedRange packed_range(const int* cu, int i, int total, int max_len) {
  const int start = min(max(cu[i], 0), total);
  return {start, min(min(max(cu[i + 1], start), total) - start, max_len)};
}

}  // namespace flash_cuda
