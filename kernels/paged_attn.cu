/* paged_attn.cu: the paged KV cache on CUDA: kv_write (new K/V rows into pool rows by a slot
 * mapping) and varlen causal GQA attention through block tables.
 *
 * Attention: one block per (query row, key split, kv head); each of its NW warps takes the
 * query heads of the kv head in turn. A query row finds its sequence by a binary search over
 * q_start and its position from ctx_len (both read when the kernel runs, clamped so that nothing
 * is read out of bounds: a captured graph serves every step). Keys go in tiles of TILE: the lanes
 * score a tile's keys (each key's row found through the block table) into shared memory, the warp
 * keeps an online softmax across tiles, and lane j accumulates p * v for dims j, j + 32, ...
 * (hd <= 256).
 *
 * Two forms, one kernel. Rows of one query per sequence (decodes) split each sequence's keys
 * into `splits` spans so that the grid fills the GPU (the count depends on the rows, kv heads and
 * max_ctx only), and a merge kernel combines the spans' partial softmax results. Prompt chunks
 * (any rows) run one span per row: their rows fill the grid on their own.
 *
 * This kernel serves what the tensor-core forms (attn_decode.cu, msh_k_attn_paged) do not take:
 * f32 pools, head dims other than 64 and 128, unaligned operands. */
#include "msh_paged.cuh"

using namespace msh;

namespace {

constexpr int TC_DEFAULT = 1; /* the tensor-core forms unless MSH_PAGED_TC says otherwise */
constexpr int NW = 4;       /* warps per block */
constexpr int TILE = 128;   /* keys scored per tile */
constexpr int MAX_HD = 256; /* dims a warp accumulates: 8 per lane */

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <typename KT>
__global__ void __launch_bounds__(NW * 32) paged_kernel(msh_k_paged a, int splits, int span, float *part) {
  /* rows on x, whose limit (2^31 - 1) no chunk of query rows reaches; splits (at most
   * 2 x SMs) on y */
  const int r = blockIdx.x, split = blockIdx.y, kvh = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __shared__ float sq[NW][MAX_HD];
  __shared__ float sc[NW][TILE];
  /* the row's sequence, position and keys */
  int64_t seq;
  const int64_t pos = paged_row(a.q_start, a.ctx_len, a.B, a.max_ctx, r, seq);
  const int b = (int)seq;
  const int n = (int)pos + 1, s0 = split * span, s1 = n - s0 < span ? n : s0 + span;
  const int group = a.H / a.KVH, hd = a.hd;
  const int32_t *bt = a.block_table + (size_t)b * a.MB;
  const size_t rs = (size_t)a.KVH * hd, hoff = (size_t)kvh * hd;
  const KT *K = static_cast<const KT *>(a.k), *V = static_cast<const KT *>(a.v);
  for (int g = warp; g < group; g += NW) {
    const int h = kvh * group + g;
    const float *q = a.q + ((size_t)r * a.H + h) * hd;
    for (int d = lane; d < hd; d += 32) sq[warp][d] = q[d] * a.scale;
    __syncwarp();
    float m = -INFINITY, l = 0.0f, acc[MAX_HD / 32];
#pragma unroll
    for (int i = 0; i < MAX_HD / 32; i++) acc[i] = 0.0f;
    for (int t0 = s0; t0 < s1; t0 += TILE) {
      const int t1 = min(s1, t0 + TILE);
      float tmax = -INFINITY;
      for (int s = t0 + lane; s < t1; s += 32) {
        const KT *k = K + paged_key(bt, a.MB, a.NB, a.BS, s) * rs + hoff;
        float dot = 0.0f;
        for (int d = 0; d < hd; d++) dot += sq[warp][d] * to_f(k[d]);
        sc[warp][s - t0] = dot;
        tmax = fmaxf(tmax, dot);
      }
      tmax = warp_max(tmax);
      const float mnew = fmaxf(m, tmax);
      const float f = m == -INFINITY ? 0.0f : __expf(m - mnew);
      l *= f;
#pragma unroll
      for (int i = 0; i < MAX_HD / 32; i++) acc[i] *= f;
      __syncwarp();
      float ps = 0.0f;
      for (int s = t0 + lane; s < t1; s += 32) {
        const float p = __expf(sc[warp][s - t0] - mnew);
        sc[warp][s - t0] = p;
        ps += p;
      }
      l += warp_sum(ps);
      __syncwarp();
      for (int s = t0; s < t1; s++) {
        const float p = sc[warp][s - t0];
        const KT *v = V + paged_key(bt, a.MB, a.NB, a.BS, s) * rs + hoff;
#pragma unroll
        for (int i = 0; i < MAX_HD / 32; i++) {
          const int d = lane + 32 * i;
          if (d < hd) acc[i] += p * to_f(v[d]);
        }
      }
      m = mnew;
      __syncwarp();
    }
    const size_t row = (size_t)r * a.H + h;
    if (splits == 1) {
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
      for (int i = 0; i < MAX_HD / 32; i++) {
        const int d = lane + 32 * i;
        if (d < hd) a.out[row * hd + d] = acc[i] * inv;
      }
    } else {
      float *p = part + (row * splits + split) * (size_t)(hd + 2);
      if (lane == 0) {
        p[0] = m;
        p[1] = l;
      }
#pragma unroll
      for (int i = 0; i < MAX_HD / 32; i++) {
        const int d = lane + 32 * i;
        if (d < hd) p[2 + d] = acc[i];
      }
    }
    __syncwarp();
  }
}

/* out row (r, h) from the splits' partial results: max m, sum l, accumulator (hd). */
__global__ void paged_merge_kernel(float *out, const float *part, int splits, int hd) {
  const size_t row = blockIdx.x;
  const float *p = part + row * splits * (size_t)(hd + 2);
  float M = -INFINITY;
  for (int j = 0; j < splits; j++) M = fmaxf(M, p[j * (hd + 2)]);
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float L = 0.0f, A = 0.0f;
    for (int j = 0; j < splits; j++) {
      const float *pj = p + j * (hd + 2);
      if (pj[0] == -INFINITY) continue;
      const float f = __expf(pj[0] - M);
      L += pj[1] * f;
      A += pj[2 + d] * f;
    }
    out[row * hd + d] = L > 0.0f ? A / L : 0.0f;
  }
}

/* The plan: splits and span (keys per split) for rows over contexts up to max_ctx. */
void plan(const msh_k_paged *a, int sm_count, int *splits, int *span) {
  int s = 1;
  if (a->R == a->B) { /* decodes: split the keys until the grid fills the GPU twice */
    int64_t blocks = (int64_t)a->R * a->KVH, want = 2LL * (sm_count > 0 ? sm_count : 1);
    int most = (a->max_ctx + TILE - 1) / TILE;
    while (s < most && blocks * s < want) s *= 2;
    if (s > most) s = most;
  }
  int64_t sp = ((int64_t)a->max_ctx + s - 1) / s;
  sp = (sp + TILE - 1) / TILE * TILE;
  *splits = (int)(((int64_t)a->max_ctx + sp - 1) / sp);
  *span = (int)sp;
}

/* Element i of a row of src_dt (f32/f16/bf16; one dtype per launch, so the branch is uniform). */
__device__ __forceinline__ float load_f(const void *p, int dt, int64_t i) {
  if (dt == MSH_F32) return static_cast<const float *>(p)[i];
  if (dt == MSH_F16) return to_f(static_cast<const f16 *>(p)[i]);
  return to_f(static_cast<const bf16 *>(p)[i]);
}

/* k and v may differ in dtype (the op takes any float rows for each). */
template <typename DT>
__global__ void kv_write_kernel(DT *kp, DT *vp, const void *k, int k_dt, const void *v, int v_dt, int64_t k_ld,
                                int64_t v_ld, const int32_t *slots, int64_t pool_rows, int row_elems) {
  const int r = blockIdx.x;
  const int32_t slot = slots[r];
  if (slot < 0 || slot >= pool_rows) return; /* padding, or past the pool: nothing written */
  for (int e = threadIdx.x; e < row_elems; e += blockDim.x) {
    kp[(size_t)slot * row_elems + e] = from_f<DT>(load_f(k, k_dt, r * k_ld + e));
    vp[(size_t)slot * row_elems + e] = from_f<DT>(load_f(v, v_dt, r * v_ld + e));
  }
}

template <typename DT>
cudaError_t kv_write_to(cudaStream_t s, DT *kp, DT *vp, const void *k, int k_dt, const void *v, int v_dt, int64_t k_ld,
                        int64_t v_ld, const int32_t *slots, int64_t pool_rows, int R, int row_elems) {
  const int threads = row_elems < 256 ? (row_elems + 31) / 32 * 32 : 256;
  kv_write_kernel<DT><<<R, threads, 0, s>>>(kp, vp, k, k_dt, v, v_dt, k_ld, v_ld, slots, pool_rows, row_elems);
  return cudaGetLastError();
}

/* The tensor-core forms where they apply, unless MSH_PAGED_TC=0 (read once): 1 takes them, 0 keeps
 * this file's kernel everywhere. */
bool tc_forms(const msh_k_paged *a) {
  static int on = -1;
  if (on < 0) {
    const char *e = getenv("MSH_PAGED_TC");
    on = e ? atoi(e) != 0 : TC_DEFAULT;
  }
  return on && msh_k_attn_paged_ok(a);
}

} // namespace

extern "C" size_t msh_k_paged_attn_workspace(const msh_k_paged *a, int sm_count) {
  if (tc_forms(a)) return msh_k_attn_paged_workspace(a, sm_count);
  int splits, span;
  plan(a, sm_count, &splits, &span);
  if (splits <= 1) return 0;
  return sizeof(float) * (size_t)a->R * a->H * splits * (a->hd + 2);
}

extern "C" cudaError_t msh_k_paged_attn(cudaStream_t s, const msh_k_paged *a, void *work, int sm_count) {
  if (tc_forms(a)) return msh_k_attn_paged(s, a, work, sm_count);
  int splits, span;
  plan(a, sm_count, &splits, &span);
  dim3 grid(a->R, splits, a->KVH);
  float *part = static_cast<float *>(work);
  if (a->kv_dt == MSH_F32) paged_kernel<float><<<grid, NW * 32, 0, s>>>(*a, splits, span, part);
  else if (a->kv_dt == MSH_F16) paged_kernel<f16><<<grid, NW * 32, 0, s>>>(*a, splits, span, part);
  else paged_kernel<bf16><<<grid, NW * 32, 0, s>>>(*a, splits, span, part);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || splits <= 1) return e;
  const int64_t rows = (int64_t)a->R * a->H; /* splits > 1: R * KVH < 2 x SMs, so few rows */
  if (rows > INT32_MAX) return cudaErrorInvalidConfiguration;
  paged_merge_kernel<<<(unsigned)rows, a->hd < 128 ? 64 : 128, 0, s>>>(a->out, part, splits, a->hd);
  return cudaGetLastError();
}

extern "C" cudaError_t msh_k_kv_write(cudaStream_t s, void *k_pool, void *v_pool, int pool_dt, int64_t pool_rows,
                                      const void *k, int k_dt, const void *v, int v_dt, int64_t k_ld, int64_t v_ld,
                                      const int32_t *slots, int R, int row_elems) {
  if (pool_dt == MSH_F32)
    return kv_write_to(s, (float *)k_pool, (float *)v_pool, k, k_dt, v, v_dt, k_ld, v_ld, slots, pool_rows, R, row_elems);
  if (pool_dt == MSH_F16)
    return kv_write_to(s, (f16 *)k_pool, (f16 *)v_pool, k, k_dt, v, v_dt, k_ld, v_ld, slots, pool_rows, R, row_elems);
  return kv_write_to(s, (bf16 *)k_pool, (bf16 *)v_pool, k, k_dt, v, v_dt, k_ld, v_ld, slots, pool_rows, R, row_elems);
}
