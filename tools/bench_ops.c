/* bench_ops.c: micro-benchmarks of the CPU backend (not a test). Prints one JSON object a line.
 *
 *   1. stories260K decode: the real checkpoint run through moonshard ops (about 20 op calls a
 *      layer), greedy from BOS for 200 tokens; the text must equal expected_greedy_200.txt. Timed
 *      with 1 thread and the default, next to a plain single-file C forward pass (the peer).
 *   2. gemv (M = 1) on 4096 x 4096 weights, f32 / f16 / bf16: GFLOP/s, GB/s of weights, and the
 *      fraction of a measured memory read bandwidth (the floor of a gemv).
 *   3. matmul with M = 64 (prefill-like) on 4096 x 4096: GFLOP/s.
 *
 * Build (after cmake --build build-cpu):
 *   cc -O3 -march=native -fopenmp -std=c11 -Icore/include tools/bench_ops.c -Lbuild-cpu -lmoonshard \
 *      -Wl,-rpath,$PWD/build-cpu -lm -o build-cpu/bench_ops
 * Run from the repository root: build-cpu/bench_ops [data dir, default ../shared/data] [all|stories|matmul] */
#define _POSIX_C_SOURCE 200809L
#include "moonshard.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <immintrin.h>
#include <omp.h>

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void ok(msh_status s, const char *what) {
  if (s != MSH_OK) {
    fprintf(stderr, "bench_ops: %s: %s\n", what, msh_last_error());
    exit(1);
  }
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

/* ======================================================================== stories260K */

typedef struct {
  int dim, hidden, layers, heads, kv_heads, vocab, seq;
  int hd, kv_dim;
  const float *emb, *rms_att, *wq, *wk, *wv, *wo, *rms_ffn, *w1, *w2, *w3, *rms_final, *cls;
} model;

static void model_map(model *m, const float *base) {
  const int32_t *h = (const int32_t *)base;
  m->dim = h[0], m->hidden = h[1], m->layers = h[2], m->heads = h[3], m->kv_heads = h[4];
  m->vocab = abs(h[5]), m->seq = h[6];
  m->hd = m->dim / m->heads;
  m->kv_dim = m->hd * m->kv_heads;
  const float *p = base + 7;
  int64_t L = m->layers, D = m->dim, KV = m->kv_dim, F = m->hidden;
  m->emb = p, p += (int64_t)m->vocab * D;
  m->rms_att = p, p += L * D;
  m->wq = p, p += L * D * D;
  m->wk = p, p += L * KV * D;
  m->wv = p, p += L * KV * D;
  m->wo = p, p += L * D * D;
  m->rms_ffn = p, p += L * D;
  m->w1 = p, p += L * F * D;
  m->w2 = p, p += L * D * F;
  m->w3 = p, p += L * F * D;
  m->rms_final = p, p += D;
  p += (int64_t)m->seq * m->hd; /* two legacy rope tables of seq * hd / 2 */
  m->cls = h[5] > 0 ? m->emb : p;
}

/* ---------------------------------------------------------- the peer: plain C, one thread */

typedef struct {
  float *x, *xb, *xb2, *hb, *hb2, *q, *att, *logits, *kc, *vc; /* kc, vc: (layer, seq, kv_dim) */
} peer_state;

static void peer_rmsnorm(float *o, const float *x, const float *w, int n) {
  float ss = 0;
  for (int i = 0; i < n; i++) ss += x[i] * x[i];
  ss = 1.0f / sqrtf(ss / (float)n + 1e-5f);
  for (int i = 0; i < n; i++) o[i] = w[i] * (ss * x[i]);
}

static void peer_matmul(float *o, const float *x, const float *w, int n, int d) { /* w (d, n) */
  for (int i = 0; i < d; i++) {
    float v = 0;
    for (int j = 0; j < n; j++) v += w[(int64_t)i * n + j] * x[j];
    o[i] = v;
  }
}

static void peer_softmax(float *x, int n) {
  float mx = x[0], sum = 0;
  for (int i = 1; i < n; i++) mx = x[i] > mx ? x[i] : mx;
  for (int i = 0; i < n; i++) sum += x[i] = expf(x[i] - mx);
  for (int i = 0; i < n; i++) x[i] /= sum;
}

static int peer_forward(const model *m, peer_state *s, int token, int pos) {
  int D = m->dim, KV = m->kv_dim, hd = m->hd, F = m->hidden, group = m->heads / m->kv_heads;
  memcpy(s->x, m->emb + (int64_t)token * D, sizeof(float) * (size_t)D);
  for (int l = 0; l < m->layers; l++) {
    peer_rmsnorm(s->xb, s->x, m->rms_att + l * D, D);
    float *k = s->kc + ((int64_t)l * m->seq + pos) * KV, *v = s->vc + ((int64_t)l * m->seq + pos) * KV;
    peer_matmul(s->q, s->xb, m->wq + (int64_t)l * D * D, D, D);
    peer_matmul(k, s->xb, m->wk + (int64_t)l * KV * D, D, KV);
    peer_matmul(v, s->xb, m->wv + (int64_t)l * KV * D, D, KV);
    for (int i = 0; i < D; i += 2) {
      float f = 1.0f / powf(10000.0f, (float)(i % hd) / (float)hd), a = (float)pos * f;
      float c = cosf(a), sn = sinf(a);
      for (int r = 0; r < (i < KV ? 2 : 1); r++) {
        float *vec = r == 0 ? s->q : k, v0 = vec[i], v1 = vec[i + 1];
        vec[i] = v0 * c - v1 * sn;
        vec[i + 1] = v0 * sn + v1 * c;
      }
    }
    for (int h = 0; h < m->heads; h++) {
      const float *q = s->q + h * hd;
      float *att = s->att + h * m->seq;
      for (int t = 0; t <= pos; t++) {
        const float *kt = s->kc + ((int64_t)l * m->seq + t) * KV + (h / group) * hd;
        float sc = 0;
        for (int i = 0; i < hd; i++) sc += q[i] * kt[i];
        att[t] = sc / sqrtf((float)hd);
      }
      peer_softmax(att, pos + 1);
      float *o = s->xb + h * hd;
      memset(o, 0, sizeof(float) * (size_t)hd);
      for (int t = 0; t <= pos; t++) {
        const float *vt = s->vc + ((int64_t)l * m->seq + t) * KV + (h / group) * hd;
        for (int i = 0; i < hd; i++) o[i] += att[t] * vt[i];
      }
    }
    peer_matmul(s->xb2, s->xb, m->wo + (int64_t)l * D * D, D, D);
    for (int i = 0; i < D; i++) s->x[i] += s->xb2[i];
    peer_rmsnorm(s->xb, s->x, m->rms_ffn + l * D, D);
    peer_matmul(s->hb, s->xb, m->w1 + (int64_t)l * F * D, D, F);
    peer_matmul(s->hb2, s->xb, m->w3 + (int64_t)l * F * D, D, F);
    for (int i = 0; i < F; i++) s->hb[i] = s->hb[i] / (1.0f + expf(-s->hb[i])) * s->hb2[i];
    peer_matmul(s->xb, s->hb, m->w2 + (int64_t)l * D * F, F, D);
    for (int i = 0; i < D; i++) s->x[i] += s->xb[i];
  }
  peer_rmsnorm(s->x, s->x, m->rms_final, D);
  peer_matmul(s->logits, s->x, m->cls, D, m->vocab);
  int best = 0;
  for (int i = 1; i < m->vocab; i++)
    if (s->logits[i] > s->logits[best]) best = i;
  return best;
}

/* ------------------------------------------------------------------- moonshard op graph */

typedef struct {
  msh_tensor *x, *xb, *xb2, *hb, *hb2, *q, *k, *v, *logits; /* activations (1, n) */
  msh_tensor *q3, *k3, *v3, *xb3;                              /* (1, heads, hd) views */
  msh_tensor *pos, *ids, *inv_freq;
  msh_tensor **kc, **vc;                                       /* per layer (seq, kv_heads, hd) */
  msh_tensor **rms_att, **wq, **wk, **wv, **wo, **rms_ffn, **w1, **w2, **w3;
  msh_tensor *emb, *rms_final, *cls;
} graph;

static msh_tensor *act(int64_t n) {
  msh_tensor *t = NULL;
  int64_t s[2] = {1, n};
  ok(msh_tensor_new(&t, MSH_F32, 2, s, MSH_CPU, 0), "activation");
  return t;
}

static msh_tensor *heads(msh_tensor *t, int64_t h, int64_t hd) {
  msh_tensor *v = NULL;
  int64_t s[3] = {1, h, hd};
  ok(msh_tensor_reshape(&v, t, 3, s), "reshape");
  return v;
}

static msh_tensor *weight(msh_file *f, const float *base, const float *p, int64_t rows, int64_t cols) {
  msh_tensor *t = NULL;
  int64_t s[2] = {rows, cols};
  ok(msh_tensor_from_file(&t, f, (uint64_t)((const char *)p - (const char *)base), MSH_F32, cols ? 2 : 1,
                          cols ? s : &s[0]),
     "weight");
  return t;
}

static void graph_build(graph *g, const model *m, msh_file *f) {
  const float *base = msh_file_data(f);
  int64_t D = m->dim, KV = m->kv_dim, F = m->hidden, L = m->layers;
  g->x = act(D), g->xb = act(D), g->xb2 = act(D), g->hb = act(F), g->hb2 = act(F);
  g->q = act(D), g->k = act(KV), g->v = act(KV), g->logits = act(m->vocab);
  g->q3 = heads(g->q, m->heads, m->hd), g->k3 = heads(g->k, m->kv_heads, m->hd);
  g->v3 = heads(g->v, m->kv_heads, m->hd), g->xb3 = heads(g->xb, m->heads, m->hd);
  int64_t one = 1, half = m->hd / 2;
  ok(msh_tensor_new(&g->pos, MSH_I32, 1, &one, MSH_CPU, 0), "pos");
  ok(msh_tensor_new(&g->ids, MSH_I32, 1, &one, MSH_CPU, 0), "ids");
  ok(msh_tensor_new(&g->inv_freq, MSH_F32, 1, &half, MSH_CPU, 0), "inv_freq");
  for (int64_t i = 0; i < half; i++)
    ((float *)msh_tensor_data(g->inv_freq))[i] = (float)pow(10000.0, -2.0 * (double)i / (double)m->hd);
  size_t pl = sizeof(msh_tensor *) * (size_t)L;
  g->kc = malloc(pl), g->vc = malloc(pl), g->rms_att = malloc(pl), g->wq = malloc(pl), g->wk = malloc(pl);
  g->wv = malloc(pl), g->wo = malloc(pl), g->rms_ffn = malloc(pl), g->w1 = malloc(pl), g->w2 = malloc(pl);
  g->w3 = malloc(pl);
  int64_t cs[3] = {m->seq, m->kv_heads, m->hd};
  for (int64_t l = 0; l < L; l++) {
    ok(msh_tensor_new(&g->kc[l], MSH_F32, 3, cs, MSH_CPU, 0), "cache");
    ok(msh_tensor_new(&g->vc[l], MSH_F32, 3, cs, MSH_CPU, 0), "cache");
    g->rms_att[l] = weight(f, base, m->rms_att + l * D, D, 0);
    g->wq[l] = weight(f, base, m->wq + l * D * D, D, D);
    g->wk[l] = weight(f, base, m->wk + l * KV * D, KV, D);
    g->wv[l] = weight(f, base, m->wv + l * KV * D, KV, D);
    g->wo[l] = weight(f, base, m->wo + l * D * D, D, D);
    g->rms_ffn[l] = weight(f, base, m->rms_ffn + l * D, D, 0);
    g->w1[l] = weight(f, base, m->w1 + l * F * D, F, D);
    g->w2[l] = weight(f, base, m->w2 + l * D * F, D, F);
    g->w3[l] = weight(f, base, m->w3 + l * F * D, F, D);
  }
  g->emb = weight(f, base, m->emb, m->vocab, D);
  g->rms_final = weight(f, base, m->rms_final, D, 0);
  g->cls = weight(f, base, m->cls, m->vocab, D);
}

static void graph_free(graph *g, int L) {
  msh_tensor *ts[] = {g->x, g->xb, g->xb2, g->hb, g->hb2, g->q, g->k, g->v, g->logits, g->q3, g->k3,
                      g->v3, g->xb3, g->pos, g->ids, g->inv_freq, g->emb, g->rms_final, g->cls};
  for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++) msh_tensor_free(ts[i]);
  msh_tensor **per[] = {g->kc, g->vc, g->rms_att, g->wq, g->wk, g->wv, g->wo, g->rms_ffn, g->w1, g->w2, g->w3};
  for (size_t j = 0; j < sizeof per / sizeof per[0]; j++) {
    for (int l = 0; l < L; l++) msh_tensor_free(per[j][l]);
    free(per[j]);
  }
}

/* One decode step: 1 + 17 per layer + 3 op calls (18 + 2 setup writes). Returns the argmax. */
static int graph_forward(graph *g, const model *m, int token, int pos) {
  float eps = 1e-5f, scale = 1.0f / sqrtf((float)m->hd);
  ((int32_t *)msh_tensor_data(g->ids))[0] = token;
  ((int32_t *)msh_tensor_data(g->pos))[0] = pos;
  ok(msh_op_embedding(g->x, g->emb, g->ids), "embedding");
  for (int l = 0; l < m->layers; l++) {
    ok(msh_op_rmsnorm(g->xb, g->x, g->rms_att[l], eps), "rmsnorm");
    ok(msh_op_matmul(g->q, g->xb, g->wq[l]), "wq");
    ok(msh_op_matmul(g->k, g->xb, g->wk[l]), "wk");
    ok(msh_op_matmul(g->v, g->xb, g->wv[l]), "wv");
    ok(msh_op_rope(g->q3, g->pos, g->inv_freq, MSH_ROPE_INTERLEAVED), "rope q");
    ok(msh_op_rope(g->k3, g->pos, g->inv_freq, MSH_ROPE_INTERLEAVED), "rope k");
    ok(msh_op_set_rows(g->kc[l], pos, g->k3), "set k");
    ok(msh_op_set_rows(g->vc[l], pos, g->v3), "set v");
    ok(msh_op_attention(g->xb3, g->q3, g->kc[l], g->vc[l], pos, scale), "attention");
    ok(msh_op_matmul(g->xb2, g->xb, g->wo[l]), "wo");
    ok(msh_op_add(g->x, g->x, g->xb2), "add");
    ok(msh_op_rmsnorm(g->xb, g->x, g->rms_ffn[l], eps), "rmsnorm");
    ok(msh_op_matmul(g->hb, g->xb, g->w1[l]), "w1");
    ok(msh_op_matmul(g->hb2, g->xb, g->w3[l]), "w3");
    ok(msh_op_silu_mul(g->hb, g->hb, g->hb2), "silu_mul");
    ok(msh_op_matmul(g->xb, g->hb, g->w2[l]), "w2");
    ok(msh_op_add(g->x, g->x, g->xb), "add");
  }
  ok(msh_op_rmsnorm(g->x, g->x, g->rms_final, eps), "rmsnorm");
  ok(msh_op_matmul(g->logits, g->x, g->cls), "classifier");
  int32_t next = 0;
  ok(msh_op_argmax(g->logits, &next), "argmax");
  return next;
}

/* --------------------------------------------------------------------------- tokenizer */

typedef struct {
  char **piece;
  int n;
} vocab;

static int vocab_load(vocab *v, const char *path, int n) {
  FILE *f = fopen(path, "rb");
  if (!f) return -1;
  int32_t maxlen;
  if (fread(&maxlen, 4, 1, f) != 1) return fclose(f), -1;
  v->piece = calloc((size_t)n, sizeof(char *));
  v->n = n;
  for (int i = 0; i < n; i++) {
    float score;
    int32_t len;
    if (fread(&score, 4, 1, f) != 1 || fread(&len, 4, 1, f) != 1 || len < 0 || len > 1024) return fclose(f), -1;
    v->piece[i] = calloc((size_t)len + 1, 1);
    if (fread(v->piece[i], 1, (size_t)len, f) != (size_t)len) return fclose(f), -1;
  }
  fclose(f);
  return 0;
}

/* Appends the text of token `next` after `prev` as the reference decoder prints it. */
static void vocab_append(const vocab *v, int prev, int next, char *out, size_t cap) {
  const char *p = v->piece[next];
  if (prev == 1 && p[0] == ' ') p++; /* no space after BOS */
  char byte[2] = {0, 0};
  unsigned b;
  if (sscanf(p, "<0x%02X>", &b) == 1 && strlen(p) == 6) {
    byte[0] = (char)b;
    p = byte;
  }
  size_t n = strlen(out);
  snprintf(out + n, cap - n, "%s", p);
}

/* ----------------------------------------------------------------------------- driver */

enum { STEPS = 200, RUNS = 7 };

static void bench_stories(const char *data) {
  char path[1024], text[8192], expected[8192] = {0};
  snprintf(path, sizeof path, "%s/models/stories260K/stories260K.bin", data);
  msh_file *f = NULL;
  ok(msh_file_open(&f, path), "open checkpoint");
  model m;
  model_map(&m, msh_file_data(f));
  vocab voc;
  snprintf(path, sizeof path, "%s/models/stories260K/tok512.bin", data);
  if (vocab_load(&voc, path, m.vocab)) {
    fprintf(stderr, "bench_ops: cannot read %s\n", path);
    exit(1);
  }
  snprintf(path, sizeof path, "%s/models/stories260K/expected_greedy_200.txt", data);
  FILE *ef = fopen(path, "rb");
  if (ef) {
    size_t n = fread(expected, 1, sizeof expected - 1, ef);
    expected[n] = 0;
    fclose(ef);
  }

  graph g;
  graph_build(&g, &m, f);
  const int threads[2] = {1, 0};
  for (int ti = 0; ti < 2; ti++) {
    msh_set_num_threads(threads[ti]);
    double t[RUNS];
    for (int r = 0; r < RUNS; r++) {
      text[0] = 0;
      int token = 1;
      double t0 = now();
      for (int pos = 0; pos < STEPS; pos++) {
        int next = graph_forward(&g, &m, token, pos);
        if (r == 0) vocab_append(&voc, token, next, text, sizeof text);
        token = next;
      }
      t[r] = now() - t0;
      if (r == 0 && strcmp(text, expected) != 0) {
        fprintf(stderr, "bench_ops: moonshard ops do not reproduce the expected text:\n%s\n", text);
        exit(1);
      }
    }
    qsort(t, RUNS, sizeof t[0], cmp_double);
    double ns = t[RUNS / 2] / STEPS * 1e9;
    printf("{\"bench\":\"stories260K_decode\",\"impl\":\"moonshard_ops\",\"threads\":%d,\"steps\":%d,"
           "\"ns_per_token\":%.0f,\"tok_per_s\":%.0f,\"op_calls_per_token\":%d,\"text_matches\":true}\n",
           msh_get_num_threads(), STEPS, ns, 1e9 / ns, 1 + 17 * m.layers + 3);
  }
  msh_set_num_threads(0);

  /* the peer: plain C, one thread, same greedy run */
  peer_state s;
  size_t cache = (size_t)m.layers * (size_t)m.seq * (size_t)m.kv_dim;
  s.x = calloc((size_t)m.dim, 4), s.xb = calloc((size_t)m.dim, 4), s.xb2 = calloc((size_t)m.dim, 4);
  s.hb = calloc((size_t)m.hidden, 4), s.hb2 = calloc((size_t)m.hidden, 4), s.q = calloc((size_t)m.dim, 4);
  s.att = calloc((size_t)m.heads * (size_t)m.seq, 4), s.logits = calloc((size_t)m.vocab, 4);
  s.kc = calloc(cache, 4), s.vc = calloc(cache, 4);
  double t[RUNS];
  int peer_matches = 0;
  for (int r = 0; r < RUNS; r++) {
    text[0] = 0;
    int token = 1;
    double t0 = now();
    for (int pos = 0; pos < STEPS; pos++) {
      int next = peer_forward(&m, &s, token, pos);
      if (r == 0) vocab_append(&voc, token, next, text, sizeof text);
      token = next;
    }
    t[r] = now() - t0;
    if (r == 0) peer_matches = strcmp(text, expected) == 0;
  }
  qsort(t, RUNS, sizeof t[0], cmp_double);
  double ns = t[RUNS / 2] / STEPS * 1e9;
  printf("{\"bench\":\"stories260K_decode\",\"impl\":\"plain_c_peer\",\"threads\":1,\"steps\":%d,"
         "\"ns_per_token\":%.0f,\"tok_per_s\":%.0f,\"text_matches\":%s}\n",
         STEPS, ns, 1e9 / ns, peer_matches ? "true" : "false");
  free(s.x), free(s.xb), free(s.xb2), free(s.hb), free(s.hb2), free(s.q), free(s.att), free(s.logits);
  free(s.kc), free(s.vc);
  for (int i = 0; i < voc.n; i++) free(voc.piece[i]);
  free(voc.piece);
  graph_free(&g, m.layers);
  msh_file_free(f);
}

/* ------------------------------------------------------------------------ gemv, gemm */

/* Read bandwidth of one pass over n floats by `threads` threads (the best of reps): vector sums,
 * four independent accumulators, each thread on its own half. */
static double read_bandwidth(const float *p, int64_t n, int threads, int reps) {
  double best = 1e30;
  volatile float sink = 0;
  for (int r = 0; r < reps; r++) {
    double t0 = now();
    float total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
      int i = omp_get_thread_num(), nt = omp_get_num_threads();
      int64_t lo = n / 32 * i / nt * 32, hi = n / 32 * (i + 1) / nt * 32;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t j = lo; j < hi; j += 32) {
        a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + j));
        a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + j + 8));
        a2 = _mm256_add_ps(a2, _mm256_loadu_ps(p + j + 16));
        a3 = _mm256_add_ps(a3, _mm256_loadu_ps(p + j + 24));
      }
      float out[8];
      _mm256_storeu_ps(out, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
      for (int k = 0; k < 8; k++) total += out[k];
    }
    double dt = now() - t0;
    sink += total;
    if (dt < best) best = dt;
  }
  (void)sink;
  return (double)n * 4 / best / 1e9;
}

static void bench_matmul(int64_t M, int64_t N, int64_t K, int dtype, int threads, double floor_gbs) {
  int64_t ws[2] = {N, K}, xs[2] = {M, K}, os[2] = {M, N};
  msh_tensor *w = NULL, *x = NULL, *o = NULL;
  ok(msh_tensor_new(&w, dtype, 2, ws, MSH_CPU, 0), "w");
  ok(msh_tensor_new(&x, MSH_F32, 2, xs, MSH_CPU, 0), "x");
  ok(msh_tensor_new(&o, MSH_F32, 2, os, MSH_CPU, 0), "o");
  ok(msh_tensor_randn(w, 1, 0, 0.02f), "randn");
  ok(msh_tensor_randn(x, 2, 0, 1), "randn");
  msh_set_num_threads(threads);
  int reps = M == 1 ? 30 : 5;
  double t[30];
  ok(msh_op_matmul(o, x, w), "matmul");
  for (int r = 0; r < reps; r++) {
    double t0 = now();
    ok(msh_op_matmul(o, x, w), "matmul");
    t[r] = now() - t0;
  }
  qsort(t, (size_t)reps, sizeof t[0], cmp_double);
  double s = t[reps / 2], bytes = (double)N * (double)K * (double)msh_dtype_size(dtype);
  printf("{\"bench\":\"matmul\",\"M\":%lld,\"N\":%lld,\"K\":%lld,\"w\":\"%s\",\"threads\":%d,\"us\":%.1f,"
         "\"gflops\":%.2f,\"weight_gbs\":%.2f",
         (long long)M, (long long)N, (long long)K, msh_dtype_name(dtype), msh_get_num_threads(), s * 1e6,
         2.0 * (double)M * (double)N * (double)K / s / 1e9, bytes / s / 1e9);
  if (M == 1) printf(",\"read_floor_gbs\":%.2f,\"efficiency\":%.2f", floor_gbs, bytes / s / 1e9 / floor_gbs);
  printf("}\n");
  msh_set_num_threads(0);
  msh_tensor_free(w);
  msh_tensor_free(x);
  msh_tensor_free(o);
}

int main(int argc, char **argv) {
  const char *data = argc > 1 ? argv[1] : "../shared/data";
  const char *only = argc > 2 ? argv[2] : "all"; /* all, stories or matmul */
  if (strcmp(only, "matmul")) bench_stories(data);
  if (!strcmp(only, "stories")) return 0;

  int64_t n = 64 << 20; /* 256 MB: far beyond the caches */
  float *buf = malloc((size_t)n * 4);
  for (int64_t i = 0; i < n; i++) buf[i] = (float)(i & 7);
  double bw1 = read_bandwidth(buf, n, 1, 5), bw = read_bandwidth(buf, n, 2, 5);
  printf("{\"bench\":\"read_bandwidth\",\"gbs_1_thread\":%.2f,\"gbs_2_threads\":%.2f}\n", bw1, bw);
  free(buf);

  const int types[3] = {MSH_F32, MSH_F16, MSH_BF16};
  for (int d = 0; d < 3; d++)
    for (int th = 1; th <= 2; th++) bench_matmul(1, 4096, 4096, types[d], th, bw);
  for (int d = 0; d < 3; d++) bench_matmul(64, 4096, 4096, types[d], 0, bw);
  bench_matmul(1, 576, 576, MSH_F32, 0, bw);
  bench_matmul(1, 1536, 576, MSH_F32, 0, bw);
  bench_matmul(4, 4096, 4096, MSH_BF16, 0, bw);
  return 0;
}
