/* backend_stub.c: the one backend symbol tensor.c needs, for fuzz builds that leave out the CPU
 * backend (file-backed views never call into a backend). */
#include "internal.h"

const msh_backend msh_cpu_backend = {.name = "fuzz-stub"};
