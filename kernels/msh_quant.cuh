/* msh_quant.cuh: the block-quantized weight layouts as compile-time constants, shared by the
 * quantized GEMV kernels (gemv_quant.cu, gemv_quant_mma.cu). CUDA C++ only. */
#ifndef MSH_QUANT_CUH
#define MSH_QUANT_CUH

#include "msh_kutil.cuh"

namespace msh {

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

__device__ __forceinline__ float half_bits(uint32_t h) { return __half2float(__ushort_as_half((unsigned short)h)); }

/* A block's scale word as (d, c), value d * q + c: I8G an f32 d (c = 0); Q4_1 and I4G f16 d, f16 c. */
template <int DT> __device__ __forceinline__ float2 scale_word(uint32_t s) {
  if (QL<DT>::BITS == 8) return make_float2(__uint_as_float(s), 0.0f);
  return make_float2(half_bits(s & 0xffffu), half_bits(s >> 16));
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
