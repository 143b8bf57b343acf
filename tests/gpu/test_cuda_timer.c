/* test_cuda_timer.c: device timers on a GPU (CUDA events on the device's stream) and the NCCL
 * communicator's event ring.
 *   - a span over queued matmuls reads as pending before the device gets there, then as a
 *     positive time no longer than the host's wall time around the same work;
 *   - timers of different devices do not mix; recording during a graph capture refuses without
 *     breaking the capture;
 *   - on 2 GPUs: rank 1 enters an all-reduce behind ~50 ms of matmuls; rank 0's record of it is
 *     device-timed and shows the wait; records come out in call order with op, bytes and peers.
 * Exits 77 (skipped) without a CUDA device. */
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "check.h"
#include "gpu_helpers.h"
#include "moonshard.h"

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* A few tens of milliseconds of device work: k matmuls of 4096^3 (bf16 weights). */
typedef struct {
  msh_tensor *x, *w, *o;
} work;

static work work_new(int device_index) {
  int64_t sq[2] = {4096, 4096};
  work k = {0};
  CHECK_OK(msh_tensor_new(&k.x, MSH_F32, 2, sq, MSH_CUDA, device_index));
  CHECK_OK(msh_tensor_new(&k.w, MSH_BF16, 2, sq, MSH_CUDA, device_index));
  CHECK_OK(msh_tensor_new(&k.o, MSH_F32, 2, sq, MSH_CUDA, device_index));
  if (k.x && k.w) {
    CHECK_OK(msh_tensor_randn(k.x, fresh_seed(), 0, 1));
    CHECK_OK(msh_tensor_randn(k.w, fresh_seed(), 0, 0.02f));
  }
  return k;
}

static void work_run(work *k, int times) {
  for (int i = 0; i < times; i++) CHECK_OK(msh_op_matmul(k->o, k->x, k->w));
}

static void work_free(work *k) {
  msh_tensor_free(k->x);
  msh_tensor_free(k->w);
  msh_tensor_free(k->o);
}

static void timers(void) {
  msh_timer *a = NULL, *b = NULL, *h = NULL;
  CHECK_OK(msh_timer_new(&a, MSH_CUDA, 0));
  CHECK_OK(msh_timer_new(&b, MSH_CUDA, 0));
  CHECK_OK(msh_timer_new(&h, MSH_CPU, 0));
  if (!a || !b || !h) return;
  work k = work_new(0);
  work_run(&k, 2); /* warm-up: cuBLAS handles, scratch */
  CHECK_OK(msh_device_sync(MSH_CUDA, 0));
  double t0 = now_s();
  CHECK_OK(msh_timer_record(a));
  work_run(&k, 40);
  CHECK_OK(msh_timer_record(b));
  double s = 0;
  int done = 1;
  CHECK_OK(msh_timer_done(b, &done));
  CHECK(done == 0);
  CHECK_OK(msh_timer_elapsed(a, b, 0, &s));
  CHECK(s == -1);
  CHECK_OK(msh_device_sync(MSH_CUDA, 0));
  double wall = now_s() - t0;
  CHECK_OK(msh_timer_done(b, &done));
  CHECK(done == 1);
  CHECK_OK(msh_timer_elapsed(a, b, 0, &s));
  printf("40 matmuls 4096^3: %.3f ms on the device, %.3f ms on the host\n", s * 1e3, wall * 1e3);
  CHECK(s > 0 && s <= wall * 1.01 + 1e-4);
  double s2 = 0;
  CHECK_OK(msh_timer_elapsed(a, b, 1, &s2));
  CHECK(s2 == s);
  /* devices do not mix */
  CHECK_OK(msh_timer_record(h));
  CHECK_STATUS(msh_timer_elapsed(h, b, 0, &s), MSH_EINVAL);
  /* no timestamps inside a graph; the capture survives */
  CHECK_OK(msh_graph_begin(MSH_CUDA, 0));
  CHECK_STATUS(msh_timer_record(a), MSH_EINVAL);
  work_run(&k, 1);
  msh_graph *g = NULL;
  CHECK_OK(msh_graph_end(MSH_CUDA, 0, &g));
  CHECK_OK(msh_timer_record(a));
  CHECK_OK(msh_graph_launch(g));
  CHECK_OK(msh_timer_record(b));
  CHECK_OK(msh_timer_elapsed(a, b, 1, &s));
  CHECK(s > 0);
  msh_graph_free(g);
  work_free(&k);
  msh_timer_free(a);
  msh_timer_free(b);
  msh_timer_free(h);
}

/* ------------------------------------------------------------------------- NCCL events */


static uint8_t id[MSH_NCCL_ID_BYTES];
static double ar_seconds[2], late_seconds;

static void *rank_main(void *p) {
  int r = (int)(intptr_t)p;
  msh_comm *c = NULL;
  TCHECK_OK(msh_comm_new_nccl(&c, r, 2, id, r));
  if (!c) return NULL;
  int64_t n = 1 << 16;
  msh_tensor *t = NULL;
  TCHECK_OK(msh_tensor_new(&t, MSH_F32, 1, &n, MSH_CUDA, r));
  work k = work_new(r);
  work_run(&k, 2);
  TCHECK_OK(msh_comm_all_reduce(c, t, MSH_REDUCE_SUM)); /* NCCL's own warm-up */
  TCHECK_OK(msh_device_sync(MSH_CUDA, r));
  TCHECK_OK(msh_comm_barrier(c));
  TCHECK_OK(msh_comm_set_events(c, 16));
  msh_timer *a = NULL, *b = NULL;
  TCHECK_OK(msh_timer_new(&a, MSH_CUDA, r));
  TCHECK_OK(msh_timer_new(&b, MSH_CUDA, r));
  TCHECK_OK(msh_timer_record(a));
  if (r == 1) work_run(&k, 60); /* about 14 ms of matmuls on an H200 */
  TCHECK_OK(msh_timer_record(b));
  TCHECK_OK(msh_comm_all_reduce(c, t, MSH_REDUCE_SUM));
  TCHECK_OK(msh_comm_broadcast(c, t, 1));
  if (r == 0) TCHECK_OK(msh_comm_send(c, t, 1));
  else TCHECK_OK(msh_comm_recv(c, t, 0));
  TCHECK_OK(msh_device_sync(MSH_CUDA, r));
  int op[8], peer[8], dev[8], got = 0;
  uint64_t bytes[8], dropped = 9;
  double ts[8], secs[8];
  TCHECK_OK(msh_comm_drain_events(c, 8, 0, op, bytes, peer, ts, secs, dev, &got, &dropped));
  TCHECK(got == 3 && dropped == 0);
  if (got == 3) {
    TCHECK(op[0] == MSH_COMM_OP_ALL_REDUCE && op[1] == MSH_COMM_OP_BROADCAST);
    TCHECK(op[2] == (r == 0 ? MSH_COMM_OP_SEND : MSH_COMM_OP_RECV) && peer[2] == 1 - r && peer[1] == 1);
    TCHECK(bytes[0] == (uint64_t)n * 4 && bytes[2] == (uint64_t)n * 4);
    for (int i = 0; i < 3; i++) TCHECK(dev[i] == 1 && secs[i] > 0 && secs[i] < 5);
    TCHECK(ts[0] <= ts[1] && ts[1] <= ts[2]);
    ar_seconds[r] = secs[0];
  }
  if (r == 1) TCHECK_OK(msh_timer_elapsed(a, b, 1, &late_seconds));
  msh_timer_free(a);
  msh_timer_free(b);
  work_free(&k);
  msh_tensor_free(t);
  msh_comm_free(c);
  return NULL;
}

int main(void) {
  int n = 0;
  if (msh_device_count(MSH_CUDA, &n) != MSH_OK || n == 0) {
    printf("test_cuda_timer: no CUDA device, skipped\n");
    return 77;
  }
  timers();
  if (msh_has_nccl() && n >= 2) {
    CHECK_OK(msh_nccl_unique_id(id));
    pthread_t th[2];
    for (int r = 0; r < 2; r++) pthread_create(&th[r], NULL, rank_main, (void *)(intptr_t)r);
    for (int r = 0; r < 2; r++) pthread_join(th[r], NULL);
    printf("all-reduce on the device: rank 0 %.3f ms, rank 1 %.3f ms; rank 1 came %.3f ms late\n",
           ar_seconds[0] * 1e3, ar_seconds[1] * 1e3, late_seconds * 1e3);
    CHECK(ar_seconds[0] > 0.5 * late_seconds && late_seconds > 0.005);
    CHECK(ar_seconds[1] < ar_seconds[0]);
  } else {
    printf("test_cuda_timer: NCCL events need 2 GPUs, part skipped\n");
  }
  return check_done("test_cuda_timer");
}
