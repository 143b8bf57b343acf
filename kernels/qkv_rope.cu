/* qkv_rope.cu: a layer's attention inputs from its fused q/k/v projection in one pass: q and k
 * rotated (rope), q written for attention, k and v stored into the caches at each row's position.
 * Blocks own a row's slice of elements (the whole row when there are many rows; a few hundred
 * elements at decode, so that one token's row is spread over the SMs instead of one block's
 * latency): each forms the row's cos and sin in shared memory (angles in double, as msh_k_rope
 * and the CPU do) and each thread then makes one output element from the one or two inputs it
 * depends on, so reads and writes are coalesced. */
#include "msh_kutil.cuh"

using namespace msh;

namespace {

/* Element j of one head (hd values) after rotation by the row's cos (cs[i]) and sin (cs[n + i]). */
__device__ __forceinline__ float rotated(const float *head, int j, const float *cs, int n, int style) {
  if (style == MSH_ROPE_INTERLEAVED) {
    if (j >= 2 * n) return head[j];
    int i = j >> 1;
    float v0 = head[2 * i], v1 = head[2 * i + 1], c = cs[i], s = cs[n + i];
    return (j & 1) ? v0 * s + v1 * c : v0 * c - v1 * s;
  }
  if (j >= 2 * n) return head[j];
  if (j < n) return head[j] * cs[j] - head[j + n] * cs[n + j];
  int i = j - n;
  return head[i] * cs[n + i] + head[j] * cs[i];
}

template <typename KV>
__global__ void qkv_rope_kernel(float *__restrict__ q_out, KV *__restrict__ kc, KV *__restrict__ vc,
                                const float *__restrict__ qkv, const int32_t *__restrict__ pos,
                                const float *__restrict__ inv_freq, int64_t T, int H, int KVH, int hd, int n, int style,
                                int64_t S, int64_t bstride, int64_t rstride, int per_block) {
  extern __shared__ float cs[]; /* cos[n], sin[n] */
  const int64_t r = blockIdx.x;
  const int32_t p = pos[r];
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    double sd, cd;
    sincos((double)p * (double)inv_freq[i], &sd, &cd);
    cs[i] = (float)cd;
    cs[n + i] = (float)sd;
  }
  __syncthreads();
  const int nq = H * hd, nk = KVH * hd;
  const float *row = qkv + r * (int64_t)(nq + 2 * nk);
  const bool store = p >= 0 && p < S;
  const int64_t at = (r / T) * bstride + (int64_t)(store ? p : 0) * rstride;
  const int e1 = min(nq + 2 * nk, (int)(blockIdx.y + 1) * per_block);
  for (int e = (int)blockIdx.y * per_block + threadIdx.x; e < e1; e += blockDim.x) {
    if (e < nq + nk) {
      int j = e % hd;
      float v = rotated(row + (e - j), j, cs, n, style);
      if (e < nq) q_out[r * nq + e] = v;
      else if (store) kc[at + (e - nq)] = from_f<KV>(v);
    } else if (store) {
      vc[at + (e - nq - nk)] = from_f<KV>(row[e]);
    }
  }
}

template <typename KV>
cudaError_t launch(cudaStream_t s, float *q_out, void *kc, void *vc, const float *qkv, const int32_t *pos,
                   const float *inv_freq, int64_t R, int64_t T, int64_t H, int64_t KVH, int64_t hd, int64_t n,
                   int style, int64_t S, int64_t bstride, int64_t rstride) {
  size_t smem = (size_t)(2 * n) * sizeof(float);
  /* rows x slices: at least ~128 blocks while rows are few, slices of 512 elements or more */
  int64_t E = (H + 2 * KVH) * hd, want = R >= 128 ? 1 : 128 / R, slices = (E + 511) / 512;
  if (slices > want) slices = want;
  if (slices < 1) slices = 1;
  int per_block = (int)((E + slices - 1) / slices);
  dim3 grid((unsigned)R, (unsigned)slices);
  qkv_rope_kernel<KV><<<grid, 256, smem, s>>>(q_out, (KV *)kc, (KV *)vc, qkv, pos, inv_freq, T, (int)H, (int)KVH,
                                              (int)hd, (int)n, style, S, bstride, rstride, per_block);
  return cudaGetLastError();
}

} // namespace

extern "C" cudaError_t msh_k_qkv_rope(cudaStream_t s, float *q_out, void *k_cache, void *v_cache, int kv_dt,
                                      const float *qkv, const int32_t *pos, const float *inv_freq, int64_t R,
                                      int64_t T, int64_t H, int64_t KVH, int64_t hd, int64_t n_rot, int style,
                                      int64_t S, int64_t bstride, int64_t rstride) {
  if (R == 0) return cudaGetLastError();
  if (R > 0x7fffffff || T < 1 || (H + 2 * KVH) * hd > 0x7fffffff || 2 * n_rot > hd) return cudaErrorInvalidValue;
  switch (kv_dt) {
  case MSH_F32:
    return launch<float>(s, q_out, k_cache, v_cache, qkv, pos, inv_freq, R, T, H, KVH, hd, n_rot, style, S, bstride,
                         rstride);
  case MSH_F16:
    return launch<f16>(s, q_out, k_cache, v_cache, qkv, pos, inv_freq, R, T, H, KVH, hd, n_rot, style, S, bstride,
                       rstride);
  case MSH_BF16:
    return launch<bf16>(s, q_out, k_cache, v_cache, qkv, pos, inv_freq, R, T, H, KVH, hd, n_rot, style, S, bstride,
                        rstride);
  default: return cudaErrorInvalidValue;
  }
}
