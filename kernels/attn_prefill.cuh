/* attn_prefill.cuh: the flash-attention prefill kernels' shared declarations (attn_prefill.cu
 * plans and dispatches; attn_prefill_sm90.cu holds the Hopper kernel). */
#ifndef MSH_ATTN_PREFILL_CUH
#define MSH_ATTN_PREFILL_CUH

#include "msh_mma.cuh"

namespace msh {

/* One block of either prefill kernel: its packed query rows and its keys. The 1-D grid's x is
 * (row block, the last first) x (sequence, kv head): blocks start in order of x, so the blocks
 * with the most keys start first across all heads and sequences. The block needs keys
 * [0, pos0 + t_last + 1), of which split blockIdx.z takes [k_begin, kmax); none when kmax <=
 * k_begin (the merge skips the split). Keys below are relative to k_begin. */
struct PrefillBlock {
  int G, kvh, split;
  int64_t b, bT, rows, rblk, k_begin, kmax;

  __device__ __forceinline__ PrefillBlock(const msh_k_attn &a, int64_t chunk, int bm) {
    const int nbk = a.B * a.KVH, bk = (int)(blockIdx.x % nbk);
    G = a.H / a.KVH;
    kvh = bk % a.KVH;
    b = bk / a.KVH;
    bT = b * a.T; /* the sequence's first query's row */
    rows = (int64_t)a.T * G;
    rblk = (int64_t)(gridDim.x / nbk - 1 - blockIdx.x / nbk) * bm;
    const int64_t rlast = (rblk + bm < rows ? rblk + bm : rows) - 1, kneed = a.pos0 + rlast / G + 1;
    split = blockIdx.z;
    k_begin = (int64_t)split * chunk;
    kmax = kneed < k_begin + chunk ? kneed : k_begin + chunk;
  }
  __device__ __forceinline__ int keys() const { return (int)(kmax - k_begin); }
  /* the keys packed row r (clamped to the last row) sees */
  __device__ __forceinline__ int limit(const msh_k_attn &a, int64_t r) const {
    const int64_t k = a.pos0 + (r < rows ? r : rows - 1) / G + 1;
    return (int)((k < kmax ? k : kmax) - k_begin);
  }
  /* the (token, head) row of q and out that packed row r is */
  __device__ __forceinline__ int64_t row(const msh_k_attn &a, int64_t r) const {
    return (bT + r / G) * a.H + kvh * G + r % G;
  }
  /* f32 query of packed row r (clamped) */
  __device__ __forceinline__ const float *q(const msh_k_attn &a, int64_t r) const {
    return a.q + row(a, r < rows ? r : rows - 1) * a.hd;
  }
  /* packed row r's result from the 4 threads of its quad (tq): without splits out = acc / l; with
   * them this chunk's unnormalized acc and its (max, sum of weights); acc(dn) gives the thread's
   * two values of columns 8 dn + 2 tq */
  template <int HD, bool SPLIT, typename Acc>
  __device__ __forceinline__ void store(const msh_k_attn &a, int64_t r, int tq, float m, float l, int splits,
                                        float2 *part_ml, float *part_acc, Acc acc) const {
    const int64_t rw = row(a, r);
    if (SPLIT) {
      float *dst = part_acc + (rw * splits + split) * a.hd;
#pragma unroll
      for (int dn = 0; dn < HD / 8; dn++) *reinterpret_cast<float2 *>(dst + dn * 8 + 2 * tq) = acc(dn);
      if (tq == 0) part_ml[rw * splits + split] = make_float2(m, l);
    } else {
      const float inv = 1.0f / l;
      float *dst = a.out + rw * a.hd;
#pragma unroll
      for (int dn = 0; dn < HD / 8; dn++) {
        const float2 v = acc(dn);
        *reinterpret_cast<float2 *>(dst + dn * 8 + 2 * tq) = make_float2(v.x * inv, v.y * inv);
      }
    }
  }
};

/* the grid of either kernel for row blocks of bm packed rows: x as PrefillBlock reads it, z the splits */
inline dim3 prefill_grid(const msh_k_attn *a, int bm, int splits) {
  const int64_t rows = (int64_t)a->T * (a->H / a->KVH);
  return dim3((unsigned)((rows + bm - 1) / bm * a->B * a->KVH), 1, (unsigned)splits);
}

/* whether this build has the sm_90a kernel and the current device runs it (compute capability 9) */
bool attn_prefill_sm90_available();

/* the Hopper kernel: 128 x 128 block tiles (two warpgroups of 64 query rows, 128-key tiles), keys
 * in `splits` chunks of `chunk` (a multiple of 128); with splits > 1 the partials go to ml and acc
 * as in attn_prefill.cu */
cudaError_t attn_prefill_sm90(cudaStream_t s, const msh_k_attn *a, int splits, int64_t chunk, float2 *ml,
                              float *acc);

} // namespace msh

#endif
