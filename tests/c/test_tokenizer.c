/* test_tokenizer.c: the SentencePiece-style BPE tokenizer over llama2.c's tok512.bin. */
#include "check.h"

#include <stdint.h>
#include <string.h>
#include <unistd.h>

#define TOK_PATH MSH_DATA_DIR "/models/stories260K/tok512.bin"
#define FIXTURE MSH_ROOT "/tests/fixtures/sp/tok512_ids.txt"

/* ------------------------------------------------------------------------------ helpers */

static unsigned char *read_all(const char *path, size_t *n) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  long sz = ftell(f);
  fseek(f, 0, SEEK_SET);
  unsigned char *buf = malloc(sz > 0 ? (size_t)sz + 1 : 1);
  if (buf && fread(buf, 1, (size_t)sz, f) != (size_t)sz) {
    free(buf);
    buf = NULL;
  }
  fclose(f);
  if (buf) buf[sz] = 0;
  *n = (size_t)sz;
  return buf;
}

/* Writes bytes to a fresh temporary file; its path goes into path (at least 32 bytes). */
static int write_tmp(char *path, const void *data, size_t n) {
  strcpy(path, "/tmp/msh_tok_XXXXXX");
  int fd = mkstemp(path);
  if (fd < 0) return 0;
  int ok = write(fd, data, n) == (ssize_t)n;
  close(fd);
  return ok;
}

/* Concatenated pieces of ids. */
static size_t decode(const msh_tokenizer *t, const int32_t *ids, int n, char *out, size_t cap) {
  size_t len = 0;
  for (int i = 0; i < n; i++) {
    const char *p;
    size_t k;
    if (msh_tokenizer_piece(t, ids[i], &p, &k) != MSH_OK || len + k > cap) return (size_t)-1;
    memcpy(out + len, p, k);
    len += k;
  }
  return len;
}

/* decode(encode(text)) == " " + text for non-empty text. */
static int round_trips(const msh_tokenizer *t, const char *text, size_t len) {
  int cap = (int)len + 8, n = -1;
  int32_t *ids = malloc((size_t)cap * sizeof *ids);
  char *back = malloc(len + 8);
  int ok = ids && back && msh_tokenizer_encode(t, text, len, 1, ids, cap, &n) == MSH_OK && n >= 1 &&
           ids[0] == 1;
  if (ok) {
    size_t m = decode(t, ids + 1, n - 1, back, len + 8);
    ok = m == len + 1 && back[0] == ' ' && memcmp(back + 1, text, len) == 0;
  }
  if (!ok) fprintf(stderr, "  round trip failed for \"%.60s\"\n", text);
  free(ids);
  free(back);
  return ok;
}

static int contains(const int32_t *ids, int n, int32_t id) {
  for (int i = 0; i < n; i++)
    if (ids[i] == id) return 1;
  return 0;
}

/* --------------------------------------------------------- a naive reference in the test */

/* The textbook O(n^2) loop over raw vocabulary pieces, for comparing long random texts (all
 * ASCII letters, space and punctuation that tok512 spells directly, so no byte fallbacks). */
typedef struct {
  int n;
  char *piece[600];
  int len[600];
  float score[600];
} ref_vocab;

static int ref_load(ref_vocab *v, const unsigned char *d, size_t size) {
  size_t pos = 4;
  v->n = 0;
  while (pos + 8 <= size && v->n < 600) {
    float sc;
    int32_t n;
    memcpy(&sc, d + pos, 4);
    memcpy(&n, d + pos + 4, 4);
    pos += 8;
    v->piece[v->n] = (char *)d + pos;
    v->len[v->n] = n;
    v->score[v->n] = sc;
    v->n++;
    pos += (size_t)n;
  }
  return pos == size;
}

static int ref_find(const ref_vocab *v, const char *s, int n) {
  for (int i = 3 + 256; i < v->n; i++)
    if (v->len[i] == n && memcmp(v->piece[i], s, (size_t)n) == 0) return i;
  return -1;
}

static int ref_encode(const ref_vocab *v, const char *text, int len, int *toks) {
  char buf[64];
  int n = 0;
  toks[n++] = ref_find(v, " ", 1);
  for (int i = 0; i < len; i++) {
    toks[n] = ref_find(v, text + i, 1);
    if (toks[n++] < 0) return -1; /* the alphabet must be spelled by pieces */
  }
  for (;;) {
    int best = -1, at = -1;
    for (int j = 0; j + 1 < n; j++) {
      int a = v->len[toks[j]], b = v->len[toks[j + 1]];
      if (a + b > (int)sizeof buf) continue;
      memcpy(buf, v->piece[toks[j]], (size_t)a);
      memcpy(buf + a, v->piece[toks[j + 1]], (size_t)b);
      int m = ref_find(v, buf, a + b);
      if (m >= 0 && (best < 0 || v->score[m] > v->score[best])) {
        best = m;
        at = j;
      }
    }
    if (best < 0) return n;
    toks[at] = best;
    memmove(toks + at + 1, toks + at + 2, (size_t)(n - at - 2) * sizeof *toks);
    n--;
  }
}

/* ------------------------------------------------------------------------------- fixture */

/* Undoes tools/make_sp_fixture.py's escaping in place; returns the length. */
static size_t unescape(char *s) {
  size_t o = 0;
  for (size_t i = 0; s[i]; i++) {
    if (s[i] != '\\') {
      s[o++] = s[i];
      continue;
    }
    char c = s[++i];
    if (c == 'n') s[o++] = '\n';
    else if (c == 't') s[o++] = '\t';
    else if (c == 'r') s[o++] = '\r';
    else if (c == '\\') s[o++] = '\\';
    else if (c == 'x') {
      unsigned v = 0;
      sscanf(s + i + 1, "%2x", &v);
      s[o++] = (char)v;
      i += 2;
    }
  }
  return o;
}

static void test_fixture(const msh_tokenizer *t) {
  size_t n;
  char *all = (char *)read_all(FIXTURE, &n);
  CHECK(all != NULL);
  if (!all) return;
  int lines = 0;
  char *save = NULL;
  for (char *line = strtok_r(all, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
    char *tab = strchr(line, '\t');
    CHECK(tab != NULL);
    if (!tab) continue;
    *tab = 0;
    size_t len = unescape(line);
    int32_t want[1024];
    int nw = 0;
    for (char *p = tab + 1, *end; nw < 1024; p = end) {
      long v = strtol(p, &end, 10);
      if (end == p) break;
      want[nw++] = (int32_t)v;
    }
    int32_t got[1024];
    int ng = -1;
    CHECK_OK(msh_tokenizer_encode(t, line, len, 0, got, 1024, &ng));
    int same = ng == nw && memcmp(got, want, (size_t)nw * sizeof *got) == 0;
    if (!same) fprintf(stderr, "  fixture line %d: %d ids, wanted %d\n", lines + 1, ng, nw);
    CHECK(same);
    /* with BOS: the same ids after a 1 */
    CHECK_OK(msh_tokenizer_encode(t, line, len, 1, got, 1024, &ng));
    CHECK(ng == nw + 1 && got[0] == 1 && memcmp(got + 1, want, (size_t)nw * sizeof *got) == 0);
    if (len > 0) CHECK(round_trips(t, line, len));
    lines++;
  }
  CHECK(lines >= 10);
  free(all);
}

/* ---------------------------------------------------------------------------------- tests */

static void test_basics(const msh_tokenizer *t) {
  CHECK(msh_tokenizer_vocab_size(t) == 512);
  CHECK(msh_tokenizer_bos(t) == 1);
  CHECK(msh_tokenizer_eos(t) == 2);

  const char *p;
  size_t n;
  CHECK_OK(msh_tokenizer_piece(t, 1, &p, &n));
  CHECK(n == 0);
  CHECK_OK(msh_tokenizer_piece(t, 2, &p, &n));
  CHECK(n == 0);
  CHECK_OK(msh_tokenizer_piece(t, 0, &p, &n));
  CHECK(n == 5 && memcmp(p, "<unk>", 5) == 0);
  CHECK_OK(msh_tokenizer_piece(t, 3 + 'A', &p, &n));
  CHECK(n == 1 && p[0] == 'A');
  CHECK_OK(msh_tokenizer_piece(t, 3 + 0, &p, &n));
  CHECK(n == 1 && p[0] == 0);
  CHECK_OK(msh_tokenizer_piece(t, 3 + 0xFF, &p, &n));
  CHECK(n == 1 && (unsigned char)p[0] == 0xFF);
  CHECK_OK(msh_tokenizer_piece(t, 259, &p, &n));
  CHECK(n == 2 && memcmp(p, " t", 2) == 0);
  CHECK_STATUS(msh_tokenizer_piece(t, 512, &p, &n), MSH_ERANGE);
  CHECK_STATUS(msh_tokenizer_piece(t, -1, &p, &n), MSH_ERANGE);

  /* empty text: BOS alone, or nothing; no dummy prefix */
  int32_t ids[64];
  int k = -1;
  CHECK_OK(msh_tokenizer_encode(t, "", 0, 1, ids, 64, &k));
  CHECK(k == 1 && ids[0] == 1);
  CHECK_OK(msh_tokenizer_encode(t, NULL, 0, 0, NULL, 0, &k));
  CHECK(k == 0);

  /* a small cap says how many ids are needed and writes none */
  const char *s = "Once upon a time";
  CHECK_OK(msh_tokenizer_encode(t, s, strlen(s), 1, ids, 64, &k));
  int need = k;
  CHECK(need > 2);
  int32_t small[64];
  for (int i = 0; i < 64; i++) small[i] = -7;
  k = -1;
  CHECK_STATUS(msh_tokenizer_encode(t, s, strlen(s), 1, small, need - 1, &k), MSH_ERANGE);
  CHECK(k == need);
  CHECK(small[0] == -7);
  CHECK_STATUS(msh_tokenizer_encode(t, s, strlen(s), 0, NULL, 0, &k), MSH_ERANGE);
  CHECK(k == need - 1);
  CHECK_OK(msh_tokenizer_encode(t, s, strlen(s), 1, small, need, &k));
  CHECK(k == need && memcmp(small, ids, (size_t)need * sizeof *ids) == 0);
  CHECK_STATUS(msh_tokenizer_encode(t, s, strlen(s), 1, ids, -1, &k), MSH_EINVAL);
  CHECK_STATUS(msh_tokenizer_encode(t, NULL, 3, 1, ids, 64, &k), MSH_EINVAL);
}

static void test_round_trips(const msh_tokenizer *t) {
  static const char *texts[] = {
      "Once upon a time, there was a little dog named Max.",
      "Max liked to run and jump. One day, he found a big stick!",
      "\"Why are you sad?\" asked the bird. The girl said: 'I lost my toy...'",
      "!?.,;:-_()[]{}<>@#$%^&*+=/\\|~`",
      "naïve café 日本 🙂",
      "<s> </s> <unk> <0x41> look like special pieces but are text",
      "  leading and trailing spaces  ",
      "\n\n\t",
      "bad \xff\xfe bytes \x80 lone \xe6\x97 cut \xf4\x90\x80\x80 too big",
  };
  for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++)
    CHECK(round_trips(t, texts[i], strlen(texts[i])));

  /* text with a NUL byte inside: the length counts, not the terminator */
  CHECK(round_trips(t, "a\0b", 3));

  /* UTF-8 outside the vocabulary goes through byte fallbacks: 日 is E6 97 A5, 🙂 is F0 9F 99 82 */
  const char *u = "日本 🙂";
  int32_t ids[64];
  int n = 0;
  CHECK_OK(msh_tokenizer_encode(t, u, strlen(u), 0, ids, 64, &n));
  CHECK(contains(ids, n, 3 + 0xE6) && contains(ids, n, 3 + 0x97) && contains(ids, n, 3 + 0xA5));
  CHECK(contains(ids, n, 3 + 0xF0) && contains(ids, n, 3 + 0x82));
  /* é (C3 A9) is a piece of tok512: no byte fallback */
  CHECK_OK(msh_tokenizer_encode(t, "\xc3\xa9", 2, 0, ids, 64, &n));
  CHECK(!contains(ids, n, 3 + 0xC3));
  /* "<0x41>" typed as text never becomes the byte token 'A' */
  CHECK_OK(msh_tokenizer_encode(t, "<0x41>", 6, 0, ids, 64, &n));
  CHECK(!contains(ids, n, 3 + 0x41));
}

/* Long random texts against the naive loop: same ids (covers score ties and the heap). */
static void test_against_naive(const msh_tokenizer *t) {
  size_t size;
  unsigned char *d = read_all(TOK_PATH, &size);
  CHECK(d != NULL);
  if (!d) return;
  static ref_vocab v;
  CHECK(ref_load(&v, d, size));
  static const char alphabet[] = "abcdefghijklmnopqrstuvwxyz     eeettaaoo.,!TSOHL";
  static char text[3000];
  static int want[3100];
  static int32_t got[3100];
  uint64_t rng = 12345;
  int mismatches = 0;
  for (int trial = 0; trial < 6; trial++) {
    int len = trial < 3 ? 40 + 97 * trial : 1500 + 400 * (trial - 3);
    for (int i = 0; i < len; i++) {
      rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
      text[i] = alphabet[(rng >> 33) % (sizeof alphabet - 1)];
    }
    int nw = ref_encode(&v, text, len, want), ng = -1;
    CHECK_OK(msh_tokenizer_encode(t, text, (size_t)len, 0, got, 3100, &ng));
    if (ng != nw || memcmp(got, want, (size_t)nw * sizeof *got) != 0) mismatches++;
  }
  CHECK(mismatches == 0);
  /* many equal-score pairs in a row: the leftmost merges first */
  memset(text, 'e', 1000);
  int nw = ref_encode(&v, text, 1000, want), ng = -1;
  CHECK_OK(msh_tokenizer_encode(t, text, 1000, 0, got, 3100, &ng));
  CHECK(ng == nw && memcmp(got, want, (size_t)nw * sizeof *got) == 0);
  free(d);
}

static void check_bad(const char *what, const unsigned char *data, size_t n, int vocab,
                      msh_status want, const char *needle) {
  char path[64];
  CHECK(write_tmp(path, data, n));
  msh_tokenizer *t = NULL;
  msh_status s = msh_tokenizer_load_sp(&t, path, vocab);
  int ok = s == want && t == NULL && strstr(msh_last_error(), path) != NULL &&
           (!needle || strstr(msh_last_error(), needle) != NULL);
  if (!ok)
    fprintf(stderr, "  %s: got %s \"%s\"\n", what, msh_status_name(s), msh_last_error());
  CHECK(ok);
  msh_tokenizer_free(t);
  unlink(path);
}

static void test_bad_files(void) {
  size_t size;
  unsigned char *d = read_all(TOK_PATH, &size);
  CHECK(d != NULL && size == 6227);
  if (!d) return;
  unsigned char *c = malloc(size);

  check_bad("truncated", d, 3000, 512, MSH_EFORMAT, "truncated");
  /* inside token 1's length field (token 0 is "<unk>": 8 + 5 bytes) */
  check_bad("truncated inside a header", d, 4 + 13 + 6, 3, MSH_EFORMAT, "token 1");
  check_bad("empty", d, 0, 512, MSH_EFORMAT, NULL);
  check_bad("three bytes", d, 3, 512, MSH_EFORMAT, NULL);
  check_bad("vocab too large", d, size, 513, MSH_EFORMAT, "token 512");
  check_bad("vocab too small", d, size, 511, MSH_EFORMAT, "vocab_size");
  check_bad("vocab far too large", d, size, 1 << 30, MSH_EFORMAT, NULL);

  /* token 0's length (at offset 8) */
  static const int32_t lens[] = {0x7fffffff, -5, 8, 6227};
  for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
    memcpy(c, d, size);
    memcpy(c + 8, &lens[i], 4);
    check_bad("token 0 length", c, size, 512, MSH_EFORMAT, "token 0");
  }
  /* max_token_length not positive */
  memcpy(c, d, size);
  memset(c, 0, 4);
  check_bad("max_token_length 0", c, size, 512, MSH_EFORMAT, "max_token_length");
  /* a NaN score on token 300 */
  memcpy(c, d, size);
  size_t pos = 4;
  for (int i = 0; i < 300; i++) {
    int32_t n;
    memcpy(&n, c + pos + 4, 4);
    pos += 8 + (size_t)n;
  }
  float nan = NAN;
  memcpy(c + pos, &nan, 4);
  check_bad("NaN score", c, size, 512, MSH_EFORMAT, "token 300");

  msh_tokenizer *t = NULL;
  CHECK_STATUS(msh_tokenizer_load_sp(&t, "/nonexistent/tok.bin", 512), MSH_ENOENT);
  CHECK_STATUS(msh_tokenizer_load_sp(&t, TOK_PATH, 0), MSH_EINVAL);
  CHECK(t == NULL);
  free(c);
  free(d);
}

int main(void) {
  msh_tokenizer *t = NULL;
  CHECK_OK(msh_tokenizer_load_sp(&t, TOK_PATH, 512));
  if (t) {
    test_basics(t);
    test_round_trips(t);
    test_fixture(t);
    test_against_naive(t);
  }
  msh_tokenizer_free(t);
  msh_tokenizer_free(NULL);
  test_bad_files();
  return check_done("test_tokenizer");
}
