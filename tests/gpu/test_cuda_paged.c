/* test_cuda_paged.c: the paged KV cache on CUDA (msh_op_kv_write, msh_op_paged_attention)
 * against the CPU op on fresh random inputs: random non-contiguous block tables with shared
 * blocks and junk past each context (ids outside the pool, which neither op may read), ragged
 * rows (decodes alone: the split-KV form; prompt chunks at non-zero positions mixed in: the
 * per-row form; sequences with no new row, also where the rows still equal the sequences), GQA
 * and MQA, f32/f16/bf16 pools, head dims 64, 128 and 80, outputs prefilled with NaN; B = 1 over
 * a long planned context with 1-token and span-edge contexts (splits left empty), hundreds of
 * sequences, more query rows than a grid's y dimension holds (65535); a larger planned max_ctx
 * gives the same; arrays with bad values on the device (contexts past max_ctx, below their rows,
 * negative; block ids outside the pool within reach) give the CPU op's result on the arrays
 * clamped as documented, and garbage q_start still writes every row finite; pools of more than
 * 2^31 elements (a 4.6 GB bf16 pool per side) written and read at blocks past that offset;
 * kv_write's rows (k and v of different dtypes, a strided source), padding slots and slots past
 * the pool (nothing written on the device); and a captured graph replayed after the arrays
 * change (contexts grow, tables change) matches the CPU at every replay. */
#include "check.h"
#include "gpu_helpers.h"

#include <string.h>

static uint64_t rng = 0x2545f4914f6cdd1dull;
static uint32_t rnd(uint32_t n) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return (uint32_t)(rng % n);
}

static msh_tensor *i32_cpu(int ndim, const int64_t *shape, const int32_t *vals) {
  msh_tensor *t = cpu_new(MSH_I32, ndim, shape);
  if (t) memcpy(msh_tensor_data(t), vals, sizeof(int32_t) * (size_t)msh_tensor_numel(t));
  return t;
}

static msh_tensor *gpu_poisoned(int ndim, const int64_t *shape) {
  msh_tensor *h = cpu_new(MSH_F32, ndim, shape);
  if (!h) return NULL;
  float *p = msh_tensor_data(h);
  for (int64_t i = 0; i < msh_tensor_numel(h); i++) p[i] = NAN;
  msh_tensor *g = to_gpu(h);
  msh_tensor_free(h);
  return g;
}

/* Junk for table entries no context reaches: ids outside the pool (never read by either op). */
static int32_t junk(int64_t NB) {
  const int32_t j[4] = {-1, (int32_t)NB, INT32_MAX, INT32_MIN};
  return j[rnd(4)];
}

/* Tables: each entry a context reaches a random block (some shared across sequences), junk after. */
static void fill_tables(int32_t *bt, int64_t B, int64_t MB, int64_t NB, int64_t BS, const int32_t *ctx) {
  for (int64_t b = 0; b < B; b++)
    for (int64_t j = 0; j < MB; j++) bt[b * MB + j] = j < (ctx[b] + BS - 1) / BS ? (int32_t)rnd((uint32_t)NB) : junk(NB);
}

typedef struct {
  int dt;
  int64_t NB, BS, H, KVH, hd, B;
  int decode; /* 1: every sequence one new row; 0: 1 to max_new; -1: 0 to 2; -2: 0 and 2 in turn (R = B) */
  int64_t max_ctx;
  int max_new;     /* 0: 12 */
  int32_t ctx_fix; /* > 0: every context this long (at least its rows) */
} paged_case;

static void run_case(const paged_case *c) {
  int32_t *qs = malloc(sizeof(int32_t) * (size_t)(c->B + 1)), *ctx = malloc(sizeof(int32_t) * (size_t)c->B);
  int64_t R = 0, MB = (c->max_ctx + c->BS - 1) / c->BS;
  int max_new = c->max_new ? c->max_new : 12;
  qs[0] = 0;
  for (int64_t b = 0; b < c->B; b++) {
    int32_t n = c->decode > 0 ? 1 : c->decode == -1 ? (int32_t)rnd(3) : c->decode == -2 ? 2 * (int32_t)(b % 2)
                                                                                       : 1 + (int32_t)rnd((uint32_t)max_new);
    ctx[b] = n + (int32_t)rnd((uint32_t)(c->max_ctx - n + 1));
    if (c->ctx_fix > 0) ctx[b] = c->ctx_fix < n ? n : c->ctx_fix;
    R += n;
    qs[b + 1] = (int32_t)R;
  }
  if (R == 0) { /* no rows at all: give the last sequence one */
    qs[c->B] = 1;
    R = 1;
    if (ctx[c->B - 1] < 1) ctx[c->B - 1] = 1;
  }
  int32_t *bt = malloc(sizeof(int32_t) * (size_t)(c->B * MB));
  fill_tables(bt, c->B, MB, c->NB, c->BS, ctx);
  int64_t pshape[4] = {c->NB, c->BS, c->KVH, c->hd}, qshape[3] = {R, c->H, c->hd};
  int64_t s1[1] = {c->B + 1}, s2[1] = {c->B}, s3[2] = {c->B, MB};
  msh_tensor *kc = cpu_randn(c->dt, 4, pshape, 1.0f), *vc = cpu_randn(c->dt, 4, pshape, 1.0f);
  msh_tensor *qc = cpu_randn(MSH_F32, 3, qshape, 1.0f), *oc = cpu_new(MSH_F32, 3, qshape);
  msh_tensor *tq = i32_cpu(1, s1, qs), *tc = i32_cpu(1, s2, ctx), *tb = i32_cpu(2, s3, bt);
  msh_tensor *kg = to_gpu(kc), *vg = to_gpu(vc), *qg = to_gpu(qc), *og = gpu_poisoned(3, qshape);
  msh_tensor *tqg = to_gpu(tq), *tcg = to_gpu(tc), *tbg = to_gpu(tb);
  float scale = 1.0f / sqrtf((float)c->hd);
  CHECK_OK(msh_op_paged_attention(oc, qc, kc, vc, tq, tc, tb, c->max_ctx, scale));
  CHECK_OK(msh_op_paged_attention(og, qg, kg, vg, tqg, tcg, tbg, c->max_ctx, scale));
  double tol = attn_tol(c->dt);
  char what[128];
  snprintf(what, sizeof what, "paged %s: %s B %lld R %lld H %lld/%lld hd %lld max_ctx %lld",
           c->decode > 0 ? "decode" : c->decode < 0 ? "some empty" : "chunks", msh_dtype_name(c->dt), (long long)c->B,
           (long long)R, (long long)c->H, (long long)c->KVH, (long long)c->hd, (long long)c->max_ctx);
  COMPARE(what, og, oc, tol);
  /* a larger planned bound (more splits planned, the same result) */
  if (MB * c->BS > c->max_ctx) {
    msh_tensor *o2 = gpu_poisoned(3, qshape);
    CHECK_OK(msh_op_paged_attention(o2, qg, kg, vg, tqg, tcg, tbg, MB * c->BS, scale));
    COMPARE("paged, larger max_ctx", o2, oc, tol);
    msh_tensor_free(o2);
  }
  msh_tensor *all[] = {kc, vc, qc, oc, tq, tc, tb, kg, vg, qg, og, tqg, tcg, tbg};
  free_all(all, 14);
  free(bt);
  free(qs);
  free(ctx);
}

static void test_attention(void) {
  const int dts[3] = {MSH_F32, MSH_F16, MSH_BF16};
  for (int i = 0; i < 3; i++) {
    paged_case a = {dts[i], 300, 16, 32, 8, 128, 16, 1, 1000, 0, 0}; /* Llama-3-shaped decodes, long contexts */
    run_case(&a);
    paged_case b = {dts[i], 300, 16, 32, 8, 128, 6, 0, 200, 0, 0}; /* chunks and decodes mixed */
    run_case(&b);
    paged_case c = {dts[i], 64, 8, 12, 1, 64, 5, 0, 100, 0, 0}; /* MQA, hd 64 */
    run_case(&c);
    paged_case d = {dts[i], 64, 4, 4, 2, 80, 3, 1, 37, 0, 0}; /* hd 80, one split */
    run_case(&d);
  }
  /* B = 1 over a long planned context: 32 splits of 128 keys, all but the first few empty */
  const int32_t edges[6] = {1, 2, 127, 128, 129, 4096};
  for (int i = 0; i < 6; i++) {
    paged_case e = {MSH_BF16, 300, 16, 8, 2, 128, 1, 1, 4096, 0, edges[i]};
    run_case(&e);
  }
  paged_case f = {MSH_F16, 64, 16, 4, 4, 64, 7, 1, 300, 0, 1}; /* every context 1 token */
  run_case(&f);
  /* hundreds of sequences: one split (the rows fill the GPU), and MQA decodes that still split */
  paged_case g = {MSH_BF16, 2000, 16, 32, 8, 128, 300, 1, 512, 0, 0};
  run_case(&g);
  paged_case h = {MSH_F16, 500, 16, 16, 1, 64, 40, 1, 2048, 0, 0};
  run_case(&h);
  paged_case m = {MSH_BF16, 2000, 16, 32, 8, 128, 300, 0, 512, 0, 0};
  run_case(&m);
  /* sequences with no new row: mixed, and where the rows happen to equal the sequences */
  for (int i = 0; i < 3; i++) {
    paged_case e = {dts[i], 100, 8, 8, 2, 64, 24, -1, 300, 0, 0};
    run_case(&e);
    paged_case z = {dts[i], 100, 8, 8, 2, 64, 10, -2, 600, 0, 0}; /* the split form over 2-row sequences */
    run_case(&z);
  }
}

/* More query rows than 65535 (the grid's y and z limit): 1000 chunks of 70 rows. */
static void test_many_rows(void) {
  const paged_case c = {MSH_F16, 512, 16, 2, 1, 32, 1000, 0, 128, 70, 0};
  int64_t B = c.B, MB = (c.max_ctx + c.BS - 1) / c.BS, R = 70 * B;
  int32_t *qs = malloc(sizeof(int32_t) * (size_t)(B + 1)), *ctx = malloc(sizeof(int32_t) * (size_t)B);
  int32_t *bt = malloc(sizeof(int32_t) * (size_t)(B * MB));
  qs[0] = 0;
  for (int64_t b = 0; b < B; b++) {
    qs[b + 1] = (int32_t)(70 * (b + 1));
    ctx[b] = 70 + (int32_t)rnd(59);
  }
  fill_tables(bt, B, MB, c.NB, c.BS, ctx);
  int64_t pshape[4] = {c.NB, c.BS, c.KVH, c.hd}, qshape[3] = {R, c.H, c.hd};
  int64_t s1[1] = {B + 1}, s2[1] = {B}, s3[2] = {B, MB};
  msh_tensor *kc = cpu_randn(c.dt, 4, pshape, 1.0f), *vc = cpu_randn(c.dt, 4, pshape, 1.0f);
  msh_tensor *qc = cpu_randn(MSH_F32, 3, qshape, 1.0f), *oc = cpu_new(MSH_F32, 3, qshape);
  msh_tensor *tq = i32_cpu(1, s1, qs), *tc = i32_cpu(1, s2, ctx), *tb = i32_cpu(2, s3, bt);
  msh_tensor *kg = to_gpu(kc), *vg = to_gpu(vc), *qg = to_gpu(qc), *og = gpu_poisoned(3, qshape);
  msh_tensor *tqg = to_gpu(tq), *tcg = to_gpu(tc), *tbg = to_gpu(tb);
  CHECK_OK(msh_op_paged_attention(oc, qc, kc, vc, tq, tc, tb, c.max_ctx, 0.17f));
  CHECK_OK(msh_op_paged_attention(og, qg, kg, vg, tqg, tcg, tbg, c.max_ctx, 0.17f));
  COMPARE("paged chunks, 70000 query rows", og, oc, attn_tol(c.dt));
  msh_tensor *all[] = {kc, vc, qc, oc, tq, tc, tb, kg, vg, qg, og, tqg, tcg, tbg};
  free_all(all, 14);
  free(qs);
  free(ctx);
  free(bt);
}

/* Arrays the host never checked: the device clamps a context into [n_new, max_ctx] and a block id
 * into [0, NB), so the result is the CPU op's over the arrays clamped so; q_start garbage reads
 * nothing out of bounds and still writes every row. */
static void test_bad_arrays(int decode) {
  /* decodes: 3 splits of 128 keys; MB x BS = 320 */
  int64_t NB = 50, BS = 8, H = 8, KVH = 2, hd = 64, B = 6, max_ctx = 300, MB = 40;
  int32_t qs[7], ctx[6], bad_ctx[6], bt[6 * 40], bad_bt[6 * 40];
  int64_t R = 0;
  qs[0] = 0;
  for (int b = 0; b < B; b++) {
    int32_t n = decode ? 1 : 1 + (int32_t)rnd(5);
    R += n;
    qs[b + 1] = (int32_t)R;
  }
  /* contexts past max_ctx, below their rows, negative, huge; a valid one; a valid one with bad ids */
  const int32_t raw[6] = {(int32_t)max_ctx + 50, 0, -3, INT32_MAX, 137, 290};
  for (int b = 0; b < B; b++) {
    int32_t n = qs[b + 1] - qs[b];
    bad_ctx[b] = raw[b];
    ctx[b] = raw[b] < n ? n : raw[b] > max_ctx ? (int32_t)max_ctx : raw[b];
  }
  for (int i = 0; i < B * MB; i++) bt[i] = (int32_t)rnd((uint32_t)NB);
  memcpy(bad_bt, bt, sizeof bt);
  /* ids outside the pool within reach of sequences 0 and 5, clamped to the pool's ends */
  const int32_t ids[4] = {-7, (int32_t)NB + 5, INT32_MIN, INT32_MAX};
  for (int i = 0; i < 4; i++) {
    bad_bt[0 * MB + 2 * i] = ids[i];
    bt[0 * MB + 2 * i] = ids[i] < 0 ? 0 : (int32_t)NB - 1;
    bad_bt[5 * MB + 3 * i] = ids[i];
    bt[5 * MB + 3 * i] = ids[i] < 0 ? 0 : (int32_t)NB - 1;
  }
  int64_t pshape[4] = {NB, BS, KVH, hd}, qshape[3] = {R, H, hd}, s1[1] = {B + 1}, s2[1] = {B}, s3[2] = {B, MB};
  msh_tensor *kc = cpu_randn(MSH_BF16, 4, pshape, 1.0f), *vc = cpu_randn(MSH_BF16, 4, pshape, 1.0f);
  msh_tensor *qc = cpu_randn(MSH_F32, 3, qshape, 1.0f), *oc = cpu_new(MSH_F32, 3, qshape);
  msh_tensor *tq = i32_cpu(1, s1, qs), *tc = i32_cpu(1, s2, ctx), *tb = i32_cpu(2, s3, bt);
  msh_tensor *tcb = i32_cpu(1, s2, bad_ctx), *tbb = i32_cpu(2, s3, bad_bt);
  msh_tensor *kg = to_gpu(kc), *vg = to_gpu(vc), *qg = to_gpu(qc), *og = gpu_poisoned(3, qshape);
  msh_tensor *tqg = to_gpu(tq), *tcg = to_gpu(tcb), *tbg = to_gpu(tbb);
  /* the CPU refuses the bad arrays and computes the clamped ones */
  CHECK_STATUS(msh_op_paged_attention(oc, qc, kc, vc, tq, tcb, tb, max_ctx, 0.125f), MSH_ERANGE);
  CHECK_STATUS(msh_op_paged_attention(oc, qc, kc, vc, tq, tc, tbb, max_ctx, 0.125f), MSH_ERANGE);
  CHECK_OK(msh_op_paged_attention(oc, qc, kc, vc, tq, tc, tb, max_ctx, 0.125f));
  CHECK_OK(msh_op_paged_attention(og, qg, kg, vg, tqg, tcg, tbg, max_ctx, 0.125f));
  CHECK_OK(msh_device_sync(MSH_CUDA, 0));
  COMPARE(decode ? "paged decode, arrays clamped on the device" : "paged chunks, arrays clamped on the device", og, oc,
          attn_tol(MSH_BF16));
  /* q_start garbage: not a result to compare, but nothing out of bounds and every row written */
  int32_t bad_qs[7] = {5, -100, INT32_MAX, 3, INT32_MIN, 2, -1};
  msh_tensor *tqb = i32_cpu(1, s1, bad_qs), *tqbg = to_gpu(tqb), *o2 = gpu_poisoned(3, qshape);
  CHECK_OK(msh_op_paged_attention(o2, qg, kg, vg, tqbg, tcg, tbg, max_ctx, 0.125f));
  CHECK_OK(msh_device_sync(MSH_CUDA, 0));
  msh_tensor *o2c = to_cpu(o2);
  if (o2c) {
    const float *p = msh_tensor_data(o2c);
    int64_t nonfinite = 0;
    for (int64_t i = 0; i < msh_tensor_numel(o2c); i++) nonfinite += !isfinite(p[i]);
    CHECK(nonfinite == 0);
  }
  msh_tensor *all[] = {kc, vc, qc, oc, tq, tc, tb, tcb, tbb, kg, vg, qg, og, tqg, tcg, tbg, tqb, tqbg, o2, o2c};
  free_all(all, 20);
}

/* Pools of more than 2^31 elements: NB = 140000 blocks of 16 x 8 x 128 (2.29e9 elements, 4.6 GB
 * a pool in bf16), rows written to and attention read from blocks past element 2^31 (byte 2^32),
 * against the CPU op over a small pool holding the same blocks under other ids. */
static void test_large_pool(void) {
  int64_t NB = 140000, BS = 16, KVH = 8, hd = 128, H = 32, B = 3, MB = 5, max_ctx = 80;
  uint64_t need = 2ull * (uint64_t)NB * BS * KVH * hd * 2 + (1ull << 30), fr = 0, tot = 0;
  CHECK_OK(msh_device_mem_info(MSH_CUDA, 0, &fr, &tot));
  if (fr < need) {
    printf("  large pool: %llu bytes free, %llu needed: skipped\n", (unsigned long long)fr, (unsigned long long)need);
    return;
  }
  int64_t gshape[4] = {NB, BS, KVH, hd}, cshape[4] = {B * MB, BS, KVH, hd};
  msh_tensor *kg = gpu_new(MSH_BF16, 4, gshape), *vg = gpu_new(MSH_BF16, 4, gshape);
  msh_tensor *kc = cpu_new(MSH_BF16, 4, cshape), *vc = cpu_new(MSH_BF16, 4, cshape);
  int32_t ctx[3] = {80, 1, 49}, gbt[15], cbt[15], qs[4] = {0, 1, 2, 3};
  for (int b = 0; b < B; b++)
    for (int j = 0; j < MB; j++) {
      cbt[b * MB + j] = b * (int32_t)MB + j;
      gbt[b * MB + j] = (int32_t)NB - 1 - 3 * (b * (int32_t)MB + j); /* all past 131072 = 2^31 / (16 x 8 x 128) */
    }
  /* every row of every context, written by kv_write on both sides */
  int64_t rows = 0;
  for (int b = 0; b < B; b++) rows += ctx[b];
  int32_t *cs = malloc(sizeof(int32_t) * (size_t)rows), *gs = malloc(sizeof(int32_t) * (size_t)rows);
  int64_t r = 0;
  for (int b = 0; b < B; b++)
    for (int p = 0; p < ctx[b]; p++, r++) {
      cs[r] = cbt[b * MB + p / BS] * (int32_t)BS + p % (int32_t)BS;
      gs[r] = gbt[b * MB + p / BS] * (int32_t)BS + p % (int32_t)BS;
    }
  int64_t rshape[3] = {rows, KVH, hd}, sshape[1] = {rows};
  msh_tensor *k = cpu_randn(MSH_F32, 3, rshape, 1.0f), *v = cpu_randn(MSH_F32, 3, rshape, 1.0f);
  msh_tensor *kd = to_gpu(k), *vd = to_gpu(v), *tcs = i32_cpu(1, sshape, cs), *tgs0 = i32_cpu(1, sshape, gs);
  msh_tensor *tgs = to_gpu(tgs0);
  CHECK_OK(msh_op_kv_write(kc, vc, k, v, tcs));
  CHECK_OK(msh_op_kv_write(kg, vg, kd, vd, tgs));
  /* the bytes of the highest block and of one a sequence's middle */
  const int check[3] = {0, 4, 2 * (int)MB + 2}; /* blocks every row of which a context holds */
  for (int i = 0; i < 3; i++) {
    msh_tensor *gb = NULL, *cb = NULL;
    CHECK_OK(msh_tensor_narrow(&gb, vg, 0, gbt[check[i]], 1));
    CHECK_OK(msh_tensor_narrow(&cb, vc, 0, cbt[check[i]], 1));
    msh_tensor *back = gb ? to_cpu(gb) : NULL;
    CHECK(back && cb && !memcmp(msh_tensor_data(back), msh_tensor_data(cb), (size_t)(BS * KVH * hd * 2)));
    msh_tensor *three[] = {gb, cb, back};
    free_all(three, 3);
  }
  int64_t qshape[3] = {B, H, hd}, s1[1] = {B + 1}, s2[1] = {B}, s3[2] = {B, MB};
  msh_tensor *q = cpu_randn(MSH_F32, 3, qshape, 1.0f), *oc = cpu_new(MSH_F32, 3, qshape);
  msh_tensor *tq = i32_cpu(1, s1, qs), *tc = i32_cpu(1, s2, ctx), *tcb = i32_cpu(2, s3, cbt), *tgb = i32_cpu(2, s3, gbt);
  msh_tensor *qg = to_gpu(q), *og = gpu_poisoned(3, qshape), *tqg = to_gpu(tq), *tcg = to_gpu(tc), *tgbg = to_gpu(tgb);
  CHECK_OK(msh_op_paged_attention(oc, q, kc, vc, tq, tc, tcb, max_ctx, 0.088f));
  CHECK_OK(msh_op_paged_attention(og, qg, kg, vg, tqg, tcg, tgbg, max_ctx, 0.088f));
  COMPARE("paged decode over a pool of 2.29e9 elements", og, oc, attn_tol(MSH_BF16));
  msh_tensor *all[] = {kg, vg, kc, vc, k, v, kd, vd, tcs, tgs0, tgs, q, oc, tq, tc, tcb, tgb, qg, og, tqg, tcg, tgbg};
  free_all(all, 22);
  free(cs);
  free(gs);
}

static void test_kv_write(void) {
  const int dts[3] = {MSH_F32, MSH_F16, MSH_BF16};
  for (int i = 0; i < 3; i++) {
    int64_t pshape[4] = {10, 4, 2, 64}, rshape[3] = {5, 2, 64}, sshape[1] = {5};
    msh_tensor *kc = cpu_randn(dts[i], 4, pshape, 1.0f), *vc = cpu_randn(dts[i], 4, pshape, 1.0f);
    msh_tensor *kg = to_gpu(kc), *vg = to_gpu(vc);
    msh_tensor *k = cpu_randn(MSH_F32, 3, rshape, 1.0f), *v = cpu_randn(MSH_F32, 3, rshape, 1.0f);
    msh_tensor *kdg = to_gpu(k), *vdg = to_gpu(v);
    int32_t slots[5] = {39, -1, 0, 17, 6};
    msh_tensor *ts = i32_cpu(1, sshape, slots), *tsg = to_gpu(ts);
    CHECK_OK(msh_op_kv_write(kc, vc, k, v, ts));
    CHECK_OK(msh_op_kv_write(kg, vg, kdg, vdg, tsg));
    msh_tensor *kb = to_cpu(kg), *vb = to_cpu(vg);
    size_t bytes = (size_t)msh_tensor_numel(kc) * msh_dtype_size(dts[i]);
    CHECK(!memcmp(msh_tensor_data(kb), msh_tensor_data(kc), bytes));
    CHECK(!memcmp(msh_tensor_data(vb), msh_tensor_data(vc), bytes));
    /* a slot past the pool writes nothing on the device */
    int32_t far[5] = {40, 1000, -5, 41, 1 << 30};
    msh_tensor *tf = i32_cpu(1, sshape, far), *tfg = to_gpu(tf);
    CHECK_OK(msh_op_kv_write(kg, vg, kdg, vdg, tfg));
    msh_tensor *kb2 = to_cpu(kg);
    CHECK(!memcmp(msh_tensor_data(kb2), msh_tensor_data(kc), bytes));
    msh_tensor *all[] = {kc, vc, kg, vg, k, v, kdg, vdg, ts, tsg, kb, vb, tf, tfg, kb2};
    free_all(all, 15);
  }
}

/* k and v of different dtypes (each read as its own), k a strided view (rows 3 x KVH x hd apart). */
static void test_kv_write_mixed(void) {
  const int dts[3] = {MSH_F32, MSH_F16, MSH_BF16};
  for (int i = 0; i < 3; i++) {
    int kdt = dts[(i + 1) % 3], vdt = dts[(i + 2) % 3];
    int64_t pshape[4] = {16, 8, 4, 80}, wide[3] = {37, 12, 80}, rshape[3] = {37, 4, 80}, sshape[1] = {37};
    msh_tensor *kc = cpu_randn(dts[i], 4, pshape, 1.0f), *vc = cpu_randn(dts[i], 4, pshape, 1.0f);
    msh_tensor *kg = to_gpu(kc), *vg = to_gpu(vc);
    msh_tensor *kw = cpu_randn(kdt, 3, wide, 1.0f), *v = cpu_randn(vdt, 3, rshape, 1.0f), *k = NULL;
    CHECK_OK(msh_tensor_narrow(&k, kw, 1, 4, 4)); /* heads 4 .. 7 of 12: rows 960 elements apart */
    msh_tensor *kwg = to_gpu(kw), *vdg = to_gpu(v), *kdg = NULL;
    CHECK_OK(msh_tensor_narrow(&kdg, kwg, 1, 4, 4));
    int32_t slots[37];
    for (int r = 0; r < 37; r++) slots[r] = r % 9 == 4 ? -1 : (int32_t)(3 * r + 5); /* distinct, some padding */
    msh_tensor *ts = i32_cpu(1, sshape, slots), *tsg = to_gpu(ts);
    CHECK_OK(msh_op_kv_write(kc, vc, k, v, ts));
    CHECK_OK(msh_op_kv_write(kg, vg, kdg, vdg, tsg));
    msh_tensor *kb = to_cpu(kg), *vb = to_cpu(vg);
    size_t bytes = (size_t)msh_tensor_numel(kc) * msh_dtype_size(dts[i]);
    CHECK(kb && !memcmp(msh_tensor_data(kb), msh_tensor_data(kc), bytes));
    CHECK(vb && !memcmp(msh_tensor_data(vb), msh_tensor_data(vc), bytes));
    msh_tensor *all[] = {kc, vc, kg, vg, kw, v, k, kwg, vdg, kdg, ts, tsg, kb, vb};
    free_all(all, 14);
  }
}

/* One graph of a decode step of B sequences, replayed as contexts grow and tables change. */
static void test_graph(void) {
  int64_t NB = 128, BS = 16, H = 8, KVH = 2, hd = 64, B = 4, MB = 16, max_ctx = 256;
  int64_t pshape[4] = {NB, BS, KVH, hd}, qshape[3] = {B, H, hd}, s1[1] = {B + 1}, s2[1] = {B}, s3[2] = {B, MB};
  msh_tensor *kc = cpu_randn(MSH_BF16, 4, pshape, 1.0f), *vc = cpu_randn(MSH_BF16, 4, pshape, 1.0f);
  msh_tensor *qc = cpu_randn(MSH_F32, 3, qshape, 1.0f), *oc = cpu_new(MSH_F32, 3, qshape);
  int32_t qs[5] = {0, 1, 2, 3, 4}, ctx[4] = {1, 30, 100, 7}, bt[64];
  fill_tables(bt, B, MB, NB, BS, (int32_t[4]){256, 256, 256, 256});
  for (int b = 0; b < 4; b++) bt[b * MB + MB - 1] = junk(NB); /* past every context below 241 */
  msh_tensor *tq = i32_cpu(1, s1, qs), *tc = i32_cpu(1, s2, ctx), *tb = i32_cpu(2, s3, bt);
  msh_tensor *kg = to_gpu(kc), *vg = to_gpu(vc), *qg = to_gpu(qc), *og = gpu_poisoned(3, qshape);
  msh_tensor *tqg = to_gpu(tq), *tcg = to_gpu(tc), *tbg = to_gpu(tb);
  CHECK_OK(msh_op_paged_attention(og, qg, kg, vg, tqg, tcg, tbg, max_ctx, 0.125f)); /* sizes the scratch */
  msh_graph *g = NULL;
  CHECK_OK(msh_graph_begin(MSH_CUDA, 0));
  msh_status s = msh_op_paged_attention(og, qg, kg, vg, tqg, tcg, tbg, max_ctx, 0.125f);
  CHECK_OK(msh_graph_end(MSH_CUDA, 0, &g));
  CHECK_OK(s);
  for (int step = 0; step < 4 && g; step++) {
    int32_t *pc = msh_tensor_data(tc), *pb = msh_tensor_data(tb);
    for (int b = 0; b < 4; b++) pc[b] = 1 + (int32_t)rnd(240);
    pb[rnd(4) * MB + rnd(15)] = (int32_t)rnd((uint32_t)NB);
    CHECK_OK(msh_tensor_copy(tcg, tc));
    CHECK_OK(msh_tensor_copy(tbg, tb));
    CHECK_OK(msh_graph_launch(g));
    CHECK_OK(msh_op_paged_attention(oc, qc, kc, vc, tq, tc, tb, max_ctx, 0.125f));
    COMPARE("paged decode graph replay", og, oc, attn_tol(MSH_BF16));
  }
  msh_graph_free(g);
  msh_tensor *all[] = {kc, vc, qc, oc, tq, tc, tb, kg, vg, qg, og, tqg, tcg, tbg};
  free_all(all, 14);
}

int main(void) {
  int count = 0;
  CHECK_OK(msh_device_count(MSH_CUDA, &count));
  if (count == 0) {
    printf("test_cuda_paged: no CUDA device, skipped\n");
    return 77;
  }
  test_attention();
  test_many_rows();
  test_bad_arrays(1);
  test_bad_arrays(0);
  test_large_pool();
  test_kv_write();
  test_kv_write_mixed();
  test_graph();
  return check_done("test_cuda_paged");
}
