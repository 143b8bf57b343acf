/* cpu_backend.c: the CPU backend: host memory, copies with dtype conversion, reference ops. */
#include "internal.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------ threads */

static int num_threads = 0; /* 0: the default (online cores) */

void msh_set_num_threads(int n) { num_threads = n > 0 ? n : 0; }

int msh_get_num_threads(void) { return num_threads > 0 ? num_threads : omp_get_num_procs(); }

/* ------------------------------------------------------------------------------- memory */

static msh_status cpu_alloc(int device_index, uint64_t bytes, void **out) {
  (void)device_index;
  size_t n = (size_t)((bytes + 63) & ~(uint64_t)63);
  void *p = aligned_alloc(64, n ? n : 64);
  if (!p) return MSH_FAIL(MSH_ENOMEM, "cannot allocate %llu bytes of host memory", (unsigned long long)bytes);
  memset(p, 0, n);
  *out = p;
  return MSH_OK;
}

static void cpu_release(int device_index, void *p) {
  (void)device_index;
  free(p);
}

static msh_status cpu_bytes(int device_index, void *dst, const void *src, uint64_t bytes) {
  (void)device_index;
  memcpy(dst, src, (size_t)bytes);
  return MSH_OK;
}

/* ------------------------------------------------------------------------------- copies */

static inline float load_f(const void *p, int dt, int64_t i) {
  switch (dt) {
  case MSH_F32: return ((const float *)p)[i];
  case MSH_F16: return msh_f16_to_f32(((const uint16_t *)p)[i]);
  default: return msh_bf16_to_f32(((const uint16_t *)p)[i]);
  }
}

static inline void store_f(void *p, int dt, int64_t i, float v) {
  switch (dt) {
  case MSH_F32: ((float *)p)[i] = v; break;
  case MSH_F16: ((uint16_t *)p)[i] = msh_f32_to_f16(v); break;
  default: ((uint16_t *)p)[i] = msh_f32_to_bf16(v); break;
  }
}

static msh_status cpu_copy(msh_tensor *dst, const msh_tensor *src) {
  int64_t n = msh_tensor_numel(src);
  if (n == 0) return MSH_OK;
  size_t es = msh_dtype_size(src->dtype);
  if (dst->dtype == src->dtype && msh_tensor_is_contiguous(dst) && msh_tensor_is_contiguous(src)) {
    memmove(msh_tensor_ptr(dst), msh_tensor_ptr(src), (size_t)n * es);
    return MSH_OK;
  }
  int nd = src->ndim;
  int64_t idx[MSH_MAX_DIMS] = {0};
  char *dp = (char *)dst->st->base, *sp = (char *)src->st->base;
  for (int64_t k = 0; k < n; k++) {
    int64_t so = src->offset, doff = dst->offset;
    for (int d = 0; d < nd; d++) {
      so += idx[d] * src->stride[d];
      doff += idx[d] * dst->stride[d];
    }
    if (dst->dtype == src->dtype) memcpy(dp + doff * (int64_t)es, sp + so * (int64_t)es, es);
    else store_f(dp, dst->dtype, doff, load_f(sp, src->dtype, so));
    for (int d = nd - 1; d >= 0; d--) {
      if (++idx[d] < src->shape[d]) break;
      idx[d] = 0;
    }
  }
  return MSH_OK;
}

/* ---------------------------------------------------------------------------------- ops */

static msh_status cpu_embedding(msh_tensor *out, const msh_tensor *table, const msh_tensor *ids) {
  int64_t T = out->shape[0], D = out->shape[1], V = table->shape[0];
  const int32_t *id = msh_tensor_ptr(ids);
  float *o = msh_tensor_ptr(out);
  const void *w = msh_tensor_ptr(table);
  for (int64_t t = 0; t < T; t++) {
    if (id[t] < 0 || id[t] >= V)
      return MSH_FAIL(MSH_ERANGE, "embedding: id %d at %lld outside [0, %lld)", id[t], (long long)t, (long long)V);
    for (int64_t d = 0; d < D; d++) o[t * D + d] = load_f(w, table->dtype, (int64_t)id[t] * D + d);
  }
  return MSH_OK;
}

static msh_status cpu_rmsnorm(msh_tensor *out, const msh_tensor *x, const msh_tensor *w, float eps) {
  int64_t D = x->shape[x->ndim - 1], R = msh_rows(x);
  const float *xp = msh_tensor_ptr(x);
  float *o = msh_tensor_ptr(out);
  const void *wp = msh_tensor_ptr(w);
  for (int64_t r = 0; r < R; r++) {
    double ss = 0;
    for (int64_t d = 0; d < D; d++) ss += (double)xp[r * D + d] * xp[r * D + d];
    float inv = 1.0f / sqrtf((float)(ss / (double)D) + eps);
    for (int64_t d = 0; d < D; d++) o[r * D + d] = xp[r * D + d] * inv * load_f(wp, w->dtype, d);
  }
  return MSH_OK;
}

static msh_status cpu_matmul(msh_tensor *out, const msh_tensor *x, const msh_tensor *w) {
  int64_t M = x->shape[0], K = x->shape[1], N = w->shape[0];
  const float *xp = msh_tensor_ptr(x);
  const void *wp = msh_tensor_ptr(w);
  float *o = msh_tensor_ptr(out);
  for (int64_t m = 0; m < M; m++)
    for (int64_t n = 0; n < N; n++) {
      float acc = 0;
      for (int64_t k = 0; k < K; k++) acc += xp[m * K + k] * load_f(wp, w->dtype, n * K + k);
      o[m * N + n] = acc;
    }
  return MSH_OK;
}

static msh_status cpu_rope(msh_tensor *x, const msh_tensor *pos, const msh_tensor *inv_freq, int style) {
  int64_t T = x->shape[0], H = x->shape[1], hd = x->shape[2], R = inv_freq->shape[0];
  float *xp = msh_tensor_ptr(x);
  const int32_t *pp = msh_tensor_ptr(pos);
  const float *f = msh_tensor_ptr(inv_freq);
  for (int64_t t = 0; t < T; t++)
    for (int64_t i = 0; i < R; i++) {
      float a = (float)pp[t] * f[i], c = cosf(a), s = sinf(a);
      for (int64_t h = 0; h < H; h++) {
        float *v = xp + (t * H + h) * hd;
        int64_t i0 = style == MSH_ROPE_INTERLEAVED ? 2 * i : i;
        int64_t i1 = style == MSH_ROPE_INTERLEAVED ? 2 * i + 1 : i + R;
        float v0 = v[i0], v1 = v[i1];
        v[i0] = v0 * c - v1 * s;
        v[i1] = v0 * s + v1 * c;
      }
    }
  return MSH_OK;
}

static msh_status cpu_attention(msh_tensor *out, const msh_tensor *q, const msh_tensor *k,
                                const msh_tensor *v, int64_t pos0, float scale) {
  int64_t T = q->shape[0], H = q->shape[1], hd = q->shape[2], KVH = k->shape[1];
  int64_t S = pos0 + T, group = H / KVH;
  const float *qp = msh_tensor_ptr(q);
  const char *kb = msh_tensor_ptr(k), *vb = msh_tensor_ptr(v);
  float *o = msh_tensor_ptr(out);
  float *att = malloc(sizeof(float) * (size_t)(S > 0 ? S : 1));
  if (!att) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  for (int64_t t = 0; t < T; t++)
    for (int64_t h = 0; h < H; h++) {
      const float *qv = qp + (t * H + h) * hd;
      int64_t kvh = h / group, n = pos0 + t + 1;
      float mx = -INFINITY;
      for (int64_t s = 0; s < n; s++) {
        int64_t base = s * k->stride[0] + kvh * hd;
        float acc = 0;
        for (int64_t d = 0; d < hd; d++) acc += qv[d] * load_f(kb, k->dtype, base + d);
        att[s] = acc * scale;
        if (att[s] > mx) mx = att[s];
      }
      float sum = 0;
      for (int64_t s = 0; s < n; s++) sum += att[s] = expf(att[s] - mx);
      float *ov = o + (t * H + h) * hd;
      for (int64_t d = 0; d < hd; d++) ov[d] = 0;
      for (int64_t s = 0; s < n; s++) {
        float a = att[s] / sum;
        int64_t base = s * v->stride[0] + kvh * hd;
        for (int64_t d = 0; d < hd; d++) ov[d] += a * load_f(vb, v->dtype, base + d);
      }
    }
  free(att);
  return MSH_OK;
}

static msh_status cpu_silu_mul(msh_tensor *out, const msh_tensor *gate, const msh_tensor *up) {
  int64_t n = msh_tensor_numel(out);
  const float *g = msh_tensor_ptr(gate), *u = msh_tensor_ptr(up);
  float *o = msh_tensor_ptr(out);
  for (int64_t i = 0; i < n; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
  return MSH_OK;
}

static msh_status cpu_add(msh_tensor *out, const msh_tensor *a, const msh_tensor *b) {
  int64_t n = msh_tensor_numel(out);
  const float *ap = msh_tensor_ptr(a), *bp = msh_tensor_ptr(b);
  float *o = msh_tensor_ptr(out);
  for (int64_t i = 0; i < n; i++) o[i] = ap[i] + bp[i];
  return MSH_OK;
}

static msh_status cpu_scale(msh_tensor *out, const msh_tensor *x, float s) {
  int64_t n = msh_tensor_numel(out);
  const float *xp = msh_tensor_ptr(x);
  float *o = msh_tensor_ptr(out);
  for (int64_t i = 0; i < n; i++) o[i] = xp[i] * s;
  return MSH_OK;
}

static msh_status cpu_softmax(msh_tensor *out, const msh_tensor *x, int log) {
  int64_t N = x->shape[x->ndim - 1], R = msh_rows(x);
  const float *xp = msh_tensor_ptr(x);
  float *o = msh_tensor_ptr(out);
  for (int64_t r = 0; r < R; r++) {
    const float *xr = xp + r * N;
    float *orow = o + r * N;
    float mx = -INFINITY;
    for (int64_t i = 0; i < N; i++) mx = xr[i] > mx ? xr[i] : mx;
    double sum = 0;
    for (int64_t i = 0; i < N; i++) sum += exp((double)xr[i] - mx);
    if (log) {
      float lse = mx + (float)logl(sum);
      for (int64_t i = 0; i < N; i++) orow[i] = xr[i] - lse;
    } else {
      for (int64_t i = 0; i < N; i++) orow[i] = (float)(exp((double)xr[i] - mx) / sum);
    }
  }
  return MSH_OK;
}

static msh_status cpu_argmax(const msh_tensor *x, int32_t *out) {
  int64_t N = x->shape[x->ndim - 1], R = msh_rows(x);
  const float *xp = msh_tensor_ptr(x);
  for (int64_t r = 0; r < R; r++) {
    int64_t best = 0;
    for (int64_t i = 1; i < N; i++)
      if (xp[r * N + i] > xp[r * N + best]) best = i;
    out[r] = (int32_t)best;
  }
  return MSH_OK;
}

const msh_backend msh_cpu_backend = {
    .name = "cpu",
    .alloc = cpu_alloc,
    .release = cpu_release,
    .copy = cpu_copy,
    .upload = cpu_bytes,
    .download = cpu_bytes,
    .embedding = cpu_embedding,
    .rmsnorm = cpu_rmsnorm,
    .matmul = cpu_matmul,
    .rope = cpu_rope,
    .attention = cpu_attention,
    .silu_mul = cpu_silu_mul,
    .add = cpu_add,
    .scale = cpu_scale,
    .softmax = cpu_softmax,
    .argmax = cpu_argmax,
};
