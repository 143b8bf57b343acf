/* test_cuda_staging.c: host-to-device copies of mapped files through the pinned staging buffers:
 * bytes equal after a round trip for odd sizes, odd offsets and sizes that are not chunk
 * multiples (small chunks, so that a few KiB cross many of them), slices of rows, conversions on
 * the device equal to the host's, the ring at its default sizes, and the settings' checks.
 * Exit 77 (skipped) without a CUDA device. */
#define _POSIX_C_SOURCE 200809L

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"

static uint64_t rng = 0x243f6a8885a308d3ULL;
static uint32_t next_u32(void) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return (uint32_t)(rng >> 11);
}

/* A temporary file of n random bytes, then finite floats in [floats_from, halves_from), then
 * finite f16 values (finite read as bf16 too) from halves_from on. */
static char *write_file(size_t n, size_t floats_from, size_t halves_from) {
  static char path[64];
  snprintf(path, sizeof path, "/tmp/msh_staging_%d_XXXXXX", (int)getpid());
  int fd = mkstemp(path);
  if (fd < 0) return NULL;
  unsigned char *b = malloc(n);
  for (size_t i = 0; i < n; i++) b[i] = (unsigned char)next_u32();
  for (size_t i = floats_from; i + 4 <= halves_from; i += 4) {
    float f = ((float)(next_u32() % 2000001) - 1e6f) * 1e-4f; /* finite, in [-100, 100] */
    memcpy(b + i, &f, 4);
  }
  for (size_t i = halves_from; i + 2 <= n; i += 2) {
    uint16_t h = msh_f32_to_f16(((float)(next_u32() % 2000001) - 1e6f) * 1e-4f);
    memcpy(b + i, &h, 2);
  }
  size_t done = 0;
  while (done < n) {
    ssize_t w = write(fd, b + done, n - done);
    if (w <= 0) break;
    done += (size_t)w;
  }
  close(fd);
  free(b);
  return done == n ? path : NULL;
}

static uint64_t staged_bytes(void) {
  uint64_t bytes = 0;
  CHECK_OK(msh_device_staging_stats(MSH_CUDA, 0, NULL, NULL, &bytes, NULL));
  return bytes;
}

/* File bytes [off, off + n) as an i8 tensor to the device and back: equal bytes. */
static void round_trip_bytes(msh_file *f, uint64_t off, int64_t n) {
  msh_tensor *src = NULL, *dev = NULL, *back = NULL;
  CHECK_OK(msh_tensor_from_file(&src, f, off, MSH_I8, 1, &n));
  CHECK_OK(msh_tensor_new(&dev, MSH_I8, 1, &n, MSH_CUDA, 0));
  CHECK_OK(msh_tensor_new(&back, MSH_I8, 1, &n, MSH_CPU, 0));
  uint64_t before = staged_bytes();
  CHECK_OK(msh_tensor_copy(dev, src));
  CHECK(staged_bytes() - before == (uint64_t)n); /* it went through the staging buffers */
  CHECK_OK(msh_tensor_copy(back, dev));
  if (memcmp(msh_tensor_data(back), (const char *)msh_file_data(f) + off, (size_t)n) != 0) {
    fprintf(stderr, "  bytes differ: %lld bytes at offset %llu\n", (long long)n, (unsigned long long)off);
    CHECK(0);
  }
  msh_tensor_free(back);
  msh_tensor_free(dev);
  msh_tensor_free(src);
}

/* src (CPU, any layout the file gives) -> device dtype dt -> CPU f32, against the host's own
 * conversion to dt (then f32): bit-identical (both round to nearest even). */
static void convert_matches_host(const msh_tensor *src, int dt) {
  int nd = msh_tensor_ndim(src);
  int64_t shape[MSH_MAX_DIMS];
  for (int i = 0; i < nd; i++) shape[i] = msh_tensor_dim(src, i);
  msh_tensor *dev = NULL, *host = NULL, *a = NULL, *b = NULL;
  CHECK_OK(msh_tensor_new(&dev, dt, nd, shape, MSH_CUDA, 0));
  CHECK_OK(msh_tensor_new(&host, dt, nd, shape, MSH_CPU, 0));
  CHECK_OK(msh_tensor_new(&a, MSH_F32, nd, shape, MSH_CPU, 0));
  CHECK_OK(msh_tensor_new(&b, MSH_F32, nd, shape, MSH_CPU, 0));
  uint64_t before = staged_bytes();
  CHECK_OK(msh_tensor_copy(dev, src));
  CHECK(staged_bytes() - before == (uint64_t)msh_tensor_numel(src) * msh_dtype_size(msh_tensor_dtype(src)));
  CHECK_OK(msh_tensor_copy(host, src));
  CHECK_OK(msh_tensor_copy(a, dev));
  CHECK_OK(msh_tensor_copy(b, host));
  int64_t n = msh_tensor_numel(src), bad = 0;
  const uint32_t *pa = msh_tensor_data(a), *pb = msh_tensor_data(b);
  for (int64_t i = 0; i < n; i++) bad += pa[i] != pb[i];
  if (bad) fprintf(stderr, "  %lld of %lld values differ (%s -> %s)\n", (long long)bad, (long long)n,
                   msh_dtype_name(msh_tensor_dtype(src)), msh_dtype_name(dt));
  CHECK(bad == 0);
  msh_tensor_free(b);
  msh_tensor_free(a);
  msh_tensor_free(host);
  msh_tensor_free(dev);
}

int main(void) {
  int count = 0;
  if (msh_device_count(MSH_CUDA, &count) != MSH_OK || count == 0) {
    printf("test_cuda_staging: no CUDA device, skipped\n");
    return 77;
  }
  /* settings */
  CHECK_STATUS(msh_device_set_staging(MSH_CPU, 0, 0, 0), MSH_EUNSUPPORTED);
  CHECK_STATUS(msh_device_set_staging(MSH_CUDA, 0, 1 << 20, 1), MSH_EINVAL);
  CHECK_STATUS(msh_device_set_staging(MSH_CUDA, 0, 100, 3), MSH_EINVAL);
  CHECK_STATUS(msh_device_set_staging(MSH_CUDA, count, 0, 0), MSH_EINVAL);
  uint64_t chunk = 0;
  int nbuf = 0;

  const size_t file_bytes = (size_t)3 << 20, floats_from = 4096, halves_from = (size_t)2 << 20;
  char *path = write_file(file_bytes, floats_from, halves_from);
  CHECK(path != NULL);
  if (!path) return check_done("test_cuda_staging");
  msh_file *f = NULL;
  CHECK_OK(msh_file_open(&f, path));

  /* small chunks (rounded up to 64 bytes: 5056), two buffers: a few KiB cross many chunks */
  CHECK_OK(msh_device_set_staging(MSH_CUDA, 0, 5000, 2));
  CHECK_OK(msh_device_staging_stats(MSH_CUDA, 0, &chunk, &nbuf, NULL, NULL));
  CHECK(chunk == 5056 && nbuf == 2);
  static const int64_t sizes[] = {1, 3, 63, 64, 4095, 5055, 5056, 5057, 2 * 5056, 3 * 5056 + 1, 100003, 1 << 20};
  static const uint64_t offsets[] = {0, 1, 7, 4099};
  for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
    for (size_t j = 0; j < sizeof offsets / sizeof offsets[0]; j++) round_trip_bytes(f, offsets[j], sizes[i]);

  /* conversions on the device: f32 -> bf16 / f16, f16 -> bf16 / f32, bf16 -> f32, odd counts */
  for (int k = 0; k < 3; k++) {
    int64_t n = k == 0 ? 1 : k == 1 ? 4097 : 250001;
    msh_tensor *s32 = NULL, *s16 = NULL, *sbf = NULL;
    CHECK_OK(msh_tensor_from_file(&s32, f, floats_from, MSH_F32, 1, &n));
    CHECK_OK(msh_tensor_from_file(&s16, f, halves_from + 2, MSH_F16, 1, &n));
    CHECK_OK(msh_tensor_from_file(&sbf, f, halves_from + 6, MSH_BF16, 1, &n));
    convert_matches_host(s32, MSH_BF16);
    convert_matches_host(s32, MSH_F16);
    convert_matches_host(s16, MSH_BF16);
    convert_matches_host(s16, MSH_F32);
    convert_matches_host(sbf, MSH_F32);
    msh_tensor_free(sbf);
    msh_tensor_free(s16);
    msh_tensor_free(s32);
  }

  /* slices of rows (a tensor-parallel rank's columns): packed straight from the file */
  {
    int64_t shape[2] = {301, 517};
    msh_tensor *w = NULL, *cols = NULL, *rows = NULL;
    CHECK_OK(msh_tensor_from_file(&w, f, floats_from, MSH_F32, 2, shape));
    CHECK_OK(msh_tensor_narrow(&cols, w, 1, 129, 255));
    CHECK_OK(msh_tensor_narrow(&rows, w, 0, 37, 200));
    convert_matches_host(cols, MSH_F32);
    convert_matches_host(cols, MSH_BF16);
    convert_matches_host(rows, MSH_BF16);
    msh_tensor_free(rows);
    msh_tensor_free(cols);
    msh_tensor_free(w);
  }

  /* the default ring: 3 x 32 MiB; a whole 3 MiB file in one chunk, then a 40 MiB source of
   * rows that crosses chunk boundaries (a host tensor built from the file) */
  CHECK_OK(msh_device_set_staging(MSH_CUDA, 0, 0, 0));
  CHECK_OK(msh_device_staging_stats(MSH_CUDA, 0, &chunk, &nbuf, NULL, NULL));
  CHECK(chunk == (uint64_t)32 << 20);
  round_trip_bytes(f, 1, (int64_t)file_bytes - 1);
  {
    int64_t n = (int64_t)(40 << 20) + 13;
    msh_tensor *big = NULL, *dev = NULL, *back = NULL;
    CHECK_OK(msh_tensor_new(&big, MSH_I8, 1, &n, MSH_CPU, 0));
    char *p = msh_tensor_data(big);
    for (int64_t i = 0; i < n; i += (int64_t)file_bytes)
      memcpy(p + i, msh_file_data(f), (size_t)(n - i < (int64_t)file_bytes ? n - i : (int64_t)file_bytes));
    for (int64_t i = 0; i < n; i += 4093) p[i] ^= (char)(i >> 12); /* no two chunks alike */
    CHECK_OK(msh_tensor_new(&dev, MSH_I8, 1, &n, MSH_CUDA, 0));
    CHECK_OK(msh_tensor_new(&back, MSH_I8, 1, &n, MSH_CPU, 0));
    CHECK_OK(msh_tensor_copy(dev, big));
    memset(p, 0, 1 << 20); /* the source may change as soon as the copy returns */
    CHECK_OK(msh_tensor_copy(back, dev));
    const char *q = msh_tensor_data(back);
    CHECK(q[0] == ((const char *)msh_file_data(f))[0]);
    CHECK(memcmp(q + (1 << 20), p + (1 << 20), (size_t)(n - (1 << 20))) == 0);
    msh_tensor_free(back);
    msh_tensor_free(dev);
    msh_tensor_free(big);
  }
  uint64_t chunks = 0;
  CHECK_OK(msh_device_staging_stats(MSH_CUDA, 0, NULL, &nbuf, NULL, &chunks));
  printf("test_cuda_staging: %d pinned buffers of %llu bytes (0: pageable), %llu chunks staged\n", nbuf,
         (unsigned long long)chunk, (unsigned long long)chunks);

  msh_file_free(f);
  unlink(path);
  return check_done("test_cuda_staging");
}
