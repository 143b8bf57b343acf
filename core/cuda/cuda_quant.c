/* cuda_quant.c: matmul with block-quantized weights (GGUF Q8_0 / Q4_0 / Q4_1, group-wise I8G /
 * I4G) on a GPU, the weights kept as their blocks (W8A16 / W4A16).
 *
 *   M <= MSH_CUDA_QGEMV_MAX_M (decode): msh_k_gemv_quant reads the blocks and dequantizes in
 *     registers (memory-bound: a quarter or half of bf16's bytes).
 *   More rows (prefill): x goes to bf16 once; the weights are dequantized to bf16 a slice of rows
 *     at a time into scratch (at most SLICE_BYTES) and each slice runs through cuBLAS (tensor
 *     cores, f32 accumulation) into its columns of the output. The dequantization costs one
 *     pass over the slice, small against the GEMM's M x K x N at prefill sizes. */
#include "cuda_quant.h"

#include "msh_kernels.h"

#include <limits.h>

enum {
  EPI_ACC = 1,
  EPI_GLU = 2,
  SLICE_BYTES = 64 << 20 /* bf16 weights dequantized at a time */
};

msh_status msh_cuda_matmul_quant(msh_cuda_dev *d, float *out, const float *x, const msh_tensor *w, int64_t M,
                                 int64_t K, int64_t NO, int epi, msh_tensor *scratch) {
  cudaStream_t st = msh_cuda_cur(d);
  int64_t N = w->shape[0];
  if (M <= MSH_CUDA_QGEMV_MAX_M) {
    cudaError_t e = msh_k_gemv_quant(st, epi, out, x, msh_tensor_ptr(w), w->dtype, M, NO, K);
    if (e != cudaErrorNotSupported) {
      CUDA_TRY(e);
      return MSH_OK;
    }
  }
  if (M > INT_MAX || N > INT_MAX || K > INT_MAX)
    return MSH_FAIL(MSH_EUNSUPPORTED, "matmul: dims (%lld, %lld, %lld) exceed the cuBLAS int range", (long long)M,
                    (long long)N, (long long)K);
  int64_t slice = SLICE_BYTES / (2 * K);
  if (slice < 64) slice = 64;
  if (slice > N) slice = N;
  size_t xbytes = ((size_t)(M * K) * 2 + 255) & ~(size_t)255;
  void *buf = NULL;
  msh_status s = msh_cuda_scratch(d, xbytes + (size_t)(slice * K) * 2, &buf);
  if (s != MSH_OK) return s;
  void *x16 = buf, *w16 = (char *)buf + xbytes;
  CUDA_TRY(msh_k_convert(st, x16, MSH_BF16, x, MSH_F32, M * K));
  float *dst = epi == EPI_GLU ? (float *)msh_tensor_ptr(scratch) : out;
  int64_t ldc = epi == EPI_GLU ? N : NO;
  const float one = 1.0f, zero = 0.0f;
  int64_t row_bytes = msh_dtype_bytes(w->dtype, K);
  for (int64_t n0 = 0; n0 < N; n0 += slice) {
    int64_t n = N - n0 < slice ? N - n0 : slice;
    CUDA_TRY(msh_k_dequant(st, w16, MSH_BF16, (const char *)msh_tensor_ptr(w) + n0 * row_bytes, w->dtype, n, K));
    /* column-major view: dst^T (n, M) = w16 (n, K) @ x16^T (K, M) */
    CUBLAS_TRY(cublasGemmEx(msh_cuda_blas(d, st), CUBLAS_OP_T, CUBLAS_OP_N, (int)n, (int)M, (int)K, &one, w16,
                            CUDA_R_16BF, (int)K, x16, CUDA_R_16BF, (int)K, epi == EPI_ACC ? &one : &zero, dst + n0,
                            CUDA_R_32F, (int)ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
  if (epi == EPI_GLU) CUDA_TRY(msh_k_glu(st, out, dst, M, NO));
  return MSH_OK;
}
