/* msh_quant.cuh: the block-quantized weight layouts as compile-time constants, shared by the
 * quantized GEMV kernels (gemv_quant.cu, gemv_quant_mma.cu). CUDA C++ only. */
#ifndef MSH_QUANT_CUH
#define MSH_QUANT_CUH

#include "msh_kutil.cuh"

#include <type_traits>

namespace msh {

enum Epi { STORE, ACC, GLU };

/* The epilogue chosen at run time (STORE, ACC or GLU) as a compile-time constant: f is called with
 * std::integral_constant<int, EPI>, whose ::value its template takes. */
template <typename F> inline cudaError_t by_epi(int epi, F f) {
  if (epi == ACC) return f(std::integral_constant<int, ACC>{});
  if (epi == GLU) return f(std::integral_constant<int, GLU>{});
  return f(std::integral_constant<int, STORE>{});
}

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

__device__ __forceinline__ float half_bits(uint32_t h) { return __half2float(__ushort_as_half((unsigned short)h)); }

/* A block's scale word as (d, c), value d * q + c: I8G an f32 d (c = 0); Q4_1 and I4G f16 d, f16 c. */
template <int DT> __device__ __forceinline__ float2 scale_word(uint32_t s) {
  if (QL<DT>::BITS == 8) return make_float2(__uint_as_float(s), 0.0f);
  return make_float2(half_bits(s & 0xffffu), half_bits(s >> 16));
}

/* ------------------------------------------------ the tiled and tensor-core GEMVs' blocks */

constexpr int QWARPS = 4; /* warps a block: K is split over them in tiles */

/* Tiles in flight a warp: want, fewer where want tiles of NR rows (TBYTES each) for every warp
 * and the warps' NR x MT partial sums would pass 48 KB of static shared memory a block. */
__host__ __device__ constexpr int q_stages(int want, int nr, int mt, int tbytes) {
  return (48 * 1024 - QWARPS * nr * mt * 4) / (QWARPS * nr * tbytes) < want
             ? (48 * 1024 - QWARPS * nr * mt * 4) / (QWARPS * nr * tbytes)
             : want;
}

/* The NR weight rows of block row0 (GLU: NR / 2 gate rows, then their up rows NO further); rows
 * past the last are duplicates of it, not stored. */
template <int EPI, int NR>
__device__ __forceinline__ void block_rows(const uint8_t *(&rows)[NR], const uint8_t *w, int64_t row0, int64_t NO,
                                           int64_t row_bytes) {
  constexpr int RB = EPI == GLU ? NR / 2 : NR;
#pragma unroll
  for (int r = 0; r < NR; r++) {
    int64_t n = row0 + (EPI == GLU && r >= RB ? r - RB : r);
    if (n >= NO) n = NO - 1;
    rows[r] = w + (EPI == GLU && r >= RB ? NO + n : n) * row_bytes;
  }
}

/* Tile `tile` of each of the NR rows (TB blocks from block tile * TB, or the row's last ones)
 * into dst (NR tiles of TB * BB bytes) with 16-byte cp.async; then commits the group (an empty
 * one past the warp's last tile, so that waiting for all but the last S - 1 groups always means
 * the tile staged S - 1 groups earlier). */
template <int DT, int NR, int TB>
__device__ __forceinline__ void stage_tile(uint8_t *dst, const uint8_t *const (&rows)[NR], int64_t tile, int64_t nb,
                                           int lane, bool any) {
  using L = QL<DT>;
  if (any) {
    const int64_t b0 = tile * TB;
    const int n16 = (nb - b0 < TB ? (int)(nb - b0) : TB) * L::BB / 16;
#pragma unroll
    for (int r = 0; r < NR; r++)
      for (int c = lane; c < n16; c += 32) cp_async16(dst + r * (TB * L::BB) + c * 16, rows[r] + b0 * L::BB + c * 16, true);
  }
  cp_async_commit();
}

/* The block's outputs from the warps' partial sums (part[warp][r * MT + m]: weight row r, x row
 * m): summed over the warps, then stored, added, or for GLU silu(gate) * up. */
template <int EPI, int NR, int MT>
__device__ __forceinline__ void block_store(float *out, const float (*part)[NR * MT], int64_t row0, int M,
                                            int64_t NO) {
  constexpr int RB = EPI == GLU ? NR / 2 : NR;
  for (int i = threadIdx.x; i < RB * MT; i += QWARPS * 32) {
    const int r = i / MT, m = i % MT;
    if (m >= M || row0 + r >= NO) continue;
    float v = 0.0f;
#pragma unroll
    for (int k = 0; k < QWARPS; k++) v += part[k][r * MT + m];
    if (EPI == GLU) {
      float u = 0.0f;
#pragma unroll
      for (int k = 0; k < QWARPS; k++) u += part[k][(r + RB) * MT + m];
      v = v / (1.0f + expf(-v)) * u;
    }
    float *o = out + (int64_t)m * NO + row0 + r;
    *o = EPI == ACC ? *o + v : v;
  }
}

/* MSH_QGEMV_VARIANT in the environment (gemv_quant.cu: the kernel and shape the benchmarks ask for). */
int qgemv_variant();

/* The tensor-core GEMV (gemv_quant_mma.cu): whether it takes out (M, NO) (+)= x (M, K) @ w^T for
 * weights of dtype dt at w (NULL: alignment not asked), and the call. */
bool qgemv_mma_takes(int dt, int M, int64_t K, const void *w);
cudaError_t qgemv_mma(cudaStream_t s, int epi, float *out, const float *x, const uint8_t *w, int dt, int M, int64_t NO,
                      int64_t K);

} // namespace msh

#endif
