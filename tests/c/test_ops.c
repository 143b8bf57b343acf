/* test_ops.c: every op of the CPU backend against a float64 reference computed here, on random
 * inputs from fixed seeds, with odd sizes; f16/bf16 operands are compared against the float64 of
 * their rounded values, so tolerances stay those of f32 arithmetic. Also: one thread against
 * several, allowed aliasing, and the error cases (status and message). */
#include "check.h"

#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

/* ------------------------------------------------------------------------------ helpers */

static uint64_t rng = 0x1234567;

static double urand(void) { /* [0, 1) */
  uint64_t z = (rng += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  z ^= z >> 31;
  return (double)(z >> 11) * (1.0 / 9007199254740992.0);
}

static double nrand(void) {
  double u1 = urand() + 1e-300, u2 = urand();
  return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

static msh_tensor *tnew(int dtype, int ndim, const int64_t *shape) {
  msh_tensor *t = NULL;
  CHECK_OK(msh_tensor_new(&t, dtype, ndim, shape, MSH_CPU, 0));
  return t;
}

/* Element i (row-major over the shape, any strides) as a double. */
static double at(const msh_tensor *t, int64_t i) {
  int64_t off = 0;
  for (int d = msh_tensor_ndim(t) - 1; d >= 0; d--) {
    int64_t n = msh_tensor_dim(t, d);
    off += (i % n) * msh_tensor_stride(t, d);
    i /= n;
  }
  const void *p = msh_tensor_data(t);
  switch (msh_tensor_dtype(t)) {
  case MSH_F32: return ((const float *)p)[off];
  case MSH_F16: return msh_f16_to_f32(((const uint16_t *)p)[off]);
  case MSH_BF16: return msh_bf16_to_f32(((const uint16_t *)p)[off]);
  case MSH_I32: return ((const int32_t *)p)[off];
  default: return ((const int8_t *)p)[off];
  }
}

static void put(msh_tensor *t, int64_t i, double v) {
  void *p = msh_tensor_data(t);
  switch (msh_tensor_dtype(t)) {
  case MSH_F32: ((float *)p)[i] = (float)v; break;
  case MSH_F16: ((uint16_t *)p)[i] = msh_f32_to_f16((float)v); break;
  case MSH_BF16: ((uint16_t *)p)[i] = msh_f32_to_bf16((float)v); break;
  case MSH_I32: ((int32_t *)p)[i] = (int32_t)v; break;
  default: ((int8_t *)p)[i] = (int8_t)v; break;
  }
}

/* Contiguous t filled with mean + std * normal values (never all zeros). */
static void fill(msh_tensor *t, double mean, double std) {
  for (int64_t i = 0; i < msh_tensor_numel(t); i++) put(t, i, mean + std * nrand());
}

static msh_tensor *trand(int dtype, int ndim, const int64_t *shape) {
  msh_tensor *t = tnew(dtype, ndim, shape);
  fill(t, 0, 1);
  return t;
}

static double *snapshot(const msh_tensor *t) {
  int64_t n = msh_tensor_numel(t);
  double *v = malloc(sizeof(double) * (size_t)(n ? n : 1));
  for (int64_t i = 0; i < n; i++) v[i] = at(t, i);
  return v;
}

/* Every element of got within atol[i] + rtol * |want[i]| (atol NULL: atol0). Prints the first miss. */
static int near_all(const char *what, const msh_tensor *got, const double *want, const double *atol, double atol0,
                    double rtol) {
  int64_t n = msh_tensor_numel(got), bad = 0;
  for (int64_t i = 0; i < n; i++) {
    double g = at(got, i), tol = (atol ? atol[i] : atol0) + rtol * fabs(want[i]);
    if (!(fabs(g - want[i]) <= tol)) {
      if (!bad) fprintf(stderr, "  %s: [%lld] got %.9g want %.9g (tol %.3g)\n", what, (long long)i, g, want[i], tol);
      bad++;
    }
  }
  if (bad) fprintf(stderr, "  %s: %lld of %lld elements off\n", what, (long long)bad, (long long)n);
  return bad == 0;
}

/* a and b agree within rtol of the largest magnitude in b. */
static int same_values(const msh_tensor *a, const msh_tensor *b, double rtol) {
  int64_t n = msh_tensor_numel(a);
  double scale = 1e-30, worst = 0;
  for (int64_t i = 0; i < n; i++) scale = fmax(scale, fabs(at(b, i)));
  for (int64_t i = 0; i < n; i++) worst = fmax(worst, fabs(at(a, i) - at(b, i)) / scale);
  if (!(worst <= rtol)) fprintf(stderr, "  threads: worst difference %.3g of the largest value\n", worst);
  return worst <= rtol;
}

static const int float_types[3] = {MSH_F32, MSH_F16, MSH_BF16};

/* ------------------------------------------------------------------------------- matmul */

static void test_matmul_case(int64_t M, int64_t K, int64_t N, int wdt) {
  int64_t xs[2] = {M, K}, ws[2] = {N, K}, os[2] = {M, N};
  msh_tensor *x = trand(MSH_F32, 2, xs), *w = trand(wdt, 2, ws), *o = tnew(MSH_F32, 2, os);
  CHECK_OK(msh_op_matmul(o, x, w));
  double *want = malloc(sizeof(double) * (size_t)(M * N)), *tol = malloc(sizeof(double) * (size_t)(M * N));
  for (int64_t m = 0; m < M; m++)
    for (int64_t n = 0; n < N; n++) {
      double acc = 0, mag = 0;
      for (int64_t k = 0; k < K; k++) {
        double p = at(x, m * K + k) * at(w, n * K + k);
        acc += p;
        mag += fabs(p);
      }
      want[m * N + n] = acc;
      tol[m * N + n] = 1e-5 * mag + 1e-30; /* rtol 1e-5 of the magnitude summed */
    }
  char what[96];
  snprintf(what, sizeof what, "matmul M=%lld K=%lld N=%lld w %s", (long long)M, (long long)K, (long long)N,
           msh_dtype_name(wdt));
  CHECK(near_all(what, o, want, tol, 0, 0));
  free(want);
  free(tol);
  msh_tensor_free(x);
  msh_tensor_free(w);
  msh_tensor_free(o);
}

static void test_matmul(void) {
  const int64_t Ms[] = {1, 2, 3, 5, 6, 17, 31, 32, 64}; /* both sides of the sgemm switch (32) */
  const int64_t KN[][2] = {{67, 131}, {64, 64}, {172, 64}, {8, 5}, {1, 3}, {33, 16}, {257, 40}};
  for (int d = 0; d < 3; d++)
    for (size_t i = 0; i < sizeof Ms / sizeof Ms[0]; i++)
      for (size_t j = 0; j < sizeof KN / sizeof KN[0]; j++) test_matmul_case(Ms[i], KN[j][0], KN[j][1], float_types[d]);
  /* larger: several threads, several blocks of the f16/bf16 widening */
  for (int d = 0; d < 3; d++) {
    test_matmul_case(1, 1031, 517, float_types[d]);
    test_matmul_case(4, 777, 300, float_types[d]);
    test_matmul_case(9, 1100, 301, float_types[d]);
  }
}

/* ---------------------------------------------------------------------------------- rope */

static void test_rope_case(int64_t T, int64_t H, int64_t hd, int64_t R, int style, int pos_start) {
  int64_t xs[3] = {T, H, hd}, ps[1] = {T}, fs[1] = {R};
  msh_tensor *x = trand(MSH_F32, 3, xs), *pos = tnew(MSH_I32, 1, ps), *f = tnew(MSH_F32, 1, fs);
  for (int64_t t = 0; t < T; t++) ((int32_t *)msh_tensor_data(pos))[t] = pos_start + (int32_t)(t * 3 % 7) + (int32_t)t;
  for (int64_t i = 0; i < R; i++) ((float *)msh_tensor_data(f))[i] = (float)pow(10000.0, -(double)i / (double)R);
  double *v = snapshot(x), *want = snapshot(x), *tol = malloc(sizeof(double) * (size_t)(T * H * hd));
  for (int64_t i = 0; i < T * H * hd; i++) tol[i] = 1e-30;
  for (int64_t t = 0; t < T; t++)
    for (int64_t h = 0; h < H; h++)
      for (int64_t i = 0; i < R; i++) {
        int64_t b = (t * H + h) * hd;
        int64_t i0 = style == MSH_ROPE_INTERLEAVED ? 2 * i : i, i1 = style == MSH_ROPE_INTERLEAVED ? 2 * i + 1 : i + R;
        double a = at(pos, t) * at(f, i), v0 = v[b + i0], v1 = v[b + i1];
        want[b + i0] = v0 * cos(a) - v1 * sin(a);
        want[b + i1] = v0 * sin(a) + v1 * cos(a);
        tol[b + i0] = tol[b + i1] = 2e-6 * (fabs(v0) + fabs(v1));
      }
  CHECK_OK(msh_op_rope(x, pos, f, style));
  char what[96];
  snprintf(what, sizeof what, "rope T=%lld H=%lld hd=%lld R=%lld style %d pos %d", (long long)T, (long long)H,
           (long long)hd, (long long)R, style, pos_start);
  CHECK(near_all(what, x, want, tol, 0, 0)); /* untouched dims (beyond 2R) compare exactly */
  free(v);
  free(want);
  free(tol);
  msh_tensor_free(x);
  msh_tensor_free(pos);
  msh_tensor_free(f);
}

static void test_rope(void) {
  for (int style = 0; style < 2; style++) {
    test_rope_case(1, 8, 8, 4, style, 0);
    test_rope_case(1, 8, 8, 4, style, 37);
    test_rope_case(5, 3, 64, 32, style, 1000);
    test_rope_case(3, 4, 10, 3, style, 5);   /* partial rotary: R < hd/2 */
    test_rope_case(7, 2, 128, 16, style, 4093);
    test_rope_case(2, 1, 160, 80, style, 70000); /* more than one chunk of frequencies, large positions */
    test_rope_case(300, 5, 16, 8, style, 11);    /* enough rows for several threads */
  }
}

/* ----------------------------------------------------------------------------- attention */

/* k, v: views into one fused cache (S, 2, KVH, hd), so their row stride is 2 * KVH * hd. */
static void test_attention_case(int64_t T, int64_t H, int64_t KVH, int64_t hd, int64_t S, int64_t pos0, int kvdt) {
  int64_t qs[3] = {T, H, hd}, cs[4] = {S, 2, KVH, hd};
  msh_tensor *q = trand(MSH_F32, 3, qs), *o = tnew(MSH_F32, 3, qs), *cache = trand(kvdt, 4, cs), *k = NULL, *v = NULL;
  int64_t kv_shape[3] = {S, KVH, hd}, kv_stride[3] = {2 * KVH * hd, hd, 1};
  CHECK_OK(msh_tensor_view(&k, cache, 3, kv_shape, kv_stride, 0));
  CHECK_OK(msh_tensor_view(&v, cache, 3, kv_shape, kv_stride, KVH * hd));
  float scale = (float)(1.0 / sqrt((double)hd));
  CHECK_OK(msh_op_attention(o, q, k, v, pos0, scale));
  double *want = malloc(sizeof(double) * (size_t)(T * H * hd)), *tol = malloc(sizeof(double) * (size_t)(T * H * hd));
  double *p = malloc(sizeof(double) * (size_t)S);
  int64_t group = H / KVH;
  for (int64_t t = 0; t < T; t++)
    for (int64_t h = 0; h < H; h++) {
      int64_t n = pos0 + t + 1, kvh = h / group;
      double mx = -INFINITY, sum = 0;
      for (int64_t s = 0; s < n; s++) {
        double acc = 0;
        for (int64_t d = 0; d < hd; d++) acc += at(q, (t * H + h) * hd + d) * at(k, (s * KVH + kvh) * hd + d);
        p[s] = acc * scale;
        if (p[s] > mx) mx = p[s];
      }
      for (int64_t s = 0; s < n; s++) sum += p[s] = exp(p[s] - mx);
      for (int64_t d = 0; d < hd; d++) {
        double acc = 0, mag = 0;
        for (int64_t s = 0; s < n; s++) {
          double vv = at(v, (s * KVH + kvh) * hd + d);
          acc += p[s] * vv;
          mag += p[s] * fabs(vv);
        }
        want[(t * H + h) * hd + d] = acc / sum;
        tol[(t * H + h) * hd + d] = 1e-5 * mag / sum + 1e-30;
      }
    }
  char what[128];
  snprintf(what, sizeof what, "attention T=%lld H=%lld KVH=%lld hd=%lld S=%lld pos0=%lld kv %s", (long long)T,
           (long long)H, (long long)KVH, (long long)hd, (long long)S, (long long)pos0, msh_dtype_name(kvdt));
  CHECK(near_all(what, o, want, tol, 0, 0));
  free(want);
  free(tol);
  free(p);
  msh_tensor_free(q);
  msh_tensor_free(o);
  msh_tensor_free(k);
  msh_tensor_free(v);
  msh_tensor_free(cache);
}

static void test_attention(void) {
  const int64_t kvh[4] = {8, 4, 2, 1}; /* GQA ratios 1, 2, 4, 8 */
  const int64_t hds[4] = {8, 12, 40, 64};
  for (int d = 0; d < 3; d++)
    for (int g = 0; g < 4; g++)
      for (int j = 0; j < 4; j++) {
        test_attention_case(1, 8, kvh[g], hds[j], 9, 0, float_types[d]);       /* first token */
        test_attention_case(1, 8, kvh[g], hds[j], 23, 13, float_types[d]);     /* decode mid-cache */
        test_attention_case(5, 8, kvh[g], hds[j], 40, 11, float_types[d]);     /* chunk after a prefix */
      }
  test_attention_case(7, 4, 2, 16, 7, 0, MSH_F32);       /* prefill filling the cache */
  test_attention_case(1, 8, 4, 8, 1000, 999, MSH_F32);   /* long context */
  test_attention_case(1, 8, 2, 64, 1024, 1000, MSH_BF16);
  test_attention_case(3, 4, 4, 32, 1100, 1090, MSH_F16);
}

/* ------------------------------------------------------------------------------- rmsnorm */

static void test_rmsnorm(void) {
  const int64_t Ds[] = {1, 7, 64, 131, 4096};
  for (int d = 0; d < 3; d++)
    for (size_t j = 0; j < sizeof Ds / sizeof Ds[0]; j++) {
      int64_t R = Ds[j] == 4096 ? 33 : 5, D = Ds[j], xs[2] = {R, D}, ws[1] = {D};
      msh_tensor *x = trand(MSH_F32, 2, xs), *w = trand(float_types[d], 1, ws), *o = tnew(MSH_F32, 2, xs);
      fill(x, 0.3, 2.0);
      float eps = 1e-5f;
      double *want = malloc(sizeof(double) * (size_t)(R * D));
      for (int64_t r = 0; r < R; r++) {
        double ss = 0;
        for (int64_t i = 0; i < D; i++) ss += at(x, r * D + i) * at(x, r * D + i);
        double inv = 1.0 / sqrt(ss / (double)D + (double)eps);
        for (int64_t i = 0; i < D; i++) want[r * D + i] = at(x, r * D + i) * inv * at(w, i);
      }
      CHECK_OK(msh_op_rmsnorm(o, x, w, eps));
      CHECK(near_all("rmsnorm", o, want, NULL, 1e-30, 1e-5));
      CHECK_OK(msh_op_rmsnorm(x, x, w, eps)); /* in place */
      CHECK(near_all("rmsnorm in place", x, want, NULL, 1e-30, 1e-5));
      free(want);
      msh_tensor_free(x);
      msh_tensor_free(w);
      msh_tensor_free(o);
    }
}

/* ------------------------------------------------------------------------------ add_bias */

static void test_add_bias(void) {
  /* rows x columns: one row, odd widths, enough rows to go to several threads */
  const int64_t shapes[][2] = {{1, 1}, {1, 7}, {5, 131}, {3, 896}, {70, 4096}};
  for (int d = 0; d < 3; d++)
    for (size_t j = 0; j < sizeof shapes / sizeof shapes[0]; j++) {
      int64_t M = shapes[j][0], N = shapes[j][1], os[2] = {M, N}, bs[1] = {N};
      msh_tensor *o = trand(MSH_F32, 2, os), *b = trand(float_types[d], 1, bs);
      fill(b, 0.5, 2.0);
      double *want = malloc(sizeof(double) * (size_t)(M * N));
      for (int64_t r = 0; r < M; r++)
        for (int64_t i = 0; i < N; i++) want[r * N + i] = at(o, r * N + i) + at(b, i);
      CHECK_OK(msh_op_add_bias(o, b));
      CHECK(near_all("add_bias", o, want, NULL, 1e-6, 1e-6));
      free(want);
      msh_tensor_free(o);
      msh_tensor_free(b);
    }
  /* a 3-D out: rows are the leading dims */
  int64_t o3[3] = {2, 3, 8}, b1[1] = {8};
  msh_tensor *o = trand(MSH_F32, 3, o3), *b = trand(MSH_BF16, 1, b1);
  double *want = snapshot(o);
  for (int64_t i = 0; i < 48; i++) want[i] += at(b, i % 8);
  CHECK_OK(msh_op_add_bias(o, b));
  CHECK(near_all("add_bias 3-D", o, want, NULL, 1e-6, 1e-6));
  free(want);
  msh_tensor_free(o);
  msh_tensor_free(b);
}

/* ------------------------------------------------------------------------------- softmax */

static void test_softmax(void) {
  const int64_t shapes[][2] = {{1, 1}, {3, 7}, {4, 512}, {2, 32001}, {64, 1000}};
  const double spread[] = {1.0, 30.0, 1000.0};
  const double offset[] = {0.0, -50.0, 3e4};
  for (size_t j = 0; j < sizeof shapes / sizeof shapes[0]; j++)
    for (int m = 0; m < 3; m++) {
      int64_t R = shapes[j][0], N = shapes[j][1];
      msh_tensor *x = tnew(MSH_F32, 2, shapes[j]), *o = tnew(MSH_F32, 2, shapes[j]);
      fill(x, offset[m], spread[m]);
      double *want = malloc(sizeof(double) * (size_t)(R * N)), *lwant = malloc(sizeof(double) * (size_t)(R * N));
      for (int64_t r = 0; r < R; r++) {
        double mx = -INFINITY, sum = 0;
        for (int64_t i = 0; i < N; i++) mx = fmax(mx, at(x, r * N + i));
        for (int64_t i = 0; i < N; i++) sum += exp(at(x, r * N + i) - mx);
        for (int64_t i = 0; i < N; i++) {
          want[r * N + i] = exp(at(x, r * N + i) - mx) / sum;
          lwant[r * N + i] = (at(x, r * N + i) - mx) - log(sum);
        }
      }
      char what[96];
      snprintf(what, sizeof what, "softmax (%lld, %lld) spread %g offset %g", (long long)R, (long long)N, spread[m],
               offset[m]);
      CHECK_OK(msh_op_softmax(o, x));
      CHECK(near_all(what, o, want, NULL, 1e-37, 1e-5));
      CHECK_OK(msh_op_log_softmax(o, x));
      CHECK(near_all(what, o, lwant, NULL, 1e-6, 1e-6));
      CHECK_OK(msh_op_log_softmax(x, x)); /* in place */
      CHECK(near_all(what, x, lwant, NULL, 1e-6, 1e-6));
      free(want);
      free(lwant);
      msh_tensor_free(x);
      msh_tensor_free(o);
    }
}

/* -------------------------------------------------------------------------------- argmax */

static void test_argmax(void) {
  int64_t s[2] = {6, 37};
  msh_tensor *x = trand(MSH_F32, 2, s);
  float *p = msh_tensor_data(x);
  int32_t want[6];
  p[0 * 37 + 5] = p[0 * 37 + 20] = 9; /* a tie: the first wins */
  want[0] = 5;
  p[1 * 37 + 36] = 9; /* in the scalar tail */
  want[1] = 36;
  p[2 * 37 + 0] = p[2 * 37 + 36] = 9;
  want[2] = 0;
  for (int i = 0; i < 37; i++) p[3 * 37 + i] = -INFINITY; /* all equal */
  want[3] = 0;
  for (int i = 0; i < 37; i++) p[4 * 37 + i] = 2.5f; /* all equal */
  want[4] = 0;
  p[5 * 37 + 17] = p[5 * 37 + 9] = 1e30f;
  want[5] = 9;
  int32_t got[6] = {-1, -1, -1, -1, -1, -1};
  CHECK_OK(msh_op_argmax(x, got));
  for (int r = 0; r < 6; r++) CHECK(got[r] == want[r]);
  /* into a tensor: the same ids; a wrong count, dtype or a NULL is refused */
  int64_t six = 6, five = 5;
  msh_tensor *ids = NULL, *bad = NULL;
  CHECK_OK(msh_tensor_new(&ids, MSH_I32, 1, &six, MSH_CPU, 0));
  CHECK_OK(msh_op_argmax_into(ids, x));
  for (int r = 0; r < 6; r++) CHECK(((int32_t *)msh_tensor_data(ids))[r] == want[r]);
  CHECK_OK(msh_tensor_new(&bad, MSH_I32, 1, &five, MSH_CPU, 0));
  CHECK_STATUS(msh_op_argmax_into(bad, x), MSH_EINVAL);
  CHECK(strstr(msh_last_error(), "6 contiguous i32") != NULL);
  CHECK_STATUS(msh_op_argmax_into(x, x), MSH_EINVAL);
  CHECK_STATUS(msh_op_argmax_into(NULL, x), MSH_EINVAL);
  msh_tensor_free(ids);
  msh_tensor_free(bad);
  /* a long row with ties across vector lanes */
  int64_t s2[1] = {32003};
  msh_tensor *y = trand(MSH_F32, 1, s2);
  float *q = msh_tensor_data(y);
  q[31000] = q[12345] = q[32002] = 100;
  int32_t g = -1;
  CHECK_OK(msh_op_argmax(y, &g));
  CHECK(g == 12345);
  msh_tensor_free(x);
  msh_tensor_free(y);
}

/* ----------------------------------------------------------------------------- embedding */

static void test_embedding(void) {
  for (int d = 0; d < 6; d++) {
    int64_t T = d < 3 ? 9 : 3001; /* 3001 rows: several threads */
    int64_t ts[2] = {37, 67}, is[1] = {T}, os[2] = {T, 67};
    msh_tensor *table = trand(float_types[d % 3], 2, ts), *ids = tnew(MSH_I32, 1, is), *o = tnew(MSH_F32, 2, os);
    int32_t *id = msh_tensor_data(ids);
    for (int64_t i = 0; i < T; i++) id[i] = (int32_t)((i * 13 + 5) % 37);
    id[3] = 36;
    id[4] = 0;
    CHECK_OK(msh_op_embedding(o, table, ids));
    int ok = 1;
    for (int64_t i = 0; i < T; i++)
      for (int j = 0; j < 67; j++) ok &= at(o, i * 67 + j) == at(table, (int64_t)id[i] * 67 + j);
    CHECK(ok);
    msh_tensor_free(table);
    msh_tensor_free(ids);
    msh_tensor_free(o);
  }
}

/* --------------------------------------------------------------------------- elementwise */

static void test_elementwise(void) {
  const int64_t ns[] = {1, 7, 173, 100003};
  for (size_t j = 0; j < sizeof ns / sizeof ns[0]; j++) {
    int64_t s[2] = {1, ns[j]}, n = ns[j];
    msh_tensor *a = trand(MSH_F32, 2, s), *b = trand(MSH_F32, 2, s), *o = tnew(MSH_F32, 2, s);
    fill(a, 0, 6); /* silu over negative and positive arguments */
    ((float *)msh_tensor_data(a))[0] = -120.0f; /* exp(-g) overflows */
    double *va = snapshot(a), *vb = snapshot(b), *w = malloc(sizeof(double) * (size_t)n);

    for (int64_t i = 0; i < n; i++) w[i] = va[i] / (1.0 + exp(-va[i])) * vb[i];
    CHECK_OK(msh_op_silu_mul(o, a, b));
    CHECK(near_all("silu_mul", o, w, NULL, 1e-30, 1e-5));
    CHECK_OK(msh_op_silu_mul(a, a, b)); /* out aliases gate */
    CHECK(near_all("silu_mul out=gate", a, w, NULL, 1e-30, 1e-5));
    fill(a, 0, 6);
    double *va2 = snapshot(a);
    for (int64_t i = 0; i < n; i++) w[i] = va2[i] / (1.0 + exp(-va2[i])) * vb[i];
    CHECK_OK(msh_op_silu_mul(b, a, b)); /* out aliases up */
    CHECK(near_all("silu_mul out=up", b, w, NULL, 1e-30, 1e-5));

    fill(a, 0, 1);
    fill(b, 0, 1);
    free(va);
    free(vb);
    va = snapshot(a);
    vb = snapshot(b);
    for (int64_t i = 0; i < n; i++) w[i] = (double)(float)(va[i] + vb[i]); /* one f32 rounding */
    CHECK_OK(msh_op_add(o, a, b));
    CHECK(near_all("add", o, w, NULL, 0, 0));
    CHECK_OK(msh_op_add(b, a, b)); /* out aliases b */
    CHECK(near_all("add out=b", b, w, NULL, 0, 0));
    CHECK_OK(msh_op_add(a, a, a)); /* out aliases both */
    for (int64_t i = 0; i < n; i++) w[i] = 2 * va[i];
    CHECK(near_all("add out=a=b", a, w, NULL, 0, 0));

    for (int64_t i = 0; i < n; i++) w[i] = (double)(float)(2 * va[i] * 0.37f);
    CHECK_OK(msh_op_scale(o, a, 0.37f));
    CHECK(near_all("scale", o, w, NULL, 0, 0));
    CHECK_OK(msh_op_scale(a, a, 0.37f)); /* in place */
    CHECK(near_all("scale in place", a, w, NULL, 0, 0));
    free(va);
    free(va2);
    free(vb);
    free(w);
    msh_tensor_free(a);
    msh_tensor_free(b);
    msh_tensor_free(o);
  }
}

/* ------------------------------------------------------------------------------ set_rows */

static void test_set_rows(void) {
  for (int d = 0; d < 3; d++) {
    int64_t ds[3] = {11, 3, 5}, ss[3] = {4, 3, 5};
    msh_tensor *dst = trand(float_types[d], 3, ds), *src = trand(MSH_F32, 3, ss);
    double *before = snapshot(dst), *want = snapshot(dst);
    for (int64_t i = 0; i < 4 * 15; i++) { /* rows 6 .. 9 take src, rounded once to dst's dtype */
      float v = (float)at(src, i);
      want[6 * 15 + i] = float_types[d] == MSH_F32 ? v : float_types[d] == MSH_F16 ? msh_f16_to_f32(msh_f32_to_f16(v))
                                                                                   : msh_bf16_to_f32(msh_f32_to_bf16(v));
    }
    CHECK_OK(msh_op_set_rows(dst, 6, src));
    CHECK(near_all("set_rows", dst, want, NULL, 0, 0));
    CHECK_STATUS(msh_op_set_rows(dst, 8, src), MSH_ERANGE); /* rows 8 .. 11 of 11 */
    CHECK_STATUS(msh_op_set_rows(dst, -1, src), MSH_ERANGE);
    CHECK(near_all("set_rows untouched after errors", dst, want, NULL, 0, 0));
    free(before);
    free(want);
    msh_tensor_free(dst);
    msh_tensor_free(src);
  }
}

/* ----------------------------------------------------------------------- one thread vs more */

static void test_threads(void) {
  int saved = msh_get_num_threads();
  int64_t xs[2] = {1, 2048}, ws[2] = {1500, 2048}, os[2] = {1, 1500};
  int64_t xs2[2] = {48, 600}, ws2[2] = {700, 600}, os2[2] = {48, 700};
  int64_t qs[3] = {4, 8, 64}, cs[3] = {700, 2, 64}, ss[2] = {40, 5000};
  msh_tensor *x = trand(MSH_F32, 2, xs), *x2 = trand(MSH_F32, 2, xs2), *q = trand(MSH_F32, 3, qs);
  msh_tensor *k = trand(MSH_BF16, 3, cs), *v = trand(MSH_BF16, 3, cs), *sx = trand(MSH_F32, 2, ss);
  for (int d = 0; d < 3; d++) {
    msh_tensor *w = trand(float_types[d], 2, ws), *w2 = trand(float_types[d], 2, ws2);
    msh_tensor *o1 = tnew(MSH_F32, 2, os), *o2 = tnew(MSH_F32, 2, os), *p1 = tnew(MSH_F32, 2, os2),
               *p2 = tnew(MSH_F32, 2, os2);
    msh_set_num_threads(1);
    CHECK_OK(msh_op_matmul(o1, x, w));
    CHECK_OK(msh_op_matmul(p1, x2, w2));
    msh_set_num_threads(2);
    CHECK_OK(msh_op_matmul(o2, x, w));
    CHECK_OK(msh_op_matmul(p2, x2, w2));
    CHECK(same_values(o1, o2, 1e-6));
    CHECK(same_values(p1, p2, 1e-5));
    msh_tensor_free(w);
    msh_tensor_free(w2);
    msh_tensor_free(o1);
    msh_tensor_free(o2);
    msh_tensor_free(p1);
    msh_tensor_free(p2);
  }
  msh_tensor *a1 = tnew(MSH_F32, 3, qs), *a2 = tnew(MSH_F32, 3, qs), *s1 = tnew(MSH_F32, 2, ss),
             *s2 = tnew(MSH_F32, 2, ss);
  msh_set_num_threads(1);
  CHECK_OK(msh_op_attention(a1, q, k, v, 690, 0.125f));
  CHECK_OK(msh_op_softmax(s1, sx));
  msh_set_num_threads(2);
  CHECK_OK(msh_op_attention(a2, q, k, v, 690, 0.125f));
  CHECK_OK(msh_op_softmax(s2, sx));
  CHECK(same_values(a1, a2, 1e-6));
  CHECK(same_values(s1, s2, 1e-6));
  msh_set_num_threads(saved == 2 ? 0 : saved);
  msh_tensor_free(x);
  msh_tensor_free(x2);
  msh_tensor_free(q);
  msh_tensor_free(k);
  msh_tensor_free(v);
  msh_tensor_free(sx);
  msh_tensor_free(a1);
  msh_tensor_free(a2);
  msh_tensor_free(s1);
  msh_tensor_free(s2);
}

/* A thread that runs ops and exits: its scratch buffers go with it (LeakSanitizer checks). */
static void *ops_on_a_thread(void *arg) {
  int *ok = arg;
  int64_t qs[3] = {2, 4, 16}, cs[3] = {300, 2, 16}, xs[2] = {3, 100}, ws[2] = {50, 100}, os[2] = {3, 50};
  msh_tensor *q = NULL, *k = NULL, *v = NULL, *o = NULL, *x = NULL, *w = NULL, *y = NULL;
  *ok = msh_tensor_new(&q, MSH_F32, 3, qs, MSH_CPU, 0) == MSH_OK && msh_tensor_new(&o, MSH_F32, 3, qs, MSH_CPU, 0) == MSH_OK &&
        msh_tensor_new(&k, MSH_BF16, 3, cs, MSH_CPU, 0) == MSH_OK && msh_tensor_new(&v, MSH_BF16, 3, cs, MSH_CPU, 0) == MSH_OK &&
        msh_tensor_new(&x, MSH_F32, 2, xs, MSH_CPU, 0) == MSH_OK && msh_tensor_new(&w, MSH_F16, 2, ws, MSH_CPU, 0) == MSH_OK &&
        msh_tensor_new(&y, MSH_F32, 2, os, MSH_CPU, 0) == MSH_OK && msh_op_attention(o, q, k, v, 298, 0.25f) == MSH_OK &&
        msh_op_matmul(y, x, w) == MSH_OK;
  msh_tensor *ts[] = {q, k, v, o, x, w, y};
  for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++) msh_tensor_free(ts[i]);
  return NULL;
}

static void test_thread_exit(void) {
  pthread_t th;
  int ok = 0;
  CHECK(pthread_create(&th, NULL, ops_on_a_thread, &ok) == 0);
  CHECK(pthread_join(th, NULL) == 0);
  CHECK(ok);
}

/* ------------------------------------------------------------------------------ empties */

static void test_empty(void) {
  int64_t s0[2] = {3, 0}, s1[2] = {0, 5}, w0[1] = {0}, w5[1] = {5}, k0[2] = {4, 0}, o0[2] = {3, 4};
  msh_tensor *a = tnew(MSH_F32, 2, s0), *b = tnew(MSH_F32, 2, s1), *wa = tnew(MSH_F32, 1, w0), *wb = trand(MSH_F32, 1, w5);
  msh_tensor *wk = tnew(MSH_F32, 2, k0), *o = tnew(MSH_F32, 2, o0);
  fill(o, 1, 1);
  CHECK_OK(msh_op_softmax(a, a));
  CHECK_OK(msh_op_log_softmax(b, b));
  CHECK_OK(msh_op_rmsnorm(a, a, wa, 1e-5f));
  CHECK_OK(msh_op_rmsnorm(b, b, wb, 1e-5f));
  CHECK_OK(msh_op_matmul(o, a, wk)); /* K = 0: a sum of nothing */
  int zero = 1;
  for (int i = 0; i < 12; i++) zero &= at(o, i) == 0;
  CHECK(zero);
  msh_tensor *ts[] = {a, b, wa, wb, wk, o};
  for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++) msh_tensor_free(ts[i]);
}

/* --------------------------------------------------------------------------------- errors */

static void check_message(const char *op) {
  const char *m = msh_last_error();
  int ok = m[0] != '\0' && strstr(m, op) != NULL;
  if (!ok) fprintf(stderr, "  message for %s: '%s'\n", op, m);
  CHECK(ok);
}

static void test_errors(void) {
  int64_t xs[2] = {3, 8}, ws[2] = {5, 7}, os[2] = {3, 5};
  msh_tensor *x = trand(MSH_F32, 2, xs), *w = trand(MSH_F32, 2, ws), *o = tnew(MSH_F32, 2, os);
  msh_clear_error();
  CHECK_STATUS(msh_op_matmul(o, x, w), MSH_EINVAL); /* K 8 vs 7 */
  check_message("matmul");
  msh_clear_error();
  CHECK_STATUS(msh_op_add(o, x, x), MSH_EINVAL); /* (3, 5) vs (3, 8) */
  check_message("add");
  int64_t b7s[1] = {7}, b5x1[2] = {5, 1};
  msh_tensor *b7 = trand(MSH_F32, 1, b7s), *b51 = trand(MSH_F32, 2, b5x1), *ib = tnew(MSH_I32, 1, b7s);
  double *o_before = snapshot(o);
  msh_clear_error();
  CHECK_STATUS(msh_op_add_bias(o, b7), MSH_EINVAL); /* (3, 5) += (7) */
  check_message("add_bias");
  CHECK(strstr(msh_last_error(), "(3, 5)") != NULL && strstr(msh_last_error(), "(7)") != NULL);
  CHECK_STATUS(msh_op_add_bias(o, b51), MSH_EINVAL); /* b must be 1-D */
  CHECK_STATUS(msh_op_add_bias(x, ib), MSH_EINVAL);  /* i32 bias */
  CHECK_STATUS(msh_op_add_bias(b7, b7), MSH_EINVAL); /* out overlaps b */
  CHECK_STATUS(msh_op_add_bias(NULL, b7), MSH_EINVAL);
  CHECK(near_all("add_bias failures leave out", o, o_before, NULL, 0, 0));
  free(o_before);
  msh_tensor_free(b7);
  msh_tensor_free(b51);
  msh_tensor_free(ib);

  int64_t ts[2] = {10, 4}, is[1] = {3}, es[2] = {3, 4};
  msh_tensor *table = trand(MSH_F16, 2, ts), *ids = tnew(MSH_I32, 1, is), *e = tnew(MSH_F32, 2, es);
  int32_t *id = msh_tensor_data(ids);
  id[0] = 1;
  id[1] = 10;
  id[2] = 2;
  msh_clear_error();
  CHECK_STATUS(msh_op_embedding(e, table, ids), MSH_ERANGE);
  check_message("embedding");
  id[1] = -1;
  CHECK_STATUS(msh_op_embedding(e, table, ids), MSH_ERANGE);

  int64_t qs[3] = {2, 4, 8}, cs[3] = {6, 2, 8};
  msh_tensor *q = trand(MSH_F32, 3, qs), *k = trand(MSH_F32, 3, cs), *v = trand(MSH_F32, 3, cs),
             *ao = tnew(MSH_F32, 3, qs);
  CHECK_OK(msh_op_attention(ao, q, k, v, 4, 0.3f)); /* positions 4, 5 of 6: fits */
  msh_clear_error();
  CHECK_STATUS(msh_op_attention(ao, q, k, v, 5, 0.3f), MSH_ERANGE); /* 5 + 2 > 6 */
  check_message("attention");
  CHECK_STATUS(msh_op_attention(ao, q, k, v, -1, 0.3f), MSH_ERANGE);

  /* a read-only output: a tensor over a mapped file */
  char path[] = "/tmp/msh_test_ops_XXXXXX";
  int fd = mkstemp(path);
  CHECK(fd >= 0);
  float buf[15];
  for (int i = 0; i < 15; i++) buf[i] = (float)i;
  CHECK(write(fd, buf, sizeof buf) == (ssize_t)sizeof buf);
  close(fd);
  msh_file *f = NULL;
  msh_tensor *ro = NULL;
  CHECK_OK(msh_file_open(&f, path));
  CHECK_OK(msh_tensor_from_file(&ro, f, 0, MSH_F32, 2, os));
  msh_clear_error();
  CHECK_STATUS(msh_op_add(ro, o, o), MSH_EINVAL);
  check_message("add");
  CHECK(strstr(msh_last_error(), "read-only") != NULL);
  int64_t w8s[2] = {5, 8};
  msh_tensor *w8 = trand(MSH_F32, 2, w8s);
  CHECK_OK(msh_op_matmul(o, x, w8));
  CHECK_STATUS(msh_op_matmul(ro, x, w8), MSH_EINVAL);
  msh_tensor_free(w8);
  CHECK(((float *)msh_tensor_data(ro))[7] == 7.0f); /* untouched */
  msh_tensor_free(ro);
  msh_file_free(f);
  unlink(path);

  msh_tensor_free(x);
  msh_tensor_free(w);
  msh_tensor_free(o);
  msh_tensor_free(table);
  msh_tensor_free(ids);
  msh_tensor_free(e);
  msh_tensor_free(q);
  msh_tensor_free(k);
  msh_tensor_free(v);
  msh_tensor_free(ao);
}

int main(void) {
  test_matmul();
  test_rope();
  test_attention();
  test_rmsnorm();
  test_add_bias();
  test_softmax();
  test_argmax();
  test_embedding();
  test_elementwise();
  test_set_rows();
  test_threads();
  test_empty();
  test_thread_exit();
  test_errors();
  return check_done("test_ops");
}
