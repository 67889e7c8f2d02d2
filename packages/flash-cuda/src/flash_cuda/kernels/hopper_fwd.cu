// Entry point of the Hopper forward kernel. The shape arrives as -D options rendered by
// flash_cuda/hopper.py, which also writes the wgmma instructions of the variant's tile widths into
// "hopper_wgmma.cuh" (generated, not a file); every variant is one extern "C" symbol, so CuPy needs
// no name expressions and its disk cache serves later processes. fp8 inputs: v_map maps the
// pre-pass's V^T (hopper_fwd_vt.cu).
#include "hopper_fwd.cuh"
#include "hopper_wgmma.cuh"

#ifndef HOPPER_D
#error "hopper_fwd.cu is compiled through flash_cuda.hopper, which defines HOPPER_D and friends"
#endif

using HopperShape = flash_cuda::hopper::Shape<HOPPER_D, HOPPER_CONSUMERS, HOPPER_BN, HOPPER_Q_STAGES, HOPPER_INPUT,
                                              (HOPPER_OUT_BF16 != 0), HOPPER_MASK>;
static_assert(HopperShape::SMEM_BYTES == HOPPER_SMEM_BYTES, "flash_cuda/hopper.py and the kernel disagree on smem");

extern "C" __global__ void __launch_bounds__(HopperShape::THREADS, 1)
flash_fwd_sm90(const __grid_constant__ flash_cuda::sm90::TensorMap q_map,
               const __grid_constant__ flash_cuda::sm90::TensorMap k_map,
               const __grid_constant__ flash_cuda::sm90::TensorMap v_map, u16* __restrict__ o, float* __restrict__ lse,
               const int* __restrict__ cu_q, const int* __restrict__ cu_k, i64 o_sb, i64 o_ss, i64 o_sh, i64 l_sb,
               i64 l_sh, i64 l_ss, int seqlen_q, int seqlen_k, int total_q, int total_k, int heads_q, int group,
               int head_dim, int m_blocks, int tiles, int win_left, int win_right, int blocks_outer,
               float score_log2, float softcap_in, const float* __restrict__ q_descale,
               const float* __restrict__ k_descale, const float* __restrict__ v_descale, i64 qd_sb, i64 qd_sh,
               i64 kd_sb, i64 kd_sh, i64 vd_sb, i64 vd_sh, const int* __restrict__ iv,
               const unsigned char* __restrict__ keys, i64 iv_sb, i64 keys_sb, i64 keys_sk, int iv_ss, int iv_hi,
               int iv_full, const int* __restrict__ bl_counts, const int* __restrict__ bl_index, int bl_sb,
               int bl_sh, int bl_nk, int bl_shift) {
  const flash_cuda::hopper::Params params{o,        lse,      cu_q,     cu_k,    o_sb,      o_ss,     o_sh,
                                          l_sb,     l_sh,     l_ss,     seqlen_q, seqlen_k, total_q,  total_k,
                                          heads_q,  group,    head_dim, m_blocks, tiles,    win_left, win_right,
                                          blocks_outer, score_log2, softcap_in, q_descale, k_descale,
                                          v_descale, qd_sb,    qd_sh,    kd_sb,    kd_sh,   vd_sb,     vd_sh,
                                          iv,       keys,     iv_sb,    keys_sb,  keys_sk, iv_ss,     iv_hi,
                                          iv_full,  bl_counts, bl_index, bl_sb,    bl_sh,   bl_nk,     bl_shift};
  flash_cuda::hopper::forward<HopperShape>(params, &q_map, &k_map, &v_map);
}
