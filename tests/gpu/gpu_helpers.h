/* gpu_helpers.h: tensors for the GPU tests: new tensors on either device and fresh random ones
 * (a new seed per call, never zeros). Failures are counted through check.h. */
#ifndef MSH_TEST_GPU_HELPERS_H
#define MSH_TEST_GPU_HELPERS_H

#include <stdint.h>

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

#endif
