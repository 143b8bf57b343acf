/* msh_kutil.cuh: small device helpers shared by the kernels (CUDA C++ only). */
#ifndef MSH_KUTIL_CUH
#define MSH_KUTIL_CUH

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "moonshard.h"
#include "msh_kernels.h"

namespace msh {

typedef __nv_bfloat16 bf16;
typedef __half f16;

/* ------------------------------------------------------------------ scalar conversions */

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(f16 v) { return __half2float(v); }
__device__ __forceinline__ float to_f(bf16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ f16 from_f<f16>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float v) { return __float2bfloat16_rn(v); }

/* ----------------------------------------------------------------------- vector loads */

/* 16 bytes from read-only global memory that is read once (no L1 allocation). */
__device__ __forceinline__ uint4 ld_stream16(const void *p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

/* 16 bytes through the read-only cache (data that other warps read again). */
__device__ __forceinline__ uint4 ld_nc16(const void *p) { return __ldg(reinterpret_cast<const uint4 *>(p)); }

/* Eight consecutive elements as raw bits: one 16-byte load for 2-byte types, two for f32. */
template <typename T> struct Raw8 {
  uint4 u;
  __device__ __forceinline__ void load_stream(const T *p) { u = ld_stream16(p); }
  __device__ __forceinline__ void load_nc(const T *p) { u = ld_nc16(p); }
  __device__ __forceinline__ void zero() { u = make_uint4(0, 0, 0, 0); }
  __device__ __forceinline__ void to_float(float (&f)[8]) const;
};

template <> __device__ __forceinline__ void Raw8<bf16>::to_float(float (&f)[8]) const {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; i++) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

template <> __device__ __forceinline__ void Raw8<f16>::to_float(float (&f)[8]) const {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; i++) {
    __half2 h;
    memcpy(&h, &w[i], 4);
    float2 v = __half22float2(h);
    f[2 * i] = v.x;
    f[2 * i + 1] = v.y;
  }
}

template <> struct Raw8<float> {
  uint4 a, b;
  __device__ __forceinline__ void load_stream(const float *p) {
    a = ld_stream16(p);
    b = ld_stream16(p + 4);
  }
  __device__ __forceinline__ void load_nc(const float *p) {
    a = ld_nc16(p);
    b = ld_nc16(p + 4);
  }
  __device__ __forceinline__ void zero() { a = b = make_uint4(0, 0, 0, 0); }
  __device__ __forceinline__ void to_float(float (&f)[8]) const {
    f[0] = __uint_as_float(a.x); f[1] = __uint_as_float(a.y);
    f[2] = __uint_as_float(a.z); f[3] = __uint_as_float(a.w);
    f[4] = __uint_as_float(b.x); f[5] = __uint_as_float(b.y);
    f[6] = __uint_as_float(b.z); f[7] = __uint_as_float(b.w);
  }
};

/* Four consecutive elements moved as one load or store (16 bytes for f32, 8 for 16-bit types):
 * the elementwise kernels' unit where pointers are aligned to it. */
template <typename T> struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};
template <typename T> static inline bool aligned_vec4(const void *p) {
  return ((uintptr_t)p % (4 * sizeof(T))) == 0;
}

/* Eight elements from shared memory (16-byte aligned). */
template <typename T> __device__ __forceinline__ void load8_shared(const T *p, float (&f)[8]) {
  Raw8<T> r;
  r.u = *reinterpret_cast<const uint4 *>(p);
  r.to_float(f);
}
template <> __device__ __forceinline__ void load8_shared<float>(const float *p, float (&f)[8]) {
  float4 a = reinterpret_cast<const float4 *>(p)[0], b = reinterpret_cast<const float4 *>(p)[1];
  f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
  f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}

/* ------------------------------------------------------------------- async copies (sm_80+) */

/* 16 bytes global -> shared without registers; zero-fills the destination when !ok. */
__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool ok) {
  unsigned d = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
/* Waits until at most N of this thread's committed groups are still in flight. */
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

/* Eight elements starting at p, element j only where j < valid (zeros elsewhere); scalar loads,
 * for rows that are not 16-byte aligned or not a multiple of 8 long. */
template <typename T> __device__ __forceinline__ void load8_scalar(const T *p, int valid, float (&f)[8]) {
#pragma unroll
  for (int j = 0; j < 8; j++) f[j] = j < valid ? to_f(p[j]) : 0.0f;
}

/* ------------------------------------------------------------------------- reductions */

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

/* Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
 * red must hold 32 floats; the call begins and ends with a barrier, so red can be reused. */
__device__ __forceinline__ float block_sum(float v, float *red) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < nw ? red[lane] : 0.0f;
  return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float *red) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < nw ? red[lane] : -INFINITY;
  return warp_max(v);
}

static inline unsigned grid_for(int64_t n, int threads, int64_t cap = 65535LL * 32) {
  int64_t g = (n + threads - 1) / threads;
  if (g < 1) g = 1;
  return (unsigned)(g > cap ? cap : g);
}

static inline bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

/* Programmatic dependent launch (sm_90): a kernel launched with launch_pdl may start while the
 * kernel before it on the stream is finishing; it must call pdl_wait() before touching anything
 * that kernel (or any earlier one) writes or reads, and may do independent work (loading
 * weights) first. pdl_trigger() in a kernel lets the next one launch once every block of this
 * one has started. Both are no-ops where there is no dependent launch. Dependent launches are off
 * unless MSH_PDL=1 is in the environment: on an H200 they made the Llama-3-8B decode step slower
 * (5.93 against 5.15 ms), the waiting blocks taking SM slots from the kernel they wait for. */
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

static inline bool pdl_on() {
  static int on = -1;
  if (on < 0) {
    const char *e = getenv("MSH_PDL");
    on = e && e[0] == '1';
  }
  return on != 0;
}

template <typename... KArgs, typename... Args>
static inline cudaError_t launch_pdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t s,
                                     Args... args) {
  if (!pdl_on()) {
    kernel<<<grid, block, smem, s>>>(args...);
    return cudaGetLastError();
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, args...);
}

} // namespace msh

#endif
