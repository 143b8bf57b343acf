/* fuzz_http.c: libFuzzer target for msh_http (core/src/http.c over http_parser).
 *
 * The first byte picks the kind (request or response) and the size of the pieces the rest is fed
 * in; complete messages are taken one after another as a server takes pipelined requests. A
 * parse either consumes within its input, or fails with a message, an HTTP status to answer and
 * an error name; a complete message respects the limits.
 * Build and run: tools/fuzz/run.sh [seconds] http (needs clang and libhttp-parser-dev).
 */
#include "internal.h"

#include <stdint.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

enum { MAX_HEAD = 2048, MAX_BODY = 1024, MAX_HEADERS = 16 };

static void check_message(msh_http *h) {
  size_t n = 0, total = 0;
  (void)msh_http_url(h, &n);
  total += n;
  int count = msh_http_header_count(h);
  if (count < 0 || count > MAX_HEADERS) __builtin_trap();
  for (int i = 0; i < count; i++) {
    const char *name, *value;
    size_t nl, vl;
    if (msh_http_header(h, i, &name, &nl, &value, &vl) != MSH_OK) __builtin_trap();
    if (nl && !name) __builtin_trap();
    total += nl + vl;
  }
  if (total > MAX_HEAD) __builtin_trap();
  (void)msh_http_body(h, &n);
  if (n > MAX_BODY) __builtin_trap();
  if (!msh_http_method(h)) __builtin_trap();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  int kind = data[0] & 1;
  size_t step = (data[0] >> 1) + 1;
  data++, size--;
  msh_http *h = NULL;
  if (msh_http_new(&h, kind, MAX_HEAD, MAX_BODY, MAX_HEADERS) != MSH_OK) __builtin_trap();
  size_t off = 0;
  int messages = 0;
  for (;;) {
    size_t k = size - off < step ? size - off : step, used = 0;
    int state = -1;
    msh_status s = msh_http_feed(h, (const char *)data + off, k, &used, &state);
    if (used > k) __builtin_trap();
    if (s != MSH_OK) {
      int st = msh_http_error_status(h);
      if (st != 400 && st != 413 && st != 431 && st != 500) __builtin_trap();
      if (!msh_last_error()[0] || !msh_http_error_name(h)[0]) __builtin_trap();
      break;
    }
    if (state < 0 || state > 2) __builtin_trap();
    off += used;
    if (state == 2) {
      check_message(h);
      if (msh_http_next(h) != MSH_OK) __builtin_trap();
      if (++messages > 1000) break;
      continue;
    }
    if (used != k) __builtin_trap(); /* stops short only after a message */
    if (k == 0) break;               /* the end of input was fed as the peer's close */
  }
  msh_http_free(h);
  return 0;
}
