/* cpu_ops.c: the small ops of the CPU backend: embedding, rmsnorm, rope, elementwise, add_bias,
 * softmax, argmax. Each works row by row; rows go to several threads only when there are enough of them. */
#include "cpu_internal.h"

#include <omp.h>

/* Elements per thread below which an op stays on the calling thread. */
enum { GRAIN_STREAM = 1 << 16, GRAIN_MATH = 1 << 14 };

/* ------------------------------------------------------------------------ vector helpers */

float msh_cpu_exp_sum(float *y, const float *x, int64_t n, float shift) {
  int64_t i = 0;
  float sum = 0;
#if MSH_CPU_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), sh = _mm256_set1_ps(shift);
  for (; i + 16 <= n; i += 16) {
    __m256 e0 = msh_cpu_exp8_nonpos(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh));
    __m256 e1 = msh_cpu_exp8_nonpos(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), sh));
    if (y) {
      _mm256_storeu_ps(y + i, e0);
      _mm256_storeu_ps(y + i + 8, e1);
    }
    acc0 = _mm256_add_ps(acc0, e0);
    acc1 = _mm256_add_ps(acc1, e1);
  }
  sum = msh_cpu_hsum8(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; i++) {
#if MSH_CPU_AVX2
    float e = _mm256_cvtss_f32(msh_cpu_exp8_nonpos(_mm256_set1_ps(x[i] - shift)));
#else
    float e = expf(x[i] - shift);
#endif
    if (y) y[i] = e;
    sum += e;
  }
  return sum;
}

float msh_cpu_max(const float *x, int64_t n) {
  int64_t i = 0;
  float m = -INFINITY;
#if MSH_CPU_AVX2
  if (n >= 8) {
    __m256 acc = _mm256_set1_ps(-INFINITY);
    for (; i + 8 <= n; i += 8) acc = _mm256_max_ps(_mm256_loadu_ps(x + i), acc); /* NaN lanes keep acc */
    m = msh_cpu_hmax8(acc);
  }
#endif
  for (; i < n; i++)
    if (x[i] > m) m = x[i];
  return m;
}

/* ----------------------------------------------------------------------------- embedding */

msh_status msh_cpu_embedding(msh_tensor *out, const msh_tensor *table, const msh_tensor *ids) {
  int64_t T = out->shape[0], D = out->shape[1], V = table->shape[0];
  const int32_t *id = msh_tensor_ptr(ids);
  float *o = msh_tensor_ptr(out);
  const char *w = msh_tensor_ptr(table);
  int64_t row = msh_dtype_bytes(table->dtype, D); /* bytes per row of the table */
  for (int64_t t = 0; t < T; t++) /* check every id before writing anything */
    if (id[t] < 0 || id[t] >= V)
      return MSH_FAIL(MSH_ERANGE, "embedding: id %d at %lld outside [0, %lld)", id[t], (long long)t, (long long)V);
  int nt = msh_cpu_threads(T * D, GRAIN_STREAM);
  if (nt > T) nt = (int)T;
  if (nt <= 1) {
    for (int64_t t = 0; t < T; t++) msh_cpu_row_f32(o + t * D, w + (int64_t)id[t] * row, table->dtype, D);
    return MSH_OK;
  }
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t t = 0; t < T; t++) msh_cpu_row_f32(o + t * D, w + (int64_t)id[t] * row, table->dtype, D);
  return MSH_OK;
}

/* ------------------------------------------------------------------------------- rmsnorm */

static float sum_squares(const float *x, int64_t n) {
  int64_t i = 0;
  float ss = 0;
#if MSH_CPU_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
    a0 = _mm256_fmadd_ps(v0, v0, a0);
    a1 = _mm256_fmadd_ps(v1, v1, a1);
  }
  ss = msh_cpu_hsum8(_mm256_add_ps(a0, a1));
#endif
  for (; i < n; i++) ss += x[i] * x[i];
  return ss;
}

static void rmsnorm_rows(float *o, const float *x, const float *w, int64_t D, float eps, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; r++) {
    const float *xr = x + r * D;
    float *orow = o + r * D;
    float inv = 1.0f / sqrtf(sum_squares(xr, D) / (float)D + eps);
    for (int64_t d = 0; d < D; d++) orow[d] = xr[d] * inv * w[d];
  }
}

msh_status msh_cpu_rmsnorm(msh_tensor *out, const msh_tensor *x, const msh_tensor *w, float eps) {
  int64_t D = x->shape[x->ndim - 1];
  if (D == 0 || msh_tensor_numel(x) == 0) return MSH_OK; /* nothing to normalize (and msh_rows would divide by 0) */
  int64_t R = msh_rows(x);
  const float *xp = msh_tensor_ptr(x), *wp = msh_tensor_ptr(w);
  float *o = msh_tensor_ptr(out);
  if (w->dtype != MSH_F32) { /* widen the weight once */
    float *wf = msh_cpu_scratch(0, (size_t)D);
    if (!wf) return MSH_FAIL(MSH_ENOMEM, "rmsnorm: out of memory for %lld floats", (long long)D);
    msh_cpu_convert(wf, MSH_F32, wp, w->dtype, D);
    wp = wf;
  }
  int nt = msh_cpu_threads(R * D, GRAIN_STREAM);
  if (nt > R) nt = (int)R;
  if (nt <= 1) {
    rmsnorm_rows(o, xp, wp, D, eps, 0, R);
    return MSH_OK;
  }
#pragma omp parallel num_threads(nt)
  {
    int64_t r0, r1;
    msh_cpu_split(R, omp_get_thread_num(), omp_get_num_threads(), 1, &r0, &r1);
    rmsnorm_rows(o, xp, wp, D, eps, r0, r1);
  }
  return MSH_OK;
}

/* ---------------------------------------------------------------------------------- rope */

/* Rotates rows t0 .. t1 of x (T, H, hd). Angles are formed in double, so that large positions keep
 * their precision; cos and sin are rounded to f32 once and then applied to every head. */
void msh_cpu_rope_rows(float *x, const int32_t *pos, const float *inv_freq, int64_t H, int64_t hd, int64_t R,
                       int style, int64_t t0, int64_t t1) {
  enum { CHUNK = 64 };
  float c[CHUNK], s[CHUNK];
  for (int64_t t = t0; t < t1; t++)
    for (int64_t i0 = 0; i0 < R; i0 += CHUNK) {
      int64_t n = R - i0 < CHUNK ? R - i0 : CHUNK;
      for (int64_t i = 0; i < n; i++) {
        double a = (double)pos[t] * (double)inv_freq[i0 + i];
        c[i] = (float)cos(a);
        s[i] = (float)sin(a);
      }
      for (int64_t h = 0; h < H; h++) {
        float *v = x + (t * H + h) * hd;
        if (style == MSH_ROPE_INTERLEAVED) {
          float *p = v + 2 * i0;
          for (int64_t i = 0; i < n; i++) {
            float v0 = p[2 * i], v1 = p[2 * i + 1];
            p[2 * i] = v0 * c[i] - v1 * s[i];
            p[2 * i + 1] = v0 * s[i] + v1 * c[i];
          }
        } else {
          float *p0 = v + i0, *p1 = v + R + i0;
          for (int64_t i = 0; i < n; i++) {
            float v0 = p0[i], v1 = p1[i];
            p0[i] = v0 * c[i] - v1 * s[i];
            p1[i] = v0 * s[i] + v1 * c[i];
          }
        }
      }
    }
}

msh_status msh_cpu_rope(msh_tensor *x, const msh_tensor *pos, const msh_tensor *inv_freq, int style) {
  int64_t T = x->shape[0], H = x->shape[1], hd = x->shape[2], R = inv_freq->shape[0];
  float *xp = msh_tensor_ptr(x);
  const int32_t *pp = msh_tensor_ptr(pos);
  const float *f = msh_tensor_ptr(inv_freq);
  int nt = msh_cpu_threads(T * (H + 8) * R, GRAIN_MATH); /* + 8: the sin/cos of each row */
  if (nt > T) nt = (int)T;
  if (nt <= 1) {
    msh_cpu_rope_rows(xp, pp, f, H, hd, R, style, 0, T);
    return MSH_OK;
  }
#pragma omp parallel num_threads(nt)
  {
    int64_t t0, t1;
    msh_cpu_split(T, omp_get_thread_num(), omp_get_num_threads(), 1, &t0, &t1);
    msh_cpu_rope_rows(xp, pp, f, H, hd, R, style, t0, t1);
  }
  return MSH_OK;
}

/* --------------------------------------------------------------------------- elementwise */

typedef enum { EW_ADD, EW_SCALE, EW_SILU_MUL } ew_kind;

/* o[i0 .. i1) for one kind; o may alias a or b (each element is read before it is written). */
static void ew_range(ew_kind kind, float *o, const float *a, const float *b, float s, int64_t i0, int64_t i1) {
  int64_t i = i0;
  switch (kind) {
  case EW_ADD:
    for (; i < i1; i++) o[i] = a[i] + b[i];
    break;
  case EW_SCALE:
    for (; i < i1; i++) o[i] = a[i] * s;
    break;
  case EW_SILU_MUL:
#if MSH_CPU_AVX2
    for (; i + 8 <= i1; i += 8) {
      __m256 g = _mm256_loadu_ps(a + i), u = _mm256_loadu_ps(b + i);
      __m256 e = msh_cpu_exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
      _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u));
    }
#endif
    for (; i < i1; i++) o[i] = a[i] / (1.0f + msh_cpu_expf(-a[i])) * b[i];
    break;
  }
}

static msh_status elementwise(ew_kind kind, msh_tensor *out, const msh_tensor *a, const msh_tensor *b, float s) {
  int64_t n = msh_tensor_numel(out);
  float *o = msh_tensor_ptr(out);
  const float *ap = msh_tensor_ptr(a), *bp = b ? msh_tensor_ptr(b) : NULL;
  int nt = msh_cpu_threads(n, kind == EW_SILU_MUL ? GRAIN_MATH : GRAIN_STREAM);
  if (nt <= 1) {
    ew_range(kind, o, ap, bp, s, 0, n);
    return MSH_OK;
  }
#pragma omp parallel num_threads(nt)
  {
    int64_t i0, i1;
    msh_cpu_split(n, omp_get_thread_num(), omp_get_num_threads(), 16, &i0, &i1);
    ew_range(kind, o, ap, bp, s, i0, i1);
  }
  return MSH_OK;
}

msh_status msh_cpu_silu_mul(msh_tensor *out, const msh_tensor *gate, const msh_tensor *up) {
  return elementwise(EW_SILU_MUL, out, gate, up, 0);
}

msh_status msh_cpu_add(msh_tensor *out, const msh_tensor *a, const msh_tensor *b) {
  return elementwise(EW_ADD, out, a, b, 0);
}

/* out (R, N) += b (N) for rows r0 .. r1. */
static void add_bias_rows(float *o, const float *b, int64_t N, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; r++) {
    float *orow = o + r * N;
    for (int64_t n = 0; n < N; n++) orow[n] += b[n];
  }
}

msh_status msh_cpu_add_bias(msh_tensor *out, const msh_tensor *b) {
  int64_t N = out->shape[out->ndim - 1], R = msh_rows(out);
  float *o = msh_tensor_ptr(out);
  const float *bp = msh_tensor_ptr(b);
  if (b->dtype != MSH_F32) { /* widen the bias once */
    float *bf = msh_cpu_scratch(0, (size_t)N);
    if (!bf) return MSH_FAIL(MSH_ENOMEM, "add_bias: out of memory for %lld floats", (long long)N);
    msh_cpu_convert(bf, MSH_F32, bp, b->dtype, N);
    bp = bf;
  }
  int nt = msh_cpu_threads(R * N, GRAIN_STREAM);
  if (nt > R) nt = (int)R;
  if (nt <= 1) {
    add_bias_rows(o, bp, N, 0, R);
    return MSH_OK;
  }
#pragma omp parallel num_threads(nt)
  {
    int64_t r0, r1;
    msh_cpu_split(R, omp_get_thread_num(), omp_get_num_threads(), 1, &r0, &r1);
    add_bias_rows(o, bp, N, r0, r1);
  }
  return MSH_OK;
}

msh_status msh_cpu_scale(msh_tensor *out, const msh_tensor *x, float s) {
  return elementwise(EW_SCALE, out, x, NULL, s);
}

/* ------------------------------------------------------------------------------- softmax */

static void softmax_rows(float *o, const float *x, int64_t N, int log, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; r++) {
    const float *xr = x + r * N;
    float *orow = o + r * N;
    float mx = msh_cpu_max(xr, N);
    if (mx == -INFINITY) mx = 0; /* every value -inf (or NaN): let the NaNs show */
    if (log) {
      /* (x - max) - log(sum): both terms exact or small, so the result keeps its relative precision */
      float lsum = (float)logf(msh_cpu_exp_sum(NULL, xr, N, mx));
      for (int64_t i = 0; i < N; i++) orow[i] = (xr[i] - mx) - lsum;
    } else {
      float inv = 1.0f / msh_cpu_exp_sum(orow, xr, N, mx);
      for (int64_t i = 0; i < N; i++) orow[i] *= inv;
    }
  }
}

msh_status msh_cpu_softmax(msh_tensor *out, const msh_tensor *x, int log) {
  int64_t N = x->shape[x->ndim - 1];
  if (N == 0 || msh_tensor_numel(x) == 0) return MSH_OK; /* empty rows (msh_rows would divide by 0) */
  int64_t R = msh_rows(x);
  const float *xp = msh_tensor_ptr(x);
  float *o = msh_tensor_ptr(out);
  int nt = msh_cpu_threads(R * N, GRAIN_MATH);
  if (nt > R) nt = (int)R;
  if (nt <= 1) {
    softmax_rows(o, xp, N, log, 0, R);
    return MSH_OK;
  }
#pragma omp parallel num_threads(nt)
  {
    int64_t r0, r1;
    msh_cpu_split(R, omp_get_thread_num(), omp_get_num_threads(), 1, &r0, &r1);
    softmax_rows(o, xp, N, log, r0, r1);
  }
  return MSH_OK;
}

/* -------------------------------------------------------------------------------- argmax */

/* The first index of the largest value (NaNs ignored; 0 when every value is NaN). */
static int32_t argmax_row(const float *x, int64_t N) {
  float m = msh_cpu_max(x, N);
  for (int64_t i = 0; i < N; i++)
    if (x[i] == m) return (int32_t)i;
  return 0;
}

msh_status msh_cpu_argmax(const msh_tensor *x, int32_t *out) {
  int64_t N = x->shape[x->ndim - 1], R = msh_rows(x);
  const float *xp = msh_tensor_ptr(x);
  int nt = msh_cpu_threads(R * N, GRAIN_STREAM);
  if (nt > R) nt = (int)R;
  if (nt <= 1) {
    for (int64_t r = 0; r < R; r++) out[r] = argmax_row(xp + r * N, N);
    return MSH_OK;
  }
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < R; r++) out[r] = argmax_row(xp + r * N, N);
  return MSH_OK;
}
