/* silu_mul.cu: out = silu(gate) * up = gate / (1 + exp(-gate)) * up. */
#include "msh_elementwise.cuh"

namespace {
struct SiluMul {
  __device__ __forceinline__ float operator()(float g, float u) const { return g / (1.0f + expf(-g)) * u; }
};
} // namespace

extern "C" cudaError_t msh_k_silu_mul(cudaStream_t s, float *out, const float *g, const float *u, int64_t n) {
  return msh::launch_binary(s, out, g, u, n, SiluMul{});
}

namespace {
__global__ void glu_kernel(float *__restrict__ out, const float *__restrict__ gu, int64_t M, int64_t F) {
  int64_t n = M * F, step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += step) {
    int64_t m = i / F, f = i - m * F;
    float g = gu[m * 2 * F + f], u = gu[m * 2 * F + F + f];
    out[i] = g / (1.0f + expf(-g)) * u;
  }
}
} // namespace

extern "C" cudaError_t msh_k_glu(cudaStream_t s, float *out, const float *gu, int64_t M, int64_t F) {
  if (M * F > 0) glu_kernel<<<msh::grid_for(M * F, 256, 132 * 16), 256, 0, s>>>(out, gu, M, F);
  return cudaGetLastError();
}
