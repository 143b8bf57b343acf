/* cuda_timer.c: the CUDA events behind device timers (core/src/timer.c) and the timing of NCCL
 * collectives (core/src/comm.c). Events are recorded on the device's current stream, the one
 * every op and collective runs on, and read with cudaEventQuery: nothing here waits for the
 * device except msh_cuda_event_wait. */
#include "cuda_internal.h"
#include "timer_internal.h"

msh_status msh_cuda_event_new(int device_index, void **out) {
  msh_cuda_dev *d;
  msh_status s = msh_cuda_dev_get(device_index, &d);
  if (s != MSH_OK) return s;
  cudaEvent_t ev = NULL;
  CUDA_TRY(cudaEventCreateWithFlags(&ev, cudaEventDefault));
  *out = ev;
  return MSH_OK;
}

void msh_cuda_event_free(void *ev) {
  if (ev) cudaEventDestroy((cudaEvent_t)ev);
  (void)cudaGetLastError();
}

int msh_cuda_event_record(int device_index, void *ev) {
  msh_cuda_dev *d;
  msh_status s = msh_cuda_dev_get(device_index, &d);
  if (s != MSH_OK) return s;
  if (msh_cuda_capturing(d)) return 1;
  CUDA_TRY(cudaEventRecord((cudaEvent_t)ev, d->stream));
  return 0;
}

int msh_cuda_event_done(void *ev) {
  cudaError_t e = cudaEventQuery((cudaEvent_t)ev);
  if (e == cudaSuccess) return 1;
  if (e == cudaErrorNotReady) return 0;
  (void)cudaGetLastError();
  return -1; /* failed: reading its time reports the error */
}

msh_status msh_cuda_event_elapsed_ms(void *start, void *end, float *ms) {
  CUDA_TRY(cudaEventElapsedTime(ms, (cudaEvent_t)start, (cudaEvent_t)end));
  return MSH_OK;
}

msh_status msh_cuda_event_wait(void *ev) {
  CUDA_TRY(cudaEventSynchronize((cudaEvent_t)ev));
  return MSH_OK;
}
