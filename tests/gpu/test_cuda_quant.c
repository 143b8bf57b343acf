/* test_cuda_quant.c: block-quantized weights on a GPU (GGUF Q8_0 / Q4_0 / Q4_1 and the group-wise
 * I8G / I4G) against the CPU reference on fresh random inputs, outputs NaN-prefilled: quantizing
 * copies to the GPU (the same bytes as on the CPU), matmul / matmul_acc / matmul_glu on the GEMV
 * path (M 1..16: the tiled kernel and the per-warp one) and the GEMM path (dequantized to bf16,
 * cuBLAS), embedding, and the fused ops (rmsnorm_matmul, rmsnorm_mlp), which take the generic
 * path for block weights on a GPU.
 *
 * Tolerances: the reference is the CPU's matmul over the same blocks dequantized to f32 (exact;
 * the CPU's own Q8_0/Q4_0/Q4_1 path would quantize x to 8 bits), x in f32. GEMV: f32 FMAs in
 * another order (the tiled kernel applies a block's scale to the word's sum: d sum q x + c sum x),
 * 1e-5. GEMM: x and the weights rounded to bf16 (relative 2^-9 each), f32 accumulation: 1e-2
 * norm-wise. */
#include <stdlib.h>
#include <string.h>

#include "gpu_helpers.h"

static const int DTS[] = {MSH_Q8_0, MSH_Q4_0, MSH_Q4_1, MSH_I8G32, MSH_I8G64, MSH_I8G128, MSH_I4G32, MSH_I4G64, MSH_I4G128};
enum { NDT = sizeof DTS / sizeof DTS[0] };

static void nan_fill(msh_tensor *t) {
  msh_tensor *h = to_cpu(t);
  if (!h) return;
  float *p = msh_tensor_data(h);
  for (int64_t i = 0; i < msh_tensor_numel(h); i++) p[i] = NAN;
  CHECK_OK(msh_tensor_copy(t, h));
  msh_tensor_free(h);
}

/* A (N, K) weight of dtype dt on the CPU, quantized from random f32 values. */
static msh_tensor *cpu_weight(int dt, int64_t N, int64_t K) {
  int64_t s[2] = {N, K};
  msh_tensor *f = cpu_randn(MSH_F32, 2, s, 0.5f), *w = cpu_new(dt, 2, s);
  if (f && w) CHECK_OK(msh_tensor_copy(w, f));
  msh_tensor_free(f);
  return w;
}

static void test_copies(void) {
  for (int i = 0; i < NDT; i++) {
    int dt = DTS[i];
    int64_t s[2] = {7, 256};
    msh_tensor *f = cpu_randn(MSH_F32, 2, s, 1.0f), *q = cpu_new(dt, 2, s), *fg = to_gpu(f), *qg = gpu_new(dt, 2, s);
    CHECK_OK(msh_tensor_copy(q, f));
    CHECK_OK(msh_tensor_copy(qg, fg)); /* quantized at load from a GPU f32 tensor */
    msh_tensor *back = to_cpu(qg);
    size_t bytes = (size_t)(7 * 256 / msh_dtype_block_elems(dt) * (int64_t)msh_dtype_block_bytes(dt));
    CHECK(back && memcmp(msh_tensor_data(back), msh_tensor_data(q), bytes) == 0);
    msh_tensor *d = gpu_new(MSH_F32, 2, s), *dc = cpu_new(MSH_F32, 2, s);
    CHECK_OK(msh_tensor_copy(d, qg));
    CHECK_OK(msh_tensor_copy(dc, q));
    char what[64];
    snprintf(what, sizeof what, "dequantize %s on the GPU", msh_dtype_name(dt));
    COMPARE(what, d, dc, 0);
    msh_tensor *all[] = {f, q, fg, qg, back, d, dc};
    free_all(all, 7);
  }
}

/* Whether the GEMV rounds x to f16: the tensor-core kernel (kernels/gemv_quant_mma.cu,
 * qgemv_mma_takes) takes the 4-bit dtypes whose blocks keep 4-byte alignment, K / G a multiple of
 * 4, M <= 16, when MSH_QGEMV_VARIANT is 5 or 6. */
static int gemv_rounds_x(int dt, int64_t M, int64_t K) {
  const char *v = getenv("MSH_QGEMV_VARIANT");
  if (!v || (atoi(v) != 5 && atoi(v) != 6) || M > 16) return 0;
  if (dt != MSH_Q4_1 && dt != MSH_I4G32 && dt != MSH_I4G64 && dt != MSH_I4G128) return 0;
  int64_t G = msh_dtype_block_elems(dt);
  return K % G == 0 && (K / G) % 4 == 0;
}

/* x (M, K) through f16 where the GEMV of dtype dt rounds it: the reference's x. */
static void round_x_where(msh_tensor *x, int dt, int64_t M, int64_t K) {
  if (!gemv_rounds_x(dt, M, K)) return;
  int64_t s[2] = {M, K};
  msh_tensor *h = cpu_new(MSH_F16, 2, s);
  CHECK_OK(msh_tensor_copy(h, x));
  CHECK_OK(msh_tensor_copy(x, h));
  msh_tensor_free(h);
}

/* matmul's three epilogues for one dtype and shape against the CPU (x rounded to f16 for the
 * reference where the GEMV rounds it: then the same products, f32 sums in another order). */
static void check_matmul(int dt, int64_t M, int64_t N, int64_t K) {
  double rtol = M <= 16 ? 1e-5 : 1e-2;
  char what[128];
  int64_t xs[2] = {M, K}, os[2] = {M, N}, gs[2] = {M, 2 * N};
  msh_tensor *w = cpu_weight(dt, N, K), *wgu = cpu_weight(dt, 2 * N, K), *x = cpu_randn(MSH_F32, 2, xs, 1.0f);
  msh_tensor *wg = to_gpu(w), *wgug = to_gpu(wgu), *xg = to_gpu(x);
  round_x_where(x, dt, M, K); /* after the copy to the GPU: the GPU keeps the f32 x */
  msh_tensor *wf = NULL, *wguf = NULL; /* the reference's weights: the blocks dequantized */
  CHECK_OK(msh_tensor_contiguous(&wf, w, MSH_F32));
  CHECK_OK(msh_tensor_contiguous(&wguf, wgu, MSH_F32));
  msh_tensor *out = cpu_new(MSH_F32, 2, os), *outg = gpu_new(MSH_F32, 2, os);
  /* store */
  CHECK_OK(msh_op_matmul(out, x, wf));
  nan_fill(outg);
  CHECK_OK(msh_op_matmul(outg, xg, wg));
  snprintf(what, sizeof what, "matmul %s M %lld N %lld K %lld", msh_dtype_name(dt), (long long)M, (long long)N,
           (long long)K);
  COMPARE(what, outg, out, rtol);
  /* accumulate onto the same random start */
  msh_tensor *acc = cpu_randn(MSH_F32, 2, os, 1.0f), *accg = to_gpu(acc);
  CHECK_OK(msh_op_matmul_acc(acc, x, wf));
  CHECK_OK(msh_op_matmul_acc(accg, xg, wg));
  snprintf(what, sizeof what, "matmul_acc %s M %lld N %lld K %lld", msh_dtype_name(dt), (long long)M, (long long)N,
           (long long)K);
  COMPARE(what, accg, acc, rtol);
  /* GLU over stacked gate and up rows */
  msh_tensor *sc = cpu_new(MSH_F32, 2, gs), *scg = gpu_new(MSH_F32, 2, gs);
  CHECK_OK(msh_op_matmul_glu(out, x, wguf, sc));
  nan_fill(outg);
  CHECK_OK(msh_op_matmul_glu(outg, xg, wgug, scg));
  snprintf(what, sizeof what, "matmul_glu %s M %lld N %lld K %lld", msh_dtype_name(dt), (long long)M, (long long)N,
           (long long)K);
  COMPARE(what, outg, out, rtol);
  msh_tensor *all[] = {w, wgu, x, wg, wgug, xg, out, outg, acc, accg, sc, scg, wf, wguf};
  free_all(all, 14);
}

static void test_matmul(void) {
  const int64_t Ms[] = {1, 2, 3, 5, 8, 16, 17, 100};
  const int64_t shapes[][2] = {{1, 128}, {37, 256}, {1000, 512}, {96, 1536}};
  for (int i = 0; i < NDT; i++)
    for (size_t m = 0; m < sizeof Ms / sizeof Ms[0]; m++)
      for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        check_matmul(DTS[i], Ms[m], shapes[s][0], shapes[s][1]);
}

/* The tiled GEMV (kernels/gemv_quant.cu; Q4_1, I8G, I4G with K / G a multiple of 4) at shapes
 * test_matmul leaves out: rows not a multiple of a block's 8 (or 4 from M = 3), more tiles than a
 * block's four warps (several a warp, the stages wrapping around), a short last tile (K 4352,
 * 4-bit dtypes of 32- and 64-element groups: half a tile; K 640, 32-element groups: a quarter of a
 * tile, half a step of lanes for Q4_1 / I4G32), and the per-warp kernel where K / G is not a
 * multiple of 4 (K 4352 for 128-element groups, K 640 for 64 and 128). Every MT the kernels are
 * built for (M 1, 2, 3 -> 4, 5 -> 8, 16). */
static void test_matmul_tiled(void) {
  const int64_t Ms[] = {1, 2, 3, 5, 16};
  const int64_t shapes[][2] = {{13, 4352}, {45, 7680}, {70, 640}};
  for (int i = 0; i < NDT; i++)
    for (size_t m = 0; m < sizeof Ms / sizeof Ms[0]; m++)
      for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        check_matmul(DTS[i], Ms[m], shapes[s][0], shapes[s][1]);
}

static void test_embedding(void) {
  for (int i = 0; i < NDT; i++) {
    int dt = DTS[i];
    msh_tensor *t = cpu_weight(dt, 50, 256), *tg = to_gpu(t), *ids = NULL;
    int64_t n[1] = {5}, os[2] = {5, 256};
    CHECK_OK(msh_tensor_new(&ids, MSH_I32, 1, n, MSH_CPU, 0));
    int32_t *id = msh_tensor_data(ids);
    id[0] = 49, id[1] = 0, id[2] = 17, id[3] = 17, id[4] = 3;
    msh_tensor *idg = to_gpu(ids), *out = cpu_new(MSH_F32, 2, os), *outg = gpu_new(MSH_F32, 2, os);
    CHECK_OK(msh_op_embedding(out, t, ids));
    nan_fill(outg);
    CHECK_OK(msh_op_embedding(outg, tg, idg));
    char what[64];
    snprintf(what, sizeof what, "embedding %s", msh_dtype_name(dt));
    COMPARE(what, outg, out, 1e-6);
    id[4] = 50;
    msh_tensor *bad = to_gpu(ids);
    CHECK_STATUS(msh_op_embedding(outg, tg, bad), MSH_ERANGE);
    msh_tensor *all[] = {t, tg, ids, idg, out, outg, bad};
    free_all(all, 7);
  }
}

/* The fused ops with block weights (rmsnorm, then the quantized matmul; one row with the tensor-core
 * GEMV: the norm folded in), against the reference's steps. */
static void test_fused(void) {
  const int dts[] = {MSH_Q4_1, MSH_I8G64, MSH_I4G64};
  const int64_t Ms[] = {1, 4, 40};
  for (int i = 0; i < 3; i++)
    for (int mi = 0; mi < 3; mi++) {
      int dt = dts[i];
      int64_t M = Ms[mi], K = 256, F = 384;
      double rtol = M <= 16 ? 1e-5 : 1e-2;
      int64_t xs[2] = {M, K}, ks[1] = {K}, gs[2] = {M, F}, gus[2] = {M, 2 * F};
      msh_tensor *x = cpu_randn(MSH_F32, 2, xs, 1.0f), *nw = cpu_randn(MSH_F32, 1, ks, 1.0f);
      msh_tensor *wgu = cpu_weight(dt, 2 * F, K), *wd = cpu_weight(dt, K, F);
      msh_tensor *xg = to_gpu(x), *nwg = to_gpu(nw), *wgug = to_gpu(wgu), *wdg = to_gpu(wd);
      msh_tensor *wguf = NULL, *wdf = NULL; /* the reference's weights: the blocks dequantized */
      CHECK_OK(msh_tensor_contiguous(&wguf, wgu, MSH_F32));
      CHECK_OK(msh_tensor_contiguous(&wdf, wd, MSH_F32));
      msh_tensor *h = cpu_new(MSH_F32, 2, xs), *g = cpu_new(MSH_F32, 2, gs), *gu = cpu_new(MSH_F32, 2, gus);
      msh_tensor *hg = gpu_new(MSH_F32, 2, xs), *gg = gpu_new(MSH_F32, 2, gs), *gug = gpu_new(MSH_F32, 2, gus);
      /* the reference step by step, rounding each GEMV's x where the GPU's does */
      CHECK_OK(msh_op_rmsnorm(h, x, nw, 1e-5f));
      round_x_where(h, dt, M, K);
      CHECK_OK(msh_op_matmul_glu(g, h, wguf, gu));
      nan_fill(gg);
      CHECK_OK(msh_op_rmsnorm_matmul(gg, xg, nwg, 1e-5f, wgug, hg, gug));
      char what[96];
      snprintf(what, sizeof what, "rmsnorm_matmul (GLU) %s M %lld", msh_dtype_name(dt), (long long)M);
      COMPARE(what, gg, g, rtol);
      CHECK_OK(msh_op_rmsnorm_mlp(xg, nwg, 1e-5f, wgug, wdg, hg, gg, gug));
      snprintf(what, sizeof what, "rmsnorm_mlp's GLU %s M %lld", msh_dtype_name(dt), (long long)M);
      COMPARE(what, gg, g, rtol);
      /* the down projection from the GPU's own GLU output: rounding it to f16 where the GEMV does
       * must not meet the reference's g, whose last bits differ (a value near a rounding boundary
       * would round the other way: 2^-11 of it, past the bar) */
      msh_tensor *gc = to_cpu(gg);
      round_x_where(gc, dt, M, F);
      CHECK_OK(msh_op_matmul_acc(x, gc, wdf)); /* rmsnorm_mlp: x += the MLP of rmsnorm(x) */
      msh_tensor_free(gc);
      snprintf(what, sizeof what, "rmsnorm_mlp %s M %lld", msh_dtype_name(dt), (long long)M);
      COMPARE(what, xg, x, rtol);
      msh_tensor *all[] = {x, nw, wgu, wd, xg, nwg, wgug, wdg, h, g, gu, hg, gg, gug, wguf, wdf};
      free_all(all, 16);
    }
}

int main(void) {
  int count = 0;
  CHECK_OK(msh_device_count(MSH_CUDA, &count));
  if (count == 0) {
    printf("test_cuda_quant: no CUDA device, skipped\n");
    return 77;
  }
  test_copies();
  test_matmul();
  test_matmul_tiled();
  test_embedding();
  test_fused();
  return check_done("test_cuda_quant");
}
