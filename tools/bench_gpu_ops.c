/* bench_gpu_ops.c: micro-benchmarks of the CUDA ops at the Llama-3-8B decode and prefill shapes,
 * against floors computed from ceilings measured in the same run (device-to-device copy
 * bandwidth, cuBLAS bf16 8192^3 GEMM rate). Prints one JSON object per line; efficiency is
 * floor / measured time (1.0 = at the ceiling). Not a test: nothing here asserts a timing.
 *
 * Timing: CUDA events around a batch of `inner` back-to-back launches on the op stream, after
 * warm-up; the median batch over `reps` batches, divided by inner. Weights and caches rotate over
 * enough copies to exceed the L2 cache, so each run reads device memory. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "cuda_internal.h"
#include "moonshard.h"
#include "msh_kernels.h"

static cudaStream_t stream;
static double copy_bw;   /* bytes / s, read + written */
static double gemm_rate; /* FLOP / s */

static void die(const char *what, msh_status s) {
  fprintf(stderr, "bench_gpu_ops: %s: %s: %s\n", what, msh_status_name(s), msh_last_error());
  exit(1);
}
#define OK(call)                         \
  do {                                   \
    msh_status s_ = (call);              \
    if (s_ != MSH_OK) die(#call, s_);    \
  } while (0)
#define CU(call)                                                                    \
  do {                                                                              \
    cudaError_t e_ = (call);                                                        \
    if (e_ != cudaSuccess) {                                                        \
      fprintf(stderr, "bench_gpu_ops: %s: %s\n", #call, cudaGetErrorString(e_));    \
      exit(1);                                                                      \
    }                                                                               \
  } while (0)

/* ------------------------------------------------------------------------------ timing */

typedef void (*op_fn)(void *ctx, int i);

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

/* Median seconds of one call of f (batches of inner calls; f gets a running call index). */
static double time_op(op_fn f, void *ctx, int inner, int reps) {
  cudaEvent_t e0, e1;
  CU(cudaEventCreate(&e0));
  CU(cudaEventCreate(&e1));
  int k = 0;
  for (int i = 0; i < 3; i++) f(ctx, k++); /* warm-up: module load, handles, scratch */
  CU(cudaStreamSynchronize(stream));
  double t[64];
  if (reps > 64) reps = 64;
  for (int r = 0; r < reps; r++) {
    CU(cudaEventRecord(e0, stream));
    for (int i = 0; i < inner; i++) f(ctx, k++);
    CU(cudaEventRecord(e1, stream));
    CU(cudaEventSynchronize(e1));
    float ms = 0;
    CU(cudaEventElapsedTime(&ms, e0, e1));
    t[r] = ms * 1e-3 / inner;
  }
  qsort(t, (size_t)reps, sizeof t[0], cmp_double);
  CU(cudaEventDestroy(e0));
  CU(cudaEventDestroy(e1));
  return t[reps / 2];
}

/* The same with the batch captured once into a CUDA graph and replayed: device time without the
 * host's launch cost (how the decode loop will run). Returns -1 when capture fails. */
static double time_graph(op_fn f, void *ctx, int inner, int reps) {
  for (int i = 0; i < 3; i++) f(ctx, i); /* sizes scratch before capture */
  CU(cudaStreamSynchronize(stream));
  cudaGraph_t g = NULL;
  cudaGraphExec_t ge = NULL;
  if (cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed) != cudaSuccess) {
    (void)cudaGetLastError();
    return -1;
  }
  for (int i = 0; i < inner; i++) f(ctx, i);
  cudaError_t e = cudaStreamEndCapture(stream, &g);
  if (e == cudaSuccess) e = cudaGraphInstantiate(&ge, g, 0);
  if (e != cudaSuccess) {
    fprintf(stderr, "bench_gpu_ops: graph capture failed: %s\n", cudaGetErrorString(e));
    (void)cudaGetLastError();
    if (g) cudaGraphDestroy(g);
    return -1;
  }
  cudaEvent_t e0, e1;
  CU(cudaEventCreate(&e0));
  CU(cudaEventCreate(&e1));
  CU(cudaGraphLaunch(ge, stream));
  CU(cudaStreamSynchronize(stream));
  double t[64];
  if (reps > 64) reps = 64;
  for (int r = 0; r < reps; r++) {
    CU(cudaEventRecord(e0, stream));
    CU(cudaGraphLaunch(ge, stream));
    CU(cudaEventRecord(e1, stream));
    CU(cudaEventSynchronize(e1));
    float ms = 0;
    CU(cudaEventElapsedTime(&ms, e0, e1));
    t[r] = ms * 1e-3 / inner;
  }
  qsort(t, (size_t)reps, sizeof t[0], cmp_double);
  CU(cudaEventDestroy(e0));
  CU(cudaEventDestroy(e1));
  CU(cudaGraphExecDestroy(ge));
  CU(cudaGraphDestroy(g));
  return t[reps / 2];
}

/* ------------------------------------------------------------------------------ data */

static msh_tensor *dev_tensor(int dtype, int ndim, const int64_t *shape) {
  msh_tensor *t = NULL;
  OK(msh_tensor_new(&t, dtype, ndim, shape, MSH_CUDA, 0));
  return t;
}

/* Random values without generating gigabytes on the host: one random block of 1M elements,
 * tiled over the tensor with device copies. */
static void fill_random(msh_tensor *t, uint64_t seed) {
  int64_t n = msh_tensor_numel(t), blk = n < (1 << 20) ? n : (1 << 20);
  int dt = msh_tensor_dtype(t);
  msh_tensor *b = dev_tensor(dt, 1, &blk);
  OK(msh_tensor_randn(b, seed, 0.0f, 1.0f));
  size_t es = msh_dtype_size(dt);
  char *dst = msh_tensor_data(t);
  for (int64_t off = 0; off < n; off += blk) {
    int64_t len = n - off < blk ? n - off : blk;
    CU(cudaMemcpyAsync(dst + off * es, msh_tensor_data(b), (size_t)(len * (int64_t)es), cudaMemcpyDeviceToDevice, stream));
  }
  CU(cudaStreamSynchronize(stream));
  msh_tensor_free(b);
}

/* t: stream launches; tg: graph replay (-1 if none). efficiency uses the graph time when there is one. */
/* t (one i32 on the device) = v, through a host tensor (waits for the stream). */
static void set_i32(msh_tensor *t, int32_t v) {
  int64_t one = 1;
  msh_tensor *h = NULL;
  OK(msh_tensor_new(&h, MSH_I32, 1, &one, MSH_CPU, 0));
  *(int32_t *)msh_tensor_data(h) = v;
  OK(msh_tensor_copy(t, h));
  msh_tensor_free(h);
}

static void report(const char *bench, const char *extra, double t, double tg, double floor_t, const char *floor_kind,
                   double bytes, double flops) {
  double best = tg > 0 ? tg : t;
  printf("{\"bench\":\"%s\",%s\"us\":%.2f,\"us_graph\":%.2f,\"floor_us\":%.2f,\"floor\":\"%s\","
         "\"efficiency\":%.3f,\"efficiency_stream\":%.3f,\"GBps\":%.1f,\"TFLOPs\":%.1f}\n",
         bench, extra, t * 1e6, tg * 1e6, floor_t * 1e6, floor_kind, floor_t / best, floor_t / t, bytes / best * 1e-9,
         flops / best * 1e-12);
  fflush(stdout);
}

static double floor_of(double bytes, double flops, const char **kind) {
  double tb = bytes / copy_bw, tf = flops / gemm_rate;
  *kind = tb >= tf ? "bandwidth" : "matrix";
  return tb >= tf ? tb : tf;
}

/* ---------------------------------------------------------------------------- ceilings */

typedef struct {
  void *a, *b;
  size_t bytes;
} copy_ctx;

static void copy_op(void *p, int i) {
  copy_ctx *c = p;
  (void)i;
  CU(cudaMemcpyAsync(c->b, c->a, c->bytes, cudaMemcpyDeviceToDevice, stream));
}

typedef struct {
  cublasHandle_t h;
  void *a, *b, *c;
  int n;
} gemm_ctx;

static void gemm_op(void *p, int i) {
  gemm_ctx *g = p;
  (void)i;
  const float one = 1.0f, zero = 0.0f;
  cublasStatus_t st = cublasGemmEx(g->h, CUBLAS_OP_T, CUBLAS_OP_N, g->n, g->n, g->n, &one, g->a, CUDA_R_16BF, g->n,
                                   g->b, CUDA_R_16BF, g->n, &zero, g->c, CUDA_R_16BF, g->n, CUBLAS_COMPUTE_32F,
                                   CUBLAS_GEMM_DEFAULT);
  if (st != CUBLAS_STATUS_SUCCESS) {
    fprintf(stderr, "cublasGemmEx: %s\n", cublasGetStatusString(st));
    exit(1);
  }
}

static void measure_ceilings(void) {
  int64_t n = 1LL << 29; /* 1 GiB of f16 each way */
  msh_tensor *a = dev_tensor(MSH_F16, 1, &n), *b = dev_tensor(MSH_F16, 1, &n);
  fill_random(a, 1);
  copy_ctx c = {msh_tensor_data(a), msh_tensor_data(b), (size_t)n * 2};
  double t = time_op(copy_op, &c, 5, 15);
  copy_bw = 2.0 * (double)c.bytes / t;
  printf("{\"bench\":\"ceiling_copy_d2d\",\"bytes\":%zu,\"us\":%.1f,\"GBps\":%.1f}\n", 2 * c.bytes, t * 1e6,
         copy_bw * 1e-9);
  msh_tensor_free(a);
  msh_tensor_free(b);

  int64_t m = 8192, sh[2] = {m, m};
  msh_tensor *x = dev_tensor(MSH_BF16, 2, sh), *y = dev_tensor(MSH_BF16, 2, sh), *z = dev_tensor(MSH_BF16, 2, sh);
  fill_random(x, 2);
  fill_random(y, 3);
  gemm_ctx g = {NULL, msh_tensor_data(x), msh_tensor_data(y), msh_tensor_data(z), (int)m};
  if (cublasCreate(&g.h) != CUBLAS_STATUS_SUCCESS || cublasSetStream(g.h, stream) != CUBLAS_STATUS_SUCCESS) {
    fprintf(stderr, "cublasCreate failed\n");
    exit(1);
  }
  t = time_op(gemm_op, &g, 3, 9);
  gemm_rate = 2.0 * m * m * m / t;
  printf("{\"bench\":\"ceiling_gemm_bf16_8192\",\"us\":%.1f,\"TFLOPs\":%.1f}\n", t * 1e6, gemm_rate * 1e-12);
  cublasDestroy(g.h);
  msh_tensor_free(x);
  msh_tensor_free(y);
  msh_tensor_free(z);
}

/* ------------------------------------------------------------------------------ matmul */

typedef struct {
  msh_tensor *x, *out, *w[16];
  int nw;
} mm_ctx;

static void mm_op(void *p, int i) {
  mm_ctx *c = p;
  OK(msh_op_matmul(c->out, c->x, c->w[i % c->nw]));
}

/* Returns the measured time. path: "gemv" (M <= 16 kernel) or "cublas". */
static double bench_matmul(int64_t M, int64_t N, int64_t K, const char *path) {
  mm_ctx c = {0};
  int64_t xs[2] = {M, K}, os[2] = {M, N}, ws[2] = {N, K};
  double wbytes = (double)N * K * 2;
  c.nw = (int)ceil(512e6 / wbytes);
  if (c.nw > 16) c.nw = 16;
  if (c.nw < 1) c.nw = 1;
  c.x = dev_tensor(MSH_F32, 2, xs);
  c.out = dev_tensor(MSH_F32, 2, os);
  fill_random(c.x, 10);
  for (int i = 0; i < c.nw; i++) {
    c.w[i] = dev_tensor(MSH_BF16, 2, ws);
    fill_random(c.w[i], 11 + (uint64_t)i);
  }
  int old = msh_cuda_set_gemv_max_m(0, strncmp(path, "gemv", 4) ? 0 : 16);
  int old_variant = msh_k_gemv_variant(!strncmp(path, "gemv-v", 6) ? atoi(path + 6) : 0);
  double flops = 2.0 * M * N * K, bytes = wbytes + 4.0 * M * K + 4.0 * M * N;
  double t = time_op(mm_op, &c, M >= 512 ? 4 : 20, 15);
  double tg = time_graph(mm_op, &c, M >= 512 ? 4 : 20, 15);
  msh_cuda_set_gemv_max_m(0, old);
  msh_k_gemv_variant(old_variant);
  const char *kind;
  double fl = floor_of(bytes, flops, &kind);
  char extra[160];
  snprintf(extra, sizeof extra, "\"op\":\"matmul\",\"w\":\"bf16\",\"M\":%lld,\"N\":%lld,\"K\":%lld,\"path\":\"%s\",",
           (long long)M, (long long)N, (long long)K, path);
  report(M >= 512 ? "gemm_prefill" : "gemv_decode", extra, t, tg, fl, kind, bytes, flops);
  msh_tensor_free(c.x);
  msh_tensor_free(c.out);
  for (int i = 0; i < c.nw; i++) msh_tensor_free(c.w[i]);
  return tg > 0 ? tg : t;
}

/* -------------------------------------------------------------------- matmul, block weights */

/* The decode GEMV over block-quantized weights (kernels/gemv_quant.cu) at the Llama-3-8B shapes:
 * epi 0 matmul, 1 matmul_acc (o, down: into the residual), 2 matmul_glu over stacked gate/up rows
 * (2N, K) with N outputs. The weights are quantized on the device from one random f32 matrix and
 * rotated over copies beyond the L2 cache. Bytes: the blocks, x, out (twice for acc).
 * MSH_QGEMV_VARIANT picks the kernel (1: the per-warp one); the line says which. */
typedef struct {
  msh_tensor *x, *out, *scratch, *w[16];
  int nw, epi;
} qmm_ctx;

static void qmm_op(void *p, int i) {
  qmm_ctx *c = p;
  msh_tensor *w = c->w[i % c->nw];
  if (c->epi == 2) OK(msh_op_matmul_glu(c->out, c->x, w, c->scratch));
  else if (c->epi == 1) OK(msh_op_matmul_acc(c->out, c->x, w));
  else OK(msh_op_matmul(c->out, c->x, w));
}

static double bench_matmul_quant(int64_t M, int64_t N, int64_t K, int dt, int epi) {
  static const char *epis[] = {"matmul", "matmul_acc", "matmul_glu"};
  qmm_ctx c = {0};
  c.epi = epi;
  int64_t rows = epi == 2 ? 2 * N : N;
  int64_t xs[2] = {M, K}, os[2] = {M, N}, ws[2] = {rows, K}, ss[2] = {M, rows};
  double wbytes = (double)(rows * K / msh_dtype_block_elems(dt)) * (double)msh_dtype_block_bytes(dt);
  c.nw = (int)ceil(512e6 / wbytes);
  if (c.nw > 16) c.nw = 16;
  if (c.nw < 1) c.nw = 1;
  c.x = dev_tensor(MSH_F32, 2, xs);
  c.out = dev_tensor(MSH_F32, 2, os);
  c.scratch = dev_tensor(MSH_F32, 2, ss);
  fill_random(c.x, 20);
  fill_random(c.out, 21);
  msh_tensor *f = dev_tensor(MSH_F32, 2, ws);
  fill_random(f, 22);
  for (int i = 0; i < c.nw; i++) {
    c.w[i] = dev_tensor(dt, 2, ws);
    OK(msh_tensor_copy(c.w[i], f)); /* quantized on the device */
  }
  msh_tensor_free(f);
  double flops = 2.0 * M * rows * K, bytes = wbytes + 4.0 * M * K + (epi == 1 ? 8.0 : 4.0) * M * N;
  double t = time_op(qmm_op, &c, 20, 15);
  double tg = time_graph(qmm_op, &c, 20, 15);
  const char *kind, *v = getenv("MSH_QGEMV_VARIANT");
  double fl = floor_of(bytes, flops, &kind);
  char extra[200];
  snprintf(extra, sizeof extra,
           "\"op\":\"%s\",\"w\":\"%s\",\"M\":%lld,\"N\":%lld,\"K\":%lld,\"variant\":%d,", epis[epi],
           msh_dtype_name(dt), (long long)M, (long long)N, (long long)K, v ? atoi(v) : 0);
  report("gemv_quant", extra, t, tg, fl, kind, bytes, flops);
  msh_tensor *all[] = {c.x, c.out, c.scratch};
  for (int i = 0; i < 3; i++) msh_tensor_free(all[i]);
  for (int i = 0; i < c.nw; i++) msh_tensor_free(c.w[i]);
  return tg > 0 ? tg : t;
}

/* One decode token's projections over i4g64 weights at batch 1, as the model runs them (stacked
 * q/k/v, o into the residual, stacked gate/up with GLU, down into the residual; 32 layers, then
 * the lm head), from the times of each shape; then a few other dtypes and rows of x. */
static void bench_gemv_quant(void) {
  double qkv = bench_matmul_quant(1, 6144, 4096, MSH_I4G64, 0);
  bench_matmul_quant(1, 4096, 4096, MSH_I4G64, 0);
  double o = bench_matmul_quant(1, 4096, 4096, MSH_I4G64, 1);
  double glu = bench_matmul_quant(1, 14336, 4096, MSH_I4G64, 2);
  double down = bench_matmul_quant(1, 4096, 14336, MSH_I4G64, 1);
  double head = bench_matmul_quant(1, 128256, 4096, MSH_I4G64, 0);
  double step = 32 * (qkv + o + glu + down) + head;
  double wbytes = (32 * (6144.0 * 4096 + 4096.0 * 4096 + 28672.0 * 4096 + 4096.0 * 14336) + 128256.0 * 4096) / 64 * 36;
  printf("{\"bench\":\"llama3_8b_decode_matmuls_i4g64_b1\",\"us\":%.1f,\"floor_us\":%.1f,\"efficiency\":%.3f,"
         "\"tok_s\":%.1f}\n",
         step * 1e6, wbytes / copy_bw * 1e6, wbytes / copy_bw / step, 1.0 / step);
  fflush(stdout);
  static const int dts[] = {MSH_I8G64, MSH_Q4_1, MSH_I4G128, MSH_Q8_0};
  for (int i = 0; i < 4; i++) {
    bench_matmul_quant(1, 4096, 4096, dts[i], 0);
    bench_matmul_quant(1, 14336, 4096, dts[i], 2);
  }
  for (int64_t M = 2; M <= 16; M *= 2) bench_matmul_quant(M, 4096, 4096, MSH_I4G64, 0);
}

/* ----------------------------------------------------------------------- fused layer ops */

/* A layer's fused ops against their compositions, Llama-3-8B shapes (bf16 weights and cache):
 * rmsnorm_qkv_rope at one row (decode: one GEMV with rope and the cache store in its epilogue,
 * against rmsnorm_matmul + qkv_rope) and rmsnorm_mlp at many rows (prefill: bf16 activations
 * between the GEMMs, against rmsnorm_matmul's GLU form + matmul_acc). */
typedef struct {
  msh_tensor *x, *norm, *w[16], *wd, *q, *kc, *vc, *qkv, *h, *pos, *inv, *g, *gu;
  int nw, fused;
} fz_ctx;

static void fz_qkv_op(void *p, int i) {
  fz_ctx *c = p;
  msh_tensor *w = c->w[i % c->nw];
  if (c->fused) {
    OK(msh_op_rmsnorm_qkv_rope(c->q, c->kc, c->vc, c->qkv, c->x, c->norm, 1e-5f, w, c->h, c->pos, c->inv,
                               MSH_ROPE_HALF));
  } else {
    OK(msh_op_rmsnorm_matmul(c->qkv, c->x, c->norm, 1e-5f, w, c->h, NULL));
    OK(msh_op_qkv_rope(c->q, c->kc, c->vc, c->qkv, c->pos, c->inv, MSH_ROPE_HALF));
  }
}

static void fz_mlp_op(void *p, int i) {
  fz_ctx *c = p;
  (void)i;
  if (c->fused) {
    OK(msh_op_rmsnorm_mlp(c->x, c->norm, 1e-5f, c->w[0], c->wd, c->h, c->g, c->gu));
  } else {
    OK(msh_op_rmsnorm_matmul(c->g, c->x, c->norm, 1e-5f, c->w[0], c->h, c->gu));
    OK(msh_op_matmul_acc(c->x, c->g, c->wd));
  }
}

static void bench_fused(void) {
  const int64_t D = 4096, H = 32, KVH = 8, hd = 128, F = 14336, S = 4096;
  /* rmsnorm_qkv_rope, one row at position 1000 */
  for (int fused = 1; fused >= 0; fused--) {
    fz_ctx c = {0};
    int64_t one[2] = {1, D}, ws[2] = {(H + 2 * KVH) * hd, D}, q3[3] = {1, H, hd}, cs[3] = {S, KVH, hd};
    int64_t qs[2] = {1, (H + 2 * KVH) * hd}, n1 = 1, nf = hd / 2;
    double wbytes = (double)ws[0] * D * 2;
    c.nw = (int)ceil(512e6 / wbytes);
    if (c.nw > 16) c.nw = 16;
    c.fused = fused;
    c.x = dev_tensor(MSH_F32, 2, one);
    c.h = dev_tensor(MSH_F32, 2, one);
    c.norm = dev_tensor(MSH_BF16, 1, &D);
    c.q = dev_tensor(MSH_F32, 3, q3);
    c.qkv = dev_tensor(MSH_F32, 2, qs);
    c.kc = dev_tensor(MSH_BF16, 3, cs);
    c.vc = dev_tensor(MSH_BF16, 3, cs);
    c.pos = dev_tensor(MSH_I32, 1, &n1);
    c.inv = dev_tensor(MSH_F32, 1, &nf);
    fill_random(c.x, 20);
    fill_random(c.norm, 21);
    fill_random(c.inv, 22);
    set_i32(c.pos, 1000);
    for (int i = 0; i < c.nw; i++) {
      c.w[i] = dev_tensor(MSH_BF16, 2, ws);
      fill_random(c.w[i], 23 + (uint64_t)i);
    }
    double bytes = wbytes + 4.0 * D + 2.0 * D + 4.0 * H * hd + 2.0 * 2 * KVH * hd;
    double t = time_op(fz_qkv_op, &c, 20, 15), tg = time_graph(fz_qkv_op, &c, 20, 15);
    const char *kind;
    double fl = floor_of(bytes, 2.0 * ws[0] * D, &kind);
    report("fused_decode", fused ? "\"op\":\"rmsnorm_qkv_rope\",\"M\":1," : "\"op\":\"rmsnorm_matmul+qkv_rope\",\"M\":1,",
           t, tg, fl, kind, bytes, 2.0 * ws[0] * D);
    msh_tensor *ts[] = {c.x, c.h, c.norm, c.q, c.qkv, c.kc, c.vc, c.pos, c.inv};
    for (int i = 0; i < 9; i++) msh_tensor_free(ts[i]);
    for (int i = 0; i < c.nw; i++) msh_tensor_free(c.w[i]);
  }
  /* rmsnorm_mlp, 2048 rows */
  for (int fused = 1; fused >= 0; fused--) {
    fz_ctx c = {0};
    const int64_t M = 2048;
    int64_t xs[2] = {M, D}, gus[2] = {2 * F, D}, ds[2] = {D, F}, gs[2] = {M, F}, us[2] = {M, 2 * F};
    c.fused = fused;
    c.nw = 1;
    c.x = dev_tensor(MSH_F32, 2, xs);
    c.h = dev_tensor(MSH_F32, 2, xs);
    c.norm = dev_tensor(MSH_BF16, 1, &D);
    c.w[0] = dev_tensor(MSH_BF16, 2, gus);
    c.wd = dev_tensor(MSH_BF16, 2, ds);
    c.g = dev_tensor(MSH_F32, 2, gs);
    c.gu = dev_tensor(MSH_F32, 2, us);
    fill_random(c.x, 30);
    fill_random(c.norm, 31);
    fill_random(c.w[0], 32);
    fill_random(c.wd, 33);
    double flops = 2.0 * M * D * 3 * F, bytes = 3.0 * F * D * 2 + 2 * 4.0 * M * D;
    double t = time_op(fz_mlp_op, &c, 4, 9), tg = time_graph(fz_mlp_op, &c, 4, 9);
    const char *kind;
    double fl = floor_of(bytes, flops, &kind);
    report("fused_prefill", fused ? "\"op\":\"rmsnorm_mlp\",\"M\":2048," : "\"op\":\"rmsnorm_matmul+matmul_acc\",\"M\":2048,",
           t, tg, fl, kind, bytes, flops);
    msh_tensor *ts[] = {c.x, c.h, c.norm, c.w[0], c.wd, c.g, c.gu};
    for (int i = 0; i < 7; i++) msh_tensor_free(ts[i]);
  }
}

/* --------------------------------------------------------------------------- attention */

typedef struct {
  msh_tensor *q, *out, *k[64], *v[64], *pos; /* pos: (B) i32 per-sequence positions, or NULL */
  int nkv;
  int64_t pos0, max_len;
  float scale;
} at_ctx;

static void at_op(void *p, int i) {
  at_ctx *c = p;
  if (c->pos)
    OK(msh_op_attention_dyn(c->out, c->q, c->k[i % c->nkv], c->v[i % c->nkv], c->pos, c->max_len, c->scale));
  else
    OK(msh_op_attention(c->out, c->q, c->k[i % c->nkv], c->v[i % c->nkv], c->pos0, c->scale));
}

/* B sequences of T queries over bf16 caches of ctx rows each (Llama-3-8B heads). dyn: positions
 * per sequence read on the device (attention_dyn planned for ctx), sequence b at
 * ctx - T - (b % 8) * ctx / 64 (different lengths, as in a real batch); else all at ctx - T. */
static void bench_attention(int64_t B, int64_t T, int64_t ctx, int dyn, const char *name) {
  const int64_t H = 32, KVH = 8, hd = 128;
  at_ctx c = {0};
  int64_t qs[4] = {B, T, H, hd}, ks[4] = {B, ctx, KVH, hd};
  double kvbytes = 2.0 * B * ctx * KVH * hd * 2;
  c.nkv = (int)ceil(512e6 / kvbytes);
  if (c.nkv > 64) c.nkv = 64;
  if (c.nkv < 1) c.nkv = 1;
  c.q = dev_tensor(MSH_F32, 4, qs);
  c.out = dev_tensor(MSH_F32, 4, qs);
  fill_random(c.q, 20);
  for (int i = 0; i < c.nkv; i++) {
    c.k[i] = dev_tensor(MSH_BF16, 4, ks);
    c.v[i] = dev_tensor(MSH_BF16, 4, ks);
    fill_random(c.k[i], 21 + 2 * (uint64_t)i);
    fill_random(c.v[i], 22 + 2 * (uint64_t)i);
  }
  c.pos0 = ctx - T;
  c.max_len = ctx;
  c.scale = 1.0f / sqrtf((float)hd);
  /* causal pairs (query, visible key) over all heads: QK^T and PV are 2 * hd FLOPs each; bytes:
   * the keys and values the queries see, q and out */
  double pairs = 0, seen = 0;
  if (dyn) {
    msh_tensor *h = NULL;
    OK(msh_tensor_new(&h, MSH_I32, 1, &B, MSH_CPU, 0));
    int32_t *p = msh_tensor_data(h);
    for (int64_t b = 0; b < B; b++) p[b] = (int32_t)(ctx - T - (b % 8) * ctx / 64);
    c.pos = dev_tensor(MSH_I32, 1, &B);
    OK(msh_tensor_copy(c.pos, h));
    for (int64_t b = 0; b < B; b++) {
      pairs += (double)T * p[b] + (double)T * (T + 1) / 2;
      seen += (double)p[b] + T;
    }
    msh_tensor_free(h);
  } else {
    pairs = B * ((double)T * c.pos0 + (double)T * (T + 1) / 2);
    seen = (double)B * ctx;
  }
  double flops = 4.0 * hd * H * pairs;
  double bytes = seen * 2.0 * KVH * hd * 2 + 2.0 * B * T * H * hd * 4;
  double t = time_op(at_op, &c, T > 1 ? 5 : 20, 15);
  double tg = time_graph(at_op, &c, T > 1 ? 5 : 20, 15);
  const char *kind;
  double fl = floor_of(bytes, flops, &kind);
  char extra[200];
  snprintf(extra, sizeof extra,
           "\"op\":\"attention%s\",\"kv\":\"bf16\",\"B\":%lld,\"T\":%lld,\"ctx\":%lld,\"H\":32,\"KVH\":8,\"hd\":128,",
           dyn ? "_dyn" : "", (long long)B, (long long)T, (long long)ctx);
  report(name, extra, t, tg, fl, kind, bytes, flops);
  msh_tensor_free(c.q);
  msh_tensor_free(c.out);
  msh_tensor_free(c.pos);
  for (int i = 0; i < c.nkv; i++) {
    msh_tensor_free(c.k[i]);
    msh_tensor_free(c.v[i]);
  }
}

/* ------------------------------------------------------------------- decode step, graph */

/* A whole Llama-3-8B decode step at batch 1 through the public ops (per layer: rmsnorm, q/k/v,
 * two ropes, two set_rows_dyn, attention_dyn, o, add, rmsnorm, gate/up, silu_mul, down, add; then
 * the final norm and the lm head: 546 ops), issued op by op ("eager") and replayed from one
 * msh_graph. The layers rotate over 4 sets of weights (1.7 GB, far past the L2); every layer has
 * its own KV cache. */
enum { DS_LAYERS = 32, DS_SETS = 4 };

typedef struct {
  msh_tensor *wq, *wk, *wv, *wo, *wg, *wu, *wd, *n1, *n2;
} ds_layer;

typedef struct {
  ds_layer w[DS_SETS];
  msh_tensor *kc[DS_LAYERS], *vc[DS_LAYERS], *norm, *head, *inv_freq, *pos;
  msh_tensor *x, *h, *qf, *kf, *vf, *att, *o, *g, *u, *logits, *q3, *k3, *v3, *att2;
  int64_t max_len;
} ds_ctx;

static msh_tensor *ds_view(msh_tensor *t, int ndim, const int64_t *shape) {
  msh_tensor *v = NULL;
  OK(msh_tensor_reshape(&v, t, ndim, shape));
  return v;
}

static void ds_step(void *p, int i) {
  (void)i;
  ds_ctx *c = p;
  const float scale = 1.0f / sqrtf(128.0f), eps = 1e-5f;
  for (int l = 0; l < DS_LAYERS; l++) {
    ds_layer *w = &c->w[l % DS_SETS];
    OK(msh_op_rmsnorm(c->h, c->x, w->n1, eps));
    OK(msh_op_matmul(c->qf, c->h, w->wq));
    OK(msh_op_matmul(c->kf, c->h, w->wk));
    OK(msh_op_matmul(c->vf, c->h, w->wv));
    OK(msh_op_rope(c->q3, c->pos, c->inv_freq, MSH_ROPE_HALF));
    OK(msh_op_rope(c->k3, c->pos, c->inv_freq, MSH_ROPE_HALF));
    OK(msh_op_set_rows_dyn(c->kc[l], c->pos, c->k3));
    OK(msh_op_set_rows_dyn(c->vc[l], c->pos, c->v3));
    OK(msh_op_attention_dyn(c->att, c->q3, c->kc[l], c->vc[l], c->pos, c->max_len, scale));
    OK(msh_op_matmul(c->o, c->att2, w->wo));
    OK(msh_op_add(c->x, c->x, c->o));
    OK(msh_op_rmsnorm(c->h, c->x, w->n2, eps));
    OK(msh_op_matmul(c->g, c->h, w->wg));
    OK(msh_op_matmul(c->u, c->h, w->wu));
    OK(msh_op_silu_mul(c->g, c->g, c->u));
    OK(msh_op_matmul(c->o, c->g, w->wd));
    OK(msh_op_add(c->x, c->x, c->o));
  }
  OK(msh_op_rmsnorm(c->h, c->x, c->norm, eps));
  OK(msh_op_matmul(c->logits, c->h, c->head));
}

static void bench_decode_step(int64_t pos, int64_t max_len) {
  ds_ctx c = {0};
  c.max_len = max_len;
  int64_t d = 4096, ff = 14336, kv = 1024, vocab = 128256, one = 1;
  uint64_t seed = 100;
  for (int s = 0; s < DS_SETS; s++) {
    ds_layer *w = &c.w[s];
    int64_t sq[2] = {d, d}, sk[2] = {kv, d}, sg[2] = {ff, d}, sd[2] = {d, ff};
    w->wq = dev_tensor(MSH_BF16, 2, sq);
    w->wo = dev_tensor(MSH_BF16, 2, sq);
    w->wk = dev_tensor(MSH_BF16, 2, sk);
    w->wv = dev_tensor(MSH_BF16, 2, sk);
    w->wg = dev_tensor(MSH_BF16, 2, sg);
    w->wu = dev_tensor(MSH_BF16, 2, sg);
    w->wd = dev_tensor(MSH_BF16, 2, sd);
    w->n1 = dev_tensor(MSH_F32, 1, &d);
    w->n2 = dev_tensor(MSH_F32, 1, &d);
    msh_tensor *all[] = {w->wq, w->wo, w->wk, w->wv, w->wg, w->wu, w->wd, w->n1, w->n2};
    for (int i = 0; i < 9; i++) OK(msh_tensor_randn(all[i], seed++, i < 7 ? 0.0f : 1.0f, i < 7 ? 0.02f : 0.1f));
  }
  int64_t cs[3] = {max_len, 8, 128}, hs[2] = {vocab, d}, rs = 64;
  for (int l = 0; l < DS_LAYERS; l++) {
    c.kc[l] = dev_tensor(MSH_BF16, 3, cs);
    c.vc[l] = dev_tensor(MSH_BF16, 3, cs);
    OK(msh_tensor_randn(c.kc[l], seed++, 0.0f, 1.0f));
    OK(msh_tensor_randn(c.vc[l], seed++, 0.0f, 1.0f));
  }
  c.norm = dev_tensor(MSH_F32, 1, &d);
  c.head = dev_tensor(MSH_BF16, 2, hs);
  OK(msh_tensor_randn(c.norm, seed++, 1.0f, 0.1f));
  OK(msh_tensor_randn(c.head, seed++, 0.0f, 0.02f));
  c.inv_freq = dev_tensor(MSH_F32, 1, &rs);
  OK(msh_tensor_randn(c.inv_freq, seed++, 0.0f, 0.01f));
  c.pos = dev_tensor(MSH_I32, 1, &one);
  int64_t xs[2] = {1, d}, ks[2] = {1, kv}, gs[2] = {1, ff}, ls[2] = {1, vocab};
  int64_t q3[3] = {1, 32, 128}, k3[3] = {1, 8, 128};
  c.x = dev_tensor(MSH_F32, 2, xs);
  c.h = dev_tensor(MSH_F32, 2, xs);
  c.qf = dev_tensor(MSH_F32, 2, xs);
  c.kf = dev_tensor(MSH_F32, 2, ks);
  c.vf = dev_tensor(MSH_F32, 2, ks);
  c.att = dev_tensor(MSH_F32, 3, q3);
  c.o = dev_tensor(MSH_F32, 2, xs);
  c.g = dev_tensor(MSH_F32, 2, gs);
  c.u = dev_tensor(MSH_F32, 2, gs);
  c.logits = dev_tensor(MSH_F32, 2, ls);
  c.q3 = ds_view(c.qf, 3, q3);
  c.k3 = ds_view(c.kf, 3, k3);
  c.v3 = ds_view(c.vf, 3, k3);
  c.att2 = ds_view(c.att, 2, xs);
  OK(msh_tensor_randn(c.x, seed++, 0.0f, 1.0f));
  set_i32(c.pos, (int32_t)pos);

  double t = time_op(ds_step, &c, 5, 9); /* eager: the host issues 546 ops a step */
  /* the same step as one graph; warm-up above sized the scratch */
  msh_graph *g = NULL;
  OK(msh_graph_begin(MSH_CUDA, 0));
  ds_step(&c, 0);
  OK(msh_graph_end(MSH_CUDA, 0, &g));
  cudaEvent_t e0, e1;
  CU(cudaEventCreate(&e0));
  CU(cudaEventCreate(&e1));
  enum { STEPS = 5 }; /* replays a sample */
  double tg[9], tp[9];
  for (int r = 0; r < 9; r++) { /* replays back to back: device time */
    CU(cudaEventRecord(e0, stream));
    for (int i = 0; i < STEPS; i++) OK(msh_graph_launch(g));
    CU(cudaEventRecord(e1, stream));
    CU(cudaEventSynchronize(e1));
    float ms = 0;
    CU(cudaEventElapsedTime(&ms, e0, e1));
    tg[r] = ms * 1e-3 / STEPS;
  }
  for (int r = 0; r < 9; r++) { /* a token loop: upload the position, replay, wait (host clock) */
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < STEPS; i++) {
      set_i32(c.pos, (int32_t)(pos + i));
      OK(msh_graph_launch(g));
    }
    OK(msh_device_sync(MSH_CUDA, 0));
    clock_gettime(CLOCK_MONOTONIC, &b);
    tp[r] = ((double)(b.tv_sec - a.tv_sec) + (double)(b.tv_nsec - a.tv_nsec) * 1e-9) / STEPS;
  }
  qsort(tg, 9, sizeof tg[0], cmp_double);
  qsort(tp, 9, sizeof tp[0], cmp_double);
  double wbytes = 32 * (2.0 * 4096 * 4096 + 2.0 * 1024 * 4096 + 3.0 * 14336 * 4096) * 2 + 128256.0 * 4096 * 2;
  double kvbytes = 32 * 2.0 * (double)(pos + 1) * 8 * 128 * 2;
  printf("{\"bench\":\"decode_step_graph\",\"model\":\"llama-3-8b shape, bf16\",\"layers\":32,\"ops\":%d,"
         "\"pos\":%lld,\"max_len\":%lld,\"us_eager\":%.1f,\"us_graph\":%.1f,\"us_graph_pos_upload\":%.1f,"
         "\"floor_us\":%.1f}\n",
         DS_LAYERS * 17 + 2, (long long)pos, (long long)max_len, t * 1e6, tg[4] * 1e6, tp[4] * 1e6,
         (wbytes + kvbytes) / copy_bw * 1e6);
  fflush(stdout);
  CU(cudaEventDestroy(e0));
  CU(cudaEventDestroy(e1));
  msh_graph_free(g);
  for (int s = 0; s < DS_SETS; s++) {
    ds_layer *w = &c.w[s];
    msh_tensor *all[] = {w->wq, w->wo, w->wk, w->wv, w->wg, w->wu, w->wd, w->n1, w->n2};
    for (int i = 0; i < 9; i++) msh_tensor_free(all[i]);
  }
  for (int l = 0; l < DS_LAYERS; l++) {
    msh_tensor_free(c.kc[l]);
    msh_tensor_free(c.vc[l]);
  }
  msh_tensor *rest[] = {c.norm, c.head, c.inv_freq, c.pos, c.x, c.h, c.qf, c.kf, c.vf, c.att,
                        c.o, c.g, c.u, c.logits, c.q3, c.k3, c.v3, c.att2};
  for (size_t i = 0; i < sizeof rest / sizeof rest[0]; i++) msh_tensor_free(rest[i]);
}

/* ------------------------------------------------------------------------- file uploads */

static double wall(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Median seconds of msh_tensor_copy(dst, src) followed by a device sync (5 runs after one). */
static double time_copy(msh_tensor *dst, const msh_tensor *src) {
  double t[5];
  OK(msh_tensor_copy(dst, src));
  OK(msh_device_sync(MSH_CUDA, 0));
  for (int r = 0; r < 5; r++) {
    double t0 = wall();
    OK(msh_tensor_copy(dst, src));
    OK(msh_device_sync(MSH_CUDA, 0));
    t[r] = wall() - t0;
  }
  qsort(t, 5, sizeof t[0], cmp_double);
  return t[2];
}

/* Weights from a 1 GiB file in the page cache to the device through the staging buffers (as is,
 * and f32 -> bf16 converted on the device), against pinned and pageable cudaMemcpy of the same
 * size measured now. Target: >= 3 GB/s (ideally near the pinned ceiling). */
static void bench_upload_file(void) {
  const char *dir = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
  char path[512];
  snprintf(path, sizeof path, "%s/msh_bench_upload_XXXXXX", dir);
  int fd = mkstemp(path);
  if (fd < 0) {
    fprintf(stderr, "bench_gpu_ops: cannot create a file in %s: upload benchmark skipped\n", dir);
    return;
  }
  const size_t bytes = (size_t)1 << 30, block = (size_t)16 << 20;
  float *buf = malloc(block);
  for (size_t i = 0; i < block / 4; i++) buf[i] = (float)(i % 1000) * 1e-3f;
  size_t done = 0;
  while (done < bytes) {
    ssize_t w = write(fd, buf, block);
    if (w <= 0) break;
    done += (size_t)w;
  }
  close(fd);
  free(buf);
  msh_file *f = NULL;
  if (done < bytes || msh_file_open(&f, path) != MSH_OK) {
    fprintf(stderr, "bench_gpu_ops: cannot write %zu bytes to %s: upload benchmark skipped\n", bytes, path);
    unlink(path);
    return;
  }
  int64_t n16 = (int64_t)(bytes / 2), n32 = (int64_t)(bytes / 4);
  msh_tensor *src16 = NULL, *src32 = NULL, *dst = NULL, *dst32 = NULL;
  OK(msh_tensor_from_file(&src16, f, 0, MSH_BF16, 1, &n16));
  OK(msh_tensor_from_file(&src32, f, 0, MSH_F32, 1, &n32));
  OK(msh_tensor_new(&dst, MSH_BF16, 1, &n16, MSH_CUDA, 0));
  OK(msh_tensor_new(&dst32, MSH_BF16, 1, &n32, MSH_CUDA, 0));
  volatile char sink = 0; /* read the file once: the runs below copy from the page cache */
  for (size_t i = 0; i < bytes; i += 4096) sink ^= ((const char *)msh_file_data(f))[i];
  (void)sink;
  double t_same = time_copy(dst, src16);
  double t_conv = time_copy(dst32, src32);
  /* ceilings of the same size: one cudaMemcpy from pinned memory, and from the mapped file */
  void *pinned = NULL;
  double t_pinned = 0, t_pageable = 0;
  if (cudaMallocHost(&pinned, bytes) == cudaSuccess) {
    memset(pinned, 1, bytes);
    CU(cudaMemcpy(msh_tensor_data(dst), pinned, bytes, cudaMemcpyHostToDevice));
    double t0 = wall();
    CU(cudaMemcpy(msh_tensor_data(dst), pinned, bytes, cudaMemcpyHostToDevice));
    t_pinned = wall() - t0;
    cudaFreeHost(pinned);
  }
  (void)cudaGetLastError();
  {
    double t0 = wall();
    CU(cudaMemcpy(msh_tensor_data(dst), msh_file_data(f), bytes, cudaMemcpyHostToDevice));
    t_pageable = wall() - t0;
  }
  uint64_t chunk = 0;
  int nbuf = 0;
  OK(msh_device_staging_stats(MSH_CUDA, 0, &chunk, &nbuf, NULL, NULL));
  printf("{\"bench\":\"upload_file\",\"bytes\":%zu,\"staging_buffers\":%d,\"staging_chunk_MiB\":%.0f,"
         "\"GBps\":%.2f,\"GBps_f32_to_bf16\":%.2f,\"pinned_memcpy_GBps\":%.2f,\"pageable_memcpy_GBps\":%.2f,"
         "\"fraction_of_pinned\":%.3f,\"target_GBps\":3}\n",
         bytes, nbuf, chunk / 1048576.0, bytes / t_same / 1e9, bytes / t_conv / 1e9,
         t_pinned > 0 ? bytes / t_pinned / 1e9 : 0.0, bytes / t_pageable / 1e9,
         t_pinned > 0 ? t_pinned / t_same : 0.0);
  msh_tensor_free(dst32);
  msh_tensor_free(dst);
  msh_tensor_free(src32);
  msh_tensor_free(src16);
  msh_file_free(f);
  unlink(path);
}

/* --------------------------------------------------------------------------- stream overlap */

/* A prefetch's shape: 64 MiB uploaded from pinned memory on a copy stream while the compute
 * stream runs matmuls of about the same length (4096 x 4096 bf16, 64 rows), each alone and
 * then together, ordered by events (the compute waits for nothing, the copy for nothing; the
 * span ends when both are done). Device time from events on the compute stream. */
static void bench_stream_overlap(void) {
  const int64_t bytes = 64 << 20, n = bytes / 4;
  int64_t hs[1] = {n}, xs[2] = {64, 4096}, ws[2] = {4096, 4096};
  msh_tensor *host = NULL, *dev = NULL, *x = NULL, *w = NULL, *o = NULL;
  OK(msh_tensor_new_pinned(&host, MSH_F32, 1, hs));
  OK(msh_tensor_new(&dev, MSH_F32, 1, hs, MSH_CUDA, 0));
  OK(msh_tensor_new(&x, MSH_F32, 2, xs, MSH_CUDA, 0));
  OK(msh_tensor_new(&w, MSH_BF16, 2, ws, MSH_CUDA, 0));
  OK(msh_tensor_new(&o, MSH_F32, 2, xs, MSH_CUDA, 0));
  OK(msh_tensor_randn(x, 1, 0, 1));
  OK(msh_tensor_randn(w, 2, 0, 0.02f));
  msh_stream *comp = NULL, *copy = NULL;
  msh_event *t0 = NULL, *t1 = NULL, *copied = NULL;
  OK(msh_stream_new(&comp, MSH_CUDA, 0));
  OK(msh_stream_new(&copy, MSH_CUDA, 0));
  OK(msh_event_new(&t0, MSH_CUDA, 0));
  OK(msh_event_new(&t1, MSH_CUDA, 0));
  OK(msh_event_new(&copied, MSH_CUDA, 0));
  OK(msh_device_sync(MSH_CUDA, 0));
  OK(msh_stream_set_current(MSH_CUDA, 0, comp));
  /* matmuls per round: about as long as the copy (measured once) */
  int k = 1;
  float ms_copy1 = 0, ms_mm1 = 0;
  for (int pass = 0; pass < 2; pass++) {
    OK(msh_event_record(t0, copy));
    OK(msh_tensor_copy_async(dev, host, copy));
    OK(msh_event_record(t1, copy));
    OK(msh_event_sync(t1));
    OK(msh_event_elapsed_ms(t0, t1, &ms_copy1));
    OK(msh_event_record(t0, NULL));
    OK(msh_op_matmul(o, x, w));
    OK(msh_event_record(t1, NULL));
    OK(msh_event_sync(t1));
    OK(msh_event_elapsed_ms(t0, t1, &ms_mm1));
  }
  k = ms_mm1 > 0 ? (int)(ms_copy1 / ms_mm1 + 0.5f) : 1;
  if (k < 1) k = 1;
  if (k > 4096) k = 4096;
  double t_copy[16], t_comp[16], t_both[16];
  const int reps = 9;
  for (int r = 0; r < reps; r++) {
    float ms = 0;
    /* the copy alone */
    OK(msh_event_record(t0, copy));
    OK(msh_tensor_copy_async(dev, host, copy));
    OK(msh_event_record(t1, copy));
    OK(msh_event_sync(t1));
    OK(msh_event_elapsed_ms(t0, t1, &ms));
    t_copy[r] = ms;
    /* the compute alone */
    OK(msh_event_record(t0, NULL));
    for (int i = 0; i < k; i++) OK(msh_op_matmul(o, x, w));
    OK(msh_event_record(t1, NULL));
    OK(msh_event_sync(t1));
    OK(msh_event_elapsed_ms(t0, t1, &ms));
    t_comp[r] = ms;
    /* both: the copy stream starts after t0, the compute stream ends by waiting for the copy */
    OK(msh_event_record(t0, NULL));
    OK(msh_stream_wait_event(copy, t0));
    OK(msh_tensor_copy_async(dev, host, copy));
    OK(msh_event_record(copied, copy));
    for (int i = 0; i < k; i++) OK(msh_op_matmul(o, x, w));
    OK(msh_stream_wait_event(NULL, copied));
    OK(msh_event_record(t1, NULL));
    OK(msh_event_sync(t1));
    OK(msh_event_elapsed_ms(t0, t1, &ms));
    t_both[r] = ms;
  }
  qsort(t_copy, reps, sizeof(double), cmp_double);
  qsort(t_comp, reps, sizeof(double), cmp_double);
  qsort(t_both, reps, sizeof(double), cmp_double);
  double c = t_copy[reps / 2], m = t_comp[reps / 2], b = t_both[reps / 2];
  printf("{\"bench\":\"stream_overlap\",\"copy_MiB\":%lld,\"pinned\":%d,\"matmuls\":%d,\"copy_ms\":%.3f,"
         "\"copy_GB_s\":%.1f,\"compute_ms\":%.3f,\"overlapped_ms\":%.3f,\"serial_ms\":%.3f,\"hidden\":%.2f}\n",
         (long long)(bytes >> 20), msh_tensor_is_pinned(host), k, c, bytes / (c * 1e-3) / 1e9, m, b, c + m,
         (c + m - b) / (c < m ? c : m));
  OK(msh_stream_set_current(MSH_CUDA, 0, NULL));
  msh_event_free(t0);
  msh_event_free(t1);
  msh_event_free(copied);
  msh_stream_free(comp);
  msh_stream_free(copy);
  msh_tensor_free(host);
  msh_tensor_free(dev);
  msh_tensor_free(x);
  msh_tensor_free(w);
  msh_tensor_free(o);
}

/* ----------------------------------------------------------------------------------- main */

/* argv[1], when given, runs only the benchmarks whose name contains it (for profilers), against
 * the H200 ceilings of PERFORMANCE.md instead of measured ones. */
static const char *only = NULL;
static int wanted(const char *name) { return !only || strstr(name, only) != NULL; }

int main(int argc, char **argv) {
  only = argc > 1 ? argv[1] : NULL;
  int count = 0;
  OK(msh_device_count(MSH_CUDA, &count));
  if (count == 0) {
    printf("{\"bench\":\"skipped\",\"reason\":\"no CUDA device\"}\n");
    return 0;
  }
  OK(msh_cuda_stream(0, &stream));
  struct cudaDeviceProp prop;
  CU(cudaGetDeviceProperties(&prop, 0));
  printf("{\"bench\":\"device\",\"name\":\"%s\",\"sm\":%d,\"l2_MB\":%.0f,\"mem_GB\":%.1f}\n", prop.name,
         prop.multiProcessorCount, prop.l2CacheSize / 1048576.0, prop.totalGlobalMem / 1e9);
  if (only) {
    copy_bw = 4.21e12;
    gemm_rate = 795e12;
  } else {
    measure_ceilings();
  }

  /* Llama-3-8B projections (N, K): q/o, k/v, gate/up, down, lm head */
  static const int64_t shapes[][2] = {{4096, 4096}, {1024, 4096}, {14336, 4096}, {4096, 14336}, {128256, 4096}};
  double t1[5] = {0};
  if (wanted("gemv_decode")) {
    for (int s = 0; s < 5; s++) {
      t1[s] = bench_matmul(1, shapes[s][0], shapes[s][1], "gemv");
      bench_matmul(1, shapes[s][0], shapes[s][1], "cublas");
      for (int64_t M = 2; M <= 16; M *= 2) {
        if (M != 16 && s != 0 && s != 2) continue; /* the small-batch sweep on two shapes */
        bench_matmul(M, shapes[s][0], shapes[s][1], "gemv");
        bench_matmul(M, shapes[s][0], shapes[s][1], "cublas");
      }
      bench_matmul(64, shapes[s][0], shapes[s][1], "cublas");
    }
    /* shapes of the M = 1 kernel (see msh_k_gemv_variant; "gemv" is the default choice) */
    static const int64_t fused[2][2] = {{6144, 4096}, {28672, 4096}}; /* stacked q/k/v, gate/up */
    for (int v = 0; v <= 7; v++) {
      char path[16];
      snprintf(path, sizeof path, "gemv-v%d", v);
      for (int s = 0; s < 5; s++) bench_matmul(1, shapes[s][0], shapes[s][1], path);
      for (int s = 0; s < 2; s++) bench_matmul(1, fused[s][0], fused[s][1], path);
    }
    /* one decode token's projections (graph times): 32 layers x (q, k, v, o, gate, up, down) + lm head */
    double step = 32 * (2 * t1[0] + 2 * t1[1] + 2 * t1[2] + t1[3]) + t1[4];
    double wbytes = 32 * (2.0 * 4096 * 4096 + 2.0 * 1024 * 4096 + 3.0 * 14336 * 4096) * 2 + 128256.0 * 4096 * 2;
    printf("{\"bench\":\"llama3_8b_decode_matmuls_b1\",\"us\":%.1f,\"floor_us\":%.1f,\"efficiency\":%.3f,\"tok_s\":%.1f}\n",
           step * 1e6, wbytes / copy_bw * 1e6, wbytes / copy_bw / step, 1.0 / step);
  }
  if (wanted("gemv_quant")) bench_gemv_quant();
  if (wanted("gemm_prefill"))
    for (int s = 0; s < 5; s++) bench_matmul(2048, shapes[s][0], shapes[s][1], "cublas");
  if (wanted("attn_decode")) {
    bench_attention(1, 1, 256, 0, "attn_decode");
    bench_attention(1, 1, 1024, 0, "attn_decode");
    bench_attention(1, 1, 2048, 0, "attn_decode");
    bench_attention(1, 1, 4096, 0, "attn_decode");
    bench_attention(1, 1, 8192, 0, "attn_decode");
    bench_attention(1, 1, 32768, 0, "attn_decode");
    bench_attention(1, 16, 8192, 0, "attn_decode");
  }
  /* decode attention at batch 64: the batch fills the GPU, one key chunk per sequence */
  if (wanted("attn_decode_batch64")) {
    bench_attention(64, 1, 1024, 0, "attn_decode_batch64");
    bench_attention(64, 1, 1024, 1, "attn_decode_batch64");
    bench_attention(64, 1, 4096, 1, "attn_decode_batch64");
  }
  if (wanted("attn_prefill")) {
    bench_attention(1, 2048, 2048, 0, "attn_prefill");
    bench_attention(8, 512, 512, 0, "attn_prefill_batch8");
    /* each block tile forced (kernels/attn_prefill.cu reads it at every launch) */
    static const char *tiles[] = {"64x64", "128x32", "wg128x128"};
    for (size_t i = 0; i < sizeof tiles / sizeof tiles[0]; i++) {
      char name[64];
      setenv("MSH_ATTN_TILE", tiles[i], 1);
      snprintf(name, sizeof name, "attn_prefill_%s", tiles[i]);
      bench_attention(1, 2048, 2048, 0, name);
      snprintf(name, sizeof name, "attn_prefill_batch8_%s", tiles[i]);
      bench_attention(8, 512, 512, 0, name);
    }
    unsetenv("MSH_ATTN_TILE");
  }
  if (wanted("decode_step")) {
    bench_decode_step(1000, 4096);
    bench_decode_step(1000, 1024);
  }
  if (wanted("upload_file")) bench_upload_file();
  if (wanted("fused")) bench_fused();
  if (wanted("stream_overlap")) bench_stream_overlap();
  return 0;
}
