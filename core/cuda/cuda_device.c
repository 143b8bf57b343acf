/* cuda_device.c: CUDA devices: counting, per-device state (stream, cuBLAS handle, scratch), what
 * may not run during a graph capture, and the one checker of CUDA and cuBLAS return codes. */
#include "cuda_internal.h"

#include <pthread.h>
#include <stdlib.h>

enum { MAX_DEVICES = MSH_CUDA_MAX_DEVICES, WORDS = 64 };

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t defer_lock = PTHREAD_MUTEX_INITIALIZER; /* capturing and deferred frees */
static int device_count = -1; /* -1: not asked yet */
static msh_cuda_dev *devices[MAX_DEVICES];

/* ------------------------------------------------------------------------------ errors */

msh_status msh_cuda_check_at(int lib, int code, const char *call, const char *file, int line, const char *func) {
  if (lib == MSH_CUDA_BLAS) {
    cublasStatus_t st = (cublasStatus_t)code;
    if (st == CUBLAS_STATUS_SUCCESS) return MSH_OK;
    return msh_fail_at(st == CUBLAS_STATUS_ALLOC_FAILED ? MSH_ENOMEM : MSH_EDEVICE, file, line, func,
                       "%s failed: %s: %s", call, cublasGetStatusName(st), cublasGetStatusString(st));
  }
  cudaError_t e = (cudaError_t)code;
  if (e == cudaSuccess) return MSH_OK;
  (void)cudaGetLastError(); /* clear a non-sticky error so that later launches do not report it */
  return msh_fail_at(e == cudaErrorMemoryAllocation ? MSH_ENOMEM : MSH_EDEVICE, file, line, func,
                     "%s failed: %s: %s", call, cudaGetErrorName(e), cudaGetErrorString(e));
}

/* ----------------------------------------------------------------------------- devices */

static int count_locked(void) {
  if (device_count < 0) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      (void)cudaGetLastError(); /* no driver, no device: zero devices, not an error */
      n = 0;
    }
    device_count = n;
  }
  return device_count;
}

msh_status msh_cuda_device_count(int *out) {
  pthread_mutex_lock(&lock);
  *out = count_locked();
  pthread_mutex_unlock(&lock);
  return MSH_OK;
}

static void dev_destroy(msh_cuda_dev *d) {
  if (!d) return;
  if (d->blas) cublasDestroy(d->blas);
  if (d->stream) cudaStreamDestroy(d->stream);
  if (d->dev_words) cudaFree(d->dev_words);
  if (d->host_words) cudaFreeHost(d->host_words);
  (void)cudaGetLastError();
  free(d);
}

static msh_status dev_create(int index, msh_cuda_dev **out) {
  msh_cuda_dev *d = calloc(1, sizeof *d);
  if (!d) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  d->index = index;
  d->gemv_max_m = 1; /* measured on an H200: cuBLAS matches or beats the GEMV from M = 2 */
  msh_status s = MSH_OK;
#define STEP(lib, call) \
  if (s == MSH_OK) s = msh_cuda_check_at((lib), (int)(call), #call, __FILE__, __LINE__, __func__)
  STEP(MSH_CUDA_RT, cudaDeviceGetAttribute(&d->sm_count, cudaDevAttrMultiProcessorCount, index));
  STEP(MSH_CUDA_RT, cudaStreamCreateWithFlags(&d->stream, cudaStreamNonBlocking));
  STEP(MSH_CUDA_BLAS, cublasCreate(&d->blas));
  STEP(MSH_CUDA_BLAS, cublasSetStream(d->blas, d->stream));
  d->blas_stream = d->stream;
  STEP(MSH_CUDA_RT, cudaMalloc((void **)&d->dev_words, WORDS * sizeof(int32_t)));
  STEP(MSH_CUDA_RT, cudaMallocHost((void **)&d->host_words, WORDS * sizeof(int32_t)));
#undef STEP
  if (s != MSH_OK) {
    dev_destroy(d);
    return s;
  }
  *out = d;
  return MSH_OK;
}

msh_status msh_cuda_dev_get(int device_index, msh_cuda_dev **out) {
  pthread_mutex_lock(&lock);
  int n = count_locked();
  if (device_index < 0 || device_index >= n || device_index >= MAX_DEVICES) {
    pthread_mutex_unlock(&lock);
    return MSH_FAIL(MSH_EINVAL, "CUDA device %d does not exist (%d present)", device_index, n);
  }
  msh_status s = msh_cuda_check_at(MSH_CUDA_RT, cudaSetDevice(device_index), "cudaSetDevice", __FILE__, __LINE__,
                                   __func__);
  if (s == MSH_OK && !devices[device_index]) s = dev_create(device_index, &devices[device_index]);
  if (s == MSH_OK) *out = devices[device_index];
  pthread_mutex_unlock(&lock);
  return s;
}

/* ----------------------------------------------------------------------------- scratch */

void msh_cuda_block_retain(msh_cuda_block *b) { __atomic_add_fetch(&b->refs, 1, __ATOMIC_ACQ_REL); }

void msh_cuda_block_release(msh_cuda_dev *d, msh_cuda_block *b) {
  if (!b || __atomic_sub_fetch(&b->refs, 1, __ATOMIC_ACQ_REL) > 0) return;
  msh_cuda_free_later(d, b->p);
  free(b);
}

msh_status msh_cuda_scratch(msh_cuda_dev *d, size_t bytes, void **out) {
  msh_cuda_block *old = d->scratch;
  if (old && bytes <= old->bytes) {
    *out = old->p;
    return MSH_OK;
  }
  if (msh_cuda_capturing(d))
    return MSH_FAIL(MSH_EINVAL, "device scratch must grow from %zu to %zu bytes while a graph is being captured on "
                    "CUDA device %d: run the same ops once before msh_graph_begin so that it is sized",
                    old ? old->bytes : 0, bytes, d->index);
  size_t want = bytes + bytes / 4;
  want = (want + ((size_t)1 << 20) - 1) & ~(((size_t)1 << 20) - 1);
  if (old) { /* ops queued before still use it; a graph may hold it for longer (cudaFree, when the
              * block goes, also waits for the other streams of the device) */
    CUDA_TRY(cudaStreamSynchronize(msh_cuda_cur(d)));
    d->scratch = NULL;
    msh_cuda_block_release(d, old);
  }
  msh_cuda_block *b = calloc(1, sizeof *b);
  if (!b) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  cudaError_t e = cudaMalloc(&b->p, want);
  if (e != cudaSuccess) {
    free(b);
    if (e == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError();
      return MSH_FAIL(MSH_ENOMEM, "cannot allocate %zu bytes of scratch on CUDA device %d", want, d->index);
    }
    CUDA_TRY(e);
  }
  b->bytes = want;
  b->refs = 1;
  d->scratch = b;
  *out = b->p;
  return MSH_OK;
}

/* ------------------------------------------------------------------------ graph capture */

int msh_cuda_stream_capturing(msh_cuda_dev *d, cudaStream_t s) {
  if (__atomic_load_n(&d->capturing, __ATOMIC_ACQUIRE)) return 1;
  enum cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(s, &st) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return st != cudaStreamCaptureStatusNone; /* an invalidated capture still holds the stream */
}

int msh_cuda_capturing(msh_cuda_dev *d) { return msh_cuda_stream_capturing(d, msh_cuda_cur(d)); }

int msh_cuda_capturing_index(int device_index) {
  msh_cuda_dev *d;
  if (msh_cuda_dev_get(device_index, &d) != MSH_OK) return 0;
  return msh_cuda_capturing(d);
}

msh_status msh_cuda_check_not_capturing(msh_cuda_dev *d, const char *what, const char *func) {
  if (!msh_cuda_capturing(d)) return MSH_OK;
  return msh_fail_at(MSH_EINVAL, __FILE__, __LINE__, func,
                     "%s while a graph is being captured on CUDA device %d: it would wait for the device "
                     "(do it before msh_graph_begin or after msh_graph_end)",
                     what, d->index);
}

void msh_cuda_free_later(msh_cuda_dev *d, void *p) {
  if (!p) return;
  pthread_mutex_lock(&defer_lock);
  if (d->capturing) {
    if (d->n_deferred == d->cap_deferred) {
      int cap = d->cap_deferred ? 2 * d->cap_deferred : 16;
      void **grown = realloc(d->deferred, sizeof(void *) * (size_t)cap);
      if (!grown) { /* no room to remember it: leak the block rather than stall the capture */
        pthread_mutex_unlock(&defer_lock);
        return;
      }
      d->deferred = grown;
      d->cap_deferred = cap;
    }
    d->deferred[d->n_deferred++] = p;
    pthread_mutex_unlock(&defer_lock);
    return;
  }
  pthread_mutex_unlock(&defer_lock);
  cudaFree(p); /* waits for the device; a failure here leaves nothing to recover */
  (void)cudaGetLastError();
}

/* Marks the start or the end of a capture through msh_graph_begin/end; at the end, frees what
 * was released meanwhile. */
void msh_cuda_set_capturing(msh_cuda_dev *d, int on) {
  pthread_mutex_lock(&defer_lock);
  __atomic_store_n(&d->capturing, on, __ATOMIC_RELEASE);
  void **list = NULL;
  int n = 0;
  if (!on) {
    list = d->deferred;
    n = d->n_deferred;
    d->deferred = NULL;
    d->n_deferred = d->cap_deferred = 0;
  }
  pthread_mutex_unlock(&defer_lock);
  for (int i = 0; i < n; i++) cudaFree(list[i]);
  (void)cudaGetLastError();
  free(list);
}

/* ----------------------------------------------------------------------------- streams */

msh_status msh_cuda_stream(int device_index, cudaStream_t *out) {
  msh_cuda_dev *d;
  msh_status s = msh_cuda_dev_get(device_index, &d);
  if (s == MSH_OK) *out = msh_cuda_cur(d);
  return s;
}

msh_status msh_cuda_sync(int device_index) {
  msh_cuda_dev *d;
  msh_status s = msh_cuda_dev_get(device_index, &d);
  if (s == MSH_OK) s = msh_cuda_check_not_capturing(d, "device sync", __func__);
  if (s != MSH_OK) return s;
  cudaStream_t cur = msh_cuda_cur(d);
  if (cur != d->stream) CUDA_TRY(cudaStreamSynchronize(cur));
  CUDA_TRY(cudaStreamSynchronize(d->stream));
  return MSH_OK;
}

int msh_cuda_set_gemv_max_m(int device_index, int m) {
  msh_cuda_dev *d;
  if (msh_cuda_dev_get(device_index, &d) != MSH_OK) return -1;
  int old = d->gemv_max_m;
  d->gemv_max_m = m < 0 ? 0 : m > 16 ? 16 : m;
  return old;
}
