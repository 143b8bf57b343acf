/* bpe.c: byte-level BPE (GPT-2, Llama-3, Qwen2, SmolLM2), matching Hugging Face tokenizers.
 *
 * encode(text):
 *   1. added tokens are cut out first (the longest one at the leftmost position);
 *   2. each stretch between them is split by the pre-tokenizer regexes, one after another (each
 *      turns every piece into its matches and the gaps between them);
 *   3. each piece's bytes become byte tokens, merged pair by pair in merge-rank order (lowest rank,
 *      then leftmost, first), through a binary heap over a linked list of symbols.
 * Vocabulary entries arrive in GPT-2's byte-to-unicode form; they are mapped back to raw bytes once
 * at build time, so encoding works on raw bytes throughout.
 */
#include "internal.h"
#include "bpe_internal.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <limits.h>
#include <stdlib.h>
#include <string.h>

enum {
  CACHE_SLOTS = 1 << 14,       /* pieces remembered, at most half of them in use */
  CACHE_MAX_PIECE = 128,       /* longer pieces are not cached */
  CACHE_BYTES = 1 << 20,       /* pool for cached piece bytes */
  CACHE_IDS = 1 << 18          /* pool for cached ids */
};

/* A table of token ids keyed by a byte string the owner can produce for each id. */
typedef struct {
  int32_t *slots; /* -1 empty */
  uint32_t mask;
} id_table;

typedef struct {
  uint64_t key; /* left << 32 | right; UINT64_MAX empty */
  int32_t rank;
  int32_t id;   /* the merged token */
} merge_slot;

typedef struct {
  int32_t id;
  int32_t prev, next; /* -1 at the ends */
  int32_t len;        /* bytes; 0 once merged into its left neighbour */
} symbol;

typedef struct {
  int32_t rank, pos, id;
} candidate;

typedef struct {
  uint64_t hash;   /* 0 empty */
  uint32_t key_at; /* into cache_bytes */
  uint32_t ids_at; /* into cache_ids */
  uint16_t key_len;
  uint16_t n_ids;
} cache_slot;

struct msh_bpe {
  int n_tokens;
  int flags;
  uint8_t *kinds;
  char *bytes;      /* every token's bytes, concatenated */
  int64_t *at;      /* n_tokens + 1 offsets into bytes */
  id_table normal;  /* normal tokens by raw bytes */
  int32_t byte_id[256];
  merge_slot *merges;
  uint32_t merge_mask;

  int n_added;      /* special and added tokens, grouped by first byte, longest first */
  int32_t *added;
  int32_t added_first[257];

  int n_re;
  pcre2_code **re;
  pcre2_match_data **md;

  /* encode state */
  const char *text;
  uint64_t *ends;   /* msh_bpe_pieces: piece ends are recorded here instead of merging */
  int32_t *out;
  int64_t out_cap, out_n;
  symbol *syms;
  size_t syms_cap;
  candidate *heap;
  size_t heap_cap, heap_n;

  cache_slot *cache;
  char *cache_bytes;
  int32_t *cache_ids;
  uint32_t cache_used, cache_bytes_used, cache_ids_used;
};

/* ---------------------------------------------------------------------- byte-to-unicode map */

/* GPT-2 maps each byte to a printable code point: bytes that are printable Latin-1 ('!'..'~',
 * 0xA1..0xAC, 0xAE..0xFF) map to themselves, the other 68 to 256, 257, ... in byte order. */
static uint32_t byte_to_cp(int b) {
  int n = 0;
  for (int c = 0; c < b; c++)
    if (!((c >= '!' && c <= '~') || (c >= 0xA1 && c <= 0xAC) || (c >= 0xAE && c <= 0xFF))) n++;
  int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
  return printable ? (uint32_t)b : 256u + (uint32_t)n;
}

enum { CP_LIMIT = 256 + 68 };

static void build_cp_to_byte(int16_t *cp_byte) {
  for (int i = 0; i < CP_LIMIT; i++) cp_byte[i] = -1;
  for (int b = 0; b < 256; b++) cp_byte[byte_to_cp(b)] = (int16_t)b;
}

/* Decodes one UTF-8 code point at s[0..n); returns its length, or 0 if malformed. */
static int utf8_next(const uint8_t *s, size_t n, uint32_t *cp) {
  if (n == 0) return 0;
  uint8_t c = s[0];
  if (c < 0x80) {
    *cp = c;
    return 1;
  }
  int len = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 0;
  if (!len || c >= 0xF8 || (size_t)len > n) return 0;
  uint32_t v = c & (0x3Fu >> (len - 1));
  for (int i = 1; i < len; i++) {
    if ((s[i] & 0xC0) != 0x80) return 0;
    v = v << 6 | (s[i] & 0x3Fu);
  }
  *cp = v;
  return len;
}

/* Maps byte-level text back to raw bytes into dst (at most n bytes); -1 if a character is not
 * one of the 256 byte characters. */
static int64_t unmap_bytes(const int16_t *cp_byte, const char *src, size_t n, char *dst) {
  const uint8_t *s = (const uint8_t *)src;
  int64_t k = 0;
  for (size_t i = 0; i < n;) {
    uint32_t cp;
    int l = utf8_next(s + i, n - i, &cp);
    if (!l || cp >= CP_LIMIT || cp_byte[cp] < 0) return -1;
    dst[k++] = (char)cp_byte[cp];
    i += (size_t)l;
  }
  return k;
}

/* ----------------------------------------------------------------------------------- tables */

static uint64_t hash_bytes(const void *p, size_t n) {
  const uint8_t *s = p;
  uint64_t h = 1469598103934665603ull; /* FNV-1a */
  for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 1099511628211ull;
  return h ^ (h >> 29);
}

static uint32_t table_cap(int n) {
  uint32_t cap = 16;
  while (cap < (uint32_t)n * 2u) cap <<= 1;
  return cap;
}

static msh_status table_init(id_table *t, int n) {
  uint32_t cap = table_cap(n);
  t->slots = malloc(sizeof *t->slots * cap);
  if (!t->slots) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  memset(t->slots, 0xff, sizeof *t->slots * cap);
  t->mask = cap - 1;
  return MSH_OK;
}

/* The slot of key (base + at[id] spans) in t, or the empty slot where it would go. */
static uint32_t table_slot(const id_table *t, const char *base, const int64_t *at, const char *key,
                           size_t len) {
  uint32_t h = (uint32_t)hash_bytes(key, len) & t->mask;
  for (;; h = (h + 1) & t->mask) {
    int32_t id = t->slots[h];
    if (id < 0) return h;
    if ((size_t)(at[id + 1] - at[id]) == len && memcmp(base + at[id], key, len) == 0) return h;
  }
}

static int32_t table_get(const id_table *t, const char *base, const int64_t *at, const char *key,
                         size_t len) {
  return t->slots[table_slot(t, base, at, key, len)];
}

/* Stores id under its own text; a later id with the same text replaces an earlier one. */
static void table_put(id_table *t, const char *base, const int64_t *at, int32_t id) {
  t->slots[table_slot(t, base, at, base + at[id], (size_t)(at[id + 1] - at[id]))] = id;
}

static uint32_t merge_find(const msh_bpe *b, uint64_t key) {
  uint32_t h = (uint32_t)((key * 0x9E3779B97F4A7C15ull) >> 32) & b->merge_mask;
  while (b->merges[h].key != UINT64_MAX && b->merges[h].key != key) h = (h + 1) & b->merge_mask;
  return h;
}

static const merge_slot *merge_get(const msh_bpe *b, int32_t left, int32_t right) {
  const merge_slot *m = &b->merges[merge_find(b, (uint64_t)(uint32_t)left << 32 | (uint32_t)right)];
  return m->key == UINT64_MAX ? NULL : m;
}

/* ------------------------------------------------------------------------------------ build */

static msh_status check_offsets(int n, const int64_t *at, const char *what) {
  if (at[0] < 0) return MSH_FAIL(MSH_EINVAL, "%s offsets start at %lld", what, (long long)at[0]);
  for (int i = 0; i < n; i++)
    if (at[i + 1] < at[i])
      return MSH_FAIL(MSH_EINVAL, "%s offsets decrease at entry %d (%lld, then %lld)", what, i,
                      (long long)at[i], (long long)at[i + 1]);
  return MSH_OK;
}

/* Fills bytes/at with each token's raw bytes and the normal-token table. */
static msh_status build_vocab(msh_bpe *b, const char *text, const int64_t *offsets) {
  int n = b->n_tokens;
  int16_t cp_byte[CP_LIMIT];
  build_cp_to_byte(cp_byte);
  size_t total = (size_t)(offsets[n] - offsets[0]);
  b->bytes = malloc(total ? total : 1);
  b->at = malloc(sizeof *b->at * ((size_t)n + 1));
  if (!b->bytes || !b->at) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  int64_t k = 0;
  for (int i = 0; i < n; i++) {
    const char *s = text + offsets[i];
    size_t len = (size_t)(offsets[i + 1] - offsets[i]);
    b->at[i] = k;
    int64_t got = b->kinds[i] == MSH_BPE_NORMAL ? unmap_bytes(cp_byte, s, len, b->bytes + k) : -1;
    if (got < 0) { /* literal text: added, special, unused, or not in byte-level form */
      memcpy(b->bytes + k, s, len);
      got = (int64_t)len;
      if (b->kinds[i] == MSH_BPE_NORMAL) b->kinds[i] = MSH_BPE_UNUSED; /* never produced */
    }
    k += got;
  }
  b->at[n] = k;
  msh_status s = table_init(&b->normal, n);
  if (s != MSH_OK) return s;
  for (int i = 0; i < 256; i++) b->byte_id[i] = -1;
  for (int i = 0; i < n; i++) {
    if (b->kinds[i] != MSH_BPE_NORMAL) continue;
    table_put(&b->normal, b->bytes, b->at, i);
    if (b->at[i + 1] - b->at[i] == 1) b->byte_id[(uint8_t)b->bytes[b->at[i]]] = i;
  }
  return MSH_OK;
}

/* Looks merges up by their byte-level text, as tokenizers does, through a temporary table over
 * the caller's vocabulary text. */
static msh_status build_merges(msh_bpe *b, const char *text, const int64_t *offsets, int n_merges,
                               const char *merges, const int64_t *merge_at) {
  int n = b->n_tokens;
  id_table by_text = {0};
  msh_status s = table_init(&by_text, n);
  if (s != MSH_OK) return s;
  for (int i = 0; i < n; i++) table_put(&by_text, text, offsets, i);
  uint32_t cap = table_cap(n_merges);
  b->merges = malloc(sizeof *b->merges * cap);
  char *joined = NULL;
  size_t joined_cap = 0;
  if (!b->merges) {
    s = MSH_FAIL(MSH_ENOMEM, "out of memory");
    goto done;
  }
  for (uint32_t i = 0; i < cap; i++) b->merges[i].key = UINT64_MAX;
  b->merge_mask = cap - 1;
  for (int r = 0; r < n_merges; r++) {
    const char *m = merges + merge_at[r];
    size_t len = (size_t)(merge_at[r + 1] - merge_at[r]);
    const char *sp = memchr(m, ' ', len);
    if (!sp) {
      s = MSH_FAIL(MSH_EFORMAT, "merge %d '%.*s' is not \"left right\"", r, (int)(len > 200 ? 200 : len), m);
      goto done;
    }
    size_t ll = (size_t)(sp - m), rl = len - ll - 1;
    if (ll + rl > joined_cap) {
      joined_cap = 2 * (ll + rl) + 64;
      char *j = realloc(joined, joined_cap);
      if (!j) {
        s = MSH_FAIL(MSH_ENOMEM, "out of memory");
        goto done;
      }
      joined = j;
    }
    memcpy(joined, m, ll);
    memcpy(joined + ll, sp + 1, rl);
    int32_t left = table_get(&by_text, text, offsets, m, ll);
    int32_t right = table_get(&by_text, text, offsets, sp + 1, rl);
    int32_t id = table_get(&by_text, text, offsets, joined, ll + rl);
    if (left < 0 || right < 0 || id < 0) {
      const char *which = left < 0 ? "its left token" : right < 0 ? "its right token" : "the merged token";
      s = MSH_FAIL(MSH_EFORMAT, "merge %d '%.*s': %s is not in the vocabulary", r,
                   (int)(len > 200 ? 200 : len), m, which);
      goto done;
    }
    merge_slot *slot = &b->merges[merge_find(b, (uint64_t)(uint32_t)left << 32 | (uint32_t)right)];
    slot->key = (uint64_t)(uint32_t)left << 32 | (uint32_t)right; /* a later duplicate wins */
    slot->rank = r;
    slot->id = id;
  }
done:
  free(joined);
  free(by_text.slots);
  return s;
}

typedef struct {
  uint8_t first;
  int64_t len;
  int32_t id;
} added_key;

/* By first byte, then longest first, then id. */
static int added_cmp(const void *pa, const void *pb) {
  const added_key *x = pa, *y = pb;
  if (x->first != y->first) return x->first < y->first ? -1 : 1;
  if (x->len != y->len) return x->len > y->len ? -1 : 1;
  return x->id < y->id ? -1 : x->id > y->id;
}

static int is_added(const msh_bpe *b, int i) {
  return (b->kinds[i] == MSH_BPE_SPECIAL || b->kinds[i] == MSH_BPE_ADDED) && b->at[i + 1] > b->at[i];
}

static msh_status build_added(msh_bpe *b) {
  int n = 0;
  for (int i = 0; i < b->n_tokens; i++) n += is_added(b, i);
  added_key *keys = malloc(sizeof *keys * (size_t)(n ? n : 1));
  b->added = malloc(sizeof *b->added * (size_t)(n ? n : 1));
  if (!keys || !b->added) {
    free(keys);
    return MSH_FAIL(MSH_ENOMEM, "out of memory");
  }
  n = 0;
  for (int i = 0; i < b->n_tokens; i++)
    if (is_added(b, i)) keys[n++] = (added_key){(uint8_t)b->bytes[b->at[i]], b->at[i + 1] - b->at[i], i};
  qsort(keys, (size_t)n, sizeof *keys, added_cmp);
  for (int j = 0; j < n; j++) b->added[j] = keys[j].id;
  b->n_added = n;
  int j = 0;
  for (int c = 0; c <= 256; c++) {
    while (j < n && keys[j].first < c) j++;
    b->added_first[c] = j;
  }
  free(keys);
  return MSH_OK;
}

static msh_status build_patterns(msh_bpe *b, int n, const char *const *patterns) {
  b->re = calloc((size_t)(n ? n : 1), sizeof *b->re);
  b->md = calloc((size_t)(n ? n : 1), sizeof *b->md);
  if (!b->re || !b->md) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  b->n_re = n;
  for (int i = 0; i < n; i++) {
    if (!patterns[i]) return MSH_FAIL(MSH_EINVAL, "pattern %d is NULL", i);
    int err;
    PCRE2_SIZE where;
    b->re[i] = pcre2_compile((PCRE2_SPTR)patterns[i], PCRE2_ZERO_TERMINATED,
                             PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &err, &where, NULL);
    if (!b->re[i]) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      return MSH_FAIL(MSH_EINVAL, "pattern %d: %s at offset %zu of '%.200s'", i, (const char *)msg,
                      (size_t)where, patterns[i]);
    }
    pcre2_jit_compile(b->re[i], PCRE2_JIT_COMPLETE); /* optional: the interpreter is the fallback */
    b->md[i] = pcre2_match_data_create_from_pattern(b->re[i], NULL);
    if (!b->md[i]) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  }
  return MSH_OK;
}

msh_status msh_bpe_new(msh_bpe **out, int n_tokens, const char *text, const int64_t *offsets,
                       const uint8_t *kinds, int n_merges, const char *merges,
                       const int64_t *merge_offsets, int n_patterns, const char *const *patterns,
                       int flags) {
  if (!out || n_tokens < 0 || n_merges < 0 || n_patterns < 0 || !offsets ||
      (n_merges > 0 && !merge_offsets) || (n_patterns > 0 && !patterns))
    return MSH_FAIL(MSH_EINVAL, "NULL or negative argument");
  if (n_tokens > INT32_MAX / 2 || n_merges > INT32_MAX / 2)
    return MSH_FAIL(MSH_EINVAL, "%d tokens and %d merges are too many", n_tokens, n_merges);
  if ((offsets[n_tokens] > offsets[0] && !text) || (n_merges > 0 && merge_offsets[n_merges] > merge_offsets[0] && !merges))
    return MSH_FAIL(MSH_EINVAL, "NULL text");
  if (flags & ~MSH_BPE_IGNORE_MERGES) return MSH_FAIL(MSH_EINVAL, "unknown flags 0x%x", (unsigned)flags);
  msh_status s = check_offsets(n_tokens, offsets, "vocabulary");
  if (s == MSH_OK && n_merges > 0) s = check_offsets(n_merges, merge_offsets, "merge");
  if (s != MSH_OK) return s;
  for (int i = 0; kinds && i < n_tokens; i++)
    if (kinds[i] > MSH_BPE_UNUSED) return MSH_FAIL(MSH_EINVAL, "token %d has unknown kind %d", i, kinds[i]);

  msh_bpe *b = calloc(1, sizeof *b);
  if (!b) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  b->n_tokens = n_tokens;
  b->flags = flags;
  b->kinds = calloc((size_t)n_tokens + 1, 1);
  b->cache = calloc(CACHE_SLOTS, sizeof *b->cache);
  b->cache_bytes = malloc(CACHE_BYTES);
  b->cache_ids = malloc(sizeof *b->cache_ids * CACHE_IDS);
  if (!b->kinds || !b->cache || !b->cache_bytes || !b->cache_ids) s = MSH_FAIL(MSH_ENOMEM, "out of memory");
  if (s == MSH_OK && kinds) memcpy(b->kinds, kinds, (size_t)n_tokens);
  if (s == MSH_OK) s = build_vocab(b, text, offsets);
  if (s == MSH_OK) s = build_merges(b, text, offsets, n_merges, merges, merge_offsets);
  if (s == MSH_OK) s = build_added(b);
  if (s == MSH_OK) s = build_patterns(b, n_patterns, patterns);
  if (s != MSH_OK) {
    msh_bpe_free(b);
    return s;
  }
  *out = b;
  return MSH_OK;
}

void msh_bpe_free(msh_bpe *b) {
  if (!b) return;
  for (int i = 0; i < b->n_re; i++) {
    pcre2_match_data_free(b->md[i]);
    pcre2_code_free(b->re[i]);
  }
  free(b->re);
  free(b->md);
  free(b->kinds);
  free(b->bytes);
  free(b->at);
  free(b->normal.slots);
  free(b->merges);
  free(b->added);
  free(b->syms);
  free(b->heap);
  free(b->cache);
  free(b->cache_bytes);
  free(b->cache_ids);
  free(b);
}

int msh_bpe_vocab_size(const msh_bpe *b) { return b ? b->n_tokens : 0; }

int msh_bpe_token_kind(const msh_bpe *b, int32_t id) {
  return (b && id >= 0 && id < b->n_tokens) ? b->kinds[id] : -1;
}

msh_status msh_bpe_piece(const msh_bpe *b, int32_t id, const char **piece, size_t *len) {
  if (!b || !piece || !len) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (id < 0 || id >= b->n_tokens)
    return MSH_FAIL(MSH_ERANGE, "token id %d outside [0, %d)", (int)id, b->n_tokens);
  *piece = b->bytes + b->at[id];
  *len = (size_t)(b->at[id + 1] - b->at[id]);
  return MSH_OK;
}

msh_status msh_bpe_find(const msh_bpe *b, const char *text, size_t len, int32_t *id) {
  if (!b || (!text && len) || !id) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  for (int i = 0; i < b->n_added; i++) {
    int32_t t = b->added[i];
    if ((size_t)(b->at[t + 1] - b->at[t]) == len && memcmp(b->bytes + b->at[t], text, len) == 0) {
      *id = t;
      return MSH_OK;
    }
  }
  int32_t t = len ? table_get(&b->normal, b->bytes, b->at, text, len) : -1;
  if (t < 0) return MSH_FAIL(MSH_ENOENT, "no token '%.*s'", (int)(len > 200 ? 200 : len), text);
  *id = t;
  return MSH_OK;
}

/* ---------------------------------------------------------------------------------- merging */

static void emit(msh_bpe *b, int32_t id) {
  if (b->out_n < b->out_cap) b->out[b->out_n] = id;
  b->out_n++;
}

/* msh_bpe_pieces: one piece ending at byte end. */
static void emit_end(msh_bpe *b, size_t end) {
  if (b->out_n < b->out_cap) b->ends[b->out_n] = end;
  b->out_n++;
}

static int cand_less(const candidate *x, const candidate *y) {
  return x->rank != y->rank ? x->rank < y->rank : x->pos < y->pos;
}

static void heap_push(msh_bpe *b, int32_t rank, int32_t pos, int32_t id) {
  candidate c = {rank, pos, id};
  size_t i = b->heap_n++;
  while (i > 0) {
    size_t parent = (i - 1) / 2;
    if (!cand_less(&c, &b->heap[parent])) break;
    b->heap[i] = b->heap[parent];
    i = parent;
  }
  b->heap[i] = c;
}

static candidate heap_pop(msh_bpe *b) {
  candidate top = b->heap[0], last = b->heap[--b->heap_n];
  size_t i = 0, n = b->heap_n;
  for (;;) {
    size_t l = 2 * i + 1, m = l + 1, best = i;
    const candidate *bc = &last;
    if (l < n && cand_less(&b->heap[l], bc)) best = l, bc = &b->heap[l];
    if (m < n && cand_less(&b->heap[m], bc)) best = m;
    if (best == i) break;
    b->heap[i] = b->heap[best];
    i = best;
  }
  if (n) b->heap[i] = last;
  return top;
}

static void push_pair(msh_bpe *b, int32_t pos) {
  int32_t nx = b->syms[pos].next;
  if (nx < 0) return;
  const merge_slot *m = merge_get(b, b->syms[pos].id, b->syms[nx].id);
  if (m) heap_push(b, m->rank, pos, m->id);
}

/* Scratch room for a piece of n bytes: n symbols and 3n heap entries (n - 1 initial pairs, at
 * most two more per merge). Grows only when a longer piece than any before arrives. */
static msh_status reserve(msh_bpe *b, size_t n) {
  if (n <= b->syms_cap) return MSH_OK;
  size_t cap = n < 64 ? 64 : n + n / 2;
  symbol *s = realloc(b->syms, sizeof *s * cap);
  if (s) b->syms = s;
  candidate *h = s ? realloc(b->heap, sizeof *h * 3 * cap) : NULL;
  if (!s || !h) return MSH_FAIL(MSH_ENOMEM, "out of memory for a piece of %zu bytes", n);
  b->heap = h;
  b->syms_cap = cap;
  return MSH_OK;
}

/* Ids of one piece, merged, appended to out; returns the number appended. */
static msh_status merge_piece(msh_bpe *b, const uint8_t *p, size_t n) {
  msh_status s = reserve(b, n);
  if (s != MSH_OK) return s;
  symbol *sy = b->syms;
  int32_t m = 0;
  for (size_t i = 0; i < n; i++) {
    int32_t id = b->byte_id[p[i]];
    if (id < 0) continue; /* no token for this byte: dropped, as tokenizers does without unk */
    sy[m] = (symbol){id, m - 1, m + 1, 1};
    m++;
  }
  if (m == 0) return MSH_OK;
  sy[m - 1].next = -1;
  b->heap_n = 0;
  for (int32_t i = 0; i + 1 < m; i++) push_pair(b, i);
  while (b->heap_n) {
    candidate c = heap_pop(b);
    symbol *x = &sy[c.pos];
    if (x->len == 0 || x->next < 0) continue;
    symbol *y = &sy[x->next];
    const merge_slot *cur = merge_get(b, x->id, y->id);
    if (!cur || cur->id != c.id) continue; /* stale: a neighbour changed since the push */
    x->id = c.id;
    x->len += y->len;
    y->len = 0;
    x->next = y->next;
    if (x->next >= 0) sy[x->next].prev = c.pos;
    if (x->prev >= 0) push_pair(b, x->prev);
    push_pair(b, c.pos);
  }
  for (int32_t i = 0; i >= 0; i = sy[i].next) emit(b, sy[i].id);
  return MSH_OK;
}

/* ------------------------------------------------------------------------------------ cache */

static void cache_clear(msh_bpe *b) {
  memset(b->cache, 0, sizeof *b->cache * CACHE_SLOTS);
  b->cache_used = b->cache_bytes_used = b->cache_ids_used = 0;
}

static cache_slot *cache_slot_for(msh_bpe *b, const uint8_t *p, size_t n, uint64_t h) {
  for (uint32_t i = (uint32_t)h & (CACHE_SLOTS - 1);; i = (i + 1) & (CACHE_SLOTS - 1)) {
    cache_slot *c = &b->cache[i];
    if (c->hash == 0 ||
        (c->hash == h && c->key_len == n && memcmp(b->cache_bytes + c->key_at, p, n) == 0))
      return c;
  }
}

/* Encodes one piece of raw bytes. */
static msh_status encode_piece(msh_bpe *b, const uint8_t *p, size_t n) {
  if (n == 0) return MSH_OK;
  if (b->flags & MSH_BPE_IGNORE_MERGES) {
    int32_t id = table_get(&b->normal, b->bytes, b->at, (const char *)p, n);
    if (id >= 0) {
      emit(b, id);
      return MSH_OK;
    }
  }
  if (n > CACHE_MAX_PIECE) return merge_piece(b, p, n);
  uint64_t h = hash_bytes(p, n) | 1;
  cache_slot *c = cache_slot_for(b, p, n, h);
  if (c->hash) {
    for (int i = 0; i < c->n_ids; i++) emit(b, b->cache_ids[c->ids_at + i]);
    return MSH_OK;
  }
  int64_t first = b->out_n;
  int32_t *saved_out = b->out;
  int64_t saved_cap = b->out_cap;
  /* merge into the cache's id pool directly when there is room, then copy out */
  if (b->cache_used >= CACHE_SLOTS / 2 || b->cache_bytes_used + n > CACHE_BYTES ||
      b->cache_ids_used + n > CACHE_IDS) {
    cache_clear(b);
    c = cache_slot_for(b, p, n, h);
  }
  b->out = b->cache_ids + b->cache_ids_used;
  b->out_cap = (int64_t)n;
  b->out_n = 0;
  msh_status s = merge_piece(b, p, n);
  int64_t got = b->out_n;
  b->out = saved_out;
  b->out_cap = saved_cap;
  b->out_n = first;
  if (s != MSH_OK) return s;
  const int32_t *ids = b->cache_ids + b->cache_ids_used;
  for (int64_t i = 0; i < got; i++) emit(b, ids[i]);
  memcpy(b->cache_bytes + b->cache_bytes_used, p, n);
  *c = (cache_slot){h, b->cache_bytes_used, b->cache_ids_used, (uint16_t)n, (uint16_t)got};
  b->cache_bytes_used += (uint32_t)n;
  b->cache_ids_used += (uint32_t)got;
  b->cache_used++;
  return MSH_OK;
}

/* ------------------------------------------------------------------------------ pre-tokenize */

/* Splits text[s, e) by pattern level and the ones after it, encoding each final piece. */
static msh_status split(msh_bpe *b, int level, size_t s, size_t e) {
  if (s == e) return MSH_OK;
  if (level == b->n_re) {
    if (!b->ends) return encode_piece(b, (const uint8_t *)b->text + s, e - s);
    emit_end(b, e);
    return MSH_OK;
  }
  PCRE2_SPTR subject = (PCRE2_SPTR)b->text + s;
  size_t n = e - s, last = 0, from = 0;
  msh_status st;
  while (from <= n) {
    int rc = pcre2_match(b->re[level], subject, n, from, 0, b->md[level], NULL);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(rc, msg, sizeof msg);
      return MSH_FAIL(MSH_EINVAL, "pattern %d failed at byte %zu: %s", level, s + from, (const char *)msg);
    }
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(b->md[level]);
    size_t ms = ov[0], me = ov[1];
    if (ms > last && (st = split(b, level + 1, s + last, s + ms)) != MSH_OK) return st;
    if (me > ms) {
      if ((st = split(b, level + 1, s + ms, s + me)) != MSH_OK) return st;
      last = from = me;
    } else { /* an empty match: step over one character */
      last = ms;
      from = ms + 1;
      while (from < n && (subject[from] & 0xC0) == 0x80) from++;
    }
  }
  return split(b, level + 1, s + last, e);
}

/* The added token starting at p (the longest), or -1. */
static int32_t added_at(const msh_bpe *b, const uint8_t *p, size_t n, int parse_special, size_t *len) {
  for (int j = b->added_first[p[0]]; j < b->added_first[p[0] + 1]; j++) {
    int32_t t = b->added[j];
    size_t l = (size_t)(b->at[t + 1] - b->at[t]);
    if (l <= n && memcmp(b->bytes + b->at[t], p, l) == 0 &&
        (parse_special || b->kinds[t] == MSH_BPE_ADDED)) {
      *len = l;
      return t;
    }
  }
  return -1;
}

/* Encodes text into b->out (or records piece ends into b->ends). */
static msh_status run(msh_bpe *b, const char *text, size_t len, int flags, int cap, int *n_out) {
  if (flags & ~MSH_BPE_PARSE_SPECIAL) return MSH_FAIL(MSH_EINVAL, "unknown flags 0x%x", (unsigned)flags);
  b->text = text;
  b->out_cap = cap;
  b->out_n = 0;
  int parse_special = flags & MSH_BPE_PARSE_SPECIAL;
  const uint8_t *p = (const uint8_t *)text;
  size_t seg = 0;
  msh_status s = MSH_OK;
  for (size_t i = 0; i < len && s == MSH_OK;) {
    size_t l;
    int32_t t = b->n_added ? added_at(b, p + i, len - i, parse_special, &l) : -1;
    if (t < 0) {
      i++;
      continue;
    }
    s = split(b, 0, seg, i);
    i += l;
    if (b->ends) emit_end(b, i);
    else emit(b, t);
    seg = i;
  }
  if (s == MSH_OK) s = split(b, 0, seg, len);
  b->text = NULL;
  b->out = NULL;
  b->ends = NULL;
  if (s != MSH_OK) return s;
  if (b->out_n > INT_MAX) return MSH_FAIL(MSH_ERANGE, "text gives more than %d results", INT_MAX);
  *n_out = (int)b->out_n;
  if (b->out_n > cap)
    return MSH_FAIL(MSH_ERANGE, "%lld results do not fit in %d", (long long)b->out_n, cap);
  return MSH_OK;
}

msh_status msh_bpe_encode(msh_bpe *b, const char *text, size_t len, int flags, int32_t *ids, int cap,
                          int *n_out) {
  if (!b || (!text && len) || (!ids && cap > 0) || cap < 0 || !n_out)
    return MSH_FAIL(MSH_EINVAL, "NULL or negative argument");
  b->out = ids;
  b->ends = NULL;
  return run(b, text, len, flags, cap, n_out);
}

msh_status msh_bpe_pieces(msh_bpe *b, const char *text, size_t len, int flags, uint64_t *ends, int cap,
                          int *n_out) {
  if (!b || (!text && len) || (!ends && cap > 0) || cap < 0 || !n_out)
    return MSH_FAIL(MSH_EINVAL, "NULL or negative argument");
  b->out = NULL;
  b->ends = ends;
  return run(b, text, len, flags, cap, n_out);
}
