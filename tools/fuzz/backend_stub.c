/* backend_stub.c: the backend table (and its device-index check) for fuzz builds that leave out
 * backend.c and the CPU backend (file-backed views never call into a backend): CPU only, no CUDA
 * module. A target that brings its own CPU allocator (fuzz_gguf.c) is built with
 * -DMSH_FUZZ_OWN_CPU. */
#include "internal.h"

#ifndef MSH_FUZZ_OWN_CPU
const msh_backend msh_cpu_backend = {.name = "fuzz-stub"};
#endif

const msh_backend *msh_backend_find(int device) { return device == MSH_CPU ? &msh_cpu_backend : NULL; }
const msh_backend *msh_backend_for(int device) { return msh_backend_find(device); }
const msh_backend *msh_backend_pinner(void) { return NULL; }
msh_status msh_backend_check_index(const msh_backend *be, int device_index) {
  if (be == &msh_cpu_backend && device_index == 0) return MSH_OK;
  return MSH_FAIL(MSH_EINVAL, "device %d does not exist in a fuzz build", device_index);
}
