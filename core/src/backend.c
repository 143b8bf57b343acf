/* backend.c: the table of device backends, by device kind. The CPU backend is always there. The
 * CUDA backend lives in a module of its own (libmoonshard_cuda.so: core/cuda, kernels/, cuBLAS,
 * cudart, NCCL) that this file dlopen()s on the first use of a CUDA device, so a CPU-only process
 * never maps the CUDA libraries and the neutral core names none of them. Where the module is
 * missing or cannot load (no CUDA libraries, another build's module), CUDA is unavailable: no
 * devices, and the reason in the error of whatever asked for one. */
#define _GNU_SOURCE /* dladdr */
#include "internal.h"
#ifdef MSH_WITH_NCCL
#include "comm_internal.h"
#endif

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum { MSH_DEVICE_KINDS = 2 };

static const msh_backend *backends[MSH_DEVICE_KINDS] = {[MSH_CPU] = &msh_cpu_backend};
static msh_backend_module cuda_module;       /* what the CUDA module registered */
static char cuda_refused[256];               /* why msh_backend_register refused it, or "" */

/* ------------------------------------------------------------------------ the CUDA module */

#ifndef MSH_CUDA_MODULE_NAME
#define MSH_CUDA_MODULE_NAME "libmoonshard_cuda.so"
#endif

static pthread_once_t cuda_once = PTHREAD_ONCE_INIT;
static char cuda_why[1024]; /* why CUDA is unavailable, "" when the module is loaded */

void msh_backend_register(const msh_backend_module *m) {
  if (!m || m->device != MSH_CUDA || !m->backend) return;
  if (m->abi != MSH_BACKEND_ABI || m->vt_bytes != sizeof(msh_backend)) {
    snprintf(cuda_refused, sizeof cuda_refused,
             "it was built for another version of libmoonshard (backend ABI %d, %zu-byte vtable; this one "
             "wants %d, %zu)", m->abi, m->vt_bytes, (int)MSH_BACKEND_ABI, sizeof(msh_backend));
    return;
  }
  cuda_module = *m;
  backends[MSH_CUDA] = m->backend;
}

/* Tries one path; 1 when the module loaded and registered, 0 with cuda_why filled. */
static int try_module(const char *path) {
  void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    const char *e = dlerror();
    snprintf(cuda_why, sizeof cuda_why, "the CUDA module could not be loaded: %.900s", e ? e : path);
    return 0;
  }
  if (backends[MSH_CUDA]) return 1; /* its constructor registered it; the handle stays open */
  snprintf(cuda_why, sizeof cuda_why, "the CUDA module %.600s was refused: %s", path,
           cuda_refused[0] ? cuda_refused : "it registered no CUDA backend");
  dlclose(h);
  return 0;
}

/* The module's path beside the library holding this code (dladdr), into buf; 0 when unknown. */
static int beside_core(char *buf, size_t cap) {
  Dl_info info;
  if (!dladdr((void *)&msh_backend_register, &info) || !info.dli_fname) return 0;
  const char *slash = strrchr(info.dli_fname, '/');
  int dir = slash ? (int)(slash - info.dli_fname) : 0;
  int n = slash ? snprintf(buf, cap, "%.*s/%s", dir, info.dli_fname, MSH_CUDA_MODULE_NAME)
                : snprintf(buf, cap, "%s", MSH_CUDA_MODULE_NAME);
  return n > 0 && (size_t)n < cap;
}

/* Loads the module once: $MOONSHARD_CUDA_MODULE when set (that path only), else the module beside
 * libmoonshard, else the one in the build directory (MSH_CUDA_MODULE_DIR, the build that made
 * this library). A module linked into the program (GPU tests, benchmarks) registered itself
 * before main and needs no loading. */
static void load_cuda(void) {
  if (backends[MSH_CUDA]) return;
  const char *env = getenv("MOONSHARD_CUDA_MODULE");
  if (env && *env) {
    (void)try_module(env);
    return;
  }
  char path[4096];
  if (beside_core(path, sizeof path) && access(path, F_OK) == 0) {
    (void)try_module(path);
    return;
  }
#ifdef MSH_CUDA_MODULE_DIR
  snprintf(path, sizeof path, "%s/%s", MSH_CUDA_MODULE_DIR, MSH_CUDA_MODULE_NAME);
  if (access(path, F_OK) == 0) {
    (void)try_module(path);
    return;
  }
  snprintf(cuda_why, sizeof cuda_why, "no CUDA module: %s is neither beside libmoonshard nor in %s (set "
           "MOONSHARD_CUDA_MODULE to its path)", MSH_CUDA_MODULE_NAME, MSH_CUDA_MODULE_DIR);
#else
  snprintf(cuda_why, sizeof cuda_why, "this build of moonshard has no CUDA backend (no %s beside libmoonshard; "
           "MOONSHARD_CUDA_MODULE names one)", MSH_CUDA_MODULE_NAME);
#endif
}

/* ---------------------------------------------------------------------------- lookup */

const msh_backend *msh_backend_find(int device) {
  if (device < 0 || device >= MSH_DEVICE_KINDS) return NULL;
  if (device == MSH_CUDA) pthread_once(&cuda_once, load_cuda);
  return backends[device];
}

const msh_backend *msh_backend_for(int device) {
  const msh_backend *be = msh_backend_find(device);
  if (be) return be;
  if (device == MSH_CUDA) MSH_FAIL(MSH_EUNSUPPORTED, "CUDA is not available: %s", cuda_why);
  else MSH_FAIL(MSH_EUNSUPPORTED, "device kind %d is not available in this build", device);
  return NULL;
}

const msh_backend *msh_backend_pinner(void) {
  for (int k = 0; k < MSH_DEVICE_KINDS; k++) {
    const msh_backend *be = msh_backend_find(k);
    if (be && be->host_alloc) return be;
  }
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

/* Loads the CUDA module when it is not loaded yet. 0 leaves why (the loader's message, dlerror's
 * text) as the thread's last error, for a caller that reports it. */
int msh_has_cuda(void) { return msh_backend_for(MSH_CUDA) != NULL; }

msh_status msh_device_count(int kind, int *out) {
  if (!out) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (kind < 0 || kind >= MSH_DEVICE_KINDS) return MSH_FAIL(MSH_EINVAL, "unknown device kind %d", kind);
  const msh_backend *be = msh_backend_find(kind);
  if (!be) { /* not built in or not loadable: no such devices, which is not an error */
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

/* ------------------------------------------------------------------------------- NCCL */

#ifdef MSH_WITH_NCCL
/* comm.c's NCCL engine, forwarded to the CUDA module (arguments checked there). */
static msh_status nccl_available(void) {
  if (!msh_backend_for(MSH_CUDA)) return MSH_EUNSUPPORTED;
  if (!cuda_module.nccl_unique_id || !cuda_module.nccl_comm_new)
    return MSH_FAIL(MSH_EUNSUPPORTED, "the CUDA module was built without NCCL");
  return MSH_OK;
}

msh_status msh_nccl_get_unique_id(uint8_t *id) {
  msh_status s = nccl_available();
  return s == MSH_OK ? cuda_module.nccl_unique_id(id) : s;
}

msh_status msh_nccl_comm_new(msh_comm **out, int rank, int world, const uint8_t *id, int device_index) {
  msh_status s = nccl_available();
  return s == MSH_OK ? cuda_module.nccl_comm_new(out, rank, world, id, device_index) : s;
}
#endif
