/* embedding.cu: out (T, D) f32 = table (V, D)[ids], table f32/f16/bf16. */
#include "msh_kutil.cuh"

using namespace msh;

namespace {

template <typename W>
__global__ void embedding_kernel(float *__restrict__ out, const W *__restrict__ table, const int32_t *__restrict__ ids,
                                 int64_t T, int64_t D, int64_t V, int32_t *bad) {
  for (int64_t t = blockIdx.y; t < T; t += gridDim.y) {
    int32_t id = ids[t];
    bool ok = id >= 0 && id < V;
    if (!ok && blockIdx.x == 0 && threadIdx.x == 0) atomicCAS(bad, 0, (int32_t)(t + 1));
    const W *row = table + (ok ? (int64_t)id : 0) * D;
    for (int64_t d = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; d < D; d += (int64_t)gridDim.x * blockDim.x)
      out[t * D + d] = ok ? to_f(row[d]) : 0.0f;
  }
}

template <typename W>
cudaError_t launch(cudaStream_t s, float *out, const void *table, const int32_t *ids, int64_t T, int64_t D,
                   int64_t V, int32_t *bad) {
  if (T > 0 && D > 0) {
    dim3 grid(grid_for(D, 256, 64), (unsigned)(T < 65535 ? T : 65535));
    embedding_kernel<W><<<grid, 256, 0, s>>>(out, (const W *)table, ids, T, D, V, bad);
  }
  return cudaGetLastError();
}

} // namespace

extern "C" cudaError_t msh_k_embedding(cudaStream_t s, float *out, const void *table, int table_dt,
                                       const int32_t *ids, int64_t T, int64_t D, int64_t V, int32_t *bad) {
  switch (table_dt) {
  case MSH_F32: return launch<float>(s, out, table, ids, T, D, V, bad);
  case MSH_F16: return launch<f16>(s, out, table, ids, T, D, V, bad);
  case MSH_BF16: return launch<bf16>(s, out, table, ids, T, D, V, bad);
  default: return cudaErrorInvalidValue;
  }
}
