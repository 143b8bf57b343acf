/* argmax.cu: out[r] = first index of the largest value of row r (int32, device memory).
 *
 * Many rows: one block a row. Few long rows (greedy decode over a vocabulary): each row is cut
 * into PARTS slices, one block a slice; every block leaves its (value, index) in a device table
 * and the last block of a row to finish (a counter in device memory, reset by that block, so a
 * captured graph replays the kernel as it is) reduces the row's slices. On a 128k-entry row one
 * block took ~100 us (ncu, base clocks), mostly waiting on its own loads; 32 slices take 6 us. */
#include "msh_kutil.cuh"

using namespace msh;

namespace {

constexpr int PARTS = 32;     /* slices of a row in the split form */
constexpr int SPLIT_ROWS = 64; /* rows the split form's tables hold */

__device__ float part_v[SPLIT_ROWS * PARTS];
__device__ int64_t part_i[SPLIT_ROWS * PARTS];
__device__ unsigned part_done[SPLIT_ROWS];

/* (value, index) with the larger value winning and the smaller index winning ties; NaN never
 * wins (as in the CPU reference, which only moves to strictly larger values). */
__device__ __forceinline__ void better(float &v, int64_t &i, float ov, int64_t oi) {
  if (ov > v || (ov == v && oi < i)) {
    v = ov;
    i = oi;
  }
}

__device__ __forceinline__ void warp_best(float &v, int64_t &idx) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    float ov = __shfl_xor_sync(0xffffffffu, v, o);
    int64_t oi = __shfl_xor_sync(0xffffffffu, idx, o);
    better(v, idx, ov, oi);
  }
}

/* The block's best over the threads' candidates; valid in warp 0 (lane 0 and every lane). */
__device__ __forceinline__ void block_best(float &v, int64_t &idx, int64_t none, float *sv, int64_t *si) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  warp_best(v, idx);
  if (lane == 0) {
    sv[warp] = v;
    si[warp] = idx;
  }
  __syncthreads();
  if (warp == 0) {
    v = lane < nw ? sv[lane] : -INFINITY;
    idx = lane < nw ? si[lane] : none;
    warp_best(v, idx);
  }
}

/* The row's answer from its best candidate: a NaN first element is never replaced by the
 * reference either. */
__device__ __forceinline__ int32_t answer(const float *xr, int64_t idx, int64_t N) {
  return (int32_t)(idx < N && xr[0] == xr[0] ? idx : 0);
}

__global__ void __launch_bounds__(512) argmax_kernel(int32_t *out, const float *x, int64_t R, int64_t N) {
  __shared__ float sv[32];
  __shared__ int64_t si[32];
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    const float *xr = x + r * N;
    float v = -INFINITY;
    int64_t idx = N; /* no candidate yet */
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) better(v, idx, xr[i], i);
    block_best(v, idx, N, sv, si);
    if (threadIdx.x == 0) out[r] = answer(xr, idx, N);
    __syncthreads();
  }
}

/* grid (PARTS, R), R <= SPLIT_ROWS */
__global__ void __launch_bounds__(256) argmax_split_kernel(int32_t *out, const float *x, int64_t N) {
  __shared__ float sv[32];
  __shared__ int64_t si[32];
  __shared__ bool last;
  const int64_t r = blockIdx.y, part = blockIdx.x;
  const float *xr = x + r * N;
  const int64_t i0 = part * N / PARTS, i1 = (part + 1) * N / PARTS;
  float v = -INFINITY;
  int64_t idx = N;
  for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x) better(v, idx, xr[i], i);
  block_best(v, idx, N, sv, si);
  if (threadIdx.x == 0) {
    part_v[r * PARTS + part] = v;
    part_i[r * PARTS + part] = idx;
    __threadfence(); /* the slice's answer is visible before the count says so */
    last = atomicAdd(&part_done[r], 1u) == PARTS - 1;
  }
  __syncthreads();
  if (!last || threadIdx.x >= 32) return;
  __threadfence();
  const int lane = threadIdx.x;
  v = lane < PARTS ? __ldcg(&part_v[r * PARTS + lane]) : -INFINITY;
  idx = lane < PARTS ? __ldcg(&part_i[r * PARTS + lane]) : N;
  warp_best(v, idx);
  if (lane == 0) {
    out[r] = answer(xr, idx, N);
    part_done[r] = 0; /* ready for the next call (or the next replay of a graph) */
  }
}

} // namespace

extern "C" cudaError_t msh_k_argmax(cudaStream_t s, int32_t *out, const float *x, int64_t R, int64_t N) {
  if (R > 0 && N > 0) {
    /* a block a row leaves most SMs idle until the rows number in the hundreds: one 64k-entry row
     * took 30 us, its 32 slices 5 us */
    if (R <= SPLIT_ROWS && N >= PARTS * 256) {
      argmax_split_kernel<<<dim3(PARTS, (unsigned)R), 256, 0, s>>>(out, x, N);
    } else {
      int threads = N >= 8192 ? 512 : N >= 1024 ? 256 : 128;
      argmax_kernel<<<grid_for(R, 1, 1 << 20), threads, 0, s>>>(out, x, R, N);
    }
  }
  return cudaGetLastError();
}
