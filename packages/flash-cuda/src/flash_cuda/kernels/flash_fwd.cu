// Entry point of the forward kernel. The template parameters arrive as -D options rendered by
// flash_cuda/variants.py, so every variant is one plain extern "C" symbol: CuPy then needs no
// name expressions, and its on-disk cache (keyed by source and options) serves later processes.
#include "flash_fwd.cuh"

#ifndef FLASH_D
#error "flash_fwd.cu is compiled through flash_cuda.variants, which defines FLASH_D and friends"
#endif

extern "C" __global__ void __launch_bounds__(FLASH_NW * 32, FLASH_MIN_BLOCKS)
flash_fwd_kernel(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
                 u16* __restrict__ o, float* __restrict__ lse, const int* __restrict__ cu_q,
                 const int* __restrict__ cu_k, i64 q_sb, i64 q_ss, i64 q_sh, i64 k_sb, i64 k_ss, i64 k_sh,
                 i64 v_sb, i64 v_ss, i64 v_sh, i64 o_sb, i64 o_ss, i64 o_sh, i64 l_sb, i64 l_sh, i64 l_ss,
                 int seqlen_q, int seqlen_k, int total_q, int total_k, int heads_q, int group, int head_dim,
                 int m_blocks, int win_left, int win_right, float scale_log2) {
  flash_cuda::flash_fwd_block<FLASH_D, FLASH_BM, FLASH_BN, FLASH_NW, FLASH_STAGES, (FLASH_QREG != 0),
                              (FLASH_BF16 != 0), FLASH_MASK>(
      q, k, v, o, lse, cu_q, cu_k, q_sb, q_ss, q_sh, k_sb, k_ss, k_sh, v_sb, v_ss, v_sh, o_sb, o_ss, o_sh, l_sb,
      l_sh, l_ss, seqlen_q, seqlen_k, total_q, total_k, heads_q, group, head_dim, m_blocks, win_left, win_right,
      scale_log2);
}
