/* fused_cases.h: the fused layer ops (matmul_acc, matmul_glu, rmsnorm_matmul, qkv_rope,
 * rmsnorm_qkv_rope, rmsnorm_mlp) on a device against the
 * unfused ops composed on the CPU, on fresh random inputs: every weight dtype, the GEMV shapes of
 * decode (M = 1, with K not a multiple of 8 for the scalar path) and the cuBLAS shapes of prefill,
 * both rope styles with full and partial rotation, f32/f16/bf16 caches, 3-D and batched 4-D caches
 * (also a narrowed batch range of a bigger cache). Included by tests/c/test_fused.c (the CPU) and
 * tests/gpu/test_cuda_fused.c (CUDA). */
#ifndef MSH_TEST_FUSED_CASES_H
#define MSH_TEST_FUSED_CASES_H

#include <stdio.h>
#include <string.h>

#include "gpu_helpers.h"

/* dst = a copy of t's dim-1 columns [c0, c0 + n) as a contiguous f32 tensor on the CPU. */
static msh_tensor *cpu_cols(msh_tensor *t, int64_t c0, int64_t n) {
  msh_tensor *v = NULL, *c = NULL;
  CHECK_OK(msh_tensor_narrow(&v, t, 1, c0, n));
  if (v) CHECK_OK(msh_tensor_contiguous(&c, v, MSH_F32));
  msh_tensor_free(v);
  return c;
}

static msh_tensor *as_f32(const msh_tensor *t) {
  msh_tensor *c = NULL;
  CHECK_OK(msh_tensor_contiguous(&c, t, MSH_F32));
  return c;
}

/* f32 1e-5 relative, 16-bit 1e-2 (the products of a 16-bit GEMM take x rounded to 16 bits) */
static double tol_for(int dt) { return dt == MSH_F32 ? 1e-5 : 1e-2; }

static void fused_matmul_acc_case(int dev, int64_t M, int64_t K, int64_t N, int wdt) {
  int64_t xs[2] = {M, K}, ws[2] = {N, K}, os[2] = {M, N};
  msh_tensor *x = dev_randn(MSH_CPU, MSH_F32, 2, xs, 1.0f), *w = dev_randn(MSH_CPU, wdt, 2, ws, 0.05f);
  msh_tensor *o0 = dev_randn(MSH_CPU, MSH_F32, 2, os, 1.0f), *prod = cpu_new(MSH_F32, 2, os);
  msh_tensor *want = copy_to(MSH_CPU, o0);
  msh_tensor *dx = copy_to(dev, x), *dw = copy_to(dev, w), *got = copy_to(dev, o0);
  CHECK_OK(msh_op_matmul(prod, x, w));
  CHECK_OK(msh_op_add(want, want, prod));
  CHECK_OK(msh_op_matmul_acc(got, dx, dw));
  char what[128];
  snprintf(what, sizeof what, "matmul_acc M=%lld K=%lld N=%lld w=%s", (long long)M, (long long)K, (long long)N,
           msh_dtype_name(wdt));
  COMPARE(what, got, want, tol_for(wdt)); /* 16-bit GEMMs round x to the weights' dtype */
  msh_tensor *ts[] = {x, w, o0, prod, want, dx, dw, got};
  free_all(ts, 8);
}

static void fused_matmul_glu_case(int dev, int64_t M, int64_t K, int64_t F, int wdt) {
  int64_t xs[2] = {M, K}, ws[2] = {2 * F, K}, os[2] = {M, F}, ss[2] = {M, 2 * F};
  msh_tensor *x = dev_randn(MSH_CPU, MSH_F32, 2, xs, 1.0f), *w = dev_randn(MSH_CPU, wdt, 2, ws, 0.05f);
  msh_tensor *wg = NULL, *wu = NULL;
  CHECK_OK(msh_tensor_narrow(&wg, w, 0, 0, F));
  CHECK_OK(msh_tensor_narrow(&wu, w, 0, F, F));
  msh_tensor *g = cpu_new(MSH_F32, 2, os), *u = cpu_new(MSH_F32, 2, os);
  CHECK_OK(msh_op_matmul(g, x, wg));
  CHECK_OK(msh_op_matmul(u, x, wu));
  CHECK_OK(msh_op_silu_mul(g, g, u));
  msh_tensor *dx = copy_to(dev, x), *dw = copy_to(dev, w), *got = dev_new(dev, MSH_F32, 2, os);
  msh_tensor *scratch = dev_new(dev, MSH_F32, 2, ss);
  CHECK_OK(msh_op_matmul_glu(got, dx, dw, scratch));
  char what[128];
  snprintf(what, sizeof what, "matmul_glu M=%lld K=%lld F=%lld w=%s", (long long)M, (long long)K, (long long)F,
           msh_dtype_name(wdt));
  COMPARE(what, got, g, tol_for(wdt));
  msh_tensor *ts[] = {x, w, wg, wu, g, u, dx, dw, got, scratch};
  free_all(ts, 10);
}

/* rmsnorm_matmul against rmsnorm then matmul (glu: then matmul_glu's composition) on the CPU; the
 * norm weight in w's dtype (the GEMV folds it) or in f32 (normalized first). x is not written. */
static void fused_rmsnorm_matmul_case(int dev, int64_t M, int64_t K, int64_t N, int wdt, int ndt, int glu) {
  int64_t xs[2] = {M, K}, ws[2] = {glu ? 2 * N : N, K}, os[2] = {M, N}, ns[1] = {K}, gs[2] = {M, 2 * N};
  msh_tensor *x = dev_randn(MSH_CPU, MSH_F32, 2, xs, 3.0f), *w = dev_randn(MSH_CPU, wdt, 2, ws, 0.05f);
  msh_tensor *nw = dev_randn(MSH_CPU, ndt, 1, ns, 1.0f), *h = cpu_new(MSH_F32, 2, xs);
  msh_tensor *want = cpu_new(MSH_F32, 2, os), *gu = cpu_new(MSH_F32, 2, gs);
  const float eps = 1e-5f;
  CHECK_OK(msh_op_rmsnorm(h, x, nw, eps));
  if (glu) CHECK_OK(msh_op_matmul_glu(want, h, w, gu));
  else CHECK_OK(msh_op_matmul(want, h, w));
  msh_tensor *dx = copy_to(dev, x), *dw = copy_to(dev, w), *dn = copy_to(dev, nw);
  msh_tensor *dh = dev_new(dev, MSH_F32, 2, xs), *dgu = glu ? dev_new(dev, MSH_F32, 2, gs) : NULL;
  msh_tensor *got = dev_new(dev, MSH_F32, 2, os);
  CHECK_OK(msh_op_rmsnorm_matmul(got, dx, dn, eps, dw, dh, dgu));
  char what[128];
  snprintf(what, sizeof what, "rmsnorm_matmul%s M=%lld K=%lld N=%lld w=%s norm=%s", glu ? " glu" : "", (long long)M,
           (long long)K, (long long)N, msh_dtype_name(wdt), msh_dtype_name(ndt));
  COMPARE(what, got, want, tol_for(wdt));
  size_t L = strlen(what);
  snprintf(what + L, sizeof what - L, " x kept");
  COMPARE(what, dx, x, 0.0);
  msh_tensor *ts[] = {x, w, nw, h, want, gu, dx, dw, dn, dh, dgu, got};
  free_all(ts, 12);
}

/* A cache for qkv_rope on dev: (S, KVH, hd), or B sequences (B, S, KVH, hd) taken from rows
 * [1, 1 + B) of a bigger (B + 2, S, KVH, hd) cache when `inner` (a batch stride view). */
static msh_tensor *fused_cache(int dev, int dt, int64_t B, int64_t S, int64_t KVH, int64_t hd, int batched,
                               int inner, msh_tensor **owner) {
  int64_t s3[3] = {S, KVH, hd}, s4[4] = {inner ? B + 2 : B, S, KVH, hd};
  msh_tensor *t = batched ? dev_randn(dev, dt, 4, s4, 1.0f) : dev_randn(dev, dt, 3, s3, 1.0f);
  *owner = t;
  if (!t || !inner) return t;
  msh_tensor *v = NULL;
  CHECK_OK(msh_tensor_narrow(&v, t, 0, 1, B));
  return v;
}

/* inv_freq (n_rot) of rope base `base`: base^(-2i / (2 n_rot)). */
static void fill_inv_freq(msh_tensor *inv, int64_t n_rot, double base) {
  float *fp = msh_tensor_data(inv);
  for (int64_t i = 0; i < n_rot; i++) fp[i] = (float)pow(base, -2.0 * (double)i / (double)(2 * n_rot));
}

/* rows r of sequence b = r / T sit at positions base_b + r % T (distinct within a sequence). */
static void fused_qkv_rope_case(int dev, int64_t B, int64_t T, int64_t H, int64_t KVH, int64_t hd, int64_t n_rot,
                                int style, int kvdt, int batched, int inner) {
  int64_t R = B * T, S = 64 + T, W = (H + 2 * KVH) * hd;
  int64_t qs[2] = {R, W}, rs[1] = {R}, fs[1] = {n_rot}, q3[3] = {R, H, hd};
  msh_tensor *qkv = dev_randn(MSH_CPU, MSH_F32, 2, qs, 1.0f), *pos = cpu_new(MSH_I32, 1, rs);
  msh_tensor *inv = cpu_new(MSH_F32, 1, fs);
  if (!qkv || !pos || !inv) return;
  int32_t *pp = msh_tensor_data(pos);
  for (int64_t r = 0; r < R; r++) pp[r] = (int32_t)((r / T) * 7 % (S - T + 1) + r % T);
  fill_inv_freq(inv, n_rot, 10000.0);
  /* the reference: the unfused ops on the CPU */
  msh_tensor *kown, *vown, *kref_own, *vref_own;
  msh_tensor *kc = fused_cache(dev, kvdt, B, S, KVH, hd, batched, inner, &kown);
  msh_tensor *vc = fused_cache(dev, kvdt, B, S, KVH, hd, batched, inner, &vown);
  msh_tensor *kref = NULL, *vref = NULL;
  kref_own = to_cpu(kown);
  vref_own = to_cpu(vown);
  if (inner) {
    CHECK_OK(msh_tensor_narrow(&kref, kref_own, 0, 1, B));
    CHECK_OK(msh_tensor_narrow(&vref, vref_own, 0, 1, B));
  } else {
    kref = kref_own;
    vref = vref_own;
  }
  msh_tensor *qc = cpu_cols(qkv, 0, H * hd), *kcol = cpu_cols(qkv, H * hd, KVH * hd);
  msh_tensor *vcol = cpu_cols(qkv, (H + KVH) * hd, KVH * hd);
  msh_tensor *qw = NULL, *kw = NULL;
  int64_t k3[3] = {R, KVH, hd};
  CHECK_OK(msh_tensor_reshape(&qw, qc, 3, q3));
  CHECK_OK(msh_tensor_reshape(&kw, kcol, 3, k3));
  CHECK_OK(msh_op_rope(qw, pos, inv, style));
  CHECK_OK(msh_op_rope(kw, pos, inv, style));
  for (int64_t r = 0; r < R && qw && kw; r++) {
    msh_tensor *krow = NULL, *vrow = NULL, *kd = NULL, *vd = NULL, *kb = kref, *vb = vref;
    if (batched) {
      CHECK_OK(msh_tensor_narrow(&kb, kref, 0, r / T, 1));
      CHECK_OK(msh_tensor_narrow(&vb, vref, 0, r / T, 1));
      int64_t c3[3] = {S, KVH, hd};
      int64_t kst[3] = {msh_tensor_stride(kb, 1), msh_tensor_stride(kb, 2), msh_tensor_stride(kb, 3)};
      int64_t vst[3] = {msh_tensor_stride(vb, 1), msh_tensor_stride(vb, 2), msh_tensor_stride(vb, 3)};
      msh_tensor *kb3 = NULL, *vb3 = NULL;
      CHECK_OK(msh_tensor_view(&kb3, kb, 3, c3, kst, 0));
      CHECK_OK(msh_tensor_view(&vb3, vb, 3, c3, vst, 0));
      msh_tensor_free(kb);
      msh_tensor_free(vb);
      kb = kb3;
      vb = vb3;
    }
    CHECK_OK(msh_tensor_narrow(&krow, kw, 0, r, 1));
    CHECK_OK(msh_tensor_narrow(&vrow, vcol, 0, r, 1));
    int64_t one3[3] = {1, KVH, hd};
    CHECK_OK(msh_tensor_reshape(&vd, vrow, 3, one3));
    kd = krow;
    CHECK_OK(msh_op_set_rows(kb, pp[r], kd));
    CHECK_OK(msh_op_set_rows(vb, pp[r], vd));
    msh_tensor_free(krow);
    msh_tensor_free(vrow);
    msh_tensor_free(vd);
    if (batched) {
      msh_tensor_free(kb);
      msh_tensor_free(vb);
    }
  }
  /* the fused op on dev */
  msh_tensor *dqkv = copy_to(dev, qkv), *dpos = copy_to(dev, pos), *dinv = copy_to(dev, inv);
  msh_tensor *q_out = dev_new(dev, MSH_F32, 3, q3);
  CHECK_OK(msh_op_qkv_rope(q_out, kc, vc, dqkv, dpos, dinv, style));
  char what[160];
  snprintf(what, sizeof what, "qkv_rope B=%lld T=%lld H=%lld/%lld hd=%lld rot=%lld %s %s%s%s q", (long long)B,
           (long long)T, (long long)H, (long long)KVH, (long long)hd, (long long)n_rot,
           style == MSH_ROPE_HALF ? "half" : "interleaved", msh_dtype_name(kvdt), batched ? " 4-D" : " 3-D",
           inner ? " (inner batch range)" : "");
  COMPARE(what, q_out, qw, 1e-5);
  msh_tensor *kg = as_f32(kown), *vg = as_f32(vown), *kw32 = as_f32(kref_own), *vw32 = as_f32(vref_own);
  size_t L = strlen(what);
  what[L - 1] = 'k';
  COMPARE(what, kg, kw32, tol_for(kvdt));
  what[L - 1] = 'v';
  COMPARE(what, vg, vw32, tol_for(kvdt));
  msh_tensor *ts[] = {qkv, pos, inv, qc, kcol, vcol, qw, kw, dqkv, dpos, dinv, q_out, kg, vg, kw32, vw32,
                      kown, vown, kref_own, vref_own};
  free_all(ts, 20);
  if (inner) {
    msh_tensor *vs[] = {kc, vc, kref, vref};
    free_all(vs, 4);
  }
}

/* rmsnorm_mlp on dev against rmsnorm, matmul_glu, matmul and add on the CPU: x += the block. */
static void fused_rmsnorm_mlp_case(int dev, int64_t M, int64_t K, int64_t F, int wdt) {
  int64_t xs[2] = {M, K}, gs[2] = {2 * F, K}, ds[2] = {K, F}, ns[1] = {K}, fs[2] = {M, F}, us[2] = {M, 2 * F};
  msh_tensor *x = dev_randn(MSH_CPU, MSH_F32, 2, xs, 2.0f), *wgu = dev_randn(MSH_CPU, wdt, 2, gs, 0.05f);
  msh_tensor *wd = dev_randn(MSH_CPU, wdt, 2, ds, 0.05f), *nw = dev_randn(MSH_CPU, wdt, 1, ns, 1.0f);
  msh_tensor *h = cpu_new(MSH_F32, 2, xs), *g = cpu_new(MSH_F32, 2, fs), *gu = cpu_new(MSH_F32, 2, us);
  msh_tensor *y = cpu_new(MSH_F32, 2, xs), *want = copy_to(MSH_CPU, x);
  const float eps = 1e-5f;
  CHECK_OK(msh_op_rmsnorm(h, x, nw, eps));
  CHECK_OK(msh_op_matmul_glu(g, h, wgu, gu));
  CHECK_OK(msh_op_matmul(y, g, wd));
  CHECK_OK(msh_op_add(want, want, y));
  msh_tensor *dx = copy_to(dev, x), *dgu_w = copy_to(dev, wgu), *dwd = copy_to(dev, wd), *dn = copy_to(dev, nw);
  msh_tensor *dh = dev_new(dev, MSH_F32, 2, xs), *dg = dev_new(dev, MSH_F32, 2, fs), *dgu = dev_new(dev, MSH_F32, 2, us);
  CHECK_OK(msh_op_rmsnorm_mlp(dx, dn, eps, dgu_w, dwd, dh, dg, dgu));
  char what[128];
  snprintf(what, sizeof what, "rmsnorm_mlp M=%lld K=%lld F=%lld w=%s", (long long)M, (long long)K, (long long)F,
           msh_dtype_name(wdt));
  COMPARE(what, dx, want, tol_for(wdt));
  msh_tensor *ts[] = {x, wgu, wd, nw, h, g, gu, y, want, dx, dgu_w, dwd, dn, dh, dg, dgu};
  free_all(ts, 16);
}

/* rmsnorm_qkv_rope on dev against rmsnorm, matmul and qkv_rope on the CPU: R rows (one sequence,
 * or R sequences of one row over a batched cache), positions pos0 + r (sequence r at pos0 + 3r).
 * normed: the op gets the normalized rows and no norm weight (a tensor-parallel rank's form). */
static void fused_rmsnorm_qkv_rope_case(int dev, int64_t R, int64_t H, int64_t KVH, int64_t hd, int64_t n_rot,
                                        int style, int wdt, int kvdt, int batched, int64_t pos0, int normed) {
  int64_t K = 256, S = pos0 + 3 * R + 4, W = (H + 2 * KVH) * hd;
  int64_t xs[2] = {R, K}, ws[2] = {W, K}, ns[1] = {K}, qs[2] = {R, W}, rs[1] = {R}, fs[1] = {n_rot};
  int64_t q3[3] = {R, H, hd};
  msh_tensor *x = dev_randn(MSH_CPU, MSH_F32, 2, xs, 3.0f), *w = dev_randn(MSH_CPU, wdt, 2, ws, 0.05f);
  msh_tensor *nw = dev_randn(MSH_CPU, wdt, 1, ns, 1.0f), *h = cpu_new(MSH_F32, 2, xs), *qkv = cpu_new(MSH_F32, 2, qs);
  msh_tensor *pos = cpu_new(MSH_I32, 1, rs), *inv = cpu_new(MSH_F32, 1, fs), *q_ref = cpu_new(MSH_F32, 3, q3);
  if (!x || !w || !nw || !h || !qkv || !pos || !inv || !q_ref) return;
  int32_t *pp = msh_tensor_data(pos);
  for (int64_t r = 0; r < R; r++) pp[r] = (int32_t)(pos0 + (batched ? 3 * r : r));
  fill_inv_freq(inv, n_rot, 500000.0);
  msh_tensor *kown, *vown;
  msh_tensor *kc = fused_cache(dev, kvdt, R, S, KVH, hd, batched, 0, &kown);
  msh_tensor *vc = fused_cache(dev, kvdt, R, S, KVH, hd, batched, 0, &vown);
  msh_tensor *kref = to_cpu(kown), *vref = to_cpu(vown);
  const float eps = 1e-5f;
  CHECK_OK(msh_op_rmsnorm(h, x, nw, eps));
  CHECK_OK(msh_op_matmul(qkv, h, w));
  CHECK_OK(msh_op_qkv_rope(q_ref, kref, vref, qkv, pos, inv, style));
  msh_tensor *dx = copy_to(dev, normed ? h : x), *dw = copy_to(dev, w), *dn = copy_to(dev, nw);
  msh_tensor *dpos = copy_to(dev, pos), *dinv = copy_to(dev, inv), *dh = dev_new(dev, MSH_F32, 2, xs);
  msh_tensor *dqkv = dev_new(dev, MSH_F32, 2, qs), *q_out = dev_new(dev, MSH_F32, 3, q3);
  CHECK_OK(msh_op_rmsnorm_qkv_rope(q_out, kc, vc, dqkv, dx, normed ? NULL : dn, eps, dw, normed ? NULL : dh, dpos,
                                   dinv, style));
  char what[160];
  snprintf(what, sizeof what, "rmsnorm_qkv_rope%s R=%lld H=%lld/%lld hd=%lld rot=%lld %s w=%s kv=%s%s q",
           normed ? " (normed x)" : "", (long long)R, (long long)H, (long long)KVH, (long long)hd,
           (long long)n_rot, style == MSH_ROPE_HALF ? "half" : "interleaved", msh_dtype_name(wdt),
           msh_dtype_name(kvdt), batched ? " 4-D" : " 3-D");
  COMPARE(what, q_out, q_ref, tol_for(wdt));
  msh_tensor *kg = as_f32(kown), *vg = as_f32(vown), *kw32 = as_f32(kref), *vw32 = as_f32(vref);
  size_t L = strlen(what);
  what[L - 1] = 'k';
  COMPARE(what, kg, kw32, wdt == MSH_F32 ? tol_for(kvdt) : 1e-2);
  what[L - 1] = 'v';
  COMPARE(what, vg, vw32, wdt == MSH_F32 ? tol_for(kvdt) : 1e-2);
  snprintf(what + L - 1, sizeof what - L + 1, "x kept");
  COMPARE(what, dx, normed ? h : x, 0.0);
  msh_tensor *ts[] = {x, w, nw, h, qkv, pos, inv, q_ref, kown, vown, kref, vref, dx, dw, dn, dpos, dinv, dh, dqkv,
                      q_out, kg, vg, kw32, vw32};
  free_all(ts, 24);
}

static void fused_all_cases(int dev) {
  static const int wdts[3] = {MSH_F32, MSH_F16, MSH_BF16};
  for (int i = 0; i < 3; i++) {
    int dt = wdts[i];
    fused_matmul_acc_case(dev, 1, 4096, 1024, dt);
    fused_matmul_acc_case(dev, 1, 72, 37, dt); /* K % 8 != 0: the scalar GEMV */
    fused_matmul_acc_case(dev, 5, 256, 300, dt);
    fused_matmul_acc_case(dev, 33, 96, 70, dt);
    fused_matmul_glu_case(dev, 1, 4096, 1024, dt);
    fused_matmul_glu_case(dev, 1, 1024, 3584, dt); /* 4 rows a warp */
    fused_matmul_glu_case(dev, 1, 72, 37, dt);
    fused_matmul_glu_case(dev, 3, 256, 100, dt);
    fused_matmul_glu_case(dev, 40, 128, 64, dt);
  }
  for (int i = 0; i < 3; i++) {
    int dt = wdts[i];
    for (int glu = 0; glu < 2; glu++) {
      fused_rmsnorm_matmul_case(dev, 1, 4096, 1024, dt, dt, glu); /* one row a warp */
      fused_rmsnorm_matmul_case(dev, 1, 1024, 3584, dt, dt, glu); /* several rows a warp */
      fused_rmsnorm_matmul_case(dev, 1, 72, 37, dt, dt, glu);     /* K % 8 != 0: normalized first */
      fused_rmsnorm_matmul_case(dev, 3, 256, 100, dt, dt, glu);
      fused_rmsnorm_matmul_case(dev, 40, 128, 64, dt, dt, glu);
    }
    fused_rmsnorm_matmul_case(dev, 1, 256, 96, dt, MSH_F32, 0);
  }
  fused_rmsnorm_matmul_case(dev, 1, 4096, 6144, MSH_BF16, MSH_BF16, 0);
  fused_rmsnorm_matmul_case(dev, 1, 4096, 14336, MSH_BF16, MSH_BF16, 1);
  fused_rmsnorm_matmul_case(dev, 1, 4096, 128256, MSH_BF16, MSH_BF16, 0);
  fused_matmul_acc_case(dev, 1, 14336, 4096, MSH_BF16);
  fused_matmul_glu_case(dev, 1, 4096, 14336, MSH_BF16);
  static const int kvdts[3] = {MSH_F32, MSH_F16, MSH_BF16};
  for (int i = 0; i < 3; i++)
    for (int style = 0; style < 2; style++) {
      fused_qkv_rope_case(dev, 1, 1, 32, 8, 128, 64, style, kvdts[i], 0, 0);
      fused_qkv_rope_case(dev, 1, 7, 4, 4, 64, 32, style, kvdts[i], 0, 0);
      fused_qkv_rope_case(dev, 1, 5, 6, 2, 48, 8, style, kvdts[i], 0, 0); /* partial rotation */
      fused_qkv_rope_case(dev, 3, 4, 8, 1, 32, 16, style, kvdts[i], 1, 0);
      fused_qkv_rope_case(dev, 2, 1, 8, 2, 64, 32, style, kvdts[i], 1, 1);
    }
  /* the feed-forward block: one row (GEMVs), rows past the GEMV's (16-bit activations between
   * cuBLAS GEMMs for bf16 weights), every weight type */
  for (int i = 0; i < 3; i++) {
    fused_rmsnorm_mlp_case(dev, 1, 256, 344, wdts[i]);
    fused_rmsnorm_mlp_case(dev, 37, 128, 200, wdts[i]);
    fused_rmsnorm_mlp_case(dev, 300, 512, 1376, wdts[i]);
  }
  fused_rmsnorm_mlp_case(dev, 64, 1000, 96, MSH_BF16); /* F < K */
  /* one row (the decode step: one pass on a GPU), every weight and cache type, both styles; more
   * rows, a partial rotation and a batched cache (composed) */
  for (int i = 0; i < 3; i++)
    for (int style = 0; style < 2; style++) {
      fused_rmsnorm_qkv_rope_case(dev, 1, 32, 8, 128, 64, style, MSH_BF16, kvdts[i], 0, 37, 0);
      fused_rmsnorm_qkv_rope_case(dev, 1, 8, 2, 64, 32, style, wdts[i], MSH_BF16, 0, 0, 0);
      fused_rmsnorm_qkv_rope_case(dev, 1, 4, 4, 36, 18, style, wdts[i], kvdts[i], 1, 5, 0);
      fused_rmsnorm_qkv_rope_case(dev, 1, 16, 4, 128, 64, style, wdts[i], kvdts[i], 0, 20, 1); /* a TP rank's */
    }
  fused_rmsnorm_qkv_rope_case(dev, 3, 8, 2, 64, 32, MSH_ROPE_HALF, MSH_BF16, MSH_BF16, 0, 10, 0);
  fused_rmsnorm_qkv_rope_case(dev, 1, 6, 2, 48, 8, MSH_ROPE_HALF, MSH_F16, MSH_F16, 0, 3, 0); /* partial rotation */
  fused_rmsnorm_qkv_rope_case(dev, 4, 8, 8, 32, 16, MSH_ROPE_INTERLEAVED, MSH_F32, MSH_F32, 1, 2, 0);
  fused_rmsnorm_qkv_rope_case(dev, 5, 8, 2, 64, 32, MSH_ROPE_HALF, MSH_BF16, MSH_BF16, 0, 0, 1);
  fused_rmsnorm_qkv_rope_case(dev, 1, 6, 2, 48, 8, MSH_ROPE_HALF, MSH_F16, MSH_F16, 0, 3, 1);
}

#endif
