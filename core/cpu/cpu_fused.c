/* cpu_fused.c: the fused layer ops on the CPU. They save launches on a device; here they are the
 * plain ops composed (the products dominate), with the same results as the unfused sequence. */
#include "cpu_internal.h"

#include <stdlib.h>
#include <string.h>

msh_status msh_cpu_matmul_acc(msh_tensor *out, const msh_tensor *x, const msh_tensor *w) {
  int64_t M = out->shape[0], N = out->shape[1], n = M * N;
  float *tmp = malloc((size_t)n * sizeof(float));
  if (!tmp) return MSH_FAIL(MSH_ENOMEM, "matmul_acc: out of memory for %lld products", (long long)n);
  int64_t shape[2] = {M, N};
  msh_tensor *t = NULL;
  msh_status s = msh_tensor_wrap(&t, tmp, MSH_F32, 2, shape);
  if (s == MSH_OK) s = msh_cpu_matmul(t, x, w);
  if (s == MSH_OK) {
    float *o = msh_tensor_ptr(out);
    for (int64_t i = 0; i < n; i++) o[i] += tmp[i];
  }
  msh_tensor_free(t);
  free(tmp);
  return s;
}

msh_status msh_cpu_matmul_glu(msh_tensor *out, const msh_tensor *x, const msh_tensor *w, msh_tensor *scratch) {
  int64_t M = out->shape[0], F = out->shape[1];
  msh_tensor gu = msh_rows_view(scratch, M, 2 * F);
  msh_status s = msh_cpu_matmul(&gu, x, w);
  if (s != MSH_OK) return s;
  const float *g = msh_tensor_ptr(&gu);
  float *o = msh_tensor_ptr(out);
  for (int64_t m = 0; m < M; m++) {
    const float *gr = g + m * 2 * F, *ur = gr + F;
    float *orow = o + m * F;
    for (int64_t f = 0; f < F; f++) orow[f] = gr[f] / (1.0f + expf(-gr[f])) * ur[f];
  }
  return MSH_OK;
}

msh_status msh_cpu_qkv_rope(msh_tensor *q_out, msh_tensor *k_cache, msh_tensor *v_cache, const msh_tensor *qkv,
                            const msh_tensor *pos, const msh_tensor *inv_freq, int style) {
  int64_t R = q_out->shape[0], H = q_out->shape[1], hd = q_out->shape[2], n = inv_freq->shape[0];
  int nd = k_cache->ndim;
  int64_t KVH = k_cache->shape[nd - 2], S = k_cache->shape[nd - 3];
  int64_t B = nd == 4 ? k_cache->shape[0] : 1, T = R / B;
  const int32_t *pp = msh_tensor_ptr(pos);
  for (int64_t r = 0; r < R; r++)
    if (pp[r] < 0 || pp[r] >= S)
      return MSH_FAIL(MSH_ERANGE, "qkv_rope: position %d of row %lld outside the cache's [0, %lld)", pp[r],
                      (long long)r, (long long)S);
  int64_t nq = H * hd, nk = KVH * hd;
  float *kt = malloc((size_t)nk * sizeof(float));
  if (!kt) return MSH_FAIL(MSH_ENOMEM, "qkv_rope: out of memory");
  const float *src = msh_tensor_ptr(qkv), *f = msh_tensor_ptr(inv_freq);
  float *q = msh_tensor_ptr(q_out);
  char *kb = msh_tensor_ptr(k_cache), *vb = msh_tensor_ptr(v_cache);
  size_t es = msh_dtype_size(k_cache->dtype);
  for (int64_t r = 0; r < R; r++) {
    const float *row = src + r * (nq + 2 * nk);
    memcpy(q + r * nq, row, (size_t)nq * sizeof(float));
    msh_cpu_rope_rows(q + r * nq, pp + r, f, H, hd, n, style, 0, 1);
    memcpy(kt, row + nq, (size_t)nk * sizeof(float));
    msh_cpu_rope_rows(kt, pp + r, f, KVH, hd, n, style, 0, 1);
    int64_t b = r / T;
    int64_t ka = nd == 4 ? b * k_cache->stride[0] + pp[r] * k_cache->stride[1] : pp[r] * k_cache->stride[0];
    int64_t va = nd == 4 ? b * v_cache->stride[0] + pp[r] * v_cache->stride[1] : pp[r] * v_cache->stride[0];
    msh_cpu_convert(kb + ka * (int64_t)es, k_cache->dtype, kt, MSH_F32, nk);
    msh_cpu_convert(vb + va * (int64_t)es, v_cache->dtype, row + nq + nk, MSH_F32, nk);
  }
  free(kt);
  return MSH_OK;
}
