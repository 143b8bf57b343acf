/* copy.cu: element copies with dtype conversion (contiguous, row-strided, any strides), and the
 * row-strided and strided ones of a batch of sequences at row offsets read on the device
 * (set_rows_dyn in CUDA graphs). */
#include "msh_kutil.cuh"

using namespace msh;

namespace {

/* Conversion of one element: through f32 between float types, bit for bit between equal types. */
template <typename D, typename S> struct Cvt {
  static __device__ __forceinline__ D f(S s) { return from_f<D>(to_f(s)); }
};
template <typename T> struct Cvt<T, T> {
  static __device__ __forceinline__ T f(T s) { return s; }
};

template <typename D, typename S>
__global__ void convert_kernel(D *__restrict__ dst, const S *__restrict__ src, int64_t n) {
  int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += step)
    dst[i] = Cvt<D, S>::f(src[i]);
}

/* convert_kernel four elements a thread (n4 groups of 4, pointers aligned to them). */
template <typename D, typename S>
__global__ void convert4_kernel(Vec4<D> *__restrict__ dst, const Vec4<S> *__restrict__ src, int64_t n4) {
  int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n4; i += step) {
    Vec4<S> a = src[i];
    Vec4<D> b;
#pragma unroll
    for (int j = 0; j < 4; j++) b.v[j] = Cvt<D, S>::f(a.v[j]);
    dst[i] = b;
  }
}

/* Elements sequence b of dst moves by when the copy runs: clamp(row0[b], 0, max_row0) rows of
 * `stride` elements (row0[0] for every b when n is 1; 0 without row0). Every thread of a sequence
 * reads the same word, so nothing is written out of bounds whatever it holds. */
struct Shift {
  const int32_t *row0;
  int64_t n, max_row0, stride;
  __device__ __forceinline__ int64_t elements(int64_t b) const {
    if (!row0) return 0;
    int64_t r = row0[n == 1 ? 0 : b];
    r = r < 0 ? 0 : r > max_row0 ? max_row0 : r;
    return r * stride;
  }
};

/* B sequences of `rows` rows of `cols` elements: (b, r, c) at b * bs + r * ld + c. */
template <typename D, typename S>
__global__ void rows_kernel(D *dst, int64_t dst_bs, int64_t dst_ld, const S *src, int64_t src_bs, int64_t src_ld,
                            int64_t B, int64_t rows, int64_t cols, Shift sh) {
  const int64_t nr = B * rows;
  for (int64_t i = blockIdx.y; i < nr; i += gridDim.y) {
    const int64_t b = i / rows, r = i % rows;
    D *d = dst + b * dst_bs + sh.elements(b) + r * dst_ld;
    const S *s = src + b * src_bs + r * src_ld;
    for (int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; c < cols; c += (int64_t)gridDim.x * blockDim.x)
      d[c] = Cvt<D, S>::f(s[c]);
  }
}

struct Geo {
  int ndim;
  int64_t n;
  int64_t shape[MSH_K_MAX_DIMS], ds[MSH_K_MAX_DIMS], ss[MSH_K_MAX_DIMS];
};

/* With a shift, dim 0 is the sequence (the index `rem` holds after the loop). */
template <typename D, typename S> __global__ void strided_kernel(D *dst, const S *src, Geo g, Shift sh) {
  int64_t step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < g.n; i += step) {
    int64_t rem = i, so = 0, dof = 0, b = 0;
    for (int d = g.ndim - 1; d >= 0; d--) {
      int64_t idx = rem % g.shape[d];
      rem /= g.shape[d];
      so += idx * g.ss[d];
      dof += idx * g.ds[d];
      b = idx; /* ends as dim 0's index */
    }
    dst[dof + sh.elements(b)] = Cvt<D, S>::f(src[so]);
  }
}

/* ---------------------------------------------------------------- dtype-pair dispatch */

struct ConvertOp {
  cudaStream_t s;
  void *dst;
  const void *src;
  int64_t n;
  template <typename D, typename S> cudaError_t run() const {
    if (n > 0 && n % 4 == 0 && aligned_vec4<D>(dst) && aligned_vec4<S>(src))
      convert4_kernel<D, S><<<grid_for(n / 4, 256), 256, 0, s>>>((Vec4<D> *)dst, (const Vec4<S> *)src, n / 4);
    else if (n > 0)
      convert_kernel<D, S><<<grid_for(n, 256), 256, 0, s>>>((D *)dst, (const S *)src, n);
    return cudaGetLastError();
  }
};

struct RowsOp {
  cudaStream_t s;
  void *dst;
  int64_t dst_bs, dst_ld;
  const void *src;
  int64_t src_bs, src_ld, B, rows, cols;
  Shift sh;
  template <typename D, typename S> cudaError_t run() const {
    if (B > 0 && rows > 0 && cols > 0) {
      int threads = cols >= 256 ? 256 : (int)((cols + 31) / 32 * 32);
      int64_t nr = B * rows;
      dim3 grid(grid_for(cols, threads, 1024), (unsigned)(nr < 65535 ? nr : 65535));
      rows_kernel<D, S><<<grid, threads, 0, s>>>((D *)dst, dst_bs, dst_ld, (const S *)src, src_bs, src_ld, B, rows,
                                                 cols, sh);
    }
    return cudaGetLastError();
  }
};

struct StridedOp {
  cudaStream_t s;
  void *dst;
  const void *src;
  Geo g;
  Shift sh;
  template <typename D, typename S> cudaError_t run() const {
    if (g.n > 0) strided_kernel<D, S><<<grid_for(g.n, 256), 256, 0, s>>>((D *)dst, (const S *)src, g, sh);
    return cudaGetLastError();
  }
};

template <typename D, typename Op> cudaError_t with_src(int sdt, const Op &op) {
  switch (sdt) {
  case MSH_F32: return op.template run<D, float>();
  case MSH_F16: return op.template run<D, f16>();
  case MSH_BF16: return op.template run<D, bf16>();
  default: return cudaErrorInvalidValue;
  }
}

template <typename Op> cudaError_t dispatch(int ddt, int sdt, const Op &op) {
  if (ddt == sdt) {
    switch (msh_dtype_size(ddt)) {
    case 1: return op.template run<uint8_t, uint8_t>();
    case 2: return op.template run<uint16_t, uint16_t>();
    case 4: return op.template run<uint32_t, uint32_t>();
    default: return cudaErrorInvalidValue;
    }
  }
  switch (ddt) {
  case MSH_F32: return with_src<float>(sdt, op);
  case MSH_F16: return with_src<f16>(sdt, op);
  case MSH_BF16: return with_src<bf16>(sdt, op);
  default: return cudaErrorInvalidValue;
  }
}

} // namespace

extern "C" cudaError_t msh_k_convert(cudaStream_t s, void *dst, int dst_dt, const void *src, int src_dt,
                                     int64_t n) {
  return dispatch(dst_dt, src_dt, ConvertOp{s, dst, src, n});
}

extern "C" cudaError_t msh_k_copy_rows(cudaStream_t s, void *dst, int dst_dt, int64_t dst_ld, const void *src,
                                       int src_dt, int64_t src_ld, int64_t rows, int64_t cols) {
  return dispatch(dst_dt, src_dt, RowsOp{s, dst, 0, dst_ld, src, 0, src_ld, 1, rows, cols, Shift{}});
}

extern "C" cudaError_t msh_k_copy_rows_at(cudaStream_t s, void *dst, int dst_dt, int64_t dst_bs, int64_t dst_ld,
                                          const void *src, int src_dt, int64_t src_bs, int64_t src_ld, int64_t B,
                                          int64_t rows, int64_t cols, const int32_t *row0, int64_t n_row0,
                                          int64_t max_row0) {
  if (!row0 || n_row0 < 1 || (n_row0 != 1 && n_row0 != B) || max_row0 < 0) return cudaErrorInvalidValue;
  return dispatch(dst_dt, src_dt,
                  RowsOp{s, dst, dst_bs, dst_ld, src, src_bs, src_ld, B, rows, cols, Shift{row0, n_row0, max_row0, dst_ld}});
}

static cudaError_t strided(cudaStream_t s, void *dst, int dst_dt, const int64_t *dst_stride, const void *src,
                           int src_dt, const int64_t *src_stride, int ndim, const int64_t *shape, Shift sh) {
  if (ndim < 0 || ndim > MSH_K_MAX_DIMS) return cudaErrorInvalidValue;
  Geo g = {};
  g.ndim = ndim;
  g.n = 1;
  for (int d = 0; d < ndim; d++) {
    g.shape[d] = shape[d];
    g.ds[d] = dst_stride[d];
    g.ss[d] = src_stride[d];
    g.n *= shape[d];
  }
  return dispatch(dst_dt, src_dt, StridedOp{s, dst, src, g, sh});
}

extern "C" cudaError_t msh_k_copy_strided(cudaStream_t s, void *dst, int dst_dt, const int64_t *dst_stride,
                                          const void *src, int src_dt, const int64_t *src_stride, int ndim,
                                          const int64_t *shape) {
  return strided(s, dst, dst_dt, dst_stride, src, src_dt, src_stride, ndim, shape, Shift{});
}

extern "C" cudaError_t msh_k_copy_strided_at(cudaStream_t s, void *dst, int dst_dt, const int64_t *dst_stride,
                                             const void *src, int src_dt, const int64_t *src_stride, int ndim,
                                             const int64_t *shape, const int32_t *row0, int64_t n_row0,
                                             int64_t max_row0) {
  if (ndim < 2 || !row0 || n_row0 < 1 || (n_row0 != 1 && n_row0 != shape[0]) || max_row0 < 0)
    return cudaErrorInvalidValue;
  return strided(s, dst, dst_dt, dst_stride, src, src_dt, src_stride, ndim, shape,
                 Shift{row0, n_row0, max_row0, dst_stride[1]});
}
