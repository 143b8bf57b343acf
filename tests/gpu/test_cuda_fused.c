/* test_cuda_fused.c: the fused layer ops on CUDA (the GEMV epilogues, the cuBLAS paths and the
 * qkv_rope kernel) against the unfused ops composed on the CPU (fused_cases.h); a position past
 * the cache writes no cache row. Exits 77 (skipped) when there is no CUDA device. */
#include "fused_cases.h"

static void test_out_of_range(void) {
  int64_t qs[2] = {1, (4 + 2) * 8}, q3[3] = {1, 4, 8}, cs[3] = {4, 1, 8}, ps[1] = {1}, fs[1] = {4};
  msh_tensor *qkv = gpu_randn(MSH_F32, 2, qs, 1), *q = gpu_new(MSH_F32, 3, q3);
  msh_tensor *kc = gpu_randn(MSH_BF16, 3, cs, 1), *vc = gpu_randn(MSH_BF16, 3, cs, 1);
  msh_tensor *hpos = cpu_new(MSH_I32, 1, ps), *inv = gpu_randn(MSH_F32, 1, fs, 1);
  *(int32_t *)msh_tensor_data(hpos) = 4;
  msh_tensor *pos = to_gpu(hpos), *k0 = as_f32(kc);
  CHECK_OK(msh_op_qkv_rope(q, kc, vc, qkv, pos, inv, MSH_ROPE_INTERLEAVED));
  msh_tensor *k1 = as_f32(kc);
  COMPARE("qkv_rope at a position past the cache leaves the cache alone", k1, k0, 0);
  msh_tensor *ts[] = {qkv, q, kc, vc, hpos, inv, pos, k0, k1};
  free_all(ts, 9);
}

int main(void) {
  int n = 0;
  if (msh_device_count(MSH_CUDA, &n) != MSH_OK || n < 1) {
    printf("test_cuda_fused: no CUDA device, skipped\n");
    return 77;
  }
  fused_all_cases(MSH_CUDA);
  test_out_of_range();
  return check_done("test_cuda_fused");
}
