/* test_safetensors.c: safetensors files built here, valid and lying, opened through the API. */
#include "check.h"

#include <stdint.h>
#include <string.h>
#include <unistd.h>

/* ------------------------------------------------------------------------------ helpers */

/* Writes [u64 header length][header, space-padded to pad][data] to a fresh temporary file.
 * hlen_override (when not 0) replaces the length field. path needs 32 bytes. */
static int write_st_n(char *path, const char *header, size_t h, size_t pad, const void *data,
                      size_t n, uint64_t hlen_override) {
  strcpy(path, "/tmp/msh_st_XXXXXX");
  int fd = mkstemp(path);
  if (fd < 0) return 0;
  size_t hp = pad ? (h + pad - 1) / pad * pad : h;
  uint64_t len = hlen_override ? hlen_override : hp;
  unsigned char le[8];
  for (int i = 0; i < 8; i++) le[i] = (unsigned char)(len >> (8 * i));
  int ok = write(fd, le, 8) == 8 && write(fd, header, h) == (ssize_t)h;
  for (size_t i = h; ok && i < hp; i++) ok = write(fd, " ", 1) == 1;
  if (ok && n) ok = write(fd, data, n) == (ssize_t)n;
  close(fd);
  return ok;
}

static int write_st(char *path, const char *header, size_t pad, const void *data, size_t n,
                    uint64_t hlen_override) {
  return write_st_n(path, header, strlen(header), pad, data, n, hlen_override);
}

static int error_has(const char *needle) { return strstr(msh_last_error(), needle) != NULL; }

/* ------------------------------------------------------------------------------- valid */

static void test_valid(void) {
  /* data section: a (2,3) f32 | b (4) f16 | c (2,2) bf16 | d (3) i32 | s () f32 | e (0,4) f32 */
  unsigned char data[24 + 8 + 8 + 12 + 4];
  float a[6];
  for (int i = 0; i < 6; i++) a[i] = 1.5f * (float)i - 2.0f;
  uint16_t b[4] = {msh_f32_to_f16(1.0f), msh_f32_to_f16(-2.0f), msh_f32_to_f16(0.5f),
                   msh_f32_to_f16(65504.0f)};
  uint16_t c[4] = {msh_f32_to_bf16(3.0f), msh_f32_to_bf16(-0.25f), msh_f32_to_bf16(1e30f),
                   msh_f32_to_bf16(7.0f)};
  int32_t d[3] = {-7, 0, 2147483647};
  float s = 42.0f;
  memcpy(data, a, 24);
  memcpy(data + 24, b, 8);
  memcpy(data + 32, c, 8);
  memcpy(data + 40, d, 12);
  memcpy(data + 52, &s, 4);
  /* names not in sorted order: the file's order is kept */
  const char *header =
      "{\"model.z.weight\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
      "\"__metadata__\":{\"format\":\"pt\",\"note\":\"\\u00e9\"},"
      "\"b.half\":{\"dtype\":\"F16\",\"shape\":[4],\"data_offsets\":[24,32]},"
      "\"c.bf\" : { \"shape\" : [2, 2], \"dtype\" : \"BF16\", \"data_offsets\" : [32, 40] },"
      "\"d.ints\":{\"dtype\":\"I32\",\"shape\":[3],\"data_offsets\":[40,52]},"
      "\"scalar\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[52,56]},"
      "\"empty\":{\"dtype\":\"F32\",\"shape\":[0,4],\"data_offsets\":[56,56]}}";
  char path[32];
  CHECK(write_st(path, header, 8, data, sizeof data, 0));

  msh_safetensors *st = NULL;
  CHECK_OK(msh_safetensors_open(&st, path));
  if (!st) return;
  CHECK(msh_safetensors_count(st) == 6);
  static const char *names[6] = {"model.z.weight", "b.half", "c.bf", "d.ints", "scalar", "empty"};
  static const int dtypes[6] = {MSH_F32, MSH_F16, MSH_BF16, MSH_I32, MSH_F32, MSH_F32};
  static const int ndims[6] = {2, 1, 2, 1, 0, 2};
  static const int64_t shapes[6][2] = {{2, 3}, {4, 0}, {2, 2}, {3, 0}, {0, 0}, {0, 4}};
  for (int i = 0; i < 6; i++) {
    const char *nm = msh_safetensors_name(st, i);
    CHECK(nm && strcmp(nm, names[i]) == 0);
    int idx = -1;
    CHECK_OK(msh_safetensors_find(st, names[i], &idx));
    CHECK(idx == i);
    int dt = -2, nd = -1;
    int64_t shape[MSH_MAX_DIMS];
    CHECK_OK(msh_safetensors_info(st, i, &dt, &nd, shape));
    CHECK(dt == dtypes[i] && nd == ndims[i]);
    for (int k = 0; k < nd; k++) CHECK(shape[k] == shapes[i][k]);
  }
  CHECK(msh_safetensors_name(st, 6) == NULL && msh_safetensors_name(st, -1) == NULL);
  int idx = 99;
  CHECK_STATUS(msh_safetensors_find(st, "__metadata__", &idx), MSH_ENOENT);
  CHECK_STATUS(msh_safetensors_find(st, "model.z", &idx), MSH_ENOENT);
  CHECK(idx == 99);
  CHECK_STATUS(msh_safetensors_info(st, 6, NULL, NULL, NULL), MSH_ERANGE);
  msh_tensor *t = NULL;
  CHECK_STATUS(msh_safetensors_tensor(st, -1, &t), MSH_ERANGE);

  /* values through zero-copy views */
  msh_tensor *ta = NULL, *tb = NULL, *tc = NULL, *td = NULL, *ts = NULL, *te = NULL;
  CHECK_OK(msh_safetensors_tensor(st, 0, &ta));
  CHECK_OK(msh_safetensors_tensor(st, 1, &tb));
  CHECK_OK(msh_safetensors_tensor(st, 2, &tc));
  CHECK_OK(msh_safetensors_tensor(st, 3, &td));
  CHECK_OK(msh_safetensors_tensor(st, 4, &ts));
  CHECK_OK(msh_safetensors_tensor(st, 5, &te));
  msh_safetensors_free(st); /* views keep the mapping alive */
  if (ta && tb && tc && td && ts && te) {
    CHECK(msh_tensor_is_readonly(ta) && msh_tensor_device(ta) == MSH_CPU);
    CHECK(msh_tensor_dtype(ta) == MSH_F32 && msh_tensor_ndim(ta) == 2 && msh_tensor_dim(ta, 0) == 2 &&
          msh_tensor_dim(ta, 1) == 3);
    CHECK(memcmp(msh_tensor_data(ta), a, 24) == 0);
    const uint16_t *pb = msh_tensor_data(tb);
    CHECK(msh_f16_to_f32(pb[0]) == 1.0f && msh_f16_to_f32(pb[1]) == -2.0f &&
          msh_f16_to_f32(pb[2]) == 0.5f && msh_f16_to_f32(pb[3]) == 65504.0f);
    const uint16_t *pc = msh_tensor_data(tc);
    CHECK(msh_bf16_to_f32(pc[0]) == 3.0f && msh_bf16_to_f32(pc[1]) == -0.25f &&
          msh_bf16_to_f32(pc[3]) == 7.0f);
    CHECK(msh_tensor_dtype(tc) == MSH_BF16 && msh_tensor_dim(tc, 1) == 2);
    const int32_t *pd = msh_tensor_data(td);
    CHECK(pd[0] == -7 && pd[1] == 0 && pd[2] == 2147483647);
    CHECK(msh_tensor_ndim(ts) == 0 && msh_tensor_numel(ts) == 1 && *(const float *)msh_tensor_data(ts) == 42.0f);
    CHECK(msh_tensor_numel(te) == 0 && msh_tensor_dim(te, 1) == 4);
    /* a view reads the file through the conversions like any tensor */
    msh_tensor *conv = NULL;
    CHECK_OK(msh_tensor_contiguous(&conv, tb, MSH_F32));
    if (conv) CHECK(((const float *)msh_tensor_data(conv))[3] == 65504.0f);
    msh_tensor_free(conv);
  }
  msh_tensor_free(ta);
  msh_tensor_free(tb);
  msh_tensor_free(tc);
  msh_tensor_free(td);
  msh_tensor_free(ts);
  msh_tensor_free(te);
  unlink(path);
}

/* An empty header ("{}") and no data is a valid file with no tensors. */
static void test_empty(void) {
  char path[32];
  CHECK(write_st(path, "{}", 0, NULL, 0, 0));
  msh_safetensors *st = NULL;
  CHECK_OK(msh_safetensors_open(&st, path));
  CHECK(st && msh_safetensors_count(st) == 0);
  int idx;
  if (st) CHECK_STATUS(msh_safetensors_find(st, "x", &idx), MSH_ENOENT);
  msh_safetensors_free(st);
  msh_safetensors_free(NULL);
  unlink(path);
}

/* Valid dtypes moonshard does not load are listed with dtype -1 and refused as tensors. */
static void test_unsupported(void) {
  unsigned char data[16 + 4 + 2] = {0};
  const char *header =
      "{\"ids\":{\"dtype\":\"I64\",\"shape\":[2],\"data_offsets\":[0,16]},"
      "\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[16,20]},"
      "\"f8\":{\"dtype\":\"F8_E4M3\",\"shape\":[1,2],\"data_offsets\":[20,22]}}";
  char path[32];
  CHECK(write_st(path, header, 0, data, sizeof data, 0));
  msh_safetensors *st = NULL;
  CHECK_OK(msh_safetensors_open(&st, path));
  if (!st) return;
  CHECK(msh_safetensors_count(st) == 3);
  int dt = 0, nd = 0;
  int64_t shape[MSH_MAX_DIMS];
  CHECK_OK(msh_safetensors_info(st, 0, &dt, &nd, shape));
  CHECK(dt == -1 && nd == 1 && shape[0] == 2);
  CHECK_OK(msh_safetensors_info(st, 2, &dt, &nd, shape));
  CHECK(dt == -1 && nd == 2 && shape[1] == 2);
  msh_tensor *t = NULL;
  CHECK_STATUS(msh_safetensors_tensor(st, 0, &t), MSH_EUNSUPPORTED);
  CHECK(t == NULL && error_has("I64") && error_has("ids"));
  CHECK_STATUS(msh_safetensors_tensor(st, 2, &t), MSH_EUNSUPPORTED);
  CHECK(error_has("F8_E4M3"));
  CHECK_OK(msh_safetensors_tensor(st, 1, &t));
  msh_tensor_free(t);
  msh_safetensors_free(st);
  unlink(path);
}

/* Thousands of entries: find goes through the sorted index. */
static void test_many(void) {
  enum { N = 3000 };
  size_t cap = (size_t)N * 80 + 16;
  char *header = malloc(cap);
  float *data = malloc(N * sizeof *data);
  if (!header || !data) {
    CHECK(0);
    free(header);
    free(data);
    return;
  }
  size_t n = 0;
  n += (size_t)snprintf(header + n, cap - n, "{");
  for (int i = 0; i < N; i++) {
    int j = (i * 7919) % N; /* names in scrambled order */
    data[i] = (float)j;
    n += (size_t)snprintf(header + n, cap - n,
                          "%s\"layers.%d.w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[%d,%d]}",
                          i ? "," : "", j, 4 * i, 4 * i + 4);
  }
  snprintf(header + n, cap - n, "}");
  char path[32];
  CHECK(write_st(path, header, 8, data, N * sizeof *data, 0));
  msh_safetensors *st = NULL;
  CHECK_OK(msh_safetensors_open(&st, path));
  if (st) {
    CHECK(msh_safetensors_count(st) == N);
    int bad = 0;
    for (int j = 0; j < N; j++) {
      char name[32];
      snprintf(name, sizeof name, "layers.%d.w", j);
      int idx = -1;
      msh_tensor *t = NULL;
      if (msh_safetensors_find(st, name, &idx) != MSH_OK || msh_safetensors_tensor(st, idx, &t) != MSH_OK ||
          *(const float *)msh_tensor_data(t) != (float)j || strcmp(msh_safetensors_name(st, idx), name) != 0)
        bad++;
      msh_tensor_free(t);
    }
    CHECK(bad == 0);
    int idx;
    CHECK_STATUS(msh_safetensors_find(st, "layers.3000.w", &idx), MSH_ENOENT);
    CHECK_STATUS(msh_safetensors_find(st, "", &idx), MSH_ENOENT);
  }
  msh_safetensors_free(st);
  unlink(path);
  free(header);
  free(data);
}

/* ----------------------------------------------------------------------------- lying */

static void check_bad_n(const char *what, const char *header, size_t hbytes, size_t data_bytes,
                        uint64_t hlen, msh_status want, const char *needle) {
  static unsigned char zeros[256];
  char path[32];
  CHECK(write_st_n(path, header, hbytes, 0, zeros, data_bytes, hlen));
  msh_safetensors *st = NULL;
  msh_status s = msh_safetensors_open(&st, path);
  int ok = s == want && st == NULL && error_has(path) && (!needle || error_has(needle));
  if (!ok) fprintf(stderr, "  %s: got %s \"%s\"\n", what, msh_status_name(s), msh_last_error());
  CHECK(ok);
  msh_safetensors_free(st);
  unlink(path);
}

static void check_bad(const char *what, const char *header, size_t data_bytes, uint64_t hlen,
                      msh_status want, const char *needle) {
  check_bad_n(what, header, strlen(header), data_bytes, hlen, want, needle);
}

#define ENTRY(name, body) "\"" name "\":{" body "}"

static void test_lying(void) {
  check_bad("header length past EOF", "{}", 4, 1000, MSH_EFORMAT, "past the end");
  check_bad("header length absurd", "{}", 0, UINT64_MAX, MSH_EFORMAT, NULL);
  check_bad("not JSON", "{\"a\": {\"dtype\": ", 0, 0, MSH_EFORMAT, "JSON");
  check_bad("JSON array", "[1, 2]", 0, 0, MSH_EFORMAT, "object");
  check_bad("bytes after the JSON", "{}xyz", 0, 0, MSH_EFORMAT, NULL);
  check_bad_n("NUL inside the header", "{}\0  ", 5, 0, 0, MSH_EFORMAT, NULL);
  check_bad_n("NUL inside a name", "{\"a\0b\":1}", 9, 0, 0, MSH_EFORMAT, NULL);
  check_bad("offsets past the data section",
            "{" ENTRY("model.layers.0.q.weight", "\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]") "}",
            8, 0, MSH_EFORMAT, "model.layers.0.q.weight");
  check_bad("size != numel * dtype size",
            "{" ENTRY("w", "\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,16]") "}", 16, 0,
            MSH_EFORMAT, "'w'");
  check_bad("F16 size mismatch",
            "{" ENTRY("w", "\"dtype\":\"F16\",\"shape\":[2,2],\"data_offsets\":[0,16]") "}", 16, 0,
            MSH_EFORMAT, "'w'");
  check_bad("begin > end",
            "{" ENTRY("w", "\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,4]") "}", 16, 0,
            MSH_EFORMAT, "'w'");
  check_bad("overlapping entries",
            "{" ENTRY("a", "\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]") ","
                ENTRY("b", "\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]") "}",
            16, 0, MSH_EFORMAT, "overlap");
  check_bad("same bytes twice",
            "{" ENTRY("a", "\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]") ","
                ENTRY("b", "\"dtype\":\"I32\",\"shape\":[2],\"data_offsets\":[8,16]") "}",
            16, 0, MSH_EFORMAT, "overlap");
  check_bad("negative shape",
            "{" ENTRY("w", "\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,0]") "}", 0, 0,
            MSH_EFORMAT, "shape");
  check_bad("fractional shape",
            "{" ENTRY("w", "\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]") "}", 4, 0,
            MSH_EFORMAT, "shape");
  check_bad("string shape",
            "{" ENTRY("w", "\"dtype\":\"F32\",\"shape\":\"2\",\"data_offsets\":[0,8]") "}", 8, 0,
            MSH_EFORMAT, "shape");
  check_bad("huge shape",
            "{" ENTRY("w", "\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,0]") "}",
            0, 0, MSH_EFORMAT, "'w'");
  check_bad("unknown dtype",
            "{" ENTRY("w", "\"dtype\":\"F17\",\"shape\":[1],\"data_offsets\":[0,4]") "}", 4, 0,
            MSH_EFORMAT, "F17");
  check_bad("missing dtype", "{" ENTRY("w", "\"shape\":[1],\"data_offsets\":[0,4]") "}", 4, 0,
            MSH_EFORMAT, "dtype");
  check_bad("missing data_offsets", "{" ENTRY("w", "\"dtype\":\"F32\",\"shape\":[1]") "}", 4, 0,
            MSH_EFORMAT, "data_offsets");
  check_bad("three data_offsets",
            "{" ENTRY("w", "\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]") "}", 8, 0,
            MSH_EFORMAT, "data_offsets");
  check_bad("negative offset",
            "{" ENTRY("w", "\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]") "}", 8, 0,
            MSH_EFORMAT, "data_offsets");
  check_bad("entry not an object", "{\"w\": [1, 2]}", 0, 0, MSH_EFORMAT, "'w'");
  check_bad("duplicate names",
            "{" ENTRY("w", "\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]") ","
                ENTRY("w", "\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]") "}",
            8, 0, MSH_EFORMAT, "twice");
  check_bad("metadata not a string map", "{\"__metadata__\":{\"epoch\":3}}", 0, 0, MSH_EFORMAT,
            "__metadata__");
  check_bad("nine dims",
            "{" ENTRY("w", "\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]") "}",
            4, 0, MSH_EUNSUPPORTED, "9 dims");

  /* shorter than the length field */
  char path[32];
  strcpy(path, "/tmp/msh_st_XXXXXX");
  int fd = mkstemp(path);
  CHECK(fd >= 0 && write(fd, "\x02\x00\x00", 3) == 3);
  close(fd);
  msh_safetensors *st = NULL;
  CHECK_STATUS(msh_safetensors_open(&st, path), MSH_EFORMAT);
  CHECK(st == NULL && error_has(path));
  unlink(path);

  CHECK_STATUS(msh_safetensors_open(&st, "/nonexistent/model.safetensors"), MSH_ENOENT);
  CHECK(st == NULL);
  CHECK_STATUS(msh_safetensors_open(&st, "/tmp"), MSH_EIO);
  CHECK_STATUS(msh_safetensors_open(NULL, "/tmp"), MSH_EINVAL);
}

int main(void) {
  test_valid();
  test_empty();
  test_unsupported();
  test_many();
  test_lying();
  return check_done("test_safetensors");
}
