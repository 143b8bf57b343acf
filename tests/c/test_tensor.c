/* test_tensor.c: tensor handles, views and their range checks, copies with strides and dtype
 * conversion, the f16/bf16 conversions (exhaustive round trips, ties to even, inf/NaN/subnormals),
 * arenas, tensors over mapped files, reference counting (run under ASan), msh_tensor_randn. */
#include "check.h"

#include <stdint.h>
#include <string.h>
#include <unistd.h>

static uint64_t rng = 0xfeedbeef;

static uint64_t next_u64(void) {
  uint64_t z = (rng += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

static float bits_f(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static uint32_t f_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

static msh_tensor *tnew(int dtype, int ndim, const int64_t *shape) {
  msh_tensor *t = NULL;
  CHECK_OK(msh_tensor_new(&t, dtype, ndim, shape, MSH_CPU, 0));
  return t;
}

/* f32 tensor holding 0, 1, 2, ... */
static msh_tensor *iota(int ndim, const int64_t *shape) {
  msh_tensor *t = tnew(MSH_F32, ndim, shape);
  float *p = msh_tensor_data(t);
  for (int64_t i = 0; i < msh_tensor_numel(t); i++) p[i] = (float)i;
  return t;
}

/* Element at index (i, j) of a 2-D f32 tensor, through its strides. */
static float at2(const msh_tensor *t, int64_t i, int64_t j) {
  return ((const float *)msh_tensor_data(t))[i * msh_tensor_stride(t, 0) + j * msh_tensor_stride(t, 1)];
}

/* ------------------------------------------------------------------------------- views */

static void test_views(void) {
  int64_t s[2] = {5, 7};
  msh_tensor *t = iota(2, s), *v = NULL;
  CHECK(msh_tensor_ndim(t) == 2 && msh_tensor_dim(t, -1) == 7 && msh_tensor_dim(t, 2) == 0);
  CHECK(msh_tensor_stride(t, 0) == 7 && msh_tensor_stride(t, -1) == 1 && msh_tensor_numel(t) == 35);
  CHECK(msh_tensor_is_contiguous(t) && !msh_tensor_is_readonly(t));

  /* narrow */
  CHECK_OK(msh_tensor_narrow(&v, t, 1, 2, 4));
  CHECK(msh_tensor_dim(v, 1) == 4 && msh_tensor_stride(v, 0) == 7 && !msh_tensor_is_contiguous(v));
  CHECK(at2(v, 3, 1) == 3 * 7 + 3);
  msh_tensor_free(v);
  CHECK_OK(msh_tensor_narrow(&v, t, -2, 4, 1)); /* dim counted from the end */
  CHECK(msh_tensor_dim(v, 0) == 1 && at2(v, 0, 6) == 34 && msh_tensor_is_contiguous(v));
  msh_tensor_free(v);
  CHECK_OK(msh_tensor_narrow(&v, t, 0, 5, 0)); /* empty at the end is fine */
  msh_tensor_free(v);
  v = NULL;
  CHECK_STATUS(msh_tensor_narrow(&v, t, 1, 4, 4), MSH_ERANGE);
  CHECK_STATUS(msh_tensor_narrow(&v, t, 0, -1, 2), MSH_ERANGE);
  CHECK_STATUS(msh_tensor_narrow(&v, t, 0, 0, -1), MSH_ERANGE);
  CHECK_STATUS(msh_tensor_narrow(&v, t, 2, 0, 1), MSH_EINVAL);
  CHECK(v == NULL);

  /* reshape */
  int64_t r1[3] = {7, -1, 1};
  CHECK_OK(msh_tensor_reshape(&v, t, 3, r1));
  CHECK(msh_tensor_dim(v, 1) == 5 && msh_tensor_stride(v, 0) == 5);
  msh_tensor_free(v);
  int64_t r2[2] = {6, 6}, r3[2] = {-1, -1}, r4[2] = {-1, 4}, r5[2] = {-2, 35};
  v = NULL;
  CHECK_STATUS(msh_tensor_reshape(&v, t, 2, r2), MSH_EINVAL);
  CHECK_STATUS(msh_tensor_reshape(&v, t, 2, r3), MSH_EINVAL);
  CHECK_STATUS(msh_tensor_reshape(&v, t, 2, r4), MSH_EINVAL); /* 35 is not a multiple of 4 */
  CHECK_STATUS(msh_tensor_reshape(&v, t, 2, r5), MSH_EINVAL);
  msh_tensor *tt = NULL;
  CHECK_OK(msh_tensor_transpose(&tt, t, 0, 1));
  int64_t r6[1] = {35};
  CHECK_STATUS(msh_tensor_reshape(&v, tt, 1, r6), MSH_EINVAL); /* not contiguous */
  CHECK(v == NULL);

  /* transpose */
  CHECK(msh_tensor_dim(tt, 0) == 7 && msh_tensor_stride(tt, 0) == 1 && msh_tensor_stride(tt, 1) == 7);
  CHECK(at2(tt, 6, 4) == 4 * 7 + 6 && !msh_tensor_is_contiguous(tt));
  CHECK_STATUS(msh_tensor_transpose(&v, t, 0, 2), MSH_EINVAL);
  CHECK_STATUS(msh_tensor_transpose(&v, t, -3, 0), MSH_EINVAL);

  /* view: any strides inside the storage */
  int64_t vs[2] = {3, 2}, vst[2] = {10, 3};
  CHECK_OK(msh_tensor_view(&v, t, 2, vs, vst, 4)); /* elements 4 + 10 i + 3 j, the last is 27 */
  CHECK(at2(v, 2, 1) == 27 && at2(v, 1, 0) == 14);
  msh_tensor_free(v);
  v = NULL;
  int64_t vs2[2] = {4, 2};
  CHECK_STATUS(msh_tensor_view(&v, t, 2, vs2, vst, 4), MSH_ERANGE); /* 4 + 30 + 3 = 37 > 34 */
  CHECK_STATUS(msh_tensor_view(&v, t, 2, vs, vst, -1), MSH_ERANGE);
  int64_t neg[2] = {-7, 1};
  CHECK_STATUS(msh_tensor_view(&v, t, 2, vs, neg, 10), MSH_ERANGE); /* reaches element -4 */
  CHECK_OK(msh_tensor_view(&v, t, 2, vs, neg, 20));                 /* rows backwards: 20, 13, 6 */
  CHECK(at2(v, 2, 1) == 7);
  msh_tensor_free(v);
  v = NULL;
  int64_t big[1] = {36}, one[1] = {1};
  CHECK_STATUS(msh_tensor_view(&v, t, 1, big, one, 0), MSH_ERANGE);
  CHECK(v == NULL);
  /* a view of a narrowed view is still checked against the whole storage */
  msh_tensor *n = NULL;
  CHECK_OK(msh_tensor_narrow(&n, t, 0, 4, 1));
  int64_t seven[1] = {7};
  CHECK_OK(msh_tensor_view(&v, n, 1, seven, one, 0));
  CHECK(((float *)msh_tensor_data(v))[6] == 34);
  msh_tensor_free(v);
  v = NULL;
  CHECK_STATUS(msh_tensor_view(&v, n, 1, seven, one, 1), MSH_ERANGE);
  msh_tensor_free(n);
  msh_tensor_free(tt);
  msh_tensor_free(t);
}

/* ------------------------------------------------------------------------- conversions */

static void test_conversions(void) {
  /* every f16 and bf16 pattern survives f16 -> f32 -> f16 (NaNs stay NaNs) */
  int f16_bad = 0, bf16_bad = 0;
  for (uint32_t h = 0; h < 65536; h++) {
    float f = msh_f16_to_f32((uint16_t)h);
    int nan = ((h & 0x7c00) == 0x7c00) && (h & 0x3ff);
    if (nan ? !isnan(f) || !isnan(msh_f16_to_f32(msh_f32_to_f16(f))) : msh_f32_to_f16(f) != h) f16_bad++;
    float b = msh_bf16_to_f32((uint16_t)h);
    int bnan = ((h & 0x7f80) == 0x7f80) && (h & 0x7f);
    if (bnan ? !isnan(b) || !isnan(msh_bf16_to_f32(msh_f32_to_bf16(b))) : msh_f32_to_bf16(b) != h) bf16_bad++;
  }
  CHECK(f16_bad == 0);
  CHECK(bf16_bad == 0);

  /* known values */
  CHECK(msh_f32_to_f16(1.0f) == 0x3c00 && msh_f32_to_f16(-2.0f) == 0xc000 && msh_f32_to_f16(65504.0f) == 0x7bff);
  CHECK(msh_f16_to_f32(0x0001) == ldexpf(1.0f, -24) && msh_f16_to_f32(0x03ff) == 1023 * ldexpf(1.0f, -24));
  CHECK(msh_f16_to_f32(0x0400) == ldexpf(1.0f, -14));
  CHECK(msh_f32_to_bf16(1.0f) == 0x3f80 && msh_bf16_to_f32(0xc040) == -3.0f);

  /* ties to even */
  CHECK(msh_f32_to_f16(1.0f + ldexpf(1, -11)) == 0x3c00);         /* halfway, even below */
  CHECK(msh_f32_to_f16(1.0f + 3 * ldexpf(1, -11)) == 0x3c02);     /* halfway, even above */
  CHECK(msh_f32_to_f16(nextafterf(1.0f + ldexpf(1, -11), 2)) == 0x3c01); /* just above halfway */
  CHECK(msh_f32_to_f16(ldexpf(1, -25)) == 0x0000);                /* halfway to the least subnormal */
  CHECK(msh_f32_to_f16(3 * ldexpf(1, -25)) == 0x0002);            /* subnormal tie, up to even */
  CHECK(msh_f32_to_f16(nextafterf(ldexpf(1, -25), 1)) == 0x0001);
  CHECK(msh_f32_to_f16(ldexpf(1023.5f, -24)) == 0x0400);           /* subnormal rounds up to normal */
  CHECK(msh_f32_to_bf16(1.0f + ldexpf(1, -8)) == 0x3f80);
  CHECK(msh_f32_to_bf16(1.0f + 3 * ldexpf(1, -8)) == 0x3f82);
  CHECK(msh_f32_to_bf16(nextafterf(1.0f + ldexpf(1, -8), 2)) == 0x3f81);
  CHECK(msh_f32_to_bf16(bits_f(0x00008000)) == 0x0000); /* f32 subnormal tie: to even (0) */
  CHECK(msh_f32_to_bf16(bits_f(0x00018000)) == 0x0002); /* tie: up to even */

  /* overflow, inf, NaN, signed zero */
  CHECK(msh_f32_to_f16(65519.0f) == 0x7bff && msh_f32_to_f16(65520.0f) == 0x7c00);
  CHECK(msh_f32_to_f16(1e30f) == 0x7c00 && msh_f32_to_f16(-1e30f) == 0xfc00);
  CHECK(msh_f32_to_f16(INFINITY) == 0x7c00 && msh_f32_to_f16(-INFINITY) == 0xfc00);
  CHECK(isinf(msh_f16_to_f32(0x7c00)) && msh_f16_to_f32(0xfc00) < 0);
  uint16_t hn = msh_f32_to_f16(NAN);
  CHECK((hn & 0x7c00) == 0x7c00 && (hn & 0x3ff) != 0);
  CHECK(msh_f32_to_bf16(bits_f(0x7f7fffff)) == 0x7f80); /* FLT_MAX rounds to inf */
  CHECK(msh_f32_to_bf16(INFINITY) == 0x7f80 && msh_f32_to_bf16(-INFINITY) == 0xff80);
  uint16_t bn = msh_f32_to_bf16(bits_f(0x7f800001)); /* a signalling NaN whose payload is in the low bits */
  CHECK((bn & 0x7f80) == 0x7f80 && (bn & 0x7f) != 0);
  CHECK(msh_f32_to_f16(-0.0f) == 0x8000 && msh_f32_to_bf16(-0.0f) == 0x8000);
  CHECK(msh_f32_to_f16(ldexpf(1, -30)) == 0 && msh_f32_to_f16(-ldexpf(1, -30)) == 0x8000);
}

/* The copy kernels (vectorized on the CPU backend) give exactly the scalar conversions. */
static void test_copy_conversions(void) {
  enum { N = 300007 }; /* long enough for several threads, odd for the tails */
  int64_t s[1] = {N};
  msh_tensor *f = tnew(MSH_F32, 1, s), *h = tnew(MSH_F16, 1, s), *b = tnew(MSH_BF16, 1, s), *back = tnew(MSH_F32, 1, s);
  float *fp = msh_tensor_data(f);
  const uint32_t specials[] = {0x7f800000, 0xff800000, 0x7fc00000, 0x7f800001, 0xffc12345, 0x00000001, 0x80000001,
                               0x007fffff, 0x38800000, 0x33800000, 0x477fefff, 0x477ff000, 0x80000000, 0x3f808000};
  for (int64_t i = 0; i < N; i++) {
    uint64_t r = next_u64();
    uint32_t u = (uint32_t)r;
    if (r >> 62 == 0) u = specials[(r >> 32) % (sizeof specials / sizeof specials[0])];
    else if (r >> 62 == 1) u = (u & 0x8fffffffu) | 0x30000000u; /* near the f16 range */
    fp[i] = bits_f(u);
  }
  CHECK_OK(msh_tensor_copy(h, f));
  CHECK_OK(msh_tensor_copy(b, f));
  const uint16_t *hp = msh_tensor_data(h), *bp = msh_tensor_data(b);
  int64_t bad_h = 0, bad_b = 0, bad_back = 0;
  for (int64_t i = 0; i < N; i++) {
    bad_h += hp[i] != msh_f32_to_f16(fp[i]);
    bad_b += bp[i] != msh_f32_to_bf16(fp[i]);
  }
  CHECK(bad_h == 0);
  CHECK(bad_b == 0);
  CHECK_OK(msh_tensor_copy(back, h));
  for (int64_t i = 0; i < N; i++) bad_back += f_bits(((float *)msh_tensor_data(back))[i]) != f_bits(msh_f16_to_f32(hp[i])) && !isnan(msh_f16_to_f32(hp[i]));
  CHECK_OK(msh_tensor_copy(back, b));
  for (int64_t i = 0; i < N; i++) bad_back += f_bits(((float *)msh_tensor_data(back))[i]) != f_bits(msh_bf16_to_f32(bp[i]));
  CHECK(bad_back == 0);
  /* f16 -> bf16 rounds once (f16 -> f32 is exact) */
  CHECK_OK(msh_tensor_copy(b, h));
  int64_t bad_hb = 0;
  for (int64_t i = 0; i < N; i++) {
    float v = msh_f16_to_f32(hp[i]);
    bad_hb += isnan(v) ? !isnan(msh_bf16_to_f32(bp[i])) : bp[i] != msh_f32_to_bf16(v);
  }
  CHECK(bad_hb == 0);
  msh_tensor_free(f);
  msh_tensor_free(h);
  msh_tensor_free(b);
  msh_tensor_free(back);
}

/* ------------------------------------------------------------------------------ copies */

static void test_copies(void) {
  int64_t s[2] = {5, 7}, st[2] = {7, 5};
  msh_tensor *t = iota(2, s), *tt = NULL, *d = tnew(MSH_BF16, 2, st), *d32 = tnew(MSH_F32, 2, st);
  CHECK_OK(msh_tensor_transpose(&tt, t, 0, 1));
  CHECK_OK(msh_tensor_copy(d, tt)); /* strided source, dtype conversion */
  CHECK_OK(msh_tensor_copy(d32, tt));
  int ok = 1;
  for (int i = 0; i < 7; i++)
    for (int j = 0; j < 5; j++) {
      ok &= msh_bf16_to_f32(((uint16_t *)msh_tensor_data(d))[i * 5 + j]) == (float)(j * 7 + i);
      ok &= ((float *)msh_tensor_data(d32))[i * 5 + j] == (float)(j * 7 + i);
    }
  CHECK(ok);

  /* strided destination: write a (5, 3) block into columns 2 .. 4 of a (5, 7) f16 tensor */
  msh_tensor *h = tnew(MSH_F16, 2, s), *cols = NULL, *src = NULL;
  int64_t bs[2] = {5, 3};
  src = iota(2, bs);
  CHECK_OK(msh_tensor_narrow(&cols, h, 1, 2, 3));
  CHECK_OK(msh_tensor_copy(cols, src));
  ok = 1;
  for (int i = 0; i < 5; i++)
    for (int j = 0; j < 7; j++) {
      float want = (j >= 2 && j < 5) ? (float)(i * 3 + j - 2) : 0.0f;
      ok &= msh_f16_to_f32(((uint16_t *)msh_tensor_data(h))[i * 7 + j]) == want;
    }
  CHECK(ok);

  /* integers copy to themselves through strides, never to floats */
  msh_tensor *ia = tnew(MSH_I32, 2, s), *ib = tnew(MSH_I32, 2, st), *iat = NULL, *i8a = tnew(MSH_I8, 2, s),
             *i8b = tnew(MSH_I8, 2, st), *i8at = NULL;
  for (int i = 0; i < 35; i++) {
    ((int32_t *)msh_tensor_data(ia))[i] = 100000 * i - 7;
    ((int8_t *)msh_tensor_data(i8a))[i] = (int8_t)(i * 5 - 90);
  }
  CHECK_OK(msh_tensor_transpose(&iat, ia, 0, 1));
  CHECK_OK(msh_tensor_transpose(&i8at, i8a, 0, 1));
  CHECK_OK(msh_tensor_copy(ib, iat));
  CHECK_OK(msh_tensor_copy(i8b, i8at));
  ok = 1;
  for (int i = 0; i < 7; i++)
    for (int j = 0; j < 5; j++) {
      ok &= ((int32_t *)msh_tensor_data(ib))[i * 5 + j] == 100000 * (j * 7 + i) - 7;
      ok &= ((int8_t *)msh_tensor_data(i8b))[i * 5 + j] == (int8_t)((j * 7 + i) * 5 - 90);
    }
  CHECK(ok);
  CHECK_STATUS(msh_tensor_copy(d32, ib), MSH_EINVAL); /* i32 -> f32 */
  CHECK_STATUS(msh_tensor_copy(ib, i8b), MSH_EINVAL); /* i8 -> i32 */
  CHECK_STATUS(msh_tensor_copy(d32, t), MSH_EINVAL);  /* (7, 5) <- (5, 7) */

  /* a 3-D permuted copy large enough for several threads */
  int64_t s3[3] = {64, 37, 129}, p3[3] = {129, 37, 64};
  msh_tensor *a3 = iota(3, s3), *v3 = NULL, *o3 = tnew(MSH_F32, 3, p3);
  int64_t pst[3] = {1, 129, 37 * 129};
  CHECK_OK(msh_tensor_view(&v3, a3, 3, p3, pst, 0));
  CHECK_OK(msh_tensor_copy(o3, v3));
  ok = 1;
  const float *op = msh_tensor_data(o3);
  for (int64_t i = 0; i < 129; i++)
    for (int64_t j = 0; j < 37; j++)
      for (int64_t k = 0; k < 64; k++) ok &= op[(i * 37 + j) * 64 + k] == (float)(k * 37 * 129 + j * 129 + i);
  CHECK(ok);

  /* contiguous(): a new tensor in another dtype */
  msh_tensor *c = NULL;
  CHECK_OK(msh_tensor_contiguous(&c, tt, MSH_F16));
  CHECK(msh_tensor_is_contiguous(c) && msh_tensor_dtype(c) == MSH_F16 && msh_tensor_dim(c, 0) == 7);
  CHECK(msh_f16_to_f32(((uint16_t *)msh_tensor_data(c))[1 * 5 + 3]) == 3 * 7 + 1);

  msh_tensor *ts[] = {t, tt, d, d32, h, cols, src, ia, ib, iat, i8a, i8b, i8at, a3, v3, o3, c};
  for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++) msh_tensor_free(ts[i]);
}

/* ------------------------------------------------------------------------------ arenas */

static void test_arena(void) {
  msh_arena *a = NULL;
  CHECK_OK(msh_arena_new(&a, MSH_CPU, 0, 1000));
  CHECK(msh_arena_capacity(a) == 1000 && msh_arena_used(a) == 0);
  int64_t s1[1] = {3}, s2[2] = {10, 5}, s3[1] = {200};
  msh_tensor *x = NULL, *y = NULL, *z = NULL;
  CHECK_OK(msh_tensor_new_arena(&x, a, MSH_F16, 1, s1)); /* 6 bytes */
  CHECK_OK(msh_tensor_new_arena(&y, a, MSH_F32, 2, s2)); /* 200 bytes at 64 */
  CHECK(((uintptr_t)msh_tensor_data(x) & 63) == 0 && ((uintptr_t)msh_tensor_data(y) & 63) == 0);
  CHECK((char *)msh_tensor_data(y) - (char *)msh_tensor_data(x) == 64);
  CHECK(msh_arena_used(a) == 264);
  float *yp = msh_tensor_data(y);
  for (int i = 0; i < 50; i++) yp[i] = (float)i; /* writable, inside the block (ASan checks) */
  msh_clear_error();
  CHECK_STATUS(msh_tensor_new_arena(&z, a, MSH_F32, 1, s3), MSH_ERANGE); /* 800 bytes at 320: full */
  CHECK(strstr(msh_last_error(), "arena full") != NULL);
  CHECK(z == NULL && msh_arena_used(a) == 264);
  int64_t s4[1] = {170};
  CHECK_OK(msh_tensor_new_arena(&z, a, MSH_F32, 1, s4)); /* 680 bytes at 320: exactly fits */
  CHECK(msh_arena_used(a) == 1000);
  msh_tensor_free(z);
  int64_t bad[1] = {-1};
  CHECK_STATUS(msh_tensor_new_arena(&z, a, MSH_F32, 1, bad), MSH_EINVAL);
  CHECK_STATUS(msh_tensor_new_arena(&z, a, 99, 1, s1), MSH_EINVAL);
  msh_arena_reset(a);
  CHECK(msh_arena_used(a) == 0);
  CHECK_OK(msh_tensor_new_arena(&z, a, MSH_F32, 1, s3));
  CHECK(msh_tensor_data(z) == msh_tensor_data(x));
  msh_tensor_free(x);
  msh_tensor_free(y);
  msh_tensor_free(z);
  msh_arena_free(a);
  msh_arena_free(NULL);
}

/* ------------------------------------------------------------------------------- files */

static void test_file_tensors(void) {
  char path[] = "/tmp/msh_test_tensor_XXXXXX";
  int fd = mkstemp(path);
  CHECK(fd >= 0);
  float data[25];
  for (int i = 0; i < 25; i++) data[i] = (float)i * 0.5f;
  CHECK(write(fd, data, sizeof data) == (ssize_t)sizeof data);
  close(fd);
  msh_file *f = NULL;
  CHECK_OK(msh_file_open(&f, path));
  CHECK(msh_file_size(f) == 100);
  msh_tensor *t = NULL, *u = NULL, *h = NULL;
  int64_t s[2] = {5, 5}, s24[1] = {24}, s1[1] = {1};
  CHECK_OK(msh_tensor_from_file(&t, f, 0, MSH_F32, 2, s));
  CHECK(msh_tensor_is_readonly(t) && ((float *)msh_tensor_data(t))[24] == 12.0f);
  CHECK_OK(msh_tensor_from_file(&u, f, 4, MSH_F32, 1, s24)); /* bytes 4 .. 100 */
  CHECK(((float *)msh_tensor_data(u))[0] == 0.5f);
  CHECK_OK(msh_tensor_from_file(&h, f, 98, MSH_F16, 1, s1)); /* the last two bytes, odd alignment is fine */
  msh_tensor_free(h);
  h = NULL;
  msh_clear_error();
  CHECK_STATUS(msh_tensor_from_file(&h, f, 8, MSH_F32, 1, s24), MSH_ERANGE); /* 8 + 96 > 100 */
  CHECK(strstr(msh_last_error(), path) != NULL);
  CHECK_STATUS(msh_tensor_from_file(&h, f, 101, MSH_F32, 1, s1), MSH_ERANGE);
  CHECK_STATUS(msh_tensor_from_file(&h, f, UINT64_MAX - 2, MSH_F32, 1, s1), MSH_ERANGE);
  int64_t huge[2] = {INT64_C(1) << 40, INT64_C(1) << 40};
  CHECK(msh_tensor_from_file(&h, f, 0, MSH_F32, 2, huge) != MSH_OK);
  CHECK(h == NULL);
  /* read-only: copies into it fail, randn into it fails */
  CHECK_STATUS(msh_tensor_copy(u, u), MSH_EINVAL);
  CHECK_STATUS(msh_tensor_randn(t, 1, 0, 1), MSH_EINVAL);
  /* the tensors keep the mapping alive after the file handle goes */
  msh_file_free(f);
  float sum = 0;
  for (int i = 0; i < 25; i++) sum += ((float *)msh_tensor_data(t))[i];
  CHECK(sum == 150.0f);
  msh_tensor_free(t);
  CHECK(((float *)msh_tensor_data(u))[23] == 12.0f);
  msh_tensor_free(u);
  unlink(path);
  f = NULL;
  CHECK_STATUS(msh_file_open(&f, path), MSH_ENOENT);
  CHECK(f == NULL);
}

/* ------------------------------------------------------------------------ ref counting */

static void test_refcount(void) {
  int64_t s[2] = {4, 6};
  msh_tensor *t = iota(2, s), *v = NULL, *w = NULL;
  CHECK_OK(msh_tensor_narrow(&v, t, 0, 1, 2));
  CHECK_OK(msh_tensor_transpose(&w, v, 0, 1));
  msh_tensor_free(t); /* the storage stays while views hold it */
  CHECK(at2(v, 1, 5) == 17);
  ((float *)msh_tensor_data(v))[0] = -1; /* writes go to live memory (ASan would catch a free) */
  CHECK(at2(w, 0, 0) == -1);
  msh_tensor_free(v);
  CHECK(at2(w, 5, 1) == 17);
  msh_tensor_free(w);
  msh_tensor_free(NULL);

  /* an arena's tensors keep its block alive too */
  msh_arena *a = NULL;
  msh_tensor *x = NULL;
  CHECK_OK(msh_arena_new(&a, MSH_CPU, 0, 256));
  CHECK_OK(msh_tensor_new_arena(&x, a, MSH_F32, 2, s));
  msh_arena_free(a);
  ((float *)msh_tensor_data(x))[23] = 3;
  CHECK(((float *)msh_tensor_data(x))[23] == 3);
  msh_tensor_free(x);
}

/* ------------------------------------------------------------------------------- randn */

static void test_randn(void) {
  int64_t s[1] = {200001};
  msh_tensor *a = tnew(MSH_F32, 1, s), *b = tnew(MSH_F32, 1, s), *c = tnew(MSH_F32, 1, s);
  CHECK_OK(msh_tensor_randn(a, 42, 1.5f, 2.0f));
  CHECK_OK(msh_tensor_randn(b, 42, 1.5f, 2.0f));
  CHECK_OK(msh_tensor_randn(c, 43, 1.5f, 2.0f));
  CHECK(!memcmp(msh_tensor_data(a), msh_tensor_data(b), sizeof(float) * 200001));
  const float *ap = msh_tensor_data(a), *cp = msh_tensor_data(c);
  int64_t same = 0;
  double sum = 0, sq = 0;
  for (int64_t i = 0; i < s[0]; i++) {
    same += ap[i] == cp[i];
    sum += ap[i];
    sq += (double)ap[i] * ap[i];
  }
  double mean = sum / (double)s[0], sd = sqrt(sq / (double)s[0] - mean * mean);
  CHECK(same < 10);
  CHECK(fabs(mean - 1.5) < 5 * 2.0 / sqrt((double)s[0])); /* five standard errors */
  CHECK(fabs(sd - 2.0) < 0.02);

  /* into a strided bf16 view: the element in row-major order i gets value i of the stream */
  int64_t m[2] = {30, 41}, mt[2] = {41, 30};
  msh_tensor *base = tnew(MSH_BF16, 2, mt), *view = NULL, *ref = tnew(MSH_F32, 2, m);
  CHECK_OK(msh_tensor_transpose(&view, base, 0, 1));
  CHECK_OK(msh_tensor_randn(view, 7, 0, 1));
  CHECK_OK(msh_tensor_randn(ref, 7, 0, 1));
  int ok = 1;
  for (int i = 0; i < 30; i++)
    for (int j = 0; j < 41; j++)
      ok &= ((uint16_t *)msh_tensor_data(base))[j * 30 + i] ==
            msh_f32_to_bf16(((float *)msh_tensor_data(ref))[i * 41 + j]);
  CHECK(ok);
  /* the backend's fill of a contiguous tensor (threads splitting the elements) draws what the
   * generic loop draws into a strided view, bit for bit, in each float dtype */
  int64_t big[2] = {301, 1001}, bigt[2] = {1001, 301};
  int threads = msh_get_num_threads();
  msh_set_num_threads(4);
  int dts[3] = {MSH_F32, MSH_BF16, MSH_F16};
  for (int d = 0; d < 3; d++) {
    msh_tensor *cont = tnew(dts[d], 2, big), *tb = tnew(dts[d], 2, bigt), *tv = NULL;
    CHECK_OK(msh_tensor_transpose(&tv, tb, 0, 1));
    CHECK_OK(msh_tensor_randn(cont, 9, 0.25f, 0.5f));
    CHECK_OK(msh_tensor_randn(tv, 9, 0.25f, 0.5f));
    size_t es = msh_dtype_size(dts[d]);
    const char *cp = msh_tensor_data(cont), *bp = msh_tensor_data(tb);
    int64_t differ = 0;
    for (int64_t i = 0; i < big[0]; i++)
      for (int64_t j = 0; j < big[1]; j++)
        differ += memcmp(cp + (i * big[1] + j) * (int64_t)es, bp + (j * big[0] + i) * (int64_t)es, es) != 0;
    CHECK(differ == 0);
    msh_tensor_free(tv);
    msh_tensor_free(tb);
    msh_tensor_free(cont);
  }
  msh_set_num_threads(threads);
  msh_tensor *it = tnew(MSH_I32, 1, s);
  CHECK_STATUS(msh_tensor_randn(it, 1, 0, 1), MSH_EINVAL);
  msh_tensor *ts[] = {a, b, c, base, view, ref, it};
  for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++) msh_tensor_free(ts[i]);
}

/* ------------------------------------------------------------------------ constructors */

static void test_constructors(void) {
  msh_tensor *t = NULL;
  int64_t s[2] = {3, 4}, neg[2] = {3, -4};
  CHECK_STATUS(msh_tensor_new(&t, MSH_F32, 2, neg, MSH_CPU, 0), MSH_EINVAL);
  CHECK_STATUS(msh_tensor_new(&t, 77, 2, s, MSH_CPU, 0), MSH_EINVAL);
  CHECK_STATUS(msh_tensor_new(&t, MSH_F32, MSH_MAX_DIMS + 1, s, MSH_CPU, 0), MSH_EINVAL);
  CHECK_STATUS(msh_tensor_new(NULL, MSH_F32, 2, s, MSH_CPU, 0), MSH_EINVAL);
  CHECK(t == NULL);
  CHECK_OK(msh_tensor_new(&t, MSH_F32, 0, NULL, MSH_CPU, 0)); /* a scalar */
  CHECK(msh_tensor_numel(t) == 1 && msh_tensor_ndim(t) == 0);
  msh_tensor_free(t);
  CHECK_OK(msh_tensor_new(&t, MSH_BF16, 2, s, MSH_CPU, 0)); /* zero-filled */
  int zero = 1;
  for (int i = 0; i < 12; i++) zero &= ((uint16_t *)msh_tensor_data(t))[i] == 0;
  CHECK(zero && msh_tensor_device(t) == MSH_CPU && msh_tensor_dtype(t) == MSH_BF16);
  msh_tensor_free(t);
  float mem[12] = {0};
  CHECK_OK(msh_tensor_wrap(&t, mem, MSH_F32, 2, s));
  ((float *)msh_tensor_data(t))[11] = 5;
  CHECK(mem[11] == 5 && !msh_tensor_is_readonly(t));
  msh_tensor_free(t);
  CHECK(msh_dtype_size(MSH_BF16) == 2 && msh_dtype_size(99) == 0 && !strcmp(msh_dtype_name(MSH_I8), "i8"));
}

int main(void) {
  test_views();
  test_conversions();
  test_copy_conversions();
  test_copies();
  test_arena();
  test_file_tensors();
  test_refcount();
  test_randn();
  test_constructors();
  return check_done("test_tensor");
}
