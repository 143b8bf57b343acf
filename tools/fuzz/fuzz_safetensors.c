/* fuzz_safetensors.c: libFuzzer target for the safetensors header parser (msh_safetensors_open).
 *
 * Each input is written to a memfd and opened by path; a file that opens must describe only
 * tensors whose views lie inside the mapping, and every view is read in full.
 * Build and run: tools/fuzz/run.sh [seconds] (needs clang).
 */
#define _GNU_SOURCE
#include "internal.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static volatile uint8_t sink;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static int fd = -1;
  if (fd < 0) fd = memfd_create("fuzz_safetensors", 0);
  if (fd < 0 || ftruncate(fd, 0) != 0 || pwrite(fd, data, size, 0) != (ssize_t)size) return 0;
  char path[64];
  snprintf(path, sizeof path, "/proc/self/fd/%d", fd);

  msh_safetensors *st = NULL;
  if (msh_safetensors_open(&st, path) != MSH_OK) {
    if (!msh_last_error()[0]) __builtin_trap(); /* every failure says why */
    return 0;
  }
  int n = msh_safetensors_count(st);
  for (int i = 0; i < n; i++) {
    int dtype, ndim, idx = -1;
    int64_t shape[MSH_MAX_DIMS];
    const char *name = msh_safetensors_name(st, i);
    if (!name || msh_safetensors_find(st, name, &idx) != MSH_OK || idx != i) __builtin_trap();
    if (msh_safetensors_info(st, i, &dtype, &ndim, shape) != MSH_OK) __builtin_trap();
    msh_tensor *t = NULL;
    msh_status s = msh_safetensors_tensor(st, i, &t);
    if (dtype < 0) {
      if (s != MSH_EUNSUPPORTED) __builtin_trap();
      continue;
    }
    if (s != MSH_OK) __builtin_trap();
    /* the view lies inside the mapped file */
    const uint8_t *base = msh_file_data(t->st->file);
    const uint8_t *p = msh_tensor_data(t);
    uint64_t bytes = (uint64_t)msh_tensor_numel(t) * msh_dtype_size(dtype);
    if (bytes && (p < base || (uint64_t)(p - base) + bytes > msh_file_size(t->st->file)))
      __builtin_trap();
    for (uint64_t k = 0; k < bytes; k++) sink ^= p[k];
    msh_tensor_free(t);
  }
  msh_safetensors_free(st);
  return 0;
}
