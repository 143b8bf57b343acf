/* attn_decode.cu: causal GQA attention of a few queries over a long cache, split-KV
 * (flash-decoding): the keys of each query are cut into `splits` chunks, one block per
 * (chunk, kv head, head tile, query), each keeping an online softmax; a second kernel merges the
 * chunks' partial results.
 *
 * Inside a block (4 warps) a key is read by LPK = HDP/8 lanes, 8 dims each (one 16-byte load of
 * a 2-byte cache), so a warp reads 32/LPK keys per step; the score of each of the GT query heads
 * that share the kv head is summed over those lanes with shuffles, and the same lanes accumulate
 * p * v for their 8 dims. The K and V rows are read once per head tile, not once per query head.
 * Scores are kept in log2 units (q is pre-multiplied by scale * log2(e)). */
#include "msh_kutil.cuh"

using namespace msh;

namespace {

constexpr int NW = 4;
constexpr float LOG2E = 1.4426950408889634f;

struct Plan {
  int HDP, GT, ntiles, splits, chunk;
};

Plan plan_for(const msh_k_attn *a, int sm_count) {
  Plan p;
  p.HDP = a->hd <= 64 ? 64 : a->hd <= 128 ? 128 : 256;
  int G = a->H / a->KVH;
  p.GT = G <= 1 ? 1 : G <= 2 ? 2 : G <= 4 ? 4 : 8;
  p.ntiles = (G + p.GT - 1) / p.GT;
  int64_t maxn = a->pos0 + a->T;
  int64_t base = (int64_t)a->T * a->KVH * p.ntiles;
  int64_t target = 4LL * (sm_count > 0 ? sm_count : 132);
  int64_t splits = (target + base - 1) / base;
  int64_t max_splits = (maxn + 63) / 64;
  if (splits > max_splits) splits = max_splits;
  if (splits < 1) splits = 1;
  int64_t chunk = (maxn + splits - 1) / splits;
  chunk = (chunk + 31) / 32 * 32;
  p.chunk = (int)chunk;
  p.splits = (int)((maxn + chunk - 1) / chunk);
  return p;
}

__device__ __forceinline__ float exp2_or_zero(float x) { return x == -INFINITY ? 0.0f : exp2f(x); }

template <typename KV, int HDP, int GT, int U>
__global__ void __launch_bounds__(NW * 32) decode_kernel(msh_k_attn a, int splits, int chunk, int ntiles, int vec,
                                                         float2 *part_ml, float *part_acc) {
  constexpr int LPK = HDP / 8;  /* lanes per key */
  constexpr int KPW = 32 / LPK; /* keys per warp per step */
  constexpr int NG = NW * KPW;  /* keys per block per step */
  __shared__ float sm_acc[NW][GT][HDP];
  __shared__ float sm_m[NW][GT], sm_l[NW][GT];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int c = lane % LPK, gw = lane / LPK;
  const int split = blockIdx.x, kvh = blockIdx.y / ntiles, tile = blockIdx.y % ntiles, t = blockIdx.z;
  const int G = a.H / a.KVH, hd = a.hd, d0 = c * 8;
  const int dvalid = hd - d0 < 0 ? 0 : hd - d0 > 8 ? 8 : hd - d0;
  const int64_t n = a.pos0 + t + 1;
  const int64_t k_begin = (int64_t)split * chunk;
  if (k_begin >= n) return; /* this query has fewer keys: the merge skips this chunk */
  const int64_t k_end = n < k_begin + chunk ? n : k_begin + chunk;

  const float qs = a.scale * LOG2E;
  float qr[GT][8];
#pragma unroll
  for (int i = 0; i < GT; i++) {
    int hg = tile * GT + i;
    const float *qp = a.q + ((int64_t)t * a.H + kvh * G + (hg < G ? hg : 0)) * hd + d0;
#pragma unroll
    for (int j = 0; j < 8; j++) qr[i][j] = (hg < G && j < dvalid) ? qp[j] * qs : 0.0f;
  }

  float m[GT], l[GT], acc[GT][8];
#pragma unroll
  for (int i = 0; i < GT; i++) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; j++) acc[i][j] = 0.0f;
  }

  const KV *kb = (const KV *)a.k + (int64_t)kvh * hd + d0;
  const KV *vb = (const KV *)a.v + (int64_t)kvh * hd + d0;
  /* the loop bound depends on the warp only, so every lane reaches the shuffles */
  for (int64_t base = k_begin + warp * KPW; base < k_end; base += NG * U) {
    float kf[U][8], vf[U][8];
    if (vec) {
      Raw8<KV> kr[U], vr[U];
#pragma unroll
      for (int u = 0; u < U; u++) {
        int64_t s = base + gw + u * NG;
        if (s < k_end && dvalid > 0) {
          kr[u].load_nc(kb + s * a.ks0);
          vr[u].load_nc(vb + s * a.vs0);
        } else {
          kr[u].zero();
          vr[u].zero();
        }
      }
#pragma unroll
      for (int u = 0; u < U; u++) {
        kr[u].to_float(kf[u]);
        vr[u].to_float(vf[u]);
      }
    } else {
#pragma unroll
      for (int u = 0; u < U; u++) {
        int64_t s = base + gw + u * NG;
        int valid = s < k_end ? dvalid : 0;
        load8_scalar(kb + (s < k_end ? s : k_begin) * a.ks0, valid, kf[u]);
        load8_scalar(vb + (s < k_end ? s : k_begin) * a.vs0, valid, vf[u]);
      }
    }
    float sc[U][GT];
#pragma unroll
    for (int u = 0; u < U; u++)
#pragma unroll
      for (int i = 0; i < GT; i++) {
        float p = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; j++) p = fmaf(qr[i][j], kf[u][j], p);
#pragma unroll
        for (int o = 1; o < LPK; o <<= 1) p += __shfl_xor_sync(0xffffffffu, p, o);
        sc[u][i] = base + gw + u * NG < k_end ? p : -INFINITY;
      }
#pragma unroll
    for (int i = 0; i < GT; i++) {
      float mx = sc[0][i];
#pragma unroll
      for (int u = 1; u < U; u++) mx = fmaxf(mx, sc[u][i]);
      float mnew = fmaxf(m[i], mx);
      if (mnew == -INFINITY) continue;
      float corr = exp2_or_zero(m[i] - mnew);
      l[i] *= corr;
#pragma unroll
      for (int j = 0; j < 8; j++) acc[i][j] *= corr;
#pragma unroll
      for (int u = 0; u < U; u++) {
        float p = exp2_or_zero(sc[u][i] == -INFINITY ? -INFINITY : sc[u][i] - mnew);
        l[i] += p;
#pragma unroll
        for (int j = 0; j < 8; j++) acc[i][j] = fmaf(p, vf[u][j], acc[i][j]);
      }
      m[i] = mnew;
    }
  }

  /* merge the key groups of the warp */
#pragma unroll
  for (int o = LPK; o < 32; o <<= 1) {
#pragma unroll
    for (int i = 0; i < GT; i++) {
      float mo = __shfl_xor_sync(0xffffffffu, m[i], o);
      float lo = __shfl_xor_sync(0xffffffffu, l[i], o);
      float mm = fmaxf(m[i], mo);
      float ca = mm == -INFINITY ? 0.0f : exp2_or_zero(m[i] == -INFINITY ? -INFINITY : m[i] - mm);
      float cb = mm == -INFINITY ? 0.0f : exp2_or_zero(mo == -INFINITY ? -INFINITY : mo - mm);
      l[i] = l[i] * ca + lo * cb;
#pragma unroll
      for (int j = 0; j < 8; j++) {
        float ao = __shfl_xor_sync(0xffffffffu, acc[i][j], o);
        acc[i][j] = acc[i][j] * ca + ao * cb;
      }
      m[i] = mm;
    }
  }
  if (gw == 0) {
#pragma unroll
    for (int i = 0; i < GT; i++) {
#pragma unroll
      for (int j = 0; j < 8; j++) sm_acc[warp][i][d0 + j] = acc[i][j];
      if (lane == 0) {
        sm_m[warp][i] = m[i];
        sm_l[warp][i] = l[i];
      }
    }
  }
  __syncthreads();

  /* merge the warps; write the result (one chunk) or this chunk's partial */
  for (int e = threadIdx.x; e < GT * HDP; e += NW * 32) {
    int i = e / HDP, d = e % HDP, hg = tile * GT + i;
    if (hg >= G || d >= hd) continue;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < NW; w++) M = fmaxf(M, sm_m[w][i]);
    float L = 0.0f, A = 0.0f;
#pragma unroll
    for (int w = 0; w < NW; w++) {
      float f = exp2_or_zero(sm_m[w][i] == -INFINITY ? -INFINITY : sm_m[w][i] - M);
      L += sm_l[w][i] * f;
      A += sm_acc[w][i][d] * f;
    }
    int64_t row = (int64_t)t * a.H + kvh * G + hg;
    if (splits == 1) {
      a.out[row * hd + d] = A / L;
    } else {
      int64_t slot = row * splits + split;
      part_acc[slot * hd + d] = A;
      if (d == 0) part_ml[slot] = make_float2(M, L);
    }
  }
}

__global__ void merge_kernel(msh_k_attn a, int splits, int chunk, const float2 *part_ml, const float *part_acc) {
  int64_t row = blockIdx.x; /* t * H + h */
  int64_t t = row / a.H;
  int64_t n = a.pos0 + t + 1;
  int ns = (int)((n + chunk - 1) / chunk);
  const float2 *ml = part_ml + row * splits;
  float M = -INFINITY;
  for (int sp = 0; sp < ns; sp++) M = fmaxf(M, ml[sp].x);
  float L = 0.0f;
  for (int sp = 0; sp < ns; sp++) L += ml[sp].y * exp2_or_zero(ml[sp].x == -INFINITY ? -INFINITY : ml[sp].x - M);
  float inv = 1.0f / L;
  for (int d = threadIdx.x; d < a.hd; d += blockDim.x) {
    float A = 0.0f;
    for (int sp = 0; sp < ns; sp++)
      A += part_acc[(row * splits + sp) * a.hd + d] * exp2_or_zero(ml[sp].x == -INFINITY ? -INFINITY : ml[sp].x - M);
    a.out[row * a.hd + d] = A * inv;
  }
}

template <typename KV, int HDP, int GT>
cudaError_t launch_kernel(cudaStream_t s, const msh_k_attn *a, const Plan &p, int vec, float2 *ml, float *acc) {
  constexpr int U = GT >= 8 ? 2 : (sizeof(KV) == 4 && GT >= 4) ? 2 : 4;
  dim3 grid((unsigned)p.splits, (unsigned)(a->KVH * p.ntiles), (unsigned)a->T);
  decode_kernel<KV, HDP, GT, U><<<grid, NW * 32, 0, s>>>(*a, p.splits, p.chunk, p.ntiles, vec, ml, acc);
  return cudaGetLastError();
}

template <typename KV, int HDP>
cudaError_t by_gt(cudaStream_t s, const msh_k_attn *a, const Plan &p, int vec, float2 *ml, float *acc) {
  switch (p.GT) {
  case 1: return launch_kernel<KV, HDP, 1>(s, a, p, vec, ml, acc);
  case 2: return launch_kernel<KV, HDP, 2>(s, a, p, vec, ml, acc);
  case 4: return launch_kernel<KV, HDP, 4>(s, a, p, vec, ml, acc);
  default: return launch_kernel<KV, HDP, 8>(s, a, p, vec, ml, acc);
  }
}

template <typename KV>
cudaError_t by_hdp(cudaStream_t s, const msh_k_attn *a, const Plan &p, int vec, float2 *ml, float *acc) {
  switch (p.HDP) {
  case 64: return by_gt<KV, 64>(s, a, p, vec, ml, acc);
  case 128: return by_gt<KV, 128>(s, a, p, vec, ml, acc);
  default: return by_gt<KV, 256>(s, a, p, vec, ml, acc);
  }
}

} // namespace

extern "C" size_t msh_k_attn_decode_workspace(const msh_k_attn *a, int sm_count) {
  Plan p = plan_for(a, sm_count);
  if (p.splits <= 1) return 0;
  size_t slots = (size_t)a->T * a->H * p.splits;
  return slots * sizeof(float2) + slots * a->hd * sizeof(float);
}

extern "C" cudaError_t msh_k_attn_decode(cudaStream_t s, const msh_k_attn *a, void *work, int sm_count) {
  if (a->T <= 0 || a->H <= 0) return cudaGetLastError();
  if (a->hd > 256 || a->hd < 1 || a->KVH < 1 || a->H % a->KVH) return cudaErrorInvalidValue;
  Plan p = plan_for(a, sm_count);
  size_t es = msh_dtype_size(a->kv_dt);
  int vec = a->hd % 8 == 0 && aligned16(a->k) && aligned16(a->v) && (a->ks0 * es) % 16 == 0 &&
            (a->vs0 * es) % 16 == 0;
  float2 *ml = NULL;
  float *acc = NULL;
  if (p.splits > 1) {
    if (!work) return cudaErrorInvalidValue;
    ml = (float2 *)work;
    acc = (float *)(ml + (size_t)a->T * a->H * p.splits);
  }
  cudaError_t e;
  switch (a->kv_dt) {
  case MSH_F32: e = by_hdp<float>(s, a, p, vec, ml, acc); break;
  case MSH_F16: e = by_hdp<f16>(s, a, p, vec, ml, acc); break;
  case MSH_BF16: e = by_hdp<bf16>(s, a, p, vec, ml, acc); break;
  default: return cudaErrorInvalidValue;
  }
  if (e != cudaSuccess || p.splits <= 1) return e;
  int threads = a->hd >= 128 ? 128 : (a->hd + 31) / 32 * 32;
  merge_kernel<<<(unsigned)((int64_t)a->T * a->H), threads, 0, s>>>(*a, p.splits, p.chunk, ml, acc);
  return cudaGetLastError();
}
