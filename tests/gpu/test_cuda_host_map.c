/* test_cuda_host_map.c: device-mapped host memory (msh_tensor_map_host), the KV cache of
 * --kv-offload. A pinned host tensor mapped to the GPU is a CUDA operand whose bytes stay on the
 * host: copies to and from it (either side, views included) move the right bytes; kv_write into
 * mapped pools leaves in the host memory itself exactly the CPU op's bytes; paged attention and
 * batched attention over mapped caches match the CPU op on fresh random inputs (f32/f16/bf16,
 * GQA); a captured graph of a decode step (kv_write then paged attention) over mapped pools,
 * replayed as slots and contexts change, matches the CPU at every replay; the host memory outlives
 * the host handle while a mapped view holds it; ordinary memory and device tensors are refused.
 * Also: prompt chunks through the paged kernel's per-row form and a 16-query chunk through the
 * flash prefill kernel over mapped caches; an embedding whose ids are mapped reads the bad id
 * back from host memory for its error. */
#include "check.h"
#include "gpu_helpers.h"

#include <string.h>

static uint64_t rng = 0x9d2c5680ull;
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

static size_t nbytes(const msh_tensor *t) { return (size_t)msh_tensor_numel(t) * msh_dtype_size(msh_tensor_dtype(t)); }

/* A pinned host copy of src (*host) and its mapping on cuda:0 (returned). */
static msh_tensor *mapped_copy(const msh_tensor *src, msh_tensor **host) {
  int64_t shape[MSH_MAX_DIMS];
  int nd = msh_tensor_ndim(src);
  for (int i = 0; i < nd; i++) shape[i] = msh_tensor_dim(src, i);
  *host = NULL;
  CHECK_OK(msh_tensor_new_pinned(host, msh_tensor_dtype(src), nd, shape));
  if (!*host) return NULL;
  CHECK(msh_tensor_is_pinned(*host));
  memcpy(msh_tensor_data(*host), msh_tensor_data(src), nbytes(src));
  msh_tensor *m = NULL;
  CHECK_OK(msh_tensor_map_host(&m, *host, MSH_CUDA, 0));
  if (m) {
    CHECK(msh_tensor_device(m) == MSH_CUDA && msh_tensor_device_index(m) == 0);
    CHECK(msh_tensor_is_host_mapped(m) && !msh_tensor_is_host_mapped(*host));
  }
  return m;
}

static void test_copies_and_lifetime(void) {
  int64_t shape[2] = {37, 129};
  msh_tensor *a = cpu_randn(MSH_F32, 2, shape, 1.0f), *host = NULL;
  msh_tensor *m = mapped_copy(a, &host);
  /* mapped -> host, mapped -> device, device -> mapped */
  msh_tensor *back = to_cpu(m), *dev = to_gpu(m);
  CHECK(back && !memcmp(msh_tensor_data(back), msh_tensor_data(a), nbytes(a)));
  msh_tensor *b = cpu_randn(MSH_F32, 2, shape, 1.0f), *bg = to_gpu(b);
  CHECK_OK(msh_tensor_copy(m, bg));
  CHECK_OK(msh_device_sync(MSH_CUDA, 0));
  CHECK(!memcmp(msh_tensor_data(host), msh_tensor_data(b), nbytes(b))); /* the bytes are on the host */
  COMPARE("device copy of a mapped tensor", dev, a, 0);
  /* a strided view of the mapped tensor, written from the host side */
  msh_tensor *rows = NULL, *hrows = NULL;
  CHECK_OK(msh_tensor_narrow(&rows, m, 0, 5, 7));
  CHECK_OK(msh_tensor_narrow(&hrows, a, 0, 5, 7));
  CHECK_OK(msh_tensor_copy(rows, hrows));
  msh_tensor *got = to_cpu(rows);
  COMPARE("rows of a mapped tensor", got, hrows, 0);
  /* the host handle goes first: the mapping keeps the memory */
  msh_tensor_free(host);
  msh_tensor *again = to_cpu(rows);
  COMPARE("after the host handle is freed", again, hrows, 0);
  msh_tensor *all[] = {a, m, back, dev, b, bg, rows, hrows, got, again};
  free_all(all, 10);
}

static void test_refusals(void) {
  int64_t shape[1] = {64};
  msh_tensor *plain = cpu_new(MSH_F32, 1, shape), *g = gpu_new(MSH_F32, 1, shape), *m = NULL;
  CHECK_STATUS(msh_tensor_map_host(&m, plain, MSH_CUDA, 0), MSH_EINVAL); /* ordinary memory */
  CHECK(m == NULL && strstr(msh_last_error(), "ordinary memory"));
  CHECK_STATUS(msh_tensor_map_host(&m, g, MSH_CUDA, 0), MSH_EINVAL); /* a device tensor */
  msh_tensor *pin = NULL;
  CHECK_OK(msh_tensor_new_pinned(&pin, MSH_F32, 1, shape));
  int count = 0;
  CHECK_OK(msh_device_count(MSH_CUDA, &count));
  CHECK_STATUS(msh_tensor_map_host(&m, pin, MSH_CUDA, count), MSH_EINVAL); /* no such device */
  CHECK(m == NULL);
  msh_tensor *all[] = {plain, g, pin};
  free_all(all, 3);
}

/* kv_write then paged attention over mapped pools, against the CPU op on the same inputs. */
static void test_paged(int dt) {
  int64_t NB = 96, BS = 16, H = 8, KVH = 2, hd = 128, B = 5, max_ctx = 400, MB = (max_ctx + BS - 1) / BS;
  int64_t pshape[4] = {NB, BS, KVH, hd}, rshape[3] = {B, KVH, hd}, qshape[3] = {B, H, hd};
  int64_t s0[1] = {B}, s1[1] = {B + 1}, s3[2] = {B, MB};
  msh_tensor *kc = cpu_randn(dt, 4, pshape, 1.0f), *vc = cpu_randn(dt, 4, pshape, 1.0f), *kh, *vh;
  msh_tensor *km = mapped_copy(kc, &kh), *vm = mapped_copy(vc, &vh);
  int32_t qs[6], ctx[5], slots[5], bt[5 * 25];
  qs[0] = 0;
  for (int b = 0; b < B; b++) {
    qs[b + 1] = b + 1;
    ctx[b] = 1 + (int32_t)rnd((uint32_t)max_ctx);
  }
  /* blocks 0 .. B - 1 hold the decodes' own rows (no two write one slot), any other the rest */
  for (int i = 0; i < B * MB; i++) bt[i] = (int32_t)(B + rnd((uint32_t)(NB - B)));
  for (int b = 0; b < B; b++) {
    int p = ctx[b] - 1; /* the decode's own row */
    bt[b * MB + p / BS] = b;
    slots[b] = b * (int32_t)BS + p % (int32_t)BS;
  }
  msh_tensor *k = cpu_randn(MSH_F32, 3, rshape, 1.0f), *v = cpu_randn(MSH_F32, 3, rshape, 1.0f);
  msh_tensor *q = cpu_randn(MSH_F32, 3, qshape, 1.0f), *oc = cpu_new(MSH_F32, 3, qshape);
  msh_tensor *ts = i32_cpu(1, s0, slots), *tq = i32_cpu(1, s1, qs), *tc = i32_cpu(1, s0, ctx), *tb = i32_cpu(2, s3, bt);
  msh_tensor *kg = to_gpu(k), *vg = to_gpu(v), *qg = to_gpu(q), *og = gpu_new(MSH_F32, 3, qshape);
  msh_tensor *tsg = to_gpu(ts), *tqg = to_gpu(tq), *tcg = to_gpu(tc), *tbg = to_gpu(tb);
  float scale = 1.0f / sqrtf((float)hd);
  CHECK_OK(msh_op_kv_write(kc, vc, k, v, ts));
  CHECK_OK(msh_op_kv_write(km, vm, kg, vg, tsg));
  CHECK_OK(msh_device_sync(MSH_CUDA, 0));
  CHECK(!memcmp(msh_tensor_data(kh), msh_tensor_data(kc), nbytes(kc)));
  CHECK(!memcmp(msh_tensor_data(vh), msh_tensor_data(vc), nbytes(vc)));
  CHECK_OK(msh_op_paged_attention(oc, q, kc, vc, tq, tc, tb, max_ctx, scale));
  CHECK_OK(msh_op_paged_attention(og, qg, km, vm, tqg, tcg, tbg, max_ctx, scale));
  COMPARE("paged attention over mapped pools", og, oc, attn_tol(dt));
  msh_tensor *all[] = {kc, vc, kh, vh, km, vm, k, v, q, oc, ts, tq, tc, tb, kg, vg, qg, og, tsg, tqg, tcg, tbg};
  free_all(all, 22);
}

/* Ragged prompt chunks (the per-row form) over mapped pools, against the CPU op. */
static void test_paged_chunks(int dt) {
  int64_t NB = 80, BS = 16, H = 12, KVH = 4, hd = 64, B = 4, max_ctx = 300, MB = (max_ctx + BS - 1) / BS;
  int64_t pshape[4] = {NB, BS, KVH, hd}, s0[1] = {B}, s1[1] = {B + 1}, s3[2] = {B, MB};
  msh_tensor *kc = cpu_randn(dt, 4, pshape, 1.0f), *vc = cpu_randn(dt, 4, pshape, 1.0f), *kh, *vh;
  msh_tensor *km = mapped_copy(kc, &kh), *vm = mapped_copy(vc, &vh);
  int32_t qs[5], ctx[4], bt[4 * 19];
  qs[0] = 0;
  for (int b = 0; b < B; b++) {
    int32_t n = 1 + (int32_t)rnd(9);
    qs[b + 1] = qs[b] + n;
    ctx[b] = n + (int32_t)rnd((uint32_t)(max_ctx - n + 1));
  }
  for (int i = 0; i < B * MB; i++) bt[i] = (int32_t)rnd((uint32_t)NB);
  int64_t R = qs[B], qshape[3] = {R, H, hd};
  msh_tensor *q = cpu_randn(MSH_F32, 3, qshape, 1.0f), *oc = cpu_new(MSH_F32, 3, qshape);
  msh_tensor *tq = i32_cpu(1, s1, qs), *tc = i32_cpu(1, s0, ctx), *tb = i32_cpu(2, s3, bt);
  msh_tensor *qg = to_gpu(q), *og = gpu_new(MSH_F32, 3, qshape), *tqg = to_gpu(tq), *tcg = to_gpu(tc), *tbg = to_gpu(tb);
  CHECK_OK(msh_op_paged_attention(oc, q, kc, vc, tq, tc, tb, max_ctx, 0.125f));
  CHECK_OK(msh_op_paged_attention(og, qg, km, vm, tqg, tcg, tbg, max_ctx, 0.125f));
  COMPARE("paged prompt chunks over mapped pools", og, oc, attn_tol(dt));
  msh_tensor *all[] = {kc, vc, kh, vh, km, vm, q, oc, tq, tc, tb, qg, og, tqg, tcg, tbg};
  free_all(all, 16);
}

/* An embedding with mapped ids: an id outside the table is MSH_ERANGE naming it (read back from
 * the mapped ids, host memory). */
static void test_embedding_ids(void) {
  int64_t tshape[2] = {50, 32}, ishape[1] = {6}, oshape[2] = {6, 32};
  int32_t ids[6] = {3, 49, 0, 17, 50 + 7, 2};
  msh_tensor *table = cpu_randn(MSH_F32, 2, tshape, 1.0f), *tg = to_gpu(table), *ih = NULL;
  msh_tensor *idc = i32_cpu(1, ishape, ids), *im = mapped_copy(idc, &ih), *og = gpu_new(MSH_F32, 2, oshape);
  CHECK_STATUS(msh_op_embedding(og, tg, im), MSH_ERANGE);
  CHECK(strstr(msh_last_error(), "id 57 at 4"));
  ((int32_t *)msh_tensor_data(ih))[4] = 11; /* the host side's bytes are what the device reads */
  msh_tensor *oc = cpu_new(MSH_F32, 2, oshape);
  CHECK_OK(msh_op_embedding(oc, table, ih));
  CHECK_OK(msh_op_embedding(og, tg, im));
  COMPARE("embedding of mapped ids", og, oc, 0);
  msh_tensor *all[] = {table, tg, ih, idc, im, og, oc};
  free_all(all, 7);
}

/* Batched attention of a chunk of T queries over mapped (B, S, KVH, hd) caches (T = 5: the
 * split-KV decode kernels; T = 16 over f16/bf16: the flash prefill kernel). */
static void test_contiguous(int dt, int64_t T) {
  int64_t B = 3, S = 300, KVH = 4, hd = 64, H = 8, pos0 = 170;
  int64_t cshape[4] = {B, S, KVH, hd}, qshape[4] = {B, T, H, hd};
  msh_tensor *kc = cpu_randn(dt, 4, cshape, 1.0f), *vc = cpu_randn(dt, 4, cshape, 1.0f), *kh, *vh;
  msh_tensor *km = mapped_copy(kc, &kh), *vm = mapped_copy(vc, &vh);
  msh_tensor *q = cpu_randn(MSH_F32, 4, qshape, 1.0f), *oc = cpu_new(MSH_F32, 4, qshape);
  msh_tensor *qg = to_gpu(q), *og = gpu_new(MSH_F32, 4, qshape);
  CHECK_OK(msh_op_attention(oc, q, kc, vc, pos0, 0.125f));
  CHECK_OK(msh_op_attention(og, qg, km, vm, pos0, 0.125f));
  /* 16-bit caches at head dim 64 take the tensor-core kernels (q and p rounded to the cache's
   * type): test_cuda_ops's 1e-2 for the same kernels over device memory */
  COMPARE(T < 8 ? "attention over mapped caches" : "flash attention over mapped caches", og, oc,
          dt == MSH_F32 ? 1e-4 : 1e-2);
  msh_tensor *all[] = {kc, vc, kh, vh, km, vm, q, oc, qg, og};
  free_all(all, 10);
}

/* A decode step's cache ops captured once over mapped pools, replayed with new rows and tables. */
static void test_graph(void) {
  int64_t NB = 64, BS = 16, H = 8, KVH = 2, hd = 64, B = 4, MB = 16, max_ctx = 256;
  int64_t pshape[4] = {NB, BS, KVH, hd}, rshape[3] = {B, KVH, hd}, qshape[3] = {B, H, hd};
  int64_t s0[1] = {B}, s1[1] = {B + 1}, s3[2] = {B, MB};
  msh_tensor *kc = cpu_randn(MSH_BF16, 4, pshape, 1.0f), *vc = cpu_randn(MSH_BF16, 4, pshape, 1.0f), *kh, *vh;
  msh_tensor *km = mapped_copy(kc, &kh), *vm = mapped_copy(vc, &vh);
  msh_tensor *k = cpu_randn(MSH_F32, 3, rshape, 1.0f), *v = cpu_randn(MSH_F32, 3, rshape, 1.0f);
  msh_tensor *q = cpu_randn(MSH_F32, 3, qshape, 1.0f), *oc = cpu_new(MSH_F32, 3, qshape);
  int32_t qs[5] = {0, 1, 2, 3, 4}, ctx[4] = {1, 1, 1, 1}, slots[4] = {0, 0, 0, 0}, bt[64];
  for (int i = 0; i < 64; i++) bt[i] = (int32_t)(B + rnd((uint32_t)(NB - B)));
  msh_tensor *ts = i32_cpu(1, s0, slots), *tq = i32_cpu(1, s1, qs), *tc = i32_cpu(1, s0, ctx), *tb = i32_cpu(2, s3, bt);
  msh_tensor *kg = to_gpu(k), *vg = to_gpu(v), *qg = to_gpu(q), *og = gpu_new(MSH_F32, 3, qshape);
  msh_tensor *tsg = to_gpu(ts), *tqg = to_gpu(tq), *tcg = to_gpu(tc), *tbg = to_gpu(tb);
  CHECK_OK(msh_op_paged_attention(og, qg, km, vm, tqg, tcg, tbg, max_ctx, 0.125f)); /* sizes the scratch */
  msh_graph *g = NULL;
  CHECK_OK(msh_graph_begin(MSH_CUDA, 0));
  msh_status s1_ = msh_op_kv_write(km, vm, kg, vg, tsg);
  msh_status s2_ = msh_op_paged_attention(og, qg, km, vm, tqg, tcg, tbg, max_ctx, 0.125f);
  CHECK_OK(msh_graph_end(MSH_CUDA, 0, &g));
  CHECK_OK(s1_);
  CHECK_OK(s2_);
  for (int step = 0; step < 4 && g; step++) {
    int32_t *pc = msh_tensor_data(tc), *ps = msh_tensor_data(ts), *pb = msh_tensor_data(tb);
    for (int b = 0; b < B; b++) { /* block b takes sequence b's new row (distinct slots) */
      pc[b] = 1 + (int32_t)rnd((uint32_t)max_ctx);
      int p = pc[b] - 1;
      pb[b * MB + p / BS] = b;
      ps[b] = b * (int32_t)BS + p % (int32_t)BS;
    }
    msh_tensor *fresh_k = cpu_randn(MSH_F32, 3, rshape, 1.0f), *fresh_v = cpu_randn(MSH_F32, 3, rshape, 1.0f);
    CHECK_OK(msh_tensor_copy(k, fresh_k));
    CHECK_OK(msh_tensor_copy(v, fresh_v));
    CHECK_OK(msh_tensor_copy(kg, k));
    CHECK_OK(msh_tensor_copy(vg, v));
    CHECK_OK(msh_tensor_copy(tcg, tc));
    CHECK_OK(msh_tensor_copy(tsg, ts));
    CHECK_OK(msh_tensor_copy(tbg, tb));
    CHECK_OK(msh_graph_launch(g));
    CHECK_OK(msh_op_kv_write(kc, vc, k, v, ts));
    CHECK_OK(msh_op_paged_attention(oc, q, kc, vc, tq, tc, tb, max_ctx, 0.125f));
    COMPARE("graph replay over mapped pools", og, oc, attn_tol(MSH_BF16));
    CHECK_OK(msh_device_sync(MSH_CUDA, 0));
    CHECK(!memcmp(msh_tensor_data(kh), msh_tensor_data(kc), nbytes(kc)));
    msh_tensor_free(fresh_k);
    msh_tensor_free(fresh_v);
  }
  msh_graph_free(g);
  msh_tensor *all[] = {kc, vc, kh, vh, km, vm, k, v, q, oc, ts, tq, tc, tb, kg, vg, qg, og, tsg, tqg, tcg, tbg};
  free_all(all, 22);
}

int main(void) {
  int count = 0;
  CHECK_OK(msh_device_count(MSH_CUDA, &count));
  if (count == 0) {
    printf("test_cuda_host_map: no CUDA device, skipped\n");
    return 77;
  }
  test_copies_and_lifetime();
  test_refusals();
  const int dts[3] = {MSH_F32, MSH_F16, MSH_BF16};
  for (int i = 0; i < 3; i++) {
    test_paged(dts[i]);
    test_paged_chunks(dts[i]);
    test_contiguous(dts[i], 5);
    test_contiguous(dts[i], 16);
  }
  test_embedding_ids();
  test_graph();
  return check_done("test_cuda_host_map");
}
