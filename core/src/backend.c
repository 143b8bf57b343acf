/* backend.c: the table of device backends built into this library, by device kind. The CPU
 * backend is always there; another backend (core/cuda) is compiled in only when the build has it
 * and registers itself when the library loads, so the neutral core names none of them. */
#include "internal.h"

enum { MSH_DEVICE_KINDS = 2 };

static const msh_backend *backends[MSH_DEVICE_KINDS] = {[MSH_CPU] = &msh_cpu_backend};

/* Called from a backend's load-time constructor (before main, one thread), never afterwards. */
void msh_backend_register(int device, const msh_backend *be) {
  if (device >= 0 && device < MSH_DEVICE_KINDS) backends[device] = be;
}

const msh_backend *msh_backend_find(int device) {
  return device >= 0 && device < MSH_DEVICE_KINDS ? backends[device] : NULL;
}

const msh_backend *msh_backend_for(int device) {
  const msh_backend *be = msh_backend_find(device);
  if (!be) MSH_FAIL(MSH_EUNSUPPORTED, "device kind %d is not available in this build", device);
  return be;
}

const msh_backend *msh_backend_pinner(void) {
  for (int k = 0; k < MSH_DEVICE_KINDS; k++)
    if (backends[k] && backends[k]->host_alloc) return backends[k];
  return NULL;
}

msh_status msh_backend_check_index(const msh_backend *be, int device_index) {
  int n = 0;
  msh_status s = be->device_count(&n);
  if (s != MSH_OK) return s;
  if (device_index < 0 || device_index >= n)
    return MSH_FAIL(MSH_EINVAL, "%s device %d does not exist (%d present)", be->name, device_index, n);
  return MSH_OK;
}

int msh_has_cuda(void) { return msh_backend_find(MSH_CUDA) != NULL; }

msh_status msh_device_count(int kind, int *out) {
  if (!out) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (kind < 0 || kind >= MSH_DEVICE_KINDS) return MSH_FAIL(MSH_EINVAL, "unknown device kind %d", kind);
  const msh_backend *be = msh_backend_find(kind);
  if (!be) { /* not built in: no such devices, which is not an error */
    *out = 0;
    return MSH_OK;
  }
  return be->device_count(out);
}

msh_status msh_device_sync(int kind, int device_index) {
  const msh_backend *be = msh_backend_for(kind);
  if (!be) return MSH_EUNSUPPORTED;
  return be->sync ? be->sync(device_index) : MSH_OK;
}

msh_status msh_device_mem_info(int kind, int device_index, uint64_t *free_bytes, uint64_t *total_bytes) {
  if (!free_bytes || !total_bytes) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  const msh_backend *be = msh_backend_for(kind);
  if (!be) return MSH_EUNSUPPORTED;
  if (!be->mem_info) return MSH_FAIL(MSH_EUNSUPPORTED, "the %s backend does not report memory", be->name);
  return be->mem_info(device_index, free_bytes, total_bytes);
}

msh_status msh_device_set_staging(int kind, int device_index, uint64_t chunk_bytes, int n_buffers) {
  const msh_backend *be = msh_backend_for(kind);
  if (!be) return MSH_EUNSUPPORTED;
  if (!be->set_staging) return MSH_FAIL(MSH_EUNSUPPORTED, "the %s backend has no staging buffers", be->name);
  return be->set_staging(device_index, chunk_bytes, n_buffers);
}

msh_status msh_device_staging_stats(int kind, int device_index, uint64_t *chunk_bytes, int *n_buffers,
                                    uint64_t *bytes, uint64_t *chunks) {
  const msh_backend *be = msh_backend_for(kind);
  if (!be) return MSH_EUNSUPPORTED;
  if (!be->staging_stats) return MSH_FAIL(MSH_EUNSUPPORTED, "the %s backend has no staging buffers", be->name);
  return be->staging_stats(device_index, chunk_bytes, n_buffers, bytes, chunks);
}
