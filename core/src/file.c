/* file.c: read-only memory maps of whole files, reference-counted. */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

struct msh_file {
  int refs;
  char *path;
  void *data;     /* NULL for an empty file */
  uint64_t size;
};

msh_status msh_file_open(msh_file **out, const char *path) {
  if (!out || !path) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int e = errno;
    return MSH_FAIL(e == ENOENT ? MSH_ENOENT : MSH_EIO, "cannot open '%s': %s", path, strerror(e));
  }
  struct stat sb;
  if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
    close(fd);
    return MSH_FAIL(MSH_EIO, "'%s' is not a regular file", path);
  }
  void *data = NULL;
  if (sb.st_size > 0) {
    data = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (data == MAP_FAILED) {
      int e = errno;
      close(fd);
      return MSH_FAIL(MSH_EIO, "cannot map '%s': %s", path, strerror(e));
    }
  }
  close(fd);
  msh_file *f = calloc(1, sizeof *f);
  char *p = strdup(path);
  if (!f || !p) {
    free(f);
    free(p);
    if (data) munmap(data, (size_t)sb.st_size);
    return MSH_FAIL(MSH_ENOMEM, "out of memory");
  }
  f->refs = 1;
  f->path = p;
  f->data = data;
  f->size = (uint64_t)sb.st_size;
  *out = f;
  return MSH_OK;
}

void msh_file_retain(msh_file *f) {
  if (f) f->refs++;
}

void msh_file_free(msh_file *f) {
  if (!f || --f->refs > 0) return;
  if (f->data) munmap(f->data, (size_t)f->size);
  free(f->path);
  free(f);
}

uint64_t msh_file_size(const msh_file *f) { return f ? f->size : 0; }
const void *msh_file_data(const msh_file *f) { return f ? f->data : NULL; }
const char *msh_file_path(const msh_file *f) { return f ? f->path : ""; }
