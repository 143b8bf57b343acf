/* test_batch.c: the cache ops with a leading batch dim (set_rows, set_rows_dyn, attention,
 * attention_dyn) on the CPU against the same op run sequence by sequence on slices: the same
 * bytes, with one shared or per-sequence positions (clamped ones too), caches that are narrowed
 * batch ranges of a larger fused k|v buffer, odd sizes, GQA ratios 1, 4 and 8; and validation. */
#include "check.h"

#include <string.h>

static uint64_t seed = 1000;

static msh_tensor *cpu_new(int dtype, int ndim, const int64_t *shape) {
  msh_tensor *t = NULL;
  CHECK_OK(msh_tensor_new(&t, dtype, ndim, shape, MSH_CPU, 0));
  return t;
}

static msh_tensor *cpu_randn(int dtype, int ndim, const int64_t *shape) {
  msh_tensor *t = cpu_new(dtype, ndim, shape);
  if (t) CHECK_OK(msh_tensor_randn(t, ++seed, 0.0f, 1.0f));
  return t;
}

/* A (n) i32 tensor holding v[0 .. n). */
static msh_tensor *i32_of(const int32_t *v, int64_t n) {
  msh_tensor *t = cpu_new(MSH_I32, 1, &n);
  if (t) memcpy(msh_tensor_data(t), v, sizeof(int32_t) * (size_t)n);
  return t;
}

/* Sequence b of t: a view without dim 0. */
static msh_tensor *seq(msh_tensor *t, int64_t b) {
  int n = msh_tensor_ndim(t);
  int64_t shape[MSH_MAX_DIMS], st[MSH_MAX_DIMS];
  for (int i = 1; i < n; i++) {
    shape[i - 1] = msh_tensor_dim(t, i);
    st[i - 1] = msh_tensor_stride(t, i);
  }
  msh_tensor *v = NULL;
  CHECK_OK(msh_tensor_view(&v, t, n - 1, shape, st, b * msh_tensor_stride(t, 0)));
  return v;
}

static int64_t clamp(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : x > hi ? hi : x; }

/* Bytes of two contiguous f32 tensors of equal numel; on a difference, the largest one. */
static int same_f32(const msh_tensor *a, const msh_tensor *b, double *worst) {
  const float *x = msh_tensor_data(a), *y = msh_tensor_data(b);
  int64_t n = msh_tensor_numel(a);
  *worst = 0;
  if (n != msh_tensor_numel(b)) {
    *worst = INFINITY;
    return 0;
  }
  if (!memcmp(x, y, sizeof(float) * (size_t)n)) return 1;
  for (int64_t i = 0; i < n; i++) {
    double d = fabs((double)x[i] - y[i]);
    if (!(d <= *worst)) *worst = isnan(d) ? INFINITY : d;
  }
  return 0;
}

/* ------------------------------------------------------------------------------ caches */

/* k and v (B, S, KVH, hd): either views of sequences [b0, b0 + B) of one fused buffer
 * (NB, S, 2, KVH, hd) (row stride 2 KVH hd, batch stride 2 S KVH hd), or two packed tensors. */
typedef struct {
  msh_tensor *buf, *k, *v;
} kv_cache;

static kv_cache kv_new(int dt, int fused, int64_t NB, int64_t b0, int64_t B, int64_t S, int64_t KVH, int64_t hd) {
  kv_cache c = {0};
  int64_t shape[4] = {B, S, KVH, hd};
  if (!fused) {
    c.k = cpu_randn(dt, 4, shape);
    c.v = cpu_randn(dt, 4, shape);
    return c;
  }
  int64_t fshape[5] = {NB, S, 2, KVH, hd};
  int64_t st[4] = {S * 2 * KVH * hd, 2 * KVH * hd, hd, 1};
  c.buf = cpu_randn(dt, 5, fshape);
  if (c.buf) {
    CHECK_OK(msh_tensor_view(&c.k, c.buf, 4, shape, st, b0 * st[0]));
    CHECK_OK(msh_tensor_view(&c.v, c.buf, 4, shape, st, b0 * st[0] + KVH * hd));
  }
  return c;
}

static void kv_free(kv_cache *c) {
  msh_tensor_free(c->k);
  msh_tensor_free(c->v);
  msh_tensor_free(c->buf);
}

/* ---------------------------------------------------------------------------- attention */

typedef struct {
  int dt, fused;
  int64_t B, T, H, KVH, hd, S;
} att_shape;

/* Batched attention (host pos0 when npos is 0, else attention_dyn with npos positions and
 * max_len) against attention on each sequence's slices at its (clamped) position. */
static void attention_case(const att_shape *s, int64_t pos0, const int32_t *pos, int64_t npos, int64_t max_len) {
  int64_t B = s->B, T = s->T, qshape[4] = {B, s->T, s->H, s->hd}, oshape[3] = {s->T, s->H, s->hd};
  kv_cache c = kv_new(s->dt, s->fused, B + 3, 2, B, s->S, s->KVH, s->hd);
  msh_tensor *q = cpu_randn(MSH_F32, 4, qshape), *out = cpu_new(MSH_F32, 4, qshape), *p = NULL;
  float scale = 1.0f / sqrtf((float)s->hd);
  char what[256];
  snprintf(what, sizeof what, "B %lld T %lld H %lld KVH %lld hd %lld S %lld %s%s, %s", (long long)B, (long long)T,
           (long long)s->H, (long long)s->KVH, (long long)s->hd, (long long)s->S, msh_dtype_name(s->dt),
           s->fused ? " (narrowed fused cache)" : "", npos ? (npos == 1 ? "one device position" : "per-sequence positions")
                                                          : "host position");
  if (!c.k || !c.v || !q || !out) goto done;
  if (npos) {
    p = i32_of(pos, npos);
    CHECK_OK(msh_op_attention_dyn(out, q, c.k, c.v, p, max_len, scale));
  } else {
    CHECK_OK(msh_op_attention(out, q, c.k, c.v, pos0, scale));
  }
  for (int64_t b = 0; b < B; b++) {
    int64_t pb = npos ? clamp(pos[npos == 1 ? 0 : b], 0, max_len - T) : pos0;
    msh_tensor *qb = seq(q, b), *kb = seq(c.k, b), *vb = seq(c.v, b), *ob = seq(out, b), *want = cpu_new(MSH_F32, 3, oshape);
    if (qb && kb && vb && ob && want) {
      CHECK_OK(msh_op_attention(want, qb, kb, vb, pb, scale));
      double worst;
      int ok = same_f32(ob, want, &worst);
      if (!ok) {
        char msg[400];
        snprintf(msg, sizeof msg, "attention %s: sequence %lld at position %lld differs from the op on its slices "
                 "(largest difference %g)", what, (long long)b, (long long)pb, worst);
        check_at(0, msg, __FILE__, __LINE__);
      } else {
        check_at(1, what, __FILE__, __LINE__);
      }
    }
    msh_tensor_free(qb);
    msh_tensor_free(kb);
    msh_tensor_free(vb);
    msh_tensor_free(ob);
    msh_tensor_free(want);
  }
done:
  kv_free(&c);
  msh_tensor_free(q);
  msh_tensor_free(out);
  msh_tensor_free(p);
}

static void test_attention(void) {
  static const int dts[3] = {MSH_F32, MSH_F16, MSH_BF16};
  static const int64_t kvhs[3] = {8, 2, 1}; /* GQA 1, 4, 8 with 8 query heads */
  for (int d = 0; d < 3; d++)
    for (int g = 0; g < 3; g++)
      for (int fused = 0; fused < 2; fused++) {
        att_shape s = {dts[d], fused, 3, 1, 8, kvhs[g], 40, 37};
        /* decode: one query per sequence */
        attention_case(&s, 20, NULL, 0, 0);
        int32_t pos[5] = {0, 35, 17, 4, 30};
        attention_case(&s, 0, pos, 3, 37);     /* per-sequence positions */
        attention_case(&s, 0, pos + 1, 1, 30); /* one position for all: clamped to 29 */
        /* chunks of 5 queries (odd head dim) */
        att_shape c = {dts[d], fused, 4, 5, 8, kvhs[g], 12, 41};
        attention_case(&c, 11, NULL, 0, 0);
        attention_case(&c, 36, NULL, 0, 0); /* the chunk ends at the cache's last row */
        int32_t cpos[4] = {0, 33, -5, 1000};   /* the last two clamp to 0 and 36 */
        attention_case(&c, 0, cpos, 4, 41);
      }
  /* B = 1 in 4-D; a batch of 9 with 12 heads over 3 kv heads and head dim 64 */
  att_shape one = {MSH_F32, 1, 1, 3, 4, 2, 16, 20};
  attention_case(&one, 7, NULL, 0, 0);
  int32_t p1 = 9;
  attention_case(&one, 0, &p1, 1, 15);
  att_shape nine = {MSH_BF16, 1, 9, 1, 12, 3, 64, 300};
  int32_t pos9[9] = {0, 299, 1, 150, 77, 298, 5, 64, 200};
  attention_case(&nine, 0, pos9, 9, 300);
  attention_case(&nine, 250, NULL, 0, 0);
}

/* ----------------------------------------------------------------------------- set_rows */

/* dst: sequences [1, 1 + B) of a (B + 2, S, KVH, hd) cache of dtype dt, or of the k half of a
 * fused (B + 2, S, 2, KVH, hd) one (layout 1), or columns [1, hd - 1) of it (layout 2: nothing
 * packed); src (B, T, ...) f32. The batched op (set_rows at rows[0] when nrows is 0, else
 * set_rows_dyn with nrows positions) writes the bytes that set_rows on each sequence's slices at
 * its clamped row writes, and nothing else. */
static void set_rows_case(int dt, int layout, int64_t B, int64_t S, int64_t T, const int32_t *rows, int64_t nrows) {
  const int64_t KVH = 3, hd = 10, NB = B + 2;
  int64_t hd_v = layout == 2 ? hd - 2 : hd, col0 = layout == 2 ? 1 : 0;
  int64_t fshape[5] = {NB, S, 2, KVH, hd};
  int64_t bshape[4] = {NB, S, KVH, hd};
  int64_t dshape[4] = {B, S, KVH, hd_v}, sshape[4] = {B, T, KVH, hd_v};
  int64_t fst[4] = {S * 2 * KVH * hd, 2 * KVH * hd, hd, 1}, pst[4] = {S * KVH * hd, KVH * hd, hd, 1};
  const int64_t *st = layout ? fst : pst;
  uint64_t sd = ++seed;
  msh_tensor *a = cpu_new(dt, layout ? 5 : 4, layout ? fshape : bshape);
  msh_tensor *ref = cpu_new(dt, layout ? 5 : 4, layout ? fshape : bshape);
  msh_tensor *src = cpu_randn(MSH_F32, 4, sshape), *da = NULL, *dr = NULL, *r = NULL;
  if (!a || !ref || !src) goto done;
  CHECK_OK(msh_tensor_randn(a, sd, 0.0f, 1.0f));
  CHECK_OK(msh_tensor_randn(ref, sd, 0.0f, 1.0f));
  CHECK_OK(msh_tensor_view(&da, a, 4, dshape, st, st[0] + col0));
  CHECK_OK(msh_tensor_view(&dr, ref, 4, dshape, st, st[0] + col0));
  if (!da || !dr) goto done;
  if (nrows) {
    r = i32_of(rows, nrows);
    CHECK_OK(msh_op_set_rows_dyn(da, r, src));
  } else {
    CHECK_OK(msh_op_set_rows(da, rows[0], src));
  }
  for (int64_t b = 0; b < B; b++) {
    msh_tensor *db = seq(dr, b), *sb = seq(src, b);
    int64_t row = clamp(rows[nrows > 1 ? b : 0], 0, S - T);
    if (db && sb) CHECK_OK(msh_op_set_rows(db, row, sb));
    msh_tensor_free(db);
    msh_tensor_free(sb);
  }
  size_t bytes = (size_t)msh_tensor_numel(a) * msh_dtype_size(dt);
  char msg[200];
  snprintf(msg, sizeof msg, "set_rows%s %s B %lld S %lld T %lld layout %d (%lld positions): the same bytes as per sequence",
           nrows ? "_dyn" : "", msh_dtype_name(dt), (long long)B, (long long)S, (long long)T, layout, (long long)nrows);
  check_at(!memcmp(msh_tensor_data(a), msh_tensor_data(ref), bytes), msg, __FILE__, __LINE__);
done:
  msh_tensor_free(da);
  msh_tensor_free(dr);
  msh_tensor_free(a);
  msh_tensor_free(ref);
  msh_tensor_free(src);
  msh_tensor_free(r);
}

static void test_set_rows(void) {
  static const int dts[3] = {MSH_F32, MSH_F16, MSH_BF16};
  int32_t rows[5] = {3, 0, 9, -4, 1 << 30}; /* the last two clamp to 0 and S - T */
  for (int d = 0; d < 3; d++)
    for (int layout = 0; layout < 3; layout++) {
      set_rows_case(dts[d], layout, 5, 12, 1, rows, 0);  /* host row, decode */
      set_rows_case(dts[d], layout, 5, 12, 3, rows, 0);  /* host row, a chunk */
      set_rows_case(dts[d], layout, 5, 12, 1, rows, 5);  /* per-sequence rows */
      set_rows_case(dts[d], layout, 5, 12, 3, rows, 5);
      set_rows_case(dts[d], layout, 5, 12, 2, rows + 2, 1); /* one row for all */
      set_rows_case(dts[d], layout, 1, 7, 7, rows + 1, 1);  /* T = S */
    }
  set_rows_case(MSH_F32, 0, 64, 9, 1, (int32_t[]){8}, 1);

  /* equal shapes: both readings write the whole tensor; one row per sequence is accepted */
  int64_t shape[3] = {2, 4, 3};
  msh_tensor *dst = cpu_new(MSH_F32, 3, shape), *src = cpu_randn(MSH_F32, 3, shape), *r = i32_of((int32_t[]){1, 2}, 2);
  if (dst && src && r) {
    CHECK_OK(msh_op_set_rows_dyn(dst, r, src));
    CHECK(!memcmp(msh_tensor_data(dst), msh_tensor_data(src), sizeof(float) * 24));
    CHECK_OK(msh_op_set_rows(dst, 0, src));
  }
  msh_tensor_free(dst);
  msh_tensor_free(src);
  msh_tensor_free(r);
}

/* ------------------------------------------------------------------------------- errors */

static void test_errors(void) {
  int64_t cshape[4] = {3, 10, 2, 8}, sshape[4] = {3, 2, 2, 8}, s2[4] = {2, 2, 2, 8}, tall[4] = {3, 11, 2, 8}, odd[4] = {3, 2, 3, 8};
  int64_t qshape[4] = {3, 2, 4, 8}, q2[4] = {2, 2, 4, 8}, q3[3] = {2, 4, 8};
  msh_tensor *cache = cpu_new(MSH_F32, 4, cshape), *src = cpu_new(MSH_F32, 4, sshape), *src2 = cpu_new(MSH_F32, 4, s2);
  msh_tensor *srct = cpu_new(MSH_F32, 4, tall), *srco = cpu_new(MSH_F32, 4, odd), *k = cpu_new(MSH_F32, 4, cshape), *v = cpu_new(MSH_F32, 4, cshape);
  msh_tensor *q = cpu_new(MSH_F32, 4, qshape), *out = cpu_new(MSH_F32, 4, qshape), *qb = cpu_new(MSH_F32, 4, q2);
  msh_tensor *ob = cpu_new(MSH_F32, 4, q2), *qt = cpu_new(MSH_F32, 3, q3), *ot = cpu_new(MSH_F32, 3, q3);
  msh_tensor *r1 = i32_of((int32_t[]){0}, 1), *r2 = i32_of((int32_t[]){0, 1}, 2), *r3 = i32_of((int32_t[]){0, 1, 2}, 3);
  /* set_rows */
  CHECK_OK(msh_op_set_rows(cache, 8, src));
  CHECK_STATUS(msh_op_set_rows(cache, 9, src), MSH_ERANGE); /* rows 9, 10 of 10 */
  CHECK_STATUS(msh_op_set_rows(cache, -1, src), MSH_ERANGE);
  CHECK_STATUS(msh_op_set_rows(cache, 0, src2), MSH_EINVAL); /* 2 sequences into 3 */
  CHECK(strstr(msh_last_error(), "(B, S, ...)") != NULL);
  CHECK_STATUS(msh_op_set_rows(cache, 0, srco), MSH_EINVAL); /* 3 kv heads into 2 */
  CHECK_STATUS(msh_op_set_rows(cache, 0, srct), MSH_ERANGE); /* 11 rows into 10 */
  /* set_rows_dyn */
  CHECK_OK(msh_op_set_rows_dyn(cache, r1, src));
  CHECK_OK(msh_op_set_rows_dyn(cache, r3, src));
  CHECK_STATUS(msh_op_set_rows_dyn(cache, r2, src), MSH_EINVAL); /* 2 positions for 3 sequences */
  CHECK(strstr(msh_last_error(), "one per sequence") != NULL);
  CHECK_STATUS(msh_op_set_rows_dyn(cache, r1, src2), MSH_EINVAL);
  CHECK_STATUS(msh_op_set_rows_dyn(cache, r1, srco), MSH_EINVAL);
  CHECK_STATUS(msh_op_set_rows_dyn(cache, r1, srct), MSH_ERANGE);
  int64_t rows_shape[2] = {10, 16}, rsrc[2] = {2, 16};
  msh_tensor *plain = cpu_new(MSH_F32, 2, rows_shape), *psrc = cpu_new(MSH_F32, 2, rsrc);
  CHECK_STATUS(msh_op_set_rows_dyn(plain, r2, psrc), MSH_EINVAL); /* rows along dim 0: one position */
  CHECK(strstr(msh_last_error(), "one contiguous i32 element") != NULL);
  /* attention */
  CHECK_OK(msh_op_attention(out, q, k, v, 8, 1.0f));
  CHECK_STATUS(msh_op_attention(out, q, k, v, 9, 1.0f), MSH_ERANGE);
  CHECK_STATUS(msh_op_attention(ob, qb, k, v, 0, 1.0f), MSH_EINVAL); /* 2 sequences over 3 caches */
  CHECK(strstr(msh_last_error(), "[B,]") != NULL);
  CHECK_STATUS(msh_op_attention(ot, qt, k, v, 0, 1.0f), MSH_EINVAL); /* 3-D queries over a 4-D cache */
  CHECK_OK(msh_op_attention_dyn(out, q, k, v, r3, 10, 1.0f));
  CHECK_OK(msh_op_attention_dyn(out, q, k, v, r1, 2, 1.0f));
  CHECK_STATUS(msh_op_attention_dyn(out, q, k, v, r2, 10, 1.0f), MSH_EINVAL);
  CHECK(strstr(msh_last_error(), "pos0") != NULL && strstr(msh_last_error(), "one per sequence") != NULL);
  CHECK_STATUS(msh_op_attention_dyn(out, q, k, v, r3, 11, 1.0f), MSH_ERANGE);
  CHECK_STATUS(msh_op_attention_dyn(out, q, k, v, r3, 1, 1.0f), MSH_ERANGE);
  /* heads must stay packed: a cache with its kv heads strided apart */
  int64_t kst[4] = {10 * 4 * 8, 4 * 8, 16, 1};
  msh_tensor *big = NULL;
  int64_t bshape[4] = {3, 10, 4, 8};
  msh_tensor *bigt = cpu_new(MSH_F32, 4, bshape);
  if (bigt) CHECK_OK(msh_tensor_view(&big, bigt, 4, cshape, kst, 0));
  if (big) CHECK_STATUS(msh_op_attention(out, q, big, big, 0, 1.0f), MSH_EINVAL);
  msh_tensor_free(big);
  msh_tensor_free(bigt);
  msh_tensor *ts[] = {cache, src, src2, srct, srco, k, v, q, out, qb, ob, qt, ot, r1, r2, r3, plain, psrc};
  for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++) msh_tensor_free(ts[i]);
}

int main(void) {
  test_attention();
  test_set_rows();
  test_errors();
  return check_done("test_batch");
}
