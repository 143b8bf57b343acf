/* cuda_backend.c: the CUDA backend: device memory, copies and ops over validated operands
 * (ops.c checked shapes, dtypes and devices). Every op is queued on the device's current stream
 * and returns without waiting, except where a result must reach the host (argmax, the id check
 * of embedding) or host memory is read or written (upload, download). Those refuse while a graph
 * is being captured on the device (cuda_graph.c); the rest are recorded into it. */
#include "cuda_internal.h"
#include "cuda_quant.h"

#include <limits.h>
#include <string.h>

#include "msh_kernels.h"

/* The state of the device t lives on, made current on this thread. */
static msh_status dev_for(const msh_tensor *t, msh_cuda_dev **d) { return msh_cuda_dev_get(t->st->device_index, d); }

/* ------------------------------------------------------------------------------- memory */

static msh_status cuda_alloc(int device_index, uint64_t bytes, void **out) {
  msh_cuda_dev *d;
  msh_status s = msh_cuda_dev_get(device_index, &d);
  if (s == MSH_OK) s = msh_cuda_check_not_capturing(d, "allocating device memory", __func__);
  if (s != MSH_OK) return s;
  void *p = NULL;
  cudaError_t e = cudaMalloc(&p, (size_t)bytes);
  if (e == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();
    size_t fr = 0, tot = 0;
    (void)cudaMemGetInfo(&fr, &tot);
    (void)cudaGetLastError();
    return MSH_FAIL(MSH_ENOMEM, "cannot allocate %llu bytes (%.2f GiB) on CUDA device %d: %zu bytes (%.2f GiB) free of %zu",
                    (unsigned long long)bytes, (double)bytes / (1 << 30), device_index, fr, (double)fr / (1 << 30), tot);
  }
  CUDA_TRY(e);
  s = msh_cuda_check_at(MSH_CUDA_RT, cudaMemsetAsync(p, 0, (size_t)bytes, msh_cuda_cur(d)), "cudaMemsetAsync", __FILE__,
                        __LINE__, __func__);
  if (s != MSH_OK) {
    cudaFree(p);
    (void)cudaGetLastError();
    return s;
  }
  *out = p;
  return MSH_OK;
}

static void cuda_release(int device_index, void *p) {
  if (!p) return;
  msh_cuda_dev *d;
  if (msh_cuda_dev_get(device_index, &d) != MSH_OK) return;
  msh_cuda_free_later(d, p); /* now, or at the end of a graph capture */
}

static msh_status cuda_upload(int device_index, void *dst, const void *src, uint64_t bytes) {
  msh_cuda_dev *d;
  msh_status s = msh_cuda_dev_get(device_index, &d);
  if (s == MSH_OK) s = msh_cuda_check_not_capturing(d, "copying from the host to the device", __func__);
  if (s != MSH_OK) return s;
  /* through the pinned staging buffers (cuda_staging.c): returns once src has been read, so the
   * caller may free it right away */
  return msh_cuda_upload_bytes(d, dst, src, bytes);
}

static msh_status cuda_download(int device_index, void *dst, const void *src, uint64_t bytes) {
  msh_cuda_dev *d;
  msh_status s = msh_cuda_dev_get(device_index, &d);
  if (s == MSH_OK) s = msh_cuda_check_not_capturing(d, "copying from the device to the host", __func__);
  if (s != MSH_OK) return s;
  if (!bytes) return MSH_OK;
  CUDA_TRY(cudaMemcpyAsync(dst, src, (size_t)bytes, cudaMemcpyDefault, msh_cuda_cur(d)));
  CUDA_TRY(cudaStreamSynchronize(msh_cuda_cur(d)));
  return MSH_OK;
}

/* ------------------------------------------------------------------------------- copies */

/* Copies name no direction (cudaMemcpyDefault: unified addressing tells it from the addresses):
 * a device tensor may be device-mapped host memory (msh_tensor_map_host), whose bytes are on
 * the host although the tensor is this device's. */

static msh_status cuda_copy(msh_tensor *dst, const msh_tensor *src) {
  msh_cuda_dev *d;
  msh_status s = dev_for(dst, &d);
  if (s != MSH_OK) return s;
  int64_t n = msh_tensor_numel(src);
  if (n == 0) return MSH_OK;
  size_t es = msh_dtype_size(src->dtype);
  void *dp = msh_tensor_ptr(dst);
  const void *sp = msh_tensor_ptr(src);
  int dc = msh_tensor_is_contiguous(dst), sc = msh_tensor_is_contiguous(src);
  if (dc && sc) {
    if (dst->dtype == src->dtype)
      CUDA_TRY(cudaMemcpyAsync(dp, sp, (size_t)n * es, cudaMemcpyDefault, msh_cuda_cur(d)));
    else
      CUDA_TRY(msh_k_convert(msh_cuda_cur(d), dp, dst->dtype, sp, src->dtype, n));
    return MSH_OK;
  }
  int64_t dr, dcols, dld, sr, scols, sld;
  if (msh_packed_rows(dst, &dr, &dcols, &dld) && msh_packed_rows(src, &sr, &scols, &sld)) {
    if (dst->dtype == src->dtype)
      CUDA_TRY(cudaMemcpy2DAsync(dp, (size_t)dld * es, sp, (size_t)sld * es, (size_t)dcols * es, (size_t)dr,
                                 cudaMemcpyDefault, msh_cuda_cur(d)));
    else
      CUDA_TRY(msh_k_copy_rows(msh_cuda_cur(d), dp, dst->dtype, dld, sp, src->dtype, sld, dr, dcols));
    return MSH_OK;
  }
  CUDA_TRY(msh_k_copy_strided(msh_cuda_cur(d), dp, dst->dtype, dst->stride, sp, src->dtype, src->stride, src->ndim,
                              src->shape));
  return MSH_OK;
}

/* dst = src on stream st: both on the device (cuda_copy there), or one in host memory (a byte
 * copy of contiguous tensors; ops.c checked). Pageable host memory makes CUDA stage the bytes and
 * return once the host side is done with; pinned memory (msh_tensor_new_pinned) returns at once.
 * During a capture only pinned host memory can be recorded into the graph. */
static msh_status cuda_copy_async(msh_tensor *dst, const msh_tensor *src, void *stream) {
  const msh_tensor *dev_side = dst->st->device == MSH_CUDA ? dst : src;
  msh_cuda_dev *d;
  msh_status s = dev_for(dev_side, &d);
  if (s != MSH_OK) return s;
  cudaStream_t st = stream ? (cudaStream_t)stream : msh_cuda_cur(d);
  if (dst->st->device == src->st->device) { /* the device copy, queued on st instead */
    cudaStream_t *cur = &msh_cuda_tls_stream[d->index], saved = *cur;
    *cur = st;
    s = cuda_copy(dst, src);
    *cur = saved;
    return s;
  }
  const msh_storage *host = dst->st->device == MSH_CPU ? dst->st : src->st;
  if (!host->pinned_by && msh_cuda_stream_capturing(d, st))
    return MSH_FAIL(MSH_EINVAL, "an asynchronous copy %s pageable host memory while a graph is being captured on "
                    "CUDA device %d: only pinned memory (msh_tensor_new_pinned) can be recorded",
                    host == dst->st ? "to" : "from", d->index);
  size_t bytes = (size_t)msh_dtype_bytes(src->dtype, msh_tensor_numel(src));
  if (!bytes) return MSH_OK;
  CUDA_TRY(cudaMemcpyAsync(msh_tensor_ptr(dst), msh_tensor_ptr(src), bytes, cudaMemcpyDefault, st));
  return MSH_OK;
}

/* Dims 2.. packed (row-major): a batch of rows of `cols` contiguous elements. */
static int as_batch_rows(const msh_tensor *t, int64_t *cols) {
  int64_t acc = 1;
  for (int i = t->ndim - 1; i >= 2; i--) {
    if (t->shape[i] != 1 && t->stride[i] != acc) return 0;
    acc *= t->shape[i];
  }
  *cols = acc;
  return 1;
}

/* dst (B, S, ...) rows [r, r + T) of each sequence b = src (B, T, ...), r = row0[b] (or row0[0])
 * clamped into [0, S - T] on the device: rows of packed elements when both tensors are laid out
 * so, else any strides. */
static msh_status cuda_set_rows_dyn(msh_tensor *dst, const msh_tensor *row0, const msh_tensor *src) {
  msh_cuda_dev *d;
  msh_status s = dev_for(dst, &d);
  if (s != MSH_OK) return s;
  if (msh_tensor_numel(src) == 0) return MSH_OK;
  int64_t B = src->shape[0], T = src->shape[1], max_row0 = dst->shape[1] - T, n = msh_tensor_numel(row0);
  const int32_t *r0 = msh_tensor_ptr(row0);
  void *dp = msh_tensor_ptr(dst); /* row 0: the kernel moves each sequence by its r rows */
  const void *sp = msh_tensor_ptr(src);
  int64_t dcols, scols;
  if (as_batch_rows(dst, &dcols) && as_batch_rows(src, &scols)) {
    CUDA_TRY(msh_k_copy_rows_at(msh_cuda_cur(d), dp, dst->dtype, dst->stride[0], dst->stride[1], sp, src->dtype,
                                src->stride[0], src->stride[1], B, T, scols, r0, n, max_row0));
    return MSH_OK;
  }
  CUDA_TRY(msh_k_copy_strided_at(msh_cuda_cur(d), dp, dst->dtype, dst->stride, sp, src->dtype, src->stride, src->ndim,
                                 src->shape, r0, n, max_row0));
  return MSH_OK;
}

/* ---------------------------------------------------------------------------------- ops */

static msh_status cuda_embedding(msh_tensor *out, const msh_tensor *table, const msh_tensor *ids) {
  msh_cuda_dev *d;
  msh_status s = dev_for(out, &d);
  if (s != MSH_OK) return s;
  int64_t T = out->shape[0], D = out->shape[1], V = table->shape[0];
  if (T == 0) return MSH_OK;
  const int32_t *idp = msh_tensor_ptr(ids);
  CUDA_TRY(cudaMemsetAsync(d->dev_words, 0, sizeof(int32_t), msh_cuda_cur(d)));
  if (msh_dtype_is_block(table->dtype)) /* a block-quantized table: rows dequantized on the way */
    CUDA_TRY(msh_k_embedding_quant(msh_cuda_cur(d), msh_tensor_ptr(out), msh_tensor_ptr(table), table->dtype, idp, T,
                                   D, V, d->dev_words));
  else
    CUDA_TRY(msh_k_embedding(msh_cuda_cur(d), msh_tensor_ptr(out), msh_tensor_ptr(table), table->dtype, idp, T, D, V,
                             d->dev_words));
  /* an id outside the table is MSH_ERANGE, as on the CPU: read the flag back, except while a
   * graph is being captured (no host round trip is possible then) */
  enum cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
  CUDA_TRY(cudaStreamIsCapturing(msh_cuda_cur(d), &cap));
  if (cap != cudaStreamCaptureStatusNone) return MSH_OK;
  CUDA_TRY(cudaMemcpyAsync(d->host_words, d->dev_words, sizeof(int32_t), cudaMemcpyDeviceToHost, msh_cuda_cur(d)));
  CUDA_TRY(cudaStreamSynchronize(msh_cuda_cur(d)));
  int32_t bad = d->host_words[0];
  if (bad) {
    int32_t id = 0;
    /* no direction named: ids may be device-mapped host memory (msh_tensor_map_host) */
    CUDA_TRY(cudaMemcpyAsync(d->host_words, idp + (bad - 1), sizeof(int32_t), cudaMemcpyDefault, msh_cuda_cur(d)));
    CUDA_TRY(cudaStreamSynchronize(msh_cuda_cur(d)));
    id = d->host_words[0];
    return MSH_FAIL(MSH_ERANGE, "embedding: id %d at %d outside [0, %lld)", id, bad - 1, (long long)V);
  }
  return MSH_OK;
}

static msh_status cuda_rmsnorm(msh_tensor *out, const msh_tensor *x, const msh_tensor *w, float eps) {
  msh_cuda_dev *d;
  msh_status s = dev_for(out, &d);
  if (s != MSH_OK) return s;
  CUDA_TRY(msh_k_rmsnorm(msh_cuda_cur(d), msh_tensor_ptr(out), msh_tensor_ptr(x), msh_tensor_ptr(w), w->dtype, msh_rows(x),
                         x->shape[x->ndim - 1], eps));
  return MSH_OK;
}

enum { EPI_STORE, EPI_ACC, EPI_GLU }; /* msh_k_gemv_epi's epilogues */
enum { EPI_GLU16 = EPI_GLU + 1 };      /* gemm16's alone: the GLU written in bf16 (bf16 weights) */

/* The cuBLAS half of matmul_epi for 16-bit weights, x16 (M, K) already in w's type. The GLU
 * form has bf16 products written in scratch (half the bytes of f32 ones; the reference model
 * forms them in bf16 too) and f16 ones in f32 (whose range f16 lacks); EPI_GLU16 (bf16 weights)
 * writes the GLU itself in bf16 to op, the operand of a next GEMM. */
static msh_status cublas_dims(int64_t M, int64_t N, int64_t K) {
  if (M > INT_MAX || N > INT_MAX || K > INT_MAX)
    return MSH_FAIL(MSH_EUNSUPPORTED, "matmul: dims (%lld, %lld, %lld) exceed the cuBLAS int range", (long long)M,
                    (long long)N, (long long)K);
  return MSH_OK;
}

static msh_status gemm16(msh_cuda_dev *d, void *op, const void *x16, const msh_tensor *w, int64_t M, int64_t K,
                         int64_t NO, int epi, msh_tensor *scratch) {
  int64_t N = w->shape[0];
  msh_status s = cublas_dims(M, N, K);
  if (s != MSH_OK) return s;
  const float one = 1.0f, zero = 0.0f;
  cudaDataType_t dt = w->dtype == MSH_BF16 ? CUDA_R_16BF : CUDA_R_16F;
  void *dst = op;
  cudaDataType_t ct = CUDA_R_32F;
  if (epi == EPI_GLU || epi == EPI_GLU16) {
    dst = msh_tensor_ptr(scratch);
    if (w->dtype == MSH_BF16) ct = CUDA_R_16BF;
  }
  CUBLAS_TRY(cublasGemmEx(msh_cuda_blas(d, msh_cuda_cur(d)), CUBLAS_OP_T, CUBLAS_OP_N, (int)N, (int)M, (int)K, &one, msh_tensor_ptr(w), dt,
                          (int)K, x16, dt, (int)K, epi == EPI_ACC ? &one : &zero, dst, ct, (int)N,
                          CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  if (epi == EPI_GLU16) CUDA_TRY(msh_k_glu_bf16_to_bf16(msh_cuda_cur(d), op, dst, M, NO));
  else if (epi == EPI_GLU && ct == CUDA_R_16BF) CUDA_TRY(msh_k_glu_bf16(msh_cuda_cur(d), op, dst, M, NO));
  else if (epi == EPI_GLU) CUDA_TRY(msh_k_glu(msh_cuda_cur(d), op, dst, M, NO));
  return MSH_OK;
}

/* out (M, N) = x @ w^T (EPI_STORE), out += x @ w^T (EPI_ACC), or for w (2N, K) stacked gate and up
 * rows silu(x @ gate^T) * (x @ up^T) (EPI_GLU, both products formed in scratch (M, 2N) first
 * unless the GEMV kernel fuses them). GEMV for M <= gemv_max_m, else cuBLAS. */
static msh_status matmul_epi(msh_tensor *out, const msh_tensor *x, const msh_tensor *w, int epi, msh_tensor *scratch) {
  msh_cuda_dev *d;
  msh_status s = dev_for(out, &d);
  if (s != MSH_OK) return s;
  int64_t M = x->shape[0], K = x->shape[1], N = w->shape[0], NO = out->shape[1];
  float *op = msh_tensor_ptr(out);
  const float *xp = msh_tensor_ptr(x);
  const void *wp = msh_tensor_ptr(w);
  if (M == 0 || N == 0) return MSH_OK;
  if (K == 0) {
    if (epi != EPI_ACC) CUDA_TRY(cudaMemsetAsync(op, 0, (size_t)(M * NO) * sizeof(float), msh_cuda_cur(d)));
    return MSH_OK;
  }
  if (msh_dtype_is_block(w->dtype)) return msh_cuda_matmul_quant(d, op, xp, w, M, K, NO, epi, scratch);
  if (M <= d->gemv_max_m) {
    CUDA_TRY(msh_k_gemv_epi(msh_cuda_cur(d), epi, op, xp, wp, w->dtype, M, NO, K));
    return MSH_OK;
  }
  if (w->dtype != MSH_F32) {
    /* 16-bit weights: x goes to the weights' type in scratch, then tensor-core GEMM, fp32 out */
    void *xs = NULL;
    s = msh_cuda_scratch(d, (size_t)(M * K) * 2, &xs);
    if (s != MSH_OK) return s;
    CUDA_TRY(msh_k_convert(msh_cuda_cur(d), xs, w->dtype, xp, MSH_F32, M * K));
    return gemm16(d, op, xs, w, M, K, NO, epi, scratch);
  }
  s = cublas_dims(M, N, K);
  if (s != MSH_OK) return s;
  const float one = 1.0f, zero = 0.0f;
  float *dst = epi == EPI_GLU ? (float *)msh_tensor_ptr(scratch) : op;
  /* column-major view: out^T (N, M) = w^T^T (N, K) @ x^T (K, M) */
  CUBLAS_TRY(cublasSgemm(msh_cuda_blas(d, msh_cuda_cur(d)), CUBLAS_OP_T, CUBLAS_OP_N, (int)N, (int)M, (int)K, &one, wp, (int)K, xp, (int)K,
                         epi == EPI_ACC ? &one : &zero, dst, (int)N));
  if (epi == EPI_GLU) CUDA_TRY(msh_k_glu(msh_cuda_cur(d), op, dst, M, NO));
  return MSH_OK;
}

/* rmsnorm then a projection (moonshard.h): one row folds the norm into the GEMV; more rows are
 * normalized straight into the GEMM's 16-bit operand (no f32 copy, no conversion pass). */
static msh_status cuda_rmsnorm_matmul(msh_tensor *out, const msh_tensor *x, const msh_tensor *norm_w, float eps,
                                      const msh_tensor *w, msh_tensor *h, msh_tensor *gu) {
  msh_cuda_dev *d;
  msh_status s = dev_for(out, &d);
  if (s != MSH_OK) return s;
  int64_t M = x->shape[0], K = x->shape[1], NO = out->shape[1];
  int epi = gu ? EPI_GLU : EPI_STORE;
  const void *gp = msh_tensor_ptr(norm_w);
  if (K > 0 && M == 1) { /* the GEMV kernels that fold the norm in, where one takes these operands */
    cudaError_t e = cudaErrorNotSupported;
    if (msh_dtype_is_block(w->dtype))
      e = msh_k_gemv_quant_norm(msh_cuda_cur(d), epi, msh_tensor_ptr(out), msh_tensor_ptr(x), msh_tensor_ptr(w), w->dtype,
                                gp, norm_w->dtype, eps, NO, K);
    else if (d->gemv_max_m >= 1 && norm_w->dtype == w->dtype)
      e = msh_k_gemv_norm(msh_cuda_cur(d), epi, msh_tensor_ptr(out), msh_tensor_ptr(x), msh_tensor_ptr(w), gp, w->dtype,
                          eps, NO, K);
    if (e != cudaErrorNotSupported) {
      CUDA_TRY(e);
      return MSH_OK;
    }
  }
  if (K > 0 && M > d->gemv_max_m && w->dtype != MSH_F32) {
    void *xs = NULL;
    s = msh_cuda_scratch(d, (size_t)(M * K) * 2, &xs);
    if (s != MSH_OK) return s;
    CUDA_TRY(msh_k_rmsnorm_to(msh_cuda_cur(d), xs, w->dtype, msh_tensor_ptr(x), gp, norm_w->dtype, M, K, eps));
    return gemm16(d, msh_tensor_ptr(out), xs, w, M, K, NO, epi, gu);
  }
  msh_tensor hv = msh_rows_view(h, M, K);
  if (M * K > 0) CUDA_TRY(msh_k_rmsnorm(msh_cuda_cur(d), msh_tensor_ptr(&hv), msh_tensor_ptr(x), gp, norm_w->dtype, M, K, eps));
  return matmul_epi(out, &hv, w, epi, gu);
}

static msh_status cuda_matmul(msh_tensor *out, const msh_tensor *x, const msh_tensor *w) {
  return matmul_epi(out, x, w, EPI_STORE, NULL);
}

static msh_status cuda_matmul_acc(msh_tensor *out, const msh_tensor *x, const msh_tensor *w) {
  return matmul_epi(out, x, w, EPI_ACC, NULL);
}

static msh_status cuda_matmul_glu(msh_tensor *out, const msh_tensor *x, const msh_tensor *w, msh_tensor *scratch) {
  return matmul_epi(out, x, w, EPI_GLU, scratch);
}

static msh_status cuda_qkv_rope(msh_tensor *q_out, msh_tensor *k_cache, msh_tensor *v_cache, const msh_tensor *qkv,
                                const msh_tensor *pos, const msh_tensor *inv_freq, int style) {
  msh_cuda_dev *d;
  msh_status s = dev_for(q_out, &d);
  if (s != MSH_OK) return s;
  int nd = k_cache->ndim;
  int64_t R = q_out->shape[0], H = q_out->shape[1], hd = q_out->shape[2];
  int64_t KVH = k_cache->shape[nd - 2], S = k_cache->shape[nd - 3], B = nd == 4 ? k_cache->shape[0] : 1;
  int64_t bstride = nd == 4 ? k_cache->stride[0] : 0, rstride = k_cache->stride[nd - 3];
  if (nd == 4 ? (v_cache->stride[0] != bstride || v_cache->stride[1] != rstride) : v_cache->stride[0] != rstride)
    return MSH_FAIL(MSH_EUNSUPPORTED, "qkv_rope: the k and v caches must share their strides on CUDA");
  CUDA_TRY(msh_k_qkv_rope(msh_cuda_cur(d), msh_tensor_ptr(q_out), msh_tensor_ptr(k_cache), msh_tensor_ptr(v_cache),
                          k_cache->dtype, msh_tensor_ptr(qkv), msh_tensor_ptr(pos), msh_tensor_ptr(inv_freq), R, R / B,
                          H, KVH, hd, inv_freq->shape[0], style, S, bstride, rstride));
  return MSH_OK;
}

/* The feed-forward block (moonshard.h). Many rows over bf16 weights keep its activations in bf16
 * between the GEMMs: the normalized rows, the gate/up products and their GLU (the down GEMM's
 * operand, with no f32 copy or conversion pass), the down GEMM adding into x. Otherwise
 * rmsnorm_matmul's GLU form then matmul_acc. */
static msh_status cuda_rmsnorm_mlp(msh_tensor *x, const msh_tensor *norm_w, float eps, const msh_tensor *w_gu,
                                   const msh_tensor *w_down, msh_tensor *h, msh_tensor *g, msh_tensor *gu) {
  msh_cuda_dev *d;
  msh_status s = dev_for(x, &d);
  if (s != MSH_OK) return s;
  int64_t M = x->shape[0], K = x->shape[1], F = g->shape[1];
  if (K > 0 && F > 0 && M > d->gemv_max_m && w_gu->dtype == MSH_BF16 && w_down->dtype == MSH_BF16) {
    /* one bf16 scratch holds the normalized rows, then (once the gate/up GEMM has read them) the
     * GLU of the products, formed in gu's room */
    void *xs = NULL;
    s = msh_cuda_scratch(d, (size_t)(M * (K > F ? K : F)) * 2, &xs);
    if (s != MSH_OK) return s;
    CUDA_TRY(msh_k_rmsnorm_to(msh_cuda_cur(d), xs, MSH_BF16, msh_tensor_ptr(x), msh_tensor_ptr(norm_w), norm_w->dtype, M, K,
                              eps));
    s = gemm16(d, xs, xs, w_gu, M, K, F, EPI_GLU16, gu);
    if (s != MSH_OK) return s;
    return gemm16(d, msh_tensor_ptr(x), xs, w_down, M, F, K, EPI_ACC, NULL);
  }
  s = cuda_rmsnorm_matmul(g, x, norm_w, eps, w_gu, h, gu);
  if (s != MSH_OK) return s;
  return matmul_epi(x, g, w_down, EPI_ACC, NULL);
}

/* rmsnorm (unless norm_w is NULL), the q/k/v projection, rope and the cache store (moonshard.h): one
 * row of x folds them into one GEMV (no qkv row written); anything else composes rmsnorm_matmul
 * (or matmul) and qkv_rope. */
static msh_status cuda_rmsnorm_qkv_rope(msh_tensor *q_out, msh_tensor *k_cache, msh_tensor *v_cache, msh_tensor *qkv,
                                        const msh_tensor *x, const msh_tensor *norm_w, float eps, const msh_tensor *w,
                                        msh_tensor *h, const msh_tensor *pos, const msh_tensor *inv_freq, int style) {
  msh_cuda_dev *d;
  msh_status s = dev_for(q_out, &d);
  if (s != MSH_OK) return s;
  int nd = k_cache->ndim;
  int64_t M = x->shape[0], K = x->shape[1];
  if (M == 1 && K > 0 && d->gemv_max_m >= 1 && (!norm_w || norm_w->dtype == w->dtype) &&
      v_cache->stride[nd - 3] == k_cache->stride[nd - 3]) {
    cudaError_t e = msh_k_gemv_norm_qkv(msh_cuda_cur(d), msh_tensor_ptr(q_out), msh_tensor_ptr(k_cache),
                                        msh_tensor_ptr(v_cache), k_cache->dtype, msh_tensor_ptr(x), msh_tensor_ptr(w),
                                        norm_w ? msh_tensor_ptr(norm_w) : NULL, w->dtype, eps, msh_tensor_ptr(pos),
                                        msh_tensor_ptr(inv_freq), q_out->shape[1], k_cache->shape[nd - 2],
                                        q_out->shape[2], inv_freq->shape[0], style, k_cache->shape[nd - 3],
                                        k_cache->stride[nd - 3], K);
    if (e != cudaErrorNotSupported) {
      CUDA_TRY(e);
      return MSH_OK;
    }
  }
  s = norm_w ? cuda_rmsnorm_matmul(qkv, x, norm_w, eps, w, h, NULL) : cuda_matmul(qkv, x, w);
  if (s != MSH_OK) return s;
  return cuda_qkv_rope(q_out, k_cache, v_cache, qkv, pos, inv_freq, style);
}

static msh_status cuda_rope(msh_tensor *x, const msh_tensor *pos, const msh_tensor *inv_freq, int style) {
  msh_cuda_dev *d;
  msh_status s = dev_for(x, &d);
  if (s != MSH_OK) return s;
  CUDA_TRY(msh_k_rope(msh_cuda_cur(d), msh_tensor_ptr(x), msh_tensor_ptr(pos), msh_tensor_ptr(inv_freq), x->shape[0],
                      x->shape[1], x->shape[2], inv_freq->shape[0], style));
  return MSH_OK;
}

/* Operands (B, T, H, hd) over (B, S, KVH, hd). pos0_dev NULL: every sequence's queries at
 * pos0 .. pos0 + T - 1. Else the positions (pos0_n of them: one for all or one per sequence) are
 * read on the device when the kernels run and the work is planned for positions up to pos0
 * (= max_len - T): the split-KV decode kernels for any T, so that one captured graph serves every
 * position. */
static msh_status attention_at(msh_tensor *out, const msh_tensor *q, const msh_tensor *k, const msh_tensor *v,
                               int64_t pos0, const int32_t *pos0_dev, int64_t pos0_n, float scale) {
  msh_cuda_dev *d;
  msh_status s = dev_for(out, &d);
  if (s != MSH_OK) return s;
  int64_t B = q->shape[0], T = q->shape[1], H = q->shape[2], hd = q->shape[3], KVH = k->shape[2];
  if (B == 0 || T == 0 || H == 0 || hd == 0) return MSH_OK;
  if (B > INT_MAX || T > INT_MAX || H > INT_MAX || hd > INT_MAX)
    return MSH_FAIL(MSH_EUNSUPPORTED, "attention: shape too large for the CUDA kernels");
  msh_k_attn a = {
      .out = msh_tensor_ptr(out),
      .q = msh_tensor_ptr(q),
      .k = msh_tensor_ptr(k),
      .v = msh_tensor_ptr(v),
      .ks0 = k->stride[1],
      .vs0 = v->stride[1],
      .ksb = k->stride[0],
      .vsb = v->stride[0],
      .kv_dt = k->dtype,
      .B = (int)B,
      .T = (int)T,
      .H = (int)H,
      .KVH = (int)KVH,
      .hd = (int)hd,
      .pos0 = pos0,
      .scale = scale,
      .pos0_dev = pos0_dev,
      .pos0_n = (int)pos0_n,
  };
  /* 8 or more queries: tensor-core flash attention (splitting the keys when the queries alone
   * cannot fill the GPU); fewer: the split-KV decode kernels */
  void *work = NULL;
  if (T >= 8 && !pos0_dev && msh_k_attn_prefill_ok(&a)) {
    size_t pbytes = msh_k_attn_prefill_workspace(&a, d->sm_count);
    if (pbytes) {
      s = msh_cuda_scratch(d, pbytes, &work);
      if (s != MSH_OK) return s;
    }
    CUDA_TRY(msh_k_attn_prefill(msh_cuda_cur(d), &a, work, d->sm_count));
    return MSH_OK;
  }
  if (hd > 256) return MSH_FAIL(MSH_EUNSUPPORTED, "attention: head dim %lld > 256 on CUDA", (long long)hd);
  if (T > 65535)
    return MSH_FAIL(MSH_EUNSUPPORTED, "attention: %lld queries over a %s cache with head dim %lld on CUDA "
                    "(the flash kernel takes f16/bf16 caches with head dim 64 or 128%s)",
                    (long long)T, msh_dtype_name(k->dtype), (long long)hd,
                    pos0_dev ? ", and a position on the host" : "");
  /* the grid's y dimension holds (sequence, kv head, tile of up to 8 query heads) */
  if (B * KVH * ((H / KVH + 7) / 8) > 65535)
    return MSH_FAIL(MSH_EUNSUPPORTED, "attention: %lld sequences x %lld kv heads exceed the CUDA grid", (long long)B,
                    (long long)KVH);
  size_t wbytes = msh_k_attn_decode_workspace(&a, d->sm_count);
  if (wbytes) {
    s = msh_cuda_scratch(d, wbytes, &work);
    if (s != MSH_OK) return s;
  }
  CUDA_TRY(msh_k_attn_decode(msh_cuda_cur(d), &a, work, d->sm_count));
  return MSH_OK;
}

static msh_status cuda_attention(msh_tensor *out, const msh_tensor *q, const msh_tensor *k, const msh_tensor *v,
                                 int64_t pos0, float scale) {
  return attention_at(out, q, k, v, pos0, NULL, 1, scale);
}

static msh_status cuda_attention_dyn(msh_tensor *out, const msh_tensor *q, const msh_tensor *k, const msh_tensor *v,
                                     const msh_tensor *pos0, int64_t max_len, float scale) {
  return attention_at(out, q, k, v, max_len - q->shape[1], msh_tensor_ptr(pos0), msh_tensor_numel(pos0), scale);
}

/* The paged KV cache: operands validated by core/src/ops.c; the arrays' values are clamped on
 * the device (the host cannot see them). */
static msh_status cuda_kv_write(msh_tensor *k_pool, msh_tensor *v_pool, const msh_tensor *k, const msh_tensor *v,
                                const msh_tensor *slots) {
  msh_cuda_dev *d;
  msh_status s = dev_for(k_pool, &d);
  if (s != MSH_OK) return s;
  int64_t R = k->shape[0], row = k->shape[1] * k->shape[2];
  if (R > INT_MAX || row > INT_MAX) return MSH_FAIL(MSH_EUNSUPPORTED, "kv_write: shape too large for the CUDA kernels");
  CUDA_TRY(msh_k_kv_write(msh_cuda_cur(d), msh_tensor_ptr(k_pool), msh_tensor_ptr(v_pool), k_pool->dtype,
                          k_pool->shape[0] * k_pool->shape[1], msh_tensor_ptr(k), k->dtype, msh_tensor_ptr(v),
                          v->dtype, k->stride[0], v->stride[0], msh_tensor_ptr(slots), (int)R, (int)row));
  return MSH_OK;
}

static msh_status cuda_paged_attention(msh_tensor *out, const msh_tensor *q, const msh_tensor *k_pool,
                                       const msh_tensor *v_pool, const msh_tensor *q_start, const msh_tensor *ctx_len,
                                       const msh_tensor *block_table, int64_t max_ctx, float scale) {
  msh_cuda_dev *d;
  msh_status s = dev_for(out, &d);
  if (s != MSH_OK) return s;
  int64_t R = q->shape[0], H = q->shape[1], hd = q->shape[2], B = ctx_len->shape[0];
  if (hd > 256) return MSH_FAIL(MSH_EUNSUPPORTED, "paged_attention: head dim %lld > 256 on CUDA", (long long)hd);
  /* the grid: rows on x (up to 2^31 - 1), kv heads on z (up to 65535) */
  if (R > INT_MAX || H > INT_MAX || B > INT_MAX || k_pool->shape[2] > 65535 || k_pool->shape[0] > INT_MAX ||
      k_pool->shape[1] > INT_MAX || max_ctx > INT_MAX || block_table->shape[1] > INT_MAX)
    return MSH_FAIL(MSH_EUNSUPPORTED, "paged_attention: %lld rows x %lld heads over %lld kv heads, pools %lld x %lld, "
                    "%lld blocks a table exceed the CUDA kernel's range", (long long)R, (long long)H,
                    (long long)k_pool->shape[2], (long long)k_pool->shape[0], (long long)k_pool->shape[1],
                    (long long)block_table->shape[1]);
  msh_k_paged a = {
      .out = msh_tensor_ptr(out),
      .q = msh_tensor_ptr(q),
      .k = msh_tensor_ptr(k_pool),
      .v = msh_tensor_ptr(v_pool),
      .q_start = msh_tensor_ptr(q_start),
      .ctx_len = msh_tensor_ptr(ctx_len),
      .block_table = msh_tensor_ptr(block_table),
      .kv_dt = k_pool->dtype,
      .R = (int)R,
      .B = (int)B,
      .H = (int)H,
      .KVH = (int)k_pool->shape[2],
      .hd = (int)hd,
      .BS = (int)k_pool->shape[1],
      .NB = (int)k_pool->shape[0],
      .MB = (int)block_table->shape[1],
      .max_ctx = (int)max_ctx,
      .scale = scale,
  };
  void *work = NULL;
  size_t wbytes = msh_k_paged_attn_workspace(&a, d->sm_count);
  if (wbytes) {
    s = msh_cuda_scratch(d, wbytes, &work);
    if (s != MSH_OK) return s;
  }
  CUDA_TRY(msh_k_paged_attn(msh_cuda_cur(d), &a, work, d->sm_count));
  return MSH_OK;
}

static msh_status cuda_silu_mul(msh_tensor *out, const msh_tensor *gate, const msh_tensor *up) {
  msh_cuda_dev *d;
  msh_status s = dev_for(out, &d);
  if (s != MSH_OK) return s;
  CUDA_TRY(msh_k_silu_mul(msh_cuda_cur(d), msh_tensor_ptr(out), msh_tensor_ptr(gate), msh_tensor_ptr(up),
                          msh_tensor_numel(out)));
  return MSH_OK;
}

static msh_status cuda_add(msh_tensor *out, const msh_tensor *a, const msh_tensor *b) {
  msh_cuda_dev *d;
  msh_status s = dev_for(out, &d);
  if (s != MSH_OK) return s;
  CUDA_TRY(msh_k_add(msh_cuda_cur(d), msh_tensor_ptr(out), msh_tensor_ptr(a), msh_tensor_ptr(b), msh_tensor_numel(out)));
  return MSH_OK;
}

static msh_status cuda_add_bias(msh_tensor *out, const msh_tensor *b) {
  msh_cuda_dev *d;
  msh_status s = dev_for(out, &d);
  if (s != MSH_OK) return s;
  int64_t N = out->shape[out->ndim - 1];
  CUDA_TRY(msh_k_add_bias(msh_cuda_cur(d), msh_tensor_ptr(out), msh_tensor_ptr(b), b->dtype, msh_rows(out), N));
  return MSH_OK;
}

static msh_status cuda_scale(msh_tensor *out, const msh_tensor *x, float v) {
  msh_cuda_dev *d;
  msh_status s = dev_for(out, &d);
  if (s != MSH_OK) return s;
  CUDA_TRY(msh_k_scale(msh_cuda_cur(d), msh_tensor_ptr(out), msh_tensor_ptr(x), v, msh_tensor_numel(out)));
  return MSH_OK;
}

static msh_status cuda_softmax(msh_tensor *out, const msh_tensor *x, int log) {
  msh_cuda_dev *d;
  msh_status s = dev_for(out, &d);
  if (s != MSH_OK) return s;
  CUDA_TRY(msh_k_softmax(msh_cuda_cur(d), msh_tensor_ptr(out), msh_tensor_ptr(x), msh_rows(x), x->shape[x->ndim - 1], log));
  return MSH_OK;
}

static msh_status cuda_argmax(const msh_tensor *x, int32_t *out) {
  msh_cuda_dev *d;
  msh_status s = dev_for(x, &d);
  if (s == MSH_OK) s = msh_cuda_check_not_capturing(d, "argmax (its result goes to the host)", __func__);
  if (s != MSH_OK) return s;
  int64_t R = msh_rows(x), N = x->shape[x->ndim - 1];
  if (R == 0) return MSH_OK;
  int32_t *res = d->dev_words;
  if (R > 64) {
    void *p = NULL;
    s = msh_cuda_scratch(d, (size_t)R * sizeof(int32_t), &p);
    if (s != MSH_OK) return s;
    res = p;
  }
  CUDA_TRY(msh_k_argmax(msh_cuda_cur(d), res, msh_tensor_ptr(x), R, N));
  /* out is host memory: copy back and wait */
  CUDA_TRY(cudaMemcpyAsync(out, res, (size_t)R * sizeof(int32_t), cudaMemcpyDeviceToHost, msh_cuda_cur(d)));
  CUDA_TRY(cudaStreamSynchronize(msh_cuda_cur(d)));
  return MSH_OK;
}

static msh_status cuda_argmax_into(msh_tensor *out, const msh_tensor *x) {
  msh_cuda_dev *d;
  msh_status s = dev_for(x, &d);
  if (s != MSH_OK) return s;
  int64_t R = msh_rows(x), N = x->shape[x->ndim - 1];
  if (R == 0) return MSH_OK;
  CUDA_TRY(msh_k_argmax(msh_cuda_cur(d), msh_tensor_ptr(out), msh_tensor_ptr(x), R, N));
  return MSH_OK;
}

static msh_status cuda_randn(msh_tensor *t, uint64_t seed, float mean, float std) {
  msh_cuda_dev *d;
  msh_status s = msh_cuda_dev_get(t->st->device_index, &d);
  if (s != MSH_OK) return s;
  CUDA_TRY(msh_k_randn(msh_cuda_cur(d), msh_tensor_ptr(t), t->dtype, msh_tensor_numel(t), seed, mean, std));
  return MSH_OK;
}

static msh_status cuda_mem_info(int device_index, uint64_t *free_bytes, uint64_t *total_bytes) {
  msh_cuda_dev *d;
  msh_status s = msh_cuda_dev_get(device_index, &d);
  if (s != MSH_OK) return s;
  size_t f = 0, t = 0;
  CUDA_TRY(cudaMemGetInfo(&f, &t));
  *free_bytes = f;
  *total_bytes = t;
  return MSH_OK;
}

/* Page-locked host memory, pinned for every device (portable) and mapped into their address
 * space (kernels may read and write it: cuda_host_map), zero-filled. */
static msh_status cuda_host_alloc(uint64_t bytes, void **out) {
  void *p = NULL;
  CUDA_TRY(cudaHostAlloc(&p, (size_t)bytes, cudaHostAllocPortable | cudaHostAllocMapped));
  memset(p, 0, (size_t)bytes);
  *out = p;
  return MSH_OK;
}

static void cuda_host_release(void *p) {
  if (p) cudaFreeHost(p);
  (void)cudaGetLastError();
}

/* The device address of page-locked host memory from cuda_host_alloc. With unified addressing
 * (every 64-bit Linux process) it is the host address itself and kernels reach the bytes over
 * PCIe or NVLink-C2C as they load and store them; cudaHostGetDevicePointer says so where the
 * driver maps host memory, and a device without unified addressing or mapping is refused. */
static msh_status cuda_host_map(int device_index, void *host, uint64_t bytes, void **out) {
  msh_cuda_dev *d;
  msh_status s = msh_cuda_dev_get(device_index, &d);
  if (s != MSH_OK) return s;
  (void)bytes;
  void *p = NULL;
  if (cudaHostGetDevicePointer(&p, host, 0) == cudaSuccess && p) {
    *out = p;
    return MSH_OK;
  }
  (void)cudaGetLastError();
  int uva = 0;
  CUDA_TRY(cudaDeviceGetAttribute(&uva, cudaDevAttrUnifiedAddressing, device_index));
  if (!uva)
    return MSH_FAIL(MSH_EUNSUPPORTED, "CUDA device %d cannot map host memory (no unified addressing)", device_index);
  *out = host;
  return MSH_OK;
}

static const msh_backend cuda_backend = {
    .name = "cuda",
    .alloc = cuda_alloc,
    .release = cuda_release,
    .copy = cuda_copy,
    .upload = cuda_upload,
    .download = cuda_download,
    .upload_rows = msh_cuda_upload_rows,
    .embedding = cuda_embedding,
    .rmsnorm = cuda_rmsnorm,
    .matmul = cuda_matmul,
    .matmul_acc = cuda_matmul_acc,
    .matmul_glu = cuda_matmul_glu,
    .rmsnorm_matmul = cuda_rmsnorm_matmul,
    .rmsnorm_qkv_rope = cuda_rmsnorm_qkv_rope,
    .rmsnorm_mlp = cuda_rmsnorm_mlp,
    .qkv_rope = cuda_qkv_rope,
    .rope = cuda_rope,
    .attention = cuda_attention,
    .set_rows_dyn = cuda_set_rows_dyn,
    .attention_dyn = cuda_attention_dyn,
    .kv_write = cuda_kv_write,
    .paged_attention = cuda_paged_attention,
    .silu_mul = cuda_silu_mul,
    .add = cuda_add,
    .add_bias = cuda_add_bias,
    .scale = cuda_scale,
    .softmax = cuda_softmax,
    .argmax = cuda_argmax,
    .argmax_into = cuda_argmax_into,
    .randn = cuda_randn,
    .sync = msh_cuda_sync,
    .mem_info = cuda_mem_info,
    .graph_begin = msh_cuda_graph_begin,
    .graph_end = msh_cuda_graph_end,
    .graph_launch = msh_cuda_graph_launch,
    .graph_free = msh_cuda_graph_free,
    .device_count = msh_cuda_device_count,
    .set_staging = msh_cuda_staging_set,
    .staging_stats = msh_cuda_staging_stats,
    .host_alloc = cuda_host_alloc,
    .host_release = cuda_host_release,
    .host_map = cuda_host_map,
    .stream_new = msh_cuda_stream_new,
    .stream_free = msh_cuda_stream_free,
    .stream_sync = msh_cuda_stream_sync,
    .stream_set_current = msh_cuda_stream_set_current,
    .event_new = msh_cuda_event_new,
    .event_free = msh_cuda_event_free,
    .event_record = msh_cuda_event_record,
    .stream_wait_event = msh_cuda_stream_wait_event,
    .event_query = msh_cuda_event_query,
    .event_sync = msh_cuda_event_sync,
    .event_elapsed_ms = msh_cuda_event_elapsed_ms,
    .capturing = msh_cuda_capturing_index,
    .copy_async = cuda_copy_async,
};

/* This module's registration (core/src/backend.c): the core dlopen()s the module on the first
 * use of a CUDA device, or a program links it directly; either way the constructor hands the
 * core this backend and the NCCL engine. Asking the driver anything waits for the first use. */
static const msh_backend_module cuda_module = {
    .abi = MSH_BACKEND_ABI,
    .vt_bytes = sizeof(msh_backend),
    .device = MSH_CUDA,
    .backend = &cuda_backend,
#ifdef MSH_WITH_NCCL
    .nccl_unique_id = msh_cuda_nccl_unique_id,
    .nccl_comm_new = msh_cuda_nccl_comm_new,
#endif
};

__attribute__((constructor)) static void cuda_module_register(void) { msh_backend_register(&cuda_module); }
