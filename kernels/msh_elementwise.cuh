/* msh_elementwise.cuh: one grid-stride loop for the f32 elementwise ops (float4 when aligned). */
#ifndef MSH_ELEMENTWISE_CUH
#define MSH_ELEMENTWISE_CUH

#include "msh_kutil.cuh"

namespace msh {

/* out[i] = F(a[i], b[i]); out may alias a or b (each element is read before it is written by the
 * same thread). */
template <typename F> __global__ void binary_kernel(float *out, const float *a, const float *b, int64_t n, F f, bool vec) {
  int64_t step = (int64_t)gridDim.x * blockDim.x, i0 = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (vec) {
    for (int64_t i = i0; i < n / 4; i += step) {
      float4 x = reinterpret_cast<const float4 *>(a)[i], y = reinterpret_cast<const float4 *>(b)[i];
      reinterpret_cast<float4 *>(out)[i] = make_float4(f(x.x, y.x), f(x.y, y.y), f(x.z, y.z), f(x.w, y.w));
    }
  } else {
    for (int64_t i = i0; i < n; i += step) out[i] = f(a[i], b[i]);
  }
}

template <typename F> cudaError_t launch_binary(cudaStream_t s, float *out, const float *a, const float *b, int64_t n, F f) {
  if (n > 0) {
    bool vec = n % 4 == 0 && aligned16(out) && aligned16(a) && aligned16(b);
    binary_kernel<F><<<grid_for(vec ? n / 4 : n, 256, 132 * 16), 256, 0, s>>>(out, a, b, n, f, vec);
  }
  return cudaGetLastError();
}

} // namespace msh

#endif
