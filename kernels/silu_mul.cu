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

namespace {
/* out (M, F) = silu(gu[:, :F]) * gu[:, F:] for gu (M, 2F) of type T (f32, or bf16 from a GEMM
 * that wrote 16-bit products): rows on grid y; V = 4 moves four elements a load and a store
 * (F % 4 == 0 and aligned rows). */
template <typename T, typename O, int V>
__global__ void glu_kernel(O *__restrict__ out, const T *__restrict__ gu, int64_t F) {
  const int64_t m = blockIdx.y;
  const T *g = gu + m * 2 * F, *u = g + F;
  O *o = out + m * F;
  const int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i * V < F; i += step) {
    if (V == 4) {
      msh::Vec4<T> a = reinterpret_cast<const msh::Vec4<T> *>(g)[i], b = reinterpret_cast<const msh::Vec4<T> *>(u)[i];
      msh::Vec4<O> r;
#pragma unroll
      for (int j = 0; j < 4; j++) {
        float x = msh::to_f(a.v[j]);
        r.v[j] = msh::from_f<O>(x / (1.0f + expf(-x)) * msh::to_f(b.v[j]));
      }
      reinterpret_cast<msh::Vec4<O> *>(o)[i] = r;
    } else {
      float x = msh::to_f(g[i]);
      o[i] = msh::from_f<O>(x / (1.0f + expf(-x)) * msh::to_f(u[i]));
    }
  }
}

template <typename T, typename O>
cudaError_t glu(cudaStream_t s, O *out, const T *gu, int64_t M, int64_t F) {
  bool v4 = F % 4 == 0 && msh::aligned_vec4<T>(gu) && msh::aligned_vec4<O>(out);
  int v = v4 ? 4 : 1;
  for (int64_t m0 = 0; m0 < M; m0 += 65535) { /* grid y holds 65535 rows a launch */
    int64_t rows = M - m0 < 65535 ? M - m0 : 65535;
    int64_t per_row = (F / v + 255) / 256, want = (132 * 16 + rows - 1) / rows;
    unsigned bx = (unsigned)(per_row < want ? per_row : want);
    if (bx < 1) bx = 1;
    dim3 grid(bx, (unsigned)rows);
    if (v == 4) glu_kernel<T, O, 4><<<grid, 256, 0, s>>>(out + m0 * F, gu + m0 * 2 * F, F);
    else glu_kernel<T, O, 1><<<grid, 256, 0, s>>>(out + m0 * F, gu + m0 * 2 * F, F);
  }
  return cudaGetLastError();
}
} // namespace

extern "C" cudaError_t msh_k_glu(cudaStream_t s, float *out, const float *gu, int64_t M, int64_t F) {
  return glu<float, float>(s, out, gu, M, F);
}

extern "C" cudaError_t msh_k_glu_bf16(cudaStream_t s, float *out, const void *gu, int64_t M, int64_t F) {
  return glu<msh::bf16, float>(s, out, (const msh::bf16 *)gu, M, F);
}

extern "C" cudaError_t msh_k_glu_bf16_to_bf16(cudaStream_t s, void *out, const void *gu, int64_t M, int64_t F) {
  return glu<msh::bf16, msh::bf16>(s, (msh::bf16 *)out, (const msh::bf16 *)gu, M, F);
}
