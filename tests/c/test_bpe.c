/* test_bpe.c: the byte-level BPE tokenizer against Hugging Face tokenizers. The vocabulary and
 * merges are SmolLM2's; the expected ids and pre-tokenizer pieces for four pre-tokenizer setups
 * (SmolLM2, GPT-2, Llama-3, Qwen2) come from tools/make_bpe_fixtures.py. */
#include "check.h"

#include "bpe_internal.h"

#include <stdint.h>
#include <string.h>
#include <time.h>

#define WIKITEXT MSH_DATA_DIR "/eval/wikitext2_raw_test.txt"

#include "bpe_fixture.h"

/* ------------------------------------------------------------------------ parity checks */

static int32_t *ids_buf;
static uint64_t *ends_buf;
static uint32_t *tmp32;
enum { BUF_CAP = 1 << 21 };

/* Bytes of the text that have no byte token (SmolLM2 has none for 21 bytes) are dropped by
 * encoding, so only texts without them decode back to themselves. */
static int all_bytes_known(const msh_bpe *b, const uint8_t *t, size_t n) {
  for (size_t i = 0; i < n; i++) {
    int32_t id;
    char c = (char)t[i];
    if (msh_bpe_find(b, &c, 1, &id) != MSH_OK || msh_bpe_token_kind(b, id) != MSH_BPE_NORMAL) return 0;
  }
  return 1;
}

static int roundtrips(const msh_bpe *b, const int32_t *ids, int n, const uint8_t *text, size_t len) {
  size_t at = 0;
  for (int i = 0; i < n; i++) {
    const char *p;
    size_t l;
    if (msh_bpe_piece(b, ids[i], &p, &l) != MSH_OK || at + l > len || memcmp(text + at, p, l) != 0) return 0;
    at += l;
  }
  return at == len;
}

static int same_ids(const int32_t *got, int n, reader *r, const char *what, const char *cfg, int idx) {
  uint32_t want_n = u32(r);
  int ok = (uint32_t)n == want_n;
  int first = -1;
  for (uint32_t i = 0; i < want_n; i++) {
    uint16_t w = u16(r);
    if (ok && got[i] != w) {
      ok = 0;
      first = (int)i;
    }
  }
  if (!ok) {
    fprintf(stderr, "%s case %d (%s): %d ids, wanted %u; first difference at %d\n", cfg, idx, what, n,
            want_n, first);
    CHECK(0);
  }
  return ok;
}

static void check_config(const vocab *v, reader *r, const uint8_t *wiki, size_t wiki_n) {
  char name[64] = {0}, *patterns[8] = {0};
  uint32_t nl = u32(r);
  const uint8_t *p = take(r, nl);
  if (p) memcpy(name, p, nl < 63 ? nl : 63);
  uint32_t flags = u32(r), np = u32(r);
  for (uint32_t i = 0; i < np && i < 8; i++) {
    uint32_t l = u32(r);
    p = take(r, l);
    patterns[i] = calloc(l + 1, 1);
    if (p) memcpy(patterns[i], p, l);
  }
  msh_bpe *b = NULL;
  CHECK_OK(msh_bpe_new(&b, v->n_tokens, v->text, v->offsets, v->kinds, v->n_merges, v->merges,
                       v->merge_offsets, (int)np, (const char *const *)patterns, (int)flags));
  for (uint32_t i = 0; i < np && i < 8; i++) free(patterns[i]);
  if (!b) {
    r->bad = 1;
    return;
  }

  /* hand-made and random cases: ids with and without special tokens, piece boundaries */
  uint32_t nc = u32(r);
  int matched = 0, pieces_ok = 0;
  for (uint32_t c = 0; c < nc && !r->bad; c++) {
    uint32_t tl = u32(r);
    const uint8_t *t = take(r, tl);
    int n = -1;
    CHECK_OK(msh_bpe_encode(b, (const char *)t, tl, MSH_BPE_PARSE_SPECIAL, ids_buf, BUF_CAP, &n));
    int ok = same_ids(ids_buf, n, r, "special tokens parsed", name, (int)c);
    if (all_bytes_known(b, t, tl)) CHECK(roundtrips(b, ids_buf, n, t, tl));
    CHECK_OK(msh_bpe_encode(b, (const char *)t, tl, 0, ids_buf, BUF_CAP, &n));
    ok &= same_ids(ids_buf, n, r, "special tokens as text", name, (int)c);
    matched += ok;
    CHECK_OK(msh_bpe_pieces(b, (const char *)t, tl, 0, ends_buf, BUF_CAP, &n));
    uint32_t ne = u32(r);
    int pok = (uint32_t)n == ne;
    for (uint32_t k = 0; k < ne; k++) {
      uint32_t e = u32(r);
      if (pok && ends_buf[k] != e) pok = 0;
    }
    if (!pok) fprintf(stderr, "%s case %u: pre-tokenizer pieces differ (%d, wanted %u)\n", name, c, n, ne);
    CHECK(pok);
    pieces_ok += pok;
  }

  /* every line of WikiText-2, then the whole file */
  uint32_t nlines = u32(r);
  size_t at = 0;
  int lines_ok = 0, lines = 0;
  clock_t t0 = clock();
  for (uint32_t i = 0; i < nlines && !r->bad; i++) {
    const uint8_t *e = wiki ? memchr(wiki + at, '\n', wiki_n - at) : NULL;
    size_t len = e ? (size_t)(e - (wiki + at)) + 1 : 0;
    uint32_t want_n = u32(r), want_h = u32(r), want_pn = u32(r), want_ph = u32(r);
    if (!e) continue;
    int n = -1, np2 = -1;
    CHECK_OK(msh_bpe_encode(b, (const char *)wiki + at, len, MSH_BPE_PARSE_SPECIAL, ids_buf, BUF_CAP, &n));
    CHECK_OK(msh_bpe_pieces(b, (const char *)wiki + at, len, 0, ends_buf, BUF_CAP, &np2));
    for (int k = 0; k < n; k++) tmp32[k] = (uint32_t)ids_buf[k];
    int ok = (uint32_t)n == want_n && hash32(tmp32, (size_t)n) == want_h;
    for (int k = 0; k < np2; k++) tmp32[k] = (uint32_t)ends_buf[k];
    int pok = (uint32_t)np2 == want_pn && hash32(tmp32, (size_t)np2) == want_ph;
    if ((!ok || !pok) && lines - lines_ok < 5)
      fprintf(stderr, "%s: wikitext line %u differs (%s%s): %.80s\n", name, i + 1, ok ? "" : "ids ",
              pok ? "" : "pieces", (const char *)wiki + at);
    if (!roundtrips(b, ids_buf, n, wiki + at, len)) CHECK(0);
    lines++;
    lines_ok += ok && pok;
    at += len;
  }
  double secs = (double)(clock() - t0) / CLOCKS_PER_SEC;
  CHECK(lines == (int)nlines && lines_ok == lines);
  uint32_t want_n = u32(r), want_h = u32(r), want_pn = u32(r), want_ph = u32(r);
  int n = -1, np2 = -1;
  if (wiki) {
    CHECK_OK(msh_bpe_encode(b, (const char *)wiki, wiki_n, MSH_BPE_PARSE_SPECIAL, ids_buf, BUF_CAP, &n));
    for (int k = 0; k < n; k++) tmp32[k] = (uint32_t)ids_buf[k];
    CHECK((uint32_t)n == want_n && hash32(tmp32, (size_t)n) == want_h);
    CHECK(roundtrips(b, ids_buf, n, wiki, wiki_n));
    CHECK_OK(msh_bpe_pieces(b, (const char *)wiki, wiki_n, 0, ends_buf, BUF_CAP, &np2));
    for (int k = 0; k < np2; k++) tmp32[k] = (uint32_t)ends_buf[k];
    CHECK((uint32_t)np2 == want_pn && hash32(tmp32, (size_t)np2) == want_ph);
  }
  printf("%s: %d/%u cases match (ids), %d/%u (pieces); %d/%u wikitext lines (%.2f MB/s); whole file %d ids\n",
         name, matched, nc, pieces_ok, nc, lines_ok, nlines, secs > 0 ? (double)wiki_n / secs / 1e6 : 0.0, n);
  msh_bpe_free(b);
}

static void test_parity(const vocab *v) {
  reader r, w;
  CHECK(read_all(FIXTURES "smollm2_expect.bin", &r));
  CHECK(read_all(WIKITEXT, &w));
  const uint8_t *magic = take(&r, 8);
  CHECK(magic && memcmp(magic, "MSHBPEX1", 8) == 0);
  uint32_t nconf = u32(&r);
  CHECK(nconf == 4);
  for (uint32_t i = 0; i < nconf && !r.bad; i++) check_config(v, &r, w.p, w.n);
  CHECK(!r.bad && r.at == r.n);
  free(r.p);
  free(w.p);
}

/* --------------------------------------------------------------------------- API checks */

static const char *GPT2 =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static void test_api(const vocab *v) {
  const char *pats[2] = {"\\p{N}", GPT2};
  msh_bpe *b = NULL;
  CHECK_OK(msh_bpe_new(&b, v->n_tokens, v->text, v->offsets, v->kinds, v->n_merges, v->merges,
                       v->merge_offsets, 2, pats, 0));
  if (!b) return;
  CHECK(msh_bpe_vocab_size(b) == 49152);
  int32_t id = -1, ids[64];
  const char *p;
  size_t len;
  CHECK_OK(msh_bpe_find(b, "<|im_start|>", 12, &id));
  CHECK(id == 1 && msh_bpe_token_kind(b, id) == MSH_BPE_SPECIAL);
  CHECK_OK(msh_bpe_find(b, " the", 4, &id));
  CHECK(msh_bpe_token_kind(b, id) == MSH_BPE_NORMAL);
  CHECK_OK(msh_bpe_piece(b, id, &p, &len));
  CHECK(len == 4 && memcmp(p, " the", 4) == 0);
  CHECK_OK(msh_bpe_piece(b, 2, &p, &len));
  CHECK(len == 10 && memcmp(p, "<|im_end|>", 10) == 0);
  CHECK_STATUS(msh_bpe_find(b, "\xc4\xa0the", 5, &id), MSH_ENOENT); /* byte-level text is not bytes */
  CHECK_STATUS(msh_bpe_piece(b, 49152, &p, &len), MSH_ERANGE);
  CHECK_STATUS(msh_bpe_piece(b, -1, &p, &len), MSH_ERANGE);
  CHECK(msh_bpe_token_kind(b, 49152) == -1);

  /* a buffer too small: ERANGE with the count; cap 0 counts */
  const char *text = "<|im_start|>user\nHello there, 12 apples!<|im_end|>";
  int n = -1, full = -1;
  CHECK_OK(msh_bpe_encode(b, text, strlen(text), MSH_BPE_PARSE_SPECIAL, ids, 64, &full));
  CHECK(full > 4 && ids[0] == 1 && ids[full - 1] == 2);
  CHECK_STATUS(msh_bpe_encode(b, text, strlen(text), MSH_BPE_PARSE_SPECIAL, ids, 3, &n), MSH_ERANGE);
  CHECK(n == full);
  n = -1;
  CHECK_STATUS(msh_bpe_encode(b, text, strlen(text), MSH_BPE_PARSE_SPECIAL, NULL, 0, &n), MSH_ERANGE);
  CHECK(n == full);
  CHECK_OK(msh_bpe_encode(b, "", 0, 0, NULL, 0, &n));
  CHECK(n == 0);
  CHECK_OK(msh_bpe_encode(b, NULL, 0, 0, NULL, 0, &n));
  CHECK_STATUS(msh_bpe_encode(b, text, 3, 0, ids, -1, &n), MSH_EINVAL);
  CHECK_STATUS(msh_bpe_encode(b, text, 3, 0, NULL, 5, &n), MSH_EINVAL);
  CHECK_STATUS(msh_bpe_encode(b, text, 3, 4, ids, 64, &n), MSH_EINVAL);

  /* invalid UTF-8 matches no pattern but still encodes byte for byte */
  const char bad[] = "abc\x80\xc3(\xe2\x82 x\xed\xa0\x80y\xc3\xa9";
  CHECK_OK(msh_bpe_encode(b, bad, sizeof bad - 1, 0, ids, 64, &n));
  CHECK(roundtrips(b, ids, n, (const uint8_t *)bad, sizeof bad - 1));

  /* long inputs: one piece of 100000 bytes (no cache), and random bytes */
  size_t big = 100000;
  char *s = malloc(big);
  memset(s, 'a', big);
  CHECK_OK(msh_bpe_encode(b, s, big, 0, ids_buf, BUF_CAP, &n));
  int32_t aaaa = -1;
  CHECK_OK(msh_bpe_find(b, "aaaa", 4, &aaaa));
  int all_aaaa = n == 25000; /* what tokenizers gives: 25000 x "aaaa" */
  for (int i = 0; i < n && all_aaaa; i++) all_aaaa = ids_buf[i] == aaaa;
  CHECK(all_aaaa);
  uint64_t x = 88172645463325252ull;
  for (size_t i = 0; i < big; i++) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    s[i] = (char)(x >> 24);
  }
  CHECK_OK(msh_bpe_encode(b, s, big, MSH_BPE_PARSE_SPECIAL, ids_buf, BUF_CAP, &n));
  CHECK(n > 0);
  free(s);
  msh_bpe_free(b);
  msh_bpe_free(NULL);
}

/* A vocabulary small enough to reason about: merge order, ignore_merges, added tokens. */
static void test_small(void) {
  /* tokens: a b c " "(as \xc4\xa0) ab bc abc <x> ZZ(unused) and a normal token that is not in
   * byte-level form (the space itself) */
  const char *tok[] = {"a", "b", "c", "\xc4\xa0", "ab", "bc", "abc", "<x>", "ZZ", "d", "\xc4\xa0" "a", " ",
                       "<y>", "<", "x", ">"};
  uint8_t kinds[] = {0, 0, 0, 0, 0, 0, 0, MSH_BPE_SPECIAL, MSH_BPE_UNUSED, 0, 0, 0, MSH_BPE_ADDED, 0, 0, 0};
  enum { NT = 16 };
  int nt = NT;
  char text[128];
  int64_t off[NT + 1];
  size_t at = 0;
  for (int i = 0; i < nt; i++) {
    off[i] = (int64_t)at;
    memcpy(text + at, tok[i], strlen(tok[i]));
    at += strlen(tok[i]);
  }
  off[nt] = (int64_t)at;
  const char *mtext = "b ca bab c\xc4\xa0 a";
  int64_t moff[] = {0, 3, 6, 10, 14}; /* "b c" "a b" "ab c" "Ġ a" */
  const char *pats[1] = {" ?\\p{L}+|\\s+|[^\\s\\p{L}]+"};
  msh_bpe *b = NULL;
  int32_t ids[16];
  int n = -1;
  CHECK_OK(msh_bpe_new(&b, nt, text, off, kinds, 4, mtext, moff, 1, pats, 0));
  if (b) {
    /* "b c" outranks "a b": abc -> a bc, and "ab c" never applies */
    CHECK_OK(msh_bpe_encode(b, "abc", 3, 0, ids, 16, &n));
    CHECK(n == 2 && ids[0] == 0 && ids[1] == 5);
    CHECK_OK(msh_bpe_encode(b, "ab a", 4, 0, ids, 16, &n));
    CHECK(n == 2 && ids[0] == 4 && ids[1] == 10);
    /* special only with the flag, added always, unused never; the non-byte-level " " is unused */
    CHECK_OK(msh_bpe_encode(b, "<x><y>", 6, 0, ids, 16, &n));
    CHECK(n == 4 && ids[0] == 13 && ids[1] == 14 && ids[2] == 15 && ids[3] == 12);
    CHECK_OK(msh_bpe_encode(b, "<x><y>", 6, MSH_BPE_PARSE_SPECIAL, ids, 16, &n));
    CHECK(n == 2 && ids[0] == 7 && ids[1] == 12);
    CHECK(msh_bpe_token_kind(b, 11) == MSH_BPE_UNUSED);
    CHECK_OK(msh_bpe_encode(b, " ", 1, 0, ids, 16, &n));
    CHECK(n == 1 && ids[0] == 3);
    /* a byte without a token is dropped, as tokenizers drops it without an unk token */
    CHECK_OK(msh_bpe_encode(b, "aZa", 3, 0, ids, 16, &n));
    CHECK(n == 2 && ids[0] == 0 && ids[1] == 0);
    int32_t id;
    CHECK_OK(msh_bpe_find(b, "<y>", 3, &id));
    CHECK(id == 12);
    msh_bpe_free(b);
    b = NULL;
  }
  /* ignore_merges: a piece that is a token is taken whole */
  CHECK_OK(msh_bpe_new(&b, nt, text, off, kinds, 4, mtext, moff, 1, pats, MSH_BPE_IGNORE_MERGES));
  if (b) {
    CHECK_OK(msh_bpe_encode(b, "abc", 3, 0, ids, 16, &n));
    CHECK(n == 1 && ids[0] == 6);
    msh_bpe_free(b);
    b = NULL;
  }
  /* no patterns: the whole text is one piece */
  CHECK_OK(msh_bpe_new(&b, nt, text, off, kinds, 4, mtext, moff, 0, NULL, 0));
  if (b) {
    CHECK_OK(msh_bpe_encode(b, "abc a", 5, 0, ids, 16, &n));
    CHECK(n == 3 && ids[0] == 0 && ids[1] == 5 && ids[2] == 10);
    msh_bpe_free(b);
    b = NULL;
  }

  /* failures */
  const char *bad_pat[1] = {"(unclosed"};
  CHECK_STATUS(msh_bpe_new(&b, nt, text, off, kinds, 4, mtext, moff, 1, bad_pat, 0), MSH_EINVAL);
  CHECK(strstr(msh_last_error(), "pattern 0") != NULL);
  const char *m2 = "a bb d";
  int64_t m2off[] = {0, 3, 6}; /* "a b" fine, "b d": "bd" is not a token */
  CHECK_STATUS(msh_bpe_new(&b, nt, text, off, kinds, 2, m2, m2off, 1, pats, 0), MSH_EFORMAT);
  CHECK(strstr(msh_last_error(), "merge 1") != NULL && strstr(msh_last_error(), "merged token") != NULL);
  int64_t m3off[] = {0, 2}; /* "a " : right token empty, not in the vocabulary */
  CHECK_STATUS(msh_bpe_new(&b, nt, text, off, kinds, 1, "a ", m3off, 1, pats, 0), MSH_EFORMAT);
  int64_t m4off[] = {0, 2};
  CHECK_STATUS(msh_bpe_new(&b, nt, text, off, kinds, 1, "ab", m4off, 1, pats, 0), MSH_EFORMAT);
  CHECK(strstr(msh_last_error(), "left right") != NULL);
  uint8_t bad_kinds[NT];
  memcpy(bad_kinds, kinds, sizeof bad_kinds);
  bad_kinds[3] = 9;
  CHECK_STATUS(msh_bpe_new(&b, nt, text, off, bad_kinds, 4, mtext, moff, 1, pats, 0), MSH_EINVAL);
  int64_t bad_off[NT + 1];
  memcpy(bad_off, off, sizeof bad_off);
  bad_off[5] = bad_off[4] - 1;
  CHECK_STATUS(msh_bpe_new(&b, nt, text, bad_off, kinds, 4, mtext, moff, 1, pats, 0), MSH_EINVAL);
  CHECK_STATUS(msh_bpe_new(NULL, nt, text, off, kinds, 4, mtext, moff, 1, pats, 0), MSH_EINVAL);
  CHECK_STATUS(msh_bpe_new(&b, -1, text, off, kinds, 4, mtext, moff, 1, pats, 0), MSH_EINVAL);
  CHECK_STATUS(msh_bpe_new(&b, nt, text, off, kinds, 4, mtext, moff, 1, pats, 8), MSH_EINVAL);
  CHECK(b == NULL);
}

int main(void) {
  ids_buf = malloc(sizeof *ids_buf * BUF_CAP);
  ends_buf = malloc(sizeof *ends_buf * BUF_CAP);
  tmp32 = malloc(sizeof *tmp32 * BUF_CAP);
  test_small();
  vocab v;
  int loaded = vocab_load(&v);
  CHECK(loaded);
  if (loaded) {
    CHECK(v.n_tokens == 49152 && v.n_merges == 48900);
    test_api(&v);
    test_parity(&v);
  }
  vocab_free(&v);
  free(ids_buf);
  free(ends_buf);
  free(tmp32);
  return check_done("test_bpe");
}
