/* test_llama2c.c: the llama2.c checkpoint header, against the real stories260K and forged ones. */
#include "check.h"

#include <stdint.h>
#include <string.h>
#include <unistd.h>

#define MODEL MSH_DATA_DIR "/models/stories260K/stories260K.bin"

/* Writes a header of seven int32 and then `weights` zero bytes to a temporary file. */
static int write_ckpt(char *path, const int32_t *cfg, uint64_t weights) {
  strcpy(path, "/tmp/msh_l2c_XXXXXX");
  int fd = mkstemp(path);
  if (fd < 0) return 0;
  int ok = write(fd, cfg, 28) == 28;
  if (ok && weights) ok = ftruncate(fd, (off_t)(28 + weights)) == 0;
  close(fd);
  return ok;
}

/* Floats a checkpoint of this shape holds, as llama2.c's run.c walks them. */
static uint64_t expected_floats(const int32_t *c) {
  uint64_t dim = (uint64_t)c[0], hid = (uint64_t)c[1], L = (uint64_t)c[2], H = (uint64_t)c[3],
           KV = (uint64_t)c[4], V = (uint64_t)(c[5] < 0 ? -c[5] : c[5]), S = (uint64_t)c[6];
  uint64_t hs = dim / H, kv = KV * hs;
  uint64_t n = V * dim + L * dim + L * dim * dim + 2 * L * kv * dim + L * dim * dim + L * dim +
               3 * L * dim * hid + dim + S * hs / 2 * 2;
  return c[5] < 0 ? n + V * dim : n;
}

/* Opens path and reads its header; the status, with cfg/shared filled on success. */
static msh_status header_of(const char *path, int32_t *cfg, int *shared) {
  msh_file *f = NULL;
  msh_status s = msh_file_open(&f, path);
  if (s == MSH_OK) s = msh_llama2c_header(f, cfg, shared);
  msh_file_free(f);
  return s;
}

static void check_bad(const char *what, const int32_t *cfg, uint64_t weights, const char *needle) {
  char path[32];
  CHECK(write_ckpt(path, cfg, weights));
  int32_t got[7] = {-9, -9, -9, -9, -9, -9, -9};
  int shared = -9;
  msh_status s = header_of(path, got, &shared);
  int ok = s == MSH_EFORMAT && strstr(msh_last_error(), path) &&
           (!needle || strstr(msh_last_error(), needle)) && got[0] == -9 && shared == -9;
  if (!ok) fprintf(stderr, "  %s: got %s \"%s\"\n", what, msh_status_name(s), msh_last_error());
  CHECK(ok);
  unlink(path);
}

static void test_real(void) {
  int32_t c[7] = {0};
  int shared = -1;
  CHECK_OK(header_of(MODEL, c, &shared));
  CHECK(c[0] == 64 && c[1] == 172 && c[2] == 5 && c[3] == 8 && c[4] == 4 && c[5] == 512 && c[6] == 512);
  CHECK(shared == 1);
  CHECK(28 + 4 * expected_floats(c) == 1056540);
}

static void test_truncated(void) {
  FILE *in = fopen(MODEL, "rb");
  CHECK(in != NULL);
  if (!in) return;
  static unsigned char buf[1056540];
  size_t n = fread(buf, 1, sizeof buf, in);
  fclose(in);
  CHECK(n == sizeof buf);

  /* cut inside the weights, inside the header, or one float short; one float too many */
  static const size_t cuts[] = {500000, 1056536, 20, 0};
  for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
    char path[32];
    strcpy(path, "/tmp/msh_l2c_XXXXXX");
    int fd = mkstemp(path);
    CHECK(fd >= 0 && write(fd, buf, cuts[i]) == (ssize_t)cuts[i]);
    close(fd);
    int32_t c[7];
    int shared;
    CHECK_STATUS(header_of(path, c, &shared), MSH_EFORMAT);
    CHECK(strstr(msh_last_error(), "truncated") && strstr(msh_last_error(), path));
    if (cuts[i] > 28) {
      char want[64];
      snprintf(want, sizeof want, "expected 1056540 bytes, found %zu", cuts[i]);
      CHECK(strstr(msh_last_error(), want) != NULL);
    }
    unlink(path);
  }
  char path[32];
  strcpy(path, "/tmp/msh_l2c_XXXXXX");
  int fd = mkstemp(path);
  CHECK(fd >= 0 && write(fd, buf, n) == (ssize_t)n && write(fd, buf, 4) == 4);
  close(fd);
  int32_t c[7];
  int shared;
  CHECK_STATUS(header_of(path, c, &shared), MSH_EFORMAT);
  CHECK(strstr(msh_last_error(), "expected 1056540 bytes, found 1056544") != NULL);
  unlink(path);
}

static void test_forged(void) {
  const int32_t good[7] = {64, 172, 5, 8, 4, 512, 512};
  char path[32];

  /* a separate classifier (negative vocab) adds vocab * dim floats */
  int32_t sep[7];
  memcpy(sep, good, sizeof sep);
  sep[5] = -512;
  CHECK(write_ckpt(path, sep, 4 * expected_floats(sep)));
  int32_t c[7];
  int shared = -1;
  CHECK_OK(header_of(path, c, &shared));
  CHECK(shared == 0 && c[5] == 512 && c[0] == 64);
  unlink(path);
  check_bad("unshared classifier missing", sep, 4 * expected_floats(good), "truncated");

  /* multi-query: one kv head */
  int32_t mq[7] = {32, 48, 2, 4, 1, 100, 16};
  CHECK(write_ckpt(path, mq, 4 * expected_floats(mq)));
  CHECK_OK(header_of(path, c, &shared));
  CHECK(c[4] == 1 && shared == 1);
  unlink(path);

  static const char *fields[7] = {"dim",        "hidden_dim", "n_layers", "n_heads",
                                  "n_kv_heads", "vocab_size", "seq_len"};
  for (int i = 0; i < 7; i++) {
    int32_t bad[7];
    memcpy(bad, good, sizeof bad);
    bad[i] = 0;
    check_bad("zero field", bad, 4 * expected_floats(good), fields[i]);
    if (i != 5) {
      bad[i] = -3;
      check_bad("negative field", bad, 4 * expected_floats(good), fields[i]);
    }
  }
  int32_t bad[7];
  memcpy(bad, good, sizeof bad);
  bad[5] = INT32_MIN;
  check_bad("vocab INT32_MIN", bad, 0, "vocab_size");
  memcpy(bad, good, sizeof bad);
  bad[3] = 6; /* 64 % 6 != 0 */
  check_bad("n_heads not dividing dim", bad, 0, "n_heads");
  memcpy(bad, good, sizeof bad);
  bad[4] = 3; /* 8 % 3 != 0 */
  check_bad("n_kv_heads not dividing n_heads", bad, 0, "n_kv_heads");
  memcpy(bad, good, sizeof bad);
  bad[4] = 16; /* more kv heads than heads */
  check_bad("n_kv_heads > n_heads", bad, 0, "n_kv_heads");
  memcpy(bad, good, sizeof bad);
  bad[3] = 64; /* head size 1: odd */
  bad[4] = 64;
  check_bad("odd head size", bad, 0, "odd");
  int32_t huge[7] = {1 << 24, 1 << 24, 1 << 24, 1 << 4, 1 << 4, 1 << 24, 1 << 24};
  check_bad("huge but in range (overflow)", huge, 0, NULL);
  int32_t absurd[7] = {INT32_MAX - 1, 8, 1, 2, 1, 10, 10};
  check_bad("absurd dim", absurd, 0, "dim");

  /* shorter than the header */
  strcpy(path, "/tmp/msh_l2c_XXXXXX");
  int fd = mkstemp(path);
  close(fd);
  CHECK_STATUS(header_of(path, c, &shared), MSH_EFORMAT);
  CHECK(strstr(msh_last_error(), "truncated") != NULL);
  unlink(path);
  CHECK_STATUS(msh_llama2c_header(NULL, c, &shared), MSH_EINVAL);
}

int main(void) {
  test_real();
  test_truncated();
  test_forged();
  return check_done("test_llama2c");
}
