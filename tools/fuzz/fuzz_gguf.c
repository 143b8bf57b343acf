/* fuzz_gguf.c: libFuzzer target for the GGUF reader (msh_gguf_open and every accessor).
 *
 * Each input is written to a memfd and opened by path. A failure must say why; a file that opens
 * must answer every accessor consistently: names find their own index, every metadata value and
 * array element reads (or fails cleanly), and every tensor moonshard loads is read in full.
 * Build and run (needs clang; this target brings its own CPU allocator, so backend_stub.c is built
 * with -DMSH_FUZZ_OWN_CPU and gives only the backend table):
 *   clang -std=gnu11 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
 *     -Icore/include -Icore/src -DMSH_VERSION='"fuzz"' -DMSH_FUZZ_OWN_CPU -o build-fuzz/fuzz_gguf \
 *     tools/fuzz/fuzz_gguf.c core/src/gguf.c core/src/status.c core/src/dtype.c core/src/file.c \
 *     core/src/tensor.c tools/fuzz/backend_stub.c -lm
 *   mkdir -p build-fuzz/corpus_gguf && cp tests/fixtures/gguf/synth.gguf build-fuzz/corpus_gguf/
 *   build-fuzz/fuzz_gguf -max_total_time=60 -max_len=8192 -dict=tools/fuzz/gguf.dict build-fuzz/corpus_gguf
 */
#define _GNU_SOURCE
#include "internal.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* ------------------------------------------------ the CPU memory dequantization needs */

static msh_status fuzz_alloc(int device_index, uint64_t bytes, void **out) {
  (void)device_index;
  *out = calloc(1, (size_t)bytes);
  return *out ? MSH_OK : MSH_FAIL(MSH_ENOMEM, "out of memory");
}

static void fuzz_release(int device_index, void *p) {
  (void)device_index;
  free(p);
}

const msh_backend msh_cpu_backend = {.name = "fuzz-cpu", .alloc = fuzz_alloc, .release = fuzz_release};

/* -------------------------------------------------------------------------------- target */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static volatile double sink;

static void read_tensor(const msh_tensor *t) {
  int dt = msh_tensor_dtype(t);
  const uint8_t *p = msh_tensor_data(t);
  /* every byte of its elements (whole blocks for the block-quantized dtypes) */
  size_t bytes = (size_t)(msh_tensor_numel(t) / msh_dtype_block_elems(dt)) * msh_dtype_block_bytes(dt);
  double s = 0;
  for (size_t i = 0; i < bytes; i++) s += p[i];
  sink = s;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static int fd = -1;
  if (fd < 0) fd = memfd_create("fuzz_gguf", 0);
  if (fd < 0 || ftruncate(fd, 0) != 0 || pwrite(fd, data, size, 0) != (ssize_t)size) return 0;
  char path[64];
  snprintf(path, sizeof path, "/proc/self/fd/%d", fd);

  msh_gguf *g = NULL;
  msh_clear_error();
  msh_status st = msh_gguf_open(&g, path);
  if (st != MSH_OK) {
    if (!msh_last_error()[0] || g) __builtin_trap(); /* every failure says why, leaves nothing */
    if (st != MSH_EFORMAT && st != MSH_EUNSUPPORTED) __builtin_trap();
    return 0;
  }
  uint32_t a = msh_gguf_alignment(g);
  if (!a || (a & (a - 1))) __builtin_trap();
  for (int k = 0; k < msh_gguf_key_count(g); k++) {
    const char *name = msh_gguf_key_name(g, k);
    int idx = -1, et = -1;
    if (!name || msh_gguf_find_key(g, name, &idx) != MSH_OK || idx != k) __builtin_trap();
    int type = msh_gguf_key_type(g, k);
    if (type < 0 || type > MSH_GGUF_F64) __builtin_trap();
    int64_t v;
    double d;
    const char *s;
    size_t len;
    uint64_t n = 0;
    msh_gguf_get_int(g, k, &v);
    msh_gguf_get_float(g, k, &d);
    if (msh_gguf_get_string(g, k, &s, &len) == MSH_OK && len) sink = s[0] + s[len - 1];
    if (msh_gguf_get_array(g, k, &et, &n) != MSH_OK) continue;
    if (et < 0 || et > MSH_GGUF_F64 || et == MSH_GGUF_ARRAY) __builtin_trap();
    for (uint64_t j = 0; j < n && j < 4096; j++) {
      msh_gguf_array_int(g, k, j, &v);
      msh_gguf_array_float(g, k, j, &d);
      if (msh_gguf_array_string(g, k, j, &s, &len) == MSH_OK && len) sink = s[0] + s[len - 1];
    }
    if (n && msh_gguf_array_int(g, k, n, &v) != MSH_ERANGE) __builtin_trap();
  }
  uint64_t fsize = msh_file_size(msh_gguf_file(g));
  for (int i = 0; i < msh_gguf_tensor_count(g); i++) {
    const char *name = msh_gguf_tensor_name(g, i);
    int idx = -1, type, ndim;
    int64_t shape[4];
    uint64_t off, nbytes;
    if (!name || msh_gguf_find_tensor(g, name, &idx) != MSH_OK || idx != i) __builtin_trap();
    if (msh_gguf_tensor_info(g, i, &type, &ndim, shape, &off, &nbytes) != MSH_OK) __builtin_trap();
    if (ndim < 0 || ndim > 4 || off > fsize || nbytes > fsize - off || off % a) __builtin_trap();
    msh_tensor *t = NULL;
    if (msh_gguf_tensor(g, i, &t) == MSH_OK) read_tensor(t);
    msh_tensor_free(t);
  }
  msh_gguf_free(g);
  return 0;
}
