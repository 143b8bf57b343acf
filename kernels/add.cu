/* add.cu: out = a + b. */
#include "msh_elementwise.cuh"

namespace {
struct Add {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
} // namespace

extern "C" cudaError_t msh_k_add(cudaStream_t s, float *out, const float *a, const float *b, int64_t n) {
  return msh::launch_binary(s, out, a, b, n, Add{});
}
