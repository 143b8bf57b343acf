/* rmsnorm.cu: out (R, D) = x / sqrt(mean(x^2) + eps) * w, one block per row. */
#include "msh_kutil.cuh"

using namespace msh;

namespace {

template <typename W>
__global__ void __launch_bounds__(512) rmsnorm_kernel(float *out, const float *x, const W *__restrict__ w, int64_t R,
                                                      int64_t D, float eps) {
  __shared__ float red[32];
  pdl_trigger(); /* the projection after the norm may start loading its weights */
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    const float *xr = x + r * D;
    float *orow = out + r * D;
    float ss = 0.0f;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) ss += xr[d] * xr[d];
    ss = block_sum(ss, red);
    float inv = 1.0f / sqrtf(ss / (float)D + eps);
    /* each thread rewrites only the elements it read: safe when out aliases x */
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) orow[d] = xr[d] * inv * to_f(w[d]);
  }
}

template <typename W>
cudaError_t launch(cudaStream_t s, float *out, const float *x, const void *w, int64_t R, int64_t D, float eps) {
  if (R > 0 && D > 0) {
    int threads = D >= 4096 ? 512 : D >= 1024 ? 256 : 128;
    rmsnorm_kernel<W><<<grid_for(R, 1, 1 << 20), threads, 0, s>>>(out, x, (const W *)w, R, D, eps);
  }
  return cudaGetLastError();
}

} // namespace

extern "C" cudaError_t msh_k_rmsnorm(cudaStream_t s, float *out, const float *x, const void *w, int w_dt,
                                     int64_t R, int64_t D, float eps) {
  switch (w_dt) {
  case MSH_F32: return launch<float>(s, out, x, w, R, D, eps);
  case MSH_F16: return launch<f16>(s, out, x, w, R, D, eps);
  case MSH_BF16: return launch<bf16>(s, out, x, w, R, D, eps);
  default: return cudaErrorInvalidValue;
  }
}
