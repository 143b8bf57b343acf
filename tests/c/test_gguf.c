/* test_gguf.c: the GGUF reader against what the gguf Python package reads from the same files
 * (tests/fixtures/gguf, written by tools/make_gguf_fixtures.py), on hand-built files, and on
 * corrupt variants written to /tmp: each must fail with a clear status and never crash. */
#include "check.h"

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#define FIXTURES MSH_ROOT "/tests/fixtures/gguf/"
#define TINY MSH_DATA_DIR "/models/tiny-random-gguf/tiny-random-llama.gguf"

/* ------------------------------------------------------------------------------ helpers */

typedef struct {
  uint8_t *p;
  size_t n, cap;
} buf;

static int read_all(const char *path, buf *b) {
  FILE *f = fopen(path, "rb");
  if (!f) return 0;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  b->p = malloc((size_t)n + 1);
  b->n = b->cap = (size_t)n;
  int ok = b->p && fread(b->p, 1, (size_t)n, f) == (size_t)n;
  fclose(f);
  return ok;
}

static char tmp_path[256];

static const char *write_tmp(const uint8_t *p, size_t n) {
  snprintf(tmp_path, sizeof tmp_path, "/tmp/msh_test_gguf_%d.gguf", (int)getpid());
  FILE *f = fopen(tmp_path, "wb");
  if (!f) return NULL;
  if (n) fwrite(p, 1, n, f);
  fclose(f);
  return tmp_path;
}

/* Opens n bytes of p written to a temporary file; returns the status. */
static msh_status open_bytes(const uint8_t *p, size_t n, msh_gguf **out) {
  msh_gguf *g = NULL;
  msh_status s = msh_gguf_open(&g, write_tmp(p, n));
  if (out) *out = g;
  else msh_gguf_free(g);
  return s;
}

static void put_u32(uint8_t *p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static void put_u64(uint8_t *p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

/* Offset just past the length-prefixed string s in the file, or 0. */
static size_t after_string(const buf *b, const char *s) {
  size_t l = strlen(s);
  for (size_t i = 0; i + 8 + l <= b->n; i++) {
    uint64_t len = 0;
    for (int k = 7; k >= 0; k--) len = len << 8 | b->p[i + (size_t)k];
    if (len == l && memcmp(b->p + i + 8, s, l) == 0) return i + 8 + l;
  }
  return 0;
}

static int has(const char *needle) { return strstr(msh_last_error(), needle) != NULL; }

static uint64_t fnv(uint64_t h, const void *p, size_t n) {
  const uint8_t *s = p;
  for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 0x100000001B3ull;
  return h;
}

static size_t unhex(const char *hex, uint8_t *out, size_t cap) {
  if (strcmp(hex, "-") == 0) return 0;
  size_t n = strlen(hex) / 2;
  for (size_t i = 0; i < n && i < cap; i++) {
    unsigned v;
    sscanf(hex + 2 * i, "%2x", &v);
    out[i] = (uint8_t)v;
  }
  return n;
}

static const char *type_names[] = {"u8",  "i8",   "u16",    "i16",   "u32", "i32", "f32",
                                   "bool", "string", "array", "u64", "i64", "f64"};

static double value_sum(const msh_tensor *t) {
  int dt = msh_tensor_dtype(t);
  if (dt == MSH_Q8_0 || dt == MSH_Q4_0 || dt == MSH_Q4_1) { /* block-quantized: the dequantized values */
    msh_tensor *f = NULL;
    if (msh_tensor_contiguous(&f, t, MSH_F32) != MSH_OK) return NAN;
    double s = value_sum(f);
    msh_tensor_free(f);
    return s;
  }
  int64_t n = msh_tensor_numel(t);
  const void *d = msh_tensor_data(t);
  double s = 0;
  for (int64_t i = 0; i < n; i++) {
    switch (msh_tensor_dtype(t)) {
    case MSH_F32: s += ((const float *)d)[i]; break;
    case MSH_F16: s += msh_f16_to_f32(((const uint16_t *)d)[i]); break;
    case MSH_BF16: s += msh_bf16_to_f32(((const uint16_t *)d)[i]); break;
    case MSH_I8: s += ((const int8_t *)d)[i]; break;
    case MSH_I32: s += ((const int32_t *)d)[i]; break;
    default: break;
    }
  }
  return s;
}

/* -------------------------------------------------------- against the gguf package's view */

static void check_scalar(msh_gguf *g, int k, const char *type, const char *val) {
  if (strcmp(type, "string") == 0) {
    uint8_t want[4096];
    size_t wn = unhex(val, want, sizeof want), len = 0;
    const char *s = NULL;
    CHECK_OK(msh_gguf_get_string(g, k, &s, &len));
    CHECK(len == wn && (len == 0 || memcmp(s, want, len) == 0));
  } else if (strcmp(type, "f32") == 0 || strcmp(type, "f64") == 0) {
    double v = 0;
    CHECK_OK(msh_gguf_get_float(g, k, &v));
    CHECK(v == strtod(val, NULL));
  } else if (strcmp(type, "u64") == 0 && strtoull(val, NULL, 10) > (uint64_t)INT64_MAX) {
    int64_t v;
    double d = 0;
    CHECK_STATUS(msh_gguf_get_int(g, k, &v), MSH_ERANGE);
    CHECK_OK(msh_gguf_get_float(g, k, &d));
    CHECK(d == (double)strtoull(val, NULL, 10));
  } else {
    int64_t v = 0;
    CHECK_OK(msh_gguf_get_int(g, k, &v));
    CHECK(v == strtoll(val, NULL, 10));
  }
}

static uint64_t array_hash(msh_gguf *g, int k, int et, uint64_t n) {
  uint64_t h = 0xCBF29CE484222325ull;
  const uint8_t *raw = NULL;
  if (et != MSH_GGUF_STRING) CHECK_OK(msh_gguf_array_data(g, k, (const void **)&raw));
  for (uint64_t j = 0; j < n; j++) {
    uint8_t e[8];
    if (et == MSH_GGUF_STRING) {
      const char *s = NULL;
      size_t len = 0;
      if (msh_gguf_array_string(g, k, j, &s, &len) != MSH_OK) return 0;
      uint64_t l = len;
      put_u64(e, l);
      h = fnv(fnv(h, e, 8), s, len);
      continue;
    }
    if (et == MSH_GGUF_F32 || et == MSH_GGUF_F64) {
      double d = 0;
      if (msh_gguf_array_float(g, k, j, &d) != MSH_OK) return 0;
      memcpy(e, &d, 8);
    } else if (et == MSH_GGUF_U64) {
      memcpy(e, raw + 8 * j, 8);
    } else {
      int64_t v = 0;
      if (msh_gguf_array_int(g, k, j, &v) != MSH_OK) return 0;
      put_u64(e, (uint64_t)v);
    }
    h = fnv(h, e, 8);
  }
  return h;
}

static void check_elem(msh_gguf *g, int k, uint64_t j, const char *val) {
  int et = -1;
  CHECK_OK(msh_gguf_get_array(g, k, &et, NULL));
  if (et == MSH_GGUF_STRING) {
    uint8_t want[4096];
    size_t wn = unhex(val, want, sizeof want), len = 0;
    const char *s = NULL;
    CHECK_OK(msh_gguf_array_string(g, k, j, &s, &len));
    CHECK(len == wn && (len == 0 || memcmp(s, want, len) == 0));
  } else if (et == MSH_GGUF_F32 || et == MSH_GGUF_F64) {
    double v = 0;
    CHECK_OK(msh_gguf_array_float(g, k, j, &v));
    CHECK(v == strtod(val, NULL));
  } else if (et == MSH_GGUF_U64 && strtoull(val, NULL, 10) > (uint64_t)INT64_MAX) {
    int64_t v;
    CHECK_STATUS(msh_gguf_array_int(g, k, j, &v), MSH_ERANGE);
  } else {
    int64_t v = 0;
    CHECK_OK(msh_gguf_array_int(g, k, j, &v));
    CHECK(v == strtoll(val, NULL, 10));
  }
}

static void check_tensor(msh_gguf *g, char **f, int nf) {
  int i = -1;
  CHECK_OK(msh_gguf_find_tensor(g, f[1], &i));
  if (i < 0) return;
  CHECK(strcmp(msh_gguf_tensor_name(g, i), f[1]) == 0);
  int type = -1, ndim = -1;
  int64_t shape[4];
  uint64_t off = 0, nbytes = 0;
  CHECK_OK(msh_gguf_tensor_info(g, i, &type, &ndim, shape, &off, &nbytes));
  CHECK(strcmp(msh_gguf_ggml_type_name(type), f[2]) == 0);
  int want_nd = atoi(f[3]);
  CHECK(ndim == want_nd && nf == 7 + want_nd);
  for (int d = 0; d < want_nd && d < ndim; d++) CHECK(shape[d] == strtoll(f[4 + d], NULL, 10));
  CHECK(off == strtoull(f[4 + want_nd], NULL, 10));
  CHECK(nbytes == strtoull(f[5 + want_nd], NULL, 10));
  const char *sum = f[6 + want_nd];
  msh_tensor *t = NULL;
  if (strcmp(sum, "-") == 0) {
    CHECK_STATUS(msh_gguf_tensor(g, i, &t), MSH_EUNSUPPORTED);
    CHECK(has(f[1]) && has(f[2]) && has("which moonshard does not load"));
    return;
  }
  CHECK_OK(msh_gguf_tensor(g, i, &t));
  if (!t) return;
  CHECK(msh_tensor_ndim(t) == ndim);
  for (int d = 0; d < ndim; d++) CHECK(msh_tensor_dim(t, d) == shape[d]);
  /* every loadable type, the quantized ones included, is a read-only view of the file */
  int want_dt = type == MSH_GGML_Q8_0 ? MSH_Q8_0 : type == MSH_GGML_Q4_0 ? MSH_Q4_0 : type == MSH_GGML_Q4_1 ? MSH_Q4_1 : -1;
  CHECK(msh_tensor_is_readonly(t));
  CHECK(want_dt < 0 || msh_tensor_dtype(t) == want_dt);
  CHECK((const uint8_t *)msh_tensor_data(t) == (const uint8_t *)msh_file_data(msh_gguf_file(g)) + off);
  double want = strtod(sum, NULL), got = value_sum(t);
  if (!close_enough(got, want, 1e-9, 1e-9)) {
    fprintf(stderr, "tensor %s: sum %.17g, gguf package %.17g\n", f[1], got, want);
    CHECK(0);
  }
  msh_tensor_free(t);
}

/* Checks every record of a description written by tools/make_gguf_fixtures.py. */
static void check_description(msh_gguf *g, const char *desc_path, uint32_t version) {
  FILE *fp = fopen(desc_path, "r");
  CHECK(fp != NULL);
  if (!fp) return;
  char line[8192];
  int kvs = 0;
  while (fgets(line, sizeof line, fp)) {
    char *f[16];
    int nf = 0;
    for (char *tok = strtok(line, " \n"); tok && nf < 16; tok = strtok(NULL, " \n")) f[nf++] = tok;
    if (nf < 2) continue;
    if (strcmp(f[0], "version") == 0) CHECK(msh_gguf_version(g) == (version ? version : (uint32_t)atoi(f[1])));
    else if (strcmp(f[0], "alignment") == 0) CHECK(msh_gguf_alignment(g) == (uint32_t)atoi(f[1]));
    else if (strcmp(f[0], "keys") == 0) CHECK(msh_gguf_key_count(g) == atoi(f[1]));
    else if (strcmp(f[0], "tensors") == 0) CHECK(msh_gguf_tensor_count(g) == atoi(f[1]));
    else if (strcmp(f[0], "tensor") == 0) check_tensor(g, f, nf);
    else if (strcmp(f[0], "kv") == 0 || strcmp(f[0], "elem") == 0) {
      int k = -1;
      CHECK_OK(msh_gguf_find_key(g, f[1], &k));
      if (k < 0) continue;
      CHECK(strcmp(msh_gguf_key_name(g, k), f[1]) == 0);
      if (strcmp(f[0], "elem") == 0) {
        check_elem(g, k, strtoull(f[2], NULL, 10), f[3]);
        continue;
      }
      kvs++;
      CHECK(strcmp(type_names[msh_gguf_key_type(g, k)], f[2]) == 0);
      if (strcmp(f[2], "array") != 0) {
        check_scalar(g, k, f[2], f[3]);
        continue;
      }
      int et = -1;
      uint64_t n = 0;
      CHECK_OK(msh_gguf_get_array(g, k, &et, &n));
      CHECK(strcmp(type_names[et], f[3]) == 0);
      CHECK(n == strtoull(f[4], NULL, 10));
      CHECK(array_hash(g, k, et, n) == strtoull(f[5], NULL, 16));
    }
  }
  fclose(fp);
  CHECK(kvs == msh_gguf_key_count(g));
}

/* -------------------------------------------------------------------------------- fixtures */

static void test_tiny_random(void) {
  msh_gguf *g = NULL;
  CHECK_OK(msh_gguf_open(&g, TINY));
  if (!g) return;
  check_description(g, FIXTURES "tiny_random_llama.txt", 0);
  /* the facts the loader relies on, spelled out */
  int k = -1;
  const char *s = NULL;
  size_t len = 0;
  int64_t v = 0;
  int et = -1;
  uint64_t n = 0;
  CHECK_OK(msh_gguf_find_key(g, "general.architecture", &k));
  CHECK_OK(msh_gguf_get_string(g, k, &s, &len));
  CHECK(len == 5 && memcmp(s, "llama", 5) == 0);
  CHECK_OK(msh_gguf_find_key(g, "llama.embedding_length", &k));
  CHECK_OK(msh_gguf_get_int(g, k, &v));
  CHECK(v == 8);
  CHECK_OK(msh_gguf_find_key(g, "tokenizer.ggml.tokens", &k));
  CHECK_OK(msh_gguf_get_array(g, k, &et, &n));
  CHECK(et == MSH_GGUF_STRING && n == 32000);
  CHECK_OK(msh_gguf_array_string(g, k, 1, &s, &len));
  CHECK(len == 3 && memcmp(s, "<s>", 3) == 0);
  int i = -1, type = -1, nd = 0;
  int64_t shape[4];
  CHECK_OK(msh_gguf_find_tensor(g, "token_embd.weight", &i));
  CHECK_OK(msh_gguf_tensor_info(g, i, &type, &nd, shape, NULL, NULL));
  CHECK(type == MSH_GGML_F16 && nd == 2 && shape[0] == 32000 && shape[1] == 8);
  CHECK_STATUS(msh_gguf_find_tensor(g, "no.such.tensor", &i), MSH_ENOENT);
  msh_gguf_free(g);
}

static void test_synth(const char *path, uint32_t version) {
  msh_gguf *g = NULL;
  CHECK_OK(msh_gguf_open(&g, path));
  if (!g) return;
  CHECK(msh_gguf_version(g) == version);
  check_description(g, FIXTURES "synth.txt", version);

  /* every loadable float tensor against the gguf package's dequantized values */
  buf ref = {0};
  CHECK(read_all(FIXTURES "synth_ref.bin", &ref));
  size_t at = 0;
  for (int i = 0; i < msh_gguf_tensor_count(g); i++) {
    int type = -1;
    msh_gguf_tensor_info(g, i, &type, NULL, NULL, NULL, NULL);
    if (type != MSH_GGML_F32 && type != MSH_GGML_F16 && type != MSH_GGML_BF16 &&
        type != MSH_GGML_Q8_0 && type != MSH_GGML_Q4_0 && type != MSH_GGML_Q4_1)
      continue;
    msh_tensor *t = NULL, *f = NULL;
    CHECK_OK(msh_gguf_tensor(g, i, &t));
    if (!t) continue;
    CHECK_OK(msh_tensor_contiguous(&f, t, MSH_F32));
    int64_t n = msh_tensor_numel(t);
    int bad = 0;
    for (int64_t e = 0; f && e < n && at + 4 * (size_t)(e + 1) <= ref.n; e++) {
      float want, got = ((const float *)msh_tensor_data(f))[e];
      memcpy(&want, ref.p + at + 4 * (size_t)e, 4);
      /* Q4_1 is d * q + m: a fused multiply-add may round once instead of twice */
      double tol = type == MSH_GGML_Q4_1 ? 1e-6 : 0;
      if (!close_enough(got, want, tol, tol)) bad++;
    }
    if (bad) fprintf(stderr, "tensor %s: %d values differ\n", msh_gguf_tensor_name(g, i), bad);
    CHECK(bad == 0);
    at += 4 * (size_t)n;
    msh_tensor_free(f);
    msh_tensor_free(t);
  }
  CHECK(at == ref.n);
  free(ref.p);

  /* misuse: wrong types, out-of-range indices, absent names */
  int k = -1, ks = -1, ka = -1;
  int64_t v;
  double d = 0;
  const char *s;
  size_t len;
  CHECK_OK(msh_gguf_find_key(g, "test.u8", &k));
  CHECK_OK(msh_gguf_find_key(g, "test.string", &ks));
  CHECK_OK(msh_gguf_find_key(g, "arr.i32", &ka));
  CHECK_STATUS(msh_gguf_get_string(g, k, &s, &len), MSH_EINVAL);
  CHECK(has("test.u8") && has("not a string"));
  CHECK_STATUS(msh_gguf_get_int(g, ks, &v), MSH_EINVAL);
  CHECK_STATUS(msh_gguf_get_float(g, ks, &d), MSH_EINVAL);
  CHECK_STATUS(msh_gguf_get_array(g, ks, NULL, NULL), MSH_EINVAL);
  CHECK_OK(msh_gguf_get_float(g, k, &d)); /* integers convert to float */
  CHECK(d == 200.0);
  CHECK_STATUS(msh_gguf_get_int(g, -1, &v), MSH_ERANGE);
  CHECK_STATUS(msh_gguf_get_int(g, msh_gguf_key_count(g), &v), MSH_ERANGE);
  CHECK(msh_gguf_key_name(g, msh_gguf_key_count(g)) == NULL);
  CHECK(msh_gguf_key_type(g, -1) == -1);
  CHECK_STATUS(msh_gguf_array_int(g, ka, 5, &v), MSH_ERANGE);
  CHECK_STATUS(msh_gguf_array_string(g, ka, 0, &s, &len), MSH_EINVAL);
  CHECK_STATUS(msh_gguf_array_int(g, k, 0, &v), MSH_EINVAL);
  CHECK_STATUS(msh_gguf_find_key(g, "no.such.key", &k), MSH_ENOENT);
  CHECK(has("no.such.key"));
  CHECK_STATUS(msh_gguf_tensor(g, msh_gguf_tensor_count(g), NULL), MSH_EINVAL);
  msh_tensor *t = NULL;
  CHECK_STATUS(msh_gguf_tensor(g, msh_gguf_tensor_count(g), &t), MSH_ERANGE);
  CHECK(msh_gguf_tensor_name(g, -1) == NULL);
  int i = -1;
  CHECK_OK(msh_gguf_find_tensor(g, "blk.0.attn_q.weight", &i));
  CHECK_STATUS(msh_gguf_tensor(g, i, &t), MSH_EUNSUPPORTED);
  CHECK(has("tensor 'blk.0.attn_q.weight' has type Q4_K, which moonshard does not load"));
  /* a view keeps the file mapped after the handle is gone */
  CHECK_OK(msh_gguf_find_tensor(g, "t.f32", &i));
  CHECK_OK(msh_gguf_tensor(g, i, &t));
  msh_gguf_free(g);
  if (t) {
    CHECK(msh_tensor_dim(t, 0) == 3 && msh_tensor_dim(t, 1) == 5 && value_sum(t) != 0);
    msh_tensor_free(t);
  }
  msh_gguf_free(NULL);
}

/* ---------------------------------------------------------------------------- hand-built */

static void emit(buf *b, const void *p, size_t n) {
  if (b->n + n > b->cap) {
    b->cap = 2 * (b->n + n) + 64;
    b->p = realloc(b->p, b->cap);
  }
  memcpy(b->p + b->n, p, n);
  b->n += n;
}
static void emit_u32(buf *b, uint32_t v) {
  uint8_t e[4];
  put_u32(e, v);
  emit(b, e, 4);
}
static void emit_u64(buf *b, uint64_t v) {
  uint8_t e[8];
  put_u64(e, v);
  emit(b, e, 8);
}
static void emit_str(buf *b, const char *s) {
  emit_u64(b, strlen(s));
  emit(b, s, strlen(s));
}
static void emit_header(buf *b, uint32_t version, uint64_t nt, uint64_t nkv) {
  emit(b, "GGUF", 4);
  emit_u32(b, version);
  emit_u64(b, nt);
  emit_u64(b, nkv);
}

static void test_hand_built(void) {
  msh_gguf *g = NULL;
  buf b = {0};

  /* empty and tiny files */
  CHECK_STATUS(open_bytes((const uint8_t *)"", 0, NULL), MSH_EFORMAT);
  CHECK(has("truncated") && has(tmp_path));
  CHECK_STATUS(open_bytes((const uint8_t *)"GGU", 3, NULL), MSH_EFORMAT);
  CHECK_STATUS(msh_gguf_open(&g, "/nonexistent/model.gguf"), MSH_ENOENT);
  CHECK_STATUS(msh_gguf_open(NULL, TINY), MSH_EINVAL);

  /* the smallest valid file: v2, nothing in it */
  emit_header(&b, 2, 0, 0);
  CHECK_OK(open_bytes(b.p, b.n, &g));
  CHECK(msh_gguf_key_count(g) == 0 && msh_gguf_tensor_count(g) == 0 && msh_gguf_version(g) == 2);
  CHECK(msh_gguf_alignment(g) == 32);
  msh_gguf_free(g);
  g = NULL;

  /* empty arrays, a scalar tensor and a tensor with a zero dim; data at the default alignment */
  b.n = 0;
  emit_header(&b, 3, 2, 3);
  emit_str(&b, "e.i32");
  emit_u32(&b, MSH_GGUF_ARRAY);
  emit_u32(&b, MSH_GGUF_I32);
  emit_u64(&b, 0);
  emit_str(&b, "e.str");
  emit_u32(&b, MSH_GGUF_ARRAY);
  emit_u32(&b, MSH_GGUF_STRING);
  emit_u64(&b, 0);
  emit_str(&b, "b");
  emit_u32(&b, MSH_GGUF_BOOL);
  emit(&b, "\x01", 1);
  emit_str(&b, "scalar");
  emit_u32(&b, 0);
  emit_u32(&b, MSH_GGML_F32);
  emit_u64(&b, 0);
  emit_str(&b, "empty");
  emit_u32(&b, 2);
  emit_u64(&b, 4);
  emit_u64(&b, 0);
  emit_u32(&b, MSH_GGML_F16);
  emit_u64(&b, 0);
  while (b.n % 32) emit(&b, "", 1);
  float one = 1.0f;
  emit(&b, &one, 4);
  CHECK_OK(open_bytes(b.p, b.n, &g));
  if (g) {
    int k = -1, et = -1, i = -1;
    uint64_t n = 99;
    int64_t v = 0;
    const char *s;
    size_t len;
    CHECK_OK(msh_gguf_find_key(g, "e.str", &k));
    CHECK_OK(msh_gguf_get_array(g, k, &et, &n));
    CHECK(et == MSH_GGUF_STRING && n == 0);
    CHECK_STATUS(msh_gguf_array_string(g, k, 0, &s, &len), MSH_ERANGE);
    CHECK_OK(msh_gguf_find_key(g, "e.i32", &k));
    CHECK_STATUS(msh_gguf_array_int(g, k, 0, &v), MSH_ERANGE);
    CHECK_OK(msh_gguf_find_key(g, "b", &k));
    CHECK_OK(msh_gguf_get_int(g, k, &v));
    CHECK(v == 1);
    msh_tensor *t = NULL;
    CHECK_OK(msh_gguf_find_tensor(g, "scalar", &i));
    CHECK_OK(msh_gguf_tensor(g, i, &t));
    CHECK(t && msh_tensor_ndim(t) == 0 && *(const float *)msh_tensor_data(t) == 1.0f);
    msh_tensor_free(t);
    t = NULL;
    CHECK_OK(msh_gguf_find_tensor(g, "empty", &i));
    CHECK_OK(msh_gguf_tensor(g, i, &t));
    CHECK(t && msh_tensor_ndim(t) == 2 && msh_tensor_dim(t, 0) == 0 && msh_tensor_dim(t, 1) == 4);
    msh_tensor_free(t);
  }
  msh_gguf_free(g);
  g = NULL;

  /* an array of arrays */
  b.n = 0;
  emit_header(&b, 3, 0, 1);
  emit_str(&b, "nested");
  emit_u32(&b, MSH_GGUF_ARRAY);
  emit_u32(&b, MSH_GGUF_ARRAY);
  emit_u64(&b, 1);
  emit_u32(&b, MSH_GGUF_U8);
  emit_u64(&b, 1);
  emit(&b, "x", 1);
  CHECK_STATUS(open_bytes(b.p, b.n, NULL), MSH_EUNSUPPORTED);
  CHECK(has("nested") && has("array of arrays"));

  /* a Q8_0 block by hand: d = 0.5, q = -16 .. 15, and a Q4_0 and Q4_1 block with known nibbles */
  b.n = 0;
  emit_header(&b, 3, 3, 0);
  const char *names[3] = {"q8", "q40", "q41"};
  int types[3] = {MSH_GGML_Q8_0, MSH_GGML_Q4_0, MSH_GGML_Q4_1};
  uint64_t offs[3] = {0, 64, 96};
  for (int t = 0; t < 3; t++) {
    emit_str(&b, names[t]);
    emit_u32(&b, 1);
    emit_u64(&b, 32);
    emit_u32(&b, (uint32_t)types[t]);
    emit_u64(&b, offs[t]);
  }
  while (b.n % 32) emit(&b, "", 1);
  size_t data = b.n;
  uint8_t blk[128] = {0};
  uint16_t half = msh_f32_to_f16(0.5f), quarter = msh_f32_to_f16(0.25f), mval = msh_f32_to_f16(-1.0f);
  memcpy(blk, &half, 2);
  for (int j = 0; j < 32; j++) blk[2 + j] = (uint8_t)(int8_t)(j - 16);
  memcpy(blk + 64, &quarter, 2);
  for (int j = 0; j < 16; j++) blk[64 + 2 + j] = (uint8_t)(j | (15 - j) << 4);
  memcpy(blk + 96, &quarter, 2);
  memcpy(blk + 98, &mval, 2);
  for (int j = 0; j < 16; j++) blk[96 + 4 + j] = (uint8_t)(j | (15 - j) << 4);
  emit(&b, blk, sizeof blk);
  CHECK_OK(open_bytes(b.p, b.n, &g));
  for (int t = 0; g && t < 3; t++) {
    msh_tensor *q = NULL, *x = NULL;
    CHECK_OK(msh_gguf_tensor(g, t, &q));
    if (!q) continue;
    CHECK(msh_tensor_dtype(q) == (t == 0 ? MSH_Q8_0 : t == 1 ? MSH_Q4_0 : MSH_Q4_1));
    CHECK_OK(msh_tensor_contiguous(&x, q, MSH_F32)); /* dequantized */
    msh_tensor_free(q);
    if (!x) continue;
    const float *v = msh_tensor_data(x);
    int bad = 0;
    for (int j = 0; j < 32; j++) {
      int q = j < 16 ? j : 15 - (j - 16); /* low nibbles first, then high */
      float want = t == 0 ? 0.5f * (float)(j - 16) : t == 1 ? 0.25f * (float)(q - 8) : 0.25f * (float)q - 1.0f;
      bad += v[j] != want;
    }
    CHECK(bad == 0);
    msh_tensor_free(x);
  }
  msh_gguf_free(g);
  g = NULL;
  (void)data;
  free(b.p);
}

/* --------------------------------------------------------------------------- corruptions */

static void test_corrupt(void) {
  buf b = {0};
  CHECK(read_all(FIXTURES "synth.gguf", &b));
  if (!b.p) return;
  uint8_t *c = malloc(b.n);
#define FRESH() memcpy(c, b.p, b.n)

  FRESH();
  c[0] = 'X';
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EFORMAT);
  CHECK(has("not a GGUF file") && has(tmp_path));
  FRESH();
  put_u32(c + 4, 1);
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EUNSUPPORTED);
  CHECK(has("version 1"));
  put_u32(c + 4, 4);
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EUNSUPPORTED);
  put_u32(c + 4, 3u << 24);
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EUNSUPPORTED);
  CHECK(has("big-endian"));
  put_u32(c + 4, 2); /* v2 has the same layout */
  CHECK_OK(open_bytes(c, b.n, NULL));
  test_synth(write_tmp(c, b.n), 2);

  /* absurd counts */
  FRESH();
  put_u64(c + 8, 1ull << 40);
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EFORMAT);
  CHECK(has("cannot fit"));
  FRESH();
  put_u64(c + 16, 1ull << 62);
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EFORMAT);
  FRESH();
  put_u64(c + 16, UINT64_MAX);
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EFORMAT);
  FRESH();
  put_u64(c + 8, 13); /* one tensor more than there is: parsing runs into padding and data */
  msh_status st = open_bytes(c, b.n, NULL);
  CHECK(st == MSH_OK || st == MSH_EFORMAT || st == MSH_EUNSUPPORTED);
  FRESH();
  put_u64(c + 16, 29); /* one key more */
  st = open_bytes(c, b.n, NULL);
  CHECK(st == MSH_OK || st == MSH_EFORMAT || st == MSH_EUNSUPPORTED);

  /* string lengths past the end */
  FRESH();
  put_u64(c + 24, (1ull << 63) - 1);
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EFORMAT);
  CHECK(has("past the end"));
  FRESH();
  put_u64(c + 24, UINT64_MAX);
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EFORMAT);
  size_t p = after_string(&b, "test.string");
  CHECK(p > 0);
  FRESH();
  put_u64(c + p + 4, b.n);
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EFORMAT);
  CHECK(has("test.string"));
  p = after_string(&b, "arr.string");
  CHECK(p > 0);
  FRESH();
  put_u64(c + p + 16, 1ull << 60); /* the first element's length */
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EFORMAT);
  CHECK(has("arr.string"));
  FRESH();
  put_u64(c + p + 8, 1ull << 61); /* the element count */
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EFORMAT);

  /* array lengths whose byte size overflows 64 bits */
  p = after_string(&b, "arr.u64");
  CHECK(p > 0);
  FRESH();
  put_u64(c + p + 8, 1ull << 61);
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EFORMAT);
  CHECK(has("arr.u64"));
  FRESH();
  put_u64(c + p + 8, UINT64_MAX);
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EFORMAT);
  FRESH();
  put_u32(c + p + 4, MSH_GGUF_ARRAY);
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EUNSUPPORTED);
  FRESH();
  put_u32(c + p + 4, 13);
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EFORMAT);
  FRESH();
  put_u32(c + p, 77); /* the value type */
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EFORMAT);
  CHECK(has("unknown value type 77"));

  /* duplicate key, bad alignment */
  p = after_string(&b, "test.u8");
  FRESH();
  c[p - 2] = 'i';
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EFORMAT);
  CHECK(has("'test.i8' appears twice"));
  p = after_string(&b, "general.alignment");
  CHECK(p > 0);
  FRESH();
  put_u32(c + p + 4, 48);
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EFORMAT);
  CHECK(has("power of two"));
  put_u32(c + p + 4, 0);
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EFORMAT);
  FRESH();
  put_u32(c + p, MSH_GGUF_I32);
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EFORMAT);
  FRESH();
  put_u32(c + p + 4, 128); /* a larger alignment: the offsets of 64 no longer fit it */
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EFORMAT);

  /* tensor infos: t.f32_4d is { u32 ndim = 4, u64 dims[4], u32 type, u64 offset } */
  p = after_string(&b, "t.f32_4d");
  CHECK(p > 0);
  size_t type_at = p + 4 + 4 * 8, off_at = type_at + 4;
  FRESH();
  put_u32(c + p, 5);
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EFORMAT);
  CHECK(has("t.f32_4d") && has("5 dims"));
  FRESH();
  put_u32(c + p, 0xffffffffu);
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EFORMAT);
  FRESH();
  put_u64(c + p + 4, 1ull << 62);
  put_u64(c + p + 12, 1ull << 62);
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EFORMAT);
  CHECK(has("63 bits"));
  FRESH();
  put_u64(c + p + 4, 1ull << 63);
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EFORMAT);
  FRESH();
  put_u64(c + p + 4, 1ull << 30); /* fits in 64 bits, not in the file */
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EFORMAT);
  CHECK(has("runs past the end"));
  FRESH();
  put_u32(c + type_at, 99);
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EUNSUPPORTED);
  CHECK(has("unknown ggml type 99"));
  FRESH();
  put_u32(c + type_at, MSH_GGML_Q4_0); /* rows of 2 elements cannot hold 32-element blocks */
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EFORMAT);
  CHECK(has("not a multiple of 32"));
  FRESH();
  put_u64(c + off_at, 1ull << 40);
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EFORMAT);
  CHECK(has("t.f32_4d") && has("runs past the end"));
  FRESH();
  put_u64(c + off_at, UINT64_MAX - 63);
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EFORMAT);
  FRESH();
  put_u64(c + off_at, 65);
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EFORMAT);
  CHECK(has("alignment"));
  p = after_string(&b, "t.f32_3d");
  FRESH();
  c[p - 1] = 'd';
  c[p - 2] = '4';
  CHECK_STATUS(open_bytes(c, b.n, NULL), MSH_EFORMAT);
  CHECK(has("appears twice"));

  /* every truncation: an error until the last tensor's data is complete, fine after */
  size_t data_end = 0;
  {
    msh_gguf *g = NULL;
    CHECK_OK(msh_gguf_open(&g, FIXTURES "synth.gguf"));
    for (int i = 0; g && i < msh_gguf_tensor_count(g); i++) {
      uint64_t off = 0, nb = 0;
      msh_gguf_tensor_info(g, i, NULL, NULL, NULL, &off, &nb);
      if (off + nb > data_end) data_end = (size_t)(off + nb);
    }
    msh_gguf_free(g);
  }
  CHECK(data_end > 0 && data_end <= b.n);
  int wrong = 0;
  for (size_t n = 0; n < b.n; n++) {
    msh_status s = open_bytes(b.p, n, NULL);
    if (n < data_end ? s != MSH_EFORMAT : s != MSH_OK) {
      if (wrong++ < 5) fprintf(stderr, "truncated at %zu: %s %s\n", n, msh_status_name(s), msh_last_error());
    }
  }
  CHECK(wrong == 0);
  free(c);
  free(b.p);
#undef FRESH
}

static void test_tiny_truncated(void) {
  buf b = {0};
  CHECK(read_all(TINY, &b));
  if (!b.p) return;
  int wrong = 0;
  const char *path = write_tmp(b.p, b.n);
  CHECK_STATUS(truncate(path, (off_t)b.n - 1) == 0 ? msh_gguf_open(&(msh_gguf *){NULL}, path) : MSH_EIO,
               MSH_EFORMAT);
  CHECK(has("output.weight") && has("runs past the end"));
  /* shrink the one file step by step: every cut lands before the end of some tensor's data */
  size_t n = b.n - 1;
  for (int step = 0; n > 0; step++) {
    n = n > 4099 * 2 ? n - 4099 : n > 7 ? n - 7 : 0;
    msh_gguf *g = NULL;
    msh_status s = truncate(path, (off_t)n) == 0 ? msh_gguf_open(&g, path) : MSH_EIO;
    msh_gguf_free(g);
    if (s != MSH_EFORMAT && wrong++ < 5)
      fprintf(stderr, "tiny truncated at %zu: %s %s\n", n, msh_status_name(s), msh_last_error());
  }
  CHECK(wrong == 0);
  free(b.p);
}

/* Random byte damage: every outcome is OK or a clean error; whatever opens can be read fully. */
static void test_random_damage(void) {
  buf b = {0};
  CHECK(read_all(FIXTURES "synth.gguf", &b));
  if (!b.p) return;
  uint8_t *c = malloc(b.n);
  uint64_t x = 0x9E3779B97F4A7C15ull;
  int opened = 0, failed = 0;
  for (int it = 0; it < 3000; it++) {
    memcpy(c, b.p, b.n);
    int flips = 1 + (int)(x % 8);
    for (int f = 0; f < flips; f++) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      size_t at = (size_t)(x % 2048);
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      c[at] = (x & 3) == 0 ? 0xff : (x & 3) == 1 ? 0 : (uint8_t)(x >> 8);
    }
    msh_gguf *g = NULL;
    msh_status s = open_bytes(c, b.n, &g);
    if (s != MSH_OK) {
      failed++;
      if (s != MSH_EFORMAT && s != MSH_EUNSUPPORTED) CHECK(0);
      continue;
    }
    opened++;
    for (int k = 0; k < msh_gguf_key_count(g); k++) {
      int64_t v;
      double d;
      const char *str;
      size_t len;
      int et;
      uint64_t n = 0;
      msh_gguf_get_int(g, k, &v);
      msh_gguf_get_float(g, k, &d);
      msh_gguf_get_string(g, k, &str, &len);
      if (msh_gguf_get_array(g, k, &et, &n) == MSH_OK)
        for (uint64_t j = 0; j < n && j < 64; j++) {
          msh_gguf_array_int(g, k, j, &v);
          msh_gguf_array_float(g, k, j, &d);
          msh_gguf_array_string(g, k, j, &str, &len);
        }
    }
    for (int i = 0; i < msh_gguf_tensor_count(g); i++) {
      msh_tensor *t = NULL;
      if (msh_gguf_tensor(g, i, &t) == MSH_OK) value_sum(t);
      msh_tensor_free(t);
    }
    msh_gguf_free(g);
  }
  printf("random damage: %d opened, %d rejected\n", opened, failed);
  CHECK(failed > 0);
  free(c);
  free(b.p);
}

int main(void) {
  test_tiny_random();
  test_synth(FIXTURES "synth.gguf", 3);
  test_hand_built();
  test_corrupt();
  test_tiny_truncated();
  test_random_damage();
  unlink(tmp_path);
  return check_done("test_gguf");
}
