/* cpu_attention.c: causal grouped-query attention over a KV cache on the CPU.
 *
 *   out (B, T, H, hd) ; q (B, T, H, hd) f32 ; k, v (B, S, KVH, hd) f32/f16/bf16, row stride
 *   k->stride[1], batch stride k->stride[0] (any). Query t of sequence b sits at position
 *   pos0[b] + t and sees keys 0 .. pos0[b] + t of its own cache; head h reads kv head h / (H / KVH).
 *
 * A unit of work is one query of one sequence and up to GMAX query heads that share a kv head;
 * threads claim units one at a time. Keys go in chunks whose k (then v) rows stay in L1 while every head of the unit
 * uses them, so the cache is read once per kv head rather than once per query head. Per head:
 * scores = q.k * scale (f32), softmax in f32 with the max subtracted, out = sum p v / sum p.
 * Scores live in a per-thread scratch. */
#include "cpu_internal.h"

enum {
  GRAIN_FLOPS = 1 << 15, /* multiply-adds per thread below which we stay on one thread */
  GMAX = 4,              /* query heads per unit */
  CHUNK_BYTES = 16384    /* k or v rows of one chunk of keys (L1 holds them) */
};

/* ------------------------------------------------------------------------------ scores */

/* sc[s] = scale * dot(q, k[s]) for s in [0, n); k rows kstride apart, dtype dt (a constant at
 * each call site). With AVX2 and hd % 8 == 0, eight keys at a time end in one transposing
 * reduction instead of eight horizontal sums. */
MSH_CPU_INLINE void scores_dt(float *sc, const float *q, const void *k, int64_t kstride, int64_t n, int64_t hd,
                              float scale, int dt) {
  int64_t s = 0;
#if MSH_CPU_AVX2
  if ((hd & 7) == 0) {
    __m256 vs = _mm256_set1_ps(scale);
    for (; s + 8 <= n; s += 8) {
      __m256 a[8];
      for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
      for (int64_t d = 0; d < hd; d += 8) {
        __m256 qv = _mm256_loadu_ps(q + d);
        for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(qv, msh_cpu_load8(k, (s + j) * kstride + d, dt), a[j]);
      }
      __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
      __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
      __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
      __m256 r = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
      _mm256_storeu_ps(sc + s, _mm256_mul_ps(r, vs));
    }
    for (; s < n; s++) {
      __m256 a = _mm256_setzero_ps();
      for (int64_t d = 0; d < hd; d += 8)
        a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), msh_cpu_load8(k, s * kstride + d, dt), a);
      sc[s] = msh_cpu_hsum8(a) * scale;
    }
    return;
  }
#endif
  for (; s < n; s++) {
    float acc = 0;
    for (int64_t d = 0; d < hd; d++) acc += q[d] * msh_cpu_load(k, s * kstride + d, dt);
    sc[s] = acc * scale;
  }
}

/* ---------------------------------------------------------------------- weighted values */

/* o[d] += sum_s p[s] v[s][d]. Accumulators stay in registers across the keys; keys go in pairs
 * (32 columns) or fours (8 columns) so that eight or four FMA chains run side by side. */
MSH_CPU_INLINE void values_dt(float *o, const float *p, const void *v, int64_t vstride, int64_t n, int64_t hd,
                              int dt) {
  int64_t d = 0;
#if MSH_CPU_AVX2
  for (; d + 32 <= hd; d += 32) {
    __m256 a0 = _mm256_loadu_ps(o + d), a1 = _mm256_loadu_ps(o + d + 8), a2 = _mm256_loadu_ps(o + d + 16);
    __m256 a3 = _mm256_loadu_ps(o + d + 24), b0 = _mm256_setzero_ps(), b1 = b0, b2 = b0, b3 = b0;
    int64_t s = 0;
    for (; s + 2 <= n; s += 2) {
      __m256 pa = _mm256_set1_ps(p[s]), pb = _mm256_set1_ps(p[s + 1]);
      int64_t ra = s * vstride + d, rb = ra + vstride;
      a0 = _mm256_fmadd_ps(pa, msh_cpu_load8(v, ra, dt), a0);
      a1 = _mm256_fmadd_ps(pa, msh_cpu_load8(v, ra + 8, dt), a1);
      a2 = _mm256_fmadd_ps(pa, msh_cpu_load8(v, ra + 16, dt), a2);
      a3 = _mm256_fmadd_ps(pa, msh_cpu_load8(v, ra + 24, dt), a3);
      b0 = _mm256_fmadd_ps(pb, msh_cpu_load8(v, rb, dt), b0);
      b1 = _mm256_fmadd_ps(pb, msh_cpu_load8(v, rb + 8, dt), b1);
      b2 = _mm256_fmadd_ps(pb, msh_cpu_load8(v, rb + 16, dt), b2);
      b3 = _mm256_fmadd_ps(pb, msh_cpu_load8(v, rb + 24, dt), b3);
    }
    if (s < n) {
      __m256 pa = _mm256_set1_ps(p[s]);
      int64_t ra = s * vstride + d;
      a0 = _mm256_fmadd_ps(pa, msh_cpu_load8(v, ra, dt), a0);
      a1 = _mm256_fmadd_ps(pa, msh_cpu_load8(v, ra + 8, dt), a1);
      a2 = _mm256_fmadd_ps(pa, msh_cpu_load8(v, ra + 16, dt), a2);
      a3 = _mm256_fmadd_ps(pa, msh_cpu_load8(v, ra + 24, dt), a3);
    }
    _mm256_storeu_ps(o + d, _mm256_add_ps(a0, b0));
    _mm256_storeu_ps(o + d + 8, _mm256_add_ps(a1, b1));
    _mm256_storeu_ps(o + d + 16, _mm256_add_ps(a2, b2));
    _mm256_storeu_ps(o + d + 24, _mm256_add_ps(a3, b3));
  }
  for (; d + 8 <= hd; d += 8) {
    __m256 a0 = _mm256_loadu_ps(o + d), a1 = _mm256_setzero_ps(), a2 = a1, a3 = a1;
    int64_t s = 0;
    for (; s + 4 <= n; s += 4) {
      int64_t r = s * vstride + d;
      a0 = _mm256_fmadd_ps(_mm256_set1_ps(p[s]), msh_cpu_load8(v, r, dt), a0);
      a1 = _mm256_fmadd_ps(_mm256_set1_ps(p[s + 1]), msh_cpu_load8(v, r + vstride, dt), a1);
      a2 = _mm256_fmadd_ps(_mm256_set1_ps(p[s + 2]), msh_cpu_load8(v, r + 2 * vstride, dt), a2);
      a3 = _mm256_fmadd_ps(_mm256_set1_ps(p[s + 3]), msh_cpu_load8(v, r + 3 * vstride, dt), a3);
    }
    for (; s < n; s++) a0 = _mm256_fmadd_ps(_mm256_set1_ps(p[s]), msh_cpu_load8(v, s * vstride + d, dt), a0);
    _mm256_storeu_ps(o + d, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  }
#endif
  for (; d < hd; d++) {
    float acc = o[d];
    for (int64_t s = 0; s < n; s++) acc += p[s] * msh_cpu_load(v, s * vstride + d, dt);
    o[d] = acc;
  }
}

/* ------------------------------------------------------------------------------ one unit */

typedef struct {
  float *out;
  const float *q;
  const void *k, *v;
  int64_t B, T, H, hd, group, ks, vs; /* ks, vs: row strides of k and v in elements */
  int64_t kbs, vbs;                   /* batch strides of k and v in elements */
  int64_t KVH, sub, gsize; /* each kv head's group of query heads goes in `sub` units of gsize */
  int64_t pos0;            /* every sequence's first position, unless pos_dev */
  const int32_t *pos_dev;  /* NULL, or pos_n (1 or B) positions clamped into [0, pos_hi] */
  int64_t pos_n, pos_hi;
  float scale;
  int dt;
  int64_t next; /* the first unit nobody has claimed yet (atomic) */
} att_args;

/* Position of sequence b's first query. */
static inline int64_t pos_of(const att_args *a, int64_t b) {
  if (!a->pos_dev) return a->pos0;
  int64_t p = a->pos_dev[a->pos_n == 1 ? 0 : b];
  return p < 0 ? 0 : p > a->pos_hi ? a->pos_hi : p;
}

/* Unit u: sequence b, query t, kv head kvh, query heads h0 .. h0 + g. sc holds g rows of S scores. */
MSH_CPU_INLINE void unit_dt(const att_args *a, int64_t u, float *sc, int64_t S, int dt) {
  int64_t per_t = a->KVH * a->sub, per_b = a->T * per_t, b = u / per_b, r = u % per_b;
  int64_t t = r / per_t, kvh = r % per_t / a->sub, j = r % a->sub;
  int64_t h0 = kvh * a->group + j * a->gsize, g = a->group - j * a->gsize, hd = a->hd, n = pos_of(a, b) + t + 1;
  if (g > a->gsize) g = a->gsize;
  int64_t es = dt == MSH_F32 ? 4 : 2, kc = CHUNK_BYTES / (hd * es);
  kc = kc < 8 ? 8 : kc & ~(int64_t)7;
  const char *k = (const char *)a->k + (b * a->kbs + kvh * hd) * es;
  const char *v = (const char *)a->v + (b * a->vbs + kvh * hd) * es;
  const float *q = a->q + ((b * a->T + t) * a->H + h0) * hd;
  float *o = a->out + ((b * a->T + t) * a->H + h0) * hd, inv[GMAX];
  for (int64_t s0 = 0; s0 < n; s0 += kc) {
    int64_t c = n - s0 < kc ? n - s0 : kc;
    for (int64_t i = 0; i < g; i++) scores_dt(sc + i * S + s0, q + i * hd, k + s0 * a->ks * es, a->ks, c, hd, a->scale, dt);
  }
  for (int64_t i = 0; i < g; i++) {
    float mx = msh_cpu_max(sc + i * S, n);
    if (mx == -INFINITY) mx = 0; /* every score -inf or NaN: let the NaNs show */
    inv[i] = 1.0f / msh_cpu_exp_sum(sc + i * S, sc + i * S, n, mx);
  }
  memset(o, 0, sizeof(float) * (size_t)(g * hd));
  for (int64_t s0 = 0; s0 < n; s0 += kc) {
    int64_t c = n - s0 < kc ? n - s0 : kc;
    for (int64_t i = 0; i < g; i++) values_dt(o + i * hd, sc + i * S + s0, v + s0 * a->vs * es, a->vs, c, hd, dt);
  }
  for (int64_t i = 0; i < g; i++)
    for (int64_t d = 0; d < hd; d++) o[i * hd + d] *= inv[i];
}

static void unit_f32(const att_args *a, int64_t u, float *sc, int64_t S) { unit_dt(a, u, sc, S, MSH_F32); }
static void unit_f16(const att_args *a, int64_t u, float *sc, int64_t S) { unit_dt(a, u, sc, S, MSH_F16); }
static void unit_bf16(const att_args *a, int64_t u, float *sc, int64_t S) { unit_dt(a, u, sc, S, MSH_BF16); }

/* Claims units one at a time until none are left (later queries see more keys, and a thread on a
 * busy core simply takes fewer); S: keys of the longest query. -1 when the scratch cannot grow. */
static int run_units(att_args *a, int64_t S) {
  void (*fn)(const att_args *, int64_t, float *, int64_t) =
      a->dt == MSH_F32 ? unit_f32 : a->dt == MSH_F16 ? unit_f16 : unit_bf16;
  int64_t units = a->B * a->T * a->KVH * a->sub;
  float *sc = msh_cpu_scratch(1, (size_t)(a->gsize * S));
  if (!sc) return -1;
  for (;;) {
    int64_t u = __atomic_fetch_add(&a->next, 1, __ATOMIC_RELAXED);
    if (u >= units) return 0;
    fn(a, u, sc, S);
  }
}

/* Operands as the backend entries get them (4-D); positions as att_args says. */
static msh_status attention_run(msh_tensor *out, const msh_tensor *q, const msh_tensor *k, const msh_tensor *v,
                                int64_t pos0, const int32_t *pos_dev, int64_t pos_n, int64_t pos_hi, float scale) {
  int64_t B = q->shape[0], T = q->shape[1], H = q->shape[2], KVH = k->shape[2], group = H / KVH;
  int64_t sub = (group + GMAX - 1) / GMAX, gsize = (group + sub - 1) / sub;
  att_args a = {msh_tensor_ptr(out), msh_tensor_ptr(q), msh_tensor_ptr(k), msh_tensor_ptr(v), B, T, H, q->shape[3],
                group, k->stride[1], v->stride[1], k->stride[0], v->stride[0], KVH, sub, gsize, pos0, pos_dev,
                pos_n, pos_hi, scale, k->dtype, 0};
  int64_t units = B * T * KVH * sub;
  if (units == 0) return MSH_OK;
  int64_t keys = 0, S = 0; /* keys: the queries' keys summed; S: the longest query's */
  for (int64_t b = 0; b < B; b++) {
    int64_t p = pos_of(&a, b);
    keys += T * (p + (T + 1) / 2);
    if (p + T > S) S = p + T;
  }
  int64_t work = keys * H * (a.hd + 8); /* + 8: the softmax of each score */
  int nt = msh_cpu_threads(work, GRAIN_FLOPS);
  if (nt > units) nt = (int)units;
  int failed = 0;
  if (nt <= 1) {
    failed = run_units(&a, S);
  } else {
#pragma omp parallel num_threads(nt) reduction(| : failed)
    failed |= run_units(&a, S);
  }
  if (failed)
    return MSH_FAIL(MSH_ENOMEM, "attention: out of memory for %lld x %lld scores", (long long)gsize, (long long)S);
  return MSH_OK;
}

msh_status msh_cpu_attention(msh_tensor *out, const msh_tensor *q, const msh_tensor *k, const msh_tensor *v,
                             int64_t pos0, float scale) {
  return attention_run(out, q, k, v, pos0, NULL, 1, pos0, scale);
}

/* Positions read from pos0 (1 or B i32), each clamped into [0, max_len - T] as the device kernels
 * clamp them. */
msh_status msh_cpu_attention_dyn(msh_tensor *out, const msh_tensor *q, const msh_tensor *k, const msh_tensor *v,
                                 const msh_tensor *pos0, int64_t max_len, float scale) {
  return attention_run(out, q, k, v, 0, msh_tensor_ptr(pos0), msh_tensor_numel(pos0), max_len - q->shape[1], scale);
}

/* ------------------------------------------------------------------- the paged KV cache */

/* Pools (NB, BS, KVH, hd); q, out (R, H, hd); q_start (B + 1), ctx_len (B), block_table (B, MB).
 * A unit is one query row, one kv head and up to GMAX of its query heads, as above; keys go block
 * by block (a block's rows for one kv head are KVH * hd apart, BS of them). */
typedef struct {
  float *out;
  const float *q;
  const void *k, *v;
  const int32_t *qs, *cl, *bt;
  int64_t B, H, hd, group, KVH, sub, gsize, BS, MB;
  float scale;
  int dt;
  int64_t next;
} paged_args;

/* The sequence of query row r: the last b with q_start[b] <= r (q_start validated). */
static inline int64_t seq_of_row(const int32_t *qs, int64_t B, int64_t r) {
  int64_t lo = 0, hi = B - 1;
  while (lo < hi) {
    int64_t mid = (lo + hi + 1) / 2;
    if (qs[mid] <= r) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

MSH_CPU_INLINE void paged_unit_dt(const paged_args *a, int64_t u, float *sc, int64_t S, int dt) {
  int64_t per_r = a->KVH * a->sub, r = u / per_r, kvh = u % per_r / a->sub, j = u % a->sub;
  int64_t b = seq_of_row(a->qs, a->B, r), n_new = a->qs[b + 1] - a->qs[b];
  int64_t n = a->cl[b] - n_new + (r - a->qs[b]) + 1; /* keys of this query */
  int64_t h0 = kvh * a->group + j * a->gsize, g = a->group - j * a->gsize, hd = a->hd, BS = a->BS;
  if (g > a->gsize) g = a->gsize;
  int64_t es = dt == MSH_F32 ? 4 : 2, rs = a->KVH * hd; /* row stride of a block, elements */
  const int32_t *bt = a->bt + b * a->MB;
  const float *q = a->q + (r * a->H + h0) * hd;
  float *o = a->out + (r * a->H + h0) * hd, inv[GMAX];
  for (int64_t s0 = 0; s0 < n; s0 += BS) {
    int64_t c = n - s0 < BS ? n - s0 : BS;
    const char *k = (const char *)a->k + ((int64_t)bt[s0 / BS] * BS * rs + kvh * hd) * es;
    for (int64_t i = 0; i < g; i++) scores_dt(sc + i * S + s0, q + i * hd, k, rs, c, hd, a->scale, dt);
  }
  for (int64_t i = 0; i < g; i++) {
    float mx = msh_cpu_max(sc + i * S, n);
    if (mx == -INFINITY) mx = 0;
    inv[i] = 1.0f / msh_cpu_exp_sum(sc + i * S, sc + i * S, n, mx);
  }
  memset(o, 0, sizeof(float) * (size_t)(g * hd));
  for (int64_t s0 = 0; s0 < n; s0 += BS) {
    int64_t c = n - s0 < BS ? n - s0 : BS;
    const char *v = (const char *)a->v + ((int64_t)bt[s0 / BS] * BS * rs + kvh * hd) * es;
    for (int64_t i = 0; i < g; i++) values_dt(o + i * hd, sc + i * S + s0, v, rs, c, hd, dt);
  }
  for (int64_t i = 0; i < g; i++)
    for (int64_t d = 0; d < hd; d++) o[i * hd + d] *= inv[i];
}

static void paged_f32(const paged_args *a, int64_t u, float *sc, int64_t S) { paged_unit_dt(a, u, sc, S, MSH_F32); }
static void paged_f16(const paged_args *a, int64_t u, float *sc, int64_t S) { paged_unit_dt(a, u, sc, S, MSH_F16); }
static void paged_bf16(const paged_args *a, int64_t u, float *sc, int64_t S) { paged_unit_dt(a, u, sc, S, MSH_BF16); }

static int paged_units(paged_args *a, int64_t units, int64_t S) {
  void (*fn)(const paged_args *, int64_t, float *, int64_t) =
      a->dt == MSH_F32 ? paged_f32 : a->dt == MSH_F16 ? paged_f16 : paged_bf16;
  float *sc = msh_cpu_scratch(1, (size_t)(a->gsize * S));
  if (!sc) return -1;
  for (;;) {
    int64_t u = __atomic_fetch_add(&a->next, 1, __ATOMIC_RELAXED);
    if (u >= units) return 0;
    fn(a, u, sc, S);
  }
}

/* The host sees the arrays: every value is checked before a row is read. */
msh_status msh_cpu_paged_attention(msh_tensor *out, const msh_tensor *q, const msh_tensor *k_pool,
                                   const msh_tensor *v_pool, const msh_tensor *q_start, const msh_tensor *ctx_len,
                                   const msh_tensor *block_table, int64_t max_ctx, float scale) {
  const int32_t *qs = msh_tensor_ptr(q_start), *cl = msh_tensor_ptr(ctx_len), *bt = msh_tensor_ptr(block_table);
  int64_t R = q->shape[0], H = q->shape[1], hd = q->shape[2], B = q_start->shape[0] - 1;
  int64_t NB = k_pool->shape[0], BS = k_pool->shape[1], KVH = k_pool->shape[2], MB = block_table->shape[1];
  if (qs[0] != 0 || qs[B] != R)
    return MSH_FAIL(MSH_ERANGE, "paged_attention: q_start runs from %d to %d, not from 0 to the %lld query rows", qs[0],
                    qs[B], (long long)R);
  int64_t S = 1, keys = 0;
  for (int64_t b = 0; b < B; b++) {
    int64_t n_new = (int64_t)qs[b + 1] - qs[b];
    if (n_new < 0)
      return MSH_FAIL(MSH_ERANGE, "paged_attention: q_start decreases at sequence %lld (%d after %d)", (long long)b,
                      qs[b + 1], qs[b]);
    if (cl[b] < n_new || cl[b] > max_ctx)
      return MSH_FAIL(MSH_ERANGE, "paged_attention: sequence %lld: context %d outside [%lld, %lld] (its new rows, max_ctx)",
                      (long long)b, cl[b], (long long)n_new, (long long)max_ctx);
    for (int64_t j = 0; j < (cl[b] + BS - 1) / BS; j++) {
      int32_t id = bt[b * MB + j];
      if (id < 0 || id >= NB)
        return MSH_FAIL(MSH_ERANGE, "paged_attention: sequence %lld: block %d at table index %lld outside [0, %lld)",
                        (long long)b, id, (long long)j, (long long)NB);
    }
    if (cl[b] > S) S = cl[b];
    keys += n_new * (cl[b] - (n_new - 1) / 2);
  }
  int64_t group = H / KVH, sub = (group + GMAX - 1) / GMAX, gsize = (group + sub - 1) / sub;
  paged_args a = {msh_tensor_ptr(out), msh_tensor_ptr(q), msh_tensor_ptr(k_pool), msh_tensor_ptr(v_pool), qs, cl, bt,
                  B, H, hd, group, KVH, sub, gsize, BS, MB, scale, k_pool->dtype, 0};
  int64_t units = R * KVH * sub;
  int nt = msh_cpu_threads(keys * H * (hd + 8), GRAIN_FLOPS);
  if (nt > units) nt = (int)units;
  int failed = 0;
  if (nt <= 1) {
    failed = paged_units(&a, units, S);
  } else {
#pragma omp parallel num_threads(nt) reduction(| : failed)
    failed |= paged_units(&a, units, S);
  }
  if (failed)
    return MSH_FAIL(MSH_ENOMEM, "paged_attention: out of memory for %lld x %lld scores", (long long)gsize, (long long)S);
  return MSH_OK;
}

/* Row r of k and v to pool row slots[r] (skipped when negative), after every slot is checked. */
msh_status msh_cpu_kv_write(msh_tensor *k_pool, msh_tensor *v_pool, const msh_tensor *k, const msh_tensor *v,
                            const msh_tensor *slots) {
  const int32_t *sl = msh_tensor_ptr(slots);
  int64_t R = k->shape[0], rows = k_pool->shape[0] * k_pool->shape[1], KVH = k->shape[1], hd = k->shape[2];
  for (int64_t r = 0; r < R; r++)
    if (sl[r] >= rows)
      return MSH_FAIL(MSH_ERANGE, "kv_write: slot %d of row %lld outside the pool's %lld rows", sl[r], (long long)r,
                      (long long)rows);
  const msh_tensor *src[2] = {k, v};
  msh_tensor *pool[2] = {k_pool, v_pool};
  for (int w = 0; w < 2; w++) {
    msh_tensor d = *pool[w], s = *src[w]; /* stack views of one row: (KVH, hd) */
    d.ndim = s.ndim = 2;
    d.shape[0] = s.shape[0] = KVH;
    d.shape[1] = s.shape[1] = hd;
    d.stride[0] = s.stride[0] = hd;
    d.stride[1] = s.stride[1] = 1;
    for (int64_t r = 0; r < R; r++) {
      if (sl[r] < 0) continue;
      d.offset = pool[w]->offset + (int64_t)sl[r] * KVH * hd;
      s.offset = src[w]->offset + r * src[w]->stride[0];
      msh_status st = msh_cpu_copy(&d, &s);
      if (st != MSH_OK) return st;
    }
  }
  return MSH_OK;
}
