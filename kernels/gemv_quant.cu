/* gemv_quant.cu: block-quantized weights on the GPU, dequantized in the kernel (W8A16 / W4A16):
 * the GEMV of decode (x f32, 1 <= M <= 16), a dequantization into a 16-bit GEMM operand (prefill:
 * then cuBLAS), and the embedding gather. Weight dtypes: GGUF's Q8_0, Q4_0, Q4_1 and moonshard's
 * group-wise I8G / I4G (moonshard.h has the layouts).
 *
 * GEMV: a block of 4 warps owns 4 output rows, one a warp (GLU: the gate row and its up row in the
 * same warp). A row of weights is read as "pieces" of 4 bytes of quants: 8-bit dtypes, elements
 * 4t .. 4t + 3 of a block; 4-bit ones, bytes 4t .. 4t + 3 hold elements 4t .. 4t + 3 (low nibbles)
 * and H + 4t .. H + 4t + 3 (high; H = G / 2 for I4G, 16 for Q4_0/Q4_1). Lane l takes pieces l,
 * l + 32, ... of the row, so a warp's loads cover consecutive bytes (one block's pieces, then the
 * next block's); the block's scale (and min) is one more 4-byte load that the lanes of a block
 * share. The quants are dequantized in registers and meet the MT rows of x (f32, through the
 * read-only cache) in f32 FMAs; the lanes' sums meet with shuffles. U pieces are loaded before
 * the first is used (loads in flight). GGUF's Q8_0 / Q4_0 blocks (34 and 18 bytes) put their
 * quants at 2-byte alignment only: their pieces are two 2-byte loads. */
#include "msh_kutil.cuh"

using namespace msh;

namespace {

constexpr int WARPS = 4;
constexpr int U = 4; /* pieces in flight per lane */

enum Epi { STORE, ACC, GLU };

/* The layout of a weight dtype, as compile-time constants. */
template <int DT> struct QL;
template <> struct QL<MSH_Q8_0> { enum { G = 32, BB = 34, QOFF = 2, BITS = 8, H = 0, ALIGN4 = 0 }; };
template <> struct QL<MSH_Q4_0> { enum { G = 32, BB = 18, QOFF = 2, BITS = 4, H = 16, ALIGN4 = 0 }; };
template <> struct QL<MSH_Q4_1> { enum { G = 32, BB = 20, QOFF = 4, BITS = 4, H = 16, ALIGN4 = 1 }; };
template <> struct QL<MSH_I8G32> { enum { G = 32, BB = 36, QOFF = 4, BITS = 8, H = 0, ALIGN4 = 1 }; };
template <> struct QL<MSH_I8G64> { enum { G = 64, BB = 68, QOFF = 4, BITS = 8, H = 0, ALIGN4 = 1 }; };
template <> struct QL<MSH_I8G128> { enum { G = 128, BB = 132, QOFF = 4, BITS = 8, H = 0, ALIGN4 = 1 }; };
template <> struct QL<MSH_I4G32> { enum { G = 32, BB = 20, QOFF = 4, BITS = 4, H = 16, ALIGN4 = 1 }; };
template <> struct QL<MSH_I4G64> { enum { G = 64, BB = 36, QOFF = 4, BITS = 4, H = 32, ALIGN4 = 1 }; };
template <> struct QL<MSH_I4G128> { enum { G = 128, BB = 68, QOFF = 4, BITS = 4, H = 64, ALIGN4 = 1 }; };

/* pieces (4 bytes of quants) per block */
template <int DT> struct QP { enum { P = QL<DT>::BITS == 8 ? QL<DT>::G / 4 : QL<DT>::G / 8 }; };

__device__ __forceinline__ float half_bits(uint32_t h) { return __half2float(__ushort_as_half((unsigned short)h)); }

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

template <int DT>
cudaError_t qgemv_dt(cudaStream_t s, int epi, float *out, const float *x, const uint8_t *w, int M, int64_t NO,
                     int64_t K) {
  if (epi == ACC) return launch_qgemv<DT, ACC>(s, out, x, w, M, NO, K);
  if (epi == GLU) return launch_qgemv<DT, GLU>(s, out, x, w, M, NO, K);
  return launch_qgemv<DT, STORE>(s, out, x, w, M, NO, K);
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
