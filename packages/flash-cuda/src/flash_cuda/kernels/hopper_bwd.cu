// Entry point of the Hopper backward kernel (issue 14). The shape arrives as -D options rendered by
// flash_cuda/hopper_bwd.py, which also writes the variant's wgmma instructions into
// "hopper_wgmma.cuh" (generated, not a file); one C-linkage symbol per variant.
#include "hopper_bwd.cuh"
#include "hopper_wgmma.cuh"

#ifndef HOPPER_BWD_D
#error "hopper_bwd.cu is compiled through flash_cuda.hopper_bwd, which defines HOPPER_BWD_D and friends"
#endif

using BwdShape =
    flash_cuda::hopper_bwd::Shape<HOPPER_BWD_D, HOPPER_BWD_INPUT, HOPPER_BWD_MASK, (HOPPER_BWD_PIPELINED != 0),
                                  (HOPPER_BWD_VARLEN != 0), (HOPPER_BWD_DETERMINISTIC != 0), (HOPPER_BWD_SOFTCAP != 0),
                                  (HOPPER_BWD_EXTRA != 0), (HOPPER_BWD_ALIBI != 0)>;
static_assert(BwdShape::SMEM_BYTES == HOPPER_BWD_SMEM_BYTES, "flash_cuda/hopper_bwd.py and the kernel disagree on smem");

extern "C" __global__ void __launch_bounds__(BwdShape::THREADS, 1)
flash_bwd_sm90(const __grid_constant__ flash_cuda::sm90::TensorMap q_map,
               const __grid_constant__ flash_cuda::sm90::TensorMap k_map,
               const __grid_constant__ flash_cuda::sm90::TensorMap v_map,
               const __grid_constant__ flash_cuda::sm90::TensorMap do_map, u16* __restrict__ dk,
               u16* __restrict__ dv, float* __restrict__ dq_acc, const float* __restrict__ lse2,
               const float* __restrict__ delta, i64 dk_sb, i64 dk_ss, i64 dk_sh, i64 dv_sb, i64 dv_ss, i64 dv_sh,
               int seqlen_q, int seqlen_k, int s_pad, int heads_q, int group, int head_dim, int win_left,
               int win_right, float score_log2, float scale, const int* __restrict__ cu_q,
               const int* __restrict__ cu_k, int total_q, int total_k, int* __restrict__ dq_turns,
               float softcap_in, float softcap_t2, const int* __restrict__ blocks,
               const int* __restrict__ keys, i64 blocks_sb, i64 keys_sb, const float* __restrict__ slopes,
               i64 slopes_sb, i64 slopes_sh) {
  const flash_cuda::hopper_bwd::Params params{dk,       dv,       dq_acc,    lse2,     delta,    dk_sb,   dk_ss,
                                              dk_sh,    dv_sb,    dv_ss,     dv_sh,    seqlen_q, seqlen_k, s_pad,
                                              heads_q,  group,    head_dim,  win_left, win_right, score_log2, scale,
                                              cu_q,     cu_k,     total_q,   total_k,  dq_turns, softcap_in,
                                              softcap_t2, blocks,   keys,     blocks_sb, keys_sb,
                                              slopes,     slopes_sb, slopes_sh};
  flash_cuda::hopper_bwd::backward<BwdShape>(params, &q_map, &k_map, &v_map, &do_map);
}
