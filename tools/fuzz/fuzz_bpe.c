/* fuzz_bpe.c: libFuzzer target for the byte-level BPE tokenizer with SmolLM2's vocabulary.
 *
 * First byte: bit 0 picks the pre-tokenizer (SmolLM2's "\p{N}" + GPT-2 regex, or Llama-3's with
 * ignore_merges), bit 1 parses special tokens. The rest is text (any bytes). Checks:
 *   - the ids decode back to the text, less the bytes that have no token;
 *   - without special tokens, the ids equal the classic merge loop (written here: repeatedly
 *     merge the lowest-ranked adjacent pair, leftmost first) run on each pre-tokenizer piece;
 *   - a buffer one id too small gives MSH_ERANGE and the same count.
 * The tokenizer source is included so the harness can read its merge table.
 * Build and run (needs clang, PCRE2):
 *   clang -std=gnu11 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
 *     -Icore/include -Icore/src -Itests/c -DMSH_VERSION='"fuzz"' -DMSH_ROOT="\"$PWD\"" \
 *     -o build-fuzz/fuzz_bpe tools/fuzz/fuzz_bpe.c core/src/status.c $(pkg-config --libs libpcre2-8)
 *   build-fuzz/fuzz_bpe -max_total_time=60 -max_len=1024 build-fuzz/corpus_bpe
 */
#include "../../core/src/bpe.c"

#include "bpe_fixture.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *PATS_SMOL[2] = {
    "\\p{N}", "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"};
static const char *PATS_LLAMA3[1] = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"};

static msh_bpe *tok[2];
static int32_t ids[8192], ref[8192], sym[8192];
static uint64_t ends[8192];

static void setup(void) {
  vocab v;
  if (!vocab_load(&v)) __builtin_trap();
  if (msh_bpe_new(&tok[0], v.n_tokens, v.text, v.offsets, v.kinds, v.n_merges, v.merges, v.merge_offsets,
                  2, PATS_SMOL, 0) != MSH_OK ||
      msh_bpe_new(&tok[1], v.n_tokens, v.text, v.offsets, v.kinds, v.n_merges, v.merges, v.merge_offsets,
                  1, PATS_LLAMA3, MSH_BPE_IGNORE_MERGES) != MSH_OK)
    __builtin_trap();
  vocab_free(&v);
}

/* The classic loop over one piece; appends to ref. */
static int naive(const msh_bpe *b, const uint8_t *p, size_t n, int32_t *out) {
  if (b->flags & MSH_BPE_IGNORE_MERGES) {
    int32_t id = table_get(&b->normal, b->bytes, b->at, (const char *)p, n);
    if (id >= 0) {
      out[0] = id;
      return 1;
    }
  }
  int m = 0;
  for (size_t i = 0; i < n; i++)
    if (b->byte_id[p[i]] >= 0) sym[m++] = b->byte_id[p[i]];
  for (;;) {
    int best = -1;
    int32_t best_rank = INT32_MAX, best_id = -1;
    for (int i = 0; i + 1 < m; i++) {
      const merge_slot *s = merge_get(b, sym[i], sym[i + 1]);
      if (s && s->rank < best_rank) best = i, best_rank = s->rank, best_id = s->id;
    }
    if (best < 0) break;
    sym[best] = best_id;
    memmove(sym + best + 1, sym + best + 2, sizeof *sym * (size_t)(m - best - 2));
    m--;
  }
  memcpy(out, sym, sizeof *sym * (size_t)m);
  return m;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!tok[0]) setup();
  if (size < 1 || size > 4096) return 0;
  msh_bpe *b = tok[data[0] & 1];
  int flags = (data[0] & 2) ? MSH_BPE_PARSE_SPECIAL : 0;
  const char *text = (const char *)data + 1;
  size_t len = size - 1;
  int n = -1;
  if (msh_bpe_encode(b, text, len, flags, ids, 8192, &n) != MSH_OK) __builtin_trap();
  if (n > 0) {
    int n2 = -1;
    if (msh_bpe_encode(b, text, len, flags, ids, n - 1, &n2) != MSH_ERANGE || n2 != n) __builtin_trap();
  }
  /* decoding gives the text back, less bytes without a token */
  size_t at = 0;
  for (int i = 0; i < n; i++) {
    const char *piece;
    size_t pl;
    if (msh_bpe_piece(b, ids[i], &piece, &pl) != MSH_OK) __builtin_trap();
    int normal = msh_bpe_token_kind(b, ids[i]) == MSH_BPE_NORMAL;
    for (size_t k = 0; k < pl; k++) {
      /* dropped bytes sit before a token or, merged around, inside a normal one */
      while (at < len && b->byte_id[(uint8_t)text[at]] < 0 && (k == 0 || normal)) at++;
      if (at >= len || text[at] != piece[k]) __builtin_trap();
      at++;
    }
  }
  while (at < len && b->byte_id[(uint8_t)text[at]] < 0) at++;
  if (at != len) __builtin_trap();
  if (flags) return 0;
  /* the heap merge equals the classic loop, piece by piece */
  int np = -1, r = 0;
  if (msh_bpe_pieces(b, text, len, 0, ends, 8192, &np) != MSH_OK) __builtin_trap();
  uint64_t start = 0;
  for (int k = 0; k < np; k++) {
    r += naive(b, (const uint8_t *)text + start, (size_t)(ends[k] - start), ref + r);
    start = ends[k];
  }
  if (r != n || memcmp(ref, ids, sizeof *ids * (size_t)n) != 0) __builtin_trap();
  return 0;
}
