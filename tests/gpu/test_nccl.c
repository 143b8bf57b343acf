/* test_nccl.c: the NCCL communicator, one thread per GPU (up to 4): every collective against a
 * float64 reference computed on the host from the same seeded inputs, bf16 all-reduce, subgroups
 * from a split, send/recv around the ring; all_reduce_add on both of its paths (the one-shot
 * peer-mapped kernel up to MSH_P2P_BYTES, NCCL and an add above), hundreds of calls in a row and
 * calls replayed from a CUDA graph, with every rank's result bit-identical. The GPUs of one host
 * are expected to reach each other (NVLink or PCIe peer access), unless MSH_P2P_ALLREDUCE=0.
 * Exit 77 (skipped) without NCCL or without a GPU. */
#include "check.h"

#include <pthread.h>
#include <string.h>

enum { MAXW = 4 };


static int W;
static uint8_t id[MSH_NCCL_ID_BYTES];

static uint64_t seed(int salt, int rank) { return (uint64_t)salt * 131 + (uint64_t)rank; }

static msh_tensor *dev_randn(int dev, int dtype, int64_t n, uint64_t s) {
  msh_tensor *t = NULL;
  TCHECK_OK(msh_tensor_new(&t, dtype, 1, &n, MSH_CUDA, dev));
  TCHECK_OK(msh_tensor_randn(t, s, 0, 1));
  return t;
}

/* host f32 values of a seeded input (rounded through dtype, as the device holds them) */
static float *host_values(int dtype, int64_t n, uint64_t s) {
  msh_tensor *h = NULL, *f = NULL;
  TCHECK_OK(msh_tensor_new(&h, dtype, 1, &n, MSH_CPU, 0));
  TCHECK_OK(msh_tensor_randn(h, s, 0, 1));
  TCHECK_OK(msh_tensor_contiguous(&f, h, MSH_F32));
  float *v = malloc(sizeof(float) * (size_t)n);
  memcpy(v, msh_tensor_data(f), sizeof(float) * (size_t)n);
  msh_tensor_free(h);
  msh_tensor_free(f);
  return v;
}

static float *download(const msh_tensor *t) {
  int64_t n = msh_tensor_numel(t);
  msh_tensor *h = NULL;
  TCHECK_OK(msh_tensor_new(&h, MSH_F32, 1, &n, MSH_CPU, 0));
  TCHECK_OK(msh_tensor_copy(h, t)); /* waits for the device's stream */
  float *v = malloc(sizeof(float) * (size_t)n);
  memcpy(v, msh_tensor_data(h), sizeof(float) * (size_t)n);
  msh_tensor_free(h);
  return v;
}

static float *results[MAXW];
static pthread_barrier_t bar;

/* acc += sum over ranks of t, `calls` times (eagerly, or as a graph of 4 calls replayed), against
 * the host's float64 sum; every rank must end with the same bits. */
static void check_add(msh_comm *c, int r, int64_t n, int calls, int graph) {
  /* every rank starts from the same acc, so every rank must end with the same bits */
  msh_tensor *t = dev_randn(r, MSH_F32, n, seed(40, r)), *acc = dev_randn(r, MSH_F32, n, seed(41, 0));
  if (graph) {
    const char *off = getenv("MSH_P2P_ALLREDUCE");
    if (W > 1 && !(off && strcmp(off, "0") == 0)) TCHECK(msh_comm_capturable(c, MSH_COMM_OP_ALL_REDUCE, t) == 1);
    if (!msh_comm_capturable(c, MSH_COMM_OP_ALL_REDUCE, t)) {
      calls = 0;
    } else {
      msh_graph *g = NULL;
      TCHECK_OK(msh_graph_begin(MSH_CUDA, r));
      for (int i = 0; i < 4; i++) TCHECK_OK(msh_comm_all_reduce_add(c, acc, t));
      TCHECK_OK(msh_graph_end(MSH_CUDA, r, &g));
      for (int i = 0; i < calls / 4; i++) TCHECK_OK(msh_graph_launch(g));
      calls = calls / 4 * 4;
      msh_graph_free(g);
    }
  } else {
    for (int i = 0; i < calls; i++) TCHECK_OK(msh_comm_all_reduce_add(c, acc, t));
  }
  float *got = download(acc), *acc0 = host_values(MSH_F32, n, seed(41, 0));
  double *sum = calloc((size_t)n, sizeof(double));
  for (int q = 0; q < W; q++) {
    float *v = host_values(MSH_F32, n, seed(40, q));
    for (int64_t i = 0; i < n; i++) sum[i] += v[i];
    free(v);
  }
  double worst = 0;
  for (int64_t i = 0; i < n; i++) {
    double want = acc0[i] + calls * sum[i];
    double e = fabs(got[i] - want) / (1 + fabs(want));
    if (!(e <= worst)) worst = e;
  }
  TCHECK(worst < 1e-6 * (4 + calls));
  results[r] = got;
  pthread_barrier_wait(&bar);
  TCHECK(memcmp(got, results[0], sizeof(float) * (size_t)n) == 0);
  pthread_barrier_wait(&bar);
  free(got);
  free(acc0);
  free(sum);
  msh_tensor_free(t);
  msh_tensor_free(acc);
}

/* all_reduce_add_norm over R rows of D: acc += the sum, h = rmsnorm(acc) * w (bf16 w), against
 * float64; acc and h bit-identical across ranks. R <= 64 with D % 4 == 0 takes the fused kernel,
 * other shapes the sum then msh_op_rmsnorm. */
static float *results_h[MAXW];

static void check_add_norm(msh_comm *c, int r, int64_t R, int64_t D) {
  int64_t n = R * D, shape[2] = {R, D};
  msh_tensor *t1 = dev_randn(r, MSH_F32, n, seed(50, r)), *a1 = dev_randn(r, MSH_F32, n, seed(51, 0));
  msh_tensor *t = NULL, *acc = NULL, *h = NULL, *h1 = NULL, *w = dev_randn(r, MSH_BF16, D, seed(52, 0));
  TCHECK_OK(msh_tensor_new(&h1, MSH_F32, 1, &n, MSH_CUDA, r));
  TCHECK_OK(msh_tensor_reshape(&t, t1, 2, shape));
  TCHECK_OK(msh_tensor_reshape(&acc, a1, 2, shape));
  TCHECK_OK(msh_tensor_reshape(&h, h1, 2, shape));
  TCHECK_OK(msh_comm_all_reduce_add_norm(c, acc, t, h, w, 1e-5f));
  /* (the 1-D tensors behind the (R, D) views go to the host) */
  float *got_a = download(a1), *got_h = download(h1), *acc0 = host_values(MSH_F32, n, seed(51, 0));
  float *wv = host_values(MSH_BF16, D, seed(52, 0));
  double *want = calloc((size_t)n, sizeof(double));
  for (int q = 0; q < W; q++) {
    float *v = host_values(MSH_F32, n, seed(50, q));
    for (int64_t i = 0; i < n; i++) want[i] += v[i];
    free(v);
  }
  double worst_a = 0, worst_h = 0;
  for (int64_t row = 0; row < R; row++) {
    double ss = 0;
    for (int64_t d = 0; d < D; d++) {
      double x = want[row * D + d] += acc0[row * D + d];
      ss += x * x;
      double e = fabs(got_a[row * D + d] - x) / (1 + fabs(x));
      if (!(e <= worst_a)) worst_a = e;
    }
    double inv = 1 / sqrt(ss / (double)D + 1e-5);
    for (int64_t d = 0; d < D; d++) {
      double y = want[row * D + d] * inv * wv[d];
      double e = fabs(got_h[row * D + d] - y) / (1 + fabs(y));
      if (!(e <= worst_h)) worst_h = e;
    }
  }
  TCHECK(worst_a < 1e-6 && worst_h < 1e-5);
  results[r] = got_a;
  results_h[r] = got_h;
  pthread_barrier_wait(&bar);
  TCHECK(memcmp(got_a, results[0], sizeof(float) * (size_t)n) == 0);
  TCHECK(memcmp(got_h, results_h[0], sizeof(float) * (size_t)n) == 0);
  pthread_barrier_wait(&bar);
  free(got_a);
  free(got_h);
  free(acc0);
  free(wv);
  free(want);
  msh_tensor_free(t);
  msh_tensor_free(acc);
  msh_tensor_free(t1);
  msh_tensor_free(a1);
  msh_tensor_free(h);
  msh_tensor_free(h1);
  msh_tensor_free(w);
}

/* all_gather of n f32 per rank on the one-shot path (n % 4 == 0), out of place or in place,
 * eagerly or replayed 3 times from a CUDA graph; sizes past MSH_P2P_BYTES go in several launches. */
static void check_gather(msh_comm *c, int r, int64_t n, int inplace, int graph) {
  int64_t nw = n * W;
  msh_tensor *out = NULL, *in = NULL;
  TCHECK_OK(msh_tensor_new(&out, MSH_F32, 1, &nw, MSH_CUDA, r));
  TCHECK_OK(msh_tensor_randn(out, seed(60, 99), 0, 1)); /* stale values to overwrite */
  msh_tensor *mine = dev_randn(r, MSH_F32, n, seed(61, r));
  if (inplace) {
    TCHECK_OK(msh_tensor_narrow(&in, out, 0, n * r, n));
    TCHECK_OK(msh_tensor_copy(in, mine));
  } else {
    in = mine;
  }
  if (graph) {
    TCHECK(msh_comm_capturable(c, MSH_COMM_OP_ALL_GATHER, in) == 1);
    msh_graph *g = NULL;
    TCHECK_OK(msh_graph_begin(MSH_CUDA, r));
    TCHECK_OK(msh_comm_all_gather(c, out, in));
    TCHECK_OK(msh_graph_end(MSH_CUDA, r, &g));
    for (int i = 0; i < 3; i++) TCHECK_OK(msh_graph_launch(g));
    msh_graph_free(g);
  } else {
    TCHECK_OK(msh_comm_all_gather(c, out, in));
  }
  float *got = download(out);
  int bad = 0;
  for (int q = 0; q < W; q++) {
    float *v = host_values(MSH_F32, n, seed(61, q));
    bad += memcmp(v, got + n * q, sizeof(float) * (size_t)n) != 0;
    free(v);
  }
  TCHECK(bad == 0);
  free(got);
  if (inplace) msh_tensor_free(in);
  msh_tensor_free(mine);
  msh_tensor_free(out);
}

static void *rank_main(void *p) {
  int r = (int)(intptr_t)p;
  msh_comm *c = NULL;
  TCHECK_OK(msh_comm_new_nccl(&c, r, W, id, r));
  if (!c) return NULL;
  TCHECK(msh_comm_rank(c) == r && msh_comm_size(c) == W && msh_comm_kind(c) == MSH_COMM_NCCL);
  TCHECK(msh_comm_device(c) == MSH_CUDA && msh_comm_device_index(c) == r);
  static const int64_t sizes[] = {1, 7, 1001, 1 << 20};
  for (int k = 0; k < 4; k++) {
    int64_t n = sizes[k];
    /* all_reduce f32 and bf16 */
    for (int dt = 0; dt < 2; dt++) {
      int dtype = dt ? MSH_BF16 : MSH_F32;
      msh_tensor *t = dev_randn(r, dtype, n, seed(k, r));
      TCHECK_OK(msh_comm_all_reduce(c, t, MSH_REDUCE_SUM));
      float *got = download(t);
      double worst = 0;
      float **in = malloc(sizeof(float *) * (size_t)W);
      for (int q = 0; q < W; q++) in[q] = host_values(dtype, n, seed(k, q));
      for (int64_t i = 0; i < n; i++) {
        double want = 0;
        for (int q = 0; q < W; q++) want += in[q][i];
        double e = fabs(got[i] - want) / (1 + fabs(want));
        if (!(e <= worst)) worst = e;
      }
      TCHECK(worst < (dt ? 2e-2 : 1e-5));
      for (int q = 0; q < W; q++) free(in[q]);
      free(in);
      free(got);
      msh_tensor_free(t);
    }
    /* all_gather, reduce_scatter, broadcast */
    msh_tensor *in = dev_randn(r, MSH_F32, n, seed(10 + k, r)), *out = NULL, *rs = NULL;
    int64_t nw = n * W;
    TCHECK_OK(msh_tensor_new(&out, MSH_F32, 1, &nw, MSH_CUDA, r));
    TCHECK_OK(msh_comm_all_gather(c, out, in));
    float *g = download(out);
    int bad = 0;
    for (int q = 0; q < W; q++) {
      float *v = host_values(MSH_F32, n, seed(10 + k, q));
      bad += memcmp(v, g + n * q, sizeof(float) * (size_t)n) != 0;
      free(v);
    }
    TCHECK(bad == 0);
    free(g);
    msh_tensor *big = dev_randn(r, MSH_F32, nw, seed(20 + k, r));
    TCHECK_OK(msh_tensor_new(&rs, MSH_F32, 1, &n, MSH_CUDA, r));
    TCHECK_OK(msh_comm_reduce_scatter(c, rs, big, MSH_REDUCE_SUM));
    float *got = download(rs);
    double worst = 0;
    for (int q = 0; q < W; q++) {
      float *v = host_values(MSH_F32, nw, seed(20 + k, q));
      for (int64_t i = 0; i < n; i++) got[i] -= v[n * r + i];
      free(v);
    }
    for (int64_t i = 0; i < n; i++) worst = fabs(got[i]) > worst ? fabs(got[i]) : worst;
    TCHECK(worst < 1e-4);
    free(got);
    TCHECK_OK(msh_comm_broadcast(c, in, W - 1));
    got = download(in);
    float *want = host_values(MSH_F32, n, seed(10 + k, W - 1));
    TCHECK(memcmp(got, want, sizeof(float) * (size_t)n) == 0);
    free(got);
    free(want);
    /* send / recv around the ring */
    msh_tensor *mine = dev_randn(r, MSH_F32, n, seed(30 + k, r)), *recvd = NULL;
    TCHECK_OK(msh_tensor_new(&recvd, MSH_F32, 1, &n, MSH_CUDA, r));
    if (W > 1) {
      if (r == 0) {
        TCHECK_OK(msh_comm_send(c, mine, 1));
        TCHECK_OK(msh_comm_recv(c, recvd, W - 1));
      } else {
        TCHECK_OK(msh_comm_recv(c, recvd, r - 1));
        TCHECK_OK(msh_comm_send(c, mine, (r + 1) % W));
      }
      got = download(recvd);
      want = host_values(MSH_F32, n, seed(30 + k, (r + W - 1) % W));
      TCHECK(memcmp(got, want, sizeof(float) * (size_t)n) == 0);
      free(got);
      free(want);
    }
    msh_tensor_free(mine);
    msh_tensor_free(recvd);
    msh_tensor_free(big);
    msh_tensor_free(rs);
    msh_tensor_free(in);
    msh_tensor_free(out);
  }
  /* one-shot sizes (odd ones end in a partial vector), then one past the slot (NCCL + add) */
  static const int64_t add_sizes[] = {1, 13, 4096, 1 << 17, (1 << 19) + 1};
  for (int k = 0; k < 5; k++) check_add(c, r, add_sizes[k], k < 3 ? 300 : k == 3 ? 3 : 1, 0); /* NCCL changes t */
  check_add(c, r, 4096, 200, 1);
  check_gather(c, r, 4096, 0, 0);
  check_gather(c, r, 4096, 1, 0);
  check_gather(c, r, (1 << 20) + 4, 0, 0); /* three launches */
  check_gather(c, r, 64128, 1, 1);         /* a vocabulary-parallel row of logits, from a graph */
  static const int64_t norm_shapes[][2] = {{1, 4096}, {3, 8192}, {64, 4096}, {65, 256}, {2, 10}};
  for (int k = 0; k < 5; k++) check_add_norm(c, r, norm_shapes[k][0], norm_shapes[k][1]);
  check_add(c, r, 1 << 17, 8, 1);
  TCHECK_OK(msh_comm_barrier(c));
  /* split into even and odd ranks, reversed */
  msh_comm *s = NULL;
  TCHECK_OK(msh_comm_split(&s, c, r % 2, -r));
  if (s) {
    int n = (W - r % 2 + 1) / 2;
    TCHECK(msh_comm_size(s) == n);
    TCHECK(msh_comm_world_rank(s, msh_comm_rank(s)) == r);
    TCHECK(msh_comm_world_rank(s, 0) == ((W - 1) % 2 == r % 2 ? W - 1 : W - 2));
    msh_tensor *t = dev_randn(r, MSH_F32, 5, 1);
    TCHECK_OK(msh_comm_all_reduce(s, t, MSH_REDUCE_SUM));
    float *got = download(t), *one = host_values(MSH_F32, 5, 1);
    for (int i = 0; i < 5; i++) TCHECK(fabs(got[i] - n * one[i]) < 1e-5 * (1 + fabs(n * one[i])));
    free(got);
    free(one);
    msh_tensor_free(t);
    msh_comm_free(s);
  }
  msh_comm_free(c);
  return NULL;
}

int main(void) {
  int n = 0;
  if (!msh_has_nccl() || msh_device_count(MSH_CUDA, &n) != MSH_OK || n == 0) {
    printf("test_nccl: no NCCL or no CUDA device, skipped\n");
    return 77;
  }
  W = n < MAXW ? n : MAXW;
  CHECK_OK(msh_nccl_unique_id(id));
  pthread_t th[MAXW];
  pthread_barrier_init(&bar, NULL, (unsigned)W);
  for (int r = 0; r < W; r++) pthread_create(&th[r], NULL, rank_main, (void *)(intptr_t)r);
  for (int r = 0; r < W; r++) pthread_join(th[r], NULL);
  printf("test_nccl: %d ranks\n", W);
  return check_done("test_nccl");
}
