/* test_cuda_paged.c: the paged KV cache on CUDA (msh_op_kv_write, msh_op_paged_attention)
 * against the CPU op on fresh random inputs: random non-contiguous block tables with shared
 * blocks, ragged rows (decodes alone: the split-KV form; prompt chunks at non-zero positions
 * mixed in: the per-row form), GQA and MQA, f32/f16/bf16 pools, head dims 64, 128 and 80, outputs
 * prefilled with NaN; a larger planned max_ctx gives the same; kv_write's rows, padding slots and
 * slots past the pool (nothing written on the device); and a captured graph replayed after the
 * arrays change (contexts grow, tables change) matches the CPU at every replay. */
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

/* Tables: each entry a context reaches a random block (some shared across sequences). */
static void fill_tables(int32_t *bt, int64_t B, int64_t MB, int64_t NB, int64_t BS, const int32_t *ctx) {
  for (int64_t b = 0; b < B; b++)
    for (int64_t j = 0; j < MB; j++) bt[b * MB + j] = j < (ctx[b] + BS - 1) / BS ? (int32_t)rnd((uint32_t)NB) : 0;
}

typedef struct {
  int dt;
  int64_t NB, BS, H, KVH, hd, B;
  int decode; /* every sequence one new row */
  int64_t max_ctx;
} paged_case;

static void run_case(const paged_case *c) {
  int32_t qs[65], ctx[64];
  int64_t R = 0, MB = (c->max_ctx + c->BS - 1) / c->BS;
  qs[0] = 0;
  for (int64_t b = 0; b < c->B; b++) {
    int32_t n = c->decode ? 1 : 1 + (int32_t)rnd(12);
    ctx[b] = n + (int32_t)rnd((uint32_t)(c->max_ctx - n + 1));
    R += n;
    qs[b + 1] = (int32_t)R;
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
  double tol = c->dt == MSH_F32 ? 1e-4 : 2e-3;
  COMPARE(c->decode ? "paged decode" : "paged chunks", og, oc, tol);
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
}

static void test_attention(void) {
  const int dts[3] = {MSH_F32, MSH_F16, MSH_BF16};
  for (int i = 0; i < 3; i++) {
    paged_case a = {dts[i], 300, 16, 32, 8, 128, 16, 1, 1000}; /* Llama-3-shaped decodes, long contexts */
    run_case(&a);
    paged_case b = {dts[i], 300, 16, 32, 8, 128, 6, 0, 200}; /* chunks and decodes mixed */
    run_case(&b);
    paged_case c = {dts[i], 64, 8, 12, 1, 64, 5, 0, 100}; /* MQA, hd 64 */
    run_case(&c);
    paged_case d = {dts[i], 64, 4, 4, 2, 80, 3, 1, 37}; /* hd 80, one split */
    run_case(&d);
  }
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

/* One graph of a decode step of B sequences, replayed as contexts grow and tables change. */
static void test_graph(void) {
  int64_t NB = 128, BS = 16, H = 8, KVH = 2, hd = 64, B = 4, MB = 16, max_ctx = 256;
  int64_t pshape[4] = {NB, BS, KVH, hd}, qshape[3] = {B, H, hd}, s1[1] = {B + 1}, s2[1] = {B}, s3[2] = {B, MB};
  msh_tensor *kc = cpu_randn(MSH_BF16, 4, pshape, 1.0f), *vc = cpu_randn(MSH_BF16, 4, pshape, 1.0f);
  msh_tensor *qc = cpu_randn(MSH_F32, 3, qshape, 1.0f), *oc = cpu_new(MSH_F32, 3, qshape);
  int32_t qs[5] = {0, 1, 2, 3, 4}, ctx[4] = {1, 30, 100, 7}, bt[64];
  fill_tables(bt, B, MB, NB, BS, (int32_t[4]){256, 256, 256, 256});
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
    for (int b = 0; b < 4; b++) pc[b] = 1 + (int32_t)rnd(256);
    pb[rnd(64)] = (int32_t)rnd((uint32_t)NB);
    CHECK_OK(msh_tensor_copy(tcg, tc));
    CHECK_OK(msh_tensor_copy(tbg, tb));
    CHECK_OK(msh_graph_launch(g));
    CHECK_OK(msh_op_paged_attention(oc, qc, kc, vc, tq, tc, tb, max_ctx, 0.125f));
    COMPARE("paged decode graph replay", og, oc, 2e-3);
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
  test_kv_write();
  test_graph();
  return check_done("test_cuda_paged");
}
