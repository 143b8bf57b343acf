/* test_quant.c: block-quantized tensors (Q8_0, Q4_0, Q4_1, and the group-wise I8G / I4G): sizes
 * and views, (de)quantizing copies, and matmul / embedding on the CPU against float64 references
 * that decode the blocks here, independently of the library. */
#include "check.h"

#include <stdint.h>
#include <string.h>

static const int QTYPES[3] = {MSH_Q8_0, MSH_Q4_0, MSH_Q4_1};

/* ------------------------------------------------------------------------------ helpers */

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint32_t next_u32(void) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return (uint32_t)(rng >> 16);
}
static float uniform(float lo, float hi) { return lo + (hi - lo) * (float)(next_u32() % 1000000) / 1e6f; }

static msh_tensor *new_cpu(int dt, int64_t r, int64_t c) {
  msh_tensor *t = NULL;
  int64_t shape[2] = {r, c};
  CHECK_OK(msh_tensor_new(&t, dt, 2, shape, MSH_CPU, 0));
  return t;
}

static double half_d(const uint8_t *p) {
  uint16_t h;
  memcpy(&h, p, 2);
  return msh_f16_to_f32(h);
}

static void put_half(uint8_t *p, float f) {
  uint16_t h = msh_f32_to_f16(f);
  memcpy(p, &h, 2);
}

/* Element k of a row of blocks, decoded here as a + c: a = d * q (Q4_0: d * q with the unsigned
 * nibble), c the block's constant (Q8_0: 0, Q4_0: -8 d, Q4_1: m). Exact in double. */
static void decode(const uint8_t *row, int dt, int64_t k, double *a, double *c) {
  int64_t bb = msh_dtype_block_bytes(dt);
  const uint8_t *b = row + (k / 32) * bb;
  int j = (int)(k % 32);
  double d = half_d(b);
  if (dt == MSH_Q8_0) {
    *a = d * (int8_t)b[2 + j];
    *c = 0;
    return;
  }
  const uint8_t *q = b + (dt == MSH_Q4_1 ? 4 : 2);
  int n = j < 16 ? (q[j] & 0x0f) : (q[j - 16] >> 4);
  *a = d * n;
  *c = dt == MSH_Q4_1 ? half_d(b + 2) : -8 * d;
}

/* Random blocks written byte by byte: every quant value possible (Q8_0 includes -128), scales
 * of both signs, Q4_1 minimums of both signs. */
static void fill_random_blocks(msh_tensor *t) {
  int dt = msh_tensor_dtype(t);
  int64_t nb = msh_tensor_numel(t) / 32, bb = msh_dtype_block_bytes(dt);
  uint8_t *p = msh_tensor_data(t);
  for (int64_t i = 0; i < nb; i++, p += bb) {
    for (int64_t j = 0; j < bb; j++) p[j] = (uint8_t)next_u32();
    put_half(p, uniform(-0.05f, 0.05f));
    if (dt == MSH_Q4_1) put_half(p + 2, uniform(-0.3f, 0.3f));
  }
}

/* The 8-bit quantization of x the matmul applies (as documented in moonshard.h), in the same f32
 * operations: d = amax / 127, q = x * (1 / d) rounded to nearest even. */
static void quant_x(const float *x, int64_t K, int8_t *q, float *d) {
  for (int64_t b = 0; b < K / 32; b++) {
    float amax = 0;
    for (int j = 0; j < 32; j++) amax = fabsf(x[b * 32 + j]) > amax ? fabsf(x[b * 32 + j]) : amax;
    float db = amax / 127.0f, id = db != 0 ? 1.0f / db : 0.0f;
    d[b] = db;
    for (int j = 0; j < 32; j++) q[b * 32 + j] = (int8_t)nearbyintf(x[b * 32 + j] * id);
  }
}

/* ------------------------------------------------------------------------ dtypes, views */

static void test_dtypes_and_views(void) {
  CHECK(msh_dtype_size(MSH_Q8_0) == 0 && msh_dtype_size(MSH_Q4_1) == 0 && msh_dtype_size(MSH_F16) == 2);
  CHECK(msh_dtype_block_elems(MSH_Q4_0) == 32 && msh_dtype_block_elems(MSH_F32) == 1 && msh_dtype_block_elems(99) == 0);
  CHECK(msh_dtype_block_bytes(MSH_Q8_0) == 34 && msh_dtype_block_bytes(MSH_Q4_0) == 18 &&
        msh_dtype_block_bytes(MSH_Q4_1) == 20 && msh_dtype_block_bytes(MSH_BF16) == 2 && msh_dtype_block_bytes(-1) == 0);
  CHECK(!strcmp(msh_dtype_name(MSH_Q8_0), "q8_0") && !strcmp(msh_dtype_name(MSH_Q4_0), "q4_0") &&
        !strcmp(msh_dtype_name(MSH_Q4_1), "q4_1"));

  msh_tensor *t = new_cpu(MSH_Q4_1, 6, 96), *v = NULL, *u = NULL;
  if (!t) return;
  const uint8_t *base = msh_tensor_data(t);
  /* rows of 3 blocks, 60 bytes each */
  CHECK_OK(msh_tensor_narrow(&v, t, 0, 2, 3));
  CHECK(v && (const uint8_t *)msh_tensor_data(v) == base + 2 * 60 && msh_tensor_is_contiguous(v));
  msh_tensor_free(v);
  CHECK_OK(msh_tensor_narrow(&v, t, 1, 32, 64)); /* whole blocks of the last dim: fine */
  CHECK(v && (const uint8_t *)msh_tensor_data(v) == base + 20 && !msh_tensor_is_contiguous(v));
  msh_tensor_free(v);
  v = NULL;
  CHECK_STATUS(msh_tensor_narrow(&v, t, 1, 16, 32), MSH_EINVAL);
  CHECK(strstr(msh_last_error(), "split") != NULL);
  CHECK_STATUS(msh_tensor_narrow(&v, t, 1, 0, 48), MSH_EINVAL);
  CHECK_STATUS(msh_tensor_transpose(&v, t, 0, 1), MSH_EINVAL);
  int64_t flat[1] = {576}, rows32[2] = {18, 32}, bad[2] = {36, 16}, shape3[3] = {2, 3, 96};
  CHECK_OK(msh_tensor_reshape(&v, t, 1, flat));
  msh_tensor_free(v);
  CHECK_OK(msh_tensor_reshape(&v, t, 2, rows32));
  msh_tensor_free(v);
  CHECK_OK(msh_tensor_reshape(&v, t, 3, shape3));
  CHECK_OK(msh_tensor_transpose(&u, v, 0, 1)); /* outer dims only: whole rows move */
  msh_tensor_free(u);
  msh_tensor_free(v);
  v = NULL;
  CHECK_STATUS(msh_tensor_reshape(&v, t, 2, bad), MSH_EINVAL);
  int64_t odd[2] = {2, 48};
  CHECK_STATUS(msh_tensor_new(&v, MSH_Q8_0, 2, odd, MSH_CPU, 0), MSH_EINVAL);
  CHECK(strstr(msh_last_error(), "multiple of 32") != NULL);
  CHECK_STATUS(msh_tensor_new(&v, MSH_Q8_0, 0, NULL, MSH_CPU, 0), MSH_EINVAL);
  int64_t strides[2] = {96, 1};
  int64_t two[2] = {2, 96};
  CHECK_OK(msh_tensor_view(&v, t, 2, two, strides, 96 * 4)); /* rows 4 and 5 */
  CHECK(v && (const uint8_t *)msh_tensor_data(v) == base + 4 * 60);
  msh_tensor_free(v);
  v = NULL;
  CHECK_STATUS(msh_tensor_view(&v, t, 2, two, strides, 96 * 5), MSH_ERANGE); /* past the end */
  CHECK_STATUS(msh_tensor_view(&v, t, 2, two, strides, 8), MSH_EINVAL);      /* inside a block */
  msh_tensor_free(t);

  /* arena: each block tensor starts at a whole number of blocks from the base, 64-byte aligned */
  msh_arena *a = NULL;
  CHECK_OK(msh_arena_new(&a, MSH_CPU, 0, 1 << 16));
  msh_tensor *x = NULL, *y = NULL, *z = NULL;
  int64_t s1[1] = {3}, s2[2] = {2, 64};
  CHECK_OK(msh_tensor_new_arena(&x, a, MSH_F32, 1, s1));
  CHECK_OK(msh_tensor_new_arena(&y, a, MSH_Q8_0, 2, s2));
  CHECK_OK(msh_tensor_new_arena(&z, a, MSH_Q4_0, 2, s2));
  if (x && y && z) {
    const uint8_t *ab = msh_tensor_data(x);
    int64_t oy = (const uint8_t *)msh_tensor_data(y) - ab, oz = (const uint8_t *)msh_tensor_data(z) - ab;
    CHECK(oy > 0 && oy % 34 == 0 && oy % 64 == 0);
    CHECK(oz >= oy + 4 * 34 && oz % 18 == 0 && oz % 64 == 0);
    CHECK(msh_arena_used(a) == (uint64_t)(oz + 4 * 18));
  }
  msh_tensor_free(x);
  msh_tensor_free(y);
  msh_tensor_free(z);
  msh_arena_free(a);
}

/* ------------------------------------------------------------------------------ copies */

static void test_copies(void) {
  for (int qi = 0; qi < 3; qi++) {
    int dt = QTYPES[qi];
    int64_t R = 5, K = 160;
    msh_tensor *q = new_cpu(dt, R, K), *f = NULL;
    if (!q) return;
    fill_random_blocks(q);
    /* dequantized to f32 against the decoding here: exact (Q4_1: d * q + m may round once) */
    CHECK_OK(msh_tensor_contiguous(&f, q, MSH_F32));
    int bad = 0;
    for (int64_t r = 0; f && r < R; r++)
      for (int64_t k = 0; k < K; k++) {
        double a, c;
        decode((const uint8_t *)msh_tensor_data(q) + r * msh_dtype_block_bytes(dt) * (K / 32), dt, k, &a, &c);
        float want = (float)(a + c), got = ((const float *)msh_tensor_data(f))[r * K + k];
        bad += !close_enough(got, want, dt == MSH_Q4_1 ? 1.2e-7 : 0, dt == MSH_Q4_1 ? 1e-30 : 0);
      }
    CHECK(bad == 0);
    /* to f16 and bf16: the f32 values rounded once */
    for (int odt = MSH_F16; odt <= MSH_BF16; odt++) {
      msh_tensor *h = NULL, *hf = NULL, *ff = NULL;
      CHECK_OK(msh_tensor_contiguous(&h, q, odt));
      CHECK_OK(msh_tensor_contiguous(&hf, h, MSH_F32));
      CHECK_OK(msh_tensor_contiguous(&ff, f, odt));
      msh_tensor *ffo = NULL;
      CHECK_OK(msh_tensor_contiguous(&ffo, ff, MSH_F32));
      if (hf && ffo) CHECK(!memcmp(msh_tensor_data(hf), msh_tensor_data(ffo), (size_t)(R * K) * 4));
      msh_tensor_free(h), msh_tensor_free(hf), msh_tensor_free(ff), msh_tensor_free(ffo);
    }
    /* into a strided f32 destination (the transpose of a (K, R) tensor) */
    msh_tensor *kt = new_cpu(MSH_F32, K, R), *ktt = NULL;
    CHECK_OK(msh_tensor_transpose(&ktt, kt, 0, 1));
    CHECK_OK(msh_tensor_copy(ktt, q));
    bad = 0;
    for (int64_t r = 0; f && kt && r < R; r++)
      for (int64_t k = 0; k < K; k++)
        bad += ((const float *)msh_tensor_data(kt))[k * R + r] != ((const float *)msh_tensor_data(f))[r * K + k];
    CHECK(bad == 0);
    /* same dtype: bytes, from a row view */
    msh_tensor *rows = NULL, *q2 = new_cpu(dt, 2, K);
    CHECK_OK(msh_tensor_narrow(&rows, q, 0, 3, 2));
    CHECK_OK(msh_tensor_copy(q2, rows));
    int64_t rb = msh_dtype_block_bytes(dt) * (K / 32);
    if (q2) CHECK(!memcmp(msh_tensor_data(q2), (const uint8_t *)msh_tensor_data(q) + 3 * rb, (size_t)(2 * rb)));
    /* quantizing: from f32, and from the strided transposed view; both give the same blocks, and
     * the values come back within the block's rounding step */
    msh_tensor *src = new_cpu(MSH_F32, R, K), *qa = new_cpu(dt, R, K), *qb = new_cpu(dt, R, K), *back = NULL;
    float *sp = msh_tensor_data(src);
    for (int64_t i = 0; i < R * K; i++) sp[i] = uniform(-2, 2) + (i % 64 < 32 ? 0 : 1.5f);
    for (int j = 0; j < 32; j++) sp[j] = 0; /* an all-zero block */
    CHECK_OK(msh_tensor_copy(qa, src));
    CHECK_OK(msh_tensor_copy(ktt, src));
    CHECK_OK(msh_tensor_copy(qb, ktt));
    CHECK(!memcmp(msh_tensor_data(qa), msh_tensor_data(qb), (size_t)(R * rb)));
    CHECK_OK(msh_tensor_contiguous(&back, qa, MSH_F32));
    bad = 0;
    for (int64_t b = 0; back && b < R * K / 32; b++) {
      float lo = sp[b * 32], hi = sp[b * 32], amax = 0;
      for (int j = 0; j < 32; j++) {
        float v = sp[b * 32 + j];
        lo = v < lo ? v : lo, hi = v > hi ? v : hi, amax = fabsf(v) > amax ? fabsf(v) : amax;
      }
      /* the step d, and what rounding d and m to f16 can add over a block */
      double d = dt == MSH_Q8_0 ? amax / 127.0 : dt == MSH_Q4_0 ? amax / 8.0 : (hi - lo) / 15.0;
      /* Q4_0's 16 steps are -8 .. 7: the value of largest magnitude of the other sign clamps to 7,
       * a whole step away */
      double tol = (dt == MSH_Q4_0 ? 1.0 : 0.5) * d + (dt == MSH_Q8_0 ? 128 : 16) * d * 0x1p-11 + fabs(lo) * 0x1p-11 + 1e-7;
      for (int j = 0; j < 32; j++) {
        double e = fabs(((const float *)msh_tensor_data(back))[b * 32 + j] - sp[b * 32 + j]);
        if (e > tol && bad++ < 3)
          fprintf(stderr, "%s block %lld [%d]: %g from %g (error %g, tol %g)\n", msh_dtype_name(dt), (long long)b, j,
                  ((const float *)msh_tensor_data(back))[b * 32 + j], sp[b * 32 + j], e, tol);
      }
    }
    CHECK(bad == 0);
    if (back) CHECK(((const float *)msh_tensor_data(back))[0] == 0 && ((const float *)msh_tensor_data(back))[31] == 0);
    /* misuse */
    msh_tensor *i32 = new_cpu(MSH_I32, R, K), *other = new_cpu(QTYPES[(qi + 1) % 3], R, K);
    CHECK_STATUS(msh_tensor_copy(i32, q), MSH_EINVAL);
    CHECK(strstr(msh_last_error(), "cannot convert") != NULL);
    CHECK_OK(msh_tensor_copy(other, q)); /* another block dtype: through f32 (test_group_round_trip) */
    msh_tensor_free(i32), msh_tensor_free(other);
    msh_tensor_free(src), msh_tensor_free(qa), msh_tensor_free(qb), msh_tensor_free(back);
    msh_tensor_free(rows), msh_tensor_free(q2), msh_tensor_free(kt), msh_tensor_free(ktt);
    msh_tensor_free(f);
    msh_tensor_free(q);
  }
}

/* ------------------------------------------------------------------------------ matmul */

/* out (M, N) = x (M, K) @ w (N, K)^T, w quantized, checked three ways:
 *   M < 64 (integer path) against float64 over the decoded weights and the 8-bit x: exact integer
 *     block sums, so the only error is f32 rounding: each block's scaled partial (one product and
 *     one fused add) and the running sums over K / 32 blocks; bounded by (K / 32 + 10) * 2^-23 *
 *     S, S the sum of the magnitudes that are added (|d q x| and |c x| per element);
 *   M < 64 against the f32 path on the dequantized weights: the 8-bit x moves each element by at
 *     most half a step dx / 2 (dx = amax / 127 of its block), so the difference is at most
 *     sum over blocks of dx / 2 * sum |w| (plus f32 rounding of both);
 *   M >= 64 (dequantize + sgemm) against float64 over the decoded weights and the exact x:
 *     (K + 12) * 2^-24 * S, the bound of an f32 dot product of length K plus the dequantization
 *     rounding. */
static int check_matmul(int dt, int64_t M, int64_t N, int64_t K, int random_bytes) {
  msh_tensor *w = new_cpu(dt, N, K), *x = new_cpu(MSH_F32, M, K), *out = new_cpu(MSH_F32, M, N);
  msh_tensor *wf = NULL, *outf = new_cpu(MSH_F32, M, N);
  if (!w || !x || !out || !outf) return 1;
  if (random_bytes) {
    fill_random_blocks(w);
  } else {
    msh_tensor *w32 = new_cpu(MSH_F32, N, K);
    CHECK_OK(msh_tensor_randn(w32, (uint64_t)(N * 7 + K), 0.1f, 0.5f));
    CHECK_OK(msh_tensor_copy(w, w32));
    msh_tensor_free(w32);
  }
  float *xp = msh_tensor_data(x);
  for (int64_t i = 0; i < M * K; i++) xp[i] = uniform(-3, 3) * (i % 96 < 32 ? 0.01f : 1.0f);
  if (M > 1)
    for (int64_t k = 0; k < 32; k++) xp[K + k] = 0; /* a zero block in row 1 */
  CHECK_OK(msh_op_matmul(out, x, w));
  CHECK_OK(msh_tensor_contiguous(&wf, w, MSH_F32));
  CHECK_OK(msh_op_matmul(outf, x, wf));
  int64_t nb = K / 32, rb = msh_dtype_block_bytes(dt) * nb;
  int8_t *xq = malloc((size_t)K);
  float *xd = malloc(sizeof(float) * (size_t)nb);
  int bad = 0;
  const float *o = msh_tensor_data(out), *of = msh_tensor_data(outf);
  for (int64_t m = 0; m < M; m++) {
    quant_x(xp + m * K, K, xq, xd);
    for (int64_t n = 0; n < N; n++) {
      const uint8_t *row = (const uint8_t *)msh_tensor_data(w) + n * rb;
      double ref = 0, S = 0, qref = 0, qS = 0, qbound = 0;
      for (int64_t b = 0; b < nb; b++) {
        double wsum = 0;
        for (int j = 0; j < 32; j++) {
          int64_t k = b * 32 + j;
          double a, c, xv = xp[m * K + k], xqv = (double)xd[b] * xq[k];
          decode(row, dt, k, &a, &c);
          ref += (a + c) * xv;
          S += fabs(a * xv) + fabs(c * xv);
          qref += (a + c) * xqv;
          qS += fabs(a * xqv) + fabs(c * xqv);
          wsum += fabs(a + c);
        }
        qbound += 0.5 * xd[b] * (1 + 1e-6) * wsum;
      }
      double got = o[m * N + n], got_f = of[m * N + n];
      if (M < 64) {
        double tol = (double)(nb + 10) * 0x1p-23 * qS;
        double tol_f = qbound + (double)(K + 12) * 0x1p-24 * S + tol;
        if (fabs(got - qref) > tol || fabs(got - got_f) > tol_f) {
          if (bad++ < 3)
            fprintf(stderr, "%s M %lld N %lld K %lld [%lld, %lld]: %.9g, 8-bit ref %.9g (tol %.3g), f32 path %.9g (tol %.3g)\n",
                    msh_dtype_name(dt), (long long)M, (long long)N, (long long)K, (long long)m, (long long)n, got,
                    qref, tol, got_f, tol_f);
        }
      } else if (fabs(got - ref) > (double)(K + 12) * 0x1p-24 * S) {
        if (bad++ < 3)
          fprintf(stderr, "%s M %lld N %lld K %lld [%lld, %lld]: %.9g, ref %.9g\n", msh_dtype_name(dt), (long long)M,
                  (long long)N, (long long)K, (long long)m, (long long)n, got, ref);
      }
    }
  }
  free(xq);
  free(xd);
  msh_tensor_free(w), msh_tensor_free(x), msh_tensor_free(out), msh_tensor_free(wf), msh_tensor_free(outf);
  return bad;
}

static void test_matmul(void) {
  const int64_t Ms[] = {1, 2, 3, 4, 5, 8, 31, 32, 63, 64, 80};
  const int64_t shapes[][2] = {{1, 32}, {7, 64}, {64, 96}, {257, 576}, {100, 1536}};
  for (int threads = 1; threads <= 2; threads++) {
    msh_set_num_threads(threads);
    for (int qi = 0; qi < 3; qi++)
      for (size_t mi = 0; mi < sizeof Ms / sizeof Ms[0]; mi++)
        for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
          int64_t M = Ms[mi], N = shapes[si][0], K = shapes[si][1];
          if (M * N * K > 8 * 1000 * 1000 && M != 1 && M != 63 && M != 80) continue; /* keep it quick */
          CHECK(check_matmul(QTYPES[qi], M, N, K, (int)((mi + si) % 2)) == 0);
        }
  }
  msh_set_num_threads(0);

  /* operands it refuses */
  msh_tensor *w = new_cpu(MSH_Q4_1, 4, 64), *x = new_cpu(MSH_F32, 2, 32), *out = new_cpu(MSH_F32, 2, 4), *v = NULL;
  CHECK_OK(msh_tensor_narrow(&v, w, 1, 0, 32)); /* whole blocks, but rows are strided */
  CHECK_STATUS(msh_op_matmul(out, x, v), MSH_EINVAL);
  CHECK(strstr(msh_last_error(), "contiguous") != NULL);
  msh_tensor *q1 = NULL;
  int64_t d1[1] = {64};
  CHECK_OK(msh_tensor_new(&q1, MSH_Q8_0, 1, d1, MSH_CPU, 0));
  msh_tensor *x2 = new_cpu(MSH_F32, 3, 64), *o2 = new_cpu(MSH_F32, 3, 64);
  CHECK_STATUS(msh_op_rmsnorm(o2, x2, q1, 1e-5f), MSH_EINVAL);
  CHECK(strstr(msh_last_error(), "q8_0") != NULL && strstr(msh_last_error(), "matmul and embedding") != NULL);
  msh_tensor_free(q1), msh_tensor_free(x2), msh_tensor_free(o2);
  msh_tensor_free(v), msh_tensor_free(w), msh_tensor_free(x), msh_tensor_free(out);
}

/* --------------------------------------------------------------------------- embedding */

static void test_embedding(void) {
  for (int qi = 0; qi < 3; qi++) {
    int dt = QTYPES[qi];
    msh_tensor *table = new_cpu(dt, 50, 96), *tf = NULL, *ids = NULL, *out = new_cpu(MSH_F32, 4, 96);
    if (!table || !out) return;
    fill_random_blocks(table);
    int64_t n4[1] = {4};
    CHECK_OK(msh_tensor_new(&ids, MSH_I32, 1, n4, MSH_CPU, 0));
    int32_t *id = msh_tensor_data(ids);
    id[0] = 49, id[1] = 0, id[2] = 17, id[3] = 17;
    CHECK_OK(msh_op_embedding(out, table, ids));
    CHECK_OK(msh_tensor_contiguous(&tf, table, MSH_F32));
    int bad = 0;
    for (int t = 0; tf && t < 4; t++)
      bad += memcmp((const float *)msh_tensor_data(out) + t * 96, (const float *)msh_tensor_data(tf) + id[t] * 96,
                    96 * sizeof(float)) != 0;
    CHECK(bad == 0);
    id[2] = 50;
    CHECK_STATUS(msh_op_embedding(out, table, ids), MSH_ERANGE);
    msh_tensor_free(table), msh_tensor_free(tf), msh_tensor_free(ids), msh_tensor_free(out);
  }
}

/* ------------------------------------------------------------------- group-wise (I8G, I4G) */

static const int GTYPES[6] = {MSH_I8G32, MSH_I8G64, MSH_I8G128, MSH_I4G32, MSH_I4G64, MSH_I4G128};
static int is_i4g(int dt) { return dt == MSH_I4G32 || dt == MSH_I4G64 || dt == MSH_I4G128; }

/* Element k of a row of group blocks, decoded here from the layout moonshard.h documents. */
static double gdecode(const uint8_t *row, int dt, int64_t k) {
  int64_t G = msh_dtype_block_elems(dt), bb = msh_dtype_block_bytes(dt);
  const uint8_t *b = row + (k / G) * bb;
  int64_t j = k % G;
  if (!is_i4g(dt)) {
    float d;
    memcpy(&d, b, 4);
    return (double)d * (int8_t)b[4 + j];
  }
  int64_t H = G / 2;
  int q = j < H ? (b[4 + j] & 0x0f) : (b[4 + j - H] >> 4);
  return half_d(b) * q + half_d(b + 2);
}

static void test_group_sizes(void) {
  const int G[6] = {32, 64, 128, 32, 64, 128};
  const size_t B[6] = {36, 68, 132, 20, 36, 68};
  const char *names[6] = {"i8g32", "i8g64", "i8g128", "i4g32", "i4g64", "i4g128"};
  for (int i = 0; i < 6; i++) {
    CHECK(msh_dtype_block_elems(GTYPES[i]) == G[i]);
    CHECK(msh_dtype_block_bytes(GTYPES[i]) == B[i]);
    CHECK(msh_dtype_size(GTYPES[i]) == 0);
    CHECK(strcmp(msh_dtype_name(GTYPES[i]), names[i]) == 0);
  }
  /* a last dim that is not a whole number of groups: refused, the group size named */
  msh_tensor *t = NULL;
  int64_t shape[2] = {4, 96};
  CHECK_STATUS(msh_tensor_new(&t, MSH_I4G64, 2, shape, MSH_CPU, 0), MSH_EINVAL);
  CHECK(strstr(msh_last_error(), "i4g64") != NULL && strstr(msh_last_error(), "multiple of 64") != NULL);
  shape[1] = 192;
  CHECK_STATUS(msh_tensor_new(&t, MSH_I8G128, 2, shape, MSH_CPU, 0), MSH_EINVAL);
  shape[1] = 256;
  CHECK_OK(msh_tensor_new(&t, MSH_I8G128, 2, shape, MSH_CPU, 0));
  msh_tensor *v = NULL;
  CHECK_STATUS(msh_tensor_narrow(&v, t, 1, 64, 128), MSH_EINVAL); /* would split a group */
  CHECK_OK(msh_tensor_narrow(&v, t, 1, 128, 128));
  msh_tensor_free(v), msh_tensor_free(t);
}

/* The squared error of a group of G values on the min/max grid (d = (max - min) / 15 and m = min,
 * both rounded to f16), each value at its nearest nibble: the I4G search's starting point. */
static double minmax_err(const float *x, int64_t G) {
  float lo = x[0], hi = x[0];
  for (int64_t j = 1; j < G; j++) lo = x[j] < lo ? x[j] : lo, hi = x[j] > hi ? x[j] : hi;
  double d = msh_f16_to_f32(msh_f32_to_f16((hi - lo) / 15.0f)), m = msh_f16_to_f32(msh_f32_to_f16(lo)), e = 0;
  for (int64_t j = 0; j < G; j++) {
    double q = d > 0 ? nearbyint((x[j] - m) / d) : 0;
    q = q < 0 ? 0 : q > 15 ? 15 : q;
    e += (d * q + m - x[j]) * (d * q + m - x[j]);
  }
  return e;
}

/* f32 -> group dtype -> f32: the bytes decode (here) to what the library dequantizes. I8G: each
 * element within half a step of its value (d / 2, d = amax / 127). I4G: each group's squared error
 * no larger than on the min/max grid (d = (max - min) / 15, m = min: within half a step plus the
 * f16 rounding of d and m), which the search starts from and leaves only for a smaller error; over
 * all groups of these values the search's error is smaller by a margin. */
static void test_group_round_trip(void) {
  const int64_t R = 5, K = 384;
  for (int gi = 0; gi < 6; gi++) {
    int dt = GTYPES[gi];
    int64_t G = msh_dtype_block_elems(dt);
    msh_tensor *x = new_cpu(MSH_F32, R, K), *q = new_cpu(dt, R, K), *y = new_cpu(MSH_F32, R, K);
    float *xp = msh_tensor_data(x);
    for (int64_t i = 0; i < R * K; i++) xp[i] = uniform(-2, 2) * (i % 200 < 64 ? 0.001f : 1.0f) + (i % 7 == 0 ? 0.5f : 0);
    for (int64_t k = 0; k < G; k++) xp[2 * K + k] = 0; /* a zero group */
    xp[3 * K + 5] = 40;                                 /* an outlier */
    CHECK_OK(msh_tensor_copy(q, x));
    CHECK_OK(msh_tensor_copy(y, q));
    const float *yp = msh_tensor_data(y);
    int64_t rb = K / msh_dtype_block_elems(dt) * (int64_t)msh_dtype_block_bytes(dt);
    int bad = 0;
    double err_all = 0, minmax_all = 0;
    for (int64_t r = 0; r < R; r++)
      for (int64_t g = 0; g < K / G; g++) {
        double amax = 0, err = 0;
        for (int64_t j = 0; j < G; j++) amax = fabs(xp[r * K + g * G + j]) > amax ? fabs(xp[r * K + g * G + j]) : amax;
        for (int64_t j = 0; j < G; j++) {
          int64_t k = g * G + j;
          double ref = gdecode((const uint8_t *)msh_tensor_data(q) + r * rb, dt, k), got = yp[r * K + k];
          err += (got - xp[k + r * K]) * (got - xp[k + r * K]);
          if (fabs(got - ref) > 1e-6 * fabs(ref) + 1e-30 ||
              (!is_i4g(dt) && fabs(got - xp[r * K + k]) > amax / 254 * (1 + 1e-6) + 1e-12)) {
            if (bad++ < 3)
              fprintf(stderr, "%s [%lld, %lld]: x %.9g, dequantized %.9g, decoded here %.9g\n",
                      msh_dtype_name(dt), (long long)r, (long long)k, xp[r * K + k], got, ref);
          }
        }
        if (is_i4g(dt)) {
          double mm = minmax_err(xp + r * K + g * G, G);
          if (err > mm * (1 + 1e-5) + 1e-12 && bad++ < 3)
            fprintf(stderr, "%s [%lld] group %lld: squared error %.9g above the min/max grid's %.9g\n",
                    msh_dtype_name(dt), (long long)r, (long long)g, err, mm);
          err_all += err, minmax_all += mm;
        }
      }
    CHECK(bad == 0);
    if (is_i4g(dt)) CHECK(err_all < 0.9 * minmax_all);
    for (int64_t k = 0; k < G; k++) CHECK(yp[2 * K + k] == 0);
    /* f16 and bf16 sources quantize like their f32 values */
    msh_tensor *h = new_cpu(MSH_BF16, R, K), *q2 = new_cpu(dt, R, K), *hf = new_cpu(MSH_F32, R, K);
    CHECK_OK(msh_tensor_copy(h, x));
    CHECK_OK(msh_tensor_copy(hf, h));
    CHECK_OK(msh_tensor_copy(q2, h));
    CHECK_OK(msh_tensor_copy(q, hf));
    CHECK(memcmp(msh_tensor_data(q), msh_tensor_data(q2), (size_t)(R * rb)) == 0);
    /* to another block dtype: as dequantizing, then quantizing the f32 values */
    msh_tensor *other = new_cpu(gi == 0 ? MSH_I4G64 : MSH_Q4_1, R, K), *other2 = new_cpu(msh_tensor_dtype(other), R, K);
    CHECK_OK(msh_tensor_copy(other, q));
    CHECK_OK(msh_tensor_copy(hf, q));
    CHECK_OK(msh_tensor_copy(other2, hf));
    int64_t ob = K / msh_dtype_block_elems(msh_tensor_dtype(other)) * (int64_t)msh_dtype_block_bytes(msh_tensor_dtype(other));
    CHECK(memcmp(msh_tensor_data(other), msh_tensor_data(other2), (size_t)(R * ob)) == 0);
    msh_tensor_free(other), msh_tensor_free(other2), msh_tensor_free(h), msh_tensor_free(q2), msh_tensor_free(hf);
    msh_tensor_free(x), msh_tensor_free(q), msh_tensor_free(y);
  }
}

/* matmul with group-wise weights against float64 over the weights decoded here (x in f32 as
 * given: the group-wise path does not quantize x): |err| <= (K + 12) 2^-24 sum |w x|. */
static int check_group_matmul(int dt, int64_t M, int64_t N, int64_t K) {
  msh_tensor *w32 = new_cpu(MSH_F32, N, K), *w = new_cpu(dt, N, K), *x = new_cpu(MSH_F32, M, K);
  msh_tensor *out = new_cpu(MSH_F32, M, N);
  CHECK_OK(msh_tensor_randn(w32, (uint64_t)(N * 13 + K + dt), 0.05f, 0.5f));
  CHECK_OK(msh_tensor_copy(w, w32));
  float *xp = msh_tensor_data(x), *o = msh_tensor_data(out);
  for (int64_t i = 0; i < M * K; i++) xp[i] = uniform(-3, 3);
  for (int64_t i = 0; i < M * N; i++) o[i] = NAN;
  CHECK_OK(msh_op_matmul(out, x, w));
  int64_t rb = K / msh_dtype_block_elems(dt) * (int64_t)msh_dtype_block_bytes(dt);
  int bad = 0;
  for (int64_t m = 0; m < M; m++)
    for (int64_t n = 0; n < N; n++) {
      const uint8_t *row = (const uint8_t *)msh_tensor_data(w) + n * rb;
      double ref = 0, S = 0;
      for (int64_t k = 0; k < K; k++) {
        double p = gdecode(row, dt, k) * xp[m * K + k];
        ref += p, S += fabs(p);
      }
      if (!(fabs(o[m * N + n] - ref) <= (double)(K + 12) * 0x1p-24 * S)) {
        if (bad++ < 3)
          fprintf(stderr, "%s M %lld N %lld K %lld [%lld, %lld]: %.9g, ref %.9g\n", msh_dtype_name(dt), (long long)M,
                  (long long)N, (long long)K, (long long)m, (long long)n, o[m * N + n], ref);
      }
    }
  msh_tensor_free(w32), msh_tensor_free(w), msh_tensor_free(x), msh_tensor_free(out);
  return bad;
}

static void test_group_matmul(void) {
  const int64_t Ms[] = {1, 2, 5, 31, 33, 64, 70};
  const int64_t shapes[][2] = {{1, 128}, {7, 256}, {33, 384}, {100, 1024}};
  for (int threads = 1; threads <= 2; threads++) {
    msh_set_num_threads(threads);
    for (int gi = 0; gi < 6; gi++)
      for (size_t mi = 0; mi < sizeof Ms / sizeof Ms[0]; mi++)
        for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
          CHECK(check_group_matmul(GTYPES[gi], Ms[mi], shapes[si][0], shapes[si][1]) == 0);
  }
  msh_set_num_threads(0);
  /* embedding rows dequantize exactly as a copy does */
  msh_tensor *t32 = new_cpu(MSH_F32, 20, 128), *t = new_cpu(MSH_I4G64, 20, 128), *tf = NULL, *ids = NULL;
  msh_tensor *out = new_cpu(MSH_F32, 2, 128);
  CHECK_OK(msh_tensor_randn(t32, 3, 0, 1));
  CHECK_OK(msh_tensor_copy(t, t32));
  CHECK_OK(msh_tensor_contiguous(&tf, t, MSH_F32));
  int64_t n2[1] = {2};
  CHECK_OK(msh_tensor_new(&ids, MSH_I32, 1, n2, MSH_CPU, 0));
  ((int32_t *)msh_tensor_data(ids))[0] = 19, ((int32_t *)msh_tensor_data(ids))[1] = 3;
  CHECK_OK(msh_op_embedding(out, t, ids));
  CHECK(memcmp(msh_tensor_data(out), (const float *)msh_tensor_data(tf) + 19 * 128, 128 * sizeof(float)) == 0);
  CHECK(memcmp((const float *)msh_tensor_data(out) + 128, (const float *)msh_tensor_data(tf) + 3 * 128,
               128 * sizeof(float)) == 0);
  msh_tensor_free(t32), msh_tensor_free(t), msh_tensor_free(tf), msh_tensor_free(ids), msh_tensor_free(out);
}

int main(void) {
  test_dtypes_and_views();
  test_copies();
  test_matmul();
  test_embedding();
  test_group_sizes();
  test_group_round_trip();
  test_group_matmul();
  return check_done("test_quant");
}
