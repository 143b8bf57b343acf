/* attn_prefill.cu: causal GQA flash attention on tensor cores (mma.sync m16n8k16, fp32
 * accumulation) for f16/bf16 caches, head dim 64 or 128.
 *
 * The T * G query rows of one sequence that share a kv head (G = H / KVH) are packed as row
 * r = t * G + g, so one block of rows reads each K/V tile once for all of its heads and tokens;
 * grid (row blocks x sequences x kv heads, key chunks). Each of the 4 warps owns MT tiles of 16 rows
 * (64 MT rows a block): with MT = 2 every K and V fragment loaded from shared memory feeds two
 * MMAs instead of one (FlashAttention-2's shape at head dim 128); MT = 1 makes twice the blocks
 * for short prompts. Key tiles of BN rows (64, or 32 with MT = 2) stream through shared memory with cp.async,
 * double-buffered. Per tile and warp: S = Q K^T (16 MT x BN) in registers, causal mask, online
 * softmax in log2 units, then P (rounded to the cache's type) @ V; K fragments come from
 * ldmatrix, V fragments from ldmatrix.trans. Q (rounded to the cache's type) lives in registers
 * when MT * hd <= 128 and in the warp's part of shared memory otherwise (registers hold the
 * 32 x 128 accumulator). No score matrix reaches global memory. Blocks with the most keys start
 * first. */
#include "attn_prefill.cuh"

using namespace msh;

namespace {

constexpr int WARPS = 4, THREADS = 32 * WARPS;
constexpr float LOG2E = 1.4426950408889634f;

template <int HD, int MT> __host__ __device__ constexpr bool q_in_regs() { return MT * HD <= 128; }

/* K and V double-buffered, then Q when it does not live in registers */
template <int HD, int MT, int BN> constexpr int smem_bytes() {
  return (4 * BN + (q_in_regs<HD, MT>() ? 0 : WARPS * 16 * MT)) * (HD + 8) * 2;
}

template <typename KV, int HD, int MT, int BN, bool SPLIT>
__global__ void __launch_bounds__(THREADS, 2)
    prefill_kernel(msh_k_attn a, int splits, int64_t chunk, float2 *part_ml, float *part_acc) {
  constexpr int LD = HD + 8; /* shared row stride (elements): conflict-free fragments */
  constexpr int KT = HD / 16, NT = BN / 8, DT = HD / 8, BM = 16 * WARPS * MT, R = 2 * MT;
  constexpr bool QREG = q_in_regs<HD, MT>();
  extern __shared__ __align__(16) unsigned char smem[];
  KV *Ks = reinterpret_cast<KV *>(smem); /* [2][BN][LD] */
  KV *Vs = Ks + 2 * BN * LD;             /* [2][BN][LD] */

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
  const PrefillBlock blk(a, chunk, BM);
  if (blk.kmax <= blk.k_begin) return; /* no row of this block sees this chunk */
  const int64_t rwarp = blk.rblk + warp * 16 * MT;
  const int ntile = (blk.keys() + BN - 1) / BN;
  /* row i = 2 m + h of this thread (packed row rwarp + 16 m + 8 h + g) sees keys below lim[i];
   * every row of the block sees the keys below lim_all */
  int lim[R];
#pragma unroll
  for (int i = 0; i < R; i++) lim[i] = blk.limit(a, rwarp + 16 * (i >> 1) + 8 * (i & 1) + g);
  const int lim_all = blk.limit(a, blk.rblk);
  const float qs = a.scale * LOG2E;

  /* Q fragments: in registers, or staged once in the warp's shared rows for ldmatrix */
  uint32_t qf[QREG ? MT : 1][QREG ? KT : 1][4];
  KV *Qs = Vs + 2 * BN * LD + warp * 16 * MT * LD; /* [16 MT][LD], this warp's rows */
  if constexpr (QREG) {
#pragma unroll
    for (int m = 0; m < MT; m++) {
      const float *qA = blk.q(a, rwarp + 16 * m + g), *qB = blk.q(a, rwarp + 16 * m + g + 8);
#pragma unroll
      for (int kk = 0; kk < KT; kk++) {
        int col = kk * 16 + 2 * tq;
        qf[m][kk][0] = Mma<KV>::pack(qA[col], qA[col + 1]);
        qf[m][kk][1] = Mma<KV>::pack(qB[col], qB[col + 1]);
        qf[m][kk][2] = Mma<KV>::pack(qA[col + 8], qA[col + 9]);
        qf[m][kk][3] = Mma<KV>::pack(qB[col + 8], qB[col + 9]);
      }
    }
  } else {
    constexpr int CPR = HD / 8; /* 8-element chunks per row */
    for (int e = lane; e < 16 * MT * CPR; e += 32) {
      int r = e / CPR, cc = e % CPR;
      const float4 *src = reinterpret_cast<const float4 *>(blk.q(a, rwarp + r) + cc * 8);
      float4 x = src[0], y = src[1];
      uint4 u = make_uint4(Mma<KV>::pack(x.x, x.y), Mma<KV>::pack(x.z, x.w), Mma<KV>::pack(y.x, y.y),
                           Mma<KV>::pack(y.z, y.w));
      *reinterpret_cast<uint4 *>(Qs + r * LD + cc * 8) = u;
    }
    __syncwarp();
  }

  /* this thread's 16-byte column of K and V, at key k_begin: rows r0, r0 + RSTEP, .. of a tile */
  constexpr int CPR = HD / 8, RSTEP = THREADS / CPR;
  const int r0 = threadIdx.x / CPR, c0 = threadIdx.x % CPR * 8, nkeys = blk.keys();
  const KV *kg = (const KV *)a.k + blk.b * a.ksb + blk.k_begin * a.ks0 + (int64_t)blk.kvh * a.hd + c0;
  const KV *vg = (const KV *)a.v + blk.b * a.vsb + blk.k_begin * a.vs0 + (int64_t)blk.kvh * a.hd + c0;
  auto load_tile = [&](int j, int buf) {
#pragma unroll 1
    for (int r = r0; r < BN; r += RSTEP) {
      const int key = j * BN + r;
      const bool ok = key < nkeys; /* rows past kmax become zeros (masked, and never NaN) */
      const int64_t kr = ok ? key : 0;
      cp_async16(Ks + (buf * BN + r) * LD + c0, kg + kr * a.ks0, ok);
      cp_async16(Vs + (buf * BN + r) * LD + c0, vg + kr * a.vs0, ok);
    }
  };

  float o[MT][DT][4];
#pragma unroll
  for (int m = 0; m < MT; m++)
#pragma unroll
    for (int dn = 0; dn < DT; dn++) o[m][dn][0] = o[m][dn][1] = o[m][dn][2] = o[m][dn][3] = 0.0f;
  float mrow[R], lrow[R];
#pragma unroll
  for (int i = 0; i < R; i++) {
    mrow[i] = -INFINITY;
    lrow[i] = 0.0f;
  }

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

    float s[MT][NT][4];
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
      for (int nn = 0; nn < NT; nn++) s[m][nn][0] = s[m][nn][1] = s[m][nn][2] = s[m][nn][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < KT; kk++) {
      uint32_t qa[MT][4]; /* A fragments of step kk */
#pragma unroll
      for (int m = 0; m < MT; m++) {
        if constexpr (QREG) {
#pragma unroll
          for (int e = 0; e < 4; e++) qa[m][e] = qf[QREG ? m : 0][QREG ? kk : 0][e];
        } else {
          ldmatrix_x4(qa[m], Qs + (m * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
        }
      }
#pragma unroll
      for (int nn = 0; nn < NT; nn += 2) {
        /* four 8x8 blocks of K: keys (nn, nn + 1) * 8.., dims kk * 16 + {0, 8}: b0, b1 of two n tiles */
        uint32_t kb[4];
        ldmatrix_x4(kb, Kt + ((nn + (lane >> 4)) * 8 + (lane & 7)) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
        for (int m = 0; m < MT; m++) {
          Mma<KV>::run(s[m][nn], qa[m], kb[0], kb[1]);
          Mma<KV>::run(s[m][nn + 1], qa[m], kb[2], kb[3]);
        }
      }
    }

    const int kbase = j * BN; /* relative to k_begin */
    const bool need_mask = kbase + BN > lim_all;
    /* every score of this thread: f(score, its row i, its key within the tile) */
    auto each = [&](auto f) {
#pragma unroll
      for (int m = 0; m < MT; m++)
#pragma unroll
        for (int nn = 0; nn < NT; nn++)
#pragma unroll
          for (int e = 0; e < 4; e++) f(s[m][nn][e], 2 * m + (e >> 1), nn * 8 + 2 * tq + (e & 1));
    };
    float mx[R];
#pragma unroll
    for (int i = 0; i < R; i++) mx[i] = -INFINITY;
    each([&](float &v, int i, int key) {
      v *= qs;
      if (need_mask && kbase + key >= lim[i]) v = -INFINITY;
      mx[i] = fmaxf(mx[i], v);
    });
    /* without splits key 0 (in the first tile) is visible to every row, so the running max is
     * finite from then on and exp2 of -inf gives the zeros; a later chunk may hide all of a row's
     * keys, so with splits every step guards against a max still at -inf */
    float mn[R];
#pragma unroll
    for (int i = 0; i < R; i++) {
#pragma unroll
      for (int off = 1; off < 4; off <<= 1) mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], off));
      mn[i] = fmaxf(mrow[i], mx[i]);
      const float corr = SPLIT && mrow[i] == -INFINITY ? 0.0f : exp2f(mrow[i] - mn[i]);
      mrow[i] = mn[i];
      lrow[i] *= corr;
      const int m = i >> 1, h = i & 1;
#pragma unroll
      for (int dn = 0; dn < DT; dn++) {
        o[m][dn][2 * h] *= corr;
        o[m][dn][2 * h + 1] *= corr;
      }
    }
    each([&](float &v, int i, int) {
      v = SPLIT && v == -INFINITY ? 0.0f : exp2f(v - mn[i]);
      lrow[i] += v;
    });

#pragma unroll
    for (int k2 = 0; k2 < BN / 16; k2++) {
      uint32_t pa[MT][4];
#pragma unroll
      for (int m = 0; m < MT; m++) {
        pa[m][0] = Mma<KV>::pack(s[m][2 * k2][0], s[m][2 * k2][1]);
        pa[m][1] = Mma<KV>::pack(s[m][2 * k2][2], s[m][2 * k2][3]);
        pa[m][2] = Mma<KV>::pack(s[m][2 * k2 + 1][0], s[m][2 * k2 + 1][1]);
        pa[m][3] = Mma<KV>::pack(s[m][2 * k2 + 1][2], s[m][2 * k2 + 1][3]);
      }
#pragma unroll
      for (int dn = 0; dn < DT; dn += 2) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, Vt + (k2 * 16 + (lane & 15)) * LD + (dn + (lane >> 4)) * 8);
#pragma unroll
        for (int m = 0; m < MT; m++) {
          Mma<KV>::run(o[m][dn], pa[m], vb[0], vb[1]);
          Mma<KV>::run(o[m][dn + 1], pa[m], vb[2], vb[3]);
        }
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < R; i++) {
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) lrow[i] += __shfl_xor_sync(0xffffffffu, lrow[i], off);
  }
#pragma unroll
  for (int i = 0; i < R; i++) {
    const int64_t r = rwarp + 16 * (i >> 1) + 8 * (i & 1) + g;
    if (r >= blk.rows) continue;
    const int m = i >> 1, h = i & 1;
    blk.store<HD, SPLIT>(a, r, tq, mrow[i], lrow[i], splits, part_ml, part_acc,
                         [&](int dn) { return make_float2(o[m][dn][2 * h], o[m][dn][2 * h + 1]); });
  }
}

/* The block tiles (rows x keys). mma.sync (sm_80 on): 64 x 64, one 16-row tile a warp; 128 x 32,
 * two row tiles a warp (every K and V fragment feeds two MMAs; 32 keys keep the 32 x 128
 * accumulator and the scores in registers); two blocks an SM. wgmma (sm_90a,
 * attn_prefill_sm90.cu): 128 x 128, two warpgroups, one block an SM. */
struct Tile {
  const char *name;
  int bm, bn, per_sm;
  int mt; /* mma.sync: 16-row tiles a warp (0: the wgmma tile) */
};
const Tile TILES[] = {
    {"64x64", 64, 64, 2, 1},
    {"128x32", 128, 32, 2, 2},
    {"wg128x128", 128, 128, 1, 0},
};
enum { T64x64, T128x32, TWG128x128, NTILES };

struct Plan {
  int tile;      /* index into TILES */
  int splits;    /* key chunks */
  int64_t chunk; /* keys a chunk (whole tiles) */
};

/* On Hopper the wgmma tile for sequences of 1024 keys or more once its row blocks fill every SM;
 * otherwise 128 x 32 once those blocks fill every SM twice, else 64 x 64. The keys are split
 * when even that leaves SMs idle (few queries over a long cache): chunks of whole tiles, enough
 * to fill the SMs. MSH_ATTN_TILE in the environment (a tile's name) forces the tile where the
 * device runs it (tuning and tests; read at every call). Measured on an H200 (Llama-3-8B heads,
 * kernels/NOTES.md): at 2048 tokens 127 us for wg128x128, 146 for 128 x 32, 156 for 64 x 64; at 8
 * sequences of 512, 126, 124 and 116 (short rows of keys: the 128-key tiles waste more of the
 * causal diagonal). */
Plan plan(const msh_k_attn *a, int sm_count) {
  const int64_t rows = (int64_t)a->T * (a->H / a->KVH), sms = sm_count > 0 ? sm_count : 132;
  auto blocks = [&](int bm) { return (rows + bm - 1) / bm * a->KVH * a->B; };
  const bool sm90 = attn_prefill_sm90_available();
  const bool wg = sm90 && a->pos0 + a->T >= 1024 && blocks(128) >= sms;
  Plan p = {wg ? TWG128x128 : blocks(128) >= 2 * sms ? T128x32 : T64x64, 1, 0};
  if (const char *e = getenv("MSH_ATTN_TILE"))
    for (int t = 0; t < NTILES; t++)
      if (!strcmp(e, TILES[t].name) && (sm90 || TILES[t].mt)) p.tile = t;
  const Tile &t = TILES[p.tile];
  const int64_t bn = t.bn, have = blocks(t.bm), target = t.per_sm * sms, maxn = a->pos0 + a->T,
                max_n = (maxn + bn - 1) / bn;
  int64_t n = have >= target ? 1 : (target + have - 1) / have;
  if (n > max_n) n = max_n;
  if (n < 1) n = 1;
  p.chunk = ((maxn + n - 1) / n + bn - 1) / bn * bn;
  p.splits = (int)((maxn + p.chunk - 1) / p.chunk);
  return p;
}

template <typename KV, int HD, int MT, int BN, bool SPLIT>
cudaError_t launch_as(cudaStream_t s, const msh_k_attn *a, const Plan &p, float2 *ml, float *acc) {
  constexpr int bytes = smem_bytes<HD, MT, BN>();
  auto kernel = prefill_kernel<KV, HD, MT, BN, SPLIT>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e != cudaSuccess) return e;
  kernel<<<prefill_grid(a, 64 * MT, p.splits), THREADS, bytes, s>>>(*a, p.splits, p.chunk, ml, acc);
  return cudaGetLastError();
}

/* the unsplit kernel skips the -inf guards that only chunks after the first need */
template <typename KV, int HD, int MT, int BN>
cudaError_t launch_split(cudaStream_t s, const msh_k_attn *a, const Plan &p, float2 *ml, float *acc) {
  return p.splits > 1 ? launch_as<KV, HD, MT, BN, true>(s, a, p, ml, acc)
                      : launch_as<KV, HD, MT, BN, false>(s, a, p, ml, acc);
}

template <typename KV, int HD>
cudaError_t launch(cudaStream_t s, const msh_k_attn *a, const Plan &p, float2 *ml, float *acc) {
  return TILES[p.tile].mt == 1 ? launch_split<KV, HD, 1, 64>(s, a, p, ml, acc)
                                : launch_split<KV, HD, 2, 32>(s, a, p, ml, acc);
}

} // namespace

extern "C" int msh_k_attn_prefill_ok(const msh_k_attn *a) {
  return !a->pos0_dev && (a->kv_dt == MSH_F16 || a->kv_dt == MSH_BF16) && (a->hd == 64 || a->hd == 128) &&
         a->KVH > 0 && a->H % a->KVH == 0 && aligned16(a->q) && ((uintptr_t)a->out & 7) == 0 && a->ks0 % 8 == 0 &&
         a->vs0 % 8 == 0 && aligned16(a->k) && aligned16(a->v) && (a->B <= 1 || (a->ksb % 8 == 0 && a->vsb % 8 == 0)) &&
         a->B >= 1 && ((int64_t)a->T * (a->H / a->KVH) + 63) / 64 * a->B * a->KVH < 0x7fffffff &&
         a->pos0 + a->T < 0x7fffffff;
}

extern "C" size_t msh_k_attn_prefill_workspace(const msh_k_attn *a, int sm_count) {
  if (!msh_k_attn_prefill_ok(a) || a->T <= 0) return 0;
  const Plan p = plan(a, sm_count);
  if (p.splits <= 1) return 0;
  size_t slots = (size_t)a->B * a->T * a->H * p.splits;
  return slots * sizeof(float2) + slots * a->hd * sizeof(float);
}

extern "C" cudaError_t msh_k_attn_prefill(cudaStream_t s, const msh_k_attn *a, void *work, int sm_count) {
  if (!msh_k_attn_prefill_ok(a)) return cudaErrorNotSupported;
  if (a->T <= 0) return cudaGetLastError();
  const Plan p = plan(a, sm_count);
  float2 *ml = NULL;
  float *acc = NULL;
  if (p.splits > 1) {
    if (!work) return cudaErrorInvalidValue;
    ml = (float2 *)work;
    acc = (float *)(ml + (size_t)a->B * a->T * a->H * p.splits);
  }
  cudaError_t e;
  if (!TILES[p.tile].mt)
    e = attn_prefill_sm90(s, a, p.splits, p.chunk, ml, acc);
  else if (a->kv_dt == MSH_BF16)
    e = a->hd == 64 ? launch<bf16, 64>(s, a, p, ml, acc) : launch<bf16, 128>(s, a, p, ml, acc);
  else
    e = a->hd == 64 ? launch<f16, 64>(s, a, p, ml, acc) : launch<f16, 128>(s, a, p, ml, acc);
  if (e != cudaSuccess || p.splits <= 1) return e;
  return msh_k_attn_merge(s, a, p.splits, (int)p.chunk, ml, acc);
}
