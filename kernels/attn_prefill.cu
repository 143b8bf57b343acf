/* attn_prefill.cu: causal GQA flash attention on tensor cores (mma.sync m16n8k16, fp32
 * accumulation) for f16/bf16 caches, head dim 64 or 128.
 *
 * The T * G query rows of one sequence that share a kv head (G = H / KVH) are packed as row
 * r = t * G + g, so one block of 64 rows (16 per warp) reads each K/V tile once for all of its
 * heads and tokens; grid (row blocks, sequence x kv head, key chunks). Key
 * tiles of 64 rows stream through shared memory with cp.async, double-buffered. Per tile and
 * warp: S = Q K^T (16 x 64) in registers, causal mask, online softmax in log2 units, then
 * P (rounded to the cache's type) @ V; K fragments come from ldmatrix, V fragments from
 * ldmatrix.trans. No score matrix
 * reaches global memory. Blocks with the most keys start first. */
#include "msh_mma.cuh"

using namespace msh;

namespace {

constexpr int BM = 64, BN = 64, THREADS = 128;
constexpr float LOG2E = 1.4426950408889634f;

template <int HD> constexpr int smem_bytes() { return 4 * BN * (HD + 8) * 2; }

template <typename KV, int HD, bool SPLIT>
__global__ void __launch_bounds__(THREADS) prefill_kernel(msh_k_attn a, int splits, int64_t chunk, float2 *part_ml,
                                                          float *part_acc) {
  constexpr int LD = HD + 8; /* shared row stride (elements): conflict-free fragments */
  constexpr int KT = HD / 16, NT = BN / 8, DT = HD / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  KV *Ks = reinterpret_cast<KV *>(smem); /* [2][BN][LD] */
  KV *Vs = Ks + 2 * BN * LD;             /* [2][BN][LD] */

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
  const int G = a.H / a.KVH, kvh = blockIdx.y % a.KVH;
  const int64_t b = blockIdx.y / a.KVH, bT = b * a.T; /* the sequence and its first query's row */
  const int64_t rows = (int64_t)a.T * G;
  const int64_t rblk = (int64_t)(gridDim.x - 1 - blockIdx.x) * BM;
  const int64_t rA = rblk + warp * 16 + g, rB = rA + 8;
  const int64_t cA = rA < rows ? rA : rows - 1, cB = rB < rows ? rB : rows - 1;
  const int64_t tA = cA / G, tB = cB / G;
  const float *qA = a.q + ((bT + tA) * a.H + kvh * G + cA % G) * a.hd;
  const float *qB = a.q + ((bT + tB) * a.H + kvh * G + cB % G) * a.hd;
  const int64_t rlast = (rblk + BM < rows ? rblk + BM : rows) - 1;
  const int64_t t_first = rblk / G;
  /* keys this block needs: [0, pos0 + t_last + 1), of which split z takes one chunk */
  const int split = blockIdx.z;
  const int64_t kneed = a.pos0 + rlast / G + 1, k_begin = (int64_t)split * chunk;
  if (k_begin >= kneed) return; /* no row of this block sees this chunk: the merge skips it */
  const int64_t kmax = kneed < k_begin + chunk ? kneed : k_begin + chunk;
  const int ntile = (int)((kmax - k_begin + BN - 1) / BN);
  const float qs = a.scale * LOG2E;

  uint32_t qf[KT][4];
#pragma unroll
  for (int kk = 0; kk < KT; kk++) {
    int col = kk * 16 + 2 * tq;
    qf[kk][0] = Mma<KV>::pack(qA[col], qA[col + 1]);
    qf[kk][1] = Mma<KV>::pack(qB[col], qB[col + 1]);
    qf[kk][2] = Mma<KV>::pack(qA[col + 8], qA[col + 9]);
    qf[kk][3] = Mma<KV>::pack(qB[col + 8], qB[col + 9]);
  }

  const KV *kg = (const KV *)a.k + b * a.ksb + (int64_t)kvh * a.hd;
  const KV *vg = (const KV *)a.v + b * a.vsb + (int64_t)kvh * a.hd;
  auto load_tile = [&](int j, int b) {
    constexpr int CPR = HD / 8; /* 16-byte chunks per row */
    for (int e = threadIdx.x; e < BN * CPR; e += THREADS) {
      int r = e / CPR, cc = e % CPR;
      int64_t key = k_begin + (int64_t)j * BN + r;
      bool ok = key < kmax; /* rows past kmax become zeros (masked, and never NaN) */
      int64_t kr = ok ? key : k_begin;
      cp_async16(Ks + (b * BN + r) * LD + cc * 8, kg + kr * a.ks0 + cc * 8, ok);
      cp_async16(Vs + (b * BN + r) * LD + cc * 8, vg + kr * a.vs0 + cc * 8, ok);
    }
  };

  float o[DT][4];
#pragma unroll
  for (int dn = 0; dn < DT; dn++) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.0f;
  float mA = -INFINITY, mB = -INFINITY, lA = 0.0f, lB = 0.0f;

  load_tile(0, 0);
  cp_async_commit();
  for (int j = 0; j < ntile; j++) {
    if (j + 1 < ntile) {
      load_tile(j + 1, (j + 1) & 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const KV *Kt = Ks + (j & 1) * BN * LD, *Vt = Vs + (j & 1) * BN * LD;

    float s[NT][4];
#pragma unroll
    for (int nn = 0; nn < NT; nn++) {
      s[nn][0] = s[nn][1] = s[nn][2] = s[nn][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < KT; kk += 2) {
        /* four 8x8 blocks of K: keys nn*8.., dims kk*16 + {0, 8, 16, 24}: b0, b1 of steps kk, kk+1 */
        uint32_t kb[4];
        ldmatrix_x4(kb, Kt + (nn * 8 + (lane & 7)) * LD + kk * 16 + (lane >> 3) * 8);
        Mma<KV>::run(s[nn], qf[kk], kb[0], kb[1]);
        Mma<KV>::run(s[nn], qf[kk + 1], kb[2], kb[3]);
      }
    }

    const int64_t kbase = k_begin + (int64_t)j * BN;
    const bool need_mask = kbase + BN - 1 > a.pos0 + t_first || kbase + BN > kmax;
    float mxA = -INFINITY, mxB = -INFINITY;
#pragma unroll
    for (int nn = 0; nn < NT; nn++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        float v = s[nn][e] * qs;
        if (need_mask) {
          int64_t key = kbase + nn * 8 + 2 * tq + (e & 1);
          if (key >= kmax || key > a.pos0 + (e < 2 ? tA : tB)) v = -INFINITY;
        }
        s[nn][e] = v;
        if (e < 2) mxA = fmaxf(mxA, v);
        else mxB = fmaxf(mxB, v);
      }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      mxA = fmaxf(mxA, __shfl_xor_sync(0xffffffffu, mxA, off));
      mxB = fmaxf(mxB, __shfl_xor_sync(0xffffffffu, mxB, off));
    }
    /* without splits key 0 (in the first tile) is visible to every row, so the running max is
     * finite from then on and exp2 of -inf gives the zeros; a later chunk may hide all of a row's
     * keys, so with splits every step guards against a max still at -inf */
    const float mnA = fmaxf(mA, mxA), mnB = fmaxf(mB, mxB);
    const float corrA = SPLIT && mA == -INFINITY ? 0.0f : exp2f(mA - mnA);
    const float corrB = SPLIT && mB == -INFINITY ? 0.0f : exp2f(mB - mnB);
    mA = mnA;
    mB = mnB;
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
    for (int nn = 0; nn < NT; nn++) {
      s[nn][0] = SPLIT && s[nn][0] == -INFINITY ? 0.0f : exp2f(s[nn][0] - mnA);
      s[nn][1] = SPLIT && s[nn][1] == -INFINITY ? 0.0f : exp2f(s[nn][1] - mnA);
      s[nn][2] = SPLIT && s[nn][2] == -INFINITY ? 0.0f : exp2f(s[nn][2] - mnB);
      s[nn][3] = SPLIT && s[nn][3] == -INFINITY ? 0.0f : exp2f(s[nn][3] - mnB);
      lA += s[nn][0] + s[nn][1];
      lB += s[nn][2] + s[nn][3];
    }

#pragma unroll
    for (int k2 = 0; k2 < BN / 16; k2++) {
      uint32_t pa[4];
      pa[0] = Mma<KV>::pack(s[2 * k2][0], s[2 * k2][1]);
      pa[1] = Mma<KV>::pack(s[2 * k2][2], s[2 * k2][3]);
      pa[2] = Mma<KV>::pack(s[2 * k2 + 1][0], s[2 * k2 + 1][1]);
      pa[3] = Mma<KV>::pack(s[2 * k2 + 1][2], s[2 * k2 + 1][3]);
#pragma unroll
      for (int dn = 0; dn < DT; dn += 2) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, Vt + (k2 * 16 + (lane & 15)) * LD + (dn + (lane >> 4)) * 8);
        Mma<KV>::run(o[dn], pa, vb[0], vb[1]);
        Mma<KV>::run(o[dn + 1], pa, vb[2], vb[3]);
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    lA += __shfl_xor_sync(0xffffffffu, lA, off);
    lB += __shfl_xor_sync(0xffffffffu, lB, off);
  }
  const int64_t rowA = (bT + tA) * a.H + kvh * G + cA % G, rowB = (bT + tB) * a.H + kvh * G + cB % G;
  if (SPLIT) { /* this chunk's partial: unnormalized sum, max and sum of weights per row */
#pragma unroll
    for (int dn = 0; dn < DT; dn++) {
      int col = dn * 8 + 2 * tq;
      if (rA < rows) {
        part_acc[(rowA * splits + split) * a.hd + col] = o[dn][0];
        part_acc[(rowA * splits + split) * a.hd + col + 1] = o[dn][1];
      }
      if (rB < rows) {
        part_acc[(rowB * splits + split) * a.hd + col] = o[dn][2];
        part_acc[(rowB * splits + split) * a.hd + col + 1] = o[dn][3];
      }
    }
    if (tq == 0 && rA < rows) part_ml[rowA * splits + split] = make_float2(mA, lA);
    if (tq == 0 && rB < rows) part_ml[rowB * splits + split] = make_float2(mB, lB);
    return;
  }
  const float iA = 1.0f / lA, iB = 1.0f / lB;
  float *oA = a.out + rowA * a.hd;
  float *oB = a.out + rowB * a.hd;
#pragma unroll
  for (int dn = 0; dn < DT; dn++) {
    int col = dn * 8 + 2 * tq;
    if (rA < rows) {
      oA[col] = o[dn][0] * iA;
      oA[col + 1] = o[dn][1] * iA;
    }
    if (rB < rows) {
      oB[col] = o[dn][2] * iB;
      oB[col + 1] = o[dn][3] * iB;
    }
  }
}

/* Split the keys when the row blocks alone would leave SMs idle (few queries over a long cache):
 * chunks of whole tiles, enough to fill two blocks per SM. */
void split_plan(const msh_k_attn *a, int sm_count, int *splits, int64_t *chunk) {
  int64_t rows = (int64_t)a->T * (a->H / a->KVH);
  int64_t blocks = (rows + BM - 1) / BM * a->KVH * a->B;
  int64_t maxn = a->pos0 + a->T;
  int64_t target = 2LL * (sm_count > 0 ? sm_count : 132);
  int64_t n = blocks >= target ? 1 : (target + blocks - 1) / blocks;
  int64_t max_n = (maxn + BN - 1) / BN;
  if (n > max_n) n = max_n;
  if (n < 1) n = 1;
  int64_t c = (maxn + n - 1) / n;
  c = (c + BN - 1) / BN * BN;
  *chunk = c;
  *splits = (int)((maxn + c - 1) / c);
}

template <typename KV, int HD, bool SPLIT>
cudaError_t launch_as(cudaStream_t s, const msh_k_attn *a, int splits, int64_t chunk, float2 *ml, float *acc) {
  constexpr int bytes = smem_bytes<HD>();
  cudaError_t e =
      cudaFuncSetAttribute(prefill_kernel<KV, HD, SPLIT>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e != cudaSuccess) return e;
  int64_t rows = (int64_t)a->T * (a->H / a->KVH);
  dim3 grid((unsigned)((rows + BM - 1) / BM), (unsigned)((int64_t)a->B * a->KVH), (unsigned)splits);
  prefill_kernel<KV, HD, SPLIT><<<grid, THREADS, bytes, s>>>(*a, splits, chunk, ml, acc);
  return cudaGetLastError();
}

/* the unsplit kernel skips the -inf guards that only chunks after the first need */
template <typename KV, int HD>
cudaError_t launch(cudaStream_t s, const msh_k_attn *a, int splits, int64_t chunk, float2 *ml, float *acc) {
  return splits > 1 ? launch_as<KV, HD, true>(s, a, splits, chunk, ml, acc)
                    : launch_as<KV, HD, false>(s, a, splits, chunk, ml, acc);
}

} // namespace

extern "C" int msh_k_attn_prefill_ok(const msh_k_attn *a) {
  return !a->pos0_dev && (a->kv_dt == MSH_F16 || a->kv_dt == MSH_BF16) && (a->hd == 64 || a->hd == 128) &&
         a->KVH > 0 && a->H % a->KVH == 0 && a->ks0 % 8 == 0 && a->vs0 % 8 == 0 && aligned16(a->k) && aligned16(a->v) &&
         (a->B <= 1 || (a->ksb % 8 == 0 && a->vsb % 8 == 0)) && a->B >= 1 && (int64_t)a->B * a->KVH <= 65535 &&
         (int64_t)a->T * (a->H / a->KVH) / BM < 0x7fffffff;
}

extern "C" size_t msh_k_attn_prefill_workspace(const msh_k_attn *a, int sm_count) {
  if (!msh_k_attn_prefill_ok(a) || a->T <= 0) return 0;
  int splits;
  int64_t chunk;
  split_plan(a, sm_count, &splits, &chunk);
  if (splits <= 1) return 0;
  size_t slots = (size_t)a->B * a->T * a->H * splits;
  return slots * sizeof(float2) + slots * a->hd * sizeof(float);
}

extern "C" cudaError_t msh_k_attn_prefill(cudaStream_t s, const msh_k_attn *a, void *work, int sm_count) {
  if (!msh_k_attn_prefill_ok(a)) return cudaErrorNotSupported;
  if (a->T <= 0) return cudaGetLastError();
  int splits;
  int64_t chunk;
  split_plan(a, sm_count, &splits, &chunk);
  float2 *ml = NULL;
  float *acc = NULL;
  if (splits > 1) {
    if (!work) return cudaErrorInvalidValue;
    ml = (float2 *)work;
    acc = (float *)(ml + (size_t)a->B * a->T * a->H * splits);
  }
  cudaError_t e;
  if (a->kv_dt == MSH_BF16)
    e = a->hd == 64 ? launch<bf16, 64>(s, a, splits, chunk, ml, acc) : launch<bf16, 128>(s, a, splits, chunk, ml, acc);
  else
    e = a->hd == 64 ? launch<f16, 64>(s, a, splits, chunk, ml, acc) : launch<f16, 128>(s, a, splits, chunk, ml, acc);
  if (e != cudaSuccess || splits <= 1) return e;
  return msh_k_attn_merge(s, a, splits, (int)chunk, ml, acc);
}
