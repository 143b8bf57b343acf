/* qkv_rope.cu: a layer's attention inputs from its fused q/k/v projection in one pass: q and k
 * rotated (rope), q written for attention, k and v stored into the caches at each row's position.
 * Blocks own a row's slice of work items (the whole row when there are many rows; a few hundred
 * items at decode, so that one token's row is spread over the SMs instead of one block's
 * latency): each forms the row's cos and sin in shared memory (angles in double, as msh_k_rope
 * and the CPU do); a thread then rotates one pair (reading each input once) or copies one
 * element, consecutive threads on consecutive elements. */
#include "msh_kutil.cuh"

using namespace msh;

namespace {

/* Work items of one row: the (H + KVH) * n rotated pairs of the q and k heads first (pair i of a
 * head: dims (i, i + n) in the half style, (2i, 2i + 1) interleaved), then the dims past 2n of
 * those heads, then the v heads; a thread reads each input once. */
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
  const int nq = H * hd, nk = KVH * hd, heads = H + KVH, rest = hd - 2 * n;
  const int pairs = heads * n, plain = heads * rest, items = pairs + plain + nk;
  const float *row = qkv + r * (int64_t)(nq + 2 * nk);
  float *qr = q_out + r * (int64_t)nq;
  const bool store = p >= 0 && p < S;
  const int64_t at = (r / T) * bstride + (int64_t)(store ? p : 0) * rstride;
  KV *kr = kc + at, *vr = vc + at;
  const int e1 = min(items, (int)(blockIdx.y + 1) * per_block);
  for (int e = (int)blockIdx.y * per_block + threadIdx.x; e < e1; e += blockDim.x) {
    if (e < pairs) {
      int h = e / n, i = e - h * n;
      int j0 = style == MSH_ROPE_INTERLEAVED ? 2 * i : i, j1 = style == MSH_ROPE_INTERLEAVED ? 2 * i + 1 : i + n;
      int o = h * hd;
      float x0 = row[o + j0], x1 = row[o + j1], c = cs[i], sn = cs[n + i];
      float y0 = x0 * c - x1 * sn, y1 = x0 * sn + x1 * c;
      if (h < H) {
        qr[o + j0] = y0;
        qr[o + j1] = y1;
      } else if (store) {
        kr[o - nq + j0] = from_f<KV>(y0);
        kr[o - nq + j1] = from_f<KV>(y1);
      }
    } else if (e < pairs + plain) {
      int q = e - pairs, h = q / rest, o = h * hd + 2 * n + (q - h * rest);
      if (h < H) qr[o] = row[o];
      else if (store) kr[o - nq] = from_f<KV>(row[o]);
    } else if (store) {
      int q = e - pairs - plain;
      vr[q] = from_f<KV>(row[nq + nk + q]);
    }
  }
}

template <typename KV>
cudaError_t launch(cudaStream_t s, float *q_out, void *kc, void *vc, const float *qkv, const int32_t *pos,
                   const float *inv_freq, int64_t R, int64_t T, int64_t H, int64_t KVH, int64_t hd, int64_t n,
                   int style, int64_t S, int64_t bstride, int64_t rstride) {
  size_t smem = (size_t)(2 * n) * sizeof(float);
  /* rows x slices: at least ~128 blocks while rows are few, slices of 512 items or more */
  int64_t items = (H + KVH) * n + (H + KVH) * (hd - 2 * n) + KVH * hd;
  int64_t want = R >= 128 ? 1 : 128 / R, slices = (items + 511) / 512;
  if (slices > want) slices = want;
  if (slices < 1) slices = 1;
  int per_block = (int)((items + slices - 1) / slices);
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
