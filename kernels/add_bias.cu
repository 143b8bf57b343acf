/* add_bias.cu: out (R, N) += b (N), the bias of a projection broadcast over its rows. */
#include "msh_kutil.cuh"

using namespace msh;

namespace {

/* Blocks stride over rows; a block's threads over one row's columns, so b is read with the row's
 * own index (no division per element) and stays in L1/L2 across rows. */
template <typename B>
__global__ void __launch_bounds__(256) add_bias_kernel(float *out, const B *__restrict__ b, int64_t R, int64_t N) {
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    float *orow = out + r * N;
    for (int64_t n = threadIdx.x; n < N; n += blockDim.x) orow[n] += to_f(b[n]);
  }
}

template <typename B> cudaError_t launch(cudaStream_t s, float *out, const void *b, int64_t R, int64_t N) {
  int threads = N >= 256 ? 256 : N >= 128 ? 128 : 64;
  int blocks = (int)(R < 65535 ? R : 65535);
  add_bias_kernel<B><<<blocks, threads, 0, s>>>(out, static_cast<const B *>(b), R, N);
  return cudaGetLastError();
}

} // namespace

extern "C" cudaError_t msh_k_add_bias(cudaStream_t s, float *out, const void *b, int b_dt, int64_t R, int64_t N) {
  if (R <= 0 || N <= 0) return cudaSuccess;
  switch (b_dt) {
  case MSH_F32: return launch<float>(s, out, b, R, N);
  case MSH_F16: return launch<f16>(s, out, b, R, N);
  case MSH_BF16: return launch<bf16>(s, out, b, R, N);
  default: return cudaErrorInvalidValue;
  }
}
