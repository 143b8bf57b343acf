/* scale.cu: out = x * v. */
#include "msh_elementwise.cuh"

namespace {
struct Scale {
  float v;
  __device__ __forceinline__ float operator()(float x, float) const { return x * v; }
};
} // namespace

extern "C" cudaError_t msh_k_scale(cudaStream_t s, float *out, const float *x, float v, int64_t n) {
  return msh::launch_binary(s, out, x, x, n, Scale{v});
}
