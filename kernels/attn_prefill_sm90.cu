/* attn_prefill_sm90.cu: causal GQA flash attention for Hopper (sm_90a) on warpgroup tensor cores
 * (wgmma, fp32 accumulation), f16/bf16 caches, head dim 64 or 128. The rows, splits and partial
 * results are those of attn_prefill.cu (which plans and dispatches): the T * G query rows of a
 * sequence that share a kv head are packed as r = t * G + g, the grid is 1-D over (row block,
 * sequence, kv head) with the row blocks that see the most keys first, times key chunks.
 *
 * A block is two warpgroups of 128 threads, each owning 64 query rows (128 x 128 tiles). Q,
 * rounded to the cache's type, is staged once in shared memory while the first key tile loads;
 * key tiles of 128 rows of K and V stream in with cp.async in the 128-byte swizzled layout wgmma
 * reads (msh_wgmma.cuh), three buffers deep, so tile j + 1 loads under the products of tile j
 * with one barrier a tile. Per tile and warpgroup: S = Q K^T (64 x 128, both operands in shared
 * memory), causal mask and online softmax in log2 units on the registers, then O += P V with P
 * (rounded to the cache's type) as the register operand and V read N-major from shared memory.
 * Measured against this shape (kernels/NOTES.md): one warpgroup a block with 64-key tiles (two
 * blocks an SM), three warpgroups with 64-key tiles, and the softmax of tile j + 1 run under
 * P V of tile j (FlashAttention-3's intra-warpgroup overlap) were all as fast or slower. */
#include "attn_prefill.cuh"
#include "msh_wgmma.cuh"

using namespace msh;

namespace {

constexpr int WGS = 2, BM = 64 * WGS, BN = 128, STAGES = 3; /* warpgroups, rows, keys, K/V buffers */

template <int HD> constexpr int sm90_smem_bytes() {
  return (BM + 2 * STAGES * BN) * HD * 2 + 1024; /* Q, K and V per buffer; 1024 aligns the base */
}

template <typename KV, int HD, bool SPLIT>
__global__ void __launch_bounds__(128 * WGS, 1)
    prefill_sm90_kernel(msh_k_attn a, int splits, int64_t chunk, float2 *part_ml, float *part_acc) {
#ifdef MSH_WGMMA_DEVICE
  constexpr int THREADS = 128 * WGS, CPR = HD / 8; /* 16-byte chunks a row */
  constexpr int NS = BN / 2, NO = HD / 2;                         /* accumulators a thread */
  constexpr uint32_t QB = BM * 128, KB = BN * 128;                /* bytes of a column block */
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw = (uint32_t)__cvta_generic_to_shared(smem_raw), pad = (1024 - (raw & 1023)) & 1023;
  unsigned char *smem = smem_raw + pad;
  const uint32_t q_s = raw + pad, k_s = q_s + BM * HD * 2, v_s = k_s + STAGES * BN * HD * 2;

  const int tid = threadIdx.x, lane = tid & 31, wg = tid >> 7, wq = (tid >> 5) & 3, g = lane >> 2, tq = lane & 3;
  const PrefillBlock blk(a, chunk, BM);
  if (blk.kmax <= blk.k_begin) return; /* no row of this block sees this chunk */
  const int64_t rwarp = blk.rblk + wg * 64 + wq * 16;
  const int ntile = (blk.keys() + BN - 1) / BN, nkeys = blk.keys();
  const int lim[2] = {blk.limit(a, rwarp + g), blk.limit(a, rwarp + g + 8)}, lim_warp = blk.limit(a, rwarp);
  const float qs = a.scale * 1.4426950408889634f; /* scores in log2 units */

  /* this thread's 16-byte chunk c0 of rows r0, r0 + RSTEP, .. of each K and V tile */
  constexpr int RSTEP = THREADS / CPR;
  const int r0 = tid / CPR, c0 = tid % CPR;
  const uint32_t cofs = (c0 >> 3) * KB;
  const KV *kg = (const KV *)a.k + blk.b * a.ksb + blk.k_begin * a.ks0 + (int64_t)blk.kvh * a.hd + c0 * 8;
  const KV *vg = (const KV *)a.v + blk.b * a.vsb + blk.k_begin * a.vs0 + (int64_t)blk.kvh * a.hd + c0 * 8;
  auto load_tile = [&](int j, int buf) {
    unsigned char *kt = smem + (k_s - q_s) + buf * BN * HD * 2 + cofs, *vt = smem + (v_s - q_s) + buf * BN * HD * 2 + cofs;
    const int key0 = j * BN + r0;
    const KV *kp = kg + (int64_t)key0 * a.ks0, *vp = vg + (int64_t)key0 * a.vs0;
#pragma unroll
    for (int r = r0; r < BN; r += RSTEP) {
      const bool ok = key0 - r0 + r < nkeys; /* rows past kmax become zeros (masked, never NaN) */
      cp_async16(kt + sw128(r, c0 & 7), ok ? kp : kg, ok);
      cp_async16(vt + sw128(r, c0 & 7), ok ? vp : vg, ok);
      kp += RSTEP * a.ks0;
      vp += RSTEP * a.vs0;
    }
  };

  load_tile(0, 0); /* in flight while Q is staged */
  cp_async_commit();

  /* Q of the block, rounded, into the swizzled column blocks */
  for (int e = tid; e < BM * CPR; e += THREADS) {
    const int r = e / CPR, c = e % CPR;
    const float4 *src = reinterpret_cast<const float4 *>(blk.q(a, blk.rblk + r) + c * 8);
    const float4 x = src[0], y = src[1];
    *reinterpret_cast<uint4 *>(smem + (c >> 3) * QB + sw128(r, c & 7)) =
        make_uint4(Mma<KV>::pack(x.x, x.y), Mma<KV>::pack(x.z, x.w), Mma<KV>::pack(y.x, y.y), Mma<KV>::pack(y.z, y.w));
  }

  float o[NO], s[NS];
#pragma unroll
  for (int i = 0; i < NO; i++) o[i] = 0.0f;
  float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.0f, 0.0f};
  uint32_t p[BN / 16][4]; /* weights of the tile whose P V runs: the A fragments of its key steps */

  /* descriptors: the base's, plus a byte offset / 16 in the start address field (addresses stay
   * below 256 KB, so the 14-bit field never carries) */
  const uint64_t qd = wg_desc(q_s + wg * 8192, 16, 1024);
  auto scores = [&](int buf) { /* issues S = Q K^T of the tile in buf */
    const uint64_t kd = wg_desc(k_s + buf * BN * HD * 2, 16, 1024);
    wg_fence();
    Wgmma<KV, BN>::ss0(s, qd, kd);
#pragma unroll
    for (int kk = 1; kk < HD / 16; kk++) { /* step kk: 32 bytes into column block kk / 4 */
      Wgmma<KV, BN>::ss(s, qd + (((kk >> 2) * QB + (kk & 3) * 32) >> 4), kd + (((kk >> 2) * KB + (kk & 3) * 32) >> 4));
    }
    wg_commit();
  };
  auto pv = [&](int buf) { /* issues O += P V of the tile in buf: 16 keys (2048 bytes) a step */
    const uint64_t vd = wg_desc(v_s + buf * BN * HD * 2, KB, 1024);
    wg_fence();
#pragma unroll
    for (int k2 = 0; k2 < BN / 16; k2++) Wgmma<KV, HD>::rs(o, p[k2], vd + k2 * (2048 >> 4));
    wg_commit();
  };
  /* masks and exponentiates the scores of tile j in place; corr rescales O (lrow already is) */
  auto softmax = [&](int j, float (&corr)[2]) {
    const int kbase = j * BN;
    const bool need_mask = kbase + BN > lim_warp;
    /* the row maxima of the visible raw scores (qs > 0 commutes with max) */
    auto hidden = [&](int i) { return kbase + (i >> 2) * 8 + 2 * tq + (i & 1) >= lim[(i >> 1) & 1]; };
    /* four partial maxima and sums a row: short dependency chains for two warps a scheduler */
    float mx4[2][4], ls4[2][4];
#pragma unroll
    for (int h = 0; h < 2; h++)
#pragma unroll
      for (int q = 0; q < 4; q++) {
        mx4[h][q] = -INFINITY;
        ls4[h][q] = 0.0f;
      }
    if (need_mask) {
#pragma unroll
      for (int i = 0; i < NS; i++)
        mx4[(i >> 1) & 1][(i >> 2) & 3] = fmaxf(mx4[(i >> 1) & 1][(i >> 2) & 3], hidden(i) ? -INFINITY : s[i]);
    } else {
#pragma unroll
      for (int i = 0; i < NS; i++) mx4[(i >> 1) & 1][(i >> 2) & 3] = fmaxf(mx4[(i >> 1) & 1][(i >> 2) & 3], s[i]);
    }
    float mx[2];
#pragma unroll
    for (int h = 0; h < 2; h++) mx[h] = fmaxf(fmaxf(mx4[h][0], mx4[h][1]), fmaxf(mx4[h][2], mx4[h][3]));
    /* without splits key 0 (in the first tile) is visible to every row, so the running max is
     * finite from then on; a later chunk may hide all of a row's keys, hence the split guard */
    float nmn[2]; /* minus the new running max, in log2 units */
#pragma unroll
    for (int h = 0; h < 2; h++) {
#pragma unroll
      for (int off = 1; off < 4; off <<= 1) mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], off));
      const float mn = fmaxf(mrow[h], mx[h] * qs);
      corr[h] = SPLIT && mrow[h] == -INFINITY ? 0.0f : exp2f(mrow[h] - mn);
      mrow[h] = mn;
      nmn[h] = -mn;
      lrow[h] *= corr[h];
    }
#pragma unroll
    for (int i = 0; i < NS; i += 2) {
      const int h = (i >> 1) & 1;
      /* a hidden score's weight is 0 by selection (its exponent may be inf - inf with splits) */
      float x0 = exp2f(fmaf(s[i], qs, nmn[h])), x1 = exp2f(fmaf(s[i + 1], qs, nmn[h]));
      if (need_mask) {
        x0 = hidden(i) ? 0.0f : x0;
        x1 = hidden(i + 1) ? 0.0f : x1;
      }
      ls4[h][(i >> 2) & 3] += x0 + x1;
      s[i] = x0;
      s[i + 1] = x1;
    }
#pragma unroll
    for (int h = 0; h < 2; h++) lrow[h] += (ls4[h][0] + ls4[h][1]) + (ls4[h][2] + ls4[h][3]);
  };
  /* the weights, rounded, as the A fragments of P V: scores 8 j + e (j = i / 4) form register
   * (j & 1) * 2 + h of key step j / 2 */
  auto pack = [&]() {
#pragma unroll
    for (int i = 0; i < NS; i += 2) p[i >> 3][((i >> 2) & 1) * 2 + ((i >> 1) & 1)] = Mma<KV>::pack(s[i], s[i + 1]);
  };
  auto rescale = [&](const float (&corr)[2]) {
#pragma unroll
    for (int dn = 0; dn < HD / 8; dn++) {
      o[4 * dn] *= corr[0];
      o[4 * dn + 1] *= corr[0];
      o[4 * dn + 2] *= corr[1];
      o[4 * dn + 3] *= corr[1];
    }
  };
  auto tile_ready = [&]() { /* this thread's copies landed; then every thread's, for wgmma too */
    fence_async_shared();
    __syncthreads();
  };

  float corr[2];
  for (int j = 0; j < ntile; j++) {
    if (j + 1 < ntile) {
      load_tile(j + 1, (j + 1) % STAGES); /* last read by tile j - 2, before the last barrier */
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    tile_ready();
    scores(j % STAGES);
    wg_wait<0>();
    wg_keep(s);
    softmax(j, corr);
    rescale(corr);
    pack();
    pv(j % STAGES);
    wg_wait<0>();
    wg_keep(o);
    wg_keep(p);
  }

#pragma unroll
  for (int h = 0; h < 2; h++) {
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) lrow[h] += __shfl_xor_sync(0xffffffffu, lrow[h], off);
  }
#pragma unroll
  for (int h = 0; h < 2; h++) {
    const int64_t r = rwarp + 8 * h + g;
    if (r >= blk.rows) continue;
    blk.store<HD, SPLIT>(a, r, tq, mrow[h], lrow[h], splits, part_ml, part_acc,
                         [&](int dn) { return make_float2(o[4 * dn + 2 * h], o[4 * dn + 2 * h + 1]); });
  }
#endif
}

template <typename KV, int HD, bool SPLIT>
cudaError_t launch_as(cudaStream_t s, const msh_k_attn *a, int splits, int64_t chunk, float2 *ml, float *acc) {
  constexpr int bytes = sm90_smem_bytes<HD>();
  auto kernel = prefill_sm90_kernel<KV, HD, SPLIT>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e != cudaSuccess) return e;
  kernel<<<prefill_grid(a, BM, splits), 128 * WGS, bytes, s>>>(*a, splits, chunk, ml, acc);
  return cudaGetLastError();
}

/* the unsplit kernel skips the -inf guards that only chunks after the first need */
template <typename KV, int HD>
cudaError_t launch_hd(cudaStream_t s, const msh_k_attn *a, int splits, int64_t chunk, float2 *ml, float *acc) {
  return splits > 1 ? launch_as<KV, HD, true>(s, a, splits, chunk, ml, acc)
                    : launch_as<KV, HD, false>(s, a, splits, chunk, ml, acc);
}

} // namespace

namespace msh {

bool attn_prefill_sm90_available() {
#ifdef MSH_WGMMA
  static int cc_major[64]; /* per device: 0 unknown, else the major compute capability */
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) return false;
  if (dev >= 64) return false;
  if (!cc_major[dev]) {
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
    cc_major[dev] = major > 0 ? major : -1;
  }
  return cc_major[dev] == 9;
#else
  return false;
#endif
}

cudaError_t attn_prefill_sm90(cudaStream_t s, const msh_k_attn *a, int splits, int64_t chunk, float2 *ml,
                              float *acc) {
  if (a->kv_dt == MSH_BF16)
    return a->hd == 64 ? launch_hd<bf16, 64>(s, a, splits, chunk, ml, acc)
                       : launch_hd<bf16, 128>(s, a, splits, chunk, ml, acc);
  return a->hd == 64 ? launch_hd<f16, 64>(s, a, splits, chunk, ml, acc)
                     : launch_hd<f16, 128>(s, a, splits, chunk, ml, acc);
}

} // namespace msh
