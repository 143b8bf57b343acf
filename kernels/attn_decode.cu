/* attn_decode.cu: causal GQA attention of a few queries over a long cache, split-KV
 * (flash-decoding): the keys of each query are cut into `splits` chunks, one block per
 * (chunk, kv head, head tile, query), each keeping an online softmax; a second kernel merges the
 * chunks' partial results. The split count fills the GPU once (blocks per SM x SMs).
 *
 * Inside a block (4 warps) a key is read by LPK = HDP/8 lanes, 8 dims each, so a warp takes
 * 32/LPK keys per step; the score of each of the GT query heads that share the kv head is summed
 * over those lanes with shuffles, and the same lanes accumulate p * v for their 8 dims. K and V
 * are read once per head tile, not once per query head. Scores are in log2 units (q is
 * pre-multiplied by scale * log2(e)).
 *
 * Two ways in: with 16-byte aligned rows (hd % 8 == 0) tiles of TK keys stream into shared memory
 * through a STAGES-deep cp.async pipeline, so loads stay in flight while the warps compute; other
 * shapes read global memory directly, element by element. */
#include "msh_kutil.cuh"

using namespace msh;

namespace {

constexpr int NW = 4;
constexpr float LOG2E = 1.4426950408889634f;

__device__ __forceinline__ float exp2_or_zero(float x) { return x == -INFINITY ? 0.0f : exp2f(x); }

/* Compile-time shape of one kernel instance. */
template <typename KV, int HDP_, int GT_> struct Cfg {
  static constexpr int HDP = HDP_, GT = GT_;
  static constexpr int LPK = HDP / 8;  /* lanes per key */
  static constexpr int KPW = 32 / LPK; /* keys per warp per step */
  static constexpr int NG = NW * KPW;  /* keys per block per step */
  static constexpr int U = GT >= 8 ? 2 : (sizeof(KV) == 4 && GT >= 4) ? 2 : 4; /* steps per tile */
  static constexpr int TK = NG * U;    /* keys per tile */
  static constexpr int STAGES = sizeof(KV) == 4 ? 3 : 4;
  static constexpr int PIPE_BYTES = STAGES * 2 * TK * HDP * (int)sizeof(KV);
  static constexpr int EPI_BYTES = (NW * GT * HDP + 2 * NW * GT) * 4;
  static constexpr int SMEM = PIPE_BYTES > EPI_BYTES ? PIPE_BYTES : EPI_BYTES;
};

/* Per-lane running state: max and sum of the softmax and the weighted sum of V, per head. */
template <int GT> struct Acc {
  float m[GT], l[GT], o[GT][8];
  __device__ __forceinline__ void init() {
#pragma unroll
    for (int i = 0; i < GT; i++) {
      m[i] = -INFINITY;
      l[i] = 0.0f;
#pragma unroll
      for (int j = 0; j < 8; j++) o[i][j] = 0.0f;
    }
  }
};

/* U keys (k, v as floats; invalid ones are masked) into the running state. */
template <int GT, int U, int LPK>
__device__ __forceinline__ void consume(const float (&qr)[GT][8], const float (&kf)[U][8], const float (&vf)[U][8],
                                        const bool (&valid)[U], Acc<GT> &st) {
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
      sc[u][i] = valid[u] ? p : -INFINITY;
    }
#pragma unroll
  for (int i = 0; i < GT; i++) {
    float mx = sc[0][i];
#pragma unroll
    for (int u = 1; u < U; u++) mx = fmaxf(mx, sc[u][i]);
    float mnew = fmaxf(st.m[i], mx);
    if (mnew == -INFINITY) continue;
    float corr = exp2_or_zero(st.m[i] == -INFINITY ? -INFINITY : st.m[i] - mnew);
    st.l[i] *= corr;
#pragma unroll
    for (int j = 0; j < 8; j++) st.o[i][j] *= corr;
#pragma unroll
    for (int u = 0; u < U; u++) {
      float p = exp2_or_zero(sc[u][i] == -INFINITY ? -INFINITY : sc[u][i] - mnew);
      st.l[i] += p;
#pragma unroll
      for (int j = 0; j < 8; j++) st.o[i][j] = fmaf(p, vf[u][j], st.o[i][j]);
    }
    st.m[i] = mnew;
  }
}

struct Where {
  int split, kvh, tile, t, G, hd, d0, dvalid, lane, warp, gw;
  int64_t k_begin, k_end;
};

__device__ __forceinline__ bool where_am_i(const msh_k_attn &a, int chunk, int ntiles, int LPK, Where &w) {
  w.lane = threadIdx.x & 31;
  w.warp = threadIdx.x >> 5;
  w.gw = w.lane / LPK;
  w.split = blockIdx.x;
  w.kvh = blockIdx.y / ntiles;
  w.tile = blockIdx.y % ntiles;
  w.t = blockIdx.z;
  w.G = a.H / a.KVH;
  w.hd = a.hd;
  w.d0 = (w.lane % LPK) * 8;
  w.dvalid = w.hd - w.d0 < 0 ? 0 : w.hd - w.d0 > 8 ? 8 : w.hd - w.d0;
  int64_t n = a.pos0 + w.t + 1;
  w.k_begin = (int64_t)w.split * chunk;
  w.k_end = n < w.k_begin + chunk ? n : w.k_begin + chunk;
  return w.k_begin < n; /* false: this query has fewer keys, the merge skips this chunk */
}

template <int GT> __device__ __forceinline__ void load_q(const msh_k_attn &a, const Where &w, float (&qr)[GT][8]) {
  const float qs = a.scale * LOG2E;
#pragma unroll
  for (int i = 0; i < GT; i++) {
    int hg = w.tile * GT + i;
    const float *qp = a.q + ((int64_t)w.t * a.H + w.kvh * w.G + (hg < w.G ? hg : 0)) * w.hd + w.d0;
#pragma unroll
    for (int j = 0; j < 8; j++) qr[i][j] = (hg < w.G && j < w.dvalid) ? qp[j] * qs : 0.0f;
  }
}

/* Merges the key groups of each warp, then the warps (through ep, shared), and writes the result
 * (one chunk) or this chunk's partial. */
template <int HDP, int GT, int LPK>
__device__ __forceinline__ void finish(const msh_k_attn &a, const Where &w, Acc<GT> &st, float *ep, int splits,
                                       float2 *part_ml, float *part_acc) {
#pragma unroll
  for (int o = LPK; o < 32; o <<= 1) {
#pragma unroll
    for (int i = 0; i < GT; i++) {
      float mo = __shfl_xor_sync(0xffffffffu, st.m[i], o);
      float lo = __shfl_xor_sync(0xffffffffu, st.l[i], o);
      float mm = fmaxf(st.m[i], mo);
      float ca = mm == -INFINITY ? 0.0f : exp2_or_zero(st.m[i] == -INFINITY ? -INFINITY : st.m[i] - mm);
      float cb = mm == -INFINITY ? 0.0f : exp2_or_zero(mo == -INFINITY ? -INFINITY : mo - mm);
      st.l[i] = st.l[i] * ca + lo * cb;
#pragma unroll
      for (int j = 0; j < 8; j++) {
        float ao = __shfl_xor_sync(0xffffffffu, st.o[i][j], o);
        st.o[i][j] = st.o[i][j] * ca + ao * cb;
      }
      st.m[i] = mm;
    }
  }
  float *sm_acc = ep;                   /* [NW][GT][HDP] */
  float *sm_m = ep + NW * GT * HDP;     /* [NW][GT] */
  float *sm_l = sm_m + NW * GT;         /* [NW][GT] */
  if (w.gw == 0) {
#pragma unroll
    for (int i = 0; i < GT; i++) {
#pragma unroll
      for (int j = 0; j < 8; j++) sm_acc[(w.warp * GT + i) * HDP + w.d0 + j] = st.o[i][j];
      if (w.lane == 0) {
        sm_m[w.warp * GT + i] = st.m[i];
        sm_l[w.warp * GT + i] = st.l[i];
      }
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < GT * HDP; e += NW * 32) {
    int i = e / HDP, d = e % HDP, hg = w.tile * GT + i;
    if (hg >= w.G || d >= w.hd) continue;
    float M = -INFINITY;
#pragma unroll
    for (int v = 0; v < NW; v++) M = fmaxf(M, sm_m[v * GT + i]);
    float L = 0.0f, A = 0.0f;
#pragma unroll
    for (int v = 0; v < NW; v++) {
      float mv = sm_m[v * GT + i];
      float f = exp2_or_zero(mv == -INFINITY ? -INFINITY : mv - M);
      L += sm_l[v * GT + i] * f;
      A += sm_acc[(v * GT + i) * HDP + d] * f;
    }
    int64_t row = (int64_t)w.t * a.H + w.kvh * w.G + hg;
    if (splits == 1) {
      a.out[row * w.hd + d] = A / L;
    } else {
      int64_t slot = row * splits + w.split;
      part_acc[slot * w.hd + d] = A;
      if (d == 0) part_ml[slot] = make_float2(M, L);
    }
  }
}

/* 16-byte aligned rows: K/V tiles through a cp.async pipeline in shared memory. */
template <typename KV, int HDP, int GT>
__global__ void __launch_bounds__(NW * 32) decode_pipe_kernel(msh_k_attn a, int splits, int chunk, int ntiles,
                                                              float2 *part_ml, float *part_acc) {
  typedef Cfg<KV, HDP, GT> C;
  constexpr int U = C::U, TK = C::TK, STAGES = C::STAGES;
  extern __shared__ __align__(16) unsigned char smem[];
  KV *tiles = reinterpret_cast<KV *>(smem); /* [STAGES][2][TK][HDP] */
  Where w;
  if (!where_am_i(a, chunk, ntiles, C::LPK, w)) return;
  float qr[GT][8];
  load_q<GT>(a, w, qr);
  Acc<GT> st;
  st.init();

  const KV *kg = (const KV *)a.k + (int64_t)w.kvh * w.hd;
  const KV *vg = (const KV *)a.v + (int64_t)w.kvh * w.hd;
  const int cpr = w.hd / 8; /* 16-byte chunks per row */
  const int ntile = (int)((w.k_end - w.k_begin + TK - 1) / TK);
  auto load = [&](int j) {
    KV *kt = tiles + (size_t)(j % STAGES) * 2 * TK * HDP, *vt = kt + TK * HDP;
    for (int e = threadIdx.x; e < TK * cpr; e += NW * 32) {
      int r = e / cpr, cc = e % cpr;
      int64_t key = w.k_begin + (int64_t)j * TK + r;
      bool ok = key < w.k_end; /* rows past the chunk become zeros */
      int64_t kr = ok ? key : w.k_begin;
      cp_async16(kt + r * HDP + cc * 8, kg + kr * a.ks0 + cc * 8, ok);
      cp_async16(vt + r * HDP + cc * 8, vg + kr * a.vs0 + cc * 8, ok);
    }
  };
#pragma unroll
  for (int s = 0; s < STAGES - 1; s++) {
    if (s < ntile) load(s);
    cp_async_commit();
  }
  for (int j = 0; j < ntile; j++) {
    cp_async_wait<STAGES - 2>(); /* tile j has landed (this thread's part) */
    __syncthreads();             /* ... everyone's; and tile j - 1 is consumed */
    if (j + STAGES - 1 < ntile) load(j + STAGES - 1);
    cp_async_commit();
    const KV *kt = tiles + (size_t)(j % STAGES) * 2 * TK * HDP, *vt = kt + TK * HDP;
    float kf[U][8], vf[U][8];
    bool valid[U];
#pragma unroll
    for (int u = 0; u < U; u++) {
      int r = w.warp * C::KPW + w.gw + u * C::NG;
      valid[u] = w.k_begin + (int64_t)j * TK + r < w.k_end;
      if (w.dvalid > 0) {
        load8_shared(kt + r * HDP + w.d0, kf[u]);
        load8_shared(vt + r * HDP + w.d0, vf[u]);
      } else {
#pragma unroll
        for (int q = 0; q < 8; q++) kf[u][q] = vf[u][q] = 0.0f;
      }
    }
    consume<GT, U, C::LPK>(qr, kf, vf, valid, st);
  }
  cp_async_wait<0>();
  __syncthreads(); /* the tiles' memory now holds the merge */
  finish<HDP, GT, C::LPK>(a, w, st, reinterpret_cast<float *>(smem), splits, part_ml, part_acc);
}

/* Any row alignment and head dim: element loads straight from global memory. */
template <typename KV, int HDP, int GT>
__global__ void __launch_bounds__(NW * 32) decode_direct_kernel(msh_k_attn a, int splits, int chunk, int ntiles,
                                                                float2 *part_ml, float *part_acc) {
  typedef Cfg<KV, HDP, GT> C;
  constexpr int U = C::U;
  __shared__ float ep[NW * GT * HDP + 2 * NW * GT];
  Where w;
  if (!where_am_i(a, chunk, ntiles, C::LPK, w)) return;
  float qr[GT][8];
  load_q<GT>(a, w, qr);
  Acc<GT> st;
  st.init();
  const KV *kb = (const KV *)a.k + (int64_t)w.kvh * w.hd + w.d0;
  const KV *vb = (const KV *)a.v + (int64_t)w.kvh * w.hd + w.d0;
  /* the loop bound depends on the warp only, so every lane reaches the shuffles */
  for (int64_t base = w.k_begin + w.warp * C::KPW; base < w.k_end; base += C::NG * U) {
    float kf[U][8], vf[U][8];
    bool valid[U];
#pragma unroll
    for (int u = 0; u < U; u++) {
      int64_t s = base + w.gw + u * C::NG;
      valid[u] = s < w.k_end;
      int nv = valid[u] ? w.dvalid : 0;
      load8_scalar(kb + (valid[u] ? s : w.k_begin) * a.ks0, nv, kf[u]);
      load8_scalar(vb + (valid[u] ? s : w.k_begin) * a.vs0, nv, vf[u]);
    }
    consume<GT, U, C::LPK>(qr, kf, vf, valid, st);
  }
  finish<HDP, GT, C::LPK>(a, w, st, ep, splits, part_ml, part_acc);
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

/* ------------------------------------------------------------------------------- host */

struct Plan {
  int HDP, GT, ntiles, splits, chunk, vec, smem, occ;
};

template <typename KV, int HDP, int GT, typename Op> cudaError_t with_pipe(const Plan &p, Op &op) {
  return p.vec ? op.template run<KV, HDP, GT, true>() : op.template run<KV, HDP, GT, false>();
}
template <typename KV, int HDP, typename Op> cudaError_t with_gt(const Plan &p, Op &op) {
  switch (p.GT) {
  case 1: return with_pipe<KV, HDP, 1>(p, op);
  case 2: return with_pipe<KV, HDP, 2>(p, op);
  case 4: return with_pipe<KV, HDP, 4>(p, op);
  default: return with_pipe<KV, HDP, 8>(p, op);
  }
}
template <typename KV, typename Op> cudaError_t with_hdp(const Plan &p, Op &op) {
  switch (p.HDP) {
  case 64: return with_gt<KV, 64>(p, op);
  case 128: return with_gt<KV, 128>(p, op);
  default: return with_gt<KV, 256>(p, op);
  }
}
/* Calls op.run<KV, HDP, GT, PIPE>() for the plan's kernel instance. */
template <typename Op> cudaError_t with_instance(int kv_dt, const Plan &p, Op &op) {
  switch (kv_dt) {
  case MSH_F32: return with_hdp<float>(p, op);
  case MSH_F16: return with_hdp<f16>(p, op);
  case MSH_BF16: return with_hdp<bf16>(p, op);
  default: return cudaErrorInvalidValue;
  }
}

/* Resident blocks per SM of the instance (dynamic shared memory limit raised as needed). */
struct OccupancyOp {
  int blocks, smem;
  template <typename KV, int HDP, int GT, bool PIPE> cudaError_t run() {
    typedef Cfg<KV, HDP, GT> C;
    if (PIPE) {
      smem = C::SMEM;
      cudaError_t e = cudaFuncSetAttribute(decode_pipe_kernel<KV, HDP, GT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           C::SMEM);
      if (e != cudaSuccess) return e;
      return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, decode_pipe_kernel<KV, HDP, GT>, NW * 32, C::SMEM);
    }
    smem = 0;
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, decode_direct_kernel<KV, HDP, GT>, NW * 32, 0);
  }
};

struct LaunchOp {
  cudaStream_t s;
  const msh_k_attn *a;
  const Plan *p;
  float2 *ml;
  float *acc;
  template <typename KV, int HDP, int GT, bool PIPE> cudaError_t run() {
    dim3 grid((unsigned)p->splits, (unsigned)(a->KVH * p->ntiles), (unsigned)a->T);
    if (PIPE) {
      /* per device: the occupancy query may have run on another one */
      cudaError_t e = cudaFuncSetAttribute(decode_pipe_kernel<KV, HDP, GT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           p->smem);
      if (e != cudaSuccess) return e;
      decode_pipe_kernel<KV, HDP, GT><<<grid, NW * 32, p->smem, s>>>(*a, p->splits, p->chunk, p->ntiles, ml, acc);
    } else {
      decode_direct_kernel<KV, HDP, GT><<<grid, NW * 32, 0, s>>>(*a, p->splits, p->chunk, p->ntiles, ml, acc);
    }
    return cudaGetLastError();
  }
};

/* occupancy per (dtype, HDP, GT, pipe), asked once per process (devices assumed alike) */
int occ_cache[3][3][4][2];
int smem_cache[3][3][4][2];

cudaError_t plan_for(const msh_k_attn *a, int sm_count, Plan &p) {
  p.HDP = a->hd <= 64 ? 64 : a->hd <= 128 ? 128 : 256;
  int G = a->H / a->KVH;
  p.GT = G <= 1 ? 1 : G <= 2 ? 2 : G <= 4 ? 4 : 8;
  p.ntiles = (G + p.GT - 1) / p.GT;
  size_t es = msh_dtype_size(a->kv_dt);
  p.vec = a->hd % 8 == 0 && aligned16(a->k) && aligned16(a->v) && (a->ks0 * es) % 16 == 0 && (a->vs0 * es) % 16 == 0;
  int di = a->kv_dt == MSH_F32 ? 0 : a->kv_dt == MSH_F16 ? 1 : 2;
  int hi = p.HDP == 64 ? 0 : p.HDP == 128 ? 1 : 2;
  int gi = p.GT == 1 ? 0 : p.GT == 2 ? 1 : p.GT == 4 ? 2 : 3;
  int *occ = &occ_cache[di][hi][gi][p.vec], *smem = &smem_cache[di][hi][gi][p.vec];
  if (*occ == 0) {
    OccupancyOp op = {0, 0};
    cudaError_t e = with_instance(a->kv_dt, p, op);
    if (e != cudaSuccess) return e;
    *smem = op.smem;
    *occ = op.blocks > 0 ? op.blocks : 1;
  }
  p.occ = *occ;
  p.smem = *smem;
  int64_t maxn = a->pos0 + a->T;
  int64_t base = (int64_t)a->T * a->KVH * p.ntiles;
  int64_t target = (int64_t)p.occ * (sm_count > 0 ? sm_count : 132); /* one full wave */
  int64_t splits = (target + base - 1) / base;
  int64_t max_splits = (maxn + 63) / 64;
  if (splits > max_splits) splits = max_splits;
  if (splits < 1) splits = 1;
  int64_t chunk = (maxn + splits - 1) / splits;
  chunk = (chunk + 63) / 64 * 64; /* whole tiles */
  p.chunk = (int)chunk;
  p.splits = (int)((maxn + chunk - 1) / chunk);
  return cudaSuccess;
}

} // namespace

extern "C" size_t msh_k_attn_decode_workspace(const msh_k_attn *a, int sm_count) {
  Plan p;
  if (a->T <= 0 || a->H <= 0 || a->KVH <= 0 || plan_for(a, sm_count, p) != cudaSuccess || p.splits <= 1) return 0;
  size_t slots = (size_t)a->T * a->H * p.splits;
  return slots * sizeof(float2) + slots * a->hd * sizeof(float);
}

extern "C" cudaError_t msh_k_attn_decode(cudaStream_t s, const msh_k_attn *a, void *work, int sm_count) {
  if (a->T <= 0 || a->H <= 0) return cudaGetLastError();
  if (a->hd > 256 || a->hd < 1 || a->KVH < 1 || a->H % a->KVH) return cudaErrorInvalidValue;
  Plan p;
  cudaError_t e = plan_for(a, sm_count, p);
  if (e != cudaSuccess) return e;
  float2 *ml = NULL;
  float *acc = NULL;
  if (p.splits > 1) {
    if (!work) return cudaErrorInvalidValue;
    ml = (float2 *)work;
    acc = (float *)(ml + (size_t)a->T * a->H * p.splits);
  }
  LaunchOp op = {s, a, &p, ml, acc};
  e = with_instance(a->kv_dt, p, op);
  if (e != cudaSuccess || p.splits <= 1) return e;
  int threads = a->hd >= 128 ? 128 : (a->hd + 31) / 32 * 32;
  merge_kernel<<<(unsigned)((int64_t)a->T * a->H), threads, 0, s>>>(*a, p.splits, p.chunk, ml, acc);
  return cudaGetLastError();
}
