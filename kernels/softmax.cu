/* softmax.cu: row-wise softmax / log_softmax over the last dim, one block per row. */
#include "msh_kutil.cuh"

using namespace msh;

namespace {

__global__ void __launch_bounds__(512) softmax_kernel(float *out, const float *x, int64_t R, int64_t N, int log) {
  __shared__ float red[32];
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    const float *xr = x + r * N;
    float *orow = out + r * N;
    float mx = -INFINITY;
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) mx = fmaxf(mx, xr[i]);
    mx = block_max(mx, red);
    float sum = 0.0f;
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) sum += expf(xr[i] - mx);
    sum = block_sum(sum, red);
    if (log) {
      float lse = mx + logf(sum);
      for (int64_t i = threadIdx.x; i < N; i += blockDim.x) orow[i] = xr[i] - lse;
    } else {
      float inv = 1.0f / sum;
      for (int64_t i = threadIdx.x; i < N; i += blockDim.x) orow[i] = expf(xr[i] - mx) * inv;
    }
    __syncthreads();
  }
}

} // namespace

extern "C" cudaError_t msh_k_softmax(cudaStream_t s, float *out, const float *x, int64_t R, int64_t N, int log) {
  if (R > 0 && N > 0) {
    int threads = N >= 8192 ? 512 : N >= 1024 ? 256 : 128;
    softmax_kernel<<<grid_for(R, 1, 1 << 20), threads, 0, s>>>(out, x, R, N, log);
  }
  return cudaGetLastError();
}
