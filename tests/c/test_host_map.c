/* test_host_map.c: msh_tensor_map_host on the CPU (the --kv-offload cache's code path there): a
 * view of the same bytes, views of a pinned pool's buffer included, that outlives the host
 * handle; what cannot be mapped is refused with a message and nothing made. (The GPU side, where
 * the bytes cross the link: tests/gpu/test_cuda_host_map.c.) */
#include "check.h"

#include <string.h>

static void test_cpu_view(void) {
  int64_t shape[2] = {6, 10};
  msh_tensor *host = NULL, *m = NULL;
  CHECK_OK(msh_tensor_new(&host, MSH_F32, 2, shape, MSH_CPU, 0));
  CHECK_OK(msh_tensor_map_host(&m, host, MSH_CPU, 0));
  if (!m) return;
  CHECK(msh_tensor_device(m) == MSH_CPU && !msh_tensor_is_host_mapped(m));
  CHECK(msh_tensor_data(m) == msh_tensor_data(host) && msh_tensor_ndim(m) == 2 && msh_tensor_dim(m, 1) == 10);
  float *p = msh_tensor_data(host);
  for (int i = 0; i < 60; i++) p[i] = (float)i * 0.5f;
  msh_tensor_free(host); /* the view keeps the memory */
  const float *q = msh_tensor_data(m);
  int same = 1;
  for (int i = 0; i < 60; i++) same &= q[i] == (float)i * 0.5f;
  CHECK(same);
  msh_tensor_free(m);
}

static void test_pool_buffer(void) {
  msh_pin_pool *pool = NULL;
  CHECK_OK(msh_pin_pool_new(&pool, 1 << 16, 0, -1));
  if (!pool) return;
  msh_tensor *buf = NULL, *kv = NULL, *m = NULL;
  CHECK_OK(msh_pin_pool_take(pool, &buf, 8192));
  int64_t shape[4] = {2, 8, 4, 32}; /* (slots, positions, kv heads, head dim) of bf16 */
  CHECK_OK(msh_tensor_view_bytes(&kv, buf, 0, MSH_BF16, 4, shape));
  CHECK_OK(msh_tensor_map_host(&m, kv, MSH_CPU, 0));
  if (m) {
    CHECK(msh_tensor_data(m) == msh_tensor_data(buf) && msh_tensor_is_pinned(m) == msh_pin_pool_is_pinned(pool));
    memset(msh_tensor_data(m), 0x5a, 8192);
    CHECK(((unsigned char *)msh_tensor_data(buf))[8191] == 0x5a);
  }
  msh_pin_pool_free(pool); /* buffers handed out keep the pool's memory */
  msh_tensor_free(buf);
  msh_tensor_free(kv);
  if (m) CHECK(((unsigned char *)msh_tensor_data(m))[0] == 0x5a);
  msh_tensor_free(m);
}

static void test_refusals(void) {
  int64_t shape[1] = {16};
  msh_tensor *host = NULL, *m = NULL;
  CHECK_OK(msh_tensor_new(&host, MSH_F32, 1, shape, MSH_CPU, 0));
  CHECK_STATUS(msh_tensor_map_host(NULL, host, MSH_CPU, 0), MSH_EINVAL);
  CHECK_STATUS(msh_tensor_map_host(&m, NULL, MSH_CPU, 0), MSH_EINVAL);
  CHECK_STATUS(msh_tensor_map_host(&m, host, 99, 0), MSH_EUNSUPPORTED); /* no such device kind */
  CHECK(m == NULL);
  int n = 0;
  if (msh_device_count(MSH_CUDA, &n) != MSH_OK) n = 0;
  msh_status s = msh_tensor_map_host(&m, host, MSH_CUDA, 0);
  CHECK(s != MSH_OK && m == NULL); /* ordinary memory (or no GPU, or no CUDA in the build) */
  if (n > 0) CHECK(s == MSH_EINVAL && strstr(msh_last_error(), "ordinary memory"));
  else CHECK(strlen(msh_last_error()) > 0);
  msh_tensor_free(host);
}

int main(void) {
  test_cpu_view();
  test_pool_buffer();
  test_refusals();
  return check_done("test_host_map");
}
