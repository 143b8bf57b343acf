/* test_paged.c: the paged KV cache on the CPU (msh_op_kv_write, msh_op_paged_attention) against
 * a float64 reference that walks the block tables itself: random non-contiguous tables with
 * blocks shared between sequences, ragged query and context lengths (decodes, prompt chunks at
 * non-zero positions, a whole prompt), grouped-query heads, f32/f16/bf16 pools; the same output
 * as msh_op_attention over a contiguous copy of each sequence's cache; bad arguments refused
 * (MSH_EINVAL for shapes, MSH_ERANGE for values) with the output and the pool untouched. */
#include "check.h"

#include <string.h>

static msh_tensor *cpu_new(int dtype, int ndim, const int64_t *shape) {
  msh_tensor *t = NULL;
  CHECK_OK(msh_tensor_new(&t, dtype, ndim, shape, MSH_CPU, 0));
  return t;
}

static msh_tensor *cpu_randn(int dtype, int ndim, const int64_t *shape, uint64_t seed) {
  msh_tensor *t = cpu_new(dtype, ndim, shape);
  if (t) CHECK_OK(msh_tensor_randn(t, seed, 0.0f, 1.0f));
  return t;
}

static msh_tensor *i32_from(int ndim, const int64_t *shape, const int32_t *vals) {
  msh_tensor *t = cpu_new(MSH_I32, ndim, shape);
  if (t) memcpy(msh_tensor_data(t), vals, sizeof(int32_t) * (size_t)msh_tensor_numel(t));
  return t;
}

/* A pool's values as f32 (the reference reads what the pool holds, rounded to its dtype). */
static float *as_f32(const msh_tensor *t) {
  msh_tensor *f = NULL;
  CHECK_OK(msh_tensor_contiguous(&f, t, MSH_F32));
  size_t n = (size_t)msh_tensor_numel(t);
  float *p = malloc(sizeof(float) * n);
  memcpy(p, msh_tensor_data(f), sizeof(float) * n);
  msh_tensor_free(f);
  return p;
}

static uint64_t rng = 88172645463325252ull;
static uint32_t rnd(uint32_t n) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return (uint32_t)(rng % n);
}

/* ------------------------------------------------------------------------- the reference */

/* out (R, H, hd) in float64 from the pools walked through the tables. */
static void reference(double *out, const float *q, const float *kp, const float *vp, const int32_t *qs,
                      const int32_t *cl, const int32_t *bt, int64_t B, int64_t MB, int64_t H, int64_t KVH, int64_t hd,
                      int64_t BS, float scale) {
  for (int64_t b = 0; b < B; b++) {
    int64_t n_new = qs[b + 1] - qs[b];
    for (int64_t i = 0; i < n_new; i++) {
      int64_t r = qs[b] + i, pos = cl[b] - n_new + i;
      for (int64_t h = 0; h < H; h++) {
        int64_t kvh = h / (H / KVH);
        double *sc = malloc(sizeof(double) * (size_t)(pos + 1)), mx = -INFINITY, sum = 0;
        for (int64_t s = 0; s <= pos; s++) {
          int64_t row = (int64_t)bt[b * MB + s / BS] * BS + s % BS;
          double acc = 0;
          for (int64_t d = 0; d < hd; d++) acc += (double)q[(r * H + h) * hd + d] * kp[(row * KVH + kvh) * hd + d];
          sc[s] = acc * scale;
          if (sc[s] > mx) mx = sc[s];
        }
        for (int64_t s = 0; s <= pos; s++) sum += (sc[s] = exp(sc[s] - mx));
        for (int64_t d = 0; d < hd; d++) {
          double acc = 0;
          for (int64_t s = 0; s <= pos; s++) {
            int64_t row = (int64_t)bt[b * MB + s / BS] * BS + s % BS;
            acc += sc[s] * vp[(row * KVH + kvh) * hd + d];
          }
          out[(r * H + h) * hd + d] = acc / sum;
        }
        free(sc);
      }
    }
  }
}

/* ------------------------------------------------------------------------------ one case */

typedef struct {
  int dt;
  int64_t NB, BS, H, KVH, hd, B, MB;
  const int32_t *n_new, *ctx; /* B each */
  int share;                  /* sequences 0 and 1 share their first block */
} paged_case;

/* Random distinct blocks for every table entry a context reaches (the rest -1: never read);
 * with share, sequence 1's first block is sequence 0's. */
static void random_tables(int32_t *bt, const paged_case *c) {
  int32_t *perm = malloc(sizeof(int32_t) * (size_t)c->NB);
  for (int64_t i = 0; i < c->NB; i++) perm[i] = (int32_t)i;
  for (int64_t i = c->NB - 1; i > 0; i--) {
    int64_t j = rnd((uint32_t)(i + 1));
    int32_t t = perm[i];
    perm[i] = perm[j];
    perm[j] = t;
  }
  int64_t next = 0;
  for (int64_t b = 0; b < c->B; b++)
    for (int64_t j = 0; j < c->MB; j++) {
      int used = j < (c->ctx[b] + c->BS - 1) / c->BS;
      bt[b * c->MB + j] = used ? perm[next++ % c->NB] : -1;
    }
  if (c->share && c->B > 1) bt[c->MB] = bt[0];
  free(perm);
}

static void run_case(const paged_case *c, uint64_t seed) {
  int64_t R = 0, maxc = 1;
  int32_t qs[32];
  qs[0] = 0;
  for (int64_t b = 0; b < c->B; b++) {
    R += c->n_new[b];
    qs[b + 1] = (int32_t)R;
    if (c->ctx[b] > maxc) maxc = c->ctx[b];
  }
  int64_t pshape[4] = {c->NB, c->BS, c->KVH, c->hd}, qshape[3] = {R, c->H, c->hd};
  int64_t bshape[1] = {c->B + 1}, cshape[1] = {c->B}, tshape[2] = {c->B, c->MB};
  msh_tensor *kp = cpu_randn(c->dt, 4, pshape, seed), *vp = cpu_randn(c->dt, 4, pshape, seed + 1);
  msh_tensor *q = cpu_randn(MSH_F32, 3, qshape, seed + 2), *out = cpu_new(MSH_F32, 3, qshape);
  int32_t *bt = malloc(sizeof(int32_t) * (size_t)(c->B * c->MB));
  random_tables(bt, c);
  msh_tensor *tq = i32_from(1, bshape, qs), *tc = i32_from(1, cshape, c->ctx), *tb = i32_from(2, tshape, bt);
  float scale = 1.0f / sqrtf((float)c->hd);
  CHECK_OK(msh_op_paged_attention(out, q, kp, vp, tq, tc, tb, maxc, scale));
  float *kf = as_f32(kp), *vf = as_f32(vp);
  size_t n = (size_t)(R * c->H * c->hd);
  double *want = malloc(sizeof(double) * n);
  reference(want, msh_tensor_data(q), kf, vf, qs, c->ctx, bt, c->B, c->MB, c->H, c->KVH, c->hd, c->BS, scale);
  const float *got = msh_tensor_data(out);
  int bad = 0;
  for (size_t i = 0; i < n; i++) bad += !close_enough(got[i], want[i], 1e-4, 1e-5);
  CHECK(bad == 0);
  if (bad) fprintf(stderr, "  dtype %d, %lld sequences, hd %lld: %d of %zu values off\n", c->dt, (long long)c->B,
                   (long long)c->hd, bad, n);

  /* a larger planned bound reads the same */
  if (maxc < c->MB * c->BS) {
    msh_tensor *o2 = cpu_new(MSH_F32, 3, qshape);
    CHECK_OK(msh_op_paged_attention(o2, q, kp, vp, tq, tc, tb, c->MB * c->BS, scale));
    CHECK(!memcmp(msh_tensor_data(o2), got, sizeof(float) * n));
    msh_tensor_free(o2);
  }

  /* each sequence alone through msh_op_attention over a contiguous copy of its cache */
  for (int64_t b = 0; b < c->B; b++) {
    int64_t T = c->n_new[b], S = c->ctx[b];
    if (T == 0) continue;
    int64_t kshape[3] = {S, c->KVH, c->hd}, q1[3] = {T, c->H, c->hd};
    msh_tensor *k1 = cpu_new(c->dt, 3, kshape), *v1 = cpu_new(c->dt, 3, kshape);
    size_t es = msh_dtype_size(c->dt), row = (size_t)(c->KVH * c->hd) * es;
    for (int64_t s = 0; s < S; s++) {
      int64_t prow = (int64_t)bt[b * c->MB + s / c->BS] * c->BS + s % c->BS;
      memcpy((char *)msh_tensor_data(k1) + s * row, (char *)msh_tensor_data(kp) + prow * row, row);
      memcpy((char *)msh_tensor_data(v1) + s * row, (char *)msh_tensor_data(vp) + prow * row, row);
    }
    msh_tensor *qb = NULL, *o1 = cpu_new(MSH_F32, 3, q1), *ob = NULL;
    CHECK_OK(msh_tensor_narrow(&qb, q, 0, qs[b], T));
    CHECK_OK(msh_tensor_narrow(&ob, out, 0, qs[b], T));
    CHECK_OK(msh_op_attention(o1, qb, k1, v1, S - T, scale));
    const float *x = msh_tensor_data(o1), *y = msh_tensor_data(ob);
    int off = 0;
    for (int64_t i = 0; i < T * c->H * c->hd; i++) off += !close_enough(y[i], x[i], 1e-5, 1e-6);
    CHECK(off == 0);
    msh_tensor_free(k1);
    msh_tensor_free(v1);
    msh_tensor_free(qb);
    msh_tensor_free(o1);
    msh_tensor_free(ob);
  }
  free(kf);
  free(vf);
  free(want);
  free(bt);
  msh_tensor_free(kp);
  msh_tensor_free(vp);
  msh_tensor_free(q);
  msh_tensor_free(out);
  msh_tensor_free(tq);
  msh_tensor_free(tc);
  msh_tensor_free(tb);
}

static void test_attention(void) {
  /* decodes, a chunk at position 9, a whole prompt, an empty entry; contexts across blocks */
  static const int32_t n1[4] = {1, 4, 7, 1}, c1[4] = {13, 13, 7, 1};
  static const int32_t n2[3] = {1, 1, 1}, c2[3] = {40, 3, 17};
  static const int32_t n3[3] = {5, 0, 2}, c3[3] = {5, 6, 31};
  const int dts[3] = {MSH_F32, MSH_F16, MSH_BF16};
  for (int i = 0; i < 3; i++) {
    paged_case a = {dts[i], 24, 4, 8, 2, 16, 4, 8, n1, c1, 1}; /* GQA 4:1, AVX path */
    run_case(&a, 10 + (uint64_t)i);
    paged_case b = {dts[i], 20, 16, 6, 3, 6, 3, 3, n2, c2, 1}; /* hd 6: the scalar path, GQA 2:1 */
    run_case(&b, 20 + (uint64_t)i);
    paged_case c = {dts[i], 16, 8, 12, 1, 32, 3, 4, n3, c3, 0}; /* MQA (12 heads on 1 = 3 units of 4) */
    run_case(&c, 30 + (uint64_t)i);
  }
  /* many sequences of a few decodes each, over a larger pool (threads take units) */
  int32_t n4[16], c4[16];
  for (int b = 0; b < 16; b++) {
    n4[b] = b % 5 == 0 ? 3 : 1;
    c4[b] = 3 + (int32_t)rnd(120);
  }
  paged_case d = {MSH_F32, 200, 16, 8, 2, 64, 16, 8, n4, c4, 1};
  run_case(&d, 40);
}

/* --------------------------------------------------------------------------------- kv_write */

static void test_kv_write(void) {
  int64_t pshape[4] = {5, 4, 2, 8}, rshape[3] = {4, 2, 8}, sshape[1] = {4};
  const int dts[3] = {MSH_F32, MSH_F16, MSH_BF16};
  for (int i = 0; i < 3; i++) {
    msh_tensor *kp = cpu_randn(dts[i], 4, pshape, 1), *vp = cpu_randn(dts[i], 4, pshape, 2);
    msh_tensor *k0 = NULL, *v0 = NULL;
    CHECK_OK(msh_tensor_contiguous(&k0, kp, dts[i]));
    CHECK_OK(msh_tensor_contiguous(&v0, vp, dts[i]));
    msh_tensor *k = cpu_randn(MSH_F32, 3, rshape, 3), *v = cpu_randn(MSH_F32, 3, rshape, 4);
    int32_t slots[4] = {17, -1, 0, 6}; /* block 4 row 1, a padding row, block 0 row 0, block 1 row 2 */
    msh_tensor *ts = i32_from(1, sshape, slots);
    CHECK_OK(msh_op_kv_write(kp, vp, k, v, ts));
    float *kf = as_f32(kp), *vf = as_f32(vp), *kf0 = as_f32(k0), *vf0 = as_f32(v0);
    float *kn = msh_tensor_data(k), *vn = msh_tensor_data(v);
    int bad = 0;
    for (int64_t row = 0; row < 20; row++) {
      int64_t from = -1;
      for (int r = 0; r < 4; r++)
        if (slots[r] == row) from = r;
      for (int64_t e = 0; e < 16; e++) {
        float wk = from < 0 ? kf0[row * 16 + e] : kn[from * 16 + e], wv = from < 0 ? vf0[row * 16 + e] : vn[from * 16 + e];
        double tol = dts[i] == MSH_F32 ? 0 : 1e-2;
        bad += !close_enough(kf[row * 16 + e], wk, tol, 0) || !close_enough(vf[row * 16 + e], wv, tol, 0);
      }
    }
    CHECK(bad == 0);
    /* a slot past the pool: refused before anything is written */
    int32_t far[4] = {1, 2, 20, 3};
    msh_tensor *tf = i32_from(1, sshape, far), *k1 = NULL;
    CHECK_OK(msh_tensor_contiguous(&k1, kp, dts[i]));
    CHECK_STATUS(msh_op_kv_write(kp, vp, k, v, tf), MSH_ERANGE);
    CHECK(!memcmp(msh_tensor_data(k1), msh_tensor_data(kp), msh_dtype_size(dts[i]) * 160));
    free(kf);
    free(vf);
    free(kf0);
    free(vf0);
    msh_tensor_free(kp);
    msh_tensor_free(vp);
    msh_tensor_free(k0);
    msh_tensor_free(v0);
    msh_tensor_free(k1);
    msh_tensor_free(k);
    msh_tensor_free(v);
    msh_tensor_free(ts);
    msh_tensor_free(tf);
  }
  /* shapes */
  msh_tensor *kp = cpu_randn(MSH_F32, 4, pshape, 1), *vp = cpu_randn(MSH_F32, 4, pshape, 2);
  int64_t bad_rows[3] = {4, 3, 8}, s3[1] = {3};
  msh_tensor *k = cpu_randn(MSH_F32, 3, rshape, 3), *kb = cpu_randn(MSH_F32, 3, bad_rows, 3);
  int32_t z[4] = {0, 1, 2, 3};
  msh_tensor *ts = i32_from(1, sshape, z), *t3 = i32_from(1, s3, z);
  CHECK_STATUS(msh_op_kv_write(kp, vp, kb, kb, ts), MSH_EINVAL); /* KVH 3 into pools of 2 */
  CHECK_STATUS(msh_op_kv_write(kp, vp, k, k, t3), MSH_EINVAL);   /* 3 slots for 4 rows */
  CHECK_STATUS(msh_op_kv_write(kp, kp, k, k, ts), MSH_EINVAL);   /* one pool twice */
  CHECK_STATUS(msh_op_kv_write(kp, vp, k, k, k), MSH_EINVAL);    /* f32 slots */
  CHECK_STATUS(msh_op_kv_write(kp, vp, k, NULL, ts), MSH_EINVAL);
  msh_tensor_free(kp);
  msh_tensor_free(vp);
  msh_tensor_free(k);
  msh_tensor_free(kb);
  msh_tensor_free(ts);
  msh_tensor_free(t3);
}

/* ----------------------------------------------------------------------------- bad arguments */

static int all_nan(const msh_tensor *t) {
  const float *p = msh_tensor_data(t);
  for (int64_t i = 0; i < msh_tensor_numel(t); i++)
    if (!isnan(p[i])) return 0;
  return 1;
}

static void test_errors(void) {
  int64_t pshape[4] = {6, 4, 2, 8}, qshape[3] = {3, 4, 8}, bshape[1] = {3}, cshape[1] = {2}, tshape[2] = {2, 3};
  msh_tensor *kp = cpu_randn(MSH_F32, 4, pshape, 1), *vp = cpu_randn(MSH_F32, 4, pshape, 2);
  msh_tensor *q = cpu_randn(MSH_F32, 3, qshape, 3), *out = cpu_new(MSH_F32, 3, qshape);
  float *o = msh_tensor_data(out);
  for (int i = 0; i < 3 * 4 * 8; i++) o[i] = NAN;
  int32_t qs[3] = {0, 1, 3}, cl[2] = {5, 9}, bt[6] = {4, 2, -1, 0, 5, 3};
  msh_tensor *tq = i32_from(1, bshape, qs), *tc = i32_from(1, cshape, cl), *tb = i32_from(2, tshape, bt);
#define PA(mc) msh_op_paged_attention(out, q, kp, vp, tq, tc, tb, (mc), 1.0f)
  /* values: each refused before a row is read, out untouched */
  int32_t *pq = msh_tensor_data(tq), *pc = msh_tensor_data(tc), *pb = msh_tensor_data(tb);
  pb[1] = 6; /* block id past the pool, reached by context 5 */
  CHECK_STATUS(PA(12), MSH_ERANGE);
  pb[1] = -3;
  CHECK_STATUS(PA(12), MSH_ERANGE);
  pb[1] = 2;
  pc[1] = 10; /* past max_ctx 9 */
  CHECK_STATUS(PA(9), MSH_ERANGE);
  pc[1] = 1; /* fewer than its 2 new rows */
  CHECK_STATUS(PA(12), MSH_ERANGE);
  pc[1] = 9;
  pq[1] = 4; /* decreasing */
  CHECK_STATUS(PA(12), MSH_ERANGE);
  pq[1] = 1;
  pq[2] = 2; /* not ending at R = 3 */
  CHECK_STATUS(PA(12), MSH_ERANGE);
  pq[2] = 3;
  CHECK(all_nan(out));
  CHECK_STATUS(PA(13), MSH_ERANGE); /* beyond 3 blocks of 4 */
  CHECK_STATUS(PA(0), MSH_ERANGE);
  CHECK_OK(PA(12));
  CHECK(!all_nan(out));
  /* the unused table entry (-1) is never read: the same with any value there */
  pb[2] = 1000;
  CHECK_OK(PA(12));
  /* shapes */
  int64_t q5[3] = {3, 5, 8}, q7[3] = {3, 4, 7}, t4[2] = {3, 3}, c1s[1] = {1};
  msh_tensor *qa = cpu_randn(MSH_F32, 3, q5, 4), *oa = cpu_new(MSH_F32, 3, q5);
  msh_tensor *qb = cpu_randn(MSH_F32, 3, q7, 4), *ob = cpu_new(MSH_F32, 3, q7);
  msh_tensor *tb4 = cpu_new(MSH_I32, 2, t4), *tc1 = cpu_new(MSH_I32, 1, c1s), *tf = cpu_new(MSH_F32, 1, cshape);
  CHECK_STATUS(msh_op_paged_attention(oa, qa, kp, vp, tq, tc, tb, 12, 1.0f), MSH_EINVAL); /* 5 heads on 2 */
  CHECK_STATUS(msh_op_paged_attention(ob, qb, kp, vp, tq, tc, tb, 12, 1.0f), MSH_EINVAL); /* hd 7 vs 8 */
  CHECK_STATUS(msh_op_paged_attention(out, q, kp, vp, tq, tc, tb4, 12, 1.0f), MSH_EINVAL); /* table rows */
  CHECK_STATUS(msh_op_paged_attention(out, q, kp, vp, tq, tc1, tb, 12, 1.0f), MSH_EINVAL); /* ctx_len */
  CHECK_STATUS(msh_op_paged_attention(out, q, kp, vp, tq, tf, tb, 12, 1.0f), MSH_EINVAL);  /* f32 ctx_len */
  CHECK_STATUS(msh_op_paged_attention(out, q, kp, kp, tq, tc, tb, 12, 1.0f), MSH_EINVAL);  /* one pool twice */
  CHECK_STATUS(msh_op_paged_attention(q, q, kp, vp, tq, tc, tb, 12, 1.0f), MSH_EINVAL);    /* out is q */
  CHECK_STATUS(msh_op_paged_attention(out, q, kp, vp, NULL, tc, tb, 12, 1.0f), MSH_EINVAL);
  msh_tensor *p3 = NULL; /* a 3-D pool */
  CHECK_OK(msh_tensor_reshape(&p3, kp, 3, (int64_t[3]){24, 2, 8}));
  CHECK_STATUS(msh_op_paged_attention(out, q, p3, p3, tq, tc, tb, 12, 1.0f), MSH_EINVAL);
#undef PA
  msh_tensor_free(p3);
  msh_tensor_free(qa);
  msh_tensor_free(oa);
  msh_tensor_free(qb);
  msh_tensor_free(ob);
  msh_tensor_free(tb4);
  msh_tensor_free(tc1);
  msh_tensor_free(tf);
  msh_tensor_free(kp);
  msh_tensor_free(vp);
  msh_tensor_free(q);
  msh_tensor_free(out);
  msh_tensor_free(tq);
  msh_tensor_free(tc);
  msh_tensor_free(tb);
}

int main(void) {
  test_attention();
  test_kv_write();
  test_errors();
  return check_done("test_paged");
}
