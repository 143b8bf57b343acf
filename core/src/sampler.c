/* sampler.c: seeded, reproducible sampling of one token from a row of logits.
 *
 *   temperature <= 0        argmax (the first largest logit), no random number drawn
 *   otherwise               p = softmax(logits / temperature)
 *                           top_k > 0: keep the top_k most likely tokens
 *                           top_p < 1: then keep the smallest most-likely-first prefix of those
 *                                      whose mass reaches top_p of the kept mass
 *                           one draw from what is left, renormalized
 *
 * Ties in probability are ordered by token id, so the kept set and the draw depend only on the
 * seed and the logits. The generator is xorshift64* seeded through splitmix64: one 64-bit word of
 * state, 53-bit uniform doubles. The scratch (probabilities and candidate ids) grows with the
 * vocabulary and is kept, so a call allocates only when it sees a larger vocabulary than before. */
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct msh_sampler {
  uint64_t state; /* xorshift64*, never 0 */
  float *prob;    /* (cap) exp((logit - max) / temperature) */
  int32_t *cand;  /* (cap) candidate token ids */
  int64_t cap;
};

/* ---------------------------------------------------------------------------------- rng */

static uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

void msh_sampler_reseed(msh_sampler *s, uint64_t seed) {
  if (!s) return;
  s->state = splitmix64(seed);
  if (!s->state) s->state = 0x9e3779b97f4a7c15ULL;
}

static uint64_t next_u64(msh_sampler *s) {
  uint64_t x = s->state;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  s->state = x;
  return x * 0x2545f4914f6cdd1dULL;
}

/* uniform in [0, 1) */
static double next_unit(msh_sampler *s) { return (double)(next_u64(s) >> 11) * (1.0 / 9007199254740992.0); }

/* ------------------------------------------------------------------------- new / free */

msh_status msh_sampler_new(msh_sampler **out, uint64_t seed) {
  if (!out) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  msh_sampler *s = calloc(1, sizeof *s);
  if (!s) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  msh_sampler_reseed(s, seed);
  *out = s;
  return MSH_OK;
}

void msh_sampler_free(msh_sampler *s) {
  if (!s) return;
  free(s->prob);
  free(s->cand);
  free(s);
}

static msh_status reserve(msh_sampler *s, int64_t n) {
  if (n <= s->cap) return MSH_OK;
  float *p = malloc(sizeof(float) * (size_t)n);
  int32_t *c = malloc(sizeof(int32_t) * (size_t)n);
  if (!p || !c) {
    free(p);
    free(c);
    return MSH_FAIL(MSH_ENOMEM, "no memory for a vocabulary of %lld", (long long)n);
  }
  free(s->prob);
  free(s->cand);
  s->prob = p;
  s->cand = c;
  s->cap = n;
  return MSH_OK;
}

/* ------------------------------------------------------------------------- candidates */

/* a before b: more likely first, then the smaller id. */
static int before(const float *p, int32_t a, int32_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); }

/* Binary heap over c[0 .. n): with best_root, the candidate that comes first in `before` order is
 * at the root; otherwise the one that comes last. */
static void sift_down(int32_t *c, int64_t n, int64_t i, const float *p, int best_root) {
  for (;;) {
    int64_t l = 2 * i + 1, r = l + 1, w = i;
    if (l < n && (best_root ? before(p, c[l], c[w]) : before(p, c[w], c[l]))) w = l;
    if (r < n && (best_root ? before(p, c[r], c[w]) : before(p, c[w], c[r]))) w = r;
    if (w == i) return;
    int32_t t = c[i];
    c[i] = c[w];
    c[w] = t;
    i = w;
  }
}

/* Leaves the k first tokens of [0, N) in `before` order in c[0 .. k), sorted: a heap of the best k
 * so far (the worst at its root) takes each token in turn, then a heap sort orders them. */
static void top_sorted(int32_t *c, int64_t k, int64_t N, const float *p) {
  for (int64_t i = 0; i < k; i++) c[i] = (int32_t)i;
  for (int64_t i = k / 2 - 1; i >= 0; i--) sift_down(c, k, i, p, 0);
  for (int64_t i = k; i < N; i++)
    if (before(p, (int32_t)i, c[0])) {
      c[0] = (int32_t)i;
      sift_down(c, k, 0, p, 0);
    }
  for (int64_t n = k - 1; n > 0; n--) { /* heap sort: the root (the worst) to the end */
    int32_t t = c[0];
    c[0] = c[n];
    c[n] = t;
    sift_down(c, n, 0, p, 0);
  }
}

/* The nucleus of c[0 .. n): moves the fewest first-in-order candidates whose mass reaches `want`
 * to c[0 .. keep), in order, and returns keep (at least 1). A heap pops them best first, so the
 * cost is O(n + keep log n) rather than a full sort. *mass receives their mass. */
static int64_t nucleus(int32_t *c, int64_t n, const float *p, double want, double *mass) {
  for (int64_t i = n / 2 - 1; i >= 0; i--) sift_down(c, n, i, p, 1);
  int64_t m = n;
  double acc = 0;
  while (m > 0) { /* pop the best to c[m - 1]: the popped run c[m .. n) is in reverse order */
    int32_t t = c[0];
    c[0] = c[m - 1];
    c[m - 1] = t;
    m--;
    sift_down(c, m, 0, p, 1);
    acc += p[t];
    if (acc >= want) break;
  }
  int64_t keep = n - m;
  for (int64_t i = m, j = n - 1; i < j; i++, j--) { /* c[n - 1] was popped first: reverse the run */
    int32_t t = c[i];
    c[i] = c[j];
    c[j] = t;
  }
  memmove(c, c + m, sizeof(int32_t) * (size_t)keep);
  *mass = acc;
  return keep;
}

/* ----------------------------------------------------------------------------- sample */

msh_status msh_sampler_sample(msh_sampler *s, const msh_tensor *logits, float temperature, int top_k,
                              float top_p, int32_t *out_token) {
  if (!s || !logits || !out_token) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  int64_t N = logits->ndim ? logits->shape[logits->ndim - 1] : 1;
  if (logits->dtype != MSH_F32 || logits->st->device != MSH_CPU || !msh_tensor_is_contiguous(logits) ||
      msh_tensor_numel(logits) != N || N < 1) {
    char b[96];
    return MSH_FAIL(MSH_EINVAL, "logits must be one non-empty contiguous f32 CPU row, not %s%s",
                    msh_shape_str(logits, b, sizeof b), logits->st->device != MSH_CPU ? " on a device" : "");
  }
  if (N > INT32_MAX) return MSH_FAIL(MSH_EINVAL, "a vocabulary of %lld does not fit int32 ids", (long long)N);
  if (isnan(temperature) || isnan(top_p))
    return MSH_FAIL(MSH_EINVAL, "temperature %g, top_p %g: NaN", (double)temperature, (double)top_p);
  const float *l = msh_tensor_ptr(logits);

  int64_t best = 0; /* argmax, the first on ties; NaNs are never chosen over a number */
  for (int64_t i = 1; i < N; i++)
    if (l[i] > l[best] || (isnan(l[best]) && !isnan(l[i]))) best = i;
  if (temperature <= 0 || N == 1) {
    *out_token = (int32_t)best;
    return MSH_OK;
  }
  float mx = l[best];
  if (!isfinite(mx)) return MSH_FAIL(MSH_EINVAL, "logits hold %g: no distribution to sample", (double)mx);
  msh_status st = reserve(s, N);
  if (st != MSH_OK) return st;

  float *p = s->prob;
  int32_t *c = s->cand;
  float inv_t = 1.0f / temperature;
  if (isinf(inv_t)) { /* a temperature too small to divide by: the limit is argmax */
    *out_token = (int32_t)best;
    return MSH_OK;
  }
  double total = 0;
  for (int64_t i = 0; i < N; i++) {
    if (isnan(l[i])) return MSH_FAIL(MSH_EINVAL, "logit %lld is NaN", (long long)i);
    p[i] = expf((l[i] - mx) * inv_t);
    total += p[i];
  }

  int64_t n = N; /* candidates: c[0 .. n) in `before` order, or every token when none are needed */
  int ordered = 0;
  if (top_k > 0 && top_k < N) {
    n = top_k;
    top_sorted(c, n, N, p);
    ordered = 1;
    total = 0;
    for (int64_t i = 0; i < n; i++) total += p[c[i]];
  }
  if (top_p < 1.0f) {
    if (!ordered) {
      /* a token with p < (1 - top_p) / (N - 1) of the total is never in the nucleus: even all the
       * other tokens below that bound together hold less than 1 - top_p */
      double cut = (1.0 - top_p) / (double)(N - 1) * total * 0.999; /* 0.999: rounding margin */
      n = 0;
      for (int64_t i = 0; i < N; i++)
        if (p[i] >= cut || i == best) c[n++] = (int32_t)i; /* the bound needs one token above it */
      ordered = 1;
    }
    n = nucleus(c, n, p, (double)top_p * total, &total);
  }

  double r = next_unit(s) * total, acc = 0;
  for (int64_t i = 0; i < n; i++) {
    int32_t id = ordered ? c[i] : (int32_t)i;
    acc += p[id];
    if (r < acc) {
      *out_token = id;
      return MSH_OK;
    }
  }
  /* rounding left r at the very top: the last token with mass */
  for (int64_t i = n - 1; i >= 0; i--) {
    int32_t id = ordered ? c[i] : (int32_t)i;
    if (p[id] > 0) {
      *out_token = id;
      return MSH_OK;
    }
  }
  *out_token = (int32_t)best;
  return MSH_OK;
}
