/* cuda_stream.c: streams and events of the CUDA backend (msh_stream, msh_event, the device
 * timers of core/src/timer.c and the timing of NCCL collectives), and each thread's current
 * stream per device. Nothing here waits for the device except the syncs. */
#include "cuda_internal.h"

/* NULL: the device's default stream. Read by every op (msh_cuda_cur), so a plain thread-local
 * array: one load, no lock. */
__thread cudaStream_t msh_cuda_tls_stream[MSH_CUDA_MAX_DEVICES];

/* The stream s names on device d: the thread's current one when s is NULL. */
static cudaStream_t stream_or_cur(msh_cuda_dev *d, void *s) { return s ? (cudaStream_t)s : msh_cuda_cur(d); }

/* ----------------------------------------------------------------------------- streams */

msh_status msh_cuda_stream_new(int device_index, void **out) {
  msh_cuda_dev *d;
  msh_status s = msh_cuda_dev_get(device_index, &d);
  if (s != MSH_OK) return s;
  cudaStream_t st = NULL;
  CUDA_TRY(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  *out = st;
  return MSH_OK;
}

void msh_cuda_stream_free(int device_index, void *s) {
  if (!s) return;
  if (device_index >= 0 && device_index < MSH_CUDA_MAX_DEVICES && msh_cuda_tls_stream[device_index] == s)
    msh_cuda_tls_stream[device_index] = NULL;
  msh_cuda_dev *d;
  if (msh_cuda_dev_get(device_index, &d) == MSH_OK && d->blas_stream == s) (void)msh_cuda_blas(d, d->stream);
  cudaStreamDestroy((cudaStream_t)s); /* returns at once; the queued work still runs */
  (void)cudaGetLastError();
}

msh_status msh_cuda_stream_sync(int device_index, void *s) {
  msh_cuda_dev *d;
  msh_status st = msh_cuda_dev_get(device_index, &d);
  if (st != MSH_OK) return st;
  cudaStream_t cs = stream_or_cur(d, s);
  enum cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(cs, &cap) != cudaSuccess) (void)cudaGetLastError();
  if (cap != cudaStreamCaptureStatusNone)
    return MSH_FAIL(MSH_EINVAL, "the stream is being captured into a graph on CUDA device %d: syncing it would break "
                    "the capture (sync after msh_graph_end)", device_index);
  CUDA_TRY(cudaStreamSynchronize(cs));
  return MSH_OK;
}

msh_status msh_cuda_stream_set_current(int device_index, void *s) {
  msh_cuda_dev *d;
  msh_status st = msh_cuda_dev_get(device_index, &d); /* checks the index */
  if (st != MSH_OK) return st;
  msh_cuda_tls_stream[device_index] = (cudaStream_t)s;
  return MSH_OK;
}

/* ------------------------------------------------------------------------------ events */

msh_status msh_cuda_event_new(int device_index, void **out) {
  msh_cuda_dev *d;
  msh_status s = msh_cuda_dev_get(device_index, &d);
  if (s != MSH_OK) return s;
  cudaEvent_t ev = NULL;
  CUDA_TRY(cudaEventCreateWithFlags(&ev, cudaEventDefault)); /* with timing: timers and elapsed_ms */
  *out = ev;
  return MSH_OK;
}

void msh_cuda_event_free(void *e) {
  if (e) cudaEventDestroy((cudaEvent_t)e);
  (void)cudaGetLastError();
}

msh_status msh_cuda_event_record(int device_index, void *e, void *s) {
  msh_cuda_dev *d;
  msh_status st = msh_cuda_dev_get(device_index, &d);
  if (st != MSH_OK) return st;
  CUDA_TRY(cudaEventRecord((cudaEvent_t)e, stream_or_cur(d, s)));
  return MSH_OK;
}

msh_status msh_cuda_stream_wait_event(int device_index, void *s, void *e) {
  msh_cuda_dev *d;
  msh_status st = msh_cuda_dev_get(device_index, &d);
  if (st != MSH_OK) return st;
  CUDA_TRY(cudaStreamWaitEvent(stream_or_cur(d, s), (cudaEvent_t)e, 0));
  return MSH_OK;
}

int msh_cuda_event_query(void *e) {
  cudaError_t r = cudaEventQuery((cudaEvent_t)e);
  if (r == cudaSuccess) return 1;
  if (r == cudaErrorNotReady) return 0;
  (void)cudaGetLastError();
  return -1; /* failed: syncing or reading its time reports the error */
}

msh_status msh_cuda_event_sync(void *e) {
  CUDA_TRY(cudaEventSynchronize((cudaEvent_t)e));
  return MSH_OK;
}

msh_status msh_cuda_event_elapsed_ms(void *start, void *end, float *ms) {
  CUDA_TRY(cudaEventElapsedTime(ms, (cudaEvent_t)start, (cudaEvent_t)end));
  return MSH_OK;
}
