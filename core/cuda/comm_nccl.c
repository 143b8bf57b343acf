/* comm_nccl.c: the NCCL communicator between GPU ranks, behind the interface of comm.c.
 *
 * Operations are queued on the device's current stream (the one every op runs on), so a
 * collective orders after the ops that produced its input and before those that read its
 * output, without a host wait. The communicator is made non-blocking (NCCL's config.blocking =
 * 0): initialization, splits and enqueues are polled with ncclCommGetAsyncError and fail with
 * MSH_EDEVICE after the communicator's timeout instead of hanging; abort calls ncclCommAbort.
 * Data-movement ops (all_gather, broadcast, send, recv) move bytes, so they take any dtype. */
#ifdef MSH_WITH_NCCL

#include "comm_internal.h"
#include "comm_p2p.h"
#include "cuda_internal.h"

#include <nccl.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct nccl_comm {
  msh_comm head;
  ncclComm_t nc;
  int32_t *word; /* one device int32 for barriers */
  msh_p2p *p2p;  /* peer-mapped buffers for small all-reduces (NULL: NCCL only) */
} nccl_comm;

static const msh_comm_vt nccl_vt;

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static msh_status nccl_fail_at(ncclResult_t r, ncclComm_t nc, const char *call, const char *file, int line,
                               const char *func) {
  const char *detail = nc ? ncclGetLastError(nc) : NULL;
  return msh_fail_at(MSH_EDEVICE, file, line, func, "%s failed: %s%s%s", call, ncclGetErrorString(r),
                     detail && *detail ? ": " : "", detail ? detail : "");
}

/* Waits while nc's last call is in progress, up to timeout seconds. An enqueue completes within
 * microseconds, so the first millisecond is polled without sleeping (a 100 us sleep per collective
 * would cost more than the collective itself); after that the poll sleeps between checks. */
static msh_status nccl_wait_at(ncclComm_t nc, ncclResult_t r, double timeout, const char *call, const char *file,
                               int line, const char *func) {
  double start = r == ncclInProgress ? now_s() : 0, deadline = start + timeout;
  while (r == ncclInProgress) {
    double t = now_s();
    if (t > deadline) {
      ncclCommAbort(nc);
      return msh_fail_at(MSH_EDEVICE, file, line, func, "%s did not complete within %g s (a rank is missing?)",
                         call, timeout);
    }
    if (t - start > 1e-3) {
      struct timespec ts = {0, 100 * 1000};
      nanosleep(&ts, NULL);
    }
    ncclResult_t e = ncclCommGetAsyncError(nc, &r);
    if (e != ncclSuccess) r = e;
  }
  if (r != ncclSuccess) return nccl_fail_at(r, nc, call, file, line, func);
  return MSH_OK;
}

/* Runs an NCCL call on communicator nc and waits for it to be enqueued. */
#define NCCL_TRY(nc, timeout, call)                                                              \
  do {                                                                                           \
    msh_status s_ = nccl_wait_at((nc), (call), (timeout), #call, __FILE__, __LINE__, __func__); \
    if (s_ != MSH_OK) return s_;                                                                 \
  } while (0)

static ncclDataType_t nccl_dtype(int dtype) {
  switch (dtype) {
  case MSH_F16: return ncclFloat16;
  case MSH_BF16: return ncclBfloat16;
  case MSH_I32: return ncclInt32;
  case MSH_I8: return ncclInt8;
  default: return ncclFloat32;
  }
}

static ncclRedOp_t nccl_op(int op) { return op == MSH_REDUCE_MAX ? ncclMax : ncclSum; }

static size_t nbytes(const msh_tensor *t) { return (size_t)msh_tensor_numel(t) * msh_dtype_size(t->dtype); }

/* The calling thread's current stream of the device (and the device made current on this thread). */
static msh_status stream_of(nccl_comm *c, cudaStream_t *out) {
  msh_cuda_dev *d;
  msh_status s = msh_cuda_dev_get(c->head.device_index, &d);
  if (s != MSH_OK) return s;
  *out = msh_cuda_cur(d);
  return MSH_OK;
}

/* ------------------------------------------------------------------------------- setup */

msh_status msh_cuda_nccl_unique_id(uint8_t *id) {
  ncclUniqueId u;
  ncclResult_t r = ncclGetUniqueId(&u);
  if (r != ncclSuccess) return nccl_fail_at(r, NULL, "ncclGetUniqueId", __FILE__, __LINE__, __func__);
  memcpy(id, u.internal, MSH_NCCL_ID_BYTES);
  return MSH_OK;
}

/* Sets up the one-shot all-reduce of comm_p2p.c: every rank makes its region, the ranks exchange
 * what they made over NCCL and keep it only when every rank mapped every peer. Collective. */
static msh_status p2p_setup(nccl_comm *c) {
  cudaStream_t st;
  msh_status s = stream_of(c, &st);
  if (s != MSH_OK) return s;
  int n = c->head.size;
  msh_p2p_info mine;
  msh_p2p *p = NULL;
  s = msh_p2p_prepare(c->head.device_index, c->head.rank, n, c->head.timeout, &p, &mine);
  if (s != MSH_OK) return s;
  size_t bytes = sizeof(msh_p2p_info) * (size_t)n;
  msh_p2p_info *all = malloc(bytes);
  uint8_t *dev = NULL;
  int32_t ok = 0;
  if (!all) s = MSH_FAIL(MSH_ENOMEM, "out of memory");
  if (s == MSH_OK) s = msh_cuda_check_at(MSH_CUDA_RT, cudaMalloc((void **)&dev, bytes + sizeof(msh_p2p_info) + 8),
                                         "cudaMalloc", __FILE__, __LINE__, __func__);
  uint8_t *dev_mine = dev + bytes;
  int32_t *dev_ok = (int32_t *)(dev + bytes + sizeof(msh_p2p_info));
  if (s == MSH_OK)
    s = msh_cuda_check_at(MSH_CUDA_RT, cudaMemcpyAsync(dev_mine, &mine, sizeof mine, cudaMemcpyHostToDevice, st),
                          "cudaMemcpyAsync", __FILE__, __LINE__, __func__);
  if (s == MSH_OK)
    s = nccl_wait_at(c->nc, ncclAllGather(dev_mine, dev, sizeof mine, ncclUint8, c->nc, st), c->head.timeout,
                     "ncclAllGather", __FILE__, __LINE__, __func__);
  if (s == MSH_OK)
    s = msh_cuda_check_at(MSH_CUDA_RT, cudaMemcpyAsync(all, dev, bytes, cudaMemcpyDeviceToHost, st),
                          "cudaMemcpyAsync", __FILE__, __LINE__, __func__);
  if (s == MSH_OK)
    s = msh_cuda_check_at(MSH_CUDA_RT, cudaStreamSynchronize(st), "cudaStreamSynchronize", __FILE__, __LINE__,
                          __func__);
  if (s == MSH_OK) {
    ok = msh_p2p_connect(p, all);
    s = msh_cuda_check_at(MSH_CUDA_RT, cudaMemcpyAsync(dev_ok, &ok, sizeof ok, cudaMemcpyHostToDevice, st),
                          "cudaMemcpyAsync", __FILE__, __LINE__, __func__);
  }
  if (s == MSH_OK)
    s = nccl_wait_at(c->nc, ncclAllReduce(dev_ok, dev_ok, 1, ncclInt32, ncclMin, c->nc, st), c->head.timeout,
                     "ncclAllReduce", __FILE__, __LINE__, __func__);
  if (s == MSH_OK)
    s = msh_cuda_check_at(MSH_CUDA_RT, cudaMemcpyAsync(&ok, dev_ok, sizeof ok, cudaMemcpyDeviceToHost, st),
                          "cudaMemcpyAsync", __FILE__, __LINE__, __func__);
  if (s == MSH_OK)
    s = msh_cuda_check_at(MSH_CUDA_RT, cudaStreamSynchronize(st), "cudaStreamSynchronize", __FILE__, __LINE__,
                          __func__);
  cudaFree(dev);
  free(all);
  if (s == MSH_OK && ok) c->p2p = p;
  else msh_p2p_free(p);
  return s;
}

static msh_status wrap(ncclComm_t nc, int device_index, const int *world_ranks, double timeout, msh_comm **out) {
  nccl_comm *c = calloc(1, sizeof *c);
  if (!c) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  int rank = 0, size = 0;
  ncclCommUserRank(nc, &rank);
  ncclCommCount(nc, &size);
  msh_status s = msh_comm_init_head(&c->head, &nccl_vt, MSH_COMM_NCCL, MSH_CUDA, device_index, rank, size,
                                    world_ranks, timeout);
  if (s == MSH_OK) s = msh_cuda_check_at(MSH_CUDA_RT, cudaMalloc((void **)&c->word, sizeof(int32_t)),
                                         "cudaMalloc", __FILE__, __LINE__, __func__);
  if (s != MSH_OK) {
    msh_comm_free_head(&c->head);
    free(c);
    return s;
  }
  c->nc = nc;
  s = p2p_setup(c);
  if (s != MSH_OK) {
    c->nc = NULL; /* the caller aborts nc */
    cudaFree(c->word);
    msh_comm_free_head(&c->head);
    free(c);
    return s;
  }
  *out = &c->head;
  return MSH_OK;
}

msh_status msh_cuda_nccl_comm_new(msh_comm **out, int rank, int world, const uint8_t *id, int device_index) {
  msh_cuda_dev *d;
  msh_status s = msh_cuda_dev_get(device_index, &d);
  if (s != MSH_OK) return s;
  ncclUniqueId u;
  memcpy(u.internal, id, MSH_NCCL_ID_BYTES);
  ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
  cfg.blocking = 0;
  ncclComm_t nc = NULL;
  const double timeout = 300;
  ncclResult_t r = ncclCommInitRankConfig(&nc, world, u, rank, &cfg);
  if (r != ncclSuccess && r != ncclInProgress) {
    if (nc) ncclCommAbort(nc);
    return nccl_fail_at(r, NULL, "ncclCommInitRankConfig", __FILE__, __LINE__, __func__);
  }
  s = nccl_wait_at(nc, r, timeout, "ncclCommInitRankConfig", __FILE__, __LINE__, __func__);
  if (s != MSH_OK) return s; /* nccl_wait_at aborted nc */
  s = wrap(nc, device_index, NULL, timeout, out);
  if (s != MSH_OK) ncclCommAbort(nc);
  return s;
}

/* --------------------------------------------------------------------------- collectives */

static msh_status nccl_all_reduce(msh_comm *base, msh_tensor *t, int op) {
  nccl_comm *c = (nccl_comm *)base;
  cudaStream_t st;
  msh_status s = stream_of(c, &st);
  if (s != MSH_OK) return s;
  if (msh_p2p_fits(c->p2p, t, NULL, op)) return msh_p2p_all_reduce(c->p2p, st, NULL, t);
  void *p = msh_tensor_ptr(t);
  NCCL_TRY(c->nc, base->timeout,
           ncclAllReduce(p, p, (size_t)msh_tensor_numel(t), nccl_dtype(t->dtype), nccl_op(op), c->nc, st));
  return MSH_OK;
}

static msh_status nccl_all_reduce_add(msh_comm *base, msh_tensor *acc, msh_tensor *t) {
  nccl_comm *c = (nccl_comm *)base;
  cudaStream_t st;
  msh_status s = stream_of(c, &st);
  if (s != MSH_OK) return s;
  if (msh_p2p_fits(c->p2p, t, acc, MSH_REDUCE_SUM)) return msh_p2p_all_reduce(c->p2p, st, acc, t);
  s = nccl_all_reduce(base, t, MSH_REDUCE_SUM);
  return s == MSH_OK ? msh_op_add(acc, acc, t) : s;
}

static msh_status nccl_all_reduce_add_norm(msh_comm *base, msh_tensor *acc, msh_tensor *t, msh_tensor *out,
                                           const msh_tensor *w, float eps) {
  nccl_comm *c = (nccl_comm *)base;
  cudaStream_t st;
  msh_status s = stream_of(c, &st);
  if (s != MSH_OK) return s;
  if (msh_p2p_fits_norm(c->p2p, acc, t, out)) return msh_p2p_all_reduce_norm(c->p2p, st, acc, t, out, w, eps);
  s = nccl_all_reduce_add(base, acc, t);
  return s == MSH_OK ? msh_op_rmsnorm(out, acc, w, eps) : s;
}

static int nccl_capturable(const msh_comm *base, int op, const msh_tensor *t) {
  const nccl_comm *c = (const nccl_comm *)base;
  if (op == MSH_COMM_OP_ALL_GATHER) return msh_p2p_fits_gather(c->p2p, t, t);
  return msh_p2p_fits(c->p2p, t, NULL, MSH_REDUCE_SUM);
}

static msh_status nccl_all_gather(msh_comm *base, msh_tensor *out, const msh_tensor *in) {
  nccl_comm *c = (nccl_comm *)base;
  cudaStream_t st;
  msh_status s = stream_of(c, &st);
  if (s != MSH_OK) return s;
  if (msh_p2p_fits_gather(c->p2p, out, in)) return msh_p2p_all_gather(c->p2p, st, out, in);
  NCCL_TRY(c->nc, base->timeout,
           ncclAllGather(msh_tensor_ptr(in), msh_tensor_ptr(out), nbytes(in), ncclUint8, c->nc, st));
  return MSH_OK;
}

static msh_status nccl_reduce_scatter(msh_comm *base, msh_tensor *out, const msh_tensor *in, int op) {
  nccl_comm *c = (nccl_comm *)base;
  cudaStream_t st;
  msh_status s = stream_of(c, &st);
  if (s != MSH_OK) return s;
  NCCL_TRY(c->nc, base->timeout,
           ncclReduceScatter(msh_tensor_ptr(in), msh_tensor_ptr(out), (size_t)msh_tensor_numel(out),
                             nccl_dtype(out->dtype), nccl_op(op), c->nc, st));
  return MSH_OK;
}

static msh_status nccl_broadcast(msh_comm *base, msh_tensor *t, int root) {
  nccl_comm *c = (nccl_comm *)base;
  cudaStream_t st;
  msh_status s = stream_of(c, &st);
  if (s != MSH_OK) return s;
  void *p = msh_tensor_ptr(t);
  NCCL_TRY(c->nc, base->timeout, ncclBroadcast(p, p, nbytes(t), ncclUint8, root, c->nc, st));
  return MSH_OK;
}

static msh_status nccl_send(msh_comm *base, const msh_tensor *t, int peer) {
  nccl_comm *c = (nccl_comm *)base;
  cudaStream_t st;
  msh_status s = stream_of(c, &st);
  if (s != MSH_OK) return s;
  NCCL_TRY(c->nc, base->timeout, ncclSend(msh_tensor_ptr(t), nbytes(t), ncclUint8, peer, c->nc, st));
  return MSH_OK;
}

static msh_status nccl_recv(msh_comm *base, msh_tensor *t, int peer) {
  nccl_comm *c = (nccl_comm *)base;
  cudaStream_t st;
  msh_status s = stream_of(c, &st);
  if (s != MSH_OK) return s;
  NCCL_TRY(c->nc, base->timeout, ncclRecv(msh_tensor_ptr(t), nbytes(t), ncclUint8, peer, c->nc, st));
  return MSH_OK;
}

static msh_status nccl_barrier(msh_comm *base) {
  nccl_comm *c = (nccl_comm *)base;
  cudaStream_t st;
  msh_status s = stream_of(c, &st);
  if (s != MSH_OK) return s;
  NCCL_TRY(c->nc, base->timeout, ncclAllReduce(c->word, c->word, 1, ncclInt32, ncclSum, c->nc, st));
  CUDA_TRY(cudaStreamSynchronize(st));
  return MSH_OK;
}

static msh_status nccl_split(msh_comm *base, int color, int key, msh_comm **out) {
  nccl_comm *c = (nccl_comm *)base;
  cudaStream_t st;
  msh_status s = stream_of(c, &st);
  if (s != MSH_OK) return s;
  ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
  cfg.blocking = 0;
  ncclComm_t nc = NULL;
  NCCL_TRY(c->nc, base->timeout,
           ncclCommSplit(c->nc, color < 0 ? NCCL_SPLIT_NOCOLOR : color, key, &nc, &cfg));
  if (color < 0 || !nc) return MSH_OK;
  s = nccl_wait_at(nc, ncclInProgress, base->timeout, "ncclCommSplit", __FILE__, __LINE__, __func__);
  if (s != MSH_OK) return s;
  /* the new ranks' world ranks, gathered over the new communicator */
  int n = 0;
  ncclCommCount(nc, &n);
  int32_t *dev = NULL;
  int32_t *host = malloc(sizeof(int32_t) * (size_t)n);
  int32_t mine = base->world_ranks[base->rank];
  if (!host) {
    ncclCommAbort(nc);
    return MSH_FAIL(MSH_ENOMEM, "out of memory");
  }
  s = msh_cuda_check_at(MSH_CUDA_RT, cudaMalloc((void **)&dev, sizeof(int32_t) * (size_t)(n + 1)), "cudaMalloc",
                        __FILE__, __LINE__, __func__);
  if (s == MSH_OK)
    s = msh_cuda_check_at(MSH_CUDA_RT, cudaMemcpyAsync(dev + n, &mine, sizeof mine, cudaMemcpyHostToDevice, st),
                          "cudaMemcpyAsync", __FILE__, __LINE__, __func__);
  if (s == MSH_OK)
    s = nccl_wait_at(nc, ncclAllGather(dev + n, dev, 1, ncclInt32, nc, st), base->timeout, "ncclAllGather",
                     __FILE__, __LINE__, __func__);
  if (s == MSH_OK)
    s = msh_cuda_check_at(MSH_CUDA_RT, cudaMemcpyAsync(host, dev, sizeof(int32_t) * (size_t)n,
                                                       cudaMemcpyDeviceToHost, st),
                          "cudaMemcpyAsync", __FILE__, __LINE__, __func__);
  if (s == MSH_OK)
    s = msh_cuda_check_at(MSH_CUDA_RT, cudaStreamSynchronize(st), "cudaStreamSynchronize", __FILE__, __LINE__,
                          __func__);
  cudaFree(dev);
  if (s == MSH_OK) s = wrap(nc, base->device_index, host, base->timeout, out);
  free(host);
  if (s != MSH_OK) ncclCommAbort(nc);
  return s;
}

static void nccl_abort(msh_comm *base) {
  nccl_comm *c = (nccl_comm *)base;
  if (c->nc) ncclCommAbort(c->nc);
  c->nc = NULL;
}

/* Local teardown only: ncclCommAbort. ncclCommFinalize (and ncclCommDestroy, which calls it) is
 * collective, and communicators are released by finalizers whose order differs from rank to
 * rank (a rank finalizing its world communicator while its peer finalizes the tensor-parallel
 * one waits for the timeout); an abort also releases kernels still waiting for a peer, so the
 * device memory freed after it does not wait on them either. */
static void nccl_destroy(msh_comm *base) {
  nccl_comm *c = (nccl_comm *)base;
  if (c->nc) ncclCommAbort(c->nc);
  msh_p2p_free(c->p2p);
  cudaFree(c->word);
  msh_comm_free_head(base);
  free(c);
}

static const msh_comm_vt nccl_vt = {
    .name = "nccl",
    .all_reduce = nccl_all_reduce,
    .all_reduce_add = nccl_all_reduce_add,
    .all_reduce_add_norm = nccl_all_reduce_add_norm,
    .capturable = nccl_capturable,
    .all_gather = nccl_all_gather,
    .reduce_scatter = nccl_reduce_scatter,
    .broadcast = nccl_broadcast,
    .send = nccl_send,
    .recv = nccl_recv,
    .barrier = nccl_barrier,
    .split = nccl_split,
    .abort = nccl_abort,
    .destroy = nccl_destroy,
};

#else
/* Without NCCL this file is empty (comm.c reports MSH_EUNSUPPORTED). */
typedef int msh_comm_nccl_unused;
#endif
