/* gemv.cu: out (M, N) = x (M, K) @ w (N, K)^T for small M (decode): memory-bound on w.
 *
 * A block of 4 warps owns 4 * RPW consecutive rows of w; each warp owns RPW rows and walks K in
 * chunks of 8 elements, one 16-byte load per row per chunk (two for f32 weights), U chunks in
 * flight per row before the first use. Each weight chunk meets all MT rows of x (fp32, read
 * through the read-only cache, shared by every warp of the SM); the partial dot products are
 * summed across the warp with shuffles at the end. Rows of K not a multiple of 8 (or unaligned
 * pointers) take a scalar loop with the same structure. The one-row form (decode at batch 1, the
 * default) splits K instead: the block's 4 warps share its RPW rows, each taking every fourth run
 * of 32 chunks, and their sums meet in shared memory, so four times as many warps (and loads in
 * flight) cover a matrix.
 *
 * Epilogues: STORE writes out, ACC adds into it (a layer's residual), GLU reads each output's
 * gate row n and up row F + n of a stacked (2F, K) weight in the same warp and writes
 * silu(gate) * up (the feed-forward input without a second pass).
 *
 * QKV (one row of x, four rows per warp or block) is a layer's fused q/k/v projection with the rope and
 * the cache store of msh_k_qkv_rope in its epilogue: each warp of the q and k heads owns two
 * rotation pairs (dims (2j, 2j + hd/2) and (2j + 1, 2j + 1 + hd/2) of a head in the half style,
 * 4j .. 4j + 3 interleaved), so both halves of a pair are in one warp; the warps of the v heads
 * own four consecutive rows. q goes to q_out, k and v into the caches' row at the position.
 *
 * NORM folds the RMSNorm before a projection into it: x is the raw residual, each x chunk is
 * multiplied by the norm weight g as it is loaded, and the sum of squares of x is formed on the
 * way (every warp meets each of its chunks of x once), so the dot products are scaled by
 * 1 / sqrt(mean(x^2) + eps) at the end. No normalized copy of x is written or read. */
#include "msh_kutil.cuh"

using namespace msh;

namespace {

constexpr int WARPS = 4;

enum Epi { STORE, ACC, GLU, QKV };

/* QKV's rope and caches (one row of x at position *pos; inv_freq (hd / 2)). */
struct Qkv {
  void *kc, *vc; /* (S, KVH, hd) rows rstride elements apart, heads packed */
  const int32_t *pos;
  const float *inv_freq;
  int H, KVH, hd, kv_dt, interleaved;
  int64_t S, rstride;
};

/* QKV: row r (0..3) of warp wi: the two pairs of rotated dims of a q or k head, or four v rows. */
__device__ __forceinline__ int64_t qkv_row(const Qkv &q, int64_t wi, int r) {
  const int64_t qk_warps = (int64_t)(q.H + q.KVH) * q.hd / 4;
  if (wi >= qk_warps) return (int64_t)(q.H + q.KVH) * q.hd + (wi - qk_warps) * 4 + r;
  const int64_t h = wi / (q.hd / 4);
  const int j = (int)(wi % (q.hd / 4));
  const int dim = q.interleaved ? 4 * j + r : 2 * j + (r >> 1) + (r & 1) * (q.hd / 2);
  return h * q.hd + dim;
}

__device__ __forceinline__ void store_kv(void *c, int dt, int64_t i, float v) {
  if (dt == MSH_BF16) ((bf16 *)c)[i] = from_f<bf16>(v);
  else if (dt == MSH_F16) ((f16 *)c)[i] = from_f<f16>(v);
  else ((float *)c)[i] = v;
}

/* Row r of a warp's NR weight rows: its RPW output rows, then (GLU) their up rows F further. */
template <int EPI, int RPW>
__device__ __forceinline__ int64_t weight_row(int64_t row0, int r, int64_t N) {
  int64_t n = row0 + (EPI == GLU && r >= RPW ? r - RPW : r);
  if (n >= N) n = N - 1;
  return EPI == GLU && r >= RPW ? N + n : n;
}

template <int EPI, int RPW, int MT>
__device__ __forceinline__ void finish(float *out, float (&acc)[EPI == GLU ? 2 * RPW : RPW][MT], int lane,
                                       int64_t row0, int M, int64_t N, const float (&scale)[MT]) {
#pragma unroll
  for (int r = 0; r < RPW; r++)
#pragma unroll
    for (int m = 0; m < MT; m++) {
      float v = warp_sum(acc[r][m]) * scale[m];
      if (EPI == GLU) {
        float u = warp_sum(acc[EPI == GLU ? r + RPW : r][m]) * scale[m];
        v = v / (1.0f + expf(-v)) * u;
      }
      if (lane == 0 && m < M && row0 + r < N) {
        float *o = out + m * N + row0 + r;
        *o = EPI == ACC ? *o + v : v;
      }
    }
}

/* QKV's epilogue: the warp's four sums rotated in pairs (q, k heads) and stored. */
__device__ __forceinline__ void qkv_finish(float *q_out, const Qkv &qa, const float (&acc)[4][1], float scale, int lane,
                                           int64_t wi, bool rot, int32_t pos, float freq) {
  float y[4];
#pragma unroll
  for (int r = 0; r < 4; r++) y[r] = warp_sum(acc[r][0]) * scale;
  if (rot) {
    /* lanes 0 and 1 form the two pairs' angles in double, as msh_k_qkv_rope does */
    double sd, cd;
    sincos((double)pos * (double)freq, &sd, &cd);
    float cf = (float)cd, sf = (float)sd;
#pragma unroll
    for (int k = 0; k < 2; k++) {
      float c = __shfl_sync(0xffffffffu, cf, k), sn = __shfl_sync(0xffffffffu, sf, k);
      float x0 = y[2 * k], x1 = y[2 * k + 1];
      y[2 * k] = x0 * c - x1 * sn;
      y[2 * k + 1] = x0 * sn + x1 * c;
    }
  }
  if (lane < 4) {
    float v = lane == 0 ? y[0] : lane == 1 ? y[1] : lane == 2 ? y[2] : y[3];
    const int64_t row = qkv_row(qa, wi, lane), nq = (int64_t)qa.H * qa.hd, nk = (int64_t)qa.KVH * qa.hd;
    const bool store = pos >= 0 && pos < qa.S;
    const int64_t at = (int64_t)(store ? pos : 0) * qa.rstride;
    if (row < nq) q_out[row] = v;
    else if (store && row < nq + nk) store_kv(qa.kc, qa.kv_dt, at + row - nq, v);
    else if (store) store_kv(qa.vc, qa.kv_dt, at + row - nq - nk, v);
  }
}

template <int MT> __device__ __forceinline__ void load_x8(const float *x, int64_t K, int64_t c, int M, float (&xf)[MT][8]) {
#pragma unroll
  for (int m = 0; m < MT; m++) {
    if (m < M) {
      const float4 *p = reinterpret_cast<const float4 *>(x + m * K + c * 8);
      float4 a = __ldg(p), b = __ldg(p + 1);
      xf[m][0] = a.x; xf[m][1] = a.y; xf[m][2] = a.z; xf[m][3] = a.w;
      xf[m][4] = b.x; xf[m][5] = b.y; xf[m][6] = b.z; xf[m][7] = b.w;
    }
  }
}

/* KS = 1: each warp owns its rows over all of K. KS = WARPS: the block's warps share RPW rows, warp
 * w taking every WARPS-th run of 32 chunks of K, and their sums meet in shared memory (four times
 * the warps per row: more loads in flight for few rows over a long K). */
template <typename W, int MT, int RPW, int U, int EPI, bool NORM, int KS = 1>
__global__ void __launch_bounds__(WARPS * 32) gemv_vec_kernel(float *__restrict__ out, const float *__restrict__ x,
                                                               const W *__restrict__ w, int M, int64_t N, int64_t K,
                                                               const W *__restrict__ g, float eps, Qkv qa) {
  static_assert(EPI != QKV || (MT == 1 && RPW == 4), "QKV: one row of x, two pairs per warp");
  static_assert(KS == 1 || KS == WARPS, "KS: one warp or the whole block per row");
  constexpr int NR = EPI == GLU ? 2 * RPW : RPW;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t wi = KS == 1 ? (int64_t)blockIdx.x * WARPS + warp : (int64_t)blockIdx.x, row0 = wi * RPW;
  const int kpart = KS == 1 ? 0 : warp; /* this warp's runs of K */
  if (row0 >= N) return;
  const W *wr[NR];
#pragma unroll
  for (int r = 0; r < NR; r++) wr[r] = w + (EPI == QKV ? qkv_row(qa, wi, r) : weight_row<EPI, RPW>(row0, r, N)) * K;
  /* QKV: the position and this lane's frequency load now and are used after the main loop (the
   * position was uploaded before the step's first kernel) */
  int32_t qpos = 0;
  float qfreq = 0.0f;
  const bool rot = EPI == QKV && wi < (int64_t)(qa.H + qa.KVH) * qa.hd / 4;
  if (EPI == QKV) {
    qpos = *qa.pos;
    if (rot) qfreq = qa.inv_freq[2 * (int)(wi % (qa.hd / 4)) + (lane & 1)];
  }

  float acc[NR][MT], ss[MT];
#pragma unroll
  for (int m = 0; m < MT; m++) {
    ss[m] = 0.0f;
#pragma unroll
    for (int r = 0; r < NR; r++) acc[r][m] = 0.0f;
  }

  const int64_t K8 = K / 8;
  const int64_t cfirst = kpart * 32 + lane;
  for (int64_t c0 = cfirst; c0 < K8; c0 += 32 * KS * U) {
    Raw8<W> wv[U][NR];
#pragma unroll
    for (int u = 0; u < U; u++)
#pragma unroll
      for (int r = 0; r < NR; r++) {
        if (c0 + u * 32 * KS < K8) wv[u][r].load_stream(wr[r] + (c0 + u * 32 * KS) * 8);
        else wv[u][r].zero();
      }
    if (c0 == cfirst) pdl_wait(); /* the first weights are in flight: now x (the previous kernel's) */
#pragma unroll
    for (int u = 0; u < U; u++) {
      const int64_t c = c0 + u * 32 * KS;
      if (c < K8) {
        float xf[MT][8];
        load_x8<MT>(x, K, c, M, xf);
        if (NORM) {
          Raw8<W> gr;
          gr.load_nc(g + c * 8);
          float gf[8];
          gr.to_float(gf);
#pragma unroll
          for (int m = 0; m < MT; m++)
#pragma unroll
            for (int j = 0; j < 8; j++) {
              ss[m] = fmaf(xf[m][j], xf[m][j], ss[m]);
              xf[m][j] *= gf[j];
            }
        }
#pragma unroll
        for (int r = 0; r < NR; r++) {
          float wf[8];
          wv[u][r].to_float(wf);
#pragma unroll
          for (int m = 0; m < MT; m++)
            if (m < M) {
#pragma unroll
              for (int j = 0; j < 8; j++) acc[r][m] = fmaf(wf[j], xf[m][j], acc[r][m]);
            }
        }
      }
    }
  }
  pdl_wait(); /* lanes that had no chunk */
  /* every weight of this block is loaded: the next kernel may launch into the SM slots that free
   * up (triggering at the start instead let chains of waiting kernels crowd out this one) */
  pdl_trigger();
  if constexpr (KS > 1) {
    /* the warps' sums meet in warp 0, held by its lane 0 (the epilogues sum across the warp) */
    __shared__ float part[KS][NR + 1][MT];
#pragma unroll
    for (int m = 0; m < MT; m++) {
#pragma unroll
      for (int r = 0; r < NR; r++) {
        float v = warp_sum(acc[r][m]);
        if (lane == 0) part[warp][r][m] = v;
      }
      float v = warp_sum(ss[m]);
      if (lane == 0) part[warp][NR][m] = v;
    }
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int m = 0; m < MT; m++) {
#pragma unroll
      for (int r = 0; r < NR; r++) {
        float t = 0.0f;
#pragma unroll
        for (int k = 0; k < KS; k++) t += part[k][r][m];
        acc[r][m] = lane == 0 ? t : 0.0f;
      }
      float t = 0.0f;
#pragma unroll
      for (int k = 0; k < KS; k++) t += part[k][NR][m];
      ss[m] = lane == 0 ? t : 0.0f;
    }
  }
  float scale[MT];
#pragma unroll
  for (int m = 0; m < MT; m++) scale[m] = NORM ? 1.0f / sqrtf(warp_sum(ss[m]) / (float)K + eps) : 1.0f;
  if constexpr (EPI == QKV) qkv_finish(out, qa, acc, scale[0], lane, wi, rot, qpos, qfreq);
  else finish<EPI, RPW, MT>(out, acc, lane, row0, M, N, scale);
}

template <typename W, int MT, int RPW, int EPI>
__global__ void __launch_bounds__(WARPS * 32) gemv_scalar_kernel(float *__restrict__ out, const float *__restrict__ x,
                                                                  const W *__restrict__ w, int M, int64_t N, int64_t K) {
  constexpr int NR = EPI == GLU ? 2 * RPW : RPW;
  pdl_wait();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row0 = ((int64_t)blockIdx.x * WARPS + warp) * RPW;
  if (row0 >= N) return;
  float acc[NR][MT];
#pragma unroll
  for (int r = 0; r < NR; r++)
#pragma unroll
    for (int m = 0; m < MT; m++) acc[r][m] = 0.0f;
  for (int64_t k = lane; k < K; k += 32) {
#pragma unroll
    for (int r = 0; r < NR; r++) {
      float wf = to_f(w[weight_row<EPI, RPW>(row0, r, N) * K + k]);
#pragma unroll
      for (int m = 0; m < MT; m++)
        if (m < M) acc[r][m] = fmaf(wf, x[m * K + k], acc[r][m]);
    }
  }
  pdl_trigger();
  float one[MT];
#pragma unroll
  for (int m = 0; m < MT; m++) one[m] = 1.0f;
  finish<EPI, RPW, MT>(out, acc, lane, row0, M, N, one);
}

/* RPW: weight rows per warp (per block with KS = WARPS) for STORE, ACC and QKV; GLU gives each
 * RPW / 2 outputs (RPW rows). NORM (STORE, GLU and QKV, 16-byte rows) folds the RMSNorm of x with
 * weight g; QKV (qa) takes one row of x, four rows per warp or block, 16-byte rows.
 * cudaErrorNotSupported for a combination without a kernel (the caller then composes). */
template <typename W, int MT, int RPW, int U, bool NORM = false, int KS = 1>
cudaError_t launch(cudaStream_t s, int epi, float *out, const float *x, const void *w, int M, int64_t N, int64_t K,
                   const W *g = nullptr, float eps = 0.0f, const Qkv *qa = nullptr) {
  constexpr int RG = RPW > 1 ? RPW / 2 : 1;
  int64_t rows_per_block = (WARPS / KS) * (epi == GLU ? RG : RPW);
  int64_t blocks = (N + rows_per_block - 1) / rows_per_block;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  bool vec = K % 8 == 0 && aligned16(x) && aligned16(w);
  if (NORM && (!vec || epi == ACC)) return cudaErrorNotSupported;
  const W *wt = (const W *)w;
  dim3 gr((unsigned)blocks), b(WARPS * 32);
  const Qkv none = {};
  if (epi == QKV) {
    if constexpr (MT == 1 && RPW == 4)
      if (vec)
        return launch_pdl(gemv_vec_kernel<W, 1, 4, U, QKV, NORM, KS>, gr, b, 0, s, out, x, wt, 1, N, K, g, eps, *qa);
    return cudaErrorNotSupported;
  }
  /* dependent launches: the weights stream in while the kernel before finishes */
  if (vec) {
    if (epi == GLU)
      return launch_pdl(gemv_vec_kernel<W, MT, RG, U, GLU, NORM, KS>, gr, b, 0, s, out, x, wt, M, N, K, g, eps, none);
    if (epi == ACC)
      return launch_pdl(gemv_vec_kernel<W, MT, RPW, U, ACC, false, KS>, gr, b, 0, s, out, x, wt, M, N, K, g, eps,
                        none);
    return launch_pdl(gemv_vec_kernel<W, MT, RPW, U, STORE, NORM, KS>, gr, b, 0, s, out, x, wt, M, N, K, g, eps,
                      none);
  }
  if (epi == GLU) return launch_pdl(gemv_scalar_kernel<W, MT, RG, GLU>, gr, b, 0, s, out, x, wt, M, N, K);
  if (epi == ACC) return launch_pdl(gemv_scalar_kernel<W, MT, RPW, ACC>, gr, b, 0, s, out, x, wt, M, N, K);
  return launch_pdl(gemv_scalar_kernel<W, MT, RPW, STORE>, gr, b, 0, s, out, x, wt, M, N, K);
}

/* shape of the M = 1 kernel (tuning: msh_k_gemv_variant, or MSH_GEMV_VARIANT in the environment) */
int m1_variant = -1;

int variant() {
  if (m1_variant < 0) {
    const char *e = getenv("MSH_GEMV_VARIANT");
    m1_variant = e ? atoi(e) : 0;
    if (m1_variant < 0 || m1_variant > 7) m1_variant = 0; /* not a variant: the default */
  }
  return m1_variant;
}

/* The M = 1 shape, measured on an H200 (bf16, Llama-3-8B shapes, graph replay; share of the
 * bandwidth floor): four rows a block with K split over its four warps, two chunks in flight per
 * row, wins or ties everywhere: 14336 -> 4096 97% (against 82% for four rows a warp and 70-76%
 * for the other one-warp shapes), 4096 -> 4096 79% (68%), 4096 -> 1024 43% (30%), stacked
 * q/k/v 82% (81%), stacked gate/up with GLU 100% (98%), 4096 -> 14336 95% (96%), the
 * 128256-row head at the ceiling; the Llama-3-8B decode step went from 4.29 to 4.00 ms. */
int m1_default() { return 6; }

/* One row of x in the chosen shape; NORM folds the RMSNorm (g, eps), QKV takes qa. */
template <typename W, bool NORM>
cudaError_t m1(cudaStream_t s, int epi, float *out, const float *x, const void *w, int64_t N, int64_t K,
               const void *g = nullptr, float eps = 0.0f, const Qkv *qa = nullptr) {
  const W *gw = (const W *)g;
  const int v = variant();
  switch (v ? v : m1_default()) {
  case 1: return launch<W, 1, 1, 8, NORM>(s, epi, out, x, w, 1, N, K, gw, eps, qa);
  case 2: return launch<W, 1, 2, 8, NORM>(s, epi, out, x, w, 1, N, K, gw, eps, qa);
  case 3: return launch<W, 1, 4, 4, NORM>(s, epi, out, x, w, 1, N, K, gw, eps, qa);
  case 4: return launch<W, 1, 4, 2, NORM>(s, epi, out, x, w, 1, N, K, gw, eps, qa);
  case 6: return launch<W, 1, 4, 2, NORM, WARPS>(s, epi, out, x, w, 1, N, K, gw, eps, qa);
  case 7: return launch<W, 1, 2, 4, NORM, WARPS>(s, epi, out, x, w, 1, N, K, gw, eps, qa);
  default: return launch<W, 1, 2, 4, NORM>(s, epi, out, x, w, 1, N, K, gw, eps, qa);
  }
}

template <typename W>
cudaError_t by_m(cudaStream_t s, int epi, float *out, const float *x, const void *w, int M, int64_t N, int64_t K) {
  if (M <= 1) return m1<W, false>(s, epi, out, x, w, N, K);
  if (M <= 2) return launch<W, 2, 2, 4>(s, epi, out, x, w, M, N, K);
  if (M <= 4) return launch<W, 4, 2, 2>(s, epi, out, x, w, M, N, K);
  if (M <= 8) return launch<W, 8, 4, 1>(s, epi, out, x, w, M, N, K);
  return launch<W, 16, 4, 1>(s, epi, out, x, w, M, N, K);
}

/* The RMSNorm-folded forms of one row (STORE, GLU, QKV) by weight type; QKV also without the norm
 * (g NULL: x arrives normalized). */
template <typename W>
cudaError_t norm_m1_as(cudaStream_t s, int epi, float *out, const float *x, const void *w, const void *g, float eps,
                       int64_t N, int64_t K, const Qkv *qa) {
  return g ? m1<W, true>(s, epi, out, x, w, N, K, g, eps, qa) : m1<W, false>(s, epi, out, x, w, N, K, g, eps, qa);
}

cudaError_t norm_m1(cudaStream_t s, int epi, int w_dt, float *out, const float *x, const void *w, const void *g,
                    float eps, int64_t N, int64_t K, const Qkv *qa) {
  if (!aligned16(g) || (!g && epi != QKV)) return cudaErrorNotSupported; /* and K % 8, x, w: the vector form */
  if (N == 0) return cudaGetLastError();
  switch (w_dt) {
  case MSH_F32: return norm_m1_as<float>(s, epi, out, x, w, g, eps, N, K, qa);
  case MSH_F16: return norm_m1_as<f16>(s, epi, out, x, w, g, eps, N, K, qa);
  case MSH_BF16: return norm_m1_as<bf16>(s, epi, out, x, w, g, eps, N, K, qa);
  default: return cudaErrorInvalidValue;
  }
}

} // namespace

extern "C" cudaError_t msh_k_gemv_norm_qkv(cudaStream_t s, float *q_out, void *k_cache, void *v_cache, int kv_dt,
                                           const float *x, const void *w, const void *g, int w_dt, float eps,
                                           const int32_t *pos, const float *inv_freq, int64_t H, int64_t KVH,
                                           int64_t hd, int64_t n_rot, int style, int64_t S, int64_t rstride,
                                           int64_t K) {
  if (H < 1 || KVH < 1 || hd < 4 || hd % 4 || 2 * n_rot != hd || (H + 2 * KVH) * hd > 0x7fffffff)
    return cudaErrorNotSupported;
  if (kv_dt != MSH_F32 && kv_dt != MSH_F16 && kv_dt != MSH_BF16) return cudaErrorInvalidValue;
  const Qkv qa = {k_cache, v_cache, pos, inv_freq, (int)H, (int)KVH, (int)hd, kv_dt, style == MSH_ROPE_INTERLEAVED, S,
                  rstride};
  return norm_m1(s, QKV, w_dt, q_out, x, w, g, eps, (H + 2 * KVH) * hd, K, &qa);
}

extern "C" cudaError_t msh_k_gemv_norm(cudaStream_t s, int epi, float *out, const float *x, const void *w,
                                       const void *g, int w_dt, float eps, int64_t N, int64_t K) {
  if (epi != STORE && epi != GLU) return cudaErrorInvalidValue;
  return norm_m1(s, epi, w_dt, out, x, w, g, eps, N, K, nullptr);
}

extern "C" int msh_k_gemv_variant(int v) {
  int old = variant();
  m1_variant = v;
  return old;
}

extern "C" cudaError_t msh_k_gemv_epi(cudaStream_t s, int epi, float *out, const float *x, const void *w, int w_dt,
                                      int64_t M, int64_t N, int64_t K) {
  if (M < 1 || M > 16 || epi < STORE || epi > GLU) return cudaErrorInvalidValue;
  if (N == 0) return cudaGetLastError();
  switch (w_dt) {
  case MSH_F32: return by_m<float>(s, epi, out, x, w, (int)M, N, K);
  case MSH_F16: return by_m<f16>(s, epi, out, x, w, (int)M, N, K);
  case MSH_BF16: return by_m<bf16>(s, epi, out, x, w, (int)M, N, K);
  default: return cudaErrorInvalidValue;
  }
}

extern "C" cudaError_t msh_k_gemv(cudaStream_t s, float *out, const float *x, const void *w, int w_dt, int64_t M,
                                  int64_t N, int64_t K) {
  return msh_k_gemv_epi(s, STORE, out, x, w, w_dt, M, N, K);
}
