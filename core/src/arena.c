/* arena.c: bump allocation of tensors from one block of host or device memory. */
#include "internal.h"

#include <stdlib.h>

struct msh_arena {
  msh_storage *st; /* the block; tensors made here hold references to it */
  uint64_t used;
};

msh_status msh_arena_new(msh_arena **out, int device, int device_index, uint64_t capacity) {
  if (!out) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  const msh_backend *be = msh_backend_for(device);
  if (!be) return MSH_EUNSUPPORTED;
  msh_arena *a = calloc(1, sizeof *a);
  msh_storage *st = calloc(1, sizeof *st);
  if (!a || !st) {
    free(a);
    free(st);
    return MSH_FAIL(MSH_ENOMEM, "out of memory");
  }
  msh_status s = be->alloc(device_index, capacity ? capacity : 64, &st->base);
  if (s != MSH_OK) {
    free(a);
    free(st);
    return s;
  }
  st->refs = 1;
  st->device = device;
  st->device_index = device_index;
  st->bytes = capacity;
  st->owned = 1;
  a->st = st;
  *out = a;
  return MSH_OK;
}

void msh_storage_release(msh_storage *st);

void msh_arena_free(msh_arena *a) {
  if (!a) return;
  msh_storage_release(a->st);
  free(a);
}

uint64_t msh_arena_used(const msh_arena *a) { return a ? a->used : 0; }
uint64_t msh_arena_capacity(const msh_arena *a) { return a ? a->st->bytes : 0; }
void msh_arena_reset(msh_arena *a) {
  if (a) a->used = 0;
}

msh_status msh_tensor_new_arena(msh_tensor **out, msh_arena *a, int dtype, int ndim,
                                const int64_t *shape) {
  if (!out || !a || (ndim > 0 && !shape)) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  uint64_t bb = (uint64_t)msh_dt_block_bytes(dtype), be = (uint64_t)msh_dt_block_elems(dtype);
  if (!bb) return MSH_FAIL(MSH_EINVAL, "unknown dtype %d", dtype);
  if (ndim < 0 || ndim > MSH_MAX_DIMS) return MSH_FAIL(MSH_EINVAL, "bad ndim %d", ndim);
  uint64_t n = 1;
  for (int i = 0; i < ndim; i++) {
    if (shape[i] < 0) return MSH_FAIL(MSH_EINVAL, "negative dim %d", i);
    n *= (uint64_t)shape[i];
  }
  /* 64-byte aligned, at a whole number of blocks (elements) from the arena's base */
  uint64_t unit = 64;
  while (unit % bb) unit += 64;
  uint64_t start = (a->used + unit - 1) / unit * unit;
  uint64_t bytes = (uint64_t)msh_dtype_bytes(dtype, (int64_t)n);
  if (start + bytes > a->st->bytes)
    return MSH_FAIL(MSH_ERANGE, "arena full: %llu bytes asked, %llu of %llu left",
                    (unsigned long long)bytes, (unsigned long long)(a->st->bytes - a->used),
                    (unsigned long long)a->st->bytes);
  msh_status s = msh_tensor_make(out, a->st, dtype, ndim, shape, NULL, (int64_t)(start / bb * be));
  if (s == MSH_OK) a->used = start + bytes;
  return s;
}
