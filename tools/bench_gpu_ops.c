/* bench_gpu_ops.c: micro-benchmarks of the CUDA ops at the Llama-3-8B decode and prefill shapes,
 * against floors computed from ceilings measured in the same run (device-to-device copy
 * bandwidth, cuBLAS bf16 8192^3 GEMM rate). Prints one JSON object per line; efficiency is
 * floor / measured time (1.0 = at the ceiling). Not a test: nothing here asserts a timing.
 *
 * Timing: CUDA events around a batch of `inner` back-to-back launches on the op stream, after
 * warm-up; the median batch over `reps` batches, divided by inner. Weights and caches rotate over
 * enough copies to exceed the L2 cache, so each run reads device memory. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

/* --------------------------------------------------------------------------- attention */

typedef struct {
  msh_tensor *q, *out, *k[64], *v[64];
  int nkv;
  int64_t pos0;
  float scale;
} at_ctx;

static void at_op(void *p, int i) {
  at_ctx *c = p;
  OK(msh_op_attention(c->out, c->q, c->k[i % c->nkv], c->v[i % c->nkv], c->pos0, c->scale));
}

static void bench_attention(int64_t T, int64_t ctx, const char *name) {
  const int64_t H = 32, KVH = 8, hd = 128;
  at_ctx c = {0};
  int64_t qs[3] = {T, H, hd}, ks[3] = {ctx, KVH, hd};
  double kvbytes = 2.0 * ctx * KVH * hd * 2;
  c.nkv = (int)ceil(512e6 / kvbytes);
  if (c.nkv > 64) c.nkv = 64;
  if (c.nkv < 1) c.nkv = 1;
  c.q = dev_tensor(MSH_F32, 3, qs);
  c.out = dev_tensor(MSH_F32, 3, qs);
  fill_random(c.q, 20);
  for (int i = 0; i < c.nkv; i++) {
    c.k[i] = dev_tensor(MSH_BF16, 3, ks);
    c.v[i] = dev_tensor(MSH_BF16, 3, ks);
    fill_random(c.k[i], 21 + 2 * (uint64_t)i);
    fill_random(c.v[i], 22 + 2 * (uint64_t)i);
  }
  c.pos0 = ctx - T;
  c.scale = 1.0f / sqrtf((float)hd);
  /* causal pairs (query, visible key) over all heads: QK^T and PV are 2 * hd FLOPs each */
  double pairs = (double)T * c.pos0 + (double)T * (T + 1) / 2;
  double flops = 4.0 * hd * H * pairs;
  double bytes = kvbytes + 2.0 * T * H * hd * 4;
  double t = time_op(at_op, &c, T > 1 ? 5 : 20, 15);
  double tg = time_graph(at_op, &c, T > 1 ? 5 : 20, 15);
  const char *kind;
  double fl = floor_of(bytes, flops, &kind);
  char extra[160];
  snprintf(extra, sizeof extra, "\"op\":\"attention\",\"kv\":\"bf16\",\"T\":%lld,\"ctx\":%lld,\"H\":32,\"KVH\":8,\"hd\":128,",
           (long long)T, (long long)ctx);
  report(name, extra, t, tg, fl, kind, bytes, flops);
  msh_tensor_free(c.q);
  msh_tensor_free(c.out);
  for (int i = 0; i < c.nkv; i++) {
    msh_tensor_free(c.k[i]);
    msh_tensor_free(c.v[i]);
  }
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
    for (int v = 1; v <= 5; v++)
      for (int s = 0; s < 5; s++) {
        char path[16];
        snprintf(path, sizeof path, "gemv-v%d", v);
        bench_matmul(1, shapes[s][0], shapes[s][1], path);
      }
    /* one decode token's projections (graph times): 32 layers x (q, k, v, o, gate, up, down) + lm head */
    double step = 32 * (2 * t1[0] + 2 * t1[1] + 2 * t1[2] + t1[3]) + t1[4];
    double wbytes = 32 * (2.0 * 4096 * 4096 + 2.0 * 1024 * 4096 + 3.0 * 14336 * 4096) * 2 + 128256.0 * 4096 * 2;
    printf("{\"bench\":\"llama3_8b_decode_matmuls_b1\",\"us\":%.1f,\"floor_us\":%.1f,\"efficiency\":%.3f,\"tok_s\":%.1f}\n",
           step * 1e6, wbytes / copy_bw * 1e6, wbytes / copy_bw / step, 1.0 / step);
  }
  if (wanted("gemm_prefill"))
    for (int s = 0; s < 5; s++) bench_matmul(2048, shapes[s][0], shapes[s][1], "cublas");
  if (wanted("attn_decode")) {
    bench_attention(1, 1024, "attn_decode");
    bench_attention(1, 8192, "attn_decode");
    bench_attention(1, 32768, "attn_decode");
    bench_attention(16, 8192, "attn_decode");
  }
  if (wanted("attn_prefill")) bench_attention(2048, 2048, "attn_prefill");
  return 0;
}
