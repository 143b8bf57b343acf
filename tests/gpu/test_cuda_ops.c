/* test_cuda_ops.c: every op of the CUDA backend against the CPU backend on fresh random inputs
 * (after ggml's test-backend-ops): odd sizes, every weight and cache dtype, GQA ratios 1 to 12,
 * contexts past 8k, one and many queries at pos0 > 0; batched attention and set_rows (batch 64
 * decode at context 1k, per-sequence positions, narrowed fused caches, batched prefill, a captured
 * batch-64 decode graph); outputs poisoned with NaN beforehand so an unwritten element fails. Also: device out-of-memory and a device index that does not exist.
 * Exits 77 (skipped) when there is no CUDA device. */
#define _POSIX_C_SOURCE 200809L /* setenv */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "check.h"
#include "gpu_helpers.h"
#include "moonshard.h"

/* ------------------------------------------------------------------------------ helpers */

/* A device f32 tensor full of NaN: any element an op leaves unwritten fails the comparison. */
static msh_tensor *gpu_poisoned(int ndim, const int64_t *shape) {
  msh_tensor *h = cpu_new(MSH_F32, ndim, shape);
  if (!h) return NULL;
  float *p = msh_tensor_data(h);
  for (int64_t i = 0; i < msh_tensor_numel(h); i++) p[i] = NAN;
  msh_tensor *g = to_gpu(h);
  msh_tensor_free(h);
  return g;
}

/* Bit-exact comparison of two tensors of one dtype (the device one is downloaded). */
static void compare_bits(const char *what, const msh_tensor *got_gpu, const msh_tensor *want) {
  msh_tensor *got = to_cpu(got_gpu);
  if (!got) return;
  size_t bytes = (size_t)msh_tensor_numel(want) * msh_dtype_size(msh_tensor_dtype(want));
  int same = msh_tensor_dtype(got) == msh_tensor_dtype(want) && !memcmp(msh_tensor_data(got), msh_tensor_data(want), bytes);
  char msg[256];
  snprintf(msg, sizeof msg, "%s: device bytes equal the CPU's", what);
  CHECK(same);
  if (!same) fprintf(stderr, "  %s\n", msg);
  printf("  %-66s %s\n", what, same ? "bit-exact" : "DIFFERENT");
  msh_tensor_free(got);
}

static const int float_dtypes[3] = {MSH_F32, MSH_F16, MSH_BF16};

/* ------------------------------------------------------------------------------ devices */

static void test_devices(int count) {
  printf("devices: %d CUDA device(s)\n", count);
  msh_tensor *t = NULL;
  int64_t shape[1] = {16};
  CHECK_STATUS(msh_tensor_new(&t, MSH_F32, 1, shape, MSH_CUDA, count), MSH_EINVAL);
  CHECK(strstr(msh_last_error(), "does not exist") != NULL);
  printf("  bad index: %s\n", msh_last_error());
  CHECK_STATUS(msh_tensor_new(&t, MSH_F32, 1, shape, MSH_CUDA, -1), MSH_EINVAL);
  CHECK(t == NULL);
}

static void test_oom(void) {
  printf("out of memory\n");
  msh_tensor *t = NULL;
  int64_t huge[2] = {1LL << 20, 1LL << 20}; /* 4 TiB of f32: more than any GPU holds */
  CHECK_STATUS(msh_tensor_new(&t, MSH_F32, 2, huge, MSH_CUDA, 0), MSH_ENOMEM);
  CHECK(t == NULL);
  CHECK(strstr(msh_last_error(), "free") != NULL);
  printf("  %s\n", msh_last_error());
  msh_arena *a = NULL;
  CHECK_STATUS(msh_arena_new(&a, MSH_CUDA, 0, 1ULL << 42), MSH_ENOMEM);
  CHECK(a == NULL);
  /* the device still works afterwards */
  int64_t small[1] = {1000};
  msh_tensor *c = cpu_randn(MSH_F32, 1, small, 1.0f);
  msh_tensor *g = to_gpu(c);
  msh_tensor *x = gpu_poisoned(1, small);
  if (c && g && x) {
    CHECK_OK(msh_op_scale(x, g, 1.0f));
    COMPARE("small allocation and op after ENOMEM", x, c, 1e-7);
  }
  msh_tensor *ts[] = {c, g, x};
  free_all(ts, 3);
}

/* ------------------------------------------------------------------------------- copies */

static void test_copy(void) {
  printf("copy\n");
  int64_t shape[2] = {37, 53};
  for (int i = 0; i < 3; i++)
    for (int j = 0; j < 3; j++) {
      int sdt = float_dtypes[i], ddt = float_dtypes[j];
      msh_tensor *cs = cpu_randn(sdt, 2, shape, 3.0f);
      msh_tensor *gs = to_gpu(cs);
      msh_tensor *cd = cpu_new(ddt, 2, shape), *gd = gpu_new(ddt, 2, shape);
      char what[96];
      if (cs && gs && cd && gd) {
        CHECK_OK(msh_tensor_copy(cd, cs));
        CHECK_OK(msh_tensor_copy(gd, gs));
        snprintf(what, sizeof what, "contiguous %s -> %s", msh_dtype_name(sdt), msh_dtype_name(ddt));
        compare_bits(what, gd, cd);
      }
      /* transposed source: the strided kernel */
      msh_tensor *ct = NULL, *gt = NULL;
      int64_t tshape[2] = {53, 37};
      msh_tensor *cd2 = cpu_new(ddt, 2, tshape), *gd2 = gpu_new(ddt, 2, tshape);
      if (cs && gs) {
        CHECK_OK(msh_tensor_transpose(&ct, cs, 0, 1));
        CHECK_OK(msh_tensor_transpose(&gt, gs, 0, 1));
      }
      if (ct && gt && cd2 && gd2) {
        CHECK_OK(msh_tensor_copy(cd2, ct));
        CHECK_OK(msh_tensor_copy(gd2, gt));
        snprintf(what, sizeof what, "transposed %s -> %s", msh_dtype_name(sdt), msh_dtype_name(ddt));
        compare_bits(what, gd2, cd2);
      }
      msh_tensor *ts[] = {cs, gs, cd, gd, ct, gt, cd2, gd2};
      free_all(ts, 8);
    }

  /* set_rows into a cache view with a row stride (rows copy), with and without conversion */
  for (int j = 0; j < 3; j++) {
    int cdt = float_dtypes[j];
    int64_t cshape[4] = {50, 2, 3, 40}; /* (S, k|v, KVH, hd) */
    msh_tensor *cc = cpu_randn(cdt, 4, cshape, 1.0f), *gc = NULL;
    if (cc) gc = to_gpu(cc);
    msh_tensor *ck = NULL, *gk = NULL;
    int64_t kshape[3] = {50, 3, 40}, kstride[3] = {2 * 3 * 40, 40, 1};
    if (cc && gc) {
      CHECK_OK(msh_tensor_view(&ck, cc, 3, kshape, kstride, 3 * 40)); /* the v half */
      CHECK_OK(msh_tensor_view(&gk, gc, 3, kshape, kstride, 3 * 40));
    }
    int64_t rshape[3] = {7, 3, 40};
    msh_tensor *cr = cpu_randn(MSH_F32, 3, rshape, 1.0f), *gr = cr ? to_gpu(cr) : NULL;
    if (ck && gk && cr && gr) {
      CHECK_OK(msh_op_set_rows(ck, 41, cr));
      CHECK_OK(msh_op_set_rows(gk, 41, gr));
      char what[96];
      snprintf(what, sizeof what, "set_rows f32 -> %s cache view (row stride 240)", msh_dtype_name(cdt));
      compare_bits(what, gc, cc);
      msh_tensor *cr2 = NULL, *gr2 = NULL;
      CHECK_OK(msh_tensor_contiguous(&cr2, cr, cdt));
      CHECK_OK(msh_tensor_contiguous(&gr2, gr, cdt));
      if (cr2 && gr2) {
        CHECK_OK(msh_op_set_rows(ck, 3, cr2));
        CHECK_OK(msh_op_set_rows(gk, 3, gr2));
        snprintf(what, sizeof what, "set_rows %s -> %s cache view (2D memcpy)", msh_dtype_name(cdt), msh_dtype_name(cdt));
        compare_bits(what, gc, cc);
      }
      msh_tensor *ts2[] = {cr2, gr2};
      free_all(ts2, 2);
    }
    msh_tensor *ts[] = {cc, gc, ck, gk, cr, gr};
    free_all(ts, 6);
  }

  /* i32: bit-for-bit strided copy */
  int64_t ishape[2] = {9, 11};
  msh_tensor *ci = cpu_new(MSH_I32, 2, ishape);
  if (ci) {
    int32_t *p = msh_tensor_data(ci);
    for (int i = 0; i < 99; i++) p[i] = i * 7919 - 3000;
    msh_tensor *gi = to_gpu(ci), *git = NULL, *cit = NULL;
    int64_t tshape[2] = {11, 9};
    msh_tensor *cdst = cpu_new(MSH_I32, 2, tshape), *gdst = gpu_new(MSH_I32, 2, tshape);
    CHECK_OK(msh_tensor_transpose(&cit, ci, 0, 1));
    if (gi) CHECK_OK(msh_tensor_transpose(&git, gi, 0, 1));
    if (cit && git && cdst && gdst) {
      CHECK_OK(msh_tensor_copy(cdst, cit));
      CHECK_OK(msh_tensor_copy(gdst, git));
      compare_bits("transposed i32", gdst, cdst);
    }
    msh_tensor *ts[] = {ci, gi, git, cit, cdst, gdst};
    free_all(ts, 6);
  }
}

/* ---------------------------------------------------------------------------- embedding */

static void test_embedding(void) {
  printf("embedding\n");
  for (int j = 0; j < 3; j++) {
    int dt = float_dtypes[j];
    int64_t tshape[2] = {1000, 257}, ishape[1] = {9}, oshape[2] = {9, 257};
    msh_tensor *ct = cpu_randn(dt, 2, tshape, 1.0f), *gt = ct ? to_gpu(ct) : NULL;
    msh_tensor *ci = cpu_new(MSH_I32, 1, ishape);
    if (ci) {
      int32_t *ids = msh_tensor_data(ci);
      for (int i = 0; i < 9; i++) ids[i] = (int32_t)((fresh_seed() * 2654435761ULL >> 7) % 1000);
      ids[0] = 999;
      ids[1] = 0;
    }
    msh_tensor *gi = ci ? to_gpu(ci) : NULL;
    msh_tensor *co = cpu_new(MSH_F32, 2, oshape), *go = gpu_poisoned(2, oshape);
    if (ct && gt && ci && gi && co && go) {
      CHECK_OK(msh_op_embedding(co, ct, ci));
      CHECK_OK(msh_op_embedding(go, gt, gi));
      char what[64];
      snprintf(what, sizeof what, "embedding %s (1000, 257)[9]", msh_dtype_name(dt));
      COMPARE(what, go, co, 1e-7);
      /* an id outside the table */
      int32_t *ids = msh_tensor_data(ci);
      ids[4] = 1000;
      CHECK_OK(msh_tensor_copy(gi, ci));
      CHECK_STATUS(msh_op_embedding(go, gt, gi), MSH_ERANGE);
      CHECK(strstr(msh_last_error(), "1000") != NULL);
    }
    msh_tensor *ts[] = {ct, gt, ci, gi, co, go};
    free_all(ts, 6);
  }
}

/* ------------------------------------------------------------------------------ rmsnorm */

static void test_rmsnorm(void) {
  printf("rmsnorm\n");
  int64_t shapes[3][2] = {{5, 4096}, {3, 37}, {1, 5000}};
  for (int s = 0; s < 3; s++)
    for (int j = 0; j < 3; j++) {
      int dt = float_dtypes[j];
      int64_t *shape = shapes[s], wshape[1] = {shape[1]};
      msh_tensor *cx = cpu_randn(MSH_F32, 2, shape, 2.0f), *gx = cx ? to_gpu(cx) : NULL;
      msh_tensor *cw = cpu_randn(dt, 1, wshape, 1.0f), *gw = cw ? to_gpu(cw) : NULL;
      msh_tensor *co = cpu_new(MSH_F32, 2, shape), *go = gpu_poisoned(2, shape);
      if (cx && gx && cw && gw && co && go) {
        CHECK_OK(msh_op_rmsnorm(co, cx, cw, 1e-5f));
        CHECK_OK(msh_op_rmsnorm(go, gx, gw, 1e-5f));
        char what[96];
        snprintf(what, sizeof what, "rmsnorm (%lld, %lld) w %s", (long long)shape[0], (long long)shape[1],
                 msh_dtype_name(dt));
        COMPARE(what, go, co, 1e-5);
        CHECK_OK(msh_op_rmsnorm(gx, gx, gw, 1e-5f)); /* in place */
        strncat(what, " in place", sizeof what - strlen(what) - 1);
        COMPARE(what, gx, co, 1e-5);
      }
      msh_tensor *ts[] = {cx, gx, cw, gw, co, go};
      free_all(ts, 6);
    }
}

/* ------------------------------------------------------------------------------- matmul */

static void test_matmul(void) {
  printf("matmul\n");
  static const int64_t cases[][3] = {/* M, N, K */
                                     {1, 4096, 4096}, {1, 37, 100},  {2, 1000, 64},   {3, 1000, 64},
                                     {5, 129, 13},    {8, 300, 512}, {16, 300, 4096}, {1, 32000, 512},
                                     {17, 513, 256},  {77, 1000, 512}, {64, 96, 1000},
                                     {1, 4099, 2048}, {1, 5000, 1999}};
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
    for (int j = 0; j < 3; j++) {
      int dt = float_dtypes[j];
      int64_t M = cases[c][0], N = cases[c][1], K = cases[c][2];
      int64_t xs[2] = {M, K}, ws[2] = {N, K}, os[2] = {M, N};
      msh_tensor *cx = cpu_randn(MSH_F32, 2, xs, 1.0f), *gx = cx ? to_gpu(cx) : NULL;
      msh_tensor *cw = cpu_randn(dt, 2, ws, 0.05f), *gw = cw ? to_gpu(cw) : NULL;
      msh_tensor *co = cpu_new(MSH_F32, 2, os), *go = gpu_poisoned(2, os);
      if (cx && gx && cw && gw && co && go) {
        CHECK_OK(msh_op_matmul(co, cx, cw));
        CHECK_OK(msh_op_matmul(go, gx, gw));
        char what[96];
        snprintf(what, sizeof what, "matmul M %lld N %lld K %lld w %s", (long long)M, (long long)N, (long long)K,
                 msh_dtype_name(dt));
        /* M = 1 reads the weights as they are (GEMV, fp32 math); larger M may round x to the
         * weights' 16-bit type for the tensor cores */
        double tol = dt == MSH_F32 || M == 1 ? 2e-5 : 1e-2;
        COMPARE(what, go, co, tol);
      }
      msh_tensor *ts[] = {cx, gx, cw, gw, co, go};
      free_all(ts, 6);
    }
  /* x as a view with an element offset (the GEMV takes its scalar path on unaligned rows) */
  int64_t xs[2] = {2, 65}, ws[2] = {33, 64}, os[2] = {1, 33};
  msh_tensor *cx = cpu_randn(MSH_F32, 2, xs, 1.0f), *gx = cx ? to_gpu(cx) : NULL;
  msh_tensor *cw = cpu_randn(MSH_BF16, 2, ws, 0.1f), *gw = cw ? to_gpu(cw) : NULL;
  msh_tensor *cv = NULL, *gv = NULL;
  int64_t vshape[2] = {1, 64};
  if (cx && gx) {
    CHECK_OK(msh_tensor_view(&cv, cx, 2, vshape, (int64_t[]){64, 1}, 1));
    CHECK_OK(msh_tensor_view(&gv, gx, 2, vshape, (int64_t[]){64, 1}, 1));
  }
  msh_tensor *co = cpu_new(MSH_F32, 2, os), *go = gpu_poisoned(2, os);
  if (cv && gv && cw && gw && co && go) {
    CHECK_OK(msh_op_matmul(co, cv, cw));
    CHECK_OK(msh_op_matmul(go, gv, gw));
    COMPARE("matmul M 1 N 33 K 64 w bf16, x at an odd element offset", go, co, 2e-5);
  }
  msh_tensor *ts[] = {cx, gx, cw, gw, cv, gv, co, go};
  free_all(ts, 8);
}

/* --------------------------------------------------------------------------------- rope */

static void test_rope(void) {
  printf("rope\n");
  static const int64_t cases[][4] = {/* T, H, hd, R */ {1, 5, 64, 32}, {7, 3, 64, 16}, {4, 8, 128, 64}, {3, 2, 96, 8}};
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
    for (int style = 0; style < 2; style++) {
      int64_t T = cases[c][0], H = cases[c][1], hd = cases[c][2], R = cases[c][3];
      int64_t xs[3] = {T, H, hd}, ps[1] = {T}, fs[1] = {R};
      msh_tensor *cx = cpu_randn(MSH_F32, 3, xs, 1.0f), *gx = cx ? to_gpu(cx) : NULL;
      msh_tensor *cp = cpu_new(MSH_I32, 1, ps), *cf = cpu_new(MSH_F32, 1, fs);
      if (cp && cf) {
        int32_t *p = msh_tensor_data(cp);
        for (int64_t t = 0; t < T; t++) p[t] = (int32_t)(9000 + 37 * t - (T > 1 ? 5000 : 0));
        float *f = msh_tensor_data(cf);
        for (int64_t i = 0; i < R; i++) f[i] = powf(500000.0f, -(float)(2 * i) / (float)(2 * R));
      }
      msh_tensor *gp = cp ? to_gpu(cp) : NULL, *gf = cf ? to_gpu(cf) : NULL;
      if (cx && gx && gp && gf) {
        CHECK_OK(msh_op_rope(cx, cp, cf, style));
        CHECK_OK(msh_op_rope(gx, gp, gf, style));
        char what[96];
        snprintf(what, sizeof what, "rope %s T %lld H %lld hd %lld R %lld", style ? "half" : "interleaved",
                 (long long)T, (long long)H, (long long)hd, (long long)R);
        COMPARE(what, gx, cx, 1e-5);
      }
      msh_tensor *ts[] = {cx, gx, cp, cf, gp, gf};
      free_all(ts, 6);
    }
}

/* ---------------------------------------------------------------------------- attention */

typedef struct {
  int64_t T, H, KVH, hd, pos0;
  int kv_dt;
  int fused; /* k and v are views into one (S, 2, KVH, hd) buffer: row stride 2 * KVH * hd */
  double tol;
} attn_case;

static void run_attention(const attn_case *ac) {
  int64_t S = ac->pos0 + ac->T + 3;
  int64_t qs[3] = {ac->T, ac->H, ac->hd};
  msh_tensor *cq = cpu_randn(MSH_F32, 3, qs, 1.0f), *gq = cq ? to_gpu(cq) : NULL;
  msh_tensor *ckv = NULL, *gkv = NULL, *ck = NULL, *cv = NULL, *gk = NULL, *gv = NULL;
  int64_t kshape[3] = {S, ac->KVH, ac->hd};
  if (ac->fused) {
    int64_t fshape[4] = {S, 2, ac->KVH, ac->hd};
    int64_t kst[3] = {2 * ac->KVH * ac->hd, ac->hd, 1};
    ckv = cpu_randn(ac->kv_dt, 4, fshape, 1.0f);
    gkv = ckv ? to_gpu(ckv) : NULL;
    if (ckv && gkv) {
      CHECK_OK(msh_tensor_view(&ck, ckv, 3, kshape, kst, 0));
      CHECK_OK(msh_tensor_view(&cv, ckv, 3, kshape, kst, ac->KVH * ac->hd));
      CHECK_OK(msh_tensor_view(&gk, gkv, 3, kshape, kst, 0));
      CHECK_OK(msh_tensor_view(&gv, gkv, 3, kshape, kst, ac->KVH * ac->hd));
    }
  } else {
    ck = cpu_randn(ac->kv_dt, 3, kshape, 1.0f);
    cv = cpu_randn(ac->kv_dt, 3, kshape, 1.0f);
    gk = ck ? to_gpu(ck) : NULL;
    gv = cv ? to_gpu(cv) : NULL;
  }
  msh_tensor *co = cpu_new(MSH_F32, 3, qs), *go = gpu_poisoned(3, qs);
  float scale = 1.0f / sqrtf((float)ac->hd);
  if (cq && gq && ck && cv && gk && gv && co && go) {
    CHECK_OK(msh_op_attention(co, cq, ck, cv, ac->pos0, scale));
    CHECK_OK(msh_op_attention(go, gq, gk, gv, ac->pos0, scale));
    char what[128];
    snprintf(what, sizeof what, "attention T %lld H %lld KVH %lld hd %lld pos0 %lld %s%s", (long long)ac->T,
             (long long)ac->H, (long long)ac->KVH, (long long)ac->hd, (long long)ac->pos0, msh_dtype_name(ac->kv_dt),
             ac->fused ? " fused-kv" : "");
    COMPARE(what, go, co, ac->tol);
  }
  msh_tensor *ts[] = {cq, gq, ckv, gkv, ck, cv, gk, gv, co, go};
  free_all(ts, 10);
}

/* the flash prefill kernel's block tiles, each forced in turn through MSH_ATTN_TILE (the kernel
 * reads it at every launch; wg128x128 runs where the device is a Hopper, else the plan's own) */
static const char *const prefill_tiles[] = {"64x64", "128x32", "wg128x128"};
#define N_PREFILL_TILES (sizeof prefill_tiles / sizeof prefill_tiles[0])

static void test_attention(void) {
  printf("attention\n");
  /* decode and short chunks (split-KV kernels). f16/bf16 caches with head dim 64 or 128 take the
   * tensor-core kernel (q and p rounded to the cache's type: 1e-2); the others compute in fp32
   * over the cache's values (2e-5): f32 caches, and head dims 36, 80, 96, 256 */
  static const attn_case decode[] = {
      {1, 8, 8, 64, 100, MSH_F32, 0, 2e-5},      {1, 32, 8, 128, 9000, MSH_BF16, 0, 1e-2},
      {1, 16, 2, 128, 8500, MSH_F16, 0, 1e-2},   {5, 8, 2, 64, 8300, MSH_BF16, 0, 1e-2},
      {3, 6, 2, 40, 33, MSH_F32, 0, 2e-5},       {2, 6, 3, 36, 500, MSH_BF16, 0, 2e-5},
      {1, 4, 1, 256, 3000, MSH_F16, 0, 2e-5},    {2, 24, 2, 64, 700, MSH_BF16, 0, 1e-2},
      {1, 32, 8, 128, 0, MSH_BF16, 0, 1e-2},     {4, 8, 2, 128, 1000, MSH_BF16, 1, 1e-2},
      {90, 4, 2, 96, 20, MSH_F32, 0, 2e-5},      {1, 32, 8, 96, 9000, MSH_BF16, 0, 2e-5},
      {3, 8, 2, 80, 700, MSH_F16, 1, 2e-5},      {1, 64, 1, 128, 2000, MSH_BF16, 0, 1e-2},
      {1, 8, 8, 128, 8200, MSH_F32, 0, 2e-5},
      /* short contexts over few tensor-core blocks: the chunks of 64 keys form one cluster */
      {1, 32, 8, 128, 255, MSH_BF16, 0, 1e-2},   {1, 32, 8, 128, 511, MSH_BF16, 0, 1e-2},
      {1, 32, 8, 128, 64, MSH_F16, 1, 1e-2},     {3, 32, 8, 128, 300, MSH_BF16, 0, 1e-2},
      {2, 8, 2, 64, 130, MSH_F16, 0, 1e-2},      {1, 64, 1, 128, 400, MSH_BF16, 0, 1e-2},
      /* longer plans in a cluster: 8 chunks of several tiles each; just past the limit, a merge */
      {1, 32, 8, 128, 2047, MSH_BF16, 0, 1e-2},  {1, 32, 8, 128, 4095, MSH_F16, 1, 1e-2},
      {2, 32, 8, 64, 1500, MSH_BF16, 0, 1e-2},   {1, 32, 8, 128, 4096, MSH_BF16, 0, 1e-2},
  };
  for (size_t i = 0; i < sizeof decode / sizeof decode[0]; i++) run_attention(&decode[i]);
  /* 8 or more queries over f16/bf16 caches: the tensor-core flash kernel (q and p rounded to the
   * cache's 16-bit type), keys split into chunks when the queries alone do not fill the GPU. The
   * 2.4M outputs of T 600 reach the tail of that rounding: the first tokens' rows average a few
   * values with the rounded weights undamped (norm-wise 1.8e-3; the worst element 0.8-1.1 times
   * the 1e-2 element limit over runs), so that case's limit is 1.5e-2 */
  static const attn_case prefill[] = {
      {200, 8, 2, 128, 0, MSH_BF16, 0, 1e-2},   {150, 8, 8, 64, 77, MSH_F16, 0, 1e-2},
      {100, 16, 2, 128, 40, MSH_BF16, 1, 1e-2}, {70, 4, 4, 128, 9000, MSH_BF16, 0, 1e-2},
      {257, 12, 4, 64, 0, MSH_BF16, 0, 1e-2},   {16, 32, 8, 128, 8000, MSH_BF16, 0, 1e-2},
      {8, 8, 1, 64, 3000, MSH_F16, 1, 1e-2},    {600, 32, 8, 128, 0, MSH_BF16, 0, 1.5e-2},
  };
  /* the kernel's own choice of block tile, then each tile forced */
  for (size_t m = 0; m <= N_PREFILL_TILES; m++) {
    if (m) {
      printf("  MSH_ATTN_TILE=%s\n", prefill_tiles[m - 1]);
      setenv("MSH_ATTN_TILE", prefill_tiles[m - 1], 1);
    }
    for (size_t i = 0; i < sizeof prefill / sizeof prefill[0]; i++) run_attention(&prefill[i]);
  }
  unsetenv("MSH_ATTN_TILE");
}

/* ------------------------------------------------------------------ batched cache ops */

/* A batched KV cache on both devices with equal contents and layouts: k, v (B, S, KVH, hd) are
 * views of sequences [b0, b0 + B) of one fused (NB, S, 2, KVH, hd) buffer (row stride 2 KVH hd,
 * batch stride 2 S KVH hd), or (fused 0) two packed tensors. */
typedef struct {
  msh_tensor *cbuf, *gbuf, *ck, *cv, *gk, *gv;
} batch_kv;

static batch_kv batch_kv_new(int dt, int fused, int64_t NB, int64_t b0, int64_t B, int64_t S, int64_t KVH,
                             int64_t hd) {
  batch_kv c = {0};
  int64_t shape[4] = {B, S, KVH, hd};
  if (!fused) {
    c.ck = cpu_randn(dt, 4, shape, 1.0f);
    c.cv = cpu_randn(dt, 4, shape, 1.0f);
    c.gk = c.ck ? to_gpu(c.ck) : NULL;
    c.gv = c.cv ? to_gpu(c.cv) : NULL;
    return c;
  }
  int64_t fshape[5] = {NB, S, 2, KVH, hd};
  int64_t st[4] = {S * 2 * KVH * hd, 2 * KVH * hd, hd, 1};
  c.cbuf = cpu_randn(dt, 5, fshape, 1.0f);
  c.gbuf = c.cbuf ? to_gpu(c.cbuf) : NULL;
  if (c.cbuf && c.gbuf) {
    CHECK_OK(msh_tensor_view(&c.ck, c.cbuf, 4, shape, st, b0 * st[0]));
    CHECK_OK(msh_tensor_view(&c.cv, c.cbuf, 4, shape, st, b0 * st[0] + KVH * hd));
    CHECK_OK(msh_tensor_view(&c.gk, c.gbuf, 4, shape, st, b0 * st[0]));
    CHECK_OK(msh_tensor_view(&c.gv, c.gbuf, 4, shape, st, b0 * st[0] + KVH * hd));
  }
  return c;
}

static void batch_kv_free(batch_kv *c) {
  msh_tensor *ts[] = {c->ck, c->cv, c->gk, c->gv, c->cbuf, c->gbuf};
  free_all(ts, 6);
}

/* (n) i32 on the CPU holding v, and its device copy. */
static void positions_new(const int32_t *v, int64_t n, msh_tensor **cpu, msh_tensor **gpu) {
  *cpu = cpu_new(MSH_I32, 1, &n);
  *gpu = NULL;
  if (!*cpu) return;
  memcpy(msh_tensor_data(*cpu), v, sizeof(int32_t) * (size_t)n);
  *gpu = to_gpu(*cpu);
}

typedef struct {
  int64_t B, T, H, KVH, hd, S, pos0;
  int kv_dt;
  int fused; /* narrowed batch range of a fused k|v buffer */
  int npos;  /* 0: host pos0 (attention); 1 or B: attention_dyn with random positions, max_len S */
  double tol;
} batch_case;

/* Random positions in [lo, hi] plus, for several sequences, the edges and one out of range on
 * each side (clamped on both devices). */
static void random_positions(int32_t *p, int64_t n, int64_t lo, int64_t hi) {
  for (int64_t i = 0; i < n; i++) {
    uint64_t z = fresh_seed() * 0xbf58476d1ce4e5b9ULL;
    z ^= z >> 31;
    p[i] = (int32_t)(lo + (int64_t)(z % (uint64_t)(hi - lo + 1)));
  }
  if (n >= 4) {
    p[0] = (int32_t)lo;
    p[1] = (int32_t)hi;
    p[2] = -7;
    p[3] = (int32_t)hi + 50;
  }
}

static void run_batch_attention(const batch_case *bc) {
  int64_t qs[4] = {bc->B, bc->T, bc->H, bc->hd};
  batch_kv c = batch_kv_new(bc->kv_dt, bc->fused, bc->B + 3, 2, bc->B, bc->S, bc->KVH, bc->hd);
  msh_tensor *cq = cpu_randn(MSH_F32, 4, qs, 1.0f), *gq = cq ? to_gpu(cq) : NULL;
  msh_tensor *co = cpu_new(MSH_F32, 4, qs), *go = gpu_poisoned(4, qs), *cp = NULL, *gp = NULL;
  float scale = 1.0f / sqrtf((float)bc->hd);
  int32_t pos[512];
  char what[200];
  int n = snprintf(what, sizeof what, "batch B %lld T %lld H %lld KVH %lld hd %lld S %lld %s%s", (long long)bc->B,
                   (long long)bc->T, (long long)bc->H, (long long)bc->KVH, (long long)bc->hd, (long long)bc->S,
                   msh_dtype_name(bc->kv_dt), bc->fused ? " narrowed-fused" : "");
  if (bc->npos && bc->npos <= 512) {
    random_positions(pos, bc->npos, 0, bc->S - bc->T);
    positions_new(pos, bc->npos, &cp, &gp);
    snprintf(what + n, sizeof what - (size_t)n, " dyn %s", bc->npos == 1 ? "one pos" : "per-seq pos");
  } else {
    snprintf(what + n, sizeof what - (size_t)n, " pos0 %lld", (long long)bc->pos0);
  }
  if (cq && gq && c.ck && c.cv && c.gk && c.gv && co && go && (!bc->npos || (cp && gp))) {
    if (bc->npos) {
      CHECK_OK(msh_op_attention_dyn(co, cq, c.ck, c.cv, cp, bc->S, scale));
      CHECK_OK(msh_op_attention_dyn(go, gq, c.gk, c.gv, gp, bc->S, scale));
    } else {
      CHECK_OK(msh_op_attention(co, cq, c.ck, c.cv, bc->pos0, scale));
      CHECK_OK(msh_op_attention(go, gq, c.gk, c.gv, bc->pos0, scale));
    }
    COMPARE(what, go, co, bc->tol);
  }
  batch_kv_free(&c);
  msh_tensor *ts[] = {cq, gq, co, go, cp, gp};
  free_all(ts, 6);
}

/* Batched set_rows (host row) and set_rows_dyn (per-sequence rows, some out of range) into a
 * narrowed batch range: the packed k cache, the k half of a fused one (row copies), and columns
 * [1, hd - 1) of it (strided copies); with and without conversion; bit for bit against the CPU. */
static void test_batch_set_rows(void) {
  const int64_t NB = 70, B = 64, S = 40, KVH = 4, hd = 24;
  for (int layout = 0; layout < 3; layout++)
    for (int j = 0; j < 3; j++)
      for (int dyn = 0; dyn < 2; dyn++) {
        int cdt = float_dtypes[j];
        int64_t T = dyn ? 1 : 3, hv = layout == 2 ? hd - 2 : hd, col0 = layout == 2 ? 1 : 0;
        int64_t fshape[5] = {NB, S, 2, KVH, hd}, pshape[4] = {NB, S, KVH, hd};
        int64_t fst[4] = {S * 2 * KVH * hd, 2 * KVH * hd, hd, 1}, pst[4] = {S * KVH * hd, KVH * hd, hd, 1};
        int64_t dshape[4] = {B, S, KVH, hv}, sshape[4] = {B, T, KVH, hv};
        const int64_t *st = layout ? fst : pst;
        msh_tensor *cc = cpu_randn(cdt, layout ? 5 : 4, layout ? fshape : pshape, 1.0f), *gc = cc ? to_gpu(cc) : NULL;
        msh_tensor *cd = NULL, *gd = NULL, *cp = NULL, *gp = NULL;
        /* host rows convert (bf16 -> f32, f32 -> f16/bf16); device rows copy equal dtypes */
        int sdt = dyn ? cdt : j == 0 ? MSH_BF16 : MSH_F32;
        msh_tensor *cs = cpu_randn(sdt, 4, sshape, 1.0f), *gs = cs ? to_gpu(cs) : NULL;
        if (cc && gc) {
          CHECK_OK(msh_tensor_view(&cd, cc, 4, dshape, st, 3 * st[0] + col0));
          CHECK_OK(msh_tensor_view(&gd, gc, 4, dshape, st, 3 * st[0] + col0));
        }
        int32_t rows[64];
        random_positions(rows, B, 0, S - T);
        positions_new(rows, B, &cp, &gp);
        if (cd && gd && cs && gs && cp && gp) {
          if (dyn) {
            CHECK_OK(msh_op_set_rows_dyn(cd, cp, cs));
            CHECK_OK(msh_op_set_rows_dyn(gd, gp, gs));
          } else {
            CHECK_OK(msh_op_set_rows(cd, 17, cs));
            CHECK_OK(msh_op_set_rows(gd, 17, gs));
          }
          char what[160];
          snprintf(what, sizeof what, "batch set_rows%s %s -> %s, %s, B %lld T %lld", dyn ? "_dyn per-seq rows" : " row 17",
                   msh_dtype_name(msh_tensor_dtype(cs)), msh_dtype_name(cdt),
                   layout == 0 ? "packed cache" : layout == 1 ? "fused k|v cache (rows)" : "column slice (strided)",
                   (long long)B, (long long)T);
          compare_bits(what, gc, cc);
        }
        msh_tensor *ts[] = {cc, gc, cd, gd, cp, gp, cs, gs};
        free_all(ts, 8);
      }
}

/* Batch-64 decode with per-sequence positions captured once into a graph and replayed at new
 * positions (written into the device tensor between replays), against the CPU. */
static void test_batch_graph(void) {
  const int64_t B = 64, H = 32, KVH = 8, hd = 128, S = 1024, T = 1;
  int64_t qs[4] = {B, T, H, hd}, rs[4] = {B, T, KVH, hd};
  batch_kv c = batch_kv_new(MSH_BF16, 1, B + 2, 1, B, S, KVH, hd);
  msh_tensor *cq = cpu_randn(MSH_F32, 4, qs, 1.0f), *gq = cq ? to_gpu(cq) : NULL;
  msh_tensor *cr = cpu_randn(MSH_F32, 4, rs, 1.0f), *gr = cr ? to_gpu(cr) : NULL;
  msh_tensor *co = cpu_new(MSH_F32, 4, qs), *go = gpu_poisoned(4, qs), *cp = NULL, *gp = NULL;
  int32_t pos[64];
  random_positions(pos, B, 0, S - T);
  positions_new(pos, B, &cp, &gp);
  float scale = 1.0f / sqrtf((float)hd);
  msh_graph *g = NULL;
  if (cq && gq && cr && gr && co && go && cp && gp && c.gk && c.gv) {
    CHECK_OK(msh_op_attention_dyn(go, gq, c.gk, c.gv, gp, S, scale)); /* scratch sized before the capture */
    CHECK_OK(msh_graph_begin(MSH_CUDA, 0));
    CHECK_OK(msh_op_set_rows_dyn(c.gk, gp, gr));
    CHECK_OK(msh_op_set_rows_dyn(c.gv, gp, gr));
    CHECK_OK(msh_op_attention_dyn(go, gq, c.gk, c.gv, gp, S, scale));
    CHECK_OK(msh_graph_end(MSH_CUDA, 0, &g));
  }
  for (int step = 0; step < 3 && g; step++) {
    if (step) {
      random_positions(pos, B, 0, S - T);
      memcpy(msh_tensor_data(cp), pos, sizeof pos);
      CHECK_OK(msh_tensor_copy(gp, cp));
    }
    CHECK_OK(msh_graph_launch(g));
    CHECK_OK(msh_op_set_rows_dyn(c.ck, cp, cr));
    CHECK_OK(msh_op_set_rows_dyn(c.cv, cp, cr));
    CHECK_OK(msh_op_attention_dyn(co, cq, c.ck, c.cv, cp, S, scale));
    char what[96];
    snprintf(what, sizeof what, "batch 64 decode graph replay %d (set_rows_dyn + attention_dyn)", step);
    COMPARE(what, go, co, 1e-2);
    compare_bits("batch 64 decode graph: cache rows", c.gbuf, c.cbuf);
  }
  msh_graph_free(g);
  batch_kv_free(&c);
  msh_tensor *ts[] = {cq, gq, cr, gr, co, go, cp, gp};
  free_all(ts, 8);
}

static void test_batch(void) {
  printf("batched attention and set_rows\n");
  /* f32 caches and head dims other than 64/128 compute in fp32 (1e-5 for f32 values, 2e-5 for
   * 16-bit ones as above); f16/bf16 caches with head dim 64 or 128 take the tensor-core kernels
   * (1e-2) */
  static const batch_case cases[] = {
      /* batch 64 decode at context ~1k, Llama-3-8B heads: one split per sequence */
      {64, 1, 32, 8, 128, 1030, 1000, MSH_BF16, 1, 0, 1e-2},
      {64, 1, 32, 8, 128, 1024, 0, MSH_BF16, 1, 64, 1e-2},
      {64, 1, 32, 8, 128, 1024, 0, MSH_BF16, 0, 1, 1e-2},
      {64, 1, 32, 8, 128, 1030, 1000, MSH_F32, 1, 0, 1e-5},
      {64, 1, 32, 8, 128, 1024, 0, MSH_F32, 0, 64, 1e-5},
      /* small batches over long caches (still split), GQA 1, 4, 8, odd sizes */
      {3, 1, 8, 8, 64, 5000, 4990, MSH_BF16, 1, 0, 1e-2},
      {3, 1, 8, 2, 64, 5000, 0, MSH_F16, 1, 3, 1e-2},
      {5, 1, 8, 1, 128, 3001, 0, MSH_BF16, 0, 5, 1e-2},
      {7, 2, 8, 2, 36, 700, 600, MSH_F32, 1, 0, 1e-5},   /* direct kernel (hd % 8 != 0) */
      {7, 2, 8, 2, 36, 700, 0, MSH_BF16, 1, 7, 2e-5},
      {4, 3, 12, 3, 80, 900, 0, MSH_F16, 1, 4, 2e-5},    /* pipe kernel, 16-bit values */
      {4, 3, 8, 8, 96, 900, 0, MSH_F32, 0, 4, 1e-5},
      {2, 5, 64, 1, 128, 2000, 0, MSH_BF16, 1, 2, 1e-2}, /* 64 heads on one kv head */
      /* batched prefill: the flash kernel (16-bit caches, hd 64/128), and fp32 decode kernels */
      {4, 200, 8, 2, 128, 203, 0, MSH_BF16, 1, 0, 1e-2},
      {3, 64, 16, 4, 64, 3000, 2900, MSH_F16, 1, 0, 1e-2},
      {5, 100, 32, 8, 128, 150, 40, MSH_BF16, 0, 0, 1e-2},
      {2, 20, 8, 2, 40, 60, 33, MSH_F32, 1, 0, 1e-5},
      {2, 16, 8, 8, 128, 8000, 7900, MSH_BF16, 1, 0, 1e-2}, /* few rows over a long cache: split */
      /* a few sequences over short caches: clusters of chunks, positions read on the device */
      {2, 1, 32, 8, 128, 512, 0, MSH_BF16, 0, 2, 1e-2},
      {3, 1, 32, 8, 128, 300, 250, MSH_F16, 1, 0, 1e-2},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_batch_attention(&cases[i]);
  /* the batched prefill cases again under each block tile forced */
  for (size_t m = 0; m < N_PREFILL_TILES; m++) {
    setenv("MSH_ATTN_TILE", prefill_tiles[m], 1);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
      if (cases[i].T >= 8 && !cases[i].npos) run_batch_attention(&cases[i]);
  }
  unsetenv("MSH_ATTN_TILE");
  test_batch_set_rows();
  test_batch_graph();
}

/* ------------------------------------------------------------------------- elementwise */

static void test_elementwise(void) {
  printf("elementwise\n");
  int64_t sizes[2] = {1000003, 4096};
  for (int s = 0; s < 2; s++) {
    int64_t shape[1] = {sizes[s]};
    msh_tensor *ca = cpu_randn(MSH_F32, 1, shape, 3.0f), *cb = cpu_randn(MSH_F32, 1, shape, 1.0f);
    msh_tensor *ga = ca ? to_gpu(ca) : NULL, *gb = cb ? to_gpu(cb) : NULL;
    msh_tensor *co = cpu_new(MSH_F32, 1, shape), *go = gpu_poisoned(1, shape);
    char what[64];
    if (ca && cb && ga && gb && co && go) {
      CHECK_OK(msh_op_silu_mul(co, ca, cb));
      CHECK_OK(msh_op_silu_mul(go, ga, gb));
      snprintf(what, sizeof what, "silu_mul n %lld", (long long)sizes[s]);
      COMPARE(what, go, co, 1e-6);
      CHECK_OK(msh_op_add(co, ca, cb));
      CHECK_OK(msh_op_add(go, ga, gb));
      snprintf(what, sizeof what, "add n %lld", (long long)sizes[s]);
      COMPARE(what, go, co, 1e-7);
      CHECK_OK(msh_op_scale(co, ca, -0.37f));
      CHECK_OK(msh_op_scale(go, ga, -0.37f));
      snprintf(what, sizeof what, "scale n %lld", (long long)sizes[s]);
      COMPARE(what, go, co, 1e-7);
      /* aliasing: out = a */
      CHECK_OK(msh_op_silu_mul(co, ca, cb));
      CHECK_OK(msh_op_silu_mul(ga, ga, gb));
      snprintf(what, sizeof what, "silu_mul in place n %lld", (long long)sizes[s]);
      COMPARE(what, ga, co, 1e-6);
    }
    msh_tensor *ts[] = {ca, cb, ga, gb, co, go};
    free_all(ts, 6);
  }
}

/* ---------------------------------------------------------------------------- add_bias */

/* In place, so out starts from random values (a row left unadded differs from the CPU's by its
 * bias, never zero); out is the first M rows of an (M + 1, N) buffer whose last row is NaN, which
 * must stay NaN (nothing written past out). */
static void test_add_bias(void) {
  printf("add_bias\n");
  const int64_t shapes[][2] = {{1, 896}, {7, 128}, {5, 131}, {64, 4096}, {3, 70000}};
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
    for (int j = 0; j < 3; j++) {
      int dt = float_dtypes[j];
      int64_t M = shapes[s][0], N = shapes[s][1], os[2] = {M, N}, bs[1] = {N}, ps[2] = {M + 1, N};
      msh_tensor *co = cpu_randn(MSH_F32, 2, os, 2.0f), *cb = cpu_randn(dt, 1, bs, 1.0f);
      msh_tensor *gb = cb ? to_gpu(cb) : NULL, *gpad = gpu_poisoned(2, ps), *go = NULL;
      if (co && cb && gb && gpad) {
        CHECK_OK(msh_tensor_narrow(&go, gpad, 0, 0, M));
        if (go) CHECK_OK(msh_tensor_copy(go, co));
        if (go) CHECK_OK(msh_op_add_bias(go, gb));
        CHECK_OK(msh_op_add_bias(co, cb));
        char what[96];
        snprintf(what, sizeof what, "add_bias (%lld, %lld) b %s", (long long)M, (long long)N, msh_dtype_name(dt));
        if (go) COMPARE(what, go, co, 1e-7);
        msh_tensor *tail = NULL, *htail = NULL;
        CHECK_OK(msh_tensor_narrow(&tail, gpad, 0, M, 1));
        if (tail) htail = to_cpu(tail);
        int nan_kept = htail != NULL;
        for (int64_t i = 0; htail && i < N; i++) nan_kept &= isnan(((const float *)msh_tensor_data(htail))[i]);
        CHECK(nan_kept);
        msh_tensor_free(tail);
        msh_tensor_free(htail);
      }
      msh_tensor *ts[] = {co, cb, gb, gpad, go};
      free_all(ts, 5);
    }
}

/* ------------------------------------------------------------------- softmax, argmax */

static void test_softmax(void) {
  printf("softmax\n");
  int64_t shapes[3][2] = {{3, 128256}, {5, 7}, {2, 1000}};
  for (int s = 0; s < 3; s++)
    for (int log = 0; log < 2; log++) {
      msh_tensor *cx = cpu_randn(MSH_F32, 2, shapes[s], 4.0f), *gx = cx ? to_gpu(cx) : NULL;
      msh_tensor *co = cpu_new(MSH_F32, 2, shapes[s]), *go = gpu_poisoned(2, shapes[s]);
      if (cx && gx && co && go) {
        CHECK_OK(log ? msh_op_log_softmax(co, cx) : msh_op_softmax(co, cx));
        CHECK_OK(log ? msh_op_log_softmax(go, gx) : msh_op_softmax(go, gx));
        char what[64];
        snprintf(what, sizeof what, "%s (%lld, %lld)", log ? "log_softmax" : "softmax", (long long)shapes[s][0],
                 (long long)shapes[s][1]);
        /* the reference sums 128k exponentials in f32 lanes: its own error reaches 1e-5 there */
        double tol = shapes[s][1] > 100000 ? 3e-5 : 1e-5;
        COMPARE(what, go, co, tol);
        CHECK_OK(log ? msh_op_log_softmax(gx, gx) : msh_op_softmax(gx, gx));
        strncat(what, " in place", sizeof what - strlen(what) - 1);
        COMPARE(what, gx, co, tol);
      }
      msh_tensor *ts[] = {cx, gx, co, go};
      free_all(ts, 4);
    }
}

static void test_argmax(void) {
  printf("argmax\n");
  int64_t shapes[8][2] = {{4, 128256}, {100, 33}, {1, 1},     {1, 128256},
                          {64, 9000},  {1, 32000}, {3, 64128}, {65, 9000}};
  for (int s = 0; s < 8; s++) {
    msh_tensor *cx = cpu_randn(MSH_F32, 2, shapes[s], 1.0f), *gx = cx ? to_gpu(cx) : NULL;
    int32_t want[100], got[100];
    if (cx && gx) {
      memset(got, 0xff, sizeof got);
      CHECK_OK(msh_op_argmax(cx, want));
      CHECK_OK(msh_op_argmax(gx, got));
      int same = !memcmp(want, got, sizeof(int32_t) * (size_t)shapes[s][0]);
      CHECK(same);
      /* into a device tensor, then back */
      msh_tensor *gi = NULL, *hi = NULL;
      CHECK_OK(msh_tensor_new(&gi, MSH_I32, 1, &shapes[s][0], MSH_CUDA, 0));
      CHECK_OK(msh_tensor_new(&hi, MSH_I32, 1, &shapes[s][0], MSH_CPU, 0));
      CHECK_OK(msh_op_argmax_into(gi, gx));
      CHECK_OK(msh_tensor_copy(hi, gi));
      CHECK(!memcmp(want, msh_tensor_data(hi), sizeof(int32_t) * (size_t)shapes[s][0]));
      msh_tensor_free(gi);
      msh_tensor_free(hi);
      printf("  argmax (%lld, %lld) %s\n", (long long)shapes[s][0], (long long)shapes[s][1], same ? "equal" : "DIFFERENT");
    }
    msh_tensor *ts[] = {cx, gx};
    free_all(ts, 2);
  }
  /* one row cut into slices (the split form): the first of equal maxima in different slices
   * wins, twice in a row (the form's per-row counter is reset for the next call) */
  int64_t big[2] = {1, 131072};
  msh_tensor *bx = cpu_new(MSH_F32, 2, big);
  if (bx) {
    float *bp = msh_tensor_data(bx);
    for (int64_t i = 0; i < big[1]; i++) bp[i] = -1.0f;
    bp[100000] = bp[5000] = 3.0f;
    msh_tensor *gb = to_gpu(bx);
    for (int rep = 0; rep < 2; rep++) {
      int32_t bi = -1;
      if (gb) CHECK_OK(msh_op_argmax(gb, &bi));
      CHECK(bi == 5000);
    }
    msh_tensor_free(gb);
  }
  msh_tensor_free(bx);
  /* ties go to the first index */
  float row[6] = {1.0f, 5.0f, -2.0f, 5.0f, 5.0f, 0.0f};
  msh_tensor *h = NULL;
  int64_t shape[1] = {6};
  CHECK_OK(msh_tensor_wrap(&h, row, MSH_F32, 1, shape));
  msh_tensor *g = h ? to_gpu(h) : NULL;
  int32_t idx = -1;
  if (g) CHECK_OK(msh_op_argmax(g, &idx));
  CHECK(idx == 1);
  msh_tensor_free(g);
  msh_tensor_free(h);
}

int main(void) {
  int count = 0;
  CHECK_OK(msh_device_count(MSH_CUDA, &count));
  if (count == 0) {
    printf("test_cuda_ops: no CUDA device, skipped\n");
    return 77;
  }
  test_devices(count);
  test_oom();
  test_copy();
  test_embedding();
  test_rmsnorm();
  test_matmul();
  test_rope();
  test_attention();
  test_batch();
  test_elementwise();
  test_add_bias();
  test_softmax();
  test_argmax();
  return check_done("test_cuda_ops");
}
