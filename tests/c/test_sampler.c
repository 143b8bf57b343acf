/* test_sampler.c: msh_sampler: reproducible per seed, temperature 0 and top_k 1 are argmax,
 * top-k and top-p keep exactly the documented set, frequencies follow softmax(logits / T), and
 * bad arguments fail with a message. */
#include "check.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rng = 0xabcdef12345ULL;

static double urand(void) {
  uint64_t z = (rng += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  z ^= z >> 31;
  return (double)(z >> 11) * (1.0 / 9007199254740992.0);
}

static msh_tensor *logits_of(const float *v, int64_t n) {
  msh_tensor *t = NULL;
  CHECK_OK(msh_tensor_new(&t, MSH_F32, 1, &n, MSH_CPU, 0));
  memcpy(msh_tensor_data(t), v, sizeof(float) * (size_t)n);
  return t;
}

static msh_tensor *random_logits(int64_t n, double spread) {
  msh_tensor *t = NULL;
  CHECK_OK(msh_tensor_new(&t, MSH_F32, 1, &n, MSH_CPU, 0));
  float *p = msh_tensor_data(t);
  for (int64_t i = 0; i < n; i++) p[i] = (float)(spread * (urand() * 2 - 1));
  return t;
}

/* counts[i] of `draws` samples */
static void histogram(msh_sampler *s, const msh_tensor *l, float temp, int k, float p, int draws, int64_t *counts,
                      int64_t n) {
  memset(counts, 0, sizeof(int64_t) * (size_t)n);
  for (int d = 0; d < draws; d++) {
    int32_t tok = -1;
    msh_status st = msh_sampler_sample(s, l, temp, k, p, &tok);
    if (st != MSH_OK || tok < 0 || tok >= n) {
      CHECK_OK(st);
      CHECK(tok >= 0 && tok < n);
      return;
    }
    counts[tok]++;
  }
}

/* Every count within 5 standard deviations of draws * want[i] (want sums to 1), and Pearson's
 * chi-square below a bound far in its tail (about p = 1e-6 for these degrees of freedom). */
static int matches(const int64_t *counts, const double *want, int64_t n, int draws) {
  double chi2 = 0;
  int ok = 1, df = -1;
  for (int64_t i = 0; i < n; i++) {
    double e = draws * want[i], sd = sqrt(draws * want[i] * (1 - want[i]));
    if (want[i] == 0) {
      if (counts[i]) ok = 0;
      continue;
    }
    df++;
    if (fabs((double)counts[i] - e) > 5 * sd + 1) ok = 0;
    chi2 += ((double)counts[i] - e) * ((double)counts[i] - e) / e;
  }
  double bound = df + 10 * sqrt(2.0 * (df > 0 ? df : 1)) + 10;
  if (chi2 > bound) ok = 0;
  if (!ok) {
    fprintf(stderr, "  frequencies off (chi2 %.1f, bound %.1f):", chi2, bound);
    for (int64_t i = 0; i < n && i < 12; i++) fprintf(stderr, " %lld/%.0f", (long long)counts[i], draws * want[i]);
    fprintf(stderr, "\n");
  }
  return ok;
}

/* softmax(l / T) restricted to `keep` (NULL: all), renormalized */
static void expected(const float *l, int64_t n, double T, const int *keep, double *out) {
  double mx = -INFINITY, sum = 0;
  for (int64_t i = 0; i < n; i++) mx = fmax(mx, l[i]);
  for (int64_t i = 0; i < n; i++) sum += out[i] = (keep && !keep[i]) ? 0 : exp((l[i] - mx) / T);
  for (int64_t i = 0; i < n; i++) out[i] /= sum;
}

static void test_reproducible(void) {
  msh_tensor *l = random_logits(1000, 4);
  msh_sampler *a = NULL, *b = NULL, *c = NULL;
  CHECK_OK(msh_sampler_new(&a, 7));
  CHECK_OK(msh_sampler_new(&b, 7));
  CHECK_OK(msh_sampler_new(&c, 8));
  int32_t seq[500];
  int same_ab = 1, same_ac = 1;
  for (int i = 0; i < 500; i++) {
    int32_t x, y, z;
    CHECK_OK(msh_sampler_sample(a, l, 1.0f, i % 3 ? 0 : 50, i % 2 ? 1.0f : 0.9f, &x));
    CHECK_OK(msh_sampler_sample(b, l, 1.0f, i % 3 ? 0 : 50, i % 2 ? 1.0f : 0.9f, &y));
    CHECK_OK(msh_sampler_sample(c, l, 1.0f, i % 3 ? 0 : 50, i % 2 ? 1.0f : 0.9f, &z));
    seq[i] = x;
    same_ab &= x == y;
    same_ac &= x == z;
  }
  CHECK(same_ab);
  CHECK(!same_ac);
  msh_sampler_reseed(a, 7); /* back to the start of the stream */
  int again = 1;
  for (int i = 0; i < 500; i++) {
    int32_t x;
    CHECK_OK(msh_sampler_sample(a, l, 1.0f, i % 3 ? 0 : 50, i % 2 ? 1.0f : 0.9f, &x));
    again &= x == seq[i];
  }
  CHECK(again);
  msh_sampler_free(a);
  msh_sampler_free(b);
  msh_sampler_free(c);
  msh_sampler_free(NULL);
  msh_sampler_reseed(NULL, 1);
  msh_tensor_free(l);
}

static void test_argmax_cases(void) {
  const float v[7] = {0.5f, 3.0f, -1.0f, 3.0f, 2.9f, 3.0f, -INFINITY};
  msh_tensor *l = logits_of(v, 7);
  msh_sampler *s = NULL;
  CHECK_OK(msh_sampler_new(&s, 1));
  int ok = 1;
  for (int i = 0; i < 50; i++) {
    int32_t t0 = -1, t1 = -1, t2 = -1, t3 = -1, t4 = -1;
    CHECK_OK(msh_sampler_sample(s, l, 0.0f, 0, 1.0f, &t0));     /* temperature 0: the first max */
    CHECK_OK(msh_sampler_sample(s, l, -1.0f, 3, 0.5f, &t1));    /* negative: the same */
    CHECK_OK(msh_sampler_sample(s, l, 5.0f, 1, 1.0f, &t2));     /* top_k 1 at a high temperature */
    CHECK_OK(msh_sampler_sample(s, l, 1e-38f, 0, 1.0f, &t3));   /* a vanishing temperature: one of the maxima */
    CHECK_OK(msh_sampler_sample(s, l, 1.0f, 0, 0.0f, &t4));     /* top_p 0 keeps the top token */
    ok &= t0 == 1 && t1 == 1 && t2 == 1 && (t3 == 1 || t3 == 3 || t3 == 5) && t4 == 1;
  }
  CHECK(ok);
  /* a (1, N) row is a row too */
  msh_tensor *row = NULL;
  int64_t s2[2] = {1, 7};
  CHECK_OK(msh_tensor_reshape(&row, l, 2, s2));
  int32_t t = -1;
  CHECK_OK(msh_sampler_sample(s, row, 0.0f, 0, 1.0f, &t));
  CHECK(t == 1);
  msh_tensor_free(row);
  msh_sampler_free(s);
  msh_tensor_free(l);
}

static void test_distribution(void) {
  enum { N = 10, DRAWS = 100000 };
  msh_tensor *l = random_logits(N, 2.5);
  const float *lp = msh_tensor_data(l);
  msh_sampler *s = NULL;
  CHECK_OK(msh_sampler_new(&s, 12345));
  int64_t counts[N];
  double want[N];
  const float temps[3] = {1.0f, 0.7f, 2.5f};
  for (int i = 0; i < 3; i++) {
    histogram(s, l, temps[i], 0, 1.0f, DRAWS, counts, N);
    expected(lp, N, temps[i], NULL, want);
    CHECK(matches(counts, want, N, DRAWS));
  }
  /* top_k = 4: the four largest, renormalized */
  int keep[N], order[N];
  for (int i = 0; i < N; i++) order[i] = i;
  for (int i = 0; i < N; i++)
    for (int j = i + 1; j < N; j++)
      if (lp[order[j]] > lp[order[i]]) {
        int t = order[i];
        order[i] = order[j];
        order[j] = t;
      }
  for (int i = 0; i < N; i++) keep[order[i]] = i < 4;
  histogram(s, l, 0.8f, 4, 1.0f, DRAWS, counts, N);
  expected(lp, N, 0.8, keep, want);
  CHECK(matches(counts, want, N, DRAWS));
  msh_sampler_free(s);
  msh_tensor_free(l);
}

static void test_top_p(void) {
  enum { DRAWS = 100000 };
  /* probabilities 0.5, 0.3, 0.15, 0.05 at temperature 1 */
  const float v[4] = {logf(0.15f), logf(0.5f), logf(0.05f), logf(0.3f)};
  msh_tensor *l = logits_of(v, 4);
  msh_sampler *s = NULL;
  CHECK_OK(msh_sampler_new(&s, 99));
  int64_t counts[4];
  double want[4];
  int keep[4] = {0, 1, 0, 1};
  histogram(s, l, 1.0f, 0, 0.75f, DRAWS, counts, 4); /* 0.5 < 0.75 <= 0.8: tokens 1 and 3 */
  CHECK(counts[0] == 0 && counts[2] == 0);
  expected(v, 4, 1.0, keep, want);
  CHECK(matches(counts, want, 4, DRAWS));
  histogram(s, l, 1.0f, 0, 0.45f, DRAWS, counts, 4); /* the top token alone reaches 0.45 */
  CHECK(counts[1] == DRAWS);
  int keep3[4] = {1, 1, 0, 1};
  histogram(s, l, 1.0f, 0, 0.9f, DRAWS, counts, 4); /* 0.8 < 0.9 <= 0.95: three tokens */
  expected(v, 4, 1.0, keep3, want);
  CHECK(counts[2] == 0 && matches(counts, want, 4, DRAWS));
  /* top_k 3 first (0.5, 0.3, 0.15 renormalized to .526, .316, .158), then top_p 0.6 of that: two */
  histogram(s, l, 1.0f, 3, 0.6f, DRAWS, counts, 4);
  expected(v, 4, 1.0, keep, want);
  CHECK(counts[0] == 0 && counts[2] == 0 && matches(counts, want, 4, DRAWS));
  msh_sampler_free(s);
  msh_tensor_free(l);

  /* a large vocabulary: no token outside the nucleus (computed here in double) is ever drawn */
  enum { V = 5000 };
  msh_tensor *big = random_logits(V, 6);
  const float *bp = msh_tensor_data(big);
  double *p = malloc(sizeof(double) * V);
  int *idx = malloc(sizeof(int) * V), *in = calloc(V, sizeof(int));
  expected(bp, V, 0.9, NULL, p);
  for (int i = 0; i < V; i++) idx[i] = i;
  for (int i = 1; i < V; i++) { /* insertion sort by probability, descending */
    int x = idx[i], j = i - 1;
    while (j >= 0 && p[idx[j]] < p[x]) {
      idx[j + 1] = idx[j];
      j--;
    }
    idx[j + 1] = x;
  }
  double mass = 0;
  int n_in = 0;
  while (mass < 0.7) {
    mass += p[idx[n_in]];
    in[idx[n_in++]] = 1;
  }
  msh_sampler *s2 = NULL;
  CHECK_OK(msh_sampler_new(&s2, 5));
  int64_t *counts2 = malloc(sizeof(int64_t) * V);
  histogram(s2, big, 0.9f, 0, 0.7f, 50000, counts2, V);
  int64_t outside = 0, used = 0;
  for (int i = 0; i < V; i++) {
    outside += !in[i] && counts2[i];
    used += counts2[i] > 0;
  }
  CHECK(outside == 0);
  CHECK(used > n_in / 2); /* and the nucleus is really sampled from, not just its top */
  double *want2 = malloc(sizeof(double) * V);
  expected(bp, V, 0.9, in, want2);
  CHECK(fabs((double)counts2[idx[0]] / 50000 - want2[idx[0]]) < 5 * sqrt(want2[idx[0]] / 50000) + 1e-3);
  free(p);
  free(idx);
  free(in);
  free(counts2);
  free(want2);
  msh_sampler_free(s2);
  msh_tensor_free(big);
}

static void test_masked(void) {
  const float v[5] = {-INFINITY, 1.0f, -INFINITY, 0.5f, -INFINITY};
  msh_tensor *l = logits_of(v, 5);
  msh_sampler *s = NULL;
  CHECK_OK(msh_sampler_new(&s, 3));
  int64_t counts[5];
  histogram(s, l, 1.3f, 0, 1.0f, 20000, counts, 5);
  CHECK(counts[0] == 0 && counts[2] == 0 && counts[4] == 0 && counts[1] > counts[3] && counts[3] > 0);
  msh_sampler_free(s);
  msh_tensor_free(l);
}

static void test_errors(void) {
  msh_sampler *s = NULL;
  CHECK_STATUS(msh_sampler_new(NULL, 1), MSH_EINVAL);
  CHECK_OK(msh_sampler_new(&s, 1));
  int32_t t = 77;
  const float v[3] = {1, NAN, 2}, w[3] = {1, INFINITY, 2};
  msh_tensor *nan = logits_of(v, 3), *inf = logits_of(w, 3), *two = NULL, *ints = NULL;
  int64_t s2[2] = {2, 3}, s3[1] = {3};
  CHECK_OK(msh_tensor_new(&two, MSH_F32, 2, s2, MSH_CPU, 0));
  CHECK_OK(msh_tensor_new(&ints, MSH_I32, 1, s3, MSH_CPU, 0));
  msh_clear_error();
  CHECK_STATUS(msh_sampler_sample(s, two, 1.0f, 0, 1.0f, &t), MSH_EINVAL); /* two rows */
  CHECK(strlen(msh_last_error()) > 0);
  CHECK_STATUS(msh_sampler_sample(s, ints, 1.0f, 0, 1.0f, &t), MSH_EINVAL);
  CHECK_STATUS(msh_sampler_sample(s, nan, 1.0f, 0, 1.0f, &t), MSH_EINVAL);
  CHECK_STATUS(msh_sampler_sample(s, inf, 1.0f, 0, 1.0f, &t), MSH_EINVAL);
  CHECK_STATUS(msh_sampler_sample(s, inf, NAN, 0, 1.0f, &t), MSH_EINVAL);
  CHECK_STATUS(msh_sampler_sample(s, inf, 1.0f, 0, NAN, &t), MSH_EINVAL);
  CHECK_STATUS(msh_sampler_sample(NULL, inf, 1.0f, 0, 1.0f, &t), MSH_EINVAL);
  CHECK_STATUS(msh_sampler_sample(s, inf, 1.0f, 0, 1.0f, NULL), MSH_EINVAL);
  CHECK(t == 77); /* untouched on failure */
  CHECK_OK(msh_sampler_sample(s, nan, 0.0f, 0, 1.0f, &t)); /* argmax skips the NaN */
  CHECK(t == 2);
  CHECK_OK(msh_sampler_sample(s, inf, 0.0f, 0, 1.0f, &t));
  CHECK(t == 1);
  msh_tensor_free(nan);
  msh_tensor_free(inf);
  msh_tensor_free(two);
  msh_tensor_free(ints);
  msh_sampler_free(s);
}

int main(void) {
  test_reproducible();
  test_argmax_cases();
  test_distribution();
  test_top_p();
  test_masked();
  test_errors();
  return check_done("test_sampler");
}
