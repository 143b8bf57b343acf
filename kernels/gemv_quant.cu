/* gemv_quant.cu: block-quantized weights on the GPU, dequantized in the kernel (W8A16 / W4A16):
 * the GEMV of decode (x f32, 1 <= M <= 16), a dequantization into a 16-bit GEMM operand (prefill:
 * then cuBLAS), and the embedding gather. Weight dtypes: GGUF's Q8_0, Q4_0, Q4_1 and moonshard's
 * group-wise I8G / I4G (moonshard.h has the layouts). Where MSH_QGEMV_VARIANT picks it, the 4-bit
 * dtypes' GEMV runs on tensor cores instead (gemv_quant_mma.cu, x rounded to f16).
 *
 * GEMV, tiled (the dtypes whose blocks keep 4-byte alignment: Q4_1, I8G, I4G; K / G a multiple of
 * 4 and w 16-byte aligned, so that every row starts 16-byte aligned): a block of 4 warps owns NR
 * weight rows (NR outputs, or NR / 2 for GLU: gate rows and their up rows) and splits K over its
 * warps in tiles of TB blocks (TB * BB bytes of a row, a multiple of 16: about 300 bytes): warp w
 * takes tiles w, w + 4, ... Each warp copies its tile of all NR rows into its own shared memory
 * with 16-byte cp.async (S tiles in flight, no registers held by loads), then reads it back a
 * 4-byte word of quants a lane: lane l of step s takes word s * 32 + l of the tile (block
 * (s * 32 + l) / QW of it, word t = (s * 32 + l) % QW, QW words of quants a block) and the block's
 * scale word. The lane's elements of x (8 for 4-bit dtypes: 4t .. 4t + 3 and H + 4t .. H + 4t + 3
 * of the block; 4 for 8-bit ones) are loaded once a step and meet the same word of all NR rows:
 * x costs 1 / NR of its bytes a weight row instead of 8x the quants' bytes (4-bit). The quants
 * become floats without an int-to-float conversion (a quarter-rate instruction): a byte permute
 * puts the nibble (or the byte, offset to unsigned) under the exponent of 2^23, and one
 * subtraction leaves the exact integer; the block's scale d and min c apply once a word:
 * sum_j (d q_j + c) x_j = d sum_j q_j x_j + c sum_j x_j, the sum of x formed once a step. The
 * warps' sums (traded in halves across the lanes, then added over the warps in shared memory)
 * meet in the epilogue (STORE, ACC, GLU).
 *
 * GEMV, per warp (the other dtypes and shapes: Q8_0 and Q4_0, whose blocks put quants at 2-byte
 * alignment, K not a multiple of 4 G): a block of 4 warps owns 4 output rows, one a warp (GLU: the
 * gate row and its up row in the same warp). A row of weights is read as "pieces" of 4 bytes of
 * quants: 8-bit dtypes, elements 4t .. 4t + 3 of a block; 4-bit ones, bytes 4t .. 4t + 3 hold
 * elements 4t .. 4t + 3 (low nibbles) and H + 4t .. H + 4t + 3 (high; H = G / 2 for I4G, 16 for
 * Q4_0/Q4_1). Lane l takes pieces l, l + 32, ... of the row, so a warp's loads cover consecutive
 * bytes (one block's pieces, then the next block's); the block's scale (and min) is one more
 * 4-byte load that the lanes of a block share. The quants are dequantized in registers and meet
 * the MT rows of x (f32, through the read-only cache) in f32 FMAs; the lanes' sums meet with
 * shuffles. U pieces are loaded before the first is used (loads in flight). GGUF's Q8_0 / Q4_0
 * blocks (34 and 18 bytes) put their quants at 2-byte alignment only: their pieces are two 2-byte
 * loads. */
#include "msh_quant.cuh"

using namespace msh;

/* MSH_QGEMV_VARIANT in the environment (read once; for the benchmarks): 0 the tiled kernel's
 * default shape, 1 the per-warp kernel wherever it applies, 2 .. 4 other shapes of the tiled
 * kernel at M = 1 (NR 4 or 16 rows a block, 2 tiles in flight), 5 and 6 the tensor-core kernel for the
 * 4-bit dtypes (gemv_quant_mma.cu: 16 or 32 weight rows a block). Unset: QV_DEFAULT. */
static constexpr int QV_DEFAULT = 0;
int msh::qgemv_variant() {
  static int v = -1;
  if (v < 0) {
    const char *e = getenv("MSH_QGEMV_VARIANT");
    v = e ? atoi(e) : QV_DEFAULT;
    if (v < 0 || v > 6) v = QV_DEFAULT; /* not a variant: the default */
  }
  return v;
}

namespace {

constexpr int WARPS = QWARPS;
constexpr int U = 4; /* pieces in flight per lane */

/* pieces (4 bytes of quants) per block */
template <int DT> struct QP { enum { P = QL<DT>::BITS == 8 ? QL<DT>::G / 4 : QL<DT>::G / 8 }; };

/* 4 bytes at p: one load where the layout keeps them 4-byte aligned, else two 2-byte loads. */
template <int A4> __device__ __forceinline__ uint32_t ld4(const uint8_t *p) {
  if (A4) return __ldg(reinterpret_cast<const uint32_t *>(p));
  const unsigned short *h = reinterpret_cast<const unsigned short *>(p);
  return (uint32_t)__ldg(h) | (uint32_t)__ldg(h + 1) << 16;
}

/* A block's scale pair: (d, c) with value d * q + c (Q8_0, I8G: c = 0; Q4_0: q unsigned, c = -8 d). */
template <int DT> __device__ __forceinline__ float2 block_scale(const uint8_t *blk) {
  if (DT == MSH_I8G32 || DT == MSH_I8G64 || DT == MSH_I8G128) return make_float2(__ldg(reinterpret_cast<const float *>(blk)), 0.0f);
  if (DT == MSH_Q8_0) return make_float2(half_bits(__ldg(reinterpret_cast<const unsigned short *>(blk))), 0.0f);
  if (DT == MSH_Q4_0) {
    float d = half_bits(__ldg(reinterpret_cast<const unsigned short *>(blk)));
    return make_float2(d, -8.0f * d);
  }
  uint32_t dm = __ldg(reinterpret_cast<const uint32_t *>(blk)); /* Q4_1, I4G: f16 d, f16 m */
  return make_float2(half_bits(dm & 0xffffu), half_bits(dm >> 16));
}

/* One piece's weights as floats: w[0..3] at elements e0 .. e0 + 3, and for 4-bit dtypes w[4..7] at
 * e0 + H .. e0 + H + 3. */
template <int DT> __device__ __forceinline__ void dequant_piece(uint32_t q, float2 sc, float (&w)[8]) {
  if (QL<DT>::BITS == 8) {
#pragma unroll
    for (int i = 0; i < 4; i++) w[i] = sc.x * (float)(int8_t)(q >> (8 * i));
  } else {
#pragma unroll
    for (int i = 0; i < 4; i++) {
      w[i] = fmaf(sc.x, (float)((q >> (8 * i)) & 0xf), sc.y);
      w[i + 4] = fmaf(sc.x, (float)((q >> (8 * i + 4)) & 0xf), sc.y);
    }
  }
}

/* Where piece p of a row lies: the block's bytes and the first element it covers. */
template <int DT> __device__ __forceinline__ void piece_at(int64_t p, int64_t &blk_byte, int64_t &e0, int &qbyte) {
  constexpr int P = QP<DT>::P;
  int64_t b = p / P;
  int t = (int)(p % P);
  blk_byte = b * QL<DT>::BB;
  qbyte = QL<DT>::QOFF + 4 * t;
  e0 = b * QL<DT>::G + 4 * t;
}

template <int DT, int EPI, int MT>
__global__ void __launch_bounds__(WARPS * 32) qgemv_kernel(float *__restrict__ out, const float *__restrict__ x,
                                                           const uint8_t *__restrict__ w, int M, int64_t N,
                                                           int64_t K, int64_t NO) {
  constexpr int R = EPI == GLU ? 2 : 1;
  const int lane = threadIdx.x & 31;
  const int64_t n = (int64_t)blockIdx.x * WARPS + (threadIdx.x >> 5);
  if (n >= NO) return;
  const int64_t row_bytes = K / QL<DT>::G * QL<DT>::BB;
  const int64_t npieces = K / QL<DT>::G * QP<DT>::P;
  const uint8_t *rows[R];
  rows[0] = w + n * row_bytes;
  if (R == 2) rows[R - 1] = w + (NO + n) * row_bytes;
  float acc[R][MT];
#pragma unroll
  for (int r = 0; r < R; r++)
#pragma unroll
    for (int m = 0; m < MT; m++) acc[r][m] = 0.0f;
  for (int64_t p0 = lane; p0 < npieces; p0 += 32 * U) {
    uint32_t q[U][R];
    float2 sc[U][R];
    int64_t e0[U];
#pragma unroll
    for (int u = 0; u < U; u++) {
      int64_t p = p0 + 32 * u, bb;
      int qb;
      if (p >= npieces) p = p0; /* a duplicate load, not used */
      piece_at<DT>(p, bb, e0[u], qb);
#pragma unroll
      for (int r = 0; r < R; r++) {
        q[u][r] = ld4<QL<DT>::ALIGN4>(rows[r] + bb + qb);
        sc[u][r] = block_scale<DT>(rows[r] + bb);
      }
    }
#pragma unroll
    for (int u = 0; u < U; u++) {
      if (p0 + 32 * u >= npieces) break;
      float wv[R][8];
#pragma unroll
      for (int r = 0; r < R; r++) dequant_piece<DT>(q[u][r], sc[u][r], wv[r]);
#pragma unroll
      for (int m = 0; m < MT; m++) {
        if (m >= M) break;
        const float *xm = x + (int64_t)m * K + e0[u];
        float4 a = __ldg(reinterpret_cast<const float4 *>(xm)), b = make_float4(0, 0, 0, 0);
        if (QL<DT>::BITS == 4) b = __ldg(reinterpret_cast<const float4 *>(xm + QL<DT>::H));
#pragma unroll
        for (int r = 0; r < R; r++) {
          float s = acc[r][m];
          s = fmaf(wv[r][0], a.x, s), s = fmaf(wv[r][1], a.y, s), s = fmaf(wv[r][2], a.z, s), s = fmaf(wv[r][3], a.w, s);
          if (QL<DT>::BITS == 4)
            s = fmaf(wv[r][4], b.x, s), s = fmaf(wv[r][5], b.y, s), s = fmaf(wv[r][6], b.z, s), s = fmaf(wv[r][7], b.w, s);
          acc[r][m] = s;
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MT; m++) {
    if (m >= M) break;
    float v = warp_sum(acc[0][m]);
    if (EPI == GLU) {
      float u = warp_sum(acc[R - 1][m]);
      v = v / (1.0f + expf(-v)) * u;
    }
    if (lane == 0) {
      float *o = out + (int64_t)m * NO + n;
      *o = EPI == ACC ? *o + v : v;
    }
  }
}

/* ------------------------------------------------------------------------ tiled GEMV */

/* The tiled kernel's tile of a dtype: TB blocks of a row (TBYTES bytes, a multiple of 16 since BB
 * is 4 times an odd number and TB a multiple of 4), read in STEPS steps of 32 words of quants. */
template <int DT> struct QT {
  enum {
    QW = QP<DT>::P, /* words of quants a block */
    TB = QL<DT>::BITS == 4 ? (512 / QL<DT>::G > 4 ? 512 / QL<DT>::G : 4) : (256 / QL<DT>::G > 4 ? 256 / QL<DT>::G : 4),
    TBYTES = TB * QL<DT>::BB,
    STEPS = TB * QW / 32,
  };
};

/* A word of quants as exact floats (the integers, before the scale): 4-bit dtypes, q[0..3] the low
 * nibbles of bytes 0..3 and q[4..7] the high ones; 8-bit, q[0..3] the signed bytes. A byte permute
 * puts the value under the exponent of 2^23 (0x4b0000vv is 2^23 + vv) and a subtraction removes
 * it: two cheap instructions an element instead of a quarter-rate conversion. */
template <int BITS> __device__ __forceinline__ void quants_f(uint32_t q, float (&f)[8]) {
  if (BITS == 4) {
    const uint32_t lo = q & 0x0f0f0f0fu, hi = (q >> 4) & 0x0f0f0f0fu;
#pragma unroll
    for (int k = 0; k < 4; k++) {
      f[k] = __uint_as_float(__byte_perm(lo, 0x4b000000u, 0x7650u | k)) - 8388608.0f;
      f[k + 4] = __uint_as_float(__byte_perm(hi, 0x4b000000u, 0x7650u | k)) - 8388608.0f;
    }
  } else {
    const uint32_t u = q ^ 0x80808080u; /* signed bytes + 128 */
#pragma unroll
    for (int k = 0; k < 4; k++) f[k] = __uint_as_float(__byte_perm(u, 0x4b000000u, 0x7650u | k)) - 8388736.0f;
  }
}

/* Sums each of V values (a power of two) over the warp. The lanes trade halves of their values
 * (lanes with bit O set keep the upper half of C values and send the lower), V / 2 + V / 4 + ...
 * shuffles instead of 5 V; returns the index of the first value this lane then holds the sum of:
 * v[i] for value base + i, i < max(V / 32, 1) (for V < 32, lanes that differ only in the low
 * log2(32 / V) bits hold the same one). Templates keep every index a constant (v in registers). */
template <int V, int C = V, int O = 16> __device__ __forceinline__ int warp_sum_many(float (&v)[V], int lane) {
  if constexpr (O == 0) {
    return 0;
  } else if constexpr (C == 1) {
    v[0] += __shfl_xor_sync(0xffffffffu, v[0], O);
    return warp_sum_many<V, 1, O / 2>(v, lane);
  } else {
    constexpr int H = C / 2;
    const bool up = (lane & O) != 0;
#pragma unroll
    for (int i = 0; i < H; i++) {
      const float send = up ? v[i] : v[i + H], keep = up ? v[i + H] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, O);
    }
    return (up ? H : 0) + warp_sum_many<V, H, O / 2>(v, lane);
  }
}

/* Stages: at most S tiles in flight a warp, fewer where S of them would pass 48 KB a block. */
/* out (M, NO) (+)= x (M, K) @ w^T with NR weight rows a block (GLU: NR / 2 gate rows and their up
 * rows NO further), K split over the block's warps in tiles; see the file's comment. */
template <int DT, int EPI, int MT, int NR, int S>
__global__ void __launch_bounds__(WARPS * 32, 4)
    qgemv_tiled_kernel(float *__restrict__ out, const float *__restrict__ x, const uint8_t *__restrict__ w, int M,
                       int64_t NO, int64_t K) {
  using L = QL<DT>;
  using T = QT<DT>;
  constexpr int RB = EPI == GLU ? NR / 2 : NR; /* outputs a block */
  constexpr int SN = q_stages(S, NR, MT, T::TBYTES);
  static_assert(SN >= 1, "one tile of every row must fit");
  constexpr int E = L::BITS == 4 ? 8 : 4; /* elements of a word */
  constexpr bool MIN = L::BITS == 4;      /* the blocks carry a min c */
  __shared__ __align__(16) uint8_t stage[WARPS][SN][NR * T::TBYTES];
  __shared__ float part[WARPS][NR * MT];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row0 = (int64_t)blockIdx.x * RB;
  const int64_t nb = K / L::G, row_bytes = nb * L::BB;
  const int64_t ntiles = (nb + T::TB - 1) / T::TB;
  const int cnt = ntiles > warp ? (int)((ntiles - warp + WARPS - 1) / WARPS) : 0; /* this warp's tiles */
  const uint8_t *rows[NR];
  block_rows<EPI>(rows, w, row0, NO, row_bytes);
#pragma unroll
  for (int j = 0; j < SN - 1; j++)
    stage_tile<DT, NR, T::TB>(stage[warp][j], rows, warp + (int64_t)j * WARPS, nb, lane, j < cnt);
  pdl_wait(); /* the first weights are in flight: now x (the previous kernel's) */

  float acc[NR * MT]; /* acc[r * MT + m]: this lane's part of row r's dot with x row m */
#pragma unroll
  for (int i = 0; i < NR * MT; i++) acc[i] = 0.0f;
  for (int j = 0; j < cnt; j++) {
    const int jn = j + SN - 1;
    stage_tile<DT, NR, T::TB>(stage[warp][jn % SN], rows, warp + (int64_t)jn * WARPS, nb, lane, jn < cnt);
    cp_async_wait<SN - 1>(); /* this lane's copies of tile j have landed */
    __syncwarp();            /* and the other lanes' */
    const uint8_t *st = stage[warp][j % SN];
    const int64_t b0 = (warp + (int64_t)j * WARPS) * T::TB;
    const int nwords = (nb - b0 < T::TB ? (int)(nb - b0) : (int)T::TB) * T::QW;
#pragma unroll
    for (int s = 0; s < T::STEPS; s++) {
      const int g = s * 32 + lane, bl = g / T::QW, t = g % T::QW;
      if (g < nwords) { /* lanes past a short last tile sit out */
        float qf[NR][8];
        float2 sc[NR];
#pragma unroll
        for (int r = 0; r < NR; r++) {
          const uint8_t *blk = st + r * T::TBYTES + bl * L::BB;
          quants_f<L::BITS>(*reinterpret_cast<const uint32_t *>(blk + L::QOFF + 4 * t), qf[r]);
          sc[r] = scale_word<DT>(*reinterpret_cast<const uint32_t *>(blk));
        }
        const int64_t e = (b0 + bl) * L::G + 4 * t;
#pragma unroll
        for (int m = 0; m < MT; m++) {
          if (m >= M) break;
          const float *xm = x + (int64_t)m * K + e;
          const float4 a = __ldg(reinterpret_cast<const float4 *>(xm));
          float4 b = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
          if (E == 8) b = __ldg(reinterpret_cast<const float4 *>(xm + L::H));
          const float xv[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
          float xs = 0.0f;
          if (MIN) xs = ((a.x + a.y) + (a.z + a.w)) + ((b.x + b.y) + (b.z + b.w));
#pragma unroll
          for (int r = 0; r < NR; r++) {
            float sq = qf[r][0] * xv[0];
#pragma unroll
            for (int k = 1; k < E; k++) sq = fmaf(qf[r][k], xv[k], sq);
            float a0 = acc[r * MT + m];
            if (MIN) a0 = fmaf(sc[r].y, xs, a0);
            acc[r * MT + m] = fmaf(sc[r].x, sq, a0);
          }
        }
      }
    }
    __syncwarp(); /* every lane is done with the stage before it is refilled */
  }
  cp_async_wait<0>();
  pdl_trigger();

  /* the lanes' sums: traded within the warp, then added over the warps */
  constexpr int V = NR * MT;
  const int base = warp_sum_many<V>(acc, lane);
  if (V >= 32 || (lane & (32 / V - 1)) == 0)
#pragma unroll
    for (int i = 0; i < (V >= 32 ? V / 32 : 1); i++) part[warp][base + i] = acc[i];
  __syncthreads();
  block_store<EPI, NR, MT>(out, part, row0, M, NO);
}

template <int DT, int EPI>
cudaError_t launch_qgemv(cudaStream_t s, float *out, const float *x, const uint8_t *w, int M, int64_t NO, int64_t K) {
  dim3 grid((unsigned)((NO + WARPS - 1) / WARPS)), block(WARPS * 32);
  if (M == 1) qgemv_kernel<DT, EPI, 1><<<grid, block, 0, s>>>(out, x, w, M, NO, K, NO);
  else if (M == 2) qgemv_kernel<DT, EPI, 2><<<grid, block, 0, s>>>(out, x, w, M, NO, K, NO);
  else if (M <= 4) qgemv_kernel<DT, EPI, 4><<<grid, block, 0, s>>>(out, x, w, M, NO, K, NO);
  else if (M <= 8) qgemv_kernel<DT, EPI, 8><<<grid, block, 0, s>>>(out, x, w, M, NO, K, NO);
  else qgemv_kernel<DT, EPI, 16><<<grid, block, 0, s>>>(out, x, w, M, NO, K, NO);
  return cudaGetLastError();
}

template <int DT, int EPI, int MT, int NR, int S>
cudaError_t launch_tiled(cudaStream_t s, float *out, const float *x, const uint8_t *w, int M, int64_t NO, int64_t K) {
  constexpr int RB = EPI == GLU ? NR / 2 : NR;
  const int64_t blocks = (NO + RB - 1) / RB;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  return launch_pdl(qgemv_tiled_kernel<DT, EPI, MT, NR, S>, dim3((unsigned)blocks), dim3(WARPS * 32), 0, s, out, x, w,
                    M, NO, K);
}

/* The tiled kernel by rows of x: 8 weight rows a block up to 2 rows of x (the x of a step meets
 * all of them), 4 from 3 (registers: each row keeps MT sums and its dequantized word), 3 tiles in
 * flight a warp. */
template <int DT, int EPI>
cudaError_t tiled_by_m(cudaStream_t s, float *out, const float *x, const uint8_t *w, int M, int64_t NO, int64_t K) {
  if (M == 1) {
    switch (qgemv_variant()) {
    case 2: return launch_tiled<DT, EPI, 1, 4, 3>(s, out, x, w, M, NO, K);
    case 3: return launch_tiled<DT, EPI, 1, 16, 3>(s, out, x, w, M, NO, K);
    case 4: return launch_tiled<DT, EPI, 1, 8, 2>(s, out, x, w, M, NO, K);
    default: return launch_tiled<DT, EPI, 1, 8, 3>(s, out, x, w, M, NO, K);
    }
  }
  if (M == 2) return launch_tiled<DT, EPI, 2, 8, 3>(s, out, x, w, M, NO, K);
  if (M <= 4) return launch_tiled<DT, EPI, 4, 4, 3>(s, out, x, w, M, NO, K);
  if (M <= 8) return launch_tiled<DT, EPI, 8, 4, 3>(s, out, x, w, M, NO, K);
  return launch_tiled<DT, EPI, 16, 4, 3>(s, out, x, w, M, NO, K);
}

/* The tiled kernel where the dtype and shape allow it (see the file's comment), else the per-warp one. */
template <int DT, int EPI>
cudaError_t qgemv_epi(cudaStream_t s, float *out, const float *x, const uint8_t *w, int M, int64_t NO, int64_t K) {
  if constexpr (QL<DT>::ALIGN4) {
    if (qgemv_variant() != 1 && (K / QL<DT>::G) % 4 == 0 && aligned16(w))
      return tiled_by_m<DT, EPI>(s, out, x, w, M, NO, K);
  }
  return launch_qgemv<DT, EPI>(s, out, x, w, M, NO, K);
}

template <int DT>
cudaError_t qgemv_dt(cudaStream_t s, int epi, float *out, const float *x, const uint8_t *w, int M, int64_t NO,
                     int64_t K) {
  return by_epi(epi, [&](auto e) { return qgemv_epi<DT, decltype(e)::value>(s, out, x, w, M, NO, K); });
}

/* -------------------------------------------------------------------- element by element */

/* Element k of a row of blocks of dtype dt (the prefill dequantization and the embedding gather:
 * not on the decode path, one element a thread). */
__device__ __forceinline__ float dequant_elem(const uint8_t *row, int dt, int64_t k) {
  int G = dt == MSH_I8G64 || dt == MSH_I4G64 ? 64 : dt == MSH_I8G128 || dt == MSH_I4G128 ? 128 : 32;
  int bb, bits8 = dt == MSH_Q8_0 || dt == MSH_I8G32 || dt == MSH_I8G64 || dt == MSH_I8G128;
  switch (dt) {
  case MSH_Q8_0: bb = 34; break;
  case MSH_Q4_0: bb = 18; break;
  case MSH_Q4_1: case MSH_I4G32: bb = 20; break;
  case MSH_I4G64: bb = 36; break;
  case MSH_I4G128: bb = 68; break;
  default: bb = 4 + G; break; /* I8G */
  }
  const uint8_t *blk = row + k / G * bb;
  int j = (int)(k % G);
  if (bits8) {
    if (dt == MSH_Q8_0) return half_bits(*reinterpret_cast<const unsigned short *>(blk)) * (float)(int8_t)blk[2 + j];
    return *reinterpret_cast<const float *>(blk) * (float)(int8_t)blk[4 + j];
  }
  int H = G / 2, qoff = dt == MSH_Q4_0 ? 2 : 4;
  int q = j < H ? (blk[qoff + j] & 0xf) : (blk[qoff + j - H] >> 4);
  float d = half_bits(*reinterpret_cast<const unsigned short *>(blk));
  if (dt == MSH_Q4_0) return d * (float)(q - 8);
  return fmaf(d, (float)q, half_bits(*reinterpret_cast<const unsigned short *>(blk + 2)));
}

template <typename T>
__global__ void dequant_kernel(T *__restrict__ dst, const uint8_t *__restrict__ src, int dt, int64_t rows, int64_t K,
                               int64_t row_bytes) {
  int64_t n = rows * K;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t r = i / K, k = i % K;
    dst[i] = from_f<T>(dequant_elem(src + r * row_bytes, dt, k));
  }
}

__global__ void embedding_q_kernel(float *__restrict__ out, const uint8_t *__restrict__ table, int dt,
                                   const int32_t *__restrict__ ids, int64_t D, int64_t V, int64_t row_bytes,
                                   int32_t *bad) {
  const int64_t t = blockIdx.x;
  const int32_t id = ids[t];
  const bool ok = id >= 0 && id < V;
  if (!ok && threadIdx.x == 0) atomicCAS(bad, 0, (int32_t)(t + 1));
  for (int64_t k = threadIdx.x; k < D; k += blockDim.x)
    out[t * D + k] = ok ? dequant_elem(table + (int64_t)id * row_bytes, dt, k) : 0.0f;
}

int64_t q_row_bytes(int dt, int64_t K) {
  switch (dt) {
  case MSH_Q8_0: return K / 32 * 34;
  case MSH_Q4_0: return K / 32 * 18;
  case MSH_Q4_1: case MSH_I4G32: return K / 32 * 20;
  case MSH_I8G32: return K / 32 * 36;
  case MSH_I8G64: return K / 64 * 68;
  case MSH_I8G128: return K / 128 * 132;
  case MSH_I4G64: return K / 64 * 36;
  case MSH_I4G128: return K / 128 * 68;
  default: return -1;
  }
}

} // namespace

extern "C" cudaError_t msh_k_gemv_quant(cudaStream_t s, int epi, float *out, const float *x, const void *w, int w_dt,
                                        int64_t M, int64_t NO, int64_t K) {
  if (M < 1 || M > 16 || K % 32 != 0 || ((uintptr_t)x & 15) != 0) return cudaErrorNotSupported;
  if (NO == 0 || K == 0) return cudaSuccess;
  const uint8_t *wp = static_cast<const uint8_t *>(w);
  int m = (int)M;
  if (qgemv_mma_takes(w_dt, m, K, w)) return qgemv_mma(s, epi, out, x, wp, w_dt, m, NO, K);
  switch (w_dt) {
  case MSH_Q8_0: return qgemv_dt<MSH_Q8_0>(s, epi, out, x, wp, m, NO, K);
  case MSH_Q4_0: return qgemv_dt<MSH_Q4_0>(s, epi, out, x, wp, m, NO, K);
  case MSH_Q4_1: return qgemv_dt<MSH_Q4_1>(s, epi, out, x, wp, m, NO, K);
  case MSH_I8G32: return qgemv_dt<MSH_I8G32>(s, epi, out, x, wp, m, NO, K);
  case MSH_I8G64: return qgemv_dt<MSH_I8G64>(s, epi, out, x, wp, m, NO, K);
  case MSH_I8G128: return qgemv_dt<MSH_I8G128>(s, epi, out, x, wp, m, NO, K);
  case MSH_I4G32: return qgemv_dt<MSH_I4G32>(s, epi, out, x, wp, m, NO, K);
  case MSH_I4G64: return qgemv_dt<MSH_I4G64>(s, epi, out, x, wp, m, NO, K);
  case MSH_I4G128: return qgemv_dt<MSH_I4G128>(s, epi, out, x, wp, m, NO, K);
  default: return cudaErrorNotSupported;
  }
}

extern "C" cudaError_t msh_k_dequant(cudaStream_t s, void *dst, int dst_dt, const void *src, int src_dt, int64_t rows,
                                     int64_t K) {
  int64_t rb = q_row_bytes(src_dt, K), n = rows * K;
  if (rb < 0) return cudaErrorNotSupported;
  if (n == 0) return cudaSuccess;
  int64_t blocks = (n + 255) / 256;
  unsigned grid = (unsigned)(blocks < 65536 ? blocks : 65536);
  const uint8_t *sp = static_cast<const uint8_t *>(src);
  if (dst_dt == MSH_BF16) dequant_kernel<bf16><<<grid, 256, 0, s>>>(static_cast<bf16 *>(dst), sp, src_dt, rows, K, rb);
  else if (dst_dt == MSH_F16) dequant_kernel<f16><<<grid, 256, 0, s>>>(static_cast<f16 *>(dst), sp, src_dt, rows, K, rb);
  else if (dst_dt == MSH_F32) dequant_kernel<float><<<grid, 256, 0, s>>>(static_cast<float *>(dst), sp, src_dt, rows, K, rb);
  else return cudaErrorNotSupported;
  return cudaGetLastError();
}

extern "C" cudaError_t msh_k_embedding_quant(cudaStream_t s, float *out, const void *table, int table_dt,
                                             const int32_t *ids, int64_t T, int64_t D, int64_t V, int32_t *bad) {
  int64_t rb = q_row_bytes(table_dt, D);
  if (rb < 0) return cudaErrorNotSupported;
  if (T == 0) return cudaSuccess;
  embedding_q_kernel<<<(unsigned)T, 256, 0, s>>>(out, static_cast<const uint8_t *>(table), table_dt, ids, D, V, rb, bad);
  return cudaGetLastError();
}
