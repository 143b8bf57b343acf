/* test_cuda_device.c: device-side random fill equals the host generator; synchronize and memory
 * info. Exit 77 (skipped) without a CUDA device. */
#include "check.h"

int main(void) {
  int n = 0;
  if (msh_device_count(MSH_CUDA, &n) != MSH_OK || n == 0) {
    printf("test_cuda_device: no CUDA device, skipped\n");
    return 77;
  }
  int64_t shape[2] = {37, 129};
  int dts[3] = {MSH_F32, MSH_F16, MSH_BF16};
  for (int i = 0; i < 3; i++) {
    msh_tensor *g = NULL, *h = NULL, *back = NULL;
    CHECK_OK(msh_tensor_new(&g, dts[i], 2, shape, MSH_CUDA, 0));
    CHECK_OK(msh_tensor_new(&h, dts[i], 2, shape, MSH_CPU, 0));
    CHECK_OK(msh_tensor_new(&back, MSH_F32, 2, shape, MSH_CPU, 0));
    CHECK_OK(msh_tensor_randn(g, 11, 0.5f, 0.02f));
    CHECK_OK(msh_tensor_randn(h, 11, 0.5f, 0.02f));
    CHECK_OK(msh_tensor_copy(back, g));
    msh_tensor *hf = NULL;
    CHECK_OK(msh_tensor_contiguous(&hf, h, MSH_F32));
    const float *a = msh_tensor_data(back), *b = msh_tensor_data(hf);
    int bad = 0, nonzero = 0;
    double tol = dts[i] == MSH_F32 ? 1e-6 : 4e-3;
    for (int64_t j = 0; j < 37 * 129; j++) {
      if (!close_enough(a[j], b[j], tol, 1e-7)) bad++;
      if (a[j] != 0.5f) nonzero++;
    }
    CHECK(bad == 0);
    CHECK(nonzero > 37 * 129 / 2);
    msh_tensor_free(hf);
    msh_tensor_free(back);
    msh_tensor_free(h);
    msh_tensor_free(g);
  }
  CHECK_OK(msh_device_sync(MSH_CUDA, 0));
  CHECK_OK(msh_device_sync(MSH_CPU, 0));
  uint64_t f = 0, t = 0;
  CHECK_OK(msh_device_mem_info(MSH_CUDA, 0, &f, &t));
  CHECK(t > 0 && f <= t);
  CHECK_STATUS(msh_device_mem_info(MSH_CPU, 0, &f, &t), MSH_EUNSUPPORTED);
  return check_done("test_cuda_device");
}
