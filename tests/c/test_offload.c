/* test_offload.c: the pinned pool's guard and buffers, byte views, the file reader against plain
 * reads (random sizes and offsets, aligned and not, many in flight), its errors, and the ring. */
#define _GNU_SOURCE
#include "check.h"

#include <stdint.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

static uint64_t rng = 0x12345678ull;
static uint64_t next_u64(void) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return rng;
}

static void test_pin_guard(void) {
  uint64_t allowed = 0, total = 0, lock = 0;
  CHECK_OK(msh_pin_limit(0.25, 0, &allowed, &total, &lock));
  CHECK(total > 0 && allowed > 0 && allowed <= total / 4 + 1);
  CHECK_STATUS(msh_pin_limit(1.5, 0, NULL, NULL, NULL), MSH_EINVAL);

  /* over the share of RAM: refused before anything is allocated, saying what would fit */
  msh_pin_pool *p = NULL;
  CHECK_STATUS(msh_pin_pool_new(&p, total, 0.5, 0), MSH_ENOMEM);
  CHECK(p == NULL);
  const char *m = msh_last_error();
  CHECK(strstr(m, "pinning") && strstr(m, "refused") && strstr(m, "allowed") && strstr(m, "50% of MemTotal") &&
        strstr(m, "would fit"));

  /* over RLIMIT_MEMLOCK (lowered here), when the limit is applied */
  struct rlimit old, low;
  getrlimit(RLIMIT_MEMLOCK, &old);
  low = old;
  low.rlim_cur = 1 << 20;
  if (low.rlim_max != RLIM_INFINITY && low.rlim_max < low.rlim_cur) low.rlim_cur = low.rlim_max;
  if (setrlimit(RLIMIT_MEMLOCK, &low) == 0) {
    CHECK_STATUS(msh_pin_pool_new(&p, 4u << 20, 0.5, 1), MSH_ENOMEM);
    CHECK(strstr(msh_last_error(), "RLIMIT_MEMLOCK") != NULL);
    CHECK_OK(msh_pin_pool_new(&p, 4u << 20, 0.5, 0)); /* not applied: fine */
    msh_pin_pool_free(p);
    p = NULL;
    setrlimit(RLIMIT_MEMLOCK, &old);
  }

  /* buffers: aligned, inside, and the pool says when it is full */
  CHECK_OK(msh_pin_pool_new(&p, 3 * 4096 + 100, 0.5, 0));
  CHECK(msh_pin_pool_capacity(p) == 3 * 4096 + 100);
  msh_tensor *a = NULL, *b = NULL, *c = NULL;
  CHECK_OK(msh_pin_pool_take(p, &a, 5000));
  CHECK_OK(msh_pin_pool_take(p, &b, 4096));
  CHECK(a && b && (uintptr_t)msh_tensor_data(a) % 4096 == 0 && (uintptr_t)msh_tensor_data(b) % 4096 == 0);
  CHECK(msh_tensor_numel(a) == 5000 && msh_tensor_dtype(a) == MSH_I8);
  CHECK_STATUS(msh_pin_pool_take(p, &c, 200), MSH_ERANGE);
  CHECK(strstr(msh_last_error(), "pinned pool full") != NULL);
  memset(msh_tensor_data(b), 7, 4096);
  msh_pin_pool_free(p); /* the buffers keep the memory */
  CHECK(((char *)msh_tensor_data(b))[4095] == 7);
  msh_tensor_free(a);
  msh_tensor_free(b);
  msh_pin_pool_free(NULL);
}

static void test_byte_views(void) {
  int64_t n = 1024;
  msh_tensor *buf = NULL, *v = NULL;
  CHECK_OK(msh_tensor_new(&buf, MSH_I8, 1, &n, MSH_CPU, 0));
  float *f = (float *)((char *)msh_tensor_data(buf) + 64);
  for (int i = 0; i < 6; i++) f[i] = (float)i + 0.5f;
  int64_t shape[2] = {2, 3};
  CHECK_OK(msh_tensor_view_bytes(&v, buf, 64, MSH_F32, 2, shape));
  CHECK(v && msh_tensor_data(v) == (void *)f && msh_tensor_dim(v, 1) == 3);
  msh_tensor_free(v);
  CHECK_STATUS(msh_tensor_view_bytes(&v, buf, 2, MSH_F32, 2, shape), MSH_EINVAL);
  CHECK_STATUS(msh_tensor_view_bytes(&v, buf, 1004, MSH_F32, 2, shape), MSH_ERANGE);
  /* q4_1: 20-byte blocks of 32 elements */
  int64_t qs[2] = {2, 64};
  CHECK_OK(msh_tensor_view_bytes(&v, buf, 320, MSH_Q4_1, 2, qs));
  CHECK(v && (char *)msh_tensor_data(v) == (char *)msh_tensor_data(buf) + 320);
  msh_tensor_free(v);
  CHECK_STATUS(msh_tensor_view_bytes(&v, buf, 64, MSH_Q4_1, 2, qs), MSH_EINVAL);
  msh_tensor_free(buf);
}

/* A file of `size` random bytes; its content in *data. */
static char *make_file(const char *path, uint64_t size, char **data) {
  char *d = malloc(size ? size : 1);
  for (uint64_t i = 0; i < size; i++) d[i] = (char)(next_u64() >> 24);
  FILE *fp = fopen(path, "wb");
  if (size) fwrite(d, 1, size, fp);
  fclose(fp);
  *data = d;
  return d;
}

static void test_reader_at(const char *dir, int direct, int qd) {
  char path[512];
  snprintf(path, sizeof path, "%s/offload_test_%d.bin", dir, (int)getpid());
  uint64_t size = 3 * (1u << 20) + 12345; /* not a multiple of the block size */
  char *data;
  make_file(path, size, &data);
  msh_reader *r = NULL;
  CHECK_OK(msh_reader_open(&r, path, qd, 64 * 1024, direct));
  if (!r) return;
  /* aligned ranges into aligned buffers (O_DIRECT where allowed), many outstanding at once */
  msh_pin_pool *p = NULL;
  CHECK_OK(msh_pin_pool_new(&p, 8u << 20, 0.5, 0));
  msh_tensor *bufs[8] = {0};
  uint64_t offs[8], lens[8], tickets[8];
  for (int i = 0; i < 8; i++) {
    CHECK_OK(msh_pin_pool_take(p, &bufs[i], 512 * 1024));
    offs[i] = (next_u64() % 600) * 4096;
    lens[i] = (1 + next_u64() % 100) * 4096;
    CHECK_OK(msh_reader_submit(r, bufs[i], offs[i], lens[i], &tickets[i]));
  }
  for (int i = 7; i >= 0; i--) {
    CHECK_OK(msh_reader_wait(r, tickets[i]));
    CHECK(msh_reader_done(r, tickets[i]) == 1);
    CHECK(memcmp(msh_tensor_data(bufs[i]), data + offs[i], lens[i]) == 0);
  }
  /* ranges of any size at any offset, ending at the end of the file too */
  for (int k = 0; k < 20; k++) {
    uint64_t off = next_u64() % size, len = 1 + next_u64() % (size - off);
    if (k == 0) off = size - 777, len = 777;
    int64_t n = (int64_t)len + 3;
    msh_tensor *t = NULL, *view = NULL;
    CHECK_OK(msh_tensor_new(&t, MSH_I8, 1, &n, MSH_CPU, 0));
    CHECK_OK(msh_tensor_narrow(&view, t, 0, 3, (int64_t)len)); /* an unaligned address */
    uint64_t tk;
    CHECK_OK(msh_reader_submit(r, view, off, len, &tk));
    CHECK_OK(msh_reader_wait(r, tk));
    CHECK(memcmp(msh_tensor_data(view), data + off, len) == 0);
    msh_tensor_free(view);
    msh_tensor_free(t);
  }
  /* a read past the end: a short file, named, with the sizes */
  uint64_t tk;
  CHECK_OK(msh_reader_submit(r, bufs[0], size - 4096 + 1, 8192, &tk));
  CHECK_STATUS(msh_reader_wait(r, tk), MSH_EIO);
  CHECK(strstr(msh_last_error(), "short file") && strstr(msh_last_error(), path));
  CHECK_OK(msh_reader_submit(r, bufs[1], 0, 4096, &tk)); /* still usable */
  CHECK_OK(msh_reader_wait(r, tk));
  CHECK(memcmp(msh_tensor_data(bufs[1]), data, 4096) == 0);
  /* too big for the buffer */
  CHECK_STATUS(msh_reader_submit(r, bufs[2], 0, 512 * 1024 + 1, &tk), MSH_ERANGE);

  uint64_t bytes = 0;
  double wait_s = -1;
  int maxf = 0, q = 0, uring = -1, dir_on = -1;
  msh_reader_stats(r, &bytes, &wait_s, &maxf, &q, &uring, &dir_on);
  CHECK(bytes > 0 && wait_s >= 0 && maxf >= 1 && maxf <= qd && q >= 1);
  if (uring) CHECK(q == qd);
  printf("reader %s: io_uring %d, O_DIRECT %d, queue depth %d, most in flight %d\n", dir, uring, dir_on, q, maxf);
  for (int i = 0; i < 8; i++) msh_tensor_free(bufs[i]);
  msh_pin_pool_free(p);
  msh_reader_free(r);
  unlink(path);
  free(data);
}

static void test_reader_errors(void) {
  msh_reader *r = NULL;
  CHECK_STATUS(msh_reader_open(&r, "/nonexistent/offload.bin", 4, 0, 1), MSH_ENOENT);
  CHECK(strstr(msh_last_error(), "/nonexistent/offload.bin") != NULL);
  CHECK_STATUS(msh_reader_open(&r, "/tmp", 4, 0, 1), MSH_EIO);
  CHECK_STATUS(msh_reader_open(&r, "/tmp", 0, 0, 1), MSH_EINVAL);
  CHECK_STATUS(msh_reader_open(&r, "/tmp", 4, 1000, 1), MSH_EINVAL);
  msh_reader_free(NULL);
}

static void test_files(void) {
  char path[256];
  snprintf(path, sizeof path, "/tmp/offload_write_%d.bin", (int)getpid());
  int64_t n = 100;
  msh_tensor *t = NULL;
  CHECK_OK(msh_tensor_new(&t, MSH_I8, 1, &n, MSH_CPU, 0));
  memset(msh_tensor_data(t), 9, 100);
  CHECK_OK(msh_file_write_at(path, 50, t, 0, 1, 8192));
  FILE *f = fopen(path, "rb");
  char got[200];
  size_t rd = fread(got, 1, 200, f);
  fclose(f);
  CHECK(rd == 200 && got[49] == 0 && got[50] == 9 && got[149] == 9 && got[150] == 0);
  CHECK_STATUS(msh_file_write_at("/nonexistent/x.bin", 0, t, 0, 1, UINT64_MAX), MSH_ENOENT);
  uint64_t freeb = 0;
  int w = -1;
  CHECK_OK(msh_dir_space("/tmp", &freeb, &w));
  CHECK(freeb > 0 && w == 1);
  CHECK_STATUS(msh_dir_space("/nonexistent", &freeb, &w), MSH_ENOENT);
  CHECK_STATUS(msh_dir_space(path, &freeb, &w), MSH_EIO);
  unlink(path);
  msh_tensor_free(t);
  const char s[] = "abcdefghijklmnopqrstuvwxyz0123456789abcdefghij";
  CHECK(msh_hash64(s, sizeof s, 0) == msh_hash64(s, sizeof s, 0));
  CHECK(msh_hash64(s, sizeof s, 0) != msh_hash64(s, sizeof s - 1, 0));
  CHECK(msh_hash64(s, sizeof s, 0) != msh_hash64(s, sizeof s, 1));
  char s2[sizeof s];
  memcpy(s2, s, sizeof s);
  s2[3] ^= 1;
  CHECK(msh_hash64(s, sizeof s, 0) != msh_hash64(s2, sizeof s, 0));
}

static void test_ring(void) {
  msh_ring *r = NULL;
  CHECK_OK(msh_ring_new(&r, 3, 1000, MSH_CPU, 0));
  CHECK(msh_ring_size(r) == 3 && msh_ring_buffer(r, 3) == NULL);
  msh_tensor *b0 = msh_ring_buffer(r, 0);
  CHECK(b0 && msh_tensor_numel(b0) == 1000);
  int s0 = -1, s1 = -1, s2 = -1, s3 = -1;
  CHECK_OK(msh_ring_claim(r, 10, &s0));
  CHECK_OK(msh_ring_claim(r, 11, &s1));
  CHECK_STATUS(msh_ring_claim(r, 11, &s3), MSH_EINVAL);
  CHECK_OK(msh_ring_claim(r, 12, &s2));
  CHECK(s0 == 0 && s1 == 1 && s2 == 2 && msh_ring_find(r, 11) == 1 && msh_ring_find(r, 13) == -1);
  CHECK_STATUS(msh_ring_claim(r, 13, &s3), MSH_ERANGE);
  CHECK(strstr(msh_last_error(), "keys 10, 11, 12") != NULL);
  CHECK_OK(msh_ring_release(r, 0));
  CHECK_STATUS(msh_ring_release(r, 0), MSH_EINVAL);
  CHECK_OK(msh_ring_claim(r, 13, &s3));
  CHECK(s3 == 0 && msh_ring_buffer(r, 0) == b0); /* the same buffer, reused */
  msh_ring_free(r);
  msh_ring_free(NULL);
}

int main(void) {
  test_pin_guard();
  test_byte_views();
  test_reader_at("/tmp", 1, 4);
  test_reader_at("/tmp", 0, 1);
  test_reader_at("/dev/shm", 1, 8); /* tmpfs: O_DIRECT refused, buffered instead */
  test_reader_at(MSH_ROOT, 1, 32);
  setenv("MSH_READER_PREAD", "1", 1); /* the path of builds without liburing */
  test_reader_at(MSH_ROOT, 1, 32);
  unsetenv("MSH_READER_PREAD");
  test_reader_errors();
  test_files();
  test_ring();
  printf("test_offload: %d checks, %d failed\n", check_count, check_failures);
  return check_failures ? 1 : 0;
}
