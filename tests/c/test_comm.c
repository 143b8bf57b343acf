/* test_comm.c: the TCP communicator on 2, 3 and 4 ranks (one thread per rank, loopback only):
 * every collective against a float64 reference on random inputs of odd sizes, subgroups,
 * send/recv, and the failures: a peer that exits, a peer that stalls (timeout), abort from
 * another thread, a wrong world size, an unreachable rank, mismatched sizes, bad arguments;
 * the event ring (records in call order with op, bytes, peer and duration; a full ring drops
 * the oldest; off by default and after capacity 0). */
#define _GNU_SOURCE
#include "check.h"

#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

enum { MAXW = 4 };

/* ------------------------------------------------------------------------ thread worlds */

typedef struct rank_ctx rank_ctx;
typedef void (*rank_fn)(rank_ctx *);

struct rank_ctx {
  int rank, world;
  msh_comm *c;
  const void *arg;        /* test-specific input */
  double err;             /* test-specific result: largest error */
  int flag;               /* test-specific result */
  msh_status st;          /* first failing status in the thread */
  char msg[1024];         /* its message */
  rank_fn fn;
  msh_tcp_listener *l;
  const char **addrs;
  int wrong_world;        /* for the world-size test: claim this world size instead */
  double timeout;
};

static void note(rank_ctx *x, msh_status s) {
  if (s != MSH_OK && x->st == MSH_OK) {
    x->st = s;
    snprintf(x->msg, sizeof x->msg, "%s", msh_last_error());
  }
}

static void *connect_main(void *p) {
  rank_ctx *x = p;
  note(x, msh_comm_new_tcp(&x->c, x->l, x->rank, x->wrong_world ? x->wrong_world : x->world, x->addrs,
                           x->timeout));
  return NULL;
}

static void *run_main(void *p) {
  rank_ctx *x = p;
  x->fn(x);
  return NULL;
}

/* Runs fn on every rank of ctx[0..W) in parallel threads. */
static void run_all(rank_ctx *ctx, int W, void *(*main_fn)(void *)) {
  pthread_t th[MAXW];
  for (int r = 0; r < W; r++) pthread_create(&th[r], NULL, main_fn, &ctx[r]);
  for (int r = 0; r < W; r++) pthread_join(th[r], NULL);
}

static char addr_buf[MAXW][64];
static const char *addr_tab[MAXW];

/* Makes W connected ranks; returns 1 on success. */
static int make_world(rank_ctx *ctx, int W, double timeout) {
  memset(ctx, 0, sizeof(rank_ctx) * W);
  for (int r = 0; r < W; r++) {
    ctx[r].rank = r;
    ctx[r].world = W;
    ctx[r].timeout = timeout;
    CHECK_OK(msh_tcp_listen(&ctx[r].l, "127.0.0.1", 0));
    snprintf(addr_buf[r], sizeof addr_buf[r], "127.0.0.1:%d", msh_tcp_listener_port(ctx[r].l));
    addr_tab[r] = addr_buf[r];
    ctx[r].addrs = addr_tab;
  }
  run_all(ctx, W, connect_main);
  int ok = 1;
  for (int r = 0; r < W; r++) {
    msh_tcp_listener_free(ctx[r].l);
    ctx[r].l = NULL;
    if (ctx[r].st != MSH_OK) {
      fprintf(stderr, "rank %d of %d: %s\n", r, W, ctx[r].msg);
      ok = 0;
    }
  }
  CHECK(ok);
  return ok;
}

static void free_world(rank_ctx *ctx, int W) {
  for (int r = 0; r < W; r++) msh_comm_free(ctx[r].c);
}

/* Runs fn on every rank and checks that no call failed. */
static void run_ok(rank_ctx *ctx, int W, rank_fn fn, const void *arg, const char *what) {
  for (int r = 0; r < W; r++) {
    ctx[r].fn = fn;
    ctx[r].arg = arg;
    ctx[r].err = 0;
    ctx[r].flag = 0;
    ctx[r].st = MSH_OK;
  }
  run_all(ctx, W, run_main);
  for (int r = 0; r < W; r++) {
    if (ctx[r].st != MSH_OK) fprintf(stderr, "%s on %d ranks, rank %d: %s\n", what, W, r, ctx[r].msg);
    CHECK(ctx[r].st == MSH_OK);
  }
}

static msh_tensor *tensor1(int dtype, int64_t n) {
  msh_tensor *t = NULL;
  TCHECK_OK(msh_tensor_new(&t, dtype, 1, &n, MSH_CPU, 0));
  return t;
}

static msh_tensor *randn1(int64_t n, uint64_t seed) {
  msh_tensor *t = tensor1(MSH_F32, n);
  TCHECK_OK(msh_tensor_randn(t, seed, 0, 1));
  return t;
}

static double max_rel_err(const float *got, const double *want, int64_t n) {
  double m = 0;
  for (int64_t i = 0; i < n; i++) {
    double e = fabs(got[i] - want[i]) / (1 + fabs(want[i]));
    if (!(e <= m)) m = e; /* NaN propagates as a large error */
  }
  return m;
}

/* ---------------------------------------------------------------------------- collectives */

typedef struct {
  int64_t n;
  uint64_t seed;
  int op;
  int root;
} job_t;

static uint64_t seed_of(const job_t *j, int rank) { return j->seed * 131 + (uint64_t)rank; }

/* all_reduce: the reference sums (or maxes) every rank's input in float64; every rank must hold
 * the same bits. */
static float *ar_result[MAXW];

static void do_all_reduce(rank_ctx *x) {
  const job_t *j = x->arg;
  msh_tensor *t = randn1(j->n, seed_of(j, x->rank));
  note(x, msh_comm_all_reduce(x->c, t, j->op));
  double *ref = calloc((size_t)j->n, sizeof(double));
  for (int r = 0; r < x->world; r++) {
    msh_tensor *in = randn1(j->n, seed_of(j, r));
    const float *p = msh_tensor_data(in);
    for (int64_t i = 0; i < j->n; i++) {
      if (j->op == MSH_REDUCE_SUM) ref[i] += p[i];
      else ref[i] = r == 0 || p[i] > ref[i] ? p[i] : ref[i];
    }
    msh_tensor_free(in);
  }
  x->err = max_rel_err(msh_tensor_data(t), ref, j->n);
  if (j->op == MSH_REDUCE_SUM) {
    /* all_reduce_add: acc += the same sum */
    msh_tensor *in = randn1(j->n, seed_of(j, x->rank)), *acc = randn1(j->n, j->seed * 977 + (uint64_t)x->rank);
    const float *a = msh_tensor_data(acc);
    double *sum = malloc(sizeof(double) * (size_t)j->n);
    for (int64_t i = 0; i < j->n; i++) sum[i] = ref[i], ref[i] += a[i];
    note(x, msh_comm_all_reduce_add(x->c, acc, in));
    double e = max_rel_err(a, ref, j->n);
    if (!(e <= x->err)) x->err = e;
    /* all_reduce_add_norm: once more, then out = rmsnorm(acc) * w */
    msh_tensor *in2 = randn1(j->n, seed_of(j, x->rank)), *out = tensor1(MSH_F32, j->n), *w = randn1(j->n, 5);
    for (int64_t i = 0; i < j->n; i++) ref[i] += sum[i];
    free(sum);
    note(x, msh_comm_all_reduce_add_norm(x->c, acc, in2, out, w, 1e-5f));
    double ss = 0;
    for (int64_t i = 0; i < j->n; i++) ss += ref[i] * ref[i];
    double inv = 1 / sqrt(ss / (double)j->n + 1e-5);
    e = max_rel_err(a, ref, j->n);
    if (!(e <= x->err)) x->err = e;
    const float *wv = msh_tensor_data(w);
    for (int64_t i = 0; i < j->n; i++) ref[i] = ref[i] * inv * wv[i];
    e = max_rel_err(msh_tensor_data(out), ref, j->n);
    if (!(e <= x->err)) x->err = e;
    msh_tensor_free(in2);
    msh_tensor_free(out);
    msh_tensor_free(w);
    msh_tensor_free(in);
    msh_tensor_free(acc);
  }
  ar_result[x->rank] = malloc(sizeof(float) * (size_t)j->n);
  memcpy(ar_result[x->rank], msh_tensor_data(t), sizeof(float) * (size_t)j->n);
  free(ref);
  msh_tensor_free(t);
}

static void do_all_reduce_i32(rank_ctx *x) {
  const job_t *j = x->arg;
  msh_tensor *t = tensor1(MSH_I32, j->n);
  int32_t *p = msh_tensor_data(t);
  for (int64_t i = 0; i < j->n; i++) p[i] = (int32_t)(i * (x->rank + 1) - 7 * x->rank);
  note(x, msh_comm_all_reduce(x->c, t, MSH_REDUCE_SUM));
  int bad = 0;
  for (int64_t i = 0; i < j->n; i++) {
    int64_t want = 0;
    for (int r = 0; r < x->world; r++) want += i * (r + 1) - 7 * r;
    bad += p[i] != want;
  }
  x->flag = bad;
  msh_tensor_free(t);
}

static void do_all_gather(rank_ctx *x) {
  const job_t *j = x->arg;
  int W = x->world;
  msh_tensor *in = randn1(j->n, seed_of(j, x->rank)), *out = tensor1(MSH_F32, j->n * W);
  note(x, msh_comm_all_gather(x->c, out, in));
  /* in place: the input is this rank's own slice of the output */
  msh_tensor *out2 = tensor1(MSH_F32, j->n * W), *own = NULL;
  note(x, msh_tensor_narrow(&own, out2, 0, j->n * x->rank, j->n));
  if (own) msh_tensor_copy(own, in);
  note(x, msh_comm_all_gather(x->c, out2, own));
  double err = 0;
  for (int r = 0; r < W; r++) {
    msh_tensor *want = randn1(j->n, seed_of(j, r));
    const float *a = msh_tensor_data(want), *b = (const float *)msh_tensor_data(out) + j->n * r,
                *c = (const float *)msh_tensor_data(out2) + j->n * r;
    for (int64_t i = 0; i < j->n; i++)
      if (a[i] != b[i] || a[i] != c[i]) err = 1;
    msh_tensor_free(want);
  }
  x->err = err;
  msh_tensor_free(own);
  msh_tensor_free(out2);
  msh_tensor_free(in);
  msh_tensor_free(out);
}

static void do_reduce_scatter(rank_ctx *x) {
  const job_t *j = x->arg;
  int W = x->world;
  msh_tensor *in = randn1(j->n * W, seed_of(j, x->rank)), *out = tensor1(MSH_F32, j->n);
  note(x, msh_comm_reduce_scatter(x->c, out, in, MSH_REDUCE_SUM));
  double *ref = calloc((size_t)j->n, sizeof(double));
  for (int r = 0; r < W; r++) {
    msh_tensor *t = randn1(j->n * W, seed_of(j, r));
    const float *p = (const float *)msh_tensor_data(t) + j->n * x->rank;
    for (int64_t i = 0; i < j->n; i++) ref[i] += p[i];
    msh_tensor_free(t);
  }
  x->err = max_rel_err(msh_tensor_data(out), ref, j->n);
  free(ref);
  msh_tensor_free(in);
  msh_tensor_free(out);
}

static void do_broadcast(rank_ctx *x) {
  const job_t *j = x->arg;
  msh_tensor *t = randn1(j->n, seed_of(j, x->rank));
  note(x, msh_comm_broadcast(x->c, t, j->root));
  msh_tensor *want = randn1(j->n, seed_of(j, j->root));
  x->err = memcmp(msh_tensor_data(t), msh_tensor_data(want), sizeof(float) * (size_t)j->n) != 0;
  msh_tensor_free(want);
  msh_tensor_free(t);
}

/* A ring of sends: rank r sends its tensor to r + 1 and receives r - 1's. Rank 0 sends first,
 * the others receive first, so large tensors cannot deadlock. */
static void do_send_recv(rank_ctx *x) {
  const job_t *j = x->arg;
  int W = x->world, r = x->rank;
  msh_tensor *mine = randn1(j->n, seed_of(j, r)), *got = tensor1(MSH_F32, j->n);
  if (r == 0) {
    note(x, msh_comm_send(x->c, mine, 1 % W));
    note(x, msh_comm_recv(x->c, got, W - 1));
  } else {
    note(x, msh_comm_recv(x->c, got, r - 1));
    note(x, msh_comm_send(x->c, mine, (r + 1) % W));
  }
  msh_tensor *want = randn1(j->n, seed_of(j, (r + W - 1) % W));
  x->err = memcmp(msh_tensor_data(got), msh_tensor_data(want), sizeof(float) * (size_t)j->n) != 0;
  msh_tensor_free(want);
  msh_tensor_free(mine);
  msh_tensor_free(got);
}

static void do_barrier(rank_ctx *x) {
  for (int i = 0; i < 5; i++) note(x, msh_comm_barrier(x->c));
}

/* Splits into even and odd ranks, ordered by descending rank (key = -rank); the last rank of a
 * world of 3 or more joins no group. Each group sums its ranks' numbers. */
static void do_split(rank_ctx *x) {
  int r = x->rank, W = x->world;
  int color = (W >= 3 && r == W - 1) ? MSH_COMM_NO_COLOR : r % 2;
  msh_comm *g = NULL;
  note(x, msh_comm_split(&g, x->c, color, -r));
  if (color == MSH_COMM_NO_COLOR) {
    x->flag = g == NULL ? 0 : 1;
    note(x, msh_comm_barrier(x->c));
    return;
  }
  if (!g) {
    x->flag = 1;
    return;
  }
  int members[MAXW], n = 0;
  for (int q = W - 1; q >= 0; q--)
    if (q % 2 == color && !(W >= 3 && q == W - 1)) members[n++] = q;
  int bad = msh_comm_size(g) != n;
  for (int i = 0; i < n && !bad; i++) bad |= msh_comm_world_rank(g, i) != members[i];
  bad |= msh_comm_world_rank(g, msh_comm_rank(g)) != r;
  msh_tensor *t = tensor1(MSH_F32, 3);
  float *p = msh_tensor_data(t);
  for (int i = 0; i < 3; i++) p[i] = (float)(r + 10 * i);
  note(x, msh_comm_all_reduce(g, t, MSH_REDUCE_SUM));
  for (int i = 0; i < 3; i++) {
    float want = 0;
    for (int k = 0; k < n; k++) want += (float)(members[k] + 10 * i);
    bad |= p[i] != want;
  }
  /* the parent still works after the split */
  note(x, msh_comm_barrier(x->c));
  x->flag = bad;
  msh_tensor_free(t);
  msh_comm_free(g);
}

static void collectives_on(int W) {
  rank_ctx ctx[MAXW];
  if (!make_world(ctx, W, 20)) return;
  for (int r = 0; r < W; r++) {
    CHECK(msh_comm_rank(ctx[r].c) == r);
    CHECK(msh_comm_size(ctx[r].c) == W);
    CHECK(msh_comm_kind(ctx[r].c) == MSH_COMM_TCP);
    CHECK(msh_comm_device(ctx[r].c) == MSH_CPU);
  }
  static const int64_t sizes[] = {1, 2, 3, 7, 1001, 300007};
  for (size_t k = 0; k < sizeof sizes / sizeof *sizes; k++) {
    job_t j = {sizes[k], 100 + k, MSH_REDUCE_SUM, 0};
    run_ok(ctx, W, do_all_reduce, &j, "all_reduce");
    for (int r = 0; r < W; r++) {
      CHECK(ctx[r].err < 1e-5);
      CHECK(memcmp(ar_result[r], ar_result[0], sizeof(float) * (size_t)j.n) == 0);
    }
    for (int r = 0; r < W; r++) free(ar_result[r]);
    j.op = MSH_REDUCE_MAX;
    run_ok(ctx, W, do_all_reduce, &j, "all_reduce max");
    for (int r = 0; r < W; r++) CHECK(ctx[r].err == 0);
    for (int r = 0; r < W; r++) free(ar_result[r]);
    if (sizes[k] > 100000) continue;
    run_ok(ctx, W, do_all_reduce_i32, &j, "all_reduce i32");
    for (int r = 0; r < W; r++) CHECK(ctx[r].flag == 0);
    run_ok(ctx, W, do_all_gather, &j, "all_gather");
    for (int r = 0; r < W; r++) CHECK(ctx[r].err == 0);
    run_ok(ctx, W, do_reduce_scatter, &j, "reduce_scatter");
    for (int r = 0; r < W; r++) CHECK(ctx[r].err < 1e-5);
    run_ok(ctx, W, do_send_recv, &j, "send/recv");
    for (int r = 0; r < W; r++) CHECK(ctx[r].err == 0);
  }
  /* broadcast from every root; 300007 floats span several pipelined segments */
  for (int root = 0; root < W; root++) {
    job_t j = {root == 1 ? 300007 : 13, 7, 0, root};
    run_ok(ctx, W, do_broadcast, &j, "broadcast");
    for (int r = 0; r < W; r++) CHECK(ctx[r].err == 0);
  }
  job_t big = {1 << 20, 9, 0, 0}; /* 4 MB each way: more than the socket buffers hold */
  run_ok(ctx, W, do_send_recv, &big, "send/recv (large)");
  for (int r = 0; r < W; r++) CHECK(ctx[r].err == 0);
  run_ok(ctx, W, do_barrier, NULL, "barrier");
  run_ok(ctx, W, do_split, NULL, "split");
  for (int r = 0; r < W; r++) CHECK(ctx[r].flag == 0);
  free_world(ctx, W);
}

/* ------------------------------------------------------------------------------- failures */

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

static void do_reduce_then_record(rank_ctx *x) {
  msh_tensor *t = randn1(1000, 1);
  double t0 = now_s();
  note(x, msh_comm_all_reduce(x->c, t, MSH_REDUCE_SUM));
  x->err = now_s() - t0;
  msh_tensor_free(t);
}

static void do_exit_early(rank_ctx *x) {
  msh_comm_free(x->c); /* this rank "dies": its connections close */
  x->c = NULL;
}

static void do_stall(rank_ctx *x) {
  (void)x;
  sleep_ms(800);
}

static rank_ctx *abort_target;
static void *abort_later(void *p) {
  (void)p;
  sleep_ms(150);
  msh_comm_abort(abort_target->c);
  return NULL;
}

static void do_mixed(rank_ctx *x) {
  /* rank 0 runs the job in arg (a function), the others do_stall or do_exit_early */
  rank_fn f = x->rank == 0 ? do_reduce_then_record : (rank_fn)x->arg;
  f(x);
}

static void do_size_mismatch(rank_ctx *x) {
  msh_tensor *t = tensor1(MSH_F32, x->rank == 0 ? 100 : 200);
  if (x->rank == 0) note(x, msh_comm_send(x->c, t, 1));
  else note(x, msh_comm_recv(x->c, t, 0));
  msh_tensor_free(t);
}

static void failures(void) {
  rank_ctx ctx[MAXW];

  /* a peer that exits: the survivor fails at once, naming it */
  if (make_world(ctx, 2, 20)) {
    for (int r = 0; r < 2; r++) {
      ctx[r].fn = do_mixed;
      ctx[r].arg = (const void *)do_exit_early;
    }
    run_all(ctx, 2, run_main);
    CHECK(ctx[0].st == MSH_EIO);
    CHECK(strstr(ctx[0].msg, "rank 1") && strstr(ctx[0].msg, "closed the connection"));
    CHECK(ctx[0].err < 5);
    /* broken: later calls fail at once with the first message */
    CHECK_STATUS(msh_comm_barrier(ctx[0].c), MSH_EIO);
    CHECK(strstr(msh_last_error(), "broken") && strstr(msh_last_error(), "closed the connection"));
    free_world(ctx, 2);
  }

  /* a peer that stalls: the timeout names it */
  if (make_world(ctx, 2, 0.3)) {
    for (int r = 0; r < 2; r++) {
      ctx[r].fn = do_mixed;
      ctx[r].arg = (const void *)do_stall;
    }
    run_all(ctx, 2, run_main);
    CHECK(ctx[0].st == MSH_EIO);
    CHECK(strstr(ctx[0].msg, "timed out after 0.3 s") && strstr(ctx[0].msg, "rank 1"));
    CHECK(ctx[0].err >= 0.25 && ctx[0].err < 5);
    free_world(ctx, 2);
  }

  /* abort from another thread wakes a blocked call */
  if (make_world(ctx, 2, 20)) {
    for (int r = 0; r < 2; r++) {
      ctx[r].fn = do_mixed;
      ctx[r].arg = (const void *)do_stall;
    }
    abort_target = &ctx[0];
    pthread_t th;
    pthread_create(&th, NULL, abort_later, NULL);
    run_all(ctx, 2, run_main);
    pthread_join(th, NULL);
    CHECK(ctx[0].st == MSH_EIO);
    CHECK(strstr(ctx[0].msg, "aborted") != NULL);
    CHECK(ctx[0].err < 2);
    free_world(ctx, 2);
  }

  /* mismatched send/recv sizes */
  if (make_world(ctx, 2, 5)) {
    for (int r = 0; r < 2; r++) ctx[r].fn = do_size_mismatch;
    run_all(ctx, 2, run_main);
    CHECK(ctx[1].st == MSH_EIO);
    CHECK(strstr(ctx[1].msg, "rank 0 sent 400 bytes, rank 1 expected 800") != NULL);
    free_world(ctx, 2);
  }

  /* a wrong world size: rank 1 believes in 3 ranks */
  memset(ctx, 0, sizeof ctx);
  for (int r = 0; r < 2; r++) {
    ctx[r].rank = r;
    ctx[r].world = 2;
    ctx[r].timeout = 1;
    CHECK_OK(msh_tcp_listen(&ctx[r].l, "127.0.0.1", 0));
    snprintf(addr_buf[r], sizeof addr_buf[r], "127.0.0.1:%d", msh_tcp_listener_port(ctx[r].l));
    addr_tab[r] = addr_buf[r];
    ctx[r].addrs = addr_tab;
  }
  addr_tab[2] = "127.0.0.1:1"; /* rank 2 never exists */
  ctx[1].wrong_world = 3;
  double t0 = now_s();
  run_all(ctx, 2, connect_main);
  CHECK(now_s() - t0 < 5);
  CHECK(ctx[0].st == MSH_EIO && strstr(ctx[0].msg, "world of 3 ranks, rank 0 has 2"));
  CHECK(ctx[1].st == MSH_EIO);
  CHECK(ctx[0].c == NULL && ctx[1].c == NULL);
  for (int r = 0; r < 2; r++) msh_tcp_listener_free(ctx[r].l);

  /* an unreachable rank: nothing listens on its port */
  msh_tcp_listener *l0 = NULL, *l1 = NULL;
  CHECK_OK(msh_tcp_listen(&l0, "127.0.0.1", 0));
  CHECK_OK(msh_tcp_listen(&l1, "127.0.0.1", 0));
  char dead[64];
  snprintf(dead, sizeof dead, "127.0.0.1:%d", msh_tcp_listener_port(l0));
  msh_tcp_listener_free(l0); /* its port is now closed */
  const char *addrs[2] = {dead, NULL};
  msh_comm *c = NULL;
  t0 = now_s();
  CHECK_STATUS(msh_comm_new_tcp(&c, l1, 1, 2, addrs, 0.5), MSH_EIO);
  double took = now_s() - t0;
  CHECK(took >= 0.45 && took < 3);
  char want[128];
  snprintf(want, sizeof want, "cannot connect to rank 0 at %s within 0.5 s", dead);
  CHECK(strstr(msh_last_error(), want) != NULL);
  CHECK(c == NULL);
  /* rank 0 waiting for a rank that never comes names it */
  CHECK_STATUS(msh_comm_new_tcp(&c, l1, 0, 3, (const char *[]){NULL, "127.0.0.1:1", "127.0.0.1:1"}, 0.3),
               MSH_EIO);
  CHECK(strstr(msh_last_error(), "waiting for ranks 1, 2 to connect") != NULL);
  msh_tcp_listener_free(l1);
}

static void bad_arguments(void) {
  rank_ctx ctx[2];
  if (!make_world(ctx, 2, 5)) return;
  msh_comm *c = ctx[0].c;
  msh_tensor *t = tensor1(MSH_F32, 6), *h = tensor1(MSH_F16, 6), *tt = NULL, *wrong = tensor1(MSH_F32, 5);
  int64_t shape[2] = {2, 3};
  msh_tensor *m = NULL;
  CHECK_OK(msh_tensor_reshape(&m, t, 2, shape));
  CHECK_OK(msh_tensor_transpose(&tt, m, 0, 1));
  CHECK_STATUS(msh_comm_all_reduce(c, tt, MSH_REDUCE_SUM), MSH_EINVAL);
  CHECK(strstr(msh_last_error(), "not contiguous") != NULL);
  CHECK_STATUS(msh_comm_all_reduce(c, h, MSH_REDUCE_SUM), MSH_EUNSUPPORTED);
  CHECK_STATUS(msh_comm_all_reduce(c, t, 7), MSH_EINVAL);
  CHECK_STATUS(msh_comm_all_reduce_add(c, wrong, t), MSH_EINVAL);
  CHECK(strstr(msh_last_error(), "acc holds 5 elements, tensor 6") != NULL);
  CHECK_STATUS(msh_comm_all_reduce_add(c, h, t), MSH_EINVAL);
  CHECK(msh_comm_capturable(c, MSH_COMM_OP_ALL_REDUCE, t) == 0);
  CHECK(msh_comm_capturable(c, MSH_COMM_OP_ALL_GATHER, t) == 0);
  CHECK_STATUS(msh_comm_all_reduce_add_norm(c, t, t, wrong, t, 1e-5f), MSH_EINVAL);
  CHECK(strstr(msh_last_error(), "out must have acc's 6 elements") != NULL);
  CHECK_STATUS(msh_comm_all_reduce_add_norm(c, t, t, t, NULL, 1e-5f), MSH_EINVAL);
  CHECK_STATUS(msh_comm_all_gather(c, wrong, t), MSH_EINVAL);
  CHECK_STATUS(msh_comm_all_gather(c, t, h), MSH_EINVAL);
  CHECK_STATUS(msh_comm_reduce_scatter(c, t, wrong, MSH_REDUCE_SUM), MSH_EINVAL);
  CHECK_STATUS(msh_comm_broadcast(c, t, 2), MSH_EINVAL);
  CHECK_STATUS(msh_comm_send(c, t, 0), MSH_EINVAL);
  CHECK_STATUS(msh_comm_recv(c, t, -1), MSH_EINVAL);
  CHECK_STATUS(msh_comm_split(NULL, c, 0, 0), MSH_EINVAL);
  msh_comm *g = NULL;
  CHECK_STATUS(msh_comm_split(&g, c, -5, 0), MSH_EINVAL);
  /* argument errors do not break the communicator */
  CHECK_STATUS(msh_comm_all_reduce(NULL, t, MSH_REDUCE_SUM), MSH_EINVAL);
  msh_comm_set_timeout(c, 2.5);
  CHECK(msh_comm_timeout(c) == 2.5);
  CHECK(msh_comm_world_rank(c, 1) == 1 && msh_comm_world_rank(c, 2) == -1);
  msh_tensor_free(t);
  msh_tensor_free(h);
  msh_tensor_free(m);
  msh_tensor_free(tt);
  msh_tensor_free(wrong);
  run_ok(ctx, 2, do_barrier, NULL, "barrier after argument errors");
  /* counters: the five barriers above; failed argument checks are not calls */
  uint64_t calls = 0, bytes = 1;
  double secs = -1;
  CHECK_OK(msh_comm_stats(c, MSH_COMM_OP_BARRIER, &calls, &bytes, &secs));
  CHECK(calls == 5 && bytes == 0 && secs >= 0);
  CHECK_OK(msh_comm_stats(c, MSH_COMM_OP_ALL_REDUCE, &calls, NULL, NULL));
  CHECK(calls == 0);
  job_t j = {1001, 5, MSH_REDUCE_SUM, 0};
  run_ok(ctx, 2, do_all_reduce, &j, "all_reduce for the counters");
  for (int r = 0; r < 2; r++) free(ar_result[r]);
  CHECK_OK(msh_comm_stats(c, MSH_COMM_OP_ALL_REDUCE, &calls, &bytes, &secs));
  CHECK(calls == 3 && bytes == 12012 && secs > 0); /* all_reduce, all_reduce_add, all_reduce_add_norm */
  CHECK_STATUS(msh_comm_stats(c, MSH_COMM_OP_COUNT, &calls, NULL, NULL), MSH_EINVAL);
  msh_comm_reset_stats(c);
  CHECK_OK(msh_comm_stats(c, MSH_COMM_OP_ALL_REDUCE, &calls, &bytes, &secs));
  CHECK(calls == 0 && bytes == 0 && secs == 0);
  free_world(ctx, 2);

  msh_comm_free(NULL);
  msh_comm_abort(NULL);
  msh_tcp_listener_free(NULL);
  msh_comm *cc = NULL;
  CHECK_STATUS(msh_comm_new_tcp(&cc, NULL, 0, 1, NULL, 1), MSH_EINVAL);
  msh_tcp_listener *l = NULL;
  CHECK_OK(msh_tcp_listen(&l, NULL, 0));
  CHECK(msh_tcp_listener_port(l) > 0);
  CHECK_STATUS(msh_comm_new_tcp(&cc, l, 2, 2, (const char *[]){"a:1", "b:2"}, 1), MSH_EINVAL);
  /* a world of one needs no peers */
  CHECK_OK(msh_comm_new_tcp(&cc, l, 0, 1, (const char *[]){NULL}, 1));
  msh_tensor *one = randn1(4, 3);
  CHECK_OK(msh_comm_all_reduce(cc, one, MSH_REDUCE_SUM));
  CHECK_OK(msh_comm_barrier(cc));
  msh_tensor_free(one);
  msh_comm_free(cc);
  msh_tcp_listener_free(l);

  uint8_t id[MSH_NCCL_ID_BYTES];
  if (!msh_has_nccl()) {
    CHECK_STATUS(msh_nccl_unique_id(id), MSH_EUNSUPPORTED);
    CHECK_STATUS(msh_comm_new_nccl(&cc, 0, 1, id, 0), MSH_EUNSUPPORTED);
  }
}

/* --------------------------------------------------------------------------------- events */

enum { EV_MAX = 16 };

typedef struct {
  int n;
  int op[EV_MAX], peer[EV_MAX], device[EV_MAX];
  uint64_t bytes[EV_MAX], dropped;
  double t[EV_MAX], seconds[EV_MAX];
} ev_batch;

static void drain(rank_ctx *x, ev_batch *b, int max) {
  note(x, msh_comm_drain_events(x->c, max, 0, b->op, b->bytes, b->peer, b->t, b->seconds, b->device, &b->n,
                                &b->dropped));
}

static ev_batch ev_got[MAXW][3];

/* Rank 1 enters the first all_reduce 60 ms late: rank 0's record of it must show the wait. Then a
 * broadcast from rank 1, a send/recv pair, events off for one call, and a ring of 4 overrun by 6
 * barriers. */
static void do_events(rank_ctx *x) {
  int r = x->rank;
  ev_batch *b = ev_got[r];
  memset(b, 0, sizeof(ev_batch) * 3);
  note(x, msh_comm_set_events(x->c, 8));
  msh_tensor *t = randn1(5, 7);
  if (r == 1) sleep_ms(60);
  note(x, msh_comm_all_reduce(x->c, t, MSH_REDUCE_SUM));
  note(x, msh_comm_broadcast(x->c, t, 1));
  if (r == 0) note(x, msh_comm_send(x->c, t, 1));
  else note(x, msh_comm_recv(x->c, t, 0));
  drain(x, &b[0], 2); /* the first two only */
  drain(x, &b[1], EV_MAX);
  note(x, msh_comm_set_events(x->c, 0));
  note(x, msh_comm_all_reduce(x->c, t, MSH_REDUCE_SUM)); /* not recorded */
  note(x, msh_comm_set_events(x->c, 4));
  for (int i = 0; i < 6; i++) note(x, msh_comm_barrier(x->c));
  drain(x, &b[2], EV_MAX);
  note(x, msh_comm_set_events(x->c, 0));
  msh_tensor_free(t);
}

static void events(void) {
  rank_ctx ctx[MAXW];
  if (!make_world(ctx, 2, 10)) return;
  run_ok(ctx, 2, do_events, NULL, "events");
  for (int r = 0; r < 2; r++) {
    ev_batch *b = ev_got[r];
    CHECK(b[0].n == 2 && b[1].n == 1 && b[2].n == 4);
    CHECK(b[0].op[0] == MSH_COMM_OP_ALL_REDUCE && b[0].bytes[0] == 5 * sizeof(float) && b[0].peer[0] == -1);
    CHECK(b[0].op[1] == MSH_COMM_OP_BROADCAST && b[0].peer[1] == 1 && b[0].bytes[1] == 5 * sizeof(float));
    CHECK(b[1].op[0] == (r == 0 ? MSH_COMM_OP_SEND : MSH_COMM_OP_RECV) && b[1].peer[0] == 1 - r);
    CHECK(b[0].dropped == 0 && b[1].dropped == 0 && b[2].dropped == 2);
    CHECK(b[0].t[0] <= b[0].t[1] && b[0].t[1] <= b[1].t[0]);
    for (int i = 0; i < 4; i++) CHECK(b[2].op[i] == MSH_COMM_OP_BARRIER && b[2].bytes[i] == 0);
    for (int k = 0; k < 3; k++)
      for (int i = 0; i < b[k].n; i++) CHECK(b[k].seconds[i] >= 0 && b[k].seconds[i] < 5 && b[k].device[i] == 0);
  }
  /* rank 0 waited for the late rank inside its all_reduce; rank 1 did not */
  CHECK(ev_got[0][0].seconds[0] > 0.04);
  CHECK(ev_got[1][0].seconds[0] < ev_got[0][0].seconds[0]);
  CHECK_STATUS(msh_comm_set_events(ctx[0].c, -1), MSH_EINVAL);
  int n = -1;
  CHECK_STATUS(msh_comm_drain_events(ctx[0].c, -1, 0, NULL, NULL, NULL, NULL, NULL, NULL, &n, NULL), MSH_EINVAL);
  CHECK_STATUS(msh_comm_drain_events(NULL, 1, 0, NULL, NULL, NULL, NULL, NULL, NULL, &n, NULL), MSH_EINVAL);
  CHECK_OK(msh_comm_drain_events(ctx[0].c, 4, 1, NULL, NULL, NULL, NULL, NULL, NULL, &n, NULL));
  CHECK(n == 0);
  free_world(ctx, 2);
}

int main(void) {
  for (int W = 2; W <= MAXW; W++) collectives_on(W);
  failures();
  bad_arguments();
  events();
  return check_done("test_comm");
}
