/* test_cuda_graph.c: the ops that read positions on the device, and CUDA graphs.
 *   - attention_dyn against attention (on the GPU and the CPU) at positions 0 .. 8190 planned for
 *     8192, bf16 and f32 caches, GQA 32/8, head dim 128; positions out of range clamped;
 *   - set_rows_dyn against set_rows on the CPU, bit for bit (packed rows and strided);
 *   - a captured decode-like step (matmul M = 1 bf16, rope, set_rows_dyn, attention_dyn, add)
 *     replayed at several positions against the same ops run eagerly, also after the device
 *     scratch has grown past the block the graph was captured over;
 *   - misuse of begin/end, and what refuses during a capture (downloads, uploads, argmax, sync,
 *     allocation, scratch growth) without breaking it; the stream runs ops afterwards.
 * Exits 77 (skipped) when there is no CUDA device. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "check.h"
#include "gpu_helpers.h"
#include "moonshard.h"

/* ------------------------------------------------------------------------------ helpers */

/* A (1) i32 tensor on the device holding v, or v written into one. */
static void set_pos(msh_tensor *g, int32_t v) {
  int64_t one = 1;
  msh_tensor *h = cpu_new(MSH_I32, 1, &one);
  if (!h) return;
  *(int32_t *)msh_tensor_data(h) = v;
  CHECK_OK(msh_tensor_copy(g, h));
  msh_tensor_free(h);
}

static msh_tensor *gpu_pos(int32_t v) {
  int64_t one = 1;
  msh_tensor *g = gpu_new(MSH_I32, 1, &one);
  if (g) set_pos(g, v);
  return g;
}

/* Fills a device f32 tensor with NaN: an element an op leaves unwritten fails a comparison. */
static void poison(msh_tensor *g) {
  msh_tensor *h = copy_to(MSH_CPU, g);
  if (!h) return;
  float *p = msh_tensor_data(h);
  for (int64_t i = 0; i < msh_tensor_numel(h); i++) p[i] = NAN;
  CHECK_OK(msh_tensor_copy(g, h));
  msh_tensor_free(h);
}

static int64_t clamp(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : x > hi ? hi : x; }

/* The same bytes (either tensor on either device). */
static void compare_bits_at(const char *what, const msh_tensor *a_t, const msh_tensor *b_t, const char *file,
                            int line) {
  msh_tensor *a = copy_to(MSH_CPU, a_t), *b = copy_to(MSH_CPU, b_t);
  if (a && b) {
    size_t bytes = (size_t)msh_tensor_numel(a) * msh_dtype_size(msh_tensor_dtype(a));
    int same = msh_tensor_numel(a) == msh_tensor_numel(b) && msh_tensor_dtype(a) == msh_tensor_dtype(b) &&
               !memcmp(msh_tensor_data(a), msh_tensor_data(b), bytes);
    char msg[256];
    snprintf(msg, sizeof msg, "%s: the same bytes", what);
    check_at(same, msg, file, line);
    printf("  %-70s %s\n", what, same ? "bit-exact" : "DIFFERENT");
  }
  msh_tensor_free(a);
  msh_tensor_free(b);
}
#define COMPARE_BITS(what, a, b) compare_bits_at((what), (a), (b), __FILE__, __LINE__)

/* ------------------------------------------------------------------------ attention_dyn */

/* T queries of 32 heads over an (S, 8, 128) cache, planned for max_len, at each position of pos
 * (clamped into [0, max_len - T] as the op does): attention_dyn against attention on the GPU and
 * on the CPU. */
static void attention_dyn_case(int kv_dt, int64_t T, int64_t S, int64_t max_len, const int32_t *pos, int npos,
                               double tol) {
  const int64_t H = 32, KVH = 8, hd = 128;
  int64_t qs[3] = {T, H, hd}, ks[3] = {S, KVH, hd};
  msh_tensor *gq = gpu_randn(MSH_F32, 3, qs, 1.0f), *gk = gpu_randn(kv_dt, 3, ks, 1.0f);
  msh_tensor *gv = gpu_randn(kv_dt, 3, ks, 1.0f);
  msh_tensor *cq = gq ? copy_to(MSH_CPU, gq) : NULL, *ck = gk ? copy_to(MSH_CPU, gk) : NULL;
  msh_tensor *cv = gv ? copy_to(MSH_CPU, gv) : NULL;
  msh_tensor *gd = gpu_new(MSH_F32, 3, qs), *ge = gpu_new(MSH_F32, 3, qs), *co = cpu_new(MSH_F32, 3, qs);
  msh_tensor *gp = gpu_pos(0);
  float scale = 1.0f / sqrtf((float)hd);
  for (int i = 0; i < npos && gq && gk && gv && cq && ck && cv && gd && ge && co && gp; i++) {
    int64_t p = clamp(pos[i], 0, max_len - T);
    poison(gd);
    set_pos(gp, pos[i]);
    CHECK_OK(msh_op_attention_dyn(gd, gq, gk, gv, gp, max_len, scale));
    CHECK_OK(msh_op_attention(ge, gq, gk, gv, p, scale));
    CHECK_OK(msh_op_attention(co, cq, ck, cv, p, scale));
    char what[160];
    snprintf(what, sizeof what, "attention_dyn T %lld pos0 %d (as %lld) max_len %lld %s vs CPU", (long long)T,
             pos[i], (long long)p, (long long)max_len, msh_dtype_name(kv_dt));
    COMPARE(what, gd, co, tol);
    snprintf(what, sizeof what, "attention_dyn T %lld pos0 %d max_len %lld %s vs attention", (long long)T, pos[i],
             (long long)max_len, msh_dtype_name(kv_dt));
    COMPARE(what, gd, ge, tol);
  }
  msh_tensor *ts[] = {gq, gk, gv, cq, ck, cv, gd, ge, co, gp};
  free_all(ts, 10);
}

static void test_attention_dyn(void) {
  printf("attention_dyn\n");
  static const int32_t pos1[] = {0, 5, 1000, 8190, 8191, 9000, -7};
  static const int32_t pos4[] = {0, 5, 1000, 8188, 100000};
  /* f16/bf16 caches take the tensor-core kernel (q and p rounded to 16 bits): 1e-2; f32: 2e-5 */
  attention_dyn_case(MSH_BF16, 1, 8200, 8192, pos1, 7, 1e-2);
  attention_dyn_case(MSH_F32, 1, 8200, 8192, pos1, 7, 2e-5);
  attention_dyn_case(MSH_BF16, 4, 8192, 8192, pos4, 5, 1e-2);
  attention_dyn_case(MSH_F16, 2, 300, 257, pos4, 3, 1e-2); /* a plan of few splits */
  /* short plans (a graph's first context bucket): the chunks form one cluster; blocks past the
   * position take part with nothing */
  static const int32_t pos_short[] = {0, 5, 63, 64, 257, 511, 600};
  attention_dyn_case(MSH_BF16, 1, 520, 512, pos_short, 7, 1e-2);
  attention_dyn_case(MSH_F16, 1, 300, 256, pos_short, 5, 1e-2);
  /* longer buckets still in a cluster (8 chunks of several tiles; the later ones empty early on) */
  static const int32_t pos_mid[] = {0, 63, 64, 300, 1024, 2047, 4095, 5000};
  attention_dyn_case(MSH_BF16, 1, 2100, 2048, pos_mid, 6, 1e-2);
  attention_dyn_case(MSH_BF16, 1, 4100, 4096, pos_mid, 8, 1e-2);
}

/* ------------------------------------------------------------------------- set_rows_dyn */

static void test_set_rows_dyn(void) {
  printf("set_rows_dyn\n");
  static const int32_t rows[] = {0, 17, 62, 100, -3};
  /* packed rows: an f32 (2, 8, 128) block into a bf16 (64, 8, 128) cache, and f32 into f32 */
  for (int dti = 0; dti < 2; dti++) {
    int dt = dti ? MSH_F32 : MSH_BF16;
    int64_t ds[3] = {64, 8, 128}, ss[3] = {2, 8, 128};
    msh_tensor *gd = gpu_randn(dt, 3, ds, 1.0f), *gs = gpu_randn(MSH_F32, 3, ss, 1.0f), *gr = gpu_pos(0);
    msh_tensor *cd = gd ? copy_to(MSH_CPU, gd) : NULL, *cs = gs ? copy_to(MSH_CPU, gs) : NULL;
    for (int i = 0; i < 5 && gd && gs && gr && cd && cs; i++) {
      set_pos(gr, rows[i]);
      CHECK_OK(msh_op_set_rows_dyn(gd, gr, gs));
      CHECK_OK(msh_op_set_rows(cd, clamp(rows[i], 0, 62), cs));
      char what[96];
      snprintf(what, sizeof what, "set_rows_dyn row0 %d into (64, 8, 128) %s", rows[i], msh_dtype_name(dt));
      COMPARE_BITS(what, gd, cd);
    }
    msh_tensor *ts[] = {gd, gs, gr, cd, cs};
    free_all(ts, 5);
  }
  /* strided: columns [1, 4) of a (40, 4, 6) f16 tensor from a (3, 4, 3) f32 block */
  int64_t ds[3] = {40, 4, 6}, ss[3] = {3, 4, 3};
  msh_tensor *gd = gpu_randn(MSH_F16, 3, ds, 1.0f), *gs = gpu_randn(MSH_F32, 3, ss, 1.0f), *gr = gpu_pos(0);
  msh_tensor *cd = gd ? copy_to(MSH_CPU, gd) : NULL, *cs = gs ? copy_to(MSH_CPU, gs) : NULL;
  msh_tensor *gn = NULL, *cn = NULL;
  if (gd && cd) {
    CHECK_OK(msh_tensor_narrow(&gn, gd, 2, 1, 3));
    CHECK_OK(msh_tensor_narrow(&cn, cd, 2, 1, 3));
  }
  for (int i = 0; i < 5 && gn && cn && gs && cs && gr; i++) {
    set_pos(gr, rows[i] / 2);
    CHECK_OK(msh_op_set_rows_dyn(gn, gr, gs));
    CHECK_OK(msh_op_set_rows(cn, clamp(rows[i] / 2, 0, 37), cs));
    char what[96];
    snprintf(what, sizeof what, "set_rows_dyn row0 %d into a strided (40, 4, 3) f16 view", rows[i] / 2);
    COMPARE_BITS(what, gd, cd);
  }
  msh_tensor *ts[] = {gn, cn, gd, gs, gr, cd, cs};
  free_all(ts, 7);
}

/* ------------------------------------------------------------------------ a decode step */

enum { D = 4096, NH = 32, NKV = 8, HD = 128, CTX = 4096 };

typedef struct {
  msh_tensor *x, *wq, *wk, *wv, *wo, *inv_freq, *pos;
  msh_tensor *qf, *kf, *vf, *att, *o;       /* (1, n) f32 intermediates */
  msh_tensor *q3, *k3, *v3, *att2;          /* their (1, heads, 128) / (1, 4096) views */
} step_ctx;

/* One attention block of a decode step at the position in c->pos (dyn) or p (host scalars):
 * y = x + wo @ attention(rope(wq x), cache with rope(wk x), wv x written at the position). */
static void step(step_ctx *c, msh_tensor *kc, msh_tensor *vc, msh_tensor *y, int dyn, int64_t p) {
  float scale = 1.0f / sqrtf((float)HD);
  CHECK_OK(msh_op_matmul(c->qf, c->x, c->wq));
  CHECK_OK(msh_op_matmul(c->kf, c->x, c->wk));
  CHECK_OK(msh_op_matmul(c->vf, c->x, c->wv));
  CHECK_OK(msh_op_rope(c->q3, c->pos, c->inv_freq, MSH_ROPE_HALF));
  CHECK_OK(msh_op_rope(c->k3, c->pos, c->inv_freq, MSH_ROPE_HALF));
  if (dyn) {
    CHECK_OK(msh_op_set_rows_dyn(kc, c->pos, c->k3));
    CHECK_OK(msh_op_set_rows_dyn(vc, c->pos, c->v3));
    CHECK_OK(msh_op_attention_dyn(c->att, c->q3, kc, vc, c->pos, CTX, scale));
  } else {
    CHECK_OK(msh_op_set_rows(kc, p, c->k3));
    CHECK_OK(msh_op_set_rows(vc, p, c->v3));
    CHECK_OK(msh_op_attention(c->att, c->q3, kc, vc, p, scale));
  }
  CHECK_OK(msh_op_matmul(c->o, c->att2, c->wo));
  CHECK_OK(msh_op_add(y, c->o, c->x));
}

static msh_tensor *view(msh_tensor *t, int ndim, const int64_t *shape) {
  msh_tensor *v = NULL;
  if (t) CHECK_OK(msh_tensor_reshape(&v, t, ndim, shape));
  return v;
}

static void test_graph_step(void) {
  printf("graph of a decode step (matmul M = 1 bf16, rope, set_rows_dyn, attention_dyn, add)\n");
  step_ctx c = {0};
  int64_t xs[2] = {1, D}, wqs[2] = {NH * HD, D}, wks[2] = {NKV * HD, D}, wos[2] = {D, NH * HD};
  int64_t cs[3] = {CTX, NKV, HD}, rs[1] = {HD / 2};
  c.x = gpu_randn(MSH_F32, 2, xs, 1.0f);
  c.wq = gpu_randn(MSH_BF16, 2, wqs, 0.02f);
  c.wk = gpu_randn(MSH_BF16, 2, wks, 0.02f);
  c.wv = gpu_randn(MSH_BF16, 2, wks, 0.5f);
  c.wo = gpu_randn(MSH_BF16, 2, wos, 0.02f);
  msh_tensor *hf = cpu_new(MSH_F32, 1, rs);
  if (hf)
    for (int i = 0; i < HD / 2; i++) ((float *)msh_tensor_data(hf))[i] = powf(500000.0f, -(float)(2 * i) / HD);
  c.inv_freq = hf ? copy_to(MSH_CUDA, hf) : NULL;
  c.pos = gpu_pos(0);
  int64_t qfs[2] = {1, NH * HD}, kfs[2] = {1, NKV * HD}, q3s[3] = {1, NH, HD}, k3s[3] = {1, NKV, HD};
  c.qf = gpu_new(MSH_F32, 2, qfs);
  c.kf = gpu_new(MSH_F32, 2, kfs);
  c.vf = gpu_new(MSH_F32, 2, kfs);
  c.att = gpu_new(MSH_F32, 3, q3s);
  c.o = gpu_new(MSH_F32, 2, xs);
  c.q3 = view(c.qf, 3, q3s);
  c.k3 = view(c.kf, 3, k3s);
  c.v3 = view(c.vf, 3, k3s);
  c.att2 = view(c.att, 2, qfs);
  /* the graph's cache and the eager one start equal */
  msh_tensor *kg = gpu_randn(MSH_BF16, 3, cs, 1.0f), *vg = gpu_randn(MSH_BF16, 3, cs, 1.0f);
  msh_tensor *ke = kg ? copy_to(MSH_CUDA, kg) : NULL, *ve = vg ? copy_to(MSH_CUDA, vg) : NULL;
  msh_tensor *yg = gpu_new(MSH_F32, 2, xs), *ye = gpu_new(MSH_F32, 2, xs);
  msh_tensor *need[] = {c.x, c.wq, c.wk, c.wv, c.wo, c.inv_freq, c.pos, c.qf, c.kf, c.vf, c.att, c.o,
                        c.q3, c.k3, c.v3, c.att2, kg, vg, ke, ve, yg, ye};
  int ready = 1;
  for (size_t i = 0; i < sizeof need / sizeof need[0]; i++) ready &= need[i] != NULL;
  msh_graph *g = NULL;
  if (ready) {
    /* one eager step first: it sizes the device scratch the captured one will use */
    set_pos(c.pos, 3);
    step(&c, kg, vg, yg, 1, 3);
    step(&c, ke, ve, ye, 0, 3);
    COMPARE("eager step with dyn ops at position 3 vs scalar ops", yg, ye, 1e-2);
    CHECK_OK(msh_graph_begin(MSH_CUDA, 0));
    step(&c, kg, vg, yg, 1, 0);
    CHECK_OK(msh_graph_end(MSH_CUDA, 0, &g));
  }
  static const int32_t at[] = {7, 2000, 4095, 1};
  for (int i = 0; i < 4 && g; i++) {
    if (i == 3) {
      /* grow the scratch past the block the graph was captured over: an eager matmul with
       * 16-bit weights converts its (4096, 4096) x into scratch */
      int64_t bx[2] = {4096, 4096}, bw[2] = {8, 4096}, bo[2] = {4096, 8};
      msh_tensor *x = gpu_randn(MSH_F32, 2, bx, 1.0f), *w = gpu_randn(MSH_BF16, 2, bw, 1.0f);
      msh_tensor *out = gpu_new(MSH_F32, 2, bo);
      if (x && w && out) CHECK_OK(msh_op_matmul(out, x, w));
      msh_tensor *ts[] = {x, w, out};
      free_all(ts, 3);
    }
    CHECK_OK(msh_tensor_randn(c.x, fresh_seed(), 0.0f, 1.0f)); /* a new token's activations */
    set_pos(c.pos, at[i]);
    poison(yg);
    CHECK_OK(msh_graph_launch(g));
    step(&c, ke, ve, ye, 0, at[i]);
    char what[128];
    snprintf(what, sizeof what, "graph replay at position %d vs eager ops%s", at[i],
             i == 3 ? " (after scratch growth)" : "");
    COMPARE(what, yg, ye, 1e-2);
    snprintf(what, sizeof what, "k cache after the replay at %d", at[i]);
    COMPARE_BITS(what, kg, ke);
    snprintf(what, sizeof what, "v cache after the replay at %d", at[i]);
    COMPARE_BITS(what, vg, ve);
  }
  CHECK(g != NULL);
  msh_graph_free(g);
  msh_tensor_free(hf);
  free_all(need, (int)(sizeof need / sizeof need[0]));
}

/* ------------------------------------------------------------------------------ misuse */

static void test_misuse(void) {
  printf("graph misuse\n");
  msh_graph *g = NULL;
  CHECK_STATUS(msh_graph_begin(MSH_CPU, 0), MSH_EUNSUPPORTED);
  CHECK_STATUS(msh_graph_end(MSH_CUDA, 0, &g), MSH_EINVAL);
  CHECK(strstr(msh_last_error(), "no graph") != NULL);
  CHECK_STATUS(msh_graph_begin(MSH_CUDA, 99), MSH_EINVAL);
  CHECK_STATUS(msh_graph_launch(NULL), MSH_EINVAL);
  CHECK_OK(msh_graph_begin(MSH_CUDA, 0));
  CHECK_STATUS(msh_graph_begin(MSH_CUDA, 0), MSH_EINVAL);
  CHECK(strstr(msh_last_error(), "already") != NULL);
  CHECK_OK(msh_graph_end(MSH_CUDA, 0, &g)); /* an empty graph */
  CHECK(g != NULL);
  if (g) CHECK_OK(msh_graph_launch(g));
  msh_graph_free(g);
  g = NULL;
  CHECK_STATUS(msh_graph_end(MSH_CUDA, 0, &g), MSH_EINVAL);
  CHECK_OK(msh_device_sync(MSH_CUDA, 0));
}

/* What waits for the device refuses during a capture, without breaking it: the ops around it are
 * recorded, and afterwards the stream runs ops and copies again. */
static void test_refused_in_capture(void) {
  printf("refused during a capture\n");
  int64_t n[2] = {4, 256};
  msh_tensor *a = gpu_randn(MSH_F32, 2, n, 1.0f), *b = gpu_new(MSH_F32, 2, n), *h = cpu_new(MSH_F32, 2, n);
  msh_tensor *spare = gpu_new(MSH_F32, 2, n), *fresh = NULL;
  int64_t bx[2] = {8192, 4096}, bw[2] = {8, 4096}, bo[2] = {8192, 8};
  msh_tensor *bigx = gpu_new(MSH_F32, 2, bx), *bigw = gpu_randn(MSH_BF16, 2, bw, 1.0f), *bigo = gpu_new(MSH_F32, 2, bo);
  msh_tensor *ca = a ? copy_to(MSH_CPU, a) : NULL, *want = cpu_new(MSH_F32, 2, n);
  msh_graph *g = NULL;
  int32_t idx[4];
  if (!(a && b && h && spare && bigx && bigw && bigo && ca && want)) goto done;
  CHECK_OK(msh_device_sync(MSH_CUDA, 0));
  CHECK_OK(msh_graph_begin(MSH_CUDA, 0));
  CHECK_OK(msh_op_add(b, a, a)); /* recorded, not run */
  CHECK_STATUS(msh_tensor_copy(h, a), MSH_EINVAL);
  CHECK(strstr(msh_last_error(), "captured") != NULL);
  CHECK_STATUS(msh_tensor_copy(a, h), MSH_EINVAL);
  CHECK_STATUS(msh_op_argmax(a, idx), MSH_EINVAL);
  CHECK_STATUS(msh_device_sync(MSH_CUDA, 0), MSH_EINVAL);
  CHECK_STATUS(msh_tensor_new(&fresh, MSH_F32, 2, n, MSH_CUDA, 0), MSH_EINVAL);
  CHECK(fresh == NULL);
  CHECK_STATUS(msh_op_matmul(bigo, bigx, bigw), MSH_EINVAL); /* 64 MiB of scratch */
  CHECK(strstr(msh_last_error(), "scratch") != NULL);
  msh_tensor_free(spare); /* freed at the end of the capture */
  spare = NULL;
  CHECK_OK(msh_op_scale(b, b, 0.5f)); /* recorded */
  CHECK_OK(msh_graph_end(MSH_CUDA, 0, &g));
  /* nothing ran yet: b still holds zeros */
  CHECK_OK(msh_tensor_copy(h, b));
  int zeros = 1;
  for (int64_t i = 0; i < msh_tensor_numel(h); i++) zeros &= ((float *)msh_tensor_data(h))[i] == 0.0f;
  CHECK(zeros);
  if (g) CHECK_OK(msh_graph_launch(g));
  COMPARE("replay of (a + a) * 0.5 recorded around refused calls", b, ca, 1e-6);
  /* the stream runs eager ops, downloads, argmax and allocations again */
  CHECK_OK(msh_op_scale(b, a, 3.0f));
  CHECK_OK(msh_op_scale(want, ca, 3.0f));
  COMPARE("eager op after the capture", b, want, 1e-6);
  CHECK_OK(msh_op_argmax(a, idx));
  CHECK_OK(msh_tensor_new(&fresh, MSH_F32, 2, n, MSH_CUDA, 0));
  CHECK_OK(msh_device_sync(MSH_CUDA, 0));
done:
  msh_graph_free(g);
  {
    msh_tensor *ts[] = {a, b, h, spare, fresh, bigx, bigw, bigo, ca, want};
    free_all(ts, 10);
  }
}

int main(void) {
  int count = 0;
  CHECK_OK(msh_device_count(MSH_CUDA, &count));
  if (count == 0) {
    printf("test_cuda_graph: no CUDA device, skipped\n");
    return 77;
  }
  test_misuse();
  test_attention_dyn();
  test_set_rows_dyn();
  test_graph_step();
  test_refused_in_capture();
  return check_done("test_cuda_graph");
}
