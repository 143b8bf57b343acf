/* test_dyn.c: the ops that read a position from a tensor (msh_op_set_rows_dyn,
 * msh_op_attention_dyn) against their host-scalar twins on the CPU: the same bytes at several
 * positions, clamping of positions out of range, validation; and graphs, which the CPU lacks. */
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

/* A (1) i32 tensor holding v. */
static msh_tensor *scalar_i32(int32_t v) {
  int64_t one = 1;
  msh_tensor *t = cpu_new(MSH_I32, 1, &one);
  if (t) *(int32_t *)msh_tensor_data(t) = v;
  return t;
}

static int same_bytes(const msh_tensor *a, const msh_tensor *b) {
  size_t n = (size_t)msh_tensor_numel(a) * msh_dtype_size(msh_tensor_dtype(a));
  return msh_tensor_numel(a) == msh_tensor_numel(b) && !memcmp(msh_tensor_data(a), msh_tensor_data(b), n);
}

static int64_t clamp(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : x > hi ? hi : x; }

/* ------------------------------------------------------------------------------ set_rows */

/* dst (S, 3, 4) of dtype dt, src (T, 3, 4) f32: set_rows_dyn at row0 writes what set_rows writes
 * at the clamped row, and nothing else. */
static void set_rows_case(int dt, int64_t S, int64_t T, int32_t row0) {
  int64_t dshape[3] = {S, 3, 4}, sshape[3] = {T, 3, 4};
  msh_tensor *a = cpu_randn(dt, 3, dshape, 11), *b = cpu_randn(dt, 3, dshape, 11);
  msh_tensor *src = cpu_randn(MSH_F32, 3, sshape, 12 + (uint64_t)row0), *r = scalar_i32(row0);
  CHECK_OK(msh_op_set_rows_dyn(a, r, src));
  CHECK_OK(msh_op_set_rows(b, clamp(row0, 0, S - T), src));
  CHECK(same_bytes(a, b));
  msh_tensor_free(a);
  msh_tensor_free(b);
  msh_tensor_free(src);
  msh_tensor_free(r);
}

static void test_set_rows(void) {
  static const int32_t rows[] = {0, 3, 7, 8, -1, -100000, 9, 1 << 30};
  for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
    set_rows_case(MSH_F32, 10, 2, rows[i]);
    set_rows_case(MSH_BF16, 10, 2, rows[i]);
    set_rows_case(MSH_F16, 10, 3, rows[i]);
  }
  set_rows_case(MSH_F32, 4, 4, 2); /* T = rows(dst): only row 0 fits */
  set_rows_case(MSH_F32, 4, 0, 2); /* nothing to write */

  /* a strided dst: columns [1, 3) of a (6, 4) tensor */
  int64_t shape[2] = {6, 4}, sshape[2] = {2, 2};
  msh_tensor *a = cpu_randn(MSH_F32, 2, shape, 5), *b = cpu_randn(MSH_F32, 2, shape, 5);
  msh_tensor *av = NULL, *bv = NULL, *src = cpu_randn(MSH_F32, 2, sshape, 6), *r = scalar_i32(3);
  CHECK_OK(msh_tensor_narrow(&av, a, 1, 1, 2));
  CHECK_OK(msh_tensor_narrow(&bv, b, 1, 1, 2));
  CHECK_OK(msh_op_set_rows_dyn(av, r, src));
  CHECK_OK(msh_op_set_rows(bv, 3, src));
  CHECK(same_bytes(a, b));
  CHECK(((float *)msh_tensor_data(a))[3 * 4 + 1] == ((float *)msh_tensor_data(src))[0]);

  /* i32 rows copy bit for bit */
  int64_t ishape[1] = {5};
  msh_tensor *ia = cpu_new(MSH_I32, 1, ishape), *is = scalar_i32(-7);
  CHECK_OK(msh_op_set_rows_dyn(ia, r, is));
  CHECK(((int32_t *)msh_tensor_data(ia))[3] == -7);

  msh_tensor_free(av);
  msh_tensor_free(bv);
  msh_tensor_free(a);
  msh_tensor_free(b);
  msh_tensor_free(src);
  msh_tensor_free(r);
  msh_tensor_free(ia);
  msh_tensor_free(is);
}

static void test_set_rows_errors(void) {
  int64_t dshape[2] = {4, 3}, sshape[2] = {2, 3}, wide[2] = {2, 5}, tall[2] = {5, 3}, two = 2;
  msh_tensor *dst = cpu_new(MSH_F32, 2, dshape), *src = cpu_new(MSH_F32, 2, sshape), *r = scalar_i32(0);
  msh_tensor *w = cpu_new(MSH_F32, 2, wide), *t = cpu_new(MSH_F32, 2, tall), *r2 = cpu_new(MSH_I32, 1, &two);
  msh_tensor *rf = cpu_new(MSH_F32, 1, (int64_t[]){1}), *si = cpu_new(MSH_I32, 2, sshape);
  CHECK_STATUS(msh_op_set_rows_dyn(NULL, r, src), MSH_EINVAL);
  CHECK_STATUS(msh_op_set_rows_dyn(dst, NULL, src), MSH_EINVAL);
  CHECK_STATUS(msh_op_set_rows_dyn(dst, r, NULL), MSH_EINVAL);
  CHECK_STATUS(msh_op_set_rows_dyn(dst, rf, src), MSH_EINVAL);
  CHECK(strstr(msh_last_error(), "row0") != NULL);
  CHECK_STATUS(msh_op_set_rows_dyn(dst, r2, src), MSH_EINVAL);
  CHECK_STATUS(msh_op_set_rows_dyn(dst, r, w), MSH_EINVAL);
  CHECK_STATUS(msh_op_set_rows_dyn(dst, r, si), MSH_EINVAL); /* i32 into f32 */
  CHECK_STATUS(msh_op_set_rows_dyn(dst, r, t), MSH_ERANGE);
  CHECK_STATUS(msh_op_set_rows_dyn(dst, r, dst), MSH_EINVAL); /* overlap */
  /* row0 inside dst's own bytes */
  msh_tensor *di = cpu_new(MSH_I32, 1, (int64_t[]){4}), *dr = NULL, *one = scalar_i32(9);
  CHECK_OK(msh_tensor_narrow(&dr, di, 0, 3, 1));
  CHECK_STATUS(msh_op_set_rows_dyn(di, dr, one), MSH_EINVAL);
  CHECK(strstr(msh_last_error(), "overlaps") != NULL);
  msh_tensor_free(dr);
  msh_tensor_free(di);
  msh_tensor_free(one);
  msh_tensor_free(dst);
  msh_tensor_free(src);
  msh_tensor_free(r);
  msh_tensor_free(w);
  msh_tensor_free(t);
  msh_tensor_free(r2);
  msh_tensor_free(rf);
  msh_tensor_free(si);
}

/* ----------------------------------------------------------------------------- attention */

static void attention_case(int kv_dt, int64_t T, int64_t S, int64_t max_len, int32_t pos0) {
  const int64_t H = 6, KVH = 2, hd = 16;
  int64_t qshape[3] = {T, H, hd}, kshape[3] = {S, KVH, hd};
  msh_tensor *q = cpu_randn(MSH_F32, 3, qshape, 21), *k = cpu_randn(kv_dt, 3, kshape, 22);
  msh_tensor *v = cpu_randn(kv_dt, 3, kshape, 23), *a = cpu_new(MSH_F32, 3, qshape), *b = cpu_new(MSH_F32, 3, qshape);
  msh_tensor *p = scalar_i32(pos0);
  float scale = 0.25f;
  CHECK_OK(msh_op_attention_dyn(a, q, k, v, p, max_len, scale));
  CHECK_OK(msh_op_attention(b, q, k, v, clamp(pos0, 0, max_len - T), scale));
  CHECK(same_bytes(a, b));
  msh_tensor_free(q);
  msh_tensor_free(k);
  msh_tensor_free(v);
  msh_tensor_free(a);
  msh_tensor_free(b);
  msh_tensor_free(p);
}

static void test_attention(void) {
  static const int32_t pos[] = {0, 1, 5, 17, 36, 39, -3, 1000};
  for (size_t i = 0; i < sizeof pos / sizeof pos[0]; i++) {
    attention_case(MSH_F32, 1, 48, 40, pos[i]);
    attention_case(MSH_BF16, 1, 48, 40, pos[i]);
    attention_case(MSH_F16, 4, 48, 40, pos[i]);
    attention_case(MSH_F32, 3, 40, 40, pos[i]);
  }
}

static void test_attention_errors(void) {
  int64_t qshape[3] = {2, 4, 8}, kshape[3] = {10, 2, 8}, two = 2;
  msh_tensor *q = cpu_new(MSH_F32, 3, qshape), *k = cpu_new(MSH_F32, 3, kshape), *v = cpu_new(MSH_F32, 3, kshape);
  msh_tensor *out = cpu_new(MSH_F32, 3, qshape), *p = scalar_i32(0), *p2 = cpu_new(MSH_I32, 1, &two);
  msh_tensor *pf = cpu_new(MSH_F32, 1, (int64_t[]){1});
  CHECK_OK(msh_op_attention_dyn(out, q, k, v, p, 10, 1.0f));
  CHECK_OK(msh_op_attention_dyn(out, q, k, v, p, 2, 1.0f));
  CHECK_STATUS(msh_op_attention_dyn(out, q, k, v, p, 1, 1.0f), MSH_ERANGE);  /* max_len < T */
  CHECK_STATUS(msh_op_attention_dyn(out, q, k, v, p, 11, 1.0f), MSH_ERANGE); /* max_len > S */
  CHECK(strstr(msh_last_error(), "max_len") != NULL);
  CHECK_STATUS(msh_op_attention_dyn(out, q, k, v, NULL, 10, 1.0f), MSH_EINVAL);
  CHECK_STATUS(msh_op_attention_dyn(out, q, k, v, p2, 10, 1.0f), MSH_EINVAL);
  CHECK_STATUS(msh_op_attention_dyn(out, q, k, v, pf, 10, 1.0f), MSH_EINVAL);
  CHECK(strstr(msh_last_error(), "pos0") != NULL);
  CHECK_STATUS(msh_op_attention_dyn(out, q, k, q, p, 10, 1.0f), MSH_EINVAL); /* shapes */
  CHECK_STATUS(msh_op_attention_dyn(q, q, k, v, p, 10, 1.0f), MSH_EINVAL);  /* out overlaps q */
  msh_tensor_free(q);
  msh_tensor_free(k);
  msh_tensor_free(v);
  msh_tensor_free(out);
  msh_tensor_free(p);
  msh_tensor_free(p2);
  msh_tensor_free(pf);
}

/* -------------------------------------------------------------------------------- graphs */

static void test_graphs(void) {
  msh_graph *g = NULL;
  CHECK_STATUS(msh_graph_begin(MSH_CPU, 0), MSH_EUNSUPPORTED);
  CHECK_STATUS(msh_graph_end(MSH_CPU, 0, &g), MSH_EUNSUPPORTED);
  CHECK(g == NULL);
  CHECK_STATUS(msh_graph_end(MSH_CPU, 0, NULL), MSH_EINVAL);
  CHECK_STATUS(msh_graph_launch(NULL), MSH_EINVAL);
  CHECK_STATUS(msh_graph_begin(42, 0), MSH_EUNSUPPORTED);
  msh_graph_free(NULL);
  if (!msh_has_cuda()) CHECK_STATUS(msh_graph_begin(MSH_CUDA, 0), MSH_EUNSUPPORTED);
}

int main(void) {
  test_set_rows();
  test_set_rows_errors();
  test_attention();
  test_attention_errors();
  test_graphs();
  return check_done("test_dyn");
}
