/* fuzz_tokenizer.c: libFuzzer target for the SentencePiece-style tokenizer.
 *
 * Even first byte: the rest is text, encoded with tok512.bin; the ids must decode back to
 * " " + text, and must equal what a naive O(n^2) merge loop (written here) produces.
 * Odd first byte: the second byte picks the vocab size (3 + b % 64), the rest is a tokenizer.bin
 * to load; a file that loads must encode a fixed text and decode it back.
 * The tokenizer source is included so the harness can read the vocabulary's raw pieces.
 * Build and run: tools/fuzz/run.sh [seconds] tokenizer (needs clang).
 */
#define _GNU_SOURCE
#include "../../core/src/tokenizer.c"

#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef MSH_DATA_DIR
#define MSH_DATA_DIR "../shared/data"
#endif

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The textbook loop over the ids that encode produced before merging (rebuilt here). */
static int naive(const msh_tokenizer *t, const uint8_t *text, size_t len, int32_t *toks) {
  int n = 0;
  const unsigned char *sp = (const unsigned char *)" ";
  int32_t id = lookup2(t, (const char *)sp, 1, "", 0);
  toks[n++] = id >= 0 ? id : t->byte_id[' '];
  for (size_t i = 0; i < len;) {
    size_t k = utf8_len(text + i, len - i);
    id = k ? lookup2(t, (const char *)text + i, k, "", 0) : -1;
    if (id >= 0) toks[n++] = id;
    else
      for (size_t j = 0; j < (k ? k : 1); j++) toks[n++] = t->byte_id[text[i + j]];
    i += k ? k : 1;
  }
  for (;;) {
    int best = -1, at = -1;
    for (int j = 0; j + 1 < n; j++) {
      if (!t->plain[toks[j]] || !t->plain[toks[j + 1]]) continue;
      size_t na, nb;
      const char *a = piece(t, toks[j], &na), *b = piece(t, toks[j + 1], &nb);
      int32_t m = lookup2(t, a, na, b, nb);
      if (m >= 0 && (best < 0 || t->score[m] > t->score[best])) {
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

static int round_trip(const msh_tokenizer *t, const uint8_t *text, size_t len, int32_t *ids,
                      int cap, int *n) {
  if (msh_tokenizer_encode(t, (const char *)text, len, 1, ids, cap, n) != MSH_OK) return 0;
  if (*n < 1 || ids[0] != 1) return 0;
  size_t at = 0;
  for (int i = 1; i < *n; i++) {
    const char *p;
    size_t k;
    if (msh_tokenizer_piece(t, ids[i], &p, &k) != MSH_OK) return 0;
    for (size_t j = 0; j < k; j++, at++) {
      int want = at == 0 ? ' ' : (at - 1 < len ? text[at - 1] : -1);
      if ((unsigned char)p[j] != want) return 0;
    }
  }
  return len == 0 ? at == 0 : at == len + 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static msh_tokenizer *tok512;
  static int32_t ids[8192], ref[8192];
  if (size < 1 || size > 4096) return 0;
  if ((data[0] & 1) == 0) {
    if (!tok512 && msh_tokenizer_load_sp(&tok512, MSH_DATA_DIR "/models/stories260K/tok512.bin", 512) != MSH_OK)
      __builtin_trap();
    int n = 0;
    if (!round_trip(tok512, data + 1, size - 1, ids, 8192, &n)) __builtin_trap();
    if (size > 1) {
      int m = naive(tok512, data + 1, size - 1, ref);
      if (m != n - 1 || memcmp(ref, ids + 1, (size_t)m * sizeof *ref) != 0) __builtin_trap();
    }
    return 0;
  }
  static int fd = -1;
  if (fd < 0) fd = memfd_create("fuzz_tokenizer", 0);
  if (size < 2 || fd < 0 || ftruncate(fd, 0) != 0 ||
      pwrite(fd, data + 2, size - 2, 0) != (ssize_t)(size - 2))
    return 0;
  char path[64];
  snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
  int vocab = 3 + data[1] % 64;
  msh_tokenizer *t = NULL;
  if (msh_tokenizer_load_sp(&t, path, vocab) != MSH_OK) {
    if (!msh_last_error()[0]) __builtin_trap();
    return 0;
  }
  static const uint8_t text[] = "hello \xff w\xc3\xa9rld \xf0\x9f\x99\x82";
  int n = 0;
  /* a vocab without byte pieces maps unknown bytes to <unk>, so only check when all are there */
  int bytes_ok = 1;
  for (int b = 0; b < 256; b++) bytes_ok &= t->byte_id[b] != TOK_UNK;
  if (bytes_ok && !round_trip(t, text, sizeof text - 1, ids, 8192, &n)) __builtin_trap();
  if (!bytes_ok && msh_tokenizer_encode(t, (const char *)text, sizeof text - 1, 1, ids, 8192, &n) != MSH_OK)
    __builtin_trap();
  for (int i = 0; i < n; i++)
    if (ids[i] < 0 || ids[i] >= vocab) __builtin_trap();
  msh_tokenizer_free(t);
  return 0;
}
