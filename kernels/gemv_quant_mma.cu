/* gemv_quant_mma.cu: the decode GEMV of the 4-bit block dtypes on tensor cores (W4A16): out
 * (M, NO) (+)= x (M, K) @ w^T for 1 <= M <= 16, Q4_1 and I4G weights (moonshard.h has the layouts),
 * dequantized in the kernel. Taken where gemv_quant.cu's tiled kernel would be (K / G a multiple of
 * 4, w 16-byte aligned) when MSH_QGEMV_VARIANT picks it (qgemv_variant).
 *
 * x is A of mma.m16n8k16 (its M rows; rows past M repeat row M - 1), rounded to f16 (saturating),
 * and 8 weight rows are B, the quants exact in f16, f32 accumulation.
 * A dot product does not care in which order it meets its k, so the kernel reads the quants in
 * the order the blocks store them and gives x the same order: lane (g, t) takes word t of a
 * 16-byte chunk of weight row g (bytes c + 4t .. c + 4t + 3 of the quants: elements e .. e + 3 in
 * the low nibbles, e + H .. e + H + 3 in the high ones, e = c + 4t); masking the word with
 * 0x000f000f (0x00f000f0) and or-ing 0x64006400 makes two f16 1024 + q (1024 + 16 q) of bytes 0
 * and 2, the word shifted by 8 those of bytes 1 and 3; one f16x2 subtraction (multiply-add) leaves
 * q exact. B's k slots 2t, 2t + 1 take elements e, e + 2 and k slots 2t + 8, 2t + 9 elements
 * e + 1, e + 3 (low nibbles: one mma; high nibbles: a second, x from e + H), and A's fragments
 * of x (two float4 loads a chunk, shared by the NT groups of 8 rows) follow the same order.
 * A block's d and min c apply once a block of G: its chunks' mmas sum q x into a fresh f32 tile,
 * one more mma with B all ones sums x (the f16 values, once for all rows), and each lane adds
 * d sum q x + c sum x for its outputs (rows 2t, 2t + 1 of a group of 8, x rows g and g + 8).
 * The block of 4 warps owns NR = 8 NT weight rows (GLU: NR / 2 gate rows and their up rows) and
 * splits K over its warps in tiles of 4 blocks, staged in shared memory with cp.async as in the
 * tiled kernel (a row's tile is 4 words mod 32 long: the 8 rows' words of a chunk fall in
 * distinct banks). The mma leaves each (x row, weight row) sum in one lane: no shuffles, only
 * the warps' partial sums meet in shared memory. */
#include <type_traits>

#include "msh_mma.cuh"
#include "msh_quant.cuh"

using namespace msh;

namespace {

constexpr int WARPS = QWARPS;

/* The tile: TB blocks of a row, CH chunks of 16 bytes of quants a block. */
template <int DT> struct QM {
  enum { TB = 4, TBYTES = TB * QL<DT>::BB, CH = QL<DT>::G / 32 };
  static_assert((TBYTES / 4) % 8 == 4, "a row's tile must be 4 words mod 32 long");
};

__device__ __forceinline__ uint32_t f16x2_sat(float lo, float hi) {
  uint32_t u;
  asm("cvt.rn.satfinite.f16x2.f32 %0, %1, %2;" : "=r"(u) : "f"(hi), "f"(lo));
  return u;
}

/* A word of nibbles as the two B fragments: lo = {q(e), q(e + 2)}, {q(e + 1), q(e + 3)} (low
 * nibbles), hi the same of the high nibbles, each an f16x2 of exact integers. */
__device__ __forceinline__ void nibbles_f16(uint32_t w, uint32_t (&lo)[2], uint32_t (&hi)[2]) {
  const uint32_t w8 = w >> 8, magic = 0x64006400u;
  uint32_t v[4];
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(v[0]) : "r"(w), "n"(0x000f000f), "r"(magic));
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(v[1]) : "r"(w8), "n"(0x000f000f), "r"(magic));
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(v[2]) : "r"(w), "n"(0x00f000f0), "r"(magic));
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(v[3]) : "r"(w8), "n"(0x00f000f0), "r"(magic));
  const uint32_t sub = 0x64006400u, sixteenth = 0x2c002c00u, m64 = 0xd400d400u; /* 1024, 1/16, -64 */
  asm("sub.f16x2 %0, %1, %2;" : "=r"(lo[0]) : "r"(v[0]), "r"(sub));
  asm("sub.f16x2 %0, %1, %2;" : "=r"(lo[1]) : "r"(v[1]), "r"(sub));
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(hi[0]) : "r"(v[2]), "r"(sixteenth), "r"(m64));
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(hi[1]) : "r"(v[3]), "r"(sixteenth), "r"(m64));
}

/* GW: void, or the type of an RMSNorm weight folded in (M = 1: x is the raw residual, each block
 * forms its inverse RMS first and x̂ = x inv gw goes to f16, as msh_k_rmsnorm then this GEMV). */
template <int DT, int EPI, int MT, int NT, int S, typename GW = void>
__global__ void __launch_bounds__(WARPS * 32)
    qgemv_mma_kernel(float *__restrict__ out, const float *__restrict__ x, const uint8_t *__restrict__ w, int M,
                     int64_t NO, int64_t K, const void *__restrict__ gwp, float eps) {
  constexpr bool NORM = !std::is_void<GW>::value;
  using L = QL<DT>;
  using T = QM<DT>;
  constexpr int NR = 8 * NT, RB = EPI == GLU ? NR / 2 : NR;
  __shared__ __align__(16) uint8_t stage[WARPS][S][NR * T::TBYTES];
  __shared__ float part[WARPS][NR * MT];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int64_t row0 = (int64_t)blockIdx.x * RB;
  const int64_t nb = K / L::G, row_bytes = nb * L::BB;
  const int64_t ntiles = (nb + T::TB - 1) / T::TB;
  const int cnt = ntiles > warp ? (int)((ntiles - warp + WARPS - 1) / WARPS) : 0;
  const uint8_t *rows[NR];
  block_rows<EPI>(rows, w, row0, NO, row_bytes);
  /* x rows g and g + 8 of the A fragments (rows past M repeat the last) */
  const float *xg = x + (int64_t)(g < M ? g : M - 1) * K;
  const float *xg8 = x + (int64_t)(g + 8 < M ? g + 8 : M - 1) * K;
#pragma unroll
  for (int j = 0; j < S - 1; j++)
    stage_tile<DT, NR, T::TB>(stage[warp][j], rows, warp + (int64_t)j * WARPS, nb, lane, j < cnt);
  pdl_wait(); /* the first weights are in flight: now x (the previous kernel's) */
  float inv = 1.0f;
  if constexpr (NORM) { /* the row's inverse RMS, over the block (x row 0, 16-byte aligned) */
    __shared__ float red[32];
    float ss = 0.0f;
    for (int64_t k = 4 * (int64_t)threadIdx.x; k < K; k += 4 * WARPS * 32) {
      const float4 v = __ldg(reinterpret_cast<const float4 *>(x + k));
      ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    ss = block_sum(ss, red);
    inv = 1.0f / sqrtf(ss / (float)K + eps);
  }

  float acc[NT][4];
#pragma unroll
  for (int i = 0; i < NT; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
  const uint32_t ones = 0x3c003c00u;
  for (int j = 0; j < cnt; j++) {
    const int jn = j + S - 1;
    stage_tile<DT, NR, T::TB>(stage[warp][jn % S], rows, warp + (int64_t)jn * WARPS, nb, lane, jn < cnt);
    cp_async_wait<S - 1>();
    __syncwarp();
    const uint8_t *st = stage[warp][j % S];
    const int64_t b0 = (warp + (int64_t)j * WARPS) * T::TB;
    const int nbl = nb - b0 < T::TB ? (int)(nb - b0) : (int)T::TB;
    for (int bl = 0; bl < nbl; bl++) { /* the same for every lane of the warp */
      float dq[NT][4], dx[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int i = 0; i < NT; i++) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.0f;
#pragma unroll
      for (int ch = 0; ch < T::CH; ch++) {
        const int64_t e = (b0 + bl) * L::G + 16 * ch + 4 * t;
        float4 xa = __ldg(reinterpret_cast<const float4 *>(xg + e));
        float4 xb = __ldg(reinterpret_cast<const float4 *>(xg + e + L::H));
        if constexpr (NORM) {
          const GW *gw = static_cast<const GW *>(gwp);
          xa = make_float4(xa.x * inv * to_f(gw[e]), xa.y * inv * to_f(gw[e + 1]), xa.z * inv * to_f(gw[e + 2]),
                           xa.w * inv * to_f(gw[e + 3]));
          const int64_t eh = e + L::H;
          xb = make_float4(xb.x * inv * to_f(gw[eh]), xb.y * inv * to_f(gw[eh + 1]), xb.z * inv * to_f(gw[eh + 2]),
                           xb.w * inv * to_f(gw[eh + 3]));
        }
        uint32_t alo[4], ahi[4];
        alo[0] = f16x2_sat(xa.x, xa.z), alo[2] = f16x2_sat(xa.y, xa.w);
        ahi[0] = f16x2_sat(xb.x, xb.z), ahi[2] = f16x2_sat(xb.y, xb.w);
        if (MT > 8) {
          const float4 ya = __ldg(reinterpret_cast<const float4 *>(xg8 + e));
          const float4 yb = __ldg(reinterpret_cast<const float4 *>(xg8 + e + L::H));
          alo[1] = f16x2_sat(ya.x, ya.z), alo[3] = f16x2_sat(ya.y, ya.w);
          ahi[1] = f16x2_sat(yb.x, yb.z), ahi[3] = f16x2_sat(yb.y, yb.w);
        } else {
          alo[1] = alo[0], alo[3] = alo[2], ahi[1] = ahi[0], ahi[3] = ahi[2];
        }
        Mma<f16>::run(dx, alo, ones, ones);
        Mma<f16>::run(dx, ahi, ones, ones);
#pragma unroll
        for (int i = 0; i < NT; i++) {
          const uint32_t q =
              *reinterpret_cast<const uint32_t *>(st + (8 * i + g) * T::TBYTES + bl * L::BB + L::QOFF + 16 * ch + 4 * t);
          uint32_t lo[2], hi[2];
          nibbles_f16(q, lo, hi);
          Mma<f16>::run(dq[i], alo, lo[0], lo[1]);
          Mma<f16>::run(dq[i], ahi, hi[0], hi[1]);
        }
      }
      /* d sum q x + c sum x for this lane's weight rows 8 i + 2t, 8 i + 2t + 1 */
#pragma unroll
      for (int i = 0; i < NT; i++) {
        const uint8_t *sb = st + (8 * i + 2 * t) * T::TBYTES + bl * L::BB;
        const float2 s0 = scale_word<DT>(*reinterpret_cast<const uint32_t *>(sb));
        const float2 s1 = scale_word<DT>(*reinterpret_cast<const uint32_t *>(sb + T::TBYTES));
        acc[i][0] = fmaf(s0.x, dq[i][0], fmaf(s0.y, dx[0], acc[i][0]));
        acc[i][1] = fmaf(s1.x, dq[i][1], fmaf(s1.y, dx[1], acc[i][1]));
        if (MT > 8) {
          acc[i][2] = fmaf(s0.x, dq[i][2], fmaf(s0.y, dx[2], acc[i][2]));
          acc[i][3] = fmaf(s1.x, dq[i][3], fmaf(s1.y, dx[3], acc[i][3]));
        }
      }
    }
    __syncwarp(); /* every lane is done with the stage before it is refilled */
  }
  cp_async_wait<0>();
  pdl_trigger();

  /* lane (g, t) holds x row g (and g + 8) against weight rows 8 i + 2t, 8 i + 2t + 1 */
#pragma unroll
  for (int i = 0; i < NT; i++) {
    const int r0 = (8 * i + 2 * t) * MT;
    part[warp][r0 + g] = acc[i][0];
    part[warp][r0 + MT + g] = acc[i][1];
    if (MT > 8) {
      part[warp][r0 + g + 8] = acc[i][2];
      part[warp][r0 + MT + g + 8] = acc[i][3];
    }
  }
  __syncthreads();
  block_store<EPI, NR, MT>(out, part, row0, M, NO);
}

template <int DT, int EPI, int MT, int NT, typename GW = void>
cudaError_t launch_mma(cudaStream_t s, float *out, const float *x, const uint8_t *w, int M, int64_t NO, int64_t K,
                       const void *gw = nullptr, float eps = 0.0f) {
  constexpr int RB = EPI == GLU ? 4 * NT : 8 * NT;
  constexpr int S = q_stages(3, 8 * NT, MT, QM<DT>::TBYTES);
  static_assert(S >= 1, "one tile of every row must fit");
  const int64_t blocks = (NO + RB - 1) / RB;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  return launch_pdl(qgemv_mma_kernel<DT, EPI, MT, NT, S, GW>, dim3((unsigned)blocks), dim3(WARPS * 32), 0, s, out, x,
                    w, M, NO, K, gw, eps);
}

template <int DT, int EPI>
cudaError_t mma_by_m(cudaStream_t s, float *out, const float *x, const uint8_t *w, int M, int64_t NO, int64_t K) {
  if (M > 8) return launch_mma<DT, EPI, 16, 2>(s, out, x, w, M, NO, K);
  if (qgemv_variant() == 6) return launch_mma<DT, EPI, 8, 4>(s, out, x, w, M, NO, K);
  return launch_mma<DT, EPI, 8, 2>(s, out, x, w, M, NO, K);
}

template <int DT>
cudaError_t mma_dt(cudaStream_t s, int epi, float *out, const float *x, const uint8_t *w, int M, int64_t NO,
                   int64_t K) {
  return by_epi(epi, [&](auto e) { return mma_by_m<DT, decltype(e)::value>(s, out, x, w, M, NO, K); });
}

template <int DT> bool shape_fits(int64_t K) { return K % QL<DT>::G == 0 && (K / QL<DT>::G) % 4 == 0; }

/* The RMSNorm form (M = 1; STORE and GLU: the projections that follow a norm). */
template <int DT, typename GW>
cudaError_t mma_norm_dt(cudaStream_t s, int epi, float *out, const float *x, const uint8_t *w, const void *gw,
                        float eps, int64_t NO, int64_t K) {
  if (epi == GLU) return launch_mma<DT, GLU, 8, 2, GW>(s, out, x, w, 1, NO, K, gw, eps);
  if (epi == STORE) return launch_mma<DT, STORE, 8, 2, GW>(s, out, x, w, 1, NO, K, gw, eps);
  return cudaErrorNotSupported;
}

template <typename GW>
cudaError_t mma_norm(cudaStream_t s, int epi, float *out, const float *x, const uint8_t *w, int dt, const void *gw,
                     float eps, int64_t NO, int64_t K) {
  switch (dt) {
  case MSH_Q4_1: return mma_norm_dt<MSH_Q4_1, GW>(s, epi, out, x, w, gw, eps, NO, K);
  case MSH_I4G32: return mma_norm_dt<MSH_I4G32, GW>(s, epi, out, x, w, gw, eps, NO, K);
  case MSH_I4G64: return mma_norm_dt<MSH_I4G64, GW>(s, epi, out, x, w, gw, eps, NO, K);
  case MSH_I4G128: return mma_norm_dt<MSH_I4G128, GW>(s, epi, out, x, w, gw, eps, NO, K);
  default: return cudaErrorNotSupported;
  }
}

} // namespace

bool msh::qgemv_mma_takes(int dt, int M, int64_t K, const void *w) {
  const int v = qgemv_variant();
  if (v != 5 && v != 6) return false;
  if (M < 1 || M > 16 || (w && !aligned16(w))) return false;
  switch (dt) {
  case MSH_Q4_1: return shape_fits<MSH_Q4_1>(K);
  case MSH_I4G32: return shape_fits<MSH_I4G32>(K);
  case MSH_I4G64: return shape_fits<MSH_I4G64>(K);
  case MSH_I4G128: return shape_fits<MSH_I4G128>(K);
  default: return false;
  }
}

cudaError_t msh::qgemv_mma(cudaStream_t s, int epi, float *out, const float *x, const uint8_t *w, int dt, int M,
                           int64_t NO, int64_t K) {
  switch (dt) {
  case MSH_Q4_1: return mma_dt<MSH_Q4_1>(s, epi, out, x, w, M, NO, K);
  case MSH_I4G32: return mma_dt<MSH_I4G32>(s, epi, out, x, w, M, NO, K);
  case MSH_I4G64: return mma_dt<MSH_I4G64>(s, epi, out, x, w, M, NO, K);
  case MSH_I4G128: return mma_dt<MSH_I4G128>(s, epi, out, x, w, M, NO, K);
  default: return cudaErrorNotSupported;
  }
}

extern "C" cudaError_t msh_k_gemv_quant_norm(cudaStream_t s, int epi, float *out, const float *x, const void *w,
                                             int w_dt, const void *g, int g_dt, float eps, int64_t NO, int64_t K) {
  if (!qgemv_mma_takes(w_dt, 1, K, w) || ((uintptr_t)x & 15) != 0) return cudaErrorNotSupported;
  if (NO == 0) return cudaSuccess;
  const uint8_t *wp = static_cast<const uint8_t *>(w);
  if (g_dt == MSH_F32) return mma_norm<float>(s, epi, out, x, wp, w_dt, g, eps, NO, K);
  if (g_dt == MSH_BF16) return mma_norm<bf16>(s, epi, out, x, wp, w_dt, g, eps, NO, K);
  if (g_dt == MSH_F16) return mma_norm<f16>(s, epi, out, x, wp, w_dt, g, eps, NO, K);
  return cudaErrorNotSupported;
}
