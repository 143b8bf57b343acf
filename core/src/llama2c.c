/* llama2c.c: the header of a llama2.c checkpoint, checked against the file's size.
 *
 * Layout: seven int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a
 * negative vocab_size means the classifier is stored separately), then f32 weights:
 *   token_embedding (vocab, dim)
 *   rms_att         (layer, dim)
 *   wq              (layer, dim, dim)
 *   wk, wv          (layer, kv_dim, dim) each
 *   wo              (layer, dim, dim)
 *   rms_ffn         (layer, dim)
 *   w1, w3          (layer, hidden, dim) each; w2 (layer, dim, hidden)
 *   rms_final       (dim)
 *   freq_cis_real, freq_cis_imag (seq_len, head_size / 2) each: legacy RoPE tables, unused
 *   wcls            (vocab, dim), only when not shared
 */
#include "internal.h"

#include <string.h>

enum { L2C_HEADER_BYTES = 28 };

/* Field values beyond these describe no model anyone can load (and keep the products below far
 * from overflow even before the checked arithmetic). */
#define L2C_MAX_FIELD (1 << 24)

static int32_t read_i32_le(const unsigned char *p) {
  uint32_t u = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
  int32_t v;
  memcpy(&v, &u, 4);
  return v;
}

/* acc += a * b * c, all checked; returns 0 on overflow. */
static int add_prod(uint64_t *acc, uint64_t a, uint64_t b, uint64_t c) {
  uint64_t p;
  if (__builtin_mul_overflow(a, b, &p) || __builtin_mul_overflow(p, c, &p)) return 0;
  return !__builtin_add_overflow(*acc, p, acc);
}

msh_status msh_llama2c_header(const msh_file *f, int32_t *cfg, int *shared) {
  if (!f || !cfg || !shared) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  const char *path = msh_file_path(f);
  uint64_t size = msh_file_size(f);
  if (size < L2C_HEADER_BYTES)
    return MSH_FAIL(MSH_EFORMAT, "'%s': truncated: expected at least %d header bytes, found %llu",
                    path, L2C_HEADER_BYTES, (unsigned long long)size);

  static const char *const names[7] = {"dim",        "hidden_dim", "n_layers", "n_heads",
                                       "n_kv_heads", "vocab_size", "seq_len"};
  const unsigned char *p = msh_file_data(f);
  int32_t c[7];
  for (int i = 0; i < 7; i++) c[i] = read_i32_le(p + 4 * i);
  int is_shared = c[5] > 0;
  if (c[5] < 0 && c[5] != INT32_MIN) c[5] = -c[5];
  for (int i = 0; i < 7; i++) {
    if (c[i] <= 0)
      return MSH_FAIL(MSH_EFORMAT, "'%s': header field %s is %d (must be positive)", path, names[i],
                      (int)read_i32_le(p + 4 * i));
    if (c[i] > L2C_MAX_FIELD)
      return MSH_FAIL(MSH_EFORMAT, "'%s': header field %s is %d (implausibly large)", path,
                      names[i], (int)c[i]);
  }
  int32_t dim = c[0], hidden = c[1], layers = c[2], heads = c[3], kv_heads = c[4], vocab = c[5],
          seq = c[6];
  if (dim % heads != 0)
    return MSH_FAIL(MSH_EFORMAT, "'%s': dim %d is not a multiple of n_heads %d", path, dim, heads);
  if (heads % kv_heads != 0)
    return MSH_FAIL(MSH_EFORMAT, "'%s': n_heads %d is not a multiple of n_kv_heads %d", path, heads,
                    kv_heads);
  uint64_t head_size = (uint64_t)(dim / heads);
  if (head_size % 2 != 0)
    return MSH_FAIL(MSH_EFORMAT, "'%s': head size %llu is odd (RoPE rotates pairs)", path,
                    (unsigned long long)head_size);
  uint64_t kv_dim = (uint64_t)kv_heads * head_size;
  uint64_t D = (uint64_t)dim, H = (uint64_t)hidden, L = (uint64_t)layers, V = (uint64_t)vocab;

  /* elements, in file order */
  uint64_t n = 0;
  int ok = add_prod(&n, V, D, 1)                 /* token_embedding */
           && add_prod(&n, L, D, 1)              /* rms_att */
           && add_prod(&n, L, D, D)              /* wq */
           && add_prod(&n, L, kv_dim, D)         /* wk */
           && add_prod(&n, L, kv_dim, D)         /* wv */
           && add_prod(&n, L, D, D)              /* wo */
           && add_prod(&n, L, D, 1)              /* rms_ffn */
           && add_prod(&n, L, H, D)              /* w1 */
           && add_prod(&n, L, D, H)              /* w2 */
           && add_prod(&n, L, H, D)              /* w3 */
           && add_prod(&n, D, 1, 1)              /* rms_final */
           && add_prod(&n, (uint64_t)seq, head_size, 1) /* two RoPE tables of seq * hs / 2 */
           && (is_shared || add_prod(&n, V, D, 1)); /* wcls */
  uint64_t expected = 0;
  if (!ok || __builtin_mul_overflow(n, (uint64_t)4, &expected) ||
      __builtin_add_overflow(expected, (uint64_t)L2C_HEADER_BYTES, &expected))
    return MSH_FAIL(MSH_EFORMAT, "'%s': the header implies more weights than any file holds", path);
  if (size < expected)
    return MSH_FAIL(MSH_EFORMAT, "'%s': truncated: expected %llu bytes, found %llu", path,
                    (unsigned long long)expected, (unsigned long long)size);
  if (size > expected)
    return MSH_FAIL(MSH_EFORMAT, "'%s': expected %llu bytes, found %llu (%llu bytes too many)", path,
                    (unsigned long long)expected, (unsigned long long)size,
                    (unsigned long long)(size - expected));
  memcpy(cfg, c, sizeof c);
  *shared = is_shared;
  return MSH_OK;
}
