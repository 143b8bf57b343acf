/* ops.c: the op entry points. Each checks its operands (devices, dtypes, shapes, contiguity)
 * and hands them to the backend of their device. */
#include "internal.h"

#include <string.h>

static int is_float(int dt) { return dt == MSH_F32 || dt == MSH_F16 || dt == MSH_BF16; }

#define SHAPE(t, buf) msh_shape_str((t), (buf), sizeof(buf))

/* All non-NULL operands on one device; returns its backend or NULL with the error set. */
static const msh_backend *same_device(const char *op, const msh_tensor *a, const msh_tensor *b,
                                      const msh_tensor *c, const msh_tensor *d) {
  const msh_tensor *ts[4] = {a, b, c, d};
  const msh_tensor *first = NULL;
  for (int i = 0; i < 4; i++) {
    if (!ts[i]) continue;
    if (!first) first = ts[i];
    else if (ts[i]->st->device != first->st->device || ts[i]->st->device_index != first->st->device_index) {
      MSH_FAIL(MSH_EINVAL, "%s: operands live on different devices", op);
      return NULL;
    }
  }
  return msh_backend_for(first->st->device);
}

static msh_status want_out(const char *op, const msh_tensor *out) {
  if (out->dtype != MSH_F32) return MSH_FAIL(MSH_EINVAL, "%s: output must be f32, not %s", op, msh_dtype_name(out->dtype));
  if (!msh_tensor_is_contiguous(out)) return MSH_FAIL(MSH_EINVAL, "%s: output must be contiguous", op);
  if (out->st->readonly) return MSH_FAIL(MSH_EINVAL, "%s: output is read-only", op);
  return MSH_OK;
}

static msh_status want_f32c(const char *op, const char *name, const msh_tensor *t) {
  if (t->dtype != MSH_F32 || !msh_tensor_is_contiguous(t))
    return MSH_FAIL(MSH_EINVAL, "%s: %s must be contiguous f32, not %s%s", op, name,
                    msh_dtype_name(t->dtype), msh_tensor_is_contiguous(t) ? "" : " (strided)");
  return MSH_OK;
}

static msh_status want_weight(const char *op, const char *name, const msh_tensor *t) {
  if (!is_float(t->dtype) || !msh_tensor_is_contiguous(t))
    return MSH_FAIL(MSH_EINVAL, "%s: %s must be a contiguous f32/f16/bf16 tensor, not %s%s%s", op, name,
                    msh_dtype_name(t->dtype), msh_tensor_is_contiguous(t) ? "" : " (strided)",
                    msh_dtype_is_block(t->dtype) ? " (block-quantized weights go to matmul and embedding)" : "");
  return MSH_OK;
}

/* The weights of matmul and embedding: as want_weight, or block-quantized (on the CPU, or on a
 * device whose backend takes them: CUDA's quantized GEMV/GEMM). */
static msh_status want_matrix(const char *op, const char *name, const msh_tensor *t) {
  if (!msh_dtype_is_block(t->dtype)) return want_weight(op, name, t);
  if (!msh_tensor_is_contiguous(t)) return MSH_FAIL(MSH_EINVAL, "%s: %s must be contiguous", op, name);
  return MSH_OK;
}

/* Whether a backend's fused kernel (rmsnorm_matmul, rmsnorm_mlp, rmsnorm_qkv_rope) may take weight
 * w: the CPU's fused ops take every matmul dtype; a device's take float weights only, and
 * block-quantized ones go the generic way (rmsnorm, then the backend's matmul, which takes them). */
static int fused_takes(const msh_tensor *w) { return !w || !msh_dtype_is_block(w->dtype) || w->st->device == MSH_CPU; }

static int same_shape(const msh_tensor *a, const msh_tensor *b) {
  return a->ndim == b->ndim && !memcmp(a->shape, b->shape, sizeof(int64_t) * (size_t)a->ndim);
}

/* Byte range [lo, hi) a tensor's elements span in its storage. */
static void byte_span(const msh_tensor *t, int64_t *lo, int64_t *hi) {
  int64_t a = t->offset, b = t->offset;
  for (int i = 0; i < t->ndim; i++) {
    if (t->shape[i] == 0) {
      *lo = *hi = 0;
      return;
    }
    int64_t ext = (t->shape[i] - 1) * t->stride[i];
    if (ext < 0) a += ext;
    else b += ext;
  }
  *lo = msh_dtype_bytes(t->dtype, a);
  *hi = msh_dtype_bytes(t->dtype, b + 1);
}

static int overlaps(const msh_tensor *a, const msh_tensor *b) {
  if (a->st != b->st) return 0;
  int64_t alo, ahi, blo, bhi;
  byte_span(a, &alo, &ahi);
  byte_span(b, &blo, &bhi);
  return alo < bhi && blo < ahi;
}

/* out may be exactly x (same elements, same layout) or apart from it, never partly over it. */
static int same_or_apart(const msh_tensor *out, const msh_tensor *x) {
  if (!overlaps(out, x)) return 1;
  return out->offset == x->offset && out->dtype == x->dtype && same_shape(out, x) &&
         !memcmp(out->stride, x->stride, sizeof(int64_t) * (size_t)out->ndim);
}

#define CHECK(expr)                   \
  do {                                \
    msh_status s_ = (expr);           \
    if (s_ != MSH_OK) return s_;      \
  } while (0)

msh_status msh_op_embedding(msh_tensor *out, const msh_tensor *table, const msh_tensor *ids) {
  if (!out || !table || !ids) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  const msh_backend *be = same_device("embedding", out, table, ids, NULL);
  if (!be) return MSH_EINVAL;
  CHECK(want_out("embedding", out));
  CHECK(want_matrix("embedding", "table", table));
  char a[96], b[96], c[96];
  if (ids->dtype != MSH_I32 || ids->ndim != 1 || !msh_tensor_is_contiguous(ids) || table->ndim != 2 ||
      out->ndim != 2 || out->shape[0] != ids->shape[0] || out->shape[1] != table->shape[1])
    return MSH_FAIL(MSH_EINVAL, "embedding: out %s, table %s, ids %s do not fit (T, D) = (V, D)[(T) i32]",
                    SHAPE(out, a), SHAPE(table, b), SHAPE(ids, c));
  return be->embedding(out, table, ids);
}

msh_status msh_op_rmsnorm(msh_tensor *out, const msh_tensor *x, const msh_tensor *w, float eps) {
  if (!out || !x || !w) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  const msh_backend *be = same_device("rmsnorm", out, x, w, NULL);
  if (!be) return MSH_EINVAL;
  CHECK(want_out("rmsnorm", out));
  CHECK(want_f32c("rmsnorm", "x", x));
  CHECK(want_weight("rmsnorm", "w", w));
  char a[96], b[96], c[96];
  if (!same_shape(out, x) || x->ndim < 1 || w->ndim != 1 || w->shape[0] != x->shape[x->ndim - 1])
    return MSH_FAIL(MSH_EINVAL, "rmsnorm: out %s, x %s, w %s do not fit", SHAPE(out, a), SHAPE(x, b), SHAPE(w, c));
  if (!same_or_apart(out, x)) return MSH_FAIL(MSH_EINVAL, "rmsnorm: out partly overlaps x");
  if (msh_tensor_numel(x) == 0) return MSH_OK; /* nothing to normalize: backends never see it */
  return be->rmsnorm(out, x, w, eps);
}

/* The operands of matmul and its fused forms: out (M, N), x (M, K), w (wn * N, K). */
static msh_status check_matmul(const char *op, const msh_tensor *out, const msh_tensor *x, const msh_tensor *w,
                               int64_t wn) {
  CHECK(want_out(op, out));
  CHECK(want_f32c(op, "x", x));
  CHECK(want_matrix(op, "w", w));
  char a[96], b[96], c[96];
  if (out->ndim != 2 || x->ndim != 2 || w->ndim != 2 || x->shape[1] != w->shape[1] ||
      out->shape[0] != x->shape[0] || wn * out->shape[1] != w->shape[0])
    return MSH_FAIL(MSH_EINVAL, "%s: out %s, x %s, w %s do not fit (M, N) = (M, K) @ (%sN, K)^T", op,
                    SHAPE(out, a), SHAPE(x, b), SHAPE(w, c), wn == 2 ? "2 " : "");
  if (overlaps(out, x) || overlaps(out, w)) return MSH_FAIL(MSH_EINVAL, "%s: out overlaps an input", op);
  return MSH_OK;
}

msh_status msh_op_matmul(msh_tensor *out, const msh_tensor *x, const msh_tensor *w) {
  if (!out || !x || !w) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  const msh_backend *be = same_device("matmul", out, x, w, NULL);
  if (!be) return MSH_EINVAL;
  CHECK(check_matmul("matmul", out, x, w, 1));
  return be->matmul(out, x, w);
}

msh_status msh_op_matmul_acc(msh_tensor *out, const msh_tensor *x, const msh_tensor *w) {
  if (!out || !x || !w) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  const msh_backend *be = same_device("matmul_acc", out, x, w, NULL);
  if (!be) return MSH_EINVAL;
  CHECK(check_matmul("matmul_acc", out, x, w, 1));
  if (msh_tensor_numel(out) == 0) return MSH_OK;
  return be->matmul_acc(out, x, w);
}

msh_status msh_op_matmul_glu(msh_tensor *out, const msh_tensor *x, const msh_tensor *w, msh_tensor *scratch) {
  if (!out || !x || !w || !scratch) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  const msh_backend *be = same_device("matmul_glu", out, x, w, scratch);
  if (!be) return MSH_EINVAL;
  CHECK(check_matmul("matmul_glu", out, x, w, 2));
  CHECK(want_out("matmul_glu", scratch));
  char a[96], b[96];
  if (msh_tensor_numel(scratch) < 2 * msh_tensor_numel(out))
    return MSH_FAIL(MSH_EINVAL, "matmul_glu: scratch %s holds fewer than the 2 x %s products", SHAPE(scratch, a),
                    SHAPE(out, b));
  if (overlaps(scratch, out) || overlaps(scratch, x) || overlaps(scratch, w))
    return MSH_FAIL(MSH_EINVAL, "matmul_glu: scratch overlaps an operand");
  if (msh_tensor_numel(out) == 0) return MSH_OK;
  return be->matmul_glu(out, x, w, scratch);
}

static msh_status check_rmsnorm_matmul(const char *op, msh_tensor *out, const msh_tensor *x, const msh_tensor *norm_w,
                                       const msh_tensor *w, msh_tensor *h, msh_tensor *gu, const msh_backend **be) {
  if (!out || !x || !norm_w || !w || !h) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  *be = same_device(op, out, x, w, h);
  if (!*be || !same_device(op, x, norm_w, gu, NULL)) return MSH_EINVAL;
  CHECK(check_matmul(op, out, x, w, gu ? 2 : 1));
  CHECK(want_weight(op, "norm_w", norm_w));
  CHECK(want_out(op, h));
  char a[96], b[96], c[96];
  if (norm_w->ndim != 1 || norm_w->shape[0] != x->shape[1] || !msh_tensor_is_contiguous(h) || h->dtype != MSH_F32 ||
      msh_tensor_numel(h) < msh_tensor_numel(x))
    return MSH_FAIL(MSH_EINVAL, "%s: x %s, norm_w %s, h %s do not fit (K) weights and (M, K) f32 scratch", op,
                    SHAPE(x, a), SHAPE(norm_w, b), SHAPE(h, c));
  if (overlaps(h, out) || overlaps(h, x) || overlaps(h, w) || overlaps(h, norm_w))
    return MSH_FAIL(MSH_EINVAL, "%s: h overlaps an operand", op);
  if (gu) {
    CHECK(want_out(op, gu));
    if (msh_tensor_numel(gu) < 2 * msh_tensor_numel(out))
      return MSH_FAIL(MSH_EINVAL, "%s: scratch %s holds fewer than the 2 x %s products", op, SHAPE(gu, a),
                      SHAPE(out, b));
    if (overlaps(gu, out) || overlaps(gu, x) || overlaps(gu, w) || overlaps(gu, h))
      return MSH_FAIL(MSH_EINVAL, "%s: scratch overlaps an operand", op);
  }
  return MSH_OK;
}

/* rmsnorm_matmul after its checks: the backend's, or rmsnorm into h then the projection. */
static msh_status run_rmsnorm_matmul(const msh_backend *be, msh_tensor *out, const msh_tensor *x,
                                     const msh_tensor *norm_w, float eps, const msh_tensor *w, msh_tensor *h,
                                     msh_tensor *gu) {
  if (msh_tensor_numel(out) == 0) return MSH_OK;
  if (be->rmsnorm_matmul && fused_takes(w)) return be->rmsnorm_matmul(out, x, norm_w, eps, w, h, gu);
  msh_tensor hv = msh_rows_view(h, x->shape[0], x->shape[1]);
  if (msh_tensor_numel(x) > 0) CHECK(be->rmsnorm(&hv, x, norm_w, eps));
  return gu ? be->matmul_glu(out, &hv, w, gu) : be->matmul(out, &hv, w);
}

msh_status msh_op_rmsnorm_matmul(msh_tensor *out, const msh_tensor *x, const msh_tensor *norm_w, float eps,
                                 const msh_tensor *w, msh_tensor *h, msh_tensor *gu) {
  const msh_backend *be = NULL;
  CHECK(check_rmsnorm_matmul("rmsnorm_matmul", out, x, norm_w, w, h, gu, &be));
  return run_rmsnorm_matmul(be, out, x, norm_w, eps, w, h, gu);
}

msh_status msh_op_rmsnorm_mlp(msh_tensor *x, const msh_tensor *norm_w, float eps, const msh_tensor *w_gu,
                              const msh_tensor *w_down, msh_tensor *h, msh_tensor *g, msh_tensor *gu) {
  const char *op = "rmsnorm_mlp";
  if (!x || !w_down || !g || !gu) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  const msh_backend *be = NULL;
  CHECK(check_rmsnorm_matmul(op, g, x, norm_w, w_gu, h, gu, &be));
  if (!same_device(op, x, w_down, NULL, NULL)) return MSH_EINVAL;
  CHECK(check_matmul(op, x, g, w_down, 1));
  if (overlaps(h, w_down) || overlaps(gu, w_down))
    return MSH_FAIL(MSH_EINVAL, "%s: scratch overlaps an operand", op);
  if (msh_tensor_numel(x) == 0) return MSH_OK;
  if (be->rmsnorm_mlp && fused_takes(w_gu) && fused_takes(w_down)) return be->rmsnorm_mlp(x, norm_w, eps, w_gu, w_down, h, g, gu);
  CHECK(run_rmsnorm_matmul(be, g, x, norm_w, eps, w_gu, h, gu));
  return be->matmul_acc(x, g, w_down);
}

/* A KV cache of qkv_rope: (S, KVH, hd) or (B, S, KVH, hd) float with (KVH, hd) packed. */
static int kv_cache_fits(const msh_tensor *c, int64_t KVH, int64_t hd) {
  if (!is_float(c->dtype) || (c->ndim != 3 && c->ndim != 4) || c->st->readonly) return 0;
  int n = c->ndim;
  return c->shape[n - 2] == KVH && c->shape[n - 1] == hd && (hd <= 1 || c->stride[n - 1] == 1) &&
         (KVH <= 1 || c->stride[n - 2] == hd);
}

static msh_status check_qkv_rope(const char *op, msh_tensor *q_out, msh_tensor *k_cache, msh_tensor *v_cache,
                                 const msh_tensor *qkv, const msh_tensor *pos, const msh_tensor *inv_freq, int style,
                                 const msh_backend **be) {
  if (!q_out || !k_cache || !v_cache || !qkv || !pos || !inv_freq) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  *be = same_device(op, q_out, k_cache, v_cache, qkv);
  if (!*be || !same_device(op, qkv, pos, inv_freq, NULL)) return MSH_EINVAL;
  CHECK(want_out(op, q_out));
  CHECK(want_f32c(op, "qkv", qkv));
  CHECK(want_f32c(op, "inv_freq", inv_freq));
  char a[96], b[96], c[96], d[96], e[96];
  int64_t R = q_out->ndim == 3 ? q_out->shape[0] : -1, H = q_out->shape[1], hd = q_out->ndim == 3 ? q_out->shape[2] : 0;
  int64_t KVH = k_cache->shape[k_cache->ndim - 2];
  int64_t B = k_cache->ndim == 4 ? k_cache->shape[0] : 1;
  if (q_out->ndim != 3 || qkv->ndim != 2 || qkv->shape[0] != R || hd < 1 || H < 1 || KVH < 1 || H % KVH != 0 ||
      qkv->shape[1] != (H + 2 * KVH) * hd || !kv_cache_fits(k_cache, KVH, hd) || !kv_cache_fits(v_cache, KVH, hd) ||
      k_cache->ndim != v_cache->ndim || k_cache->dtype != v_cache->dtype || B < 1 || R % B != 0 ||
      k_cache->shape[0] != v_cache->shape[0] || k_cache->shape[1] != v_cache->shape[1] ||
      (k_cache->ndim == 4 && k_cache->shape[0] != B) || pos->dtype != MSH_I32 || pos->ndim != 1 ||
      pos->shape[0] != R || !msh_tensor_is_contiguous(pos) || inv_freq->ndim != 1 || 2 * inv_freq->shape[0] > hd)
    return MSH_FAIL(MSH_EINVAL,
                    "%s: q_out %s, caches %s and %s, qkv %s, pos %s do not fit (R, H, hd), ([B,] S, KVH, hd) "
                    "writable float with packed heads, (R, (H + 2 KVH) hd), (R) i32, with B dividing R",
                    op, SHAPE(q_out, a), SHAPE(k_cache, b), SHAPE(v_cache, c), SHAPE(qkv, d), SHAPE(pos, e));
  if (style != MSH_ROPE_INTERLEAVED && style != MSH_ROPE_HALF) return MSH_FAIL(MSH_EINVAL, "%s: unknown style %d", op, style);
  if (overlaps(k_cache, v_cache) || overlaps(q_out, qkv) || overlaps(k_cache, qkv) || overlaps(v_cache, qkv) ||
      overlaps(q_out, k_cache) || overlaps(q_out, v_cache))
    return MSH_FAIL(MSH_EINVAL, "%s: outputs overlap each other or an input", op);
  return MSH_OK;
}

msh_status msh_op_qkv_rope(msh_tensor *q_out, msh_tensor *k_cache, msh_tensor *v_cache, const msh_tensor *qkv,
                           const msh_tensor *pos, const msh_tensor *inv_freq, int style) {
  const msh_backend *be = NULL;
  CHECK(check_qkv_rope("qkv_rope", q_out, k_cache, v_cache, qkv, pos, inv_freq, style, &be));
  if (q_out->shape[0] == 0) return MSH_OK;
  return be->qkv_rope(q_out, k_cache, v_cache, qkv, pos, inv_freq, style);
}

msh_status msh_op_rmsnorm_qkv_rope(msh_tensor *q_out, msh_tensor *k_cache, msh_tensor *v_cache, msh_tensor *qkv,
                                   const msh_tensor *x, const msh_tensor *norm_w, float eps, const msh_tensor *w,
                                   msh_tensor *h, const msh_tensor *pos, const msh_tensor *inv_freq, int style) {
  const char *op = "rmsnorm_qkv_rope";
  const msh_backend *be = NULL;
  if (norm_w) {
    CHECK(check_rmsnorm_matmul(op, qkv, x, norm_w, w, h, NULL, &be));
  } else { /* x arrives normalized: the projection alone, h unused */
    if (!qkv || !x || !w) return MSH_FAIL(MSH_EINVAL, "NULL argument");
    if (!(be = same_device(op, qkv, x, w, NULL))) return MSH_EINVAL;
    CHECK(check_matmul(op, qkv, x, w, 1));
    h = NULL;
  }
  /* qkv_rope's checks tie qkv to the caches and q_out; here the outputs against x and h */
  CHECK(check_qkv_rope(op, q_out, k_cache, v_cache, qkv, pos, inv_freq, style, &be)); /* qkv: one device */
  if (overlaps(q_out, x) || overlaps(k_cache, x) || overlaps(v_cache, x) ||
      (h && (overlaps(h, q_out) || overlaps(h, k_cache) || overlaps(h, v_cache))))
    return MSH_FAIL(MSH_EINVAL, "%s: outputs overlap each other or an input", op);
  if (q_out->shape[0] == 0) return MSH_OK;
  if (be->rmsnorm_qkv_rope && fused_takes(w)) return be->rmsnorm_qkv_rope(q_out, k_cache, v_cache, qkv, x, norm_w, eps, w, h, pos,
                                                        inv_freq, style);
  if (norm_w) CHECK(run_rmsnorm_matmul(be, qkv, x, norm_w, eps, w, h, NULL));
  else if (msh_tensor_numel(qkv) > 0) CHECK(be->matmul(qkv, x, w));
  return be->qkv_rope(q_out, k_cache, v_cache, qkv, pos, inv_freq, style);
}

msh_status msh_op_rope(msh_tensor *x, const msh_tensor *pos, const msh_tensor *inv_freq, int style) {
  if (!x || !pos || !inv_freq) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  const msh_backend *be = same_device("rope", x, pos, inv_freq, NULL);
  if (!be) return MSH_EINVAL;
  CHECK(want_out("rope", x));
  CHECK(want_f32c("rope", "inv_freq", inv_freq));
  char a[96], b[96], c[96];
  if (x->ndim != 3 || pos->dtype != MSH_I32 || pos->ndim != 1 || pos->shape[0] != x->shape[0] ||
      !msh_tensor_is_contiguous(pos) || inv_freq->ndim != 1 || 2 * inv_freq->shape[0] > x->shape[2])
    return MSH_FAIL(MSH_EINVAL, "rope: x %s, pos %s, inv_freq %s do not fit (T, H, hd), (T) i32, (R <= hd/2)",
                    SHAPE(x, a), SHAPE(pos, b), SHAPE(inv_freq, c));
  if (style != MSH_ROPE_INTERLEAVED && style != MSH_ROPE_HALF)
    return MSH_FAIL(MSH_EINVAL, "rope: unknown style %d", style);
  return be->rope(x, pos, inv_freq, style);
}

/* The two layouts of set_rows: dst (S, ...) and src (T, ...) equal past dim 0 take rows along
 * dim 0 (0); dst (B, S, ...) and src (B, T, ...) equal in dim 0 and past dim 1 take rows along
 * dim 1 of each sequence (1); -1: neither. When src has dst's shape both readings write the same
 * (row0 can only be 0). */
static int rows_layout(const msh_tensor *dst, const msh_tensor *src) {
  if (dst->ndim < 1 || src->ndim != dst->ndim) return -1;
  size_t tail = sizeof(int64_t) * (size_t)(dst->ndim - 1);
  if (!memcmp(dst->shape + 1, src->shape + 1, tail)) return 0;
  if (dst->ndim >= 2 && dst->shape[0] == src->shape[0] &&
      !memcmp(dst->shape + 2, src->shape + 2, tail - sizeof(int64_t)))
    return 1;
  return -1;
}

msh_status msh_op_set_rows(msh_tensor *dst, int64_t row0, const msh_tensor *src) {
  if (!dst || !src) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (dst->ndim < 1 || src->ndim != dst->ndim || src->ndim < 1)
    return MSH_FAIL(MSH_EINVAL, "set_rows: dst and src need the same number of dims");
  int d = rows_layout(dst, src);
  char a[96], b[96];
  if (d < 0)
    return MSH_FAIL(MSH_EINVAL, "set_rows: dst %s and src %s fit neither (S, ...) <- (T, ...) nor (B, S, ...) <- (B, T, ...)",
                    SHAPE(dst, a), SHAPE(src, b));
  if (row0 < 0 || row0 + src->shape[d] > dst->shape[d])
    return MSH_FAIL(MSH_ERANGE, "set_rows: rows [%lld, %lld) outside [0, %lld)", (long long)row0,
                    (long long)(row0 + src->shape[d]), (long long)dst->shape[d]);
  msh_tensor view = *dst; /* a stack view: no allocation on the hot path */
  view.shape[d] = src->shape[d];
  view.offset = dst->offset + row0 * dst->stride[d];
  return msh_tensor_copy(&view, src);
}

/* A position operand: contiguous i32 on `like`'s device, one element or (when B > 1) B of them,
 * one per sequence. */
static msh_status want_positions(const char *op, const char *name, const msh_tensor *p, const msh_tensor *like,
                                 int64_t B) {
  if (p->st->device != like->st->device || p->st->device_index != like->st->device_index)
    return MSH_FAIL(MSH_EINVAL, "%s: %s must live on the operands' device", op, name);
  char a[96];
  int64_t n = msh_tensor_numel(p);
  if (p->dtype != MSH_I32 || !msh_tensor_is_contiguous(p) || (n != 1 && n != B)) {
    if (B > 1)
      return MSH_FAIL(MSH_EINVAL, "%s: %s must be 1 or %lld contiguous i32 elements (one per sequence), not %s", op,
                      name, (long long)B, SHAPE(p, a));
    return MSH_FAIL(MSH_EINVAL, "%s: %s must be one contiguous i32 element, not %s", op, name, SHAPE(p, a));
  }
  return MSH_OK;
}

/* t with a leading dim of 1 (a stack copy of the handle). */
static msh_tensor with_unit_batch(const msh_tensor *t) {
  msh_tensor v = *t;
  for (int i = t->ndim; i > 0; i--) {
    v.shape[i] = t->shape[i - 1];
    v.stride[i] = t->stride[i - 1];
  }
  v.shape[0] = 1;
  v.stride[0] = 0;
  v.ndim = t->ndim + 1;
  return v;
}

msh_status msh_op_set_rows_dyn(msh_tensor *dst, const msh_tensor *row0, const msh_tensor *src) {
  if (!dst || !row0 || !src) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  const msh_backend *be = same_device("set_rows_dyn", dst, row0, src, NULL);
  if (!be) return MSH_EINVAL;
  char a[96], b[96];
  int d = rows_layout(dst, src);
  if (d < 0)
    return MSH_FAIL(MSH_EINVAL,
                    "set_rows_dyn: dst %s and src %s fit neither (S, ...) <- (T, ...) nor (B, S, ...) <- (B, T, ...)",
                    SHAPE(dst, a), SHAPE(src, b));
  /* equal shapes read either way: one row per sequence then says which */
  if (d == 0 && dst->ndim >= 2 && same_shape(dst, src) && msh_tensor_numel(row0) == dst->shape[0]) d = 1;
  CHECK(want_positions("set_rows_dyn", "row0", row0, dst, d ? dst->shape[0] : 1));
  if (!msh_dtype_size(dst->dtype) || !msh_dtype_size(src->dtype))
    return MSH_FAIL(MSH_EUNSUPPORTED, "set_rows_dyn: %s to %s: rows of plain dtypes only",
                    msh_dtype_name(src->dtype), msh_dtype_name(dst->dtype));
  if (dst->dtype != src->dtype && !(is_float(dst->dtype) && is_float(src->dtype)))
    return MSH_FAIL(MSH_EINVAL, "set_rows_dyn: cannot convert %s to %s", msh_dtype_name(src->dtype),
                    msh_dtype_name(dst->dtype));
  if (dst->st->readonly) return MSH_FAIL(MSH_EINVAL, "set_rows_dyn: dst is read-only");
  if (src->shape[d] > dst->shape[d])
    return MSH_FAIL(MSH_ERANGE, "set_rows_dyn: %lld rows do not fit in dst's %lld", (long long)src->shape[d],
                    (long long)dst->shape[d]);
  if (overlaps(dst, src) || overlaps(dst, row0))
    return MSH_FAIL(MSH_EINVAL, "set_rows_dyn: dst overlaps src or row0");
  if (msh_tensor_numel(src) == 0) return MSH_OK;
  if (d == 1) return be->set_rows_dyn(dst, row0, src);
  if (dst->ndim == MSH_MAX_DIMS)
    return MSH_FAIL(MSH_EUNSUPPORTED, "set_rows_dyn: rows of %d-dim tensors (at most %d)", MSH_MAX_DIMS, MSH_MAX_DIMS - 1);
  msh_tensor db = with_unit_batch(dst), sb = with_unit_batch(src); /* backends see (B, S, ...) */
  return be->set_rows_dyn(&db, row0, &sb);
}

/* The checks attention and attention_dyn share: q, out (B, T, H, hd) over k, v (B, S, KVH, hd),
 * or all 3-D (B = 1). On success the 4-D forms go to b4: out, q, k, v. */
static msh_status attention_operands(const char *op, msh_tensor *out, const msh_tensor *q, const msh_tensor *k,
                                     const msh_tensor *v, const msh_backend **be, msh_tensor b4[4]) {
  if (!out || !q || !k || !v) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  *be = same_device(op, out, q, k, v);
  if (!*be) return MSH_EINVAL;
  CHECK(want_out(op, out));
  CHECK(want_f32c(op, "q", q));
  char a[96], b[96], c[96];
  int n = q->ndim;
  if ((n != 3 && n != 4) || k->ndim != n || !same_shape(out, q) || !same_shape(k, v) ||
      (n == 4 && k->shape[0] != q->shape[0]) || k->shape[n - 1] != q->shape[n - 1] || k->shape[n - 2] == 0 ||
      q->shape[n - 2] % k->shape[n - 2])
    return MSH_FAIL(MSH_EINVAL,
                    "%s: q %s, k %s, v %s do not fit ([B,] T, H, hd) over ([B,] S, KVH, hd), H %% KVH == 0", op,
                    SHAPE(q, a), SHAPE(k, b), SHAPE(v, c));
  if (k->dtype != v->dtype || !is_float(k->dtype) || k->stride[n - 1] != 1 || v->stride[n - 1] != 1 ||
      k->stride[n - 2] != k->shape[n - 1] || v->stride[n - 2] != v->shape[n - 1])
    return MSH_FAIL(MSH_EINVAL, "%s: k and v must share a float dtype with contiguous heads", op);
  if (overlaps(out, q) || overlaps(out, k) || overlaps(out, v))
    return MSH_FAIL(MSH_EINVAL, "%s: out overlaps an input", op);
  if (n == 4) {
    b4[0] = *out, b4[1] = *q, b4[2] = *k, b4[3] = *v;
  } else {
    b4[0] = with_unit_batch(out), b4[1] = with_unit_batch(q), b4[2] = with_unit_batch(k), b4[3] = with_unit_batch(v);
    b4[1].stride[0] = b4[0].stride[0] = msh_tensor_numel(q); /* packed, as 4-D ones are */
  }
  return MSH_OK;
}

msh_status msh_op_attention(msh_tensor *out, const msh_tensor *q, const msh_tensor *k,
                            const msh_tensor *v, int64_t pos0, float scale) {
  const msh_backend *be = NULL;
  msh_tensor b4[4];
  CHECK(attention_operands("attention", out, q, k, v, &be, b4));
  if (pos0 < 0 || pos0 + b4[1].shape[1] > b4[2].shape[1])
    return MSH_FAIL(MSH_ERANGE, "attention: positions [%lld, %lld) exceed the cache of %lld", (long long)pos0,
                    (long long)(pos0 + b4[1].shape[1]), (long long)b4[2].shape[1]);
  if (msh_tensor_numel(q) == 0) return MSH_OK;
  return be->attention(&b4[0], &b4[1], &b4[2], &b4[3], pos0, scale);
}

msh_status msh_op_attention_dyn(msh_tensor *out, const msh_tensor *q, const msh_tensor *k,
                                const msh_tensor *v, const msh_tensor *pos0, int64_t max_len, float scale) {
  if (!pos0) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  const msh_backend *be = NULL;
  msh_tensor b4[4];
  CHECK(attention_operands("attention_dyn", out, q, k, v, &be, b4));
  CHECK(want_positions("attention_dyn", "pos0", pos0, out, b4[1].shape[0]));
  if (overlaps(out, pos0)) return MSH_FAIL(MSH_EINVAL, "attention_dyn: out overlaps pos0");
  int64_t T = b4[1].shape[1], S = b4[2].shape[1];
  if (max_len < T || max_len > S)
    return MSH_FAIL(MSH_ERANGE, "attention_dyn: max_len %lld outside [%lld, %lld] (queries, cache rows)",
                    (long long)max_len, (long long)T, (long long)S);
  if (msh_tensor_numel(q) == 0) return MSH_OK;
  return be->attention_dyn(&b4[0], &b4[1], &b4[2], &b4[3], pos0, max_len, scale);
}

/* ------------------------------------------------------------------- the paged KV cache */

/* k_pool and v_pool: (NB, BS, KVH, hd), one float dtype, contiguous, writable unless read_only. */
static msh_status want_pools(const char *op, const msh_tensor *k_pool, const msh_tensor *v_pool, int read_only) {
  char a[96], b[96];
  if (k_pool->ndim != 4 || !same_shape(k_pool, v_pool) || k_pool->dtype != v_pool->dtype || !is_float(k_pool->dtype) ||
      !msh_tensor_is_contiguous(k_pool) || !msh_tensor_is_contiguous(v_pool))
    return MSH_FAIL(MSH_EINVAL, "%s: k_pool %s and v_pool %s must be contiguous (num_blocks, block_size, KVH, hd) "
                    "of one float dtype", op, SHAPE(k_pool, a), SHAPE(v_pool, b));
  if (k_pool->shape[0] < 1 || k_pool->shape[1] < 1 || k_pool->shape[2] < 1 || k_pool->shape[3] < 1)
    return MSH_FAIL(MSH_EINVAL, "%s: empty pools %s", op, SHAPE(k_pool, a));
  if (!read_only && (k_pool->st->readonly || v_pool->st->readonly)) return MSH_FAIL(MSH_EINVAL, "%s: a pool is read-only", op);
  if (overlaps(k_pool, v_pool)) return MSH_FAIL(MSH_EINVAL, "%s: k_pool overlaps v_pool", op);
  return MSH_OK;
}

/* An index array: contiguous i32 of n elements (the shape given) on like's device. */
static msh_status want_index(const char *op, const char *name, const msh_tensor *t, const msh_tensor *like, int ndim,
                             int64_t d0, int64_t d1) {
  char a[96];
  if (t->st->device != like->st->device || t->st->device_index != like->st->device_index)
    return MSH_FAIL(MSH_EINVAL, "%s: %s must live on the pools' device", op, name);
  int ok = t->dtype == MSH_I32 && msh_tensor_is_contiguous(t) && t->ndim == ndim && t->shape[0] == d0 &&
           (ndim == 1 || t->shape[1] == d1);
  if (ok) return MSH_OK;
  if (ndim == 1) return MSH_FAIL(MSH_EINVAL, "%s: %s must be (%lld) contiguous i32, not %s", op, name, (long long)d0, SHAPE(t, a));
  return MSH_FAIL(MSH_EINVAL, "%s: %s must be (%lld, max_blocks) contiguous i32, not %s", op, name, (long long)d0,
                  SHAPE(t, a));
}

msh_status msh_op_kv_write(msh_tensor *k_pool, msh_tensor *v_pool, const msh_tensor *k, const msh_tensor *v,
                           const msh_tensor *slots) {
  if (!k_pool || !v_pool || !k || !v || !slots) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  const msh_backend *be = same_device("kv_write", k_pool, v_pool, k, v);
  if (!be) return MSH_EINVAL;
  CHECK(want_pools("kv_write", k_pool, v_pool, 0));
  char a[96], b[96];
  if (k->ndim != 3 || !same_shape(k, v) || k->shape[1] != k_pool->shape[2] || k->shape[2] != k_pool->shape[3])
    return MSH_FAIL(MSH_EINVAL, "kv_write: k %s, v %s do not fit (R, KVH, hd) rows of pools %s", SHAPE(k, a), SHAPE(v, b),
                    SHAPE(k_pool, a));
  if (!is_float(k->dtype) || !is_float(v->dtype) || k->stride[2] != 1 || v->stride[2] != 1 ||
      k->stride[1] != k->shape[2] || v->stride[1] != v->shape[2])
    return MSH_FAIL(MSH_EINVAL, "kv_write: k and v must be float rows with packed heads");
  CHECK(want_index("kv_write", "slots", slots, k_pool, 1, k->shape[0], 0));
  if (overlaps(k_pool, k) || overlaps(k_pool, v) || overlaps(v_pool, k) || overlaps(v_pool, v) ||
      overlaps(k_pool, slots) || overlaps(v_pool, slots))
    return MSH_FAIL(MSH_EINVAL, "kv_write: a pool overlaps the new rows or the slots");
  if (k->shape[0] == 0) return MSH_OK;
  if (!be->kv_write) return MSH_FAIL(MSH_EUNSUPPORTED, "kv_write: not implemented on %s", be->name);
  return be->kv_write(k_pool, v_pool, k, v, slots);
}

msh_status msh_op_paged_attention(msh_tensor *out, const msh_tensor *q, const msh_tensor *k_pool,
                                  const msh_tensor *v_pool, const msh_tensor *q_start, const msh_tensor *ctx_len,
                                  const msh_tensor *block_table, int64_t max_ctx, float scale) {
  if (!out || !q || !k_pool || !v_pool || !q_start || !ctx_len || !block_table)
    return MSH_FAIL(MSH_EINVAL, "NULL argument");
  const char *op = "paged_attention";
  const msh_backend *be = same_device(op, out, q, k_pool, v_pool);
  if (!be) return MSH_EINVAL;
  CHECK(want_out(op, out));
  CHECK(want_f32c(op, "q", q));
  CHECK(want_pools(op, k_pool, v_pool, 1));
  char a[96], b[96];
  if (q->ndim != 3 || !same_shape(out, q) || q->shape[2] != k_pool->shape[3] || q->shape[1] % k_pool->shape[2])
    return MSH_FAIL(MSH_EINVAL, "%s: q %s over pools %s do not fit (R, H, hd) over (NB, BS, KVH, hd), H %% KVH == 0", op,
                    SHAPE(q, a), SHAPE(k_pool, b));
  if (q_start->ndim != 1 || q_start->shape[0] < 2)
    return MSH_FAIL(MSH_EINVAL, "%s: q_start must be (B + 1) i32 with B >= 1, not %s", op, SHAPE(q_start, a));
  int64_t B = q_start->shape[0] - 1;
  CHECK(want_index(op, "q_start", q_start, k_pool, 1, B + 1, 0));
  CHECK(want_index(op, "ctx_len", ctx_len, k_pool, 1, B, 0));
  if (block_table->ndim != 2 || block_table->shape[1] < 1)
    return MSH_FAIL(MSH_EINVAL, "%s: block_table must be (%lld, max_blocks) i32, not %s", op, (long long)B,
                    SHAPE(block_table, a));
  CHECK(want_index(op, "block_table", block_table, k_pool, 2, B, block_table->shape[1]));
  int64_t cap = block_table->shape[1] * k_pool->shape[1];
  if (max_ctx < 1 || max_ctx > cap)
    return MSH_FAIL(MSH_ERANGE, "%s: max_ctx %lld outside [1, %lld] (max_blocks x block_size)", op, (long long)max_ctx,
                    (long long)cap);
  if (overlaps(out, q) || overlaps(out, k_pool) || overlaps(out, v_pool) || overlaps(out, q_start) ||
      overlaps(out, ctx_len) || overlaps(out, block_table))
    return MSH_FAIL(MSH_EINVAL, "%s: out overlaps an input", op);
  if (q->shape[0] == 0) return MSH_OK;
  if (!be->paged_attention) return MSH_FAIL(MSH_EUNSUPPORTED, "%s: not implemented on %s", op, be->name);
  return be->paged_attention(out, q, k_pool, v_pool, q_start, ctx_len, block_table, max_ctx, scale);
}

static msh_status elementwise(const char *op, msh_tensor *out, const msh_tensor *a, const msh_tensor *b,
                              const msh_backend **be) {
  if (!out || !a || !b) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  *be = same_device(op, out, a, b, NULL);
  if (!*be) return MSH_EINVAL;
  CHECK(want_out(op, out));
  CHECK(want_f32c(op, "a", a));
  CHECK(want_f32c(op, "b", b));
  char x[96], y[96];
  if (!same_shape(out, a) || !same_shape(a, b))
    return MSH_FAIL(MSH_EINVAL, "%s: shapes differ: %s and %s", op, SHAPE(a, x), SHAPE(b, y));
  if (!same_or_apart(out, a) || !same_or_apart(out, b))
    return MSH_FAIL(MSH_EINVAL, "%s: out partly overlaps an input", op);
  return MSH_OK;
}

msh_status msh_op_silu_mul(msh_tensor *out, const msh_tensor *gate, const msh_tensor *up) {
  const msh_backend *be = NULL;
  CHECK(elementwise("silu_mul", out, gate, up, &be));
  return be->silu_mul(out, gate, up);
}

msh_status msh_op_add(msh_tensor *out, const msh_tensor *a, const msh_tensor *b) {
  const msh_backend *be = NULL;
  CHECK(elementwise("add", out, a, b, &be));
  return be->add(out, a, b);
}

msh_status msh_op_add_bias(msh_tensor *out, const msh_tensor *b) {
  if (!out || !b) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  const msh_backend *be = same_device("add_bias", out, b, NULL, NULL);
  if (!be) return MSH_EINVAL;
  CHECK(want_out("add_bias", out));
  CHECK(want_weight("add_bias", "b", b));
  char x[96], y[96];
  if (out->ndim < 1 || b->ndim != 1 || b->shape[0] != out->shape[out->ndim - 1])
    return MSH_FAIL(MSH_EINVAL, "add_bias: out %s and b %s do not fit (M, N) += (N)", SHAPE(out, x), SHAPE(b, y));
  if (overlaps(out, b)) return MSH_FAIL(MSH_EINVAL, "add_bias: out overlaps b");
  if (msh_tensor_numel(out) == 0) return MSH_OK;
  return be->add_bias(out, b);
}

msh_status msh_op_scale(msh_tensor *out, const msh_tensor *x, float s) {
  const msh_backend *be = NULL;
  CHECK(elementwise("scale", out, x, x, &be));
  return be->scale(out, x, s);
}

static msh_status softmax_common(msh_tensor *out, const msh_tensor *x, int log) {
  const msh_backend *be = NULL;
  const char *op = log ? "log_softmax" : "softmax";
  CHECK(elementwise(op, out, x, x, &be));
  if (x->ndim < 1) return MSH_FAIL(MSH_EINVAL, "%s: needs at least one dim", op);
  if (msh_tensor_numel(x) == 0) return MSH_OK; /* no rows, or empty ones: nothing to do */
  return be->softmax(out, x, log);
}

msh_status msh_op_softmax(msh_tensor *out, const msh_tensor *x) { return softmax_common(out, x, 0); }
msh_status msh_op_log_softmax(msh_tensor *out, const msh_tensor *x) { return softmax_common(out, x, 1); }

msh_status msh_op_argmax(const msh_tensor *x, int32_t *out) {
  if (!x || !out) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  const msh_backend *be = same_device("argmax", x, NULL, NULL, NULL);
  if (!be) return MSH_EINVAL;
  CHECK(want_f32c("argmax", "x", x));
  if (x->ndim < 1 || x->shape[x->ndim - 1] < 1) return MSH_FAIL(MSH_EINVAL, "argmax: empty rows");
  return be->argmax(x, out);
}

msh_status msh_op_argmax_into(msh_tensor *out, const msh_tensor *x) {
  if (!x || !out) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  const msh_backend *be = same_device("argmax_into", out, x, NULL, NULL);
  if (!be) return MSH_EINVAL;
  CHECK(want_f32c("argmax_into", "x", x));
  if (x->ndim < 1 || x->shape[x->ndim - 1] < 1) return MSH_FAIL(MSH_EINVAL, "argmax_into: empty rows");
  if (out->dtype != MSH_I32 || !msh_tensor_is_contiguous(out) || msh_tensor_numel(out) != msh_rows(x))
    return MSH_FAIL(MSH_EINVAL, "argmax_into: out must be %lld contiguous i32 (one per row of x)",
                    (long long)msh_rows(x));
  if (out->st->readonly) return MSH_FAIL(MSH_EINVAL, "argmax_into: out is read-only");
  if (be->argmax_into) return be->argmax_into(out, x);
  return be->argmax(x, msh_tensor_ptr(out)); /* host memory: the backend writes it directly */
}
