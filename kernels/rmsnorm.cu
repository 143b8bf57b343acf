/* rmsnorm.cu: out (R, D) = x / sqrt(mean(x^2) + eps) * w, one block per row. */
#include "msh_kutil.cuh"

using namespace msh;

namespace {

template <typename W, typename O>
__global__ void __launch_bounds__(512) rmsnorm_kernel(O *out, const float *x, const W *__restrict__ w, int64_t R,
                                                      int64_t D, float eps) {
  __shared__ float red[32];
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    const float *xr = x + r * D;
    O *orow = out + r * D;
    float ss = 0.0f;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) ss += xr[d] * xr[d];
    ss = block_sum(ss, red);
    float inv = 1.0f / sqrtf(ss / (float)D + eps);
    /* each thread rewrites only the elements it read: safe when out aliases x */
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) orow[d] = from_f<O>(xr[d] * inv * to_f(w[d]));
  }
}

/* rmsnorm_kernel four elements a load (D % 4 == 0, aligned rows): a thread keeps the x it read
 * in registers for the second pass (up to 8 groups, D <= 32 * blockDim). */
template <typename W, typename O>
__global__ void __launch_bounds__(256) rmsnorm4_kernel(O *out, const float *x, const W *__restrict__ w, int64_t R,
                                                       int64_t D, float eps) {
  __shared__ float red[32];
  const int64_t D4 = D / 4;
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    const Vec4<float> *xr = reinterpret_cast<const Vec4<float> *>(x + r * D);
    Vec4<float> xv[8];
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; k++) {
      int64_t d = threadIdx.x + (int64_t)k * blockDim.x;
      if (d < D4) {
        xv[k] = xr[d];
#pragma unroll
        for (int j = 0; j < 4; j++) ss += xv[k].v[j] * xv[k].v[j];
      }
    }
    ss = block_sum(ss, red);
    float inv = 1.0f / sqrtf(ss / (float)D + eps);
    Vec4<O> *orow = reinterpret_cast<Vec4<O> *>(out + r * D);
    const Vec4<W> *wv = reinterpret_cast<const Vec4<W> *>(w);
#pragma unroll
    for (int k = 0; k < 8; k++) {
      int64_t d = threadIdx.x + (int64_t)k * blockDim.x;
      if (d < D4) {
        Vec4<W> g = wv[d];
        Vec4<O> o;
#pragma unroll
        for (int j = 0; j < 4; j++) o.v[j] = from_f<O>(xv[k].v[j] * inv * to_f(g.v[j]));
        orow[d] = o;
      }
    }
    __syncthreads(); /* red is reused by the next row */
  }
}

template <typename W, typename O>
cudaError_t launch(cudaStream_t s, void *out, const float *x, const void *w, int64_t R, int64_t D, float eps) {
  if (R > 0 && D > 0) {
    if (D % 4 == 0 && D <= 32 * 256 && aligned_vec4<float>(x) && aligned_vec4<O>(out) && aligned_vec4<W>(w)) {
      int threads = D / 4 >= 256 ? 256 : (int)((D / 4 + 31) / 32 * 32);
      rmsnorm4_kernel<W, O><<<grid_for(R, 1, 1 << 20), threads, 0, s>>>((O *)out, x, (const W *)w, R, D, eps);
    } else {
      int threads = D >= 4096 ? 512 : D >= 1024 ? 256 : 128;
      rmsnorm_kernel<W, O><<<grid_for(R, 1, 1 << 20), threads, 0, s>>>((O *)out, x, (const W *)w, R, D, eps);
    }
  }
  return cudaGetLastError();
}

template <typename O>
cudaError_t by_weight(cudaStream_t s, void *out, const float *x, const void *w, int w_dt, int64_t R, int64_t D,
                      float eps) {
  switch (w_dt) {
  case MSH_F32: return launch<float, O>(s, out, x, w, R, D, eps);
  case MSH_F16: return launch<f16, O>(s, out, x, w, R, D, eps);
  case MSH_BF16: return launch<bf16, O>(s, out, x, w, R, D, eps);
  default: return cudaErrorInvalidValue;
  }
}

} // namespace

extern "C" cudaError_t msh_k_rmsnorm(cudaStream_t s, float *out, const float *x, const void *w, int w_dt,
                                     int64_t R, int64_t D, float eps) {
  return by_weight<float>(s, out, x, w, w_dt, R, D, eps);
}

extern "C" cudaError_t msh_k_rmsnorm_to(cudaStream_t s, void *out, int out_dt, const float *x, const void *w,
                                        int w_dt, int64_t R, int64_t D, float eps) {
  switch (out_dt) {
  case MSH_F32: return by_weight<float>(s, out, x, w, w_dt, R, D, eps);
  case MSH_F16: return by_weight<f16>(s, out, x, w, w_dt, R, D, eps);
  case MSH_BF16: return by_weight<bf16>(s, out, x, w, w_dt, R, D, eps);
  default: return cudaErrorInvalidValue;
  }
}
