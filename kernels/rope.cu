/* rope.cu: rotary position embedding in place on x (T, H, hd) f32, both pair layouts. One thread
 * per (position, pair): the angle is formed in double (large positions keep their precision, as
 * on the CPU), cos and sin are rounded to f32 once and applied to every head. */
#include "msh_kutil.cuh"

using namespace msh;

namespace {

__global__ void rope_kernel(float *x, const int32_t *__restrict__ pos, const float *__restrict__ inv_freq, int64_t T,
                            int64_t H, int64_t hd, int64_t R, int style) {
  int64_t n = T * R, step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += step) {
    int64_t i = e % R, t = e / R;
    double sd, cd;
    sincos((double)pos[t] * (double)inv_freq[i], &sd, &cd);
    float s = (float)sd, c = (float)cd;
    int64_t i0 = style == MSH_ROPE_INTERLEAVED ? 2 * i : i;
    int64_t i1 = style == MSH_ROPE_INTERLEAVED ? 2 * i + 1 : i + R;
    for (int64_t h = 0; h < H; h++) {
      float *v = x + (t * H + h) * hd;
      float v0 = v[i0], v1 = v[i1];
      v[i0] = v0 * c - v1 * s;
      v[i1] = v0 * s + v1 * c;
    }
  }
}

} // namespace

extern "C" cudaError_t msh_k_rope(cudaStream_t s, float *x, const int32_t *pos, const float *inv_freq, int64_t T,
                                  int64_t H, int64_t hd, int64_t R, int style) {
  int64_t n = T * R;
  if (n > 0 && H > 0) rope_kernel<<<grid_for(n, 128), 128, 0, s>>>(x, pos, inv_freq, T, H, hd, R, style);
  return cudaGetLastError();
}
