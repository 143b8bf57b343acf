/* test_fused.c: the fused layer ops on the CPU against the unfused ops composed (fused_cases.h),
 * and their operand checks. */
#include "../gpu/fused_cases.h"

static void test_errors(void) {
  int64_t xs[2] = {2, 8}, ws[2] = {6, 8}, os[2] = {2, 3}, bad[2] = {2, 4}, small[2] = {2, 5}, big[2] = {2, 6};
  msh_tensor *x = cpu_randn(MSH_F32, 2, xs, 1), *w = cpu_randn(MSH_F32, 2, ws, 1), *o = cpu_new(MSH_F32, 2, os);
  msh_tensor *ob = cpu_new(MSH_F32, 2, bad), *sc = cpu_new(MSH_F32, 2, small), *sc_ok = cpu_new(MSH_F32, 2, big);
  CHECK_STATUS(msh_op_matmul_glu(o, x, w, sc), MSH_EINVAL); /* scratch too small */
  CHECK_OK(msh_op_matmul_glu(o, x, w, sc_ok));
  CHECK_STATUS(msh_op_matmul_glu(ob, x, w, sc_ok), MSH_EINVAL); /* w is not (2N, K) */
  CHECK_STATUS(msh_op_matmul_glu(o, x, w, NULL), MSH_EINVAL);
  CHECK_STATUS(msh_op_matmul_acc(o, x, w), MSH_EINVAL); /* w has 6 rows, out 3 columns */
  CHECK_STATUS(msh_op_matmul_acc(ob, ob, w), MSH_EINVAL);

  /* rmsnorm_matmul: h too small, a norm weight of the wrong length, h overlapping x */
  int64_t ns[1] = {8}, nbad[1] = {7}, hs[2] = {1, 8};
  msh_tensor *nw = cpu_randn(MSH_F32, 1, ns, 1), *nwb = cpu_randn(MSH_F32, 1, nbad, 1);
  msh_tensor *h = cpu_new(MSH_F32, 2, xs), *hsm = cpu_new(MSH_F32, 2, hs);
  CHECK_OK(msh_op_rmsnorm_matmul(o, x, nw, 1e-5f, w, h, sc_ok));
  CHECK_STATUS(msh_op_rmsnorm_matmul(o, x, nw, 1e-5f, w, hsm, sc_ok), MSH_EINVAL);
  CHECK(strstr(msh_last_error(), "rmsnorm_matmul") != NULL);
  CHECK_STATUS(msh_op_rmsnorm_matmul(o, x, nwb, 1e-5f, w, h, sc_ok), MSH_EINVAL);
  CHECK_STATUS(msh_op_rmsnorm_matmul(o, x, nw, 1e-5f, w, x, sc_ok), MSH_EINVAL);
  CHECK_STATUS(msh_op_rmsnorm_matmul(o, x, nw, 1e-5f, w, h, NULL), MSH_EINVAL); /* w (6, 8) is 2 x out's 3 */
  CHECK_STATUS(msh_op_rmsnorm_matmul(o, x, nw, 1e-5f, w, NULL, sc_ok), MSH_EINVAL);
  msh_tensor *ns_ts[] = {nw, nwb, h, hsm};
  free_all(ns_ts, 4);

  /* qkv_rope: a position past the cache is MSH_ERANGE and writes nothing */
  int64_t qs[2] = {2, (2 + 2) * 4}, q3[3] = {2, 2, 4}, cs[3] = {3, 1, 4}, ps[1] = {2}, fs[1] = {2};
  msh_tensor *qkv = cpu_randn(MSH_F32, 2, qs, 1), *q = cpu_new(MSH_F32, 3, q3);
  msh_tensor *kc = cpu_new(MSH_BF16, 3, cs), *vc = cpu_new(MSH_BF16, 3, cs);
  msh_tensor *pos = cpu_new(MSH_I32, 1, ps), *inv = cpu_randn(MSH_F32, 1, fs, 1);
  int32_t *pp = msh_tensor_data(pos);
  pp[0] = 0;
  pp[1] = 3;
  CHECK_STATUS(msh_op_qkv_rope(q, kc, vc, qkv, pos, inv, MSH_ROPE_HALF), MSH_ERANGE);
  CHECK(strstr(msh_last_error(), "position 3") != NULL);
  const uint16_t *kp = msh_tensor_data(kc);
  int untouched = 1;
  for (int i = 0; i < 12; i++) untouched &= kp[i] == 0;
  CHECK(untouched);
  pp[1] = 2;
  CHECK_OK(msh_op_qkv_rope(q, kc, vc, qkv, pos, inv, MSH_ROPE_HALF));
  CHECK_STATUS(msh_op_qkv_rope(q, kc, kc, qkv, pos, inv, MSH_ROPE_HALF), MSH_EINVAL); /* k and v overlap */
  CHECK_STATUS(msh_op_qkv_rope(q, kc, vc, qkv, pos, inv, 7), MSH_EINVAL);
  int64_t q3b[3] = {2, 3, 4};
  msh_tensor *qb = cpu_new(MSH_F32, 3, q3b);
  CHECK_STATUS(msh_op_qkv_rope(qb, kc, vc, qkv, pos, inv, MSH_ROPE_HALF), MSH_EINVAL);
  CHECK(strstr(msh_last_error(), "qkv_rope") != NULL);

  /* rmsnorm_qkv_rope: x (2, 8) through a (16, 8) q/k/v projection; a projection of the wrong
   * width, h overlapping the q output, a cache overlapping qkv */
  int64_t wqs[2] = {16, 8}, wbs[2] = {12, 8};
  msh_tensor *wq = cpu_randn(MSH_F32, 2, wqs, 1), *wqb = cpu_randn(MSH_F32, 2, wbs, 1);
  msh_tensor *nq = cpu_randn(MSH_F32, 1, ns, 1), *hq = cpu_new(MSH_F32, 2, xs);
  CHECK_OK(msh_op_rmsnorm_qkv_rope(q, kc, vc, qkv, x, nq, 1e-5f, wq, hq, pos, inv, MSH_ROPE_HALF));
  CHECK_STATUS(msh_op_rmsnorm_qkv_rope(q, kc, vc, qkv, x, nq, 1e-5f, wqb, hq, pos, inv, MSH_ROPE_HALF), MSH_EINVAL);
  CHECK(strstr(msh_last_error(), "rmsnorm_qkv_rope") != NULL);
  msh_tensor *qview = NULL;
  CHECK_OK(msh_tensor_reshape(&qview, q, 2, xs));
  CHECK_STATUS(msh_op_rmsnorm_qkv_rope(q, kc, vc, qkv, x, nq, 1e-5f, wq, qview, pos, inv, MSH_ROPE_HALF), MSH_EINVAL);
  pp[1] = 3;
  CHECK_STATUS(msh_op_rmsnorm_qkv_rope(q, kc, vc, qkv, x, nq, 1e-5f, wq, hq, pos, inv, MSH_ROPE_HALF), MSH_ERANGE);
  /* without the norm weight (x normalized already): the same checks, h not needed */
  CHECK_STATUS(msh_op_rmsnorm_qkv_rope(q, kc, vc, qkv, x, NULL, 0, wqb, NULL, pos, inv, MSH_ROPE_HALF), MSH_EINVAL);
  CHECK_STATUS(msh_op_rmsnorm_qkv_rope(q, kc, vc, qkv, x, NULL, 0, wq, NULL, pos, inv, MSH_ROPE_HALF), MSH_ERANGE);
  CHECK_STATUS(msh_op_rmsnorm_qkv_rope(q, kc, vc, qkv, NULL, NULL, 0, wq, NULL, pos, inv, MSH_ROPE_HALF), MSH_EINVAL);
  pp[1] = 1;
  CHECK_OK(msh_op_rmsnorm_qkv_rope(q, kc, vc, qkv, x, NULL, 0, wq, NULL, pos, inv, MSH_ROPE_HALF));

  /* rmsnorm_mlp: x (2, 8), F = 3 (w (6, 8) gate over up); a down projection of the wrong shape,
   * g overlapping x */
  int64_t wds[2] = {8, 3}, wdb[2] = {8, 4}, gs3[2] = {2, 3};
  msh_tensor *wd = cpu_randn(MSH_F32, 2, wds, 1), *wdbad = cpu_randn(MSH_F32, 2, wdb, 1);
  msh_tensor *g3 = cpu_new(MSH_F32, 2, gs3), *gview = NULL;
  CHECK_OK(msh_op_rmsnorm_mlp(x, nq, 1e-5f, w, wd, hq, g3, sc_ok));
  CHECK_STATUS(msh_op_rmsnorm_mlp(x, nq, 1e-5f, w, wdbad, hq, g3, sc_ok), MSH_EINVAL);
  CHECK(strstr(msh_last_error(), "rmsnorm_mlp") != NULL);
  CHECK_OK(msh_tensor_narrow(&gview, x, 1, 0, 3));
  CHECK_STATUS(msh_op_rmsnorm_mlp(x, nq, 1e-5f, w, wd, hq, gview, sc_ok), MSH_EINVAL);
  CHECK_STATUS(msh_op_rmsnorm_mlp(x, nq, 1e-5f, w, wd, hq, g3, NULL), MSH_EINVAL);
  msh_tensor *ts[] = {x, w, o, ob, sc, sc_ok, qkv, q, kc, vc, pos, inv, qb, wq, wqb, nq, hq, qview, wd, wdbad, g3, gview};
  free_all(ts, 22);
}

int main(void) {
  fused_all_cases(MSH_CPU);
  test_errors();
  return check_done("test_fused");
}
