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
