/* comm.c: communicators: operand checks, broken-state handling and dispatch to an engine
 * (TCP in core/cpu/comm_tcp.c, NCCL in core/cuda/comm_nccl.c), with the counters and the event
 * ring of every call (timed here for both engines: host time for TCP, CUDA events around the
 * enqueue for NCCL). */
#include "comm_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ------------------------------------------------------------------------------- head */

msh_status msh_comm_init_head(msh_comm *c, const msh_comm_vt *vt, int kind, int device,
                              int device_index, int rank, int size, const int *world_ranks,
                              double timeout) {
  c->vt = vt;
  c->kind = kind;
  c->device = device;
  c->device_index = device_index;
  c->rank = rank;
  c->size = size;
  c->timeout = timeout > 0 ? timeout : 300;
  c->broken = 0;
  c->error[0] = '\0';
  c->ring = NULL;
  c->ring_cap = 0;
  c->ring_head = c->ring_tail = c->ring_dropped = 0;
  msh_comm_reset_stats(c);
  c->world_ranks = malloc(sizeof(int) * (size_t)size);
  if (!c->world_ranks) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  for (int i = 0; i < size; i++) c->world_ranks[i] = world_ranks ? world_ranks[i] : i;
  return MSH_OK;
}

static void free_ring(msh_comm *c);

void msh_comm_free_head(msh_comm *c) {
  free(c->world_ranks);
  c->world_ranks = NULL;
  free_ring(c);
}

msh_status msh_comm_fail(msh_comm *c, msh_status s) {
  if (!__atomic_load_n(&c->broken, __ATOMIC_ACQUIRE)) {
    snprintf(c->error, sizeof c->error, "%s", msh_last_error());
    __atomic_store_n(&c->broken, 1, __ATOMIC_RELEASE);
  }
  return s;
}

/* ------------------------------------------------------------------------ constructors */

msh_status msh_comm_new_tcp(msh_comm **out, msh_tcp_listener *l, int rank, int world,
                            const char *const *addrs, double timeout_s) {
  if (!out || !l || !addrs) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (world < 1 || rank < 0 || rank >= world)
    return MSH_FAIL(MSH_EINVAL, "rank %d outside a world of %d", rank, world);
  if (!(timeout_s > 0)) return MSH_FAIL(MSH_EINVAL, "timeout must be positive (got %g)", timeout_s);
  for (int r = 0; r < world; r++)
    if (r != rank && !addrs[r]) return MSH_FAIL(MSH_EINVAL, "no address for rank %d", r);
  return msh_tcp_comm_new(out, l, rank, world, addrs, NULL, timeout_s);
}

int msh_has_nccl(void) {
#ifdef MSH_WITH_NCCL
  return 1;
#else
  return 0;
#endif
}

msh_status msh_nccl_unique_id(uint8_t *id) {
  if (!id) return MSH_FAIL(MSH_EINVAL, "NULL argument");
#ifdef MSH_WITH_NCCL
  return msh_nccl_get_unique_id(id);
#else
  return MSH_FAIL(MSH_EUNSUPPORTED, "this build has no NCCL");
#endif
}

msh_status msh_comm_new_nccl(msh_comm **out, int rank, int world, const uint8_t *id,
                             int device_index) {
  if (!out || !id) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (world < 1 || rank < 0 || rank >= world)
    return MSH_FAIL(MSH_EINVAL, "rank %d outside a world of %d", rank, world);
#ifdef MSH_WITH_NCCL
  return msh_nccl_comm_new(out, rank, world, id, device_index);
#else
  (void)device_index;
  return MSH_FAIL(MSH_EUNSUPPORTED, "this build has no NCCL");
#endif
}

void msh_comm_free(msh_comm *c) {
  if (c) c->vt->destroy(c);
}

void msh_comm_abort(msh_comm *c) {
  if (!c) return;
  if (!__atomic_load_n(&c->broken, __ATOMIC_ACQUIRE)) {
    snprintf(c->error, sizeof c->error, "the communicator was aborted");
    __atomic_store_n(&c->broken, 1, __ATOMIC_RELEASE); /* engines read it from blocked calls */
  }
  c->vt->abort(c);
}

int msh_comm_rank(const msh_comm *c) { return c ? c->rank : -1; }
int msh_comm_size(const msh_comm *c) { return c ? c->size : 0; }
int msh_comm_kind(const msh_comm *c) { return c ? c->kind : -1; }
int msh_comm_device(const msh_comm *c) { return c ? c->device : -1; }
int msh_comm_device_index(const msh_comm *c) { return c ? c->device_index : -1; }
int msh_comm_world_rank(const msh_comm *c, int r) {
  return c && r >= 0 && r < c->size ? c->world_ranks[r] : -1;
}
void msh_comm_set_timeout(msh_comm *c, double seconds) {
  if (c && seconds > 0) c->timeout = seconds;
}
double msh_comm_timeout(const msh_comm *c) { return c ? c->timeout : 0; }

/* ------------------------------------------------------------------------------ checks */

static msh_status usable(const msh_comm *c) {
  if (!c) return MSH_FAIL(MSH_EINVAL, "NULL communicator");
  if (c->broken) return MSH_FAIL(MSH_EIO, "communicator broken by an earlier failure: %s", c->error);
  return MSH_OK;
}

/* A tensor usable by c: contiguous, on c's device, writable when it is an output. */
static msh_status check_tensor(const msh_comm *c, const msh_tensor *t, const char *what, int output) {
  char buf[128];
  if (!t) return MSH_FAIL(MSH_EINVAL, "NULL %s", what);
  if (msh_dtype_is_block(t->dtype))
    return MSH_FAIL(MSH_EUNSUPPORTED, "%s is block-quantized (%s): communicators move plain dtypes", what,
                    msh_dtype_name(t->dtype));
  if (!msh_tensor_is_contiguous(t))
    return MSH_FAIL(MSH_EINVAL, "%s %s is not contiguous", what, msh_shape_str(t, buf, sizeof buf));
  if (t->st->device != c->device || (c->device != MSH_CPU && t->st->device_index != c->device_index))
    return MSH_FAIL(MSH_EINVAL, "%s is on %s:%d, the %s communicator works on %s:%d", what,
                    t->st->device == MSH_CPU ? "cpu" : "cuda", t->st->device_index, c->vt->name,
                    c->device == MSH_CPU ? "cpu" : "cuda", c->device_index);
  if (output && t->st->readonly) return MSH_FAIL(MSH_EINVAL, "%s is read-only", what);
  return MSH_OK;
}

static msh_status check_reduce(const msh_comm *c, int dtype, int op) {
  if (op != MSH_REDUCE_SUM && op != MSH_REDUCE_MAX) return MSH_FAIL(MSH_EINVAL, "unknown reduce op %d", op);
  int ok = dtype == MSH_F32 || dtype == MSH_I32;
  if (c->kind == MSH_COMM_NCCL) ok = ok || dtype == MSH_F16 || dtype == MSH_BF16 || dtype == MSH_I8;
  if (!ok)
    return MSH_FAIL(MSH_EUNSUPPORTED, "the %s communicator does not reduce %s", c->vt->name,
                    msh_dtype_name(dtype));
  return MSH_OK;
}

static msh_status check_rank(const msh_comm *c, int r, const char *what) {
  if (r < 0 || r >= c->size) return MSH_FAIL(MSH_EINVAL, "%s %d outside [0, %d)", what, r, c->size);
  return MSH_OK;
}

/* Runs an engine call: a failure breaks the communicator. */
static msh_status done(msh_comm *c, msh_status s) {
  return s == MSH_OK ? s : msh_comm_fail(c, s);
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t tensor_bytes(const msh_tensor *t) {
  return (uint64_t)msh_tensor_numel(t) * msh_dtype_size(t->dtype);
}

/* ------------------------------------------------------------------------------ events */

static void free_ring(msh_comm *c) {
  for (int i = 0; i < c->ring_cap; i++) {
    msh_timer_free(c->ring[i].start);
    msh_timer_free(c->ring[i].end);
  }
  free(c->ring);
  c->ring = NULL;
  c->ring_cap = 0;
  c->ring_head = c->ring_tail = c->ring_dropped = 0;
}

msh_status msh_comm_set_events(msh_comm *c, int capacity) {
  if (!c) return MSH_FAIL(MSH_EINVAL, "NULL communicator");
  if (capacity < 0) return MSH_FAIL(MSH_EINVAL, "negative event capacity %d", capacity);
  free_ring(c);
  if (capacity == 0) return MSH_OK;
  msh_comm_rec *ring = calloc((size_t)capacity, sizeof *ring);
  if (!ring) return MSH_FAIL(MSH_ENOMEM, "out of memory for %d communicator events", capacity);
  c->ring = ring;
  c->ring_cap = capacity;
  if (c->device != MSH_CPU) {
    for (int i = 0; i < capacity; i++) {
      msh_status s = msh_timer_new(&ring[i].start, c->device, c->device_index);
      if (s == MSH_OK) s = msh_timer_new(&ring[i].end, c->device, c->device_index);
      if (s != MSH_OK) {
        free_ring(c);
        return s;
      }
    }
  }
  return MSH_OK;
}

/* The slot of the next record (dropping the oldest when the ring is full), with its start point
 * taken; NULL when recording is off. */
static msh_comm_rec *event_begin(msh_comm *c, int op, int peer, uint64_t bytes) {
  if (!c->ring_cap) return NULL;
  if (c->ring_head - c->ring_tail == (uint64_t)c->ring_cap) {
    c->ring_tail++;
    c->ring_dropped++;
  }
  msh_comm_rec *r = &c->ring[c->ring_head % (uint64_t)c->ring_cap];
  r->op = op;
  r->peer = peer;
  r->bytes = bytes;
  r->device = r->start && msh_timer_try_record(r->start) == 0;
  return r;
}

/* Publishes a successful call's record with its end point. */
static void event_end(msh_comm *c, msh_comm_rec *r, double t0, double t1, msh_status s) {
  if (!r || s != MSH_OK) return;
  r->t = t0;
  r->seconds = t1 - t0;
  if (r->device && msh_timer_try_record(r->end) != 0) r->device = 0;
  c->ring_head++;
}

msh_status msh_comm_drain_events(msh_comm *c, int max, int wait, int *op, uint64_t *bytes, int *peer, double *t,
                                 double *seconds, int *device, int *n, uint64_t *dropped) {
  if (!c || !n) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (max < 0) return MSH_FAIL(MSH_EINVAL, "negative max %d", max);
  int k = 0;
  while (k < max && c->ring_tail < c->ring_head) {
    msh_comm_rec *r = &c->ring[c->ring_tail % (uint64_t)c->ring_cap];
    double secs = r->seconds;
    int dev = r->device;
    if (dev) {
      double d = -1;
      msh_status s = msh_timer_elapsed(r->start, r->end, wait, &d);
      if (s != MSH_OK) dev = 0;      /* a failed event: keep the host time */
      else if (d < 0) break;         /* not reached yet: later records wait behind it */
      else secs = d;
    }
    if (op) op[k] = r->op;
    if (bytes) bytes[k] = r->bytes;
    if (peer) peer[k] = r->peer;
    if (t) t[k] = r->t;
    if (seconds) seconds[k] = secs;
    if (device) device[k] = dev;
    k++;
    c->ring_tail++;
  }
  *n = k;
  if (dropped) {
    *dropped = c->ring_dropped;
    c->ring_dropped = 0;
  }
  return MSH_OK;
}

/* ---------------------------------------------------------------------------- counting */

/* Counts one call of op that started at t0 and publishes its event record (from event_begin). */
static msh_status counted(msh_comm *c, int op, uint64_t bytes, msh_comm_rec *rec, double t0, msh_status s) {
  double t1 = now_s();
  c->calls[op]++;
  c->bytes[op] += bytes;
  c->seconds[op] += t1 - t0;
  event_end(c, rec, t0, t1, s);
  return done(c, s);
}

msh_status msh_comm_stats(const msh_comm *c, int op, uint64_t *calls, uint64_t *bytes, double *seconds) {
  if (!c) return MSH_FAIL(MSH_EINVAL, "NULL communicator");
  if (op < 0 || op >= MSH_COMM_OP_COUNT) return MSH_FAIL(MSH_EINVAL, "unknown op %d", op);
  if (calls) *calls = c->calls[op];
  if (bytes) *bytes = c->bytes[op];
  if (seconds) *seconds = c->seconds[op];
  return MSH_OK;
}

void msh_comm_reset_stats(msh_comm *c) {
  if (!c) return;
  for (int i = 0; i < MSH_COMM_OP_COUNT; i++) {
    c->calls[i] = 0;
    c->bytes[i] = 0;
    c->seconds[i] = 0;
  }
}

#define TRY(call)                \
  do {                           \
    msh_status s_ = (call);      \
    if (s_ != MSH_OK) return s_; \
  } while (0)

/* --------------------------------------------------------------------------- collectives */

msh_status msh_comm_all_reduce(msh_comm *c, msh_tensor *t, int op) {
  TRY(usable(c));
  TRY(check_tensor(c, t, "tensor", 1));
  TRY(check_reduce(c, t->dtype, op));
  if (msh_tensor_numel(t) == 0 || c->size == 1) return MSH_OK;
  msh_comm_rec *rec = event_begin(c, MSH_COMM_OP_ALL_REDUCE, -1, tensor_bytes(t));
  double t0 = now_s();
  return counted(c, MSH_COMM_OP_ALL_REDUCE, tensor_bytes(t), rec, t0, c->vt->all_reduce(c, t, op));
}

msh_status msh_comm_all_reduce_add(msh_comm *c, msh_tensor *acc, msh_tensor *t) {
  TRY(usable(c));
  TRY(check_tensor(c, acc, "acc", 1));
  TRY(check_tensor(c, t, "tensor", 1));
  TRY(check_reduce(c, t->dtype, MSH_REDUCE_SUM));
  if (acc->dtype != t->dtype)
    return MSH_FAIL(MSH_EINVAL, "dtypes differ: acc %s, tensor %s", msh_dtype_name(acc->dtype),
                    msh_dtype_name(t->dtype));
  if (msh_tensor_numel(acc) != msh_tensor_numel(t))
    return MSH_FAIL(MSH_EINVAL, "acc holds %lld elements, tensor %lld", (long long)msh_tensor_numel(acc),
                    (long long)msh_tensor_numel(t));
  if (msh_tensor_numel(t) == 0) return MSH_OK;
  if (c->size == 1) return msh_op_add(acc, acc, t);
  msh_comm_rec *rec = event_begin(c, MSH_COMM_OP_ALL_REDUCE, -1, tensor_bytes(t));
  double t0 = now_s();
  msh_status s = c->vt->all_reduce_add ? c->vt->all_reduce_add(c, acc, t) : c->vt->all_reduce(c, t, MSH_REDUCE_SUM);
  if (s == MSH_OK && !c->vt->all_reduce_add) s = msh_op_add(acc, acc, t);
  return counted(c, MSH_COMM_OP_ALL_REDUCE, tensor_bytes(t), rec, t0, s);
}

msh_status msh_comm_all_reduce_add_norm(msh_comm *c, msh_tensor *acc, msh_tensor *t, msh_tensor *out,
                                       const msh_tensor *w, float eps) {
  TRY(usable(c));
  TRY(check_tensor(c, acc, "acc", 1));
  TRY(check_tensor(c, out, "out", 1));
  TRY(check_tensor(c, w, "norm weight", 0));
  if (out->dtype != MSH_F32 || acc->dtype != MSH_F32)
    return MSH_FAIL(MSH_EINVAL, "acc and out must be f32 (acc %s, out %s)", msh_dtype_name(acc->dtype),
                    msh_dtype_name(out->dtype));
  int64_t D = acc->ndim ? acc->shape[acc->ndim - 1] : 1;
  if (msh_tensor_numel(out) != msh_tensor_numel(acc) || w->ndim != 1 || w->shape[0] != D)
    return MSH_FAIL(MSH_EINVAL, "out must have acc's %lld elements and the norm weight %lld",
                    (long long)msh_tensor_numel(acc), (long long)D);
  if (c->size == 1 || !c->vt->all_reduce_add_norm) {
    TRY(msh_comm_all_reduce_add(c, acc, t));
    return msh_op_rmsnorm(out, acc, w, eps);
  }
  TRY(check_tensor(c, t, "tensor", 1));
  if (t->dtype != MSH_F32 || msh_tensor_numel(t) != msh_tensor_numel(acc))
    return MSH_FAIL(MSH_EINVAL, "tensor must be f32 with acc's %lld elements", (long long)msh_tensor_numel(acc));
  if (msh_tensor_numel(t) == 0) return MSH_OK;
  msh_comm_rec *rec = event_begin(c, MSH_COMM_OP_ALL_REDUCE, -1, tensor_bytes(t));
  double t0 = now_s();
  return counted(c, MSH_COMM_OP_ALL_REDUCE, tensor_bytes(t), rec, t0, c->vt->all_reduce_add_norm(c, acc, t, out, w, eps));
}

int msh_comm_capturable(const msh_comm *c, int op, const msh_tensor *t) {
  if (!c || !t || c->broken || (op != MSH_COMM_OP_ALL_REDUCE && op != MSH_COMM_OP_ALL_GATHER)) return 0;
  if (c->size == 1) return 1;
  return c->vt->capturable ? c->vt->capturable(c, op, t) : 0;
}

msh_status msh_comm_all_gather(msh_comm *c, msh_tensor *out, const msh_tensor *in) {
  TRY(usable(c));
  TRY(check_tensor(c, out, "out", 1));
  TRY(check_tensor(c, in, "in", 0));
  if (in->dtype != out->dtype)
    return MSH_FAIL(MSH_EINVAL, "dtypes differ: out %s, in %s", msh_dtype_name(out->dtype),
                    msh_dtype_name(in->dtype));
  int64_t n = msh_tensor_numel(in);
  if (msh_tensor_numel(out) != n * c->size)
    return MSH_FAIL(MSH_EINVAL, "out holds %lld elements, %d ranks x %lld expected",
                    (long long)msh_tensor_numel(out), c->size, (long long)n);
  if (n == 0) return MSH_OK;
  msh_comm_rec *rec = event_begin(c, MSH_COMM_OP_ALL_GATHER, -1, tensor_bytes(in));
  double t0 = now_s();
  return counted(c, MSH_COMM_OP_ALL_GATHER, tensor_bytes(in), rec, t0, c->vt->all_gather(c, out, in));
}

msh_status msh_comm_reduce_scatter(msh_comm *c, msh_tensor *out, const msh_tensor *in, int op) {
  TRY(usable(c));
  TRY(check_tensor(c, out, "out", 1));
  TRY(check_tensor(c, in, "in", 0));
  if (in->dtype != out->dtype)
    return MSH_FAIL(MSH_EINVAL, "dtypes differ: out %s, in %s", msh_dtype_name(out->dtype),
                    msh_dtype_name(in->dtype));
  TRY(check_reduce(c, out->dtype, op));
  int64_t n = msh_tensor_numel(out);
  if (msh_tensor_numel(in) != n * c->size)
    return MSH_FAIL(MSH_EINVAL, "in holds %lld elements, %d ranks x %lld expected",
                    (long long)msh_tensor_numel(in), c->size, (long long)n);
  if (n == 0) return MSH_OK;
  msh_comm_rec *rec = event_begin(c, MSH_COMM_OP_REDUCE_SCATTER, -1, tensor_bytes(in));
  double t0 = now_s();
  return counted(c, MSH_COMM_OP_REDUCE_SCATTER, tensor_bytes(in), rec, t0, c->vt->reduce_scatter(c, out, in, op));
}

msh_status msh_comm_broadcast(msh_comm *c, msh_tensor *t, int root) {
  TRY(usable(c));
  TRY(check_rank(c, root, "root"));
  TRY(check_tensor(c, t, "tensor", c->rank != root));
  if (msh_tensor_numel(t) == 0 || c->size == 1) return MSH_OK;
  msh_comm_rec *rec = event_begin(c, MSH_COMM_OP_BROADCAST, root, tensor_bytes(t));
  double t0 = now_s();
  return counted(c, MSH_COMM_OP_BROADCAST, tensor_bytes(t), rec, t0, c->vt->broadcast(c, t, root));
}

msh_status msh_comm_send(msh_comm *c, const msh_tensor *t, int peer) {
  TRY(usable(c));
  TRY(check_rank(c, peer, "peer"));
  if (peer == c->rank) return MSH_FAIL(MSH_EINVAL, "rank %d sends to itself", peer);
  TRY(check_tensor(c, t, "tensor", 0));
  msh_comm_rec *rec = event_begin(c, MSH_COMM_OP_SEND, peer, tensor_bytes(t));
  double t0 = now_s();
  return counted(c, MSH_COMM_OP_SEND, tensor_bytes(t), rec, t0, c->vt->send(c, t, peer));
}

msh_status msh_comm_recv(msh_comm *c, msh_tensor *t, int peer) {
  TRY(usable(c));
  TRY(check_rank(c, peer, "peer"));
  if (peer == c->rank) return MSH_FAIL(MSH_EINVAL, "rank %d receives from itself", peer);
  TRY(check_tensor(c, t, "tensor", 1));
  msh_comm_rec *rec = event_begin(c, MSH_COMM_OP_RECV, peer, tensor_bytes(t));
  double t0 = now_s();
  return counted(c, MSH_COMM_OP_RECV, tensor_bytes(t), rec, t0, c->vt->recv(c, t, peer));
}

msh_status msh_comm_barrier(msh_comm *c) {
  TRY(usable(c));
  if (c->size == 1) return MSH_OK;
  msh_comm_rec *rec = event_begin(c, MSH_COMM_OP_BARRIER, -1, 0);
  double t0 = now_s();
  return counted(c, MSH_COMM_OP_BARRIER, 0, rec, t0, c->vt->barrier(c));
}

msh_status msh_comm_split(msh_comm **out, msh_comm *c, int color, int key) {
  if (!out) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  TRY(usable(c));
  if (color < 0 && color != MSH_COMM_NO_COLOR)
    return MSH_FAIL(MSH_EINVAL, "color %d: colors are >= 0 or MSH_COMM_NO_COLOR", color);
  *out = NULL;
  return done(c, c->vt->split(c, color, key, out));
}
