/* bpe_fixture.h: reads tests/fixtures/bpe/ (written by tools/make_bpe_fixtures.py): SmolLM2's
 * vocabulary and merges, rebuilt into the arrays msh_bpe_new takes. Shared by test_bpe.c and
 * tools/fuzz/fuzz_bpe.c. */
#ifndef MSH_TEST_BPE_FIXTURE_H
#define MSH_TEST_BPE_FIXTURE_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef MSH_ROOT
#define MSH_ROOT "."
#endif
#define FIXTURES MSH_ROOT "/tests/fixtures/bpe/"

/* ------------------------------------------------------------------------------ helpers */

typedef struct {
  uint8_t *p;
  size_t n, at;
  int bad; /* set when a read runs past the end */
} reader;

static inline int read_all(const char *path, reader *r) {
  memset(r, 0, sizeof *r);
  FILE *f = fopen(path, "rb");
  if (!f) return 0;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  r->p = malloc((size_t)n + 1);
  r->n = (size_t)n;
  int ok = r->p && fread(r->p, 1, (size_t)n, f) == (size_t)n;
  fclose(f);
  return ok;
}

static inline const uint8_t *take(reader *r, size_t n) {
  if (r->bad || n > r->n - r->at) {
    r->bad = 1;
    return NULL;
  }
  const uint8_t *p = r->p + r->at;
  r->at += n;
  return p;
}

static inline uint32_t u32(reader *r) {
  const uint8_t *p = take(r, 4);
  return p ? (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24 : 0;
}

static inline uint16_t u16(reader *r) {
  const uint8_t *p = take(r, 2);
  return p ? (uint16_t)(p[0] | p[1] << 8) : 0;
}

static inline uint32_t hash32(const uint32_t *v, size_t n) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (size_t i = 0; i < n; i++)
    for (int k = 0; k < 4; k++) h = (h ^ ((v[i] >> (8 * k)) & 0xff)) * 0x100000001B3ull;
  return (uint32_t)h;
}

/* ---------------------------------------------------------------------------- vocabulary */

typedef struct {
  int n_tokens, n_merges;
  char *text;
  int64_t *offsets;
  uint8_t *kinds;
  char *merges;
  int64_t *merge_offsets;
} vocab;

static inline void vocab_free(vocab *v) {
  free(v->text);
  free(v->offsets);
  free(v->kinds);
  free(v->merges);
  free(v->merge_offsets);
}

/* Rebuilds SmolLM2's vocabulary and "left right" merges from the compact fixture. */
static inline int vocab_load(vocab *v) {
  memset(v, 0, sizeof *v);
  reader r;
  if (!read_all(FIXTURES "smollm2_vocab.bin", &r)) return 0;
  const uint8_t *magic = take(&r, 8);
  int ok = magic && memcmp(magic, "MSHBPEV1", 8) == 0;
  uint32_t n = u32(&r), nm = u32(&r), derived = u32(&r);
  ok = ok && derived <= n && n - derived == nm;
  if (!ok) {
    free(r.p);
    return 0;
  }
  v->n_tokens = (int)n;
  v->n_merges = (int)nm;
  v->kinds = malloc(n);
  memcpy(v->kinds, take(&r, n), n);
  v->offsets = malloc(sizeof *v->offsets * (n + 1));
  size_t cap = 1 << 20, used = 0;
  v->text = malloc(cap);
  for (uint32_t i = 0; i < derived; i++) {
    uint16_t len = u16(&r);
    const uint8_t *p = take(&r, len);
    v->offsets[i] = (int64_t)used;
    if (p) memcpy(v->text + used, p, len);
    used += len;
  }
  uint16_t *pairs = malloc(sizeof *pairs * 2 * nm);
  for (uint32_t m = 0; m < nm; m++) {
    pairs[2 * m] = u16(&r);
    pairs[2 * m + 1] = u16(&r);
  }
  /* token derived + m is merge m's left + right; merge m as text is "left right" */
  v->merge_offsets = malloc(sizeof *v->merge_offsets * (nm + 1));
  size_t mcap = 1 << 20, mused = 0;
  v->merges = malloc(mcap);
  for (uint32_t m = 0; m < nm && !r.bad; m++) {
    int64_t a = pairs[2 * m], b = pairs[2 * m + 1];
    size_t la = (size_t)(v->offsets[a + 1] - v->offsets[a]), lb = (size_t)(v->offsets[b + 1] - v->offsets[b]);
    if (a >= derived + m || b >= derived + m) r.bad = 1;
    if (a == derived + m - 1) la = used - (size_t)v->offsets[a]; /* the newest token's end is `used` */
    if (b == derived + m - 1) lb = used - (size_t)v->offsets[b];
    while (used + la + lb > cap) v->text = realloc(v->text, cap *= 2);
    while (mused + la + lb + 1 > mcap) v->merges = realloc(v->merges, mcap *= 2);
    v->offsets[derived + m] = (int64_t)used;
    memcpy(v->text + used, v->text + v->offsets[a], la);
    memcpy(v->text + used + la, v->text + v->offsets[b], lb);
    used += la + lb;
    v->merge_offsets[m] = (int64_t)mused;
    memcpy(v->merges + mused, v->text + v->offsets[a], la);
    v->merges[mused + la] = ' ';
    memcpy(v->merges + mused + la + 1, v->text + v->offsets[b], lb);
    mused += la + lb + 1;
  }
  v->offsets[n] = (int64_t)used;
  v->merge_offsets[nm] = (int64_t)mused;
  free(pairs);
  ok = !r.bad && r.at == r.n;
  free(r.p);
  return ok;
}

#endif
