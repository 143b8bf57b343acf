/* gpu_helpers.h: tensors for the GPU tests: new tensors on either device and fresh random ones
 * (a new seed per call, never zeros). Failures are counted through check.h. */
#ifndef MSH_TEST_GPU_HELPERS_H
#define MSH_TEST_GPU_HELPERS_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>

#include "check.h"
#include "moonshard.h"

static uint64_t seed_counter = 0;
static inline uint64_t fresh_seed(void) { return 0x9e3779b9ULL + 7919ULL * ++seed_counter; }

static inline msh_tensor *dev_new(int device, int dtype, int ndim, const int64_t *shape) {
  msh_tensor *t = NULL;
  CHECK_OK(msh_tensor_new(&t, dtype, ndim, shape, device, 0));
  return t;
}

static inline msh_tensor *cpu_new(int dtype, int ndim, const int64_t *shape) {
  return dev_new(MSH_CPU, dtype, ndim, shape);
}

static inline msh_tensor *gpu_new(int dtype, int ndim, const int64_t *shape) {
  return dev_new(MSH_CUDA, dtype, ndim, shape);
}

/* Random normal values (std) on a device; the device generator gives the host generator's values. */
static inline msh_tensor *dev_randn(int device, int dtype, int ndim, const int64_t *shape, float std) {
  msh_tensor *t = dev_new(device, dtype, ndim, shape);
  if (t) CHECK_OK(msh_tensor_randn(t, fresh_seed(), 0.0f, std));
  return t;
}

static inline msh_tensor *cpu_randn(int dtype, int ndim, const int64_t *shape, float std) {
  return dev_randn(MSH_CPU, dtype, ndim, shape, std);
}

static inline msh_tensor *gpu_randn(int dtype, int ndim, const int64_t *shape, float std) {
  return dev_randn(MSH_CUDA, dtype, ndim, shape, std);
}

/* A contiguous copy of src (same dtype and shape) on device. */
static inline msh_tensor *copy_to(int device, const msh_tensor *src) {
  int64_t shape[MSH_MAX_DIMS];
  int nd = msh_tensor_ndim(src);
  for (int i = 0; i < nd; i++) shape[i] = msh_tensor_dim(src, i);
  msh_tensor *t = dev_new(device, msh_tensor_dtype(src), nd, shape);
  if (t) CHECK_OK(msh_tensor_copy(t, src));
  return t;
}

static inline msh_tensor *to_cpu(const msh_tensor *t) { return copy_to(MSH_CPU, t); }
static inline msh_tensor *to_gpu(const msh_tensor *t) { return copy_to(MSH_CUDA, t); }

static inline void free_all(msh_tensor **ts, int n) {
  for (int i = 0; i < n; i++) msh_tensor_free(ts[i]);
}

/* got against want (f32, either on either device): norm-wise relative error <= rtol, and every
 * element within rtol * (|want| + 4 * rms(want)); NaN never passes. */
static inline void compare_at(const char *what, const msh_tensor *got_t, const msh_tensor *want_t, double rtol,
                              const char *file, int line) {
  msh_tensor *got = to_cpu(got_t), *want = to_cpu(want_t);
  if (!got || !want) {
    msh_tensor_free(got);
    msh_tensor_free(want);
    return;
  }
  const float *g = msh_tensor_data(got), *w = msh_tensor_data(want);
  int64_t n = msh_tensor_numel(want);
  double ss = 0, es = 0, worst = 0;
  for (int64_t i = 0; i < n; i++) ss += (double)w[i] * w[i];
  double rms = n ? sqrt(ss / (double)n) : 0;
  int64_t bad = 0, first_bad = -1;
  for (int64_t i = 0; i < n; i++) {
    double d = fabs((double)g[i] - w[i]);
    if (isnan(g[i]) || isnan(w[i])) d = INFINITY;
    es += d * d;
    double lim = rtol * (fabs(w[i]) + 4 * rms) + 1e-30;
    if (d / lim > worst) worst = d / lim;
    if (!(d <= lim)) {
      if (first_bad < 0) first_bad = i;
      bad++;
    }
  }
  double rel = ss > 0 ? sqrt(es / ss) : sqrt(es);
  int ok = bad == 0 && rel <= rtol;
  char msg[512];
  snprintf(msg, sizeof msg, "%s: rel err %.3g (tol %.0e), %lld of %lld elements outside (first at %lld: got %g want %g)",
           what, rel, rtol, (long long)bad, (long long)n, (long long)first_bad, first_bad >= 0 ? g[first_bad] : 0.0,
           first_bad >= 0 ? w[first_bad] : 0.0);
  check_at(ok, msg, file, line);
  printf("  %-70s rel %.2e  worst/limit %.2f %s\n", what, rel, worst, ok ? "ok" : "FAIL");
  msh_tensor_free(got);
  msh_tensor_free(want);
}
#define COMPARE(what, got, want, rtol) compare_at((what), (got), (want), (rtol), __FILE__, __LINE__)

/* Tolerance of attention over a KV cache of dtype dt against the CPU op. The tensor-core forms
   round q and the softmax probabilities to the cache's 16-bit type for the MMAs: bf16 keeps 8
   significant bits (a rounding moves a value by up to 2^-9), f16 11; on random data the result's
   relative error measures about 2e-3 in bf16 and 8 times less in f16 (the ratio of their
   precisions: a wrong key or mask would show in f16 as much as in bf16). */
static inline double attn_tol(int dt) { return dt == MSH_F32 ? 1e-4 : dt == MSH_BF16 ? 1.6e-2 : 2e-3; }

#endif
