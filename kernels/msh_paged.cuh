/* msh_paged.cuh: where a paged step's query rows and keys are (paged_attn.cu's kernel and the
 * tensor-core forms of attn_decode.cu). The arrays are read on the device and may hold anything
 * (a stale step's values): every index is clamped, in 64 bits, before it is used. */
#ifndef MSH_PAGED_CUH
#define MSH_PAGED_CUH

#include "msh_kutil.cuh"

namespace msh {

/* The sequence of query row r (the last of the B sequences whose q_start is <= r: the row's own
 * index at once where it is its sequence's one row, else a binary search, as the CPU op) and the
 * row's position: its sequence's context clamped into [rows, max_ctx], less the rows after it,
 * clamped into [0, max_ctx). */
__device__ __forceinline__ int64_t paged_row(const int32_t *q_start, const int32_t *ctx_len, int B, int64_t max_ctx,
                                             int64_t r, int64_t &seq) {
  int lo;
  if (r < B && q_start[r] <= r && q_start[r + 1] > r) {
    lo = (int)r;
  } else {
    lo = 0;
    int hi = B - 1;
    while (lo < hi) {
      int mid = (lo + hi + 1) >> 1;
      if (q_start[mid] <= r) lo = mid;
      else hi = mid - 1;
    }
  }
  seq = lo;
  const int64_t q0 = q_start[lo];
  int64_t n = (int64_t)q_start[lo + 1] - q0;
  n = n < 1 ? 1 : n;
  int64_t cl = ctx_len[lo];
  cl = cl < n ? n : cl > max_ctx ? max_ctx : cl;
  int64_t pos = cl - n + (r - q0);
  return pos < 0 ? 0 : pos >= max_ctx ? max_ctx - 1 : pos;
}

/* Pool row of key s of the sequence whose table row (MB block ids) is bt: the block index clamped
 * into the table, the id into the pool's NB blocks of BS rows. */
__device__ __forceinline__ int64_t paged_key(const int32_t *bt, int MB, int NB, int BS, int64_t s) {
  int bi = (int)(s / BS);
  bi = bi < MB ? bi : MB - 1;
  int blk = __ldg(bt + bi);
  blk = blk < 0 ? 0 : blk >= NB ? NB - 1 : blk;
  return (int64_t)blk * BS + (int)(s % BS);
}

} // namespace msh

#endif
