// randn.cu: fills a contiguous f32/f16/bf16 buffer with mean + std * msh_randn_value(seed, i),
// the same values the host generator gives.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "moonshard.h"
#include "msh_kernels.h"
#include "randn.h"

template <typename T> __device__ inline T from_float(float v);
template <> __device__ inline float from_float<float>(float v) { return v; }
template <> __device__ inline __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__global__ void randn_kernel(T *out, int64_t n, uint64_t seed, float mean, float std) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = from_float<T>(mean + std * msh_randn_value(seed, (uint64_t)i));
}

extern "C" cudaError_t msh_k_randn(cudaStream_t s, void *out, int dt, int64_t n, uint64_t seed, float mean,
                                   float std) {
  if (n <= 0) return cudaSuccess;
  int threads = 256;
  int64_t want = (n + threads - 1) / threads;
  int blocks = (int)(want < 65536 ? want : 65536);
  switch (dt) {
  case MSH_F32: randn_kernel<float><<<blocks, threads, 0, s>>>((float *)out, n, seed, mean, std); break;
  case MSH_F16: randn_kernel<__half><<<blocks, threads, 0, s>>>((__half *)out, n, seed, mean, std); break;
  case MSH_BF16:
    randn_kernel<__nv_bfloat16><<<blocks, threads, 0, s>>>((__nv_bfloat16 *)out, n, seed, mean, std);
    break;
  default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
