/* argmax.cu: out[r] = first index of the largest value of row r (int32, device memory). */
#include "msh_kutil.cuh"

using namespace msh;

namespace {

/* (value, index) with the larger value winning and the smaller index winning ties; NaN never
 * wins (as in the CPU reference, which only moves to strictly larger values). */
__device__ __forceinline__ void better(float &v, int64_t &i, float ov, int64_t oi) {
  if (ov > v || (ov == v && oi < i)) {
    v = ov;
    i = oi;
  }
}

__global__ void __launch_bounds__(512) argmax_kernel(int32_t *out, const float *x, int64_t R, int64_t N) {
  __shared__ float sv[32];
  __shared__ int64_t si[32];
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    const float *xr = x + r * N;
    float v = -INFINITY;
    int64_t idx = N; /* no candidate yet */
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) better(v, idx, xr[i], i);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      float ov = __shfl_xor_sync(0xffffffffu, v, o);
      int64_t oi = __shfl_xor_sync(0xffffffffu, idx, o);
      better(v, idx, ov, oi);
    }
    if (lane == 0) {
      sv[warp] = v;
      si[warp] = idx;
    }
    __syncthreads();
    if (warp == 0) {
      v = lane < nw ? sv[lane] : -INFINITY;
      idx = lane < nw ? si[lane] : N;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, v, o);
        int64_t oi = __shfl_xor_sync(0xffffffffu, idx, o);
        better(v, idx, ov, oi);
      }
      /* a NaN first element is never replaced by the reference either */
      if (lane == 0) out[r] = (int32_t)(idx < N && xr[0] == xr[0] ? idx : 0);
    }
    __syncthreads();
  }
}

} // namespace

extern "C" cudaError_t msh_k_argmax(cudaStream_t s, int32_t *out, const float *x, int64_t R, int64_t N) {
  if (R > 0 && N > 0) {
    int threads = N >= 8192 ? 512 : N >= 1024 ? 256 : 128;
    argmax_kernel<<<grid_for(R, 1, 1 << 20), threads, 0, s>>>(out, x, R, N);
  }
  return cudaGetLastError();
}
