/* tokenizer.c: SentencePiece-style BPE over a llama2.c tokenizer.bin vocabulary.
 *
 * File: int32 max_token_length, then per token: f32 score, int32 length, the bytes.
 *
 * Encoding follows llama2.c's run.c: a space is put in front of non-empty text (SentencePiece's
 * dummy prefix); the text is split into UTF-8 code points; each one becomes the token spelling it,
 * or, when the vocabulary has none, one byte-fallback token ("<0xNN>") per byte; then the adjacent
 * pair whose concatenation is a token with the highest score is merged, the leftmost on ties,
 * until no pair merges. Bytes that are not part of a well-formed UTF-8 sequence become byte
 * fallbacks on their own. As in SentencePiece, byte fallbacks (and <unk>) never take part in a
 * merge, and merges never produce <unk>, <s>, </s> or a byte fallback, so decoding gives the text
 * back whatever the vocabulary. (run.c merges on the raw "<0xNN>" spellings; no llama2.c
 * vocabulary has a piece that makes the two differ.)
 *
 * The merge loop keeps candidate pairs in a max-heap keyed by (score, position): O(n log n) in the
 * number of code points. Memory is taken per call (the heap grows by doubling), never per merge.
 */
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { TOK_UNK = 0, TOK_BOS = 1, TOK_EOS = 2 };

struct msh_tokenizer {
  int n;              /* vocab size */
  char *blob;         /* all pieces as stored, back to back */
  uint32_t *off;      /* (n + 1) piece i is blob[off[i] .. off[i + 1]) */
  float *score;       /* (n) */
  const char **text;  /* (n) the bytes a token stands for (msh_tokenizer_piece) */
  uint32_t *text_len; /* (n) */
  uint8_t *plain;     /* (n) 1 for ordinary pieces: those that merge; 0 for specials and bytes */
  int32_t *slot;      /* (cap) open-addressing table of mergeable token ids, -1 empty */
  uint32_t cap;       /* power of two */
  int32_t byte_id[256]; /* byte fallback token of each byte (TOK_UNK when the vocab has none) */
  char bytes[256];      /* the single bytes that byte-fallback pieces decode to */
};

/* ------------------------------------------------------------------------------- hashing */

static uint64_t fnv_step(uint64_t h, const char *s, size_t n) {
  for (size_t i = 0; i < n; i++) {
    h ^= (unsigned char)s[i];
    h *= 0x100000001b3ULL;
  }
  return h;
}

#define FNV_SEED 0xcbf29ce484222325ULL

/* Id of the token whose piece is a ++ b (either may be empty), or -1. */
static int32_t lookup2(const msh_tokenizer *t, const char *a, size_t na, const char *b, size_t nb) {
  uint64_t h = fnv_step(fnv_step(FNV_SEED, a, na), b, nb);
  for (uint32_t i = (uint32_t)h & (t->cap - 1);; i = (i + 1) & (t->cap - 1)) {
    int32_t id = t->slot[i];
    if (id < 0) return -1;
    const char *p = t->blob + t->off[id];
    size_t np = t->off[id + 1] - t->off[id];
    if (np == na + nb && memcmp(p, a, na) == 0 && memcmp(p + na, b, nb) == 0) return id;
  }
}

static const char *piece(const msh_tokenizer *t, int32_t id, size_t *len) {
  *len = t->off[id + 1] - t->off[id];
  return t->blob + t->off[id];
}

static int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* The byte a "<0xNN>" piece stands for (uppercase hex, as SentencePiece writes it), or -1. */
static int byte_piece(const char *p, size_t n) {
  if (n != 6 || memcmp(p, "<0x", 3) != 0 || p[5] != '>') return -1;
  int hi = hex_digit(p[3]), lo = hex_digit(p[4]);
  return (hi < 0 || lo < 0) ? -1 : hi * 16 + lo;
}

/* ---------------------------------------------------------------------------------- load */

void msh_tokenizer_free(msh_tokenizer *t) {
  if (!t) return;
  free(t->blob);
  free(t->off);
  free(t->score);
  free(t->text);
  free(t->text_len);
  free(t->plain);
  free(t->slot);
  free(t);
}

static int32_t rd_i32(const unsigned char *p) {
  uint32_t u = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
  int32_t v;
  memcpy(&v, &u, 4);
  return v;
}

static float rd_f32(const unsigned char *p) {
  uint32_t u = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
  float v;
  memcpy(&v, &u, 4);
  return v;
}

/* Parses the mapped file into t (which owns nothing yet). */
static msh_status parse(msh_tokenizer *t, const msh_file *f, int vocab_size) {
  const char *path = msh_file_path(f);
  const unsigned char *p = msh_file_data(f);
  uint64_t size = msh_file_size(f);
  if (size < 4)
    return MSH_FAIL(MSH_EFORMAT, "'%s': truncated: %llu bytes, no max_token_length", path,
                    (unsigned long long)size);
  int32_t max_len = rd_i32(p);
  if (max_len <= 0)
    return MSH_FAIL(MSH_EFORMAT, "'%s': max_token_length is %d (must be positive)", path, (int)max_len);
  /* pieces are at most the rest of the file, so offsets fit in 32 bits for files under 4 GiB */
  if (size > UINT32_MAX)
    return MSH_FAIL(MSH_EFORMAT, "'%s': %llu bytes is too large for a tokenizer file", path,
                    (unsigned long long)size);

  /* first pass: check every record, allocating nothing (vocab_size may be a lie) */
  size_t n = (size_t)vocab_size;
  uint64_t pos = 4;
  for (size_t i = 0; i < n; i++) {
    if (size - pos < 8)
      return MSH_FAIL(MSH_EFORMAT, "'%s': truncated at token %zu (offset %llu of %llu bytes)", path,
                      i, (unsigned long long)pos, (unsigned long long)size);
    float sc = rd_f32(p + pos);
    int32_t len = rd_i32(p + pos + 4);
    pos += 8;
    if (!isfinite(sc))
      return MSH_FAIL(MSH_EFORMAT, "'%s': token %zu has a non-finite score", path, i);
    if (len < 0 || len > max_len)
      return MSH_FAIL(MSH_EFORMAT, "'%s': token %zu has length %d (outside [0, max_token_length %d])",
                      path, i, (int)len, (int)max_len);
    if ((uint64_t)len > size - pos)
      return MSH_FAIL(MSH_EFORMAT, "'%s': truncated in token %zu: %d bytes at offset %llu of %llu",
                      path, i, (int)len, (unsigned long long)pos, (unsigned long long)size);
    pos += (uint64_t)len;
  }
  if (pos != size)
    return MSH_FAIL(MSH_EFORMAT, "'%s': %llu bytes left after token %zu (vocab_size mismatch?)",
                    path, (unsigned long long)(size - pos), n - 1);

  /* second pass: copy */
  t->n = vocab_size;
  t->blob = malloc(size - 4 - 8 * (uint64_t)n + 1);
  t->off = malloc((n + 1) * sizeof *t->off);
  t->score = malloc(n * sizeof *t->score);
  t->text = malloc(n * sizeof *t->text);
  t->text_len = malloc(n * sizeof *t->text_len);
  t->plain = calloc(n, 1);
  t->cap = 16;
  while (t->cap < 2 * n) t->cap *= 2;
  t->slot = malloc(t->cap * sizeof *t->slot);
  if (!t->blob || !t->off || !t->score || !t->text || !t->text_len || !t->plain || !t->slot)
    return MSH_FAIL(MSH_ENOMEM, "out of memory");
  uint64_t used = 0;
  pos = 4;
  for (size_t i = 0; i < n; i++) {
    uint32_t len = (uint32_t)rd_i32(p + pos + 4);
    t->off[i] = (uint32_t)used;
    t->score[i] = rd_f32(p + pos);
    memcpy(t->blob + used, p + pos + 8, len);
    used += len;
    pos += 8 + (uint64_t)len;
  }
  t->off[n] = (uint32_t)used;

  /* decoded text of each token, byte fallbacks, merge table */
  for (int b = 0; b < 256; b++) {
    t->bytes[b] = (char)b;
    t->byte_id[b] = TOK_UNK;
  }
  int special[256] = {0};
  memset(t->slot, 0xff, t->cap * sizeof *t->slot);
  for (size_t i = 0; i < n; i++) {
    size_t len;
    const char *s = piece(t, (int32_t)i, &len);
    int b = byte_piece(s, len);
    t->text[i] = s;
    t->text_len[i] = (uint32_t)len;
    if (i == TOK_BOS || i == TOK_EOS) {
      t->text_len[i] = 0;
    } else if (b >= 0) {
      t->text[i] = &t->bytes[b];
      t->text_len[i] = 1;
      if (!special[b]) t->byte_id[b] = (int32_t)i;
      special[b] = 1;
    }
    if (i <= TOK_EOS || b >= 0) continue; /* never a merge result */
    t->plain[i] = 1;
    /* the first of equal pieces wins */
    if (lookup2(t, s, len, "", 0) >= 0) continue;
    uint64_t h = fnv_step(FNV_SEED, s, len);
    uint32_t k = (uint32_t)h & (t->cap - 1);
    while (t->slot[k] >= 0) k = (k + 1) & (t->cap - 1);
    t->slot[k] = (int32_t)i;
  }
  return MSH_OK;
}

msh_status msh_tokenizer_load_sp(msh_tokenizer **out, const char *path, int vocab_size) {
  if (!out || !path) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (vocab_size < 3)
    return MSH_FAIL(MSH_EINVAL, "vocab_size %d for '%s' (at least <unk>, <s>, </s> needed)",
                    vocab_size, path);
  msh_file *f = NULL;
  msh_status s = msh_file_open(&f, path);
  if (s != MSH_OK) return s;
  msh_tokenizer *t = calloc(1, sizeof *t);
  if (!t) s = MSH_FAIL(MSH_ENOMEM, "out of memory");
  else s = parse(t, f, vocab_size);
  msh_file_free(f);
  if (s != MSH_OK) {
    msh_tokenizer_free(t);
    return s;
  }
  *out = t;
  return MSH_OK;
}

int msh_tokenizer_vocab_size(const msh_tokenizer *t) { return t ? t->n : 0; }
int msh_tokenizer_bos(const msh_tokenizer *t) { return t ? TOK_BOS : -1; }
int msh_tokenizer_eos(const msh_tokenizer *t) { return t ? TOK_EOS : -1; }

msh_status msh_tokenizer_piece(const msh_tokenizer *t, int32_t id, const char **out, size_t *len) {
  if (!t || !out || !len) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (id < 0 || id >= t->n)
    return MSH_FAIL(MSH_ERANGE, "token id %d outside [0, %d)", (int)id, t->n);
  *out = t->text[id];
  *len = t->text_len[id];
  return MSH_OK;
}

/* -------------------------------------------------------------------------------- encode */

/* Length of the well-formed UTF-8 sequence at s[0 .. n), or 0 when s[0] does not start one. */
static size_t utf8_len(const unsigned char *s, size_t n) {
  unsigned c = s[0];
  size_t k;
  unsigned lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) k = 2;
  else if (c >= 0xE0 && c <= 0xEF) {
    k = 3;
    if (c == 0xE0) lo = 0xA0;      /* overlong */
    else if (c == 0xED) hi = 0x9F; /* surrogates */
  } else if (c >= 0xF0 && c <= 0xF4) {
    k = 4;
    if (c == 0xF0) lo = 0x90;      /* overlong */
    else if (c == 0xF4) hi = 0x8F; /* above U+10FFFF */
  } else {
    return 0;
  }
  if (n < k || s[1] < lo || s[1] > hi) return 0;
  for (size_t i = 2; i < k; i++)
    if ((s[i] & 0xC0) != 0x80) return 0;
  return k;
}

typedef struct {
  int32_t id;
  int32_t prev, next; /* -1 at the ends */
} tok_sym;

typedef struct {
  float score;
  int32_t left, right; /* symbol indices */
  int32_t lid, rid;    /* their ids when pushed: the entry is stale once either changed */
  int32_t merged;
} tok_pair;

/* a before b in the heap: higher score, then further left */
static int pair_before(const tok_pair *a, const tok_pair *b) {
  if (a->score != b->score) return a->score > b->score;
  return a->left < b->left;
}

typedef struct {
  tok_pair *v;
  size_t n, cap;
  int oom; /* a push failed: the encoding is abandoned */
} tok_heap;

static void heap_push(tok_heap *h, tok_pair p) {
  if (h->n == h->cap) {
    size_t cap = h->cap * 2;
    tok_pair *v = realloc(h->v, cap * sizeof *v);
    if (!v) {
      h->oom = 1;
      return;
    }
    h->v = v;
    h->cap = cap;
  }
  size_t i = h->n++;
  while (i > 0) {
    size_t up = (i - 1) / 2;
    if (!pair_before(&p, &h->v[up])) break;
    h->v[i] = h->v[up];
    i = up;
  }
  h->v[i] = p;
}

static tok_pair heap_pop(tok_heap *h) {
  tok_pair top = h->v[0], last = h->v[--h->n];
  size_t i = 0;
  for (;;) {
    size_t c = 2 * i + 1;
    if (c >= h->n) break;
    if (c + 1 < h->n && pair_before(&h->v[c + 1], &h->v[c])) c++;
    if (!pair_before(&h->v[c], &last)) break;
    h->v[i] = h->v[c];
    i = c;
  }
  if (h->n > 0) h->v[i] = last;
  return top;
}

/* Pushes the merge of symbols l and r when their pieces concatenate to a token. */
static void try_pair(const msh_tokenizer *t, const tok_sym *sym, tok_heap *h, int32_t l, int32_t r) {
  if (l < 0 || r < 0 || !t->plain[sym[l].id] || !t->plain[sym[r].id]) return;
  size_t na, nb;
  const char *a = piece(t, sym[l].id, &na), *b = piece(t, sym[r].id, &nb);
  int32_t m = lookup2(t, a, na, b, nb);
  if (m < 0) return;
  heap_push(h, (tok_pair){t->score[m], l, r, sym[l].id, sym[r].id, m});
}

/* Appends the token spelling the code point s[0 .. k), or its bytes' fallbacks. */
static void add_unit(const msh_tokenizer *t, tok_sym *sym, int32_t *ns, const unsigned char *s,
                     size_t k) {
  int32_t id = lookup2(t, (const char *)s, k, "", 0);
  if (id >= 0) {
    sym[(*ns)++].id = id;
    return;
  }
  for (size_t j = 0; j < k; j++) sym[(*ns)++].id = t->byte_id[s[j]];
}

msh_status msh_tokenizer_encode(const msh_tokenizer *t, const char *text, size_t len, int add_bos,
                                int32_t *ids, int cap, int *n_out) {
  if (!t || !n_out || (len > 0 && !text) || cap < 0 || (cap > 0 && !ids))
    return MSH_FAIL(MSH_EINVAL, "NULL argument or negative cap");
  /* one symbol per byte at most, plus the dummy prefix and BOS: the count must fit an int */
  if (len > (size_t)INT32_MAX / 4)
    return MSH_FAIL(MSH_ERANGE, "text of %zu bytes is too long to encode at once", len);
  int bos = add_bos ? 1 : 0;
  if (len == 0) {
    *n_out = bos;
    if (cap < bos) return MSH_FAIL(MSH_ERANGE, "%d ids do not fit in cap %d", bos, cap);
    if (bos) ids[0] = TOK_BOS;
    return MSH_OK;
  }

  size_t nmax = len + 1;  /* symbols: the dummy prefix, then at most one per byte */
  size_t hcap = nmax + 16; /* grows when stale entries pile up */
  tok_sym *sym = malloc(nmax * sizeof *sym);
  tok_heap h = {malloc(hcap * sizeof *h.v), 0, hcap, 0};
  if (!sym || !h.v) {
    free(sym);
    free(h.v);
    return MSH_FAIL(MSH_ENOMEM, "out of memory encoding %zu bytes", len);
  }

  /* code points to initial symbols, the dummy prefix first */
  int32_t ns = 0;
  add_unit(t, sym, &ns, (const unsigned char *)" ", 1);
  const unsigned char *u = (const unsigned char *)text;
  for (size_t i = 0; i < len;) {
    size_t k = utf8_len(u + i, len - i);
    if (k) {
      add_unit(t, sym, &ns, u + i, k);
      i += k;
    } else {
      sym[ns++].id = t->byte_id[u[i]]; /* a malformed byte stands alone */
      i++;
    }
  }
  for (int32_t i = 0; i < ns; i++) {
    sym[i].prev = i - 1;
    sym[i].next = i + 1 < ns ? i + 1 : -1;
  }

  /* merge the best pair until none is left */
  for (int32_t i = 0; i + 1 < ns; i++) try_pair(t, sym, &h, i, i + 1);
  while (h.n > 0 && !h.oom) {
    tok_pair p = heap_pop(&h);
    tok_sym *l = &sym[p.left], *r = &sym[p.right];
    if (l->id != p.lid || r->id != p.rid || l->next != p.right) continue; /* stale */
    l->id = p.merged;
    l->next = r->next;
    if (r->next >= 0) sym[r->next].prev = p.left;
    r->id = -1; /* dead: never matches a pushed id again */
    r->next = -1;
    try_pair(t, sym, &h, l->prev, p.left);
    try_pair(t, sym, &h, p.left, l->next);
  }

  if (h.oom) {
    free(sym);
    free(h.v);
    return MSH_FAIL(MSH_ENOMEM, "out of memory encoding %zu bytes", len);
  }
  int n = bos;
  for (int32_t i = 0; i >= 0; i = sym[i].next) n++;
  *n_out = n;
  msh_status s = MSH_OK;
  if (n > cap) {
    s = MSH_FAIL(MSH_ERANGE, "%d ids do not fit in cap %d", n, cap);
  } else {
    int k = 0;
    if (bos) ids[k++] = TOK_BOS;
    for (int32_t i = 0; i >= 0; i = sym[i].next) ids[k++] = sym[i].id;
  }
  free(sym);
  free(h.v);
  return s;
}
