/* cuda_quant.h: block-quantized weights in the CUDA backend (cuda_quant.c). */
#ifndef MSH_CUDA_QUANT_H
#define MSH_CUDA_QUANT_H

#include "cuda_internal.h"

/* Rows of x up to which a quantized matmul takes the GEMV kernel (decode, small batches); more
 * rows dequantize the weights to bf16 a slice at a time and run cuBLAS. */
enum { MSH_CUDA_QGEMV_MAX_M = 16 };

/* out (M, NO) = x (M, K) @ w^T for block-quantized w, with matmul_epi's epilogues (0 store, 1 add,
 * 2 GLU: w (2 NO, K), both products formed in scratch (M, 2 NO) f32 first on the GEMM path).
 * Operands checked by ops.c; M, K, NO > 0. */
msh_status msh_cuda_matmul_quant(msh_cuda_dev *d, float *out, const float *x, const msh_tensor *w, int64_t M,
                                 int64_t K, int64_t NO, int epi, msh_tensor *scratch);

#endif
