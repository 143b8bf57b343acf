/* attn_decode.cu: causal GQA attention of a few queries over a long cache, split-KV
 * (flash-decoding): the keys of each query are cut into `splits` chunks, one block per
 * (chunk, sequence, kv head, head tile, query), each keeping an online softmax; a second kernel
 * merges the chunks' partial results. The split count fills the GPU once (blocks per SM x SMs):
 * a large batch fills it alone and takes one chunk (no merge).
 *
 * Inside a block (4 warps) a key is read by LPK = HDP/8 lanes, 8 dims each, so a warp takes
 * 32/LPK keys per step; the score of each of the GT query heads that share the kv head is summed
 * over those lanes with shuffles, and the same lanes accumulate p * v for their 8 dims. K and V
 * are read once per head tile, not once per query head. Scores are in log2 units (q is
 * pre-multiplied by scale * log2(e)).
 *
 * Three kernels, one plan. f16/bf16 caches with head dim 64 or 128 and 16-byte aligned rows take
 * decode_tc_kernel (tensor cores; q and p rounded to the cache's type, fp32 accumulation). Other
 * caches with 16-byte aligned rows (hd % 8 == 0) take decode_pipe_kernel: fp32 math, tiles of TK
 * keys streamed into shared memory through a STAGES-deep cp.async pipeline, so loads stay in
 * flight while the warps compute. The rest read global memory directly (decode_direct_kernel).
 *
 * The plan (splits, chunk) depends on the shapes and pos0 + T only. With a.pos0_dev every kernel reads the
 * position on the device when it runs (clamped into [0, a.pos0]), so one captured launch serves
 * every position up to the planned one: blocks whose chunk starts past a query's last key exit at
 * once, and the merge reads only the chunks that hold keys. */
#include "msh_mma.cuh"
#include "msh_paged.cuh"

#include <cooperative_groups.h>

using namespace msh;

namespace {

constexpr int NW = 4;
constexpr float LOG2E = 1.4426950408889634f;

/* exp2(x - M) for a score or a partial's max x in log2 units against the running max M: 0 for a
 * masked score or an empty partial (x = -inf, where M may be -inf too). */
__device__ __forceinline__ float weight(float x, float M) { return x == -INFINITY ? 0.0f : exp2f(x - M); }

__device__ __forceinline__ void add_scaled(float &A, float a, float f) { A += a * f; }
__device__ __forceinline__ void add_scaled(float4 &A, const float4 &a, float f) {
  A.x += a.x * f;
  A.y += a.y * f;
  A.z += a.z * f;
  A.w += a.w * f;
}

/* N partial softmax results (max m in log2 units, sum of weights l, unnormalized accumulator a of
 * one dim, or four as a float4; empty ones have m = -inf) merged into one: M, L, A. */
template <int N, typename V>
__device__ __forceinline__ void merge_n(const float (&m)[N], const float (&l)[N], const V (&a)[N], float &M, float &L,
                                        V &A) {
  M = -INFINITY;
#pragma unroll
  for (int v = 0; v < N; v++) M = fmaxf(M, m[v]);
  L = 0.0f;
  A = V();
#pragma unroll
  for (int v = 0; v < N; v++) {
    const float f = weight(m[v], M);
    L += l[v] * f;
    add_scaled(A, a[v], f);
  }
}

/* p[0..3] = v (p need only be 4-byte aligned: the partials follow an odd count of float2 pairs) */
__device__ __forceinline__ void store4(float *p, float4 v) {
  p[0] = v.x;
  p[1] = v.y;
  p[2] = v.z;
  p[3] = v.w;
}

__device__ __forceinline__ float4 div4(float4 v, float L) { return make_float4(v.x / L, v.y / L, v.z / L, v.w / L); }

/* Position of sequence b's query 0 for this launch: the host's, or the device word clamped into
 * the planned range [0, a.pos0] (so a bad value reads no key outside the cache). */
__device__ __forceinline__ int64_t pos0_of(const msh_k_attn &a, int64_t b) {
  if (a.block_table) { /* the paged row form: "sequence" b is query row b */
    int64_t seq;
    return paged_row(a.q_start, a.ctx_len, a.seqs, a.max_ctx, b, seq);
  }
  if (!a.pos0_dev) return a.pos0;
  int64_t p = a.pos0_dev[a.pos0_n == 1 ? 0 : b];
  return p < 0 ? 0 : p > a.pos0 ? a.pos0 : p;
}

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
    float corr = weight(st.m[i], mnew);
    st.l[i] *= corr;
#pragma unroll
    for (int j = 0; j < 8; j++) st.o[i][j] *= corr;
#pragma unroll
    for (int u = 0; u < U; u++) {
      float p = weight(sc[u][i], mnew);
      st.l[i] += p;
#pragma unroll
      for (int j = 0; j < 8; j++) st.o[i][j] = fmaf(p, vf[u][j], st.o[i][j]);
    }
    st.m[i] = mnew;
  }
}

struct Where {
  int split, kvh, tile, t, b, G, hd, d0, dvalid, lane, warp, gw;
  int64_t bt; /* b * T + t: the query's row in q and out */
  int64_t k_begin, k_end;
};

/* Block (split, (b * KVH + kvh) * ntiles + tile, t). */
__device__ __forceinline__ bool where_am_i(const msh_k_attn &a, int chunk, int ntiles, int LPK, Where &w) {
  w.lane = threadIdx.x & 31;
  w.warp = threadIdx.x >> 5;
  w.gw = w.lane / LPK;
  w.split = blockIdx.x;
  w.tile = blockIdx.y % ntiles;
  w.kvh = blockIdx.y / ntiles % a.KVH;
  w.b = blockIdx.y / ntiles / a.KVH;
  w.t = blockIdx.z;
  w.bt = (int64_t)w.b * a.T + w.t;
  const int64_t pos0 = pos0_of(a, w.b);
  w.G = a.H / a.KVH;
  w.hd = a.hd;
  w.d0 = (w.lane % LPK) * 8;
  w.dvalid = w.hd - w.d0 < 0 ? 0 : w.hd - w.d0 > 8 ? 8 : w.hd - w.d0;
  int64_t n = pos0 + w.t + 1;
  w.k_begin = (int64_t)w.split * chunk;
  w.k_end = n < w.k_begin + chunk ? n : w.k_begin + chunk;
  return w.k_begin < n; /* false: this query has fewer keys, the merge skips this chunk */
}

template <int GT> __device__ __forceinline__ void load_q(const msh_k_attn &a, const Where &w, float (&qr)[GT][8]) {
  const float qs = a.scale * LOG2E;
#pragma unroll
  for (int i = 0; i < GT; i++) {
    int hg = w.tile * GT + i;
    const float *qp = a.q + (w.bt * a.H + w.kvh * w.G + (hg < w.G ? hg : 0)) * w.hd + w.d0;
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
      float ca = weight(st.m[i], mm), cb = weight(mo, mm);
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
    float mv[NW], lv[NW], av[NW], M, L, A;
#pragma unroll
    for (int v = 0; v < NW; v++) {
      mv[v] = sm_m[v * GT + i];
      lv[v] = sm_l[v * GT + i];
      av[v] = sm_acc[(v * GT + i) * HDP + d];
    }
    merge_n(mv, lv, av, M, L, A);
    int64_t row = w.bt * a.H + w.kvh * w.G + hg;
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

  const KV *kg = (const KV *)a.k + w.b * a.ksb + (int64_t)w.kvh * w.hd;
  const KV *vg = (const KV *)a.v + w.b * a.vsb + (int64_t)w.kvh * w.hd;
  constexpr int EPC = 16 / (int)sizeof(KV); /* elements per 16-byte chunk */
  const int cpr = w.hd / EPC;               /* chunks per row */
  const int ntile = (int)((w.k_end - w.k_begin + TK - 1) / TK);
  auto load = [&](int j) {
    KV *kt = tiles + (size_t)(j % STAGES) * 2 * TK * HDP, *vt = kt + TK * HDP;
    for (int e = threadIdx.x; e < TK * cpr; e += NW * 32) {
      int r = e / cpr, cc = e % cpr;
      int64_t key = w.k_begin + (int64_t)j * TK + r;
      bool ok = key < w.k_end; /* rows past the chunk become zeros */
      int64_t kr = ok ? key : w.k_begin;
      cp_async16(kt + r * HDP + cc * EPC, kg + kr * a.ks0 + cc * EPC, ok);
      cp_async16(vt + r * HDP + cc * EPC, vg + kr * a.vs0 + cc * EPC, ok);
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
  const KV *kb = (const KV *)a.k + w.b * a.ksb + (int64_t)w.kvh * w.hd + w.d0;
  const KV *vb = (const KV *)a.v + w.b * a.vsb + (int64_t)w.kvh * w.hd + w.d0;
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

/* f16/bf16 caches, head dim 64 or 128, 16-byte aligned rows: tensor cores. The block's 16 query
 * rows of one sequence (r = t * G + g, as in the prefill kernel; the sequence is blockIdx.z) form
 * one m16 tile; tiles of 64 keys stream
 * through a cp.async pipeline and each warp takes 16 keys of every tile: S = Q K^T (16 x 16) and
 * P V with mma.sync, an online softmax per warp, the 4 warps merged at the end. */
/* Where a tensor-core block's keys are: the slot cache (PG_NONE), or a paged pool with a block
 * per query row (PG_ROWS) or per tile of the device-built list (PG_TILES). */
enum { PG_NONE, PG_ROWS, PG_TILES };

template <typename KV, int HD> struct TcCfg {
  static constexpr int TK = 64, STAGES = 3, LD = HD + 8;
  static constexpr int PIPE_BYTES = STAGES * 2 * TK * LD * 2;
  static constexpr int EPI_BYTES = (NW * 16 * HD + 2 * NW * 16) * 4;
  static constexpr int RES_BYTES = (16 * HD + 2 * 16) * 4; /* a block's merged result (clusters) */
  static constexpr int SMEM = PIPE_BYTES > EPI_BYTES + RES_BYTES ? PIPE_BYTES : EPI_BYTES + RES_BYTES;
};

/* CL: the splits of a (kv head, row tile, sequence) form one thread block cluster (sm_90, at most
 * 8 blocks, plans of up to cluster_keys() keys): each block merges its warps into shared memory
 * and the blocks then merge each other's results through distributed shared memory, with no
 * partials in global memory and no merge kernel. Blocks whose chunk holds no key take part with
 * an empty result. */
template <typename KV, int HD, bool CL, int PG>
__global__ void __launch_bounds__(NW * 32) decode_tc_kernel(msh_k_attn a, int splits, int chunk, int rtiles,
                                                            float2 *part_ml, float *part_acc) {
  typedef TcCfg<KV, HD> C;
  constexpr int TK = C::TK, STAGES = C::STAGES, LD = C::LD, KT = HD / 16, DT = HD / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  KV *tiles = reinterpret_cast<KV *>(smem); /* [STAGES][2][TK][LD] */
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
  const int G = a.H / a.KVH;
  /* the block's kv head, 16-row tile, key split; its sequence (seq: the cache's or the paged
   * arrays'), first query row bT, rows R (t * G + g) and position of query 0 (PG_TILES: here,
   * else after q is asked for) */
  int kvh, rt, split;
  int64_t b, seq, bT, R, pos0 = 0;
  if (PG == PG_TILES) {
    const int4 tl = reinterpret_cast<const int4 *>(a.tiles)[blockIdx.x];
    if (tl.x < 0) return; /* past the step's tiles */
    kvh = blockIdx.y;
    rt = tl.y;
    split = 0;
    b = seq = tl.x;
    bT = tl.z;
    R = (int64_t)tl.w * G;
    int64_t cl = a.ctx_len[seq];
    cl = cl < tl.w ? tl.w : cl > a.max_ctx ? a.max_ctx : cl;
    pos0 = cl - tl.w;
  } else {
    kvh = blockIdx.y / rtiles;
    rt = blockIdx.y % rtiles;
    split = blockIdx.x;
    b = blockIdx.z; /* PG_ROWS: the query row, whose sequence seq is found below */
    seq = b;
    bT = b * a.T;
    R = (int64_t)a.T * G;
  }
  const int64_t r0 = (int64_t)rt * 16;
  const int64_t rA = r0 + g, rB = r0 + g + 8;
  const int64_t cA = rA < R ? rA : R - 1, cB = rB < R ? rB : R - 1;
  const int64_t tA = cA / G, tB = cB / G;
  const int64_t t_last = ((r0 + 16 < R ? r0 + 16 : R) - 1) / G;
  const int64_t k_begin = (int64_t)split * chunk;
  /* the block's rows of q (f32 pairs; rows past R are zeros) are in flight while the position is
   * read and the first keys are asked for, and become fragments after */
  float2 qv[KT][4];
  {
    const bool inA = rA < R, inB = rB < R;
    const float *qA = a.q + ((bT + tA) * a.H + kvh * G + cA % G) * a.hd + 2 * tq;
    const float *qB = a.q + ((bT + tB) * a.H + kvh * G + cB % G) * a.hd + 2 * tq;
    const float2 zero = make_float2(0.0f, 0.0f);
#pragma unroll
    for (int kk = 0; kk < KT; kk++) {
      qv[kk][0] = inA ? *reinterpret_cast<const float2 *>(qA + kk * 16) : zero;
      qv[kk][1] = inB ? *reinterpret_cast<const float2 *>(qB + kk * 16) : zero;
      qv[kk][2] = inA ? *reinterpret_cast<const float2 *>(qA + kk * 16 + 8) : zero;
      qv[kk][3] = inB ? *reinterpret_cast<const float2 *>(qB + kk * 16 + 8) : zero;
    }
  }
  if (PG == PG_ROWS) pos0 = paged_row(a.q_start, a.ctx_len, a.seqs, a.max_ctx, b, seq);
  else if (PG == PG_NONE) pos0 = pos0_of(a, b);
  const int64_t kmax = pos0 + t_last + 1;
  /* no row of this tile sees this chunk: the merge skips it (in a cluster it merges nothing) */
  if (!CL && k_begin >= kmax) return;
  const int64_t k_end = kmax < k_begin + chunk ? kmax : k_begin + chunk;
  const float qs = a.scale * LOG2E;

  /* a paged cache: the pools, keys found through the sequence's table */
  const int64_t cb = PG != PG_NONE ? 0 : b;
  const KV *kg = (const KV *)a.k + cb * a.ksb + (int64_t)kvh * a.hd;
  const KV *vg = (const KV *)a.v + cb * a.vsb + (int64_t)kvh * a.hd;
  const int32_t *btab = PG != PG_NONE ? a.block_table + seq * a.MB : nullptr;
  const int ntile = k_end > k_begin ? (int)((k_end - k_begin + TK - 1) / TK) : 0;
  /* tile j: a thread copies the same 16-byte column of every RPI-th key row */
  auto load = [&](int j) {
    constexpr int CPR = HD / 8, RPI = NW * 32 / CPR;
    KV *kt = tiles + (size_t)(j % STAGES) * 2 * TK * LD, *vt = kt + TK * LD;
    const int cc = threadIdx.x % CPR;
    const int64_t key0 = k_begin + (int64_t)j * TK;
#pragma unroll
    for (int r = threadIdx.x / CPR; r < TK; r += RPI) {
      const int64_t key = key0 + r;
      const bool ok = key < k_end;
      int64_t kr = ok ? key : k_begin;
      if (PG != PG_NONE) kr = paged_key(btab, a.MB, a.NB, a.BS, kr);
      cp_async16(kt + r * LD + cc * 8, kg + kr * a.ks0 + cc * 8, ok);
      cp_async16(vt + r * LD + cc * 8, vg + kr * a.vs0 + cc * 8, ok);
    }
  };

  float o[DT][4];
#pragma unroll
  for (int dn = 0; dn < DT; dn++) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.0f;
  float mA = -INFINITY, mB = -INFINITY, lA = 0.0f, lB = 0.0f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; s++) {
    if (s < ntile) load(s);
    cp_async_commit();
  }
  uint32_t qf[KT][4];
#pragma unroll
  for (int kk = 0; kk < KT; kk++)
#pragma unroll
    for (int h = 0; h < 4; h++) qf[kk][h] = Mma<KV>::pack(qv[kk][h].x, qv[kk][h].y);
  for (int j = 0; j < ntile; j++) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    if (j + STAGES - 1 < ntile) load(j + STAGES - 1);
    cp_async_commit();
    const KV *Kt = tiles + (size_t)(j % STAGES) * 2 * TK * LD + warp * 16 * LD;
    const KV *Vt = Kt + TK * LD;
    float sc[2][4];
#pragma unroll
    for (int nn = 0; nn < 2; nn++) {
      sc[nn][0] = sc[nn][1] = sc[nn][2] = sc[nn][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < KT; kk += 2) {
        uint32_t kb[4];
        ldmatrix_x4(kb, Kt + (nn * 8 + (lane & 7)) * LD + kk * 16 + (lane >> 3) * 8);
        Mma<KV>::run(sc[nn], qf[kk], kb[0], kb[1]);
        Mma<KV>::run(sc[nn], qf[kk + 1], kb[2], kb[3]);
      }
    }
    const int64_t kbase = k_begin + (int64_t)j * TK + warp * 16;
    float mxA = -INFINITY, mxB = -INFINITY;
#pragma unroll
    for (int nn = 0; nn < 2; nn++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        int64_t key = kbase + nn * 8 + 2 * tq + (e & 1);
        bool ok = key < k_end && key <= pos0 + (e < 2 ? tA : tB);
        float v = ok ? sc[nn][e] * qs : -INFINITY;
        sc[nn][e] = v;
        if (e < 2) mxA = fmaxf(mxA, v);
        else mxB = fmaxf(mxB, v);
      }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      mxA = fmaxf(mxA, __shfl_xor_sync(0xffffffffu, mxA, off));
      mxB = fmaxf(mxB, __shfl_xor_sync(0xffffffffu, mxB, off));
    }
    /* a warp's 16 keys may all be masked for a row: keep every step finite */
    const float nA = fmaxf(mA, mxA), nB = fmaxf(mB, mxB);
    const float corrA = weight(mA, nA), corrB = weight(mB, nB);
    mA = nA;
    mB = nB;
    lA *= corrA;
    lB *= corrB;
#pragma unroll
    for (int dn = 0; dn < DT; dn++) {
      o[dn][0] *= corrA;
      o[dn][1] *= corrA;
      o[dn][2] *= corrB;
      o[dn][3] *= corrB;
    }
#pragma unroll
    for (int nn = 0; nn < 2; nn++) {
      sc[nn][0] = weight(sc[nn][0], nA);
      sc[nn][1] = weight(sc[nn][1], nA);
      sc[nn][2] = weight(sc[nn][2], nB);
      sc[nn][3] = weight(sc[nn][3], nB);
      lA += sc[nn][0] + sc[nn][1];
      lB += sc[nn][2] + sc[nn][3];
    }
    uint32_t pa[4];
    pa[0] = Mma<KV>::pack(sc[0][0], sc[0][1]);
    pa[1] = Mma<KV>::pack(sc[0][2], sc[0][3]);
    pa[2] = Mma<KV>::pack(sc[1][0], sc[1][1]);
    pa[3] = Mma<KV>::pack(sc[1][2], sc[1][3]);
#pragma unroll
    for (int dn = 0; dn < DT; dn += 2) {
      uint32_t vb[4];
      ldmatrix_x4_trans(vb, Vt + (lane & 15) * LD + (dn + (lane >> 4)) * 8);
      Mma<KV>::run(o[dn], pa, vb[0], vb[1]);
      Mma<KV>::run(o[dn + 1], pa, vb[2], vb[3]);
    }
  }
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    lA += __shfl_xor_sync(0xffffffffu, lA, off);
    lB += __shfl_xor_sync(0xffffffffu, lB, off);
  }
  cp_async_wait<0>();
  __syncthreads(); /* the tiles' memory now holds the merge of the warps */
  float *sm_o = reinterpret_cast<float *>(smem); /* [NW][16][HD] */
  float *sm_m = sm_o + NW * 16 * HD;             /* [NW][16] */
  float *sm_l = sm_m + NW * 16;                  /* [NW][16] */
  float *res_o = sm_l + NW * 16;                 /* [16][HD]: the block's result (CL) */
  float *res_m = res_o + 16 * HD, *res_l = res_m + 16;
  const int rows = (int)(R - r0 < 16 ? R - r0 : 16); /* the tile's rows that exist */
#pragma unroll
  for (int dn = 0; dn < DT; dn++) {
    int col = dn * 8 + 2 * tq;
    if (g < rows) *reinterpret_cast<float2 *>(sm_o + (warp * 16 + g) * HD + col) = make_float2(o[dn][0], o[dn][1]);
    if (g + 8 < rows)
      *reinterpret_cast<float2 *>(sm_o + (warp * 16 + g + 8) * HD + col) = make_float2(o[dn][2], o[dn][3]);
  }
  if (tq == 0) {
    sm_m[warp * 16 + g] = mA;
    sm_m[warp * 16 + g + 8] = mB;
    sm_l[warp * 16 + g] = lA;
    sm_l[warp * 16 + g + 8] = lB;
  }
  __syncthreads();
  /* four dims a thread (hd is HD here) */
  const int nvec = rows * (HD / 4);
  for (int e = threadIdx.x; e < nvec; e += NW * 32) {
    int i = e / (HD / 4), d = e % (HD / 4) * 4;
    int64_t r = r0 + i;
    float mv[NW], lv[NW], M, L;
    float4 av[NW], A;
#pragma unroll
    for (int v = 0; v < NW; v++) {
      mv[v] = sm_m[v * 16 + i];
      lv[v] = sm_l[v * 16 + i];
      av[v] = *reinterpret_cast<const float4 *>(sm_o + (v * 16 + i) * HD + d);
    }
    merge_n(mv, lv, av, M, L, A);
    int64_t row = (bT + r / G) * a.H + kvh * G + r % G;
    if (CL) {
      *reinterpret_cast<float4 *>(res_o + i * HD + d) = A;
      if (d == 0) {
        res_m[i] = M;
        res_l[i] = L;
      }
    } else if (splits == 1) {
      store4(a.out + row * a.hd + d, div4(A, L));
    } else {
      int64_t slot = row * splits + split;
      store4(part_acc + slot * a.hd + d, A);
      if (d == 0) part_ml[slot] = make_float2(M, L);
    }
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (CL) {
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync(); /* every block's result is in its shared memory */
    /* the cluster's blocks share out the (row, four dims) pieces; rank = split (grid x = cluster x) */
    for (int e = split * NW * 32 + threadIdx.x; e < nvec; e += splits * NW * 32) {
      int i = e / (HD / 4), d = e % (HD / 4) * 4;
      int64_t r = r0 + i;
      /* every block's values first (the remote loads in flight together), then the merge */
      float mv[8], lv[8], M, L;
      float4 av[8], A;
#pragma unroll
      for (int v = 0; v < 8; v++) {
        bool in = v < splits;
        mv[v] = in ? *cluster.map_shared_rank(res_m + i, v) : -INFINITY;
        lv[v] = in ? *cluster.map_shared_rank(res_l + i, v) : 0.0f;
        av[v] = in ? *reinterpret_cast<const float4 *>(cluster.map_shared_rank(res_o + i * HD + d, v))
                   : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      }
      merge_n(mv, lv, av, M, L, A);
      int64_t row = (bT + r / G) * a.H + kvh * G + r % G;
      store4(a.out + row * a.hd + d, div4(A, L));
    }
    /* no block leaves while the others read its shared memory: an arrival that orders nothing
     * (the reads above are complete, in registers; a release would wait for the stores too) */
    asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
    asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");
  }
#endif
}

__global__ void merge_kernel(msh_k_attn a, int splits, int chunk, const float2 *part_ml, const float *part_acc) {
  int64_t row = blockIdx.x; /* (b * T + t) * H + h */
  int64_t bt = row / a.H, b = bt / a.T, t = bt % a.T;
  int64_t n = pos0_of(a, b) + t + 1;
  int ns = (int)((n + chunk - 1) / chunk);
  const float2 *ml = part_ml + row * splits;
  float M = -INFINITY;
  for (int sp = 0; sp < ns; sp++) M = fmaxf(M, ml[sp].x);
  float L = 0.0f;
  for (int sp = 0; sp < ns; sp++) L += ml[sp].y * weight(ml[sp].x, M);
  float inv = 1.0f / L;
  for (int d = threadIdx.x; d < a.hd; d += blockDim.x) {
    float A = 0.0f;
    for (int sp = 0; sp < ns; sp++)
      A += part_acc[(row * splits + sp) * a.hd + d] * weight(ml[sp].x, M);
    a.out[row * a.hd + d] = A * inv;
  }
}

/* ------------------------------------------------------------------------------- host */

struct Plan {
  int tc;                             /* tensor-core kernel (else the fp32 one) */
  int cl;                             /* tc: the splits form one cluster (merged in the kernel) */
  int HDP, GT, ntiles, rtiles, vec;   /* instance and grid shape */
  int splits, chunk, smem, occ;
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
    dim3 grid((unsigned)p->splits, (unsigned)((int64_t)a->B * a->KVH * p->ntiles), (unsigned)a->T);
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

template <typename KV, int HD> cudaError_t tc_occupancy(int *blocks) {
  typedef TcCfg<KV, HD> C;
  cudaError_t e = cudaFuncSetAttribute(decode_tc_kernel<KV, HD, false, PG_NONE>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM);
  if (e != cudaSuccess) return e;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, decode_tc_kernel<KV, HD, false, PG_NONE>, NW * 32,
                                                       C::SMEM);
}

/* The plan's tensor-core launch over the slot cache or (PG_ROWS) a paged pool's rows. */
template <typename KV, int HD, int PG>
cudaError_t tc_launch(cudaStream_t s, const msh_k_attn *a, const Plan &p, float2 *ml, float *acc) {
  typedef TcCfg<KV, HD> C;
  dim3 grid((unsigned)p.splits, (unsigned)((int64_t)a->KVH * p.rtiles), (unsigned)a->B);
  if (!p.cl) {
    cudaError_t e = cudaFuncSetAttribute(decode_tc_kernel<KV, HD, false, PG>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM);
    if (e != cudaSuccess) return e;
    decode_tc_kernel<KV, HD, false, PG><<<grid, NW * 32, C::SMEM, s>>>(*a, p.splits, p.chunk, p.rtiles, ml, acc);
    return cudaGetLastError();
  }
  cudaError_t e =
      cudaFuncSetAttribute(decode_tc_kernel<KV, HD, true, PG>, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM);
  if (e != cudaSuccess) return e;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(NW * 32);
  cfg.dynamicSmemBytes = C::SMEM;
  cfg.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = (unsigned)p.splits;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, decode_tc_kernel<KV, HD, true, PG>, *a, p.splits, p.chunk, p.rtiles, ml, acc);
}

/* Thread block clusters on this device (sm_90 and later), asked once per process. */
bool clusters_ok() {
  static int ok = -1;
  if (ok < 0) {
    int dev = 0, v = 0;
    ok = cudaGetDevice(&dev) == cudaSuccess && cudaDeviceGetAttribute(&v, cudaDevAttrClusterLaunch, dev) == cudaSuccess &&
         v != 0;
    (void)cudaGetLastError();
  }
  return ok != 0;
}

/* The longest plan whose chunks form a cluster (MSH_ATTN_CLUSTER_KEYS in the environment
 * overrides it; 512 keeps clusters to one tile a block). */
int64_t cluster_keys() {
  static int64_t keys = -1;
  if (keys < 0) {
    const char *e = getenv("MSH_ATTN_CLUSTER_KEYS");
    keys = e ? atoll(e) : 4096;
    if (keys < 0) keys = 0;
  }
  return keys;
}

/* occupancy per instance, asked once per process (devices assumed alike) */
int occ_cache[3][3][4][2];
int smem_cache[3][3][4][2];
int tc_occ_cache[2][2];

cudaError_t plan_for(const msh_k_attn *a, int sm_count, Plan &p) {
  p.HDP = a->hd <= 64 ? 64 : a->hd <= 128 ? 128 : 256;
  int G = a->H / a->KVH;
  p.GT = G <= 1 ? 1 : G <= 2 ? 2 : G <= 4 ? 4 : 8;
  p.ntiles = (G + p.GT - 1) / p.GT;
  p.rtiles = (int)(((int64_t)a->T * G + 15) / 16);
  size_t es = msh_dtype_size(a->kv_dt);
  p.vec = a->hd % 8 == 0 && aligned16(a->k) && aligned16(a->v) && (a->ks0 * es) % 16 == 0 && (a->vs0 * es) % 16 == 0 &&
          (a->B <= 1 || ((a->ksb * es) % 16 == 0 && (a->vsb * es) % 16 == 0));
  p.tc = (a->kv_dt == MSH_F16 || a->kv_dt == MSH_BF16) && (a->hd == 64 || a->hd == 128) && p.vec &&
         ((uintptr_t)a->q & 7u) == 0; /* q read in pairs */
  int64_t base;
  if (p.tc) {
    int di = a->kv_dt == MSH_F16 ? 0 : 1, hi = a->hd == 64 ? 0 : 1;
    int *occ = &tc_occ_cache[di][hi];
    if (*occ == 0) {
      cudaError_t e = a->kv_dt == MSH_F16 ? (a->hd == 64 ? tc_occupancy<f16, 64>(occ) : tc_occupancy<f16, 128>(occ))
                                          : (a->hd == 64 ? tc_occupancy<bf16, 64>(occ) : tc_occupancy<bf16, 128>(occ));
      if (e != cudaSuccess) return e;
      if (*occ < 1) *occ = 1;
    }
    p.occ = *occ;
    p.smem = 0;
    base = (int64_t)a->B * a->KVH * p.rtiles;
  } else {
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
    base = (int64_t)a->B * a->T * a->KVH * p.ntiles;
  }
  int64_t maxn = a->pos0 + a->T;
  int64_t target = (int64_t)p.occ * (sm_count > 0 ? sm_count : 132); /* one full wave */
  int64_t splits = (target + base - 1) / base;
  /* short contexts take one chunk: a block reads at most 512 keys (about a microsecond), less than
   * the merge kernel that splitting would add */
  int64_t max_splits = maxn <= 512 ? 1 : (maxn + 63) / 64;
  if (splits > max_splits) splits = max_splits;
  if (splits < 1) splits = 1;
  /* ... unless the tensor-core blocks are few: then up to 8 chunks of whole 64-key tiles form a
   * cluster that merges in the kernel (no merge kernel, no partials in global memory), up to
   * cluster_keys() keys */
  p.cl = 0;
  if (p.tc && maxn > 64 && maxn <= cluster_keys() && base * 4 <= (sm_count > 0 ? sm_count : 132) && clusters_ok()) {
    p.cl = 1;
    int64_t tiles = (maxn + 63) / 64;
    splits = tiles < 8 ? tiles : 8;
  }
  int64_t chunk = (maxn + splits - 1) / splits;
  chunk = (chunk + 63) / 64 * 64; /* whole tiles */
  p.chunk = (int)chunk;
  p.splits = (int)((maxn + chunk - 1) / chunk);
  if (p.splits <= 1) p.cl = 0;
  /* grid limits: y and z hold at most 65535 blocks */
  int64_t gy = p.tc ? (int64_t)a->KVH * p.rtiles : (int64_t)a->B * a->KVH * p.ntiles;
  int64_t gz = p.tc ? a->B : a->T;
  if (gy > 65535 || gz > 65535) return cudaErrorInvalidConfiguration;
  return cudaSuccess;
}

/* ------------------------------------------------------------------------ paged forms */

/* Sums (MAX: maxima) of v over the threads before this one in the block, and over all of them. */
template <bool MAX> __device__ __forceinline__ int64_t block_scan(int64_t v, int64_t *sh, int64_t &total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  int64_t x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    int64_t y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x = MAX ? (x > y ? x : y) : x + y;
  }
  int64_t prev = __shfl_up_sync(0xffffffffu, x, 1);
  if (lane == 0) prev = 0;
  __syncthreads(); /* sh free (an earlier call's readers are done) */
  if (lane == 31) sh[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int64_t w = lane < nw ? sh[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      int64_t y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w = MAX ? (w > y ? w : y) : w + y;
    }
    sh[lane] = w;
  }
  __syncthreads();
  total = sh[nw - 1];
  const int64_t before = warp > 0 ? sh[warp - 1] : 0;
  return MAX ? (before > prev ? before : prev) : before + prev;
}

/* The tile form's work list, one block of 1024 threads: sequence b's rows are [s_b, s_b+1), s_b
 * the running maximum of q_start clamped into [0, R] (s_0 = 0, s_B = R: every row belongs to one
 * sequence whatever the array holds, and is written), cut into tiles of 16 (query, head) rows;
 * entries past the last tile get sequence -1. */
__global__ void __launch_bounds__(1024) paged_tiles_kernel(const int32_t *q_start, int B, int R, int G, int cap,
                                                           int4 *list) {
  __shared__ int64_t sh[32];
  const int per = (B + (int)blockDim.x - 1) / (int)blockDim.x;
  const int b0 = min(B, (int)threadIdx.x * per), b1 = min(B, b0 + per);
  auto qs = [&](int b) -> int64_t {
    if (b <= 0) return 0;
    if (b >= B) return R;
    int64_t v = q_start[b];
    return v < 0 ? 0 : v > R ? R : v;
  };
  int64_t m = 0, total;
  for (int b = b0; b < b1; b++) m = max(m, qs(b));
  const int64_t start = block_scan<true>(m, sh, total);
  int64_t run = start, cnt = 0;
  for (int b = b0; b < b1; b++) {
    run = max(run, qs(b));
    const int64_t n = max(run, qs(b + 1)) - run;
    cnt += (n * G + 15) / 16;
  }
  int64_t off = block_scan<false>(cnt, sh, total);
  run = start;
  for (int b = b0; b < b1; b++) {
    run = max(run, qs(b));
    const int64_t n = max(run, qs(b + 1)) - run, nt = (n * G + 15) / 16;
    for (int64_t k = 0; k < nt && off < cap; k++, off++) list[off] = make_int4(b, (int)k, (int)run, (int)n);
  }
  for (int64_t i = total + threadIdx.x; i < cap; i += blockDim.x) list[i] = make_int4(-1, 0, 0, 0);
}

/* Tiles the list may need: sum over sequences of ceil(n_b G / 16) <= R G / 16 + B. */
int64_t paged_tile_cap(const msh_k_paged *pa) {
  return ((int64_t)pa->R * (pa->H / pa->KVH) + 15) / 16 + pa->B;
}

/* The tile form's attention: a block per (listed tile, kv head), the whole context one chunk. */
template <typename KV, int HD> cudaError_t tiles_launch(cudaStream_t s, const msh_k_attn &a, int64_t cap) {
  typedef TcCfg<KV, HD> C;
  cudaError_t e = cudaFuncSetAttribute(decode_tc_kernel<KV, HD, false, PG_TILES>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM);
  if (e != cudaSuccess) return e;
  dim3 grid((unsigned)cap, (unsigned)a.KVH, 1);
  decode_tc_kernel<KV, HD, false, PG_TILES><<<grid, NW * 32, C::SMEM, s>>>(a, 1, INT32_MAX, 1, nullptr, nullptr);
  return cudaGetLastError();
}

msh_k_attn paged_attn_of(const msh_k_paged *pa) {
  msh_k_attn a;
  memset(&a, 0, sizeof a);
  a.out = pa->out;
  a.q = pa->q;
  a.k = pa->k;
  a.v = pa->v;
  a.ks0 = a.vs0 = (int64_t)pa->KVH * pa->hd;
  a.kv_dt = pa->kv_dt;
  a.B = pa->R; /* the row form: a "sequence" a row */
  a.T = 1;
  a.H = pa->H;
  a.KVH = pa->KVH;
  a.hd = pa->hd;
  a.pos0 = pa->max_ctx - 1;
  a.scale = pa->scale;
  a.block_table = pa->block_table;
  a.q_start = pa->q_start;
  a.ctx_len = pa->ctx_len;
  a.BS = pa->BS;
  a.NB = pa->NB;
  a.MB = pa->MB;
  a.seqs = pa->B;
  a.rows = pa->R;
  a.max_ctx = pa->max_ctx;
  return a;
}

} // namespace

extern "C" int msh_k_attn_paged_ok(const msh_k_paged *pa) {
  if ((pa->kv_dt != MSH_F16 && pa->kv_dt != MSH_BF16) || (pa->hd != 64 && pa->hd != 128)) return 0;
  if (!aligned16(pa->k) || !aligned16(pa->v) || ((uintptr_t)pa->q & 7u)) return 0;
  if (pa->R < 1 || pa->B < 1 || pa->KVH < 1 || pa->H % pa->KVH || pa->max_ctx < 1 || pa->MB < 1 || pa->NB < 1 ||
      pa->BS < 1 || pa->KVH > 65535)
    return 0;
  if (pa->R == pa->B) return pa->R <= 65535 && (int64_t)pa->KVH * ((pa->H / pa->KVH + 15) / 16) <= 65535;
  return paged_tile_cap(pa) <= INT32_MAX;
}

extern "C" size_t msh_k_attn_paged_workspace(const msh_k_paged *pa, int sm_count) {
  if (pa->R != pa->B) return sizeof(int4) * (size_t)paged_tile_cap(pa);
  msh_k_attn a = paged_attn_of(pa);
  return msh_k_attn_decode_workspace(&a, sm_count);
}

extern "C" cudaError_t msh_k_attn_paged(cudaStream_t s, const msh_k_paged *pa, void *work, int sm_count) {
  if (!msh_k_attn_paged_ok(pa)) return cudaErrorNotSupported;
  msh_k_attn a = paged_attn_of(pa);
  if (pa->R != pa->B) { /* the tile form: the list, then a block per (tile, kv head) */
    if (!work) return cudaErrorInvalidValue;
    const int64_t cap = paged_tile_cap(pa);
    a.tiles = static_cast<int32_t *>(work);
    paged_tiles_kernel<<<1, 1024, 0, s>>>(pa->q_start, pa->B, pa->R, pa->H / pa->KVH, (int)cap,
                                          static_cast<int4 *>(work));
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    if (a.kv_dt == MSH_F16)
      return a.hd == 64 ? tiles_launch<f16, 64>(s, a, cap) : tiles_launch<f16, 128>(s, a, cap);
    return a.hd == 64 ? tiles_launch<bf16, 64>(s, a, cap) : tiles_launch<bf16, 128>(s, a, cap);
  }
  Plan p;
  cudaError_t e = plan_for(&a, sm_count, p);
  if (e != cudaSuccess) return e;
  if (!p.tc) return cudaErrorNotSupported;
  float2 *ml = NULL;
  float *acc = NULL;
  if (p.splits > 1 && !p.cl) {
    if (!work) return cudaErrorInvalidValue;
    ml = (float2 *)work;
    acc = (float *)(ml + (size_t)a.B * a.H * p.splits);
  }
  if (a.kv_dt == MSH_F16)
    e = a.hd == 64 ? tc_launch<f16, 64, PG_ROWS>(s, &a, p, ml, acc) : tc_launch<f16, 128, PG_ROWS>(s, &a, p, ml, acc);
  else
    e = a.hd == 64 ? tc_launch<bf16, 64, PG_ROWS>(s, &a, p, ml, acc) : tc_launch<bf16, 128, PG_ROWS>(s, &a, p, ml, acc);
  if (e != cudaSuccess || p.splits <= 1 || p.cl) return e;
  return msh_k_attn_merge(s, &a, p.splits, p.chunk, ml, acc);
}

extern "C" cudaError_t msh_k_attn_merge(cudaStream_t s, const msh_k_attn *a, int splits, int chunk, const float2 *ml,
                                        const float *acc) {
  int threads = a->hd >= 128 ? 128 : (a->hd + 31) / 32 * 32;
  merge_kernel<<<(unsigned)((int64_t)a->B * a->T * a->H), threads, 0, s>>>(*a, splits, chunk, ml, acc);
  return cudaGetLastError();
}

extern "C" size_t msh_k_attn_decode_workspace(const msh_k_attn *a, int sm_count) {
  Plan p;
  if (a->B <= 0 || a->T <= 0 || a->H <= 0 || a->KVH <= 0 || plan_for(a, sm_count, p) != cudaSuccess || p.splits <= 1 ||
      p.cl)
    return 0;
  size_t slots = (size_t)a->B * a->T * a->H * p.splits;
  return slots * sizeof(float2) + slots * a->hd * sizeof(float);
}

extern "C" cudaError_t msh_k_attn_decode(cudaStream_t s, const msh_k_attn *a, void *work, int sm_count) {
  if (a->B <= 0 || a->T <= 0 || a->H <= 0) return cudaGetLastError();
  if (a->hd > 256 || a->hd < 1 || a->KVH < 1 || a->H % a->KVH) return cudaErrorInvalidValue;
  if (a->pos0_dev && a->pos0_n != 1 && a->pos0_n != a->B) return cudaErrorInvalidValue;
  Plan p;
  cudaError_t e = plan_for(a, sm_count, p);
  if (e != cudaSuccess) return e;
  float2 *ml = NULL;
  float *acc = NULL;
  if (p.splits > 1 && !p.cl) {
    if (!work) return cudaErrorInvalidValue;
    ml = (float2 *)work;
    acc = (float *)(ml + (size_t)a->B * a->T * a->H * p.splits);
  }
  if (p.tc) {
    if (a->kv_dt == MSH_F16)
      e = a->hd == 64 ? tc_launch<f16, 64, PG_NONE>(s, a, p, ml, acc) : tc_launch<f16, 128, PG_NONE>(s, a, p, ml, acc);
    else
      e = a->hd == 64 ? tc_launch<bf16, 64, PG_NONE>(s, a, p, ml, acc) : tc_launch<bf16, 128, PG_NONE>(s, a, p, ml, acc);
  } else {
    LaunchOp op = {s, a, &p, ml, acc};
    e = with_instance(a->kv_dt, p, op);
  }
  if (e != cudaSuccess || p.splits <= 1 || p.cl) return e;
  return msh_k_attn_merge(s, a, p.splits, p.chunk, ml, acc);
}
