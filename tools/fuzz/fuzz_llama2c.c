/* fuzz_llama2c.c: libFuzzer target for the llama2.c checkpoint header (msh_llama2c_header).
 *
 * Each input is written to a memfd and opened by path. A header that is accepted must describe a
 * model whose fields are positive, whose heads divide the width and whose KV heads divide the
 * heads; a refused one must say why.
 * Build and run: tools/fuzz/run.sh [seconds] llama2c (needs clang).
 */
#define _GNU_SOURCE
#include "internal.h"

#include <stdint.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static int fd = -1;
  if (fd < 0) fd = memfd_create("fuzz_llama2c", 0);
  if (fd < 0 || ftruncate(fd, 0) != 0 || pwrite(fd, data, size, 0) != (ssize_t)size) return 0;
  char path[64];
  snprintf(path, sizeof path, "/proc/self/fd/%d", fd);

  msh_file *f = NULL;
  if (msh_file_open(&f, path) != MSH_OK) return 0; /* an empty input cannot be mapped */
  int32_t cfg[7];
  int shared = -1;
  if (msh_llama2c_header(f, cfg, &shared) != MSH_OK) {
    if (!msh_last_error()[0]) __builtin_trap(); /* every failure says why */
  } else {
    for (int i = 0; i < 7; i++)
      if (cfg[i] <= 0) __builtin_trap();
    if (cfg[0] % cfg[3] != 0 || cfg[3] % cfg[4] != 0) __builtin_trap();
    if (shared != 0 && shared != 1) __builtin_trap();
  }
  msh_file_free(f);
  return 0;
}
