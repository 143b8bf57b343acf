/* cpu_matmul.c: out (M, N) = x (M, K) @ w (N, K)^T on the CPU, w f32, f16, bf16 or block-quantized.
 *
 *   M < SKINNY_M (decode, small batches): our own kernel. Threads claim chunks of output columns
 *     (weight rows). M == 1: four weight rows at a time are dotted with x, f16/bf16 widened in
 *     registers. M > 1: the weights go by blocks (widened to f32 once when f16/bf16) that stay in
 *     cache while pairs of x rows pass over them, four weight rows by two x rows at a time.
 *   M >= SKINNY_M (prefill): OpenBLAS sgemm, single-threaded, on each chunk of output columns;
 *     f16/bf16 weights are widened (block-quantized ones, from QUANT_M rows on, dequantized)
 *     block by block into a per-thread f32 scratch first. (Below about 32 rows sgemm's packing
 *     costs more than it saves: measured 2-3x slower at M = 6..8.)
 *   GGUF block-quantized weights with M < QUANT_M: integer dot products in cpu_quant.c; the
 *   group-wise ones (I8G, I4G) go the f32 way, dequantized block by block into scratch.
 * Accumulation is f32 everywhere; widening f16/bf16 to f32 is exact. */
#include "cpu_internal.h"

#include <cblas.h>
#include <omp.h>

#ifndef MSH_CPU_SKINNY_M
#define MSH_CPU_SKINNY_M 32 /* from about here on OpenBLAS sgemm beats our kernel */
#endif

enum {
  SKINNY_M = MSH_CPU_SKINNY_M,
  QUANT_M = 64,          /* block-quantized weights: integer dots below this many rows of x, then
                            sgemm on dequantized blocks (measured on one Zen 3 core, 1536 x 576
                            Q4_1: integers 35.6 GMAC/s at any M; sgemm 30 at M = 32, 36 at 64, 40
                            at 128) */
  GRAIN_MACS = 1 << 16,  /* multiply-adds per thread below which we stay on one thread */
  L1_FLOATS = 6 * 1024,  /* weight floats per block of the skinny kernel (24 KB) */
  L2_FLOATS = 128 * 1024 /* weight floats per widened block of the sgemm path (512 KB) */
};

/* ------------------------------------------------------------------------- dot kernels */

/* y[n] = dot(x, w[n]) for weight rows n in [n0, n1), w (.., K) of dtype dt. dt is a constant at
 * every call site (see the wrappers below), so each dtype gets its own inner loop. */
MSH_CPU_INLINE void gemv_rows(float *y, const float *x, const void *w, int64_t K, int64_t n0, int64_t n1, int dt) {
  int64_t n = n0;
#if MSH_CPU_AVX2
  int64_t K16 = K & ~(int64_t)15, K8 = K & ~(int64_t)7;
  for (; n + 4 <= n1; n += 4) {
    int64_t r0 = n * K, r1 = r0 + K, r2 = r1 + K, r3 = r2 + K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    int64_t k = 0;
    for (; k < K16; k += 16) { /* two sets of accumulators: eight independent FMA chains */
      __m256 xa = _mm256_loadu_ps(x + k), xb = _mm256_loadu_ps(x + k + 8);
      a0 = _mm256_fmadd_ps(msh_cpu_load8(w, r0 + k, dt), xa, a0);
      a1 = _mm256_fmadd_ps(msh_cpu_load8(w, r1 + k, dt), xa, a1);
      a2 = _mm256_fmadd_ps(msh_cpu_load8(w, r2 + k, dt), xa, a2);
      a3 = _mm256_fmadd_ps(msh_cpu_load8(w, r3 + k, dt), xa, a3);
      b0 = _mm256_fmadd_ps(msh_cpu_load8(w, r0 + k + 8, dt), xb, b0);
      b1 = _mm256_fmadd_ps(msh_cpu_load8(w, r1 + k + 8, dt), xb, b1);
      b2 = _mm256_fmadd_ps(msh_cpu_load8(w, r2 + k + 8, dt), xb, b2);
      b3 = _mm256_fmadd_ps(msh_cpu_load8(w, r3 + k + 8, dt), xb, b3);
    }
    for (; k < K8; k += 8) {
      __m256 xa = _mm256_loadu_ps(x + k);
      a0 = _mm256_fmadd_ps(msh_cpu_load8(w, r0 + k, dt), xa, a0);
      a1 = _mm256_fmadd_ps(msh_cpu_load8(w, r1 + k, dt), xa, a1);
      a2 = _mm256_fmadd_ps(msh_cpu_load8(w, r2 + k, dt), xa, a2);
      a3 = _mm256_fmadd_ps(msh_cpu_load8(w, r3 + k, dt), xa, a3);
    }
    float r[4];
    _mm_storeu_ps(r, msh_cpu_hsum4x8(_mm256_add_ps(a0, b0), _mm256_add_ps(a1, b1), _mm256_add_ps(a2, b2),
                                     _mm256_add_ps(a3, b3)));
    for (; k < K; k++) {
      r[0] += x[k] * msh_cpu_load(w, r0 + k, dt);
      r[1] += x[k] * msh_cpu_load(w, r1 + k, dt);
      r[2] += x[k] * msh_cpu_load(w, r2 + k, dt);
      r[3] += x[k] * msh_cpu_load(w, r3 + k, dt);
    }
    memcpy(y + n, r, sizeof r);
  }
  for (; n < n1; n++) {
    int64_t r0 = n * K, k = 0;
    __m256 a0 = _mm256_setzero_ps(), b0 = a0;
    for (; k < K16; k += 16) {
      a0 = _mm256_fmadd_ps(msh_cpu_load8(w, r0 + k, dt), _mm256_loadu_ps(x + k), a0);
      b0 = _mm256_fmadd_ps(msh_cpu_load8(w, r0 + k + 8, dt), _mm256_loadu_ps(x + k + 8), b0);
    }
    for (; k < K8; k += 8) a0 = _mm256_fmadd_ps(msh_cpu_load8(w, r0 + k, dt), _mm256_loadu_ps(x + k), a0);
    float acc = msh_cpu_hsum8(_mm256_add_ps(a0, b0));
    for (; k < K; k++) acc += x[k] * msh_cpu_load(w, r0 + k, dt);
    y[n] = acc;
  }
#else
  for (; n < n1; n++) { /* eight partial sums: a shape compilers vectorize without -ffast-math */
    int64_t r0 = n * K, k = 0;
    float acc[8] = {0};
    for (; k + 8 <= K; k += 8)
      for (int j = 0; j < 8; j++) acc[j] += x[k + j] * msh_cpu_load(w, r0 + k + j, dt);
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; k < K; k++) s += x[k] * msh_cpu_load(w, r0 + k, dt);
    y[n] = s;
  }
#endif
}

static void gemv_f32(float *y, const float *x, const void *w, int64_t K, int64_t n0, int64_t n1) {
  gemv_rows(y, x, w, K, n0, n1, MSH_F32);
}
static void gemv_f16(float *y, const float *x, const void *w, int64_t K, int64_t n0, int64_t n1) {
  gemv_rows(y, x, w, K, n0, n1, MSH_F16);
}
static void gemv_bf16(float *y, const float *x, const void *w, int64_t K, int64_t n0, int64_t n1) {
  gemv_rows(y, x, w, K, n0, n1, MSH_BF16);
}

/* y0[n], y1[n] = dot(x0, w[n]), dot(x1, w[n]) for f32 weight rows n in [0, rows): two rows of x
 * against four weight rows at a time, eight accumulators, so each weight load feeds two FMAs. */
static void gemm2_f32(float *y0, float *y1, const float *x0, const float *x1, const float *w, int64_t K,
                      int64_t rows) {
  int64_t n = 0;
#if MSH_CPU_AVX2
  int64_t K8 = K & ~(int64_t)7;
  for (; n + 4 <= rows; n += 4) {
    const float *w0 = w + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    int64_t k = 0;
    for (; k < K8; k += 8) {
      __m256 xa = _mm256_loadu_ps(x0 + k), xb = _mm256_loadu_ps(x1 + k), v;
      v = _mm256_loadu_ps(w0 + k), a0 = _mm256_fmadd_ps(v, xa, a0), b0 = _mm256_fmadd_ps(v, xb, b0);
      v = _mm256_loadu_ps(w1 + k), a1 = _mm256_fmadd_ps(v, xa, a1), b1 = _mm256_fmadd_ps(v, xb, b1);
      v = _mm256_loadu_ps(w2 + k), a2 = _mm256_fmadd_ps(v, xa, a2), b2 = _mm256_fmadd_ps(v, xb, b2);
      v = _mm256_loadu_ps(w3 + k), a3 = _mm256_fmadd_ps(v, xa, a3), b3 = _mm256_fmadd_ps(v, xb, b3);
    }
    float r0[4], r1[4];
    _mm_storeu_ps(r0, msh_cpu_hsum4x8(a0, a1, a2, a3));
    _mm_storeu_ps(r1, msh_cpu_hsum4x8(b0, b1, b2, b3));
    for (; k < K; k++) {
      r0[0] += x0[k] * w0[k], r1[0] += x1[k] * w0[k];
      r0[1] += x0[k] * w1[k], r1[1] += x1[k] * w1[k];
      r0[2] += x0[k] * w2[k], r1[2] += x1[k] * w2[k];
      r0[3] += x0[k] * w3[k], r1[3] += x1[k] * w3[k];
    }
    memcpy(y0 + n, r0, sizeof r0);
    memcpy(y1 + n, r1, sizeof r1);
  }
#endif
  if (n < rows) { /* the rows left over (all of them without AVX2) */
    gemv_f32(y0, x0, w, K, n, rows);
    gemv_f32(y1, x1, w, K, n, rows);
  }
}

/* ------------------------------------------------------------------------ one thread's part */

typedef struct {
  float *out;     /* (M, N) */
  const float *x; /* (M, K) */
  const void *w;  /* (N, K) */
  int64_t M, N, K;
  int dt;
  int64_t chunk;  /* columns claimed at a time */
  int64_t next;   /* the first column nobody has claimed yet (atomic) */
} mm_args;

/* Small M: columns [n0, n1). M == 1 runs straight through; M > 1 goes by blocks of weight rows that
 * stay in cache (L1 for K up to 1536) while the rows of x pass over them, widened to f32 first when
 * they are f16/bf16, so that each weight is widened once. */
static int skinny_part(const mm_args *a, int64_t n0, int64_t n1) {
  int64_t M = a->M, N = a->N, K = a->K;
  if (M == 1 && !msh_dtype_is_block(a->dt)) {
    if (a->dt == MSH_F32) gemv_f32(a->out, a->x, a->w, K, n0, n1);
    else if (a->dt == MSH_F16) gemv_f16(a->out, a->x, a->w, K, n0, n1);
    else gemv_bf16(a->out, a->x, a->w, K, n0, n1);
    return 0;
  }
  int64_t rows = L1_FLOATS / K;
  rows = rows < 4 ? 4 : rows & ~(int64_t)3;
  float *blk = NULL;
  if (a->dt != MSH_F32 && !(blk = msh_cpu_scratch(0, (size_t)(rows * K)))) return -1;
  for (int64_t b0 = n0; b0 < n1; b0 += rows) {
    int64_t b1 = b0 + rows < n1 ? b0 + rows : n1;
    const float *wb = (const float *)a->w + b0 * K; /* rows b0 .. b1 of w, as f32 */
    if (blk) {
      msh_cpu_row_f32(blk, (const char *)a->w + msh_dtype_bytes(a->dt, b0 * K), a->dt, (b1 - b0) * K);
      wb = blk;
    }
    int64_t m = 0;
    for (; m + 2 <= M; m += 2)
      gemm2_f32(a->out + m * N + b0, a->out + (m + 1) * N + b0, a->x + m * K, a->x + (m + 1) * K, wb, K, b1 - b0);
    if (m < M) gemv_f32(a->out + m * N + b0, a->x + m * K, wb, K, 0, b1 - b0);
  }
  return 0;
}

/* sgemm on columns [n0, n1): out[:, n0:n1] = x @ w[n0:n1]^T. */
static int gemm_part(const mm_args *a, int64_t n0, int64_t n1) {
  int64_t M = a->M, N = a->N, K = a->K;
  if (a->dt == MSH_F32) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)M, (int)(n1 - n0), (int)K, 1.0f, a->x, (int)K,
                (const float *)a->w + n0 * K, (int)K, 0.0f, a->out + n0, (int)N);
    return 0;
  }
  int64_t rows = L2_FLOATS / K;
  rows = rows < 16 ? 16 : rows;
  float *blk = msh_cpu_scratch(0, (size_t)((n1 - n0 < rows ? n1 - n0 : rows) * K));
  if (!blk) return -1;
  for (int64_t b0 = n0; b0 < n1; b0 += rows) {
    int64_t b1 = b0 + rows < n1 ? b0 + rows : n1;
    msh_cpu_row_f32(blk, (const char *)a->w + msh_dtype_bytes(a->dt, b0 * K), a->dt, (b1 - b0) * K);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)M, (int)(b1 - b0), (int)K, 1.0f, a->x, (int)K, blk,
                (int)K, 0.0f, a->out + b0, (int)N);
  }
  return 0;
}

/* Claims chunks of columns until none are left: a thread that runs late (a busy core) simply
 * takes fewer chunks. */
static int run_chunks(mm_args *a, int skinny) {
  int failed = 0;
  for (;;) {
    int64_t n0 = __atomic_fetch_add(&a->next, a->chunk, __ATOMIC_RELAXED);
    if (n0 >= a->N) return failed;
    int64_t n1 = n0 + a->chunk < a->N ? n0 + a->chunk : a->N;
    failed |= skinny ? skinny_part(a, n0, n1) : gemm_part(a, n0, n1);
  }
}

/* ------------------------------------------------------------------------------- entry */

msh_status msh_cpu_matmul(msh_tensor *out, const msh_tensor *x, const msh_tensor *w) {
  mm_args a = {msh_tensor_ptr(out), msh_tensor_ptr(x), msh_tensor_ptr(w), x->shape[0], w->shape[0], x->shape[1],
               w->dtype, 0, 0};
  if (a.M == 0 || a.N == 0) return MSH_OK;
  if (a.K == 0) {
    memset(a.out, 0, sizeof(float) * (size_t)(a.M * a.N));
    return MSH_OK;
  }
  int skinny = a.M < SKINNY_M;
  if (msh_dtype_is_block(a.dt) && !msh_dtype_is_group(a.dt) && a.M < QUANT_M) return msh_cpu_matmul_quant(out, x, w);
  if (!skinny) {
    if (a.M > INT32_MAX || a.N > INT32_MAX || a.K > INT32_MAX)
      return MSH_FAIL(MSH_EUNSUPPORTED, "matmul: dims beyond 2^31 (M %lld, N %lld, K %lld)", (long long)a.M,
                      (long long)a.N, (long long)a.K);
    msh_cpu_blas_init();
  }
  int nt = msh_cpu_threads(a.M * a.N * a.K, GRAIN_MACS);
  if (nt > a.N / 32) nt = a.N >= 64 ? (int)(a.N / 32) : 1; /* at least 32 columns each */
  int failed = 0;
  if (nt <= 1) {
    failed = skinny ? skinny_part(&a, 0, a.N) : gemm_part(&a, 0, a.N);
  } else {
    /* a few chunks a thread (each sgemm call packs x again: fewer there), whole blocks of 16
     * columns (64-byte lines of out) */
    int64_t per = skinny ? 8 * nt : 4 * nt, chunk = (a.N + per - 1) / per;
    a.chunk = (chunk + 15) & ~(int64_t)15;
#pragma omp parallel num_threads(nt) reduction(| : failed)
    failed |= run_chunks(&a, skinny);
  }
  if (failed)
    return MSH_FAIL(MSH_ENOMEM, "matmul: out of memory for the f32 scratch of %s weights (K %lld)",
                    msh_dtype_name(a.dt), (long long)a.K);
  return MSH_OK;
}
