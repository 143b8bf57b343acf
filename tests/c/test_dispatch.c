/* test_dispatch.c: the generic op layer's checks: aliasing rules, arena-backed operands, empty
 * tensors, devices that are not built in. */
#include "check.h"

#include <string.h>

static msh_tensor *arena_tensor(msh_arena *a, int64_t r, int64_t c) {
  msh_tensor *t = NULL;
  int64_t shape[2] = {r, c};
  CHECK_OK(msh_tensor_new_arena(&t, a, MSH_F32, 2, shape));
  return t;
}

int main(void) {
  msh_arena *a = NULL;
  CHECK_OK(msh_arena_new(&a, MSH_CPU, 0, 1 << 20));

  /* operands carved from one arena share storage but not bytes: matmul must accept them */
  msh_tensor *x = arena_tensor(a, 3, 5), *w = arena_tensor(a, 4, 5), *out = arena_tensor(a, 3, 4);
  CHECK_OK(msh_tensor_randn(x, 1, 0, 1));
  CHECK_OK(msh_tensor_randn(w, 2, 0, 1));
  CHECK_OK(msh_op_matmul(out, x, w));
  const float *xp = msh_tensor_data(x), *wp = msh_tensor_data(w), *op = msh_tensor_data(out);
  double ref = 0;
  for (int k = 0; k < 5; k++) ref += (double)xp[2 * 5 + k] * wp[3 * 5 + k];
  CHECK(close_enough(op[2 * 4 + 3], ref, 1e-5, 1e-6));

  /* out overlapping x (a view of the same bytes) is refused */
  msh_tensor *xv = NULL;
  int64_t shape[2] = {3, 4};
  CHECK_OK(msh_tensor_reshape(&xv, x, 2, (int64_t[]){5, 3}));
  msh_tensor *xs = NULL;
  int64_t strides[2] = {4, 1};
  CHECK_OK(msh_tensor_view(&xs, x, 2, shape, strides, 0)); /* contiguous (3, 4) over x's bytes */
  CHECK_STATUS(msh_op_matmul(xs, x, w), MSH_EINVAL);
  CHECK(strstr(msh_last_error(), "overlaps") != NULL);

  /* elementwise: exact aliasing is allowed, a shifted view of the same bytes is not */
  msh_tensor *v = arena_tensor(a, 1, 8), *v0 = NULL, *v1 = NULL;
  CHECK_OK(msh_tensor_randn(v, 3, 0, 1));
  CHECK_OK(msh_tensor_narrow(&v0, v, 1, 0, 7));
  CHECK_OK(msh_tensor_narrow(&v1, v, 1, 1, 7));
  CHECK_OK(msh_op_add(v0, v0, v0));
  CHECK_STATUS(msh_op_add(v1, v0, v0), MSH_EINVAL);
  CHECK_STATUS(msh_op_scale(v1, v0, 2.0f), MSH_EINVAL);

  /* empty rows are a no-op that reaches no backend */
  msh_tensor *e = NULL, *ew = NULL;
  int64_t eshape[2] = {2, 0}, wshape[1] = {0};
  CHECK_OK(msh_tensor_new(&e, MSH_F32, 2, eshape, MSH_CPU, 0));
  CHECK_OK(msh_tensor_new(&ew, MSH_F32, 1, wshape, MSH_CPU, 0));
  CHECK_OK(msh_op_softmax(e, e));
  CHECK_OK(msh_op_rmsnorm(e, e, ew, 1e-5f));

  /* a device kind this build lacks, or a bogus one */
  msh_tensor *g = NULL;
  int64_t one[1] = {4};
  if (!msh_has_cuda()) {
    CHECK_STATUS(msh_tensor_new(&g, MSH_F32, 1, one, MSH_CUDA, 0), MSH_EUNSUPPORTED);
    int n = -1;
    CHECK_OK(msh_device_count(MSH_CUDA, &n));
    CHECK(n == 0);
  }
  CHECK_STATUS(msh_tensor_new(&g, MSH_F32, 1, one, 42, 0), MSH_EUNSUPPORTED);

  msh_tensor_free(e);
  msh_tensor_free(ew);
  msh_tensor_free(v0);
  msh_tensor_free(v1);
  msh_tensor_free(v);
  msh_tensor_free(xs);
  msh_tensor_free(xv);
  msh_tensor_free(x);
  msh_tensor_free(w);
  msh_tensor_free(out);
  msh_arena_free(a);
  return check_done("test_dispatch");
}
