/* cuda_internal.h: the CUDA host side shared by the files of core/cuda (devices, streams, handles,
 * scratch, error checking). Not part of the public API. */
#ifndef MSH_CUDA_INTERNAL_H
#define MSH_CUDA_INTERNAL_H

#include "internal.h"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

/* ------------------------------------------------------------------------------ errors */

enum { MSH_CUDA_RT = 0, MSH_CUDA_BLAS = 1 };

/* The one checker of CUDA runtime and cuBLAS return codes: MSH_OK for success, otherwise
 * records "<call> failed: <name>: <description>" as the last error and returns MSH_EDEVICE
 * (MSH_ENOMEM for an allocation failure). lib is MSH_CUDA_RT or MSH_CUDA_BLAS. */
msh_status msh_cuda_check_at(int lib, int code, const char *call, const char *file, int line, const char *func);

/* Return from the calling function with the status when a call fails. */
#define CUDA_TRY(call)                                                                                \
  do {                                                                                                \
    msh_status s_ = msh_cuda_check_at(MSH_CUDA_RT, (int)(call), #call, __FILE__, __LINE__, __func__); \
    if (s_ != MSH_OK) return s_;                                                                      \
  } while (0)
#define CUBLAS_TRY(call)                                                                                \
  do {                                                                                                  \
    msh_status s_ = msh_cuda_check_at(MSH_CUDA_BLAS, (int)(call), #call, __FILE__, __LINE__, __func__); \
    if (s_ != MSH_OK) return s_;                                                                        \
  } while (0)

/* ----------------------------------------------------------------------------- devices */

/* A block of device memory shared by reference: the device's scratch holds one reference while
 * it is current, and every CUDA graph captured over it holds one, so growing the scratch never
 * frees memory a graph still uses. */
typedef struct msh_cuda_block {
  void *p;
  size_t bytes;
  int refs;
} msh_cuda_block;

enum { MSH_CUDA_MAX_DEVICES = 64 };

/* Per-device state, created on first use of the device and kept for the process's life. */
typedef struct msh_cuda_dev {
  int index;
  int sm_count;
  cudaStream_t stream;     /* the device's default stream: non-blocking; current unless a thread chose another */
  cublasHandle_t blas;     /* bound to blas_stream (msh_cuda_blas) */
  cudaStream_t blas_stream;
  cudaStream_t capture_stream; /* the stream msh_graph_begin captures, while capturing */
  msh_cuda_block *scratch; /* grows on demand: converted activations, attention partials */
  int32_t *dev_words;      /* 64 device int32: error flags, small results */
  int32_t *host_words;     /* 64 pinned host int32 */
  int gemv_max_m;          /* matmul takes the GEMV kernel for M <= this (default 1) */
  int capturing;           /* msh_graph_begin was called and msh_graph_end not yet */
  void **deferred;         /* device blocks released during a capture, freed by msh_graph_end */
  int n_deferred, cap_deferred;
} msh_cuda_dev;

/* Makes device_index current on this thread and returns its state (created on first use).
 * MSH_EINVAL "CUDA device 3 does not exist (2 present)" for an index out of range. */
msh_status msh_cuda_dev_get(int device_index, msh_cuda_dev **out);
msh_status msh_cuda_device_count(int *out);

/* ----------------------------------------------------------------------------- streams */

/* The calling thread's current stream of each device, NULL for the default (cuda_stream.c). */
extern __thread cudaStream_t msh_cuda_tls_stream[MSH_CUDA_MAX_DEVICES];

/* The stream every op of this thread on device d goes to: one thread-local load. */
static inline cudaStream_t msh_cuda_cur(const msh_cuda_dev *d) {
  cudaStream_t s = msh_cuda_tls_stream[d->index];
  return s ? s : d->stream;
}

/* d's cuBLAS handle, bound to stream st (rebinding only when it changes). */
static inline cublasHandle_t msh_cuda_blas(msh_cuda_dev *d, cudaStream_t st) {
  if (d->blas_stream != st && cublasSetStream(d->blas, st) == CUBLAS_STATUS_SUCCESS) d->blas_stream = st;
  return d->blas;
}

/* Device scratch of at least bytes (contents undefined). Growing it waits for the device (the
 * old block goes once no graph holds it), so size it once before a hot loop; during a graph
 * capture growing fails with MSH_EINVAL. */
msh_status msh_cuda_scratch(msh_cuda_dev *d, size_t bytes, void **out);

/* One more reference to a block of device d / one less (the memory goes with the last, through
 * msh_cuda_free_later). */
void msh_cuda_block_retain(msh_cuda_block *b);
void msh_cuda_block_release(msh_cuda_dev *d, msh_cuda_block *b);

/* ------------------------------------------------------------------------ graph capture */

/* 1 while a graph is being captured on the device (msh_graph_begin) or the thread's current
 * stream is being captured (directly by cudaStreamBeginCapture, say), 0 otherwise. */
int msh_cuda_capturing(msh_cuda_dev *d);
/* The same for a given stream st of the device. */
int msh_cuda_stream_capturing(msh_cuda_dev *d, cudaStream_t st);

/* MSH_OK, or MSH_EINVAL saying that `what` cannot run while a graph is being captured on the
 * device because it would wait for the device (host copies, results read back, allocation). */
msh_status msh_cuda_check_not_capturing(msh_cuda_dev *d, const char *what, const char *func);

/* Frees device memory now, or at msh_graph_end when a graph is being captured on the device
 * (cudaFree would wait for the device in the middle of the capture). */
void msh_cuda_free_later(msh_cuda_dev *d, void *p);

/* Marks a capture started by msh_graph_begin (on = 1) or ended by msh_graph_end (on = 0, which
 * also frees what msh_cuda_free_later deferred). */
void msh_cuda_set_capturing(msh_cuda_dev *d, int on);

/* Graph hooks of the backend vtable (cuda_graph.c). */
msh_status msh_cuda_graph_begin(int device_index);
msh_status msh_cuda_graph_end(int device_index, void **out);
msh_status msh_cuda_graph_launch(void *g);
void msh_cuda_graph_free(void *g);

/* The calling thread's current stream of a device (for events and timing in benchmarks). */
msh_status msh_cuda_stream(int device_index, cudaStream_t *out);

/* Waits until all work queued on the device's default stream and the thread's current stream has
 * finished (MSH_EINVAL during a graph capture). */
msh_status msh_cuda_sync(int device_index);

/* Stream and event hooks of the backend vtable (cuda_stream.c; see msh_backend). */
msh_status msh_cuda_stream_new(int device_index, void **out);
void msh_cuda_stream_free(int device_index, void *s);
msh_status msh_cuda_stream_sync(int device_index, void *s);
msh_status msh_cuda_stream_set_current(int device_index, void *s);
msh_status msh_cuda_event_new(int device_index, void **out);
void msh_cuda_event_free(void *e);
msh_status msh_cuda_event_record(int device_index, void *e, void *s);
msh_status msh_cuda_stream_wait_event(int device_index, void *s, void *e);
int msh_cuda_event_query(void *e);
msh_status msh_cuda_event_sync(void *e);
msh_status msh_cuda_event_elapsed_ms(void *start, void *end, float *ms);
int msh_cuda_capturing_index(int device_index);

/* ------------------------------------------------------------------------------ staging */

/* Host-to-device copies through the device's pinned staging buffers (cuda_staging.c); see
 * msh_device_set_staging in moonshard.h. upload_rows: dst (contiguous, rows * cols elements of
 * dst_dtype) = host rows of cols elements of src_dtype, ld elements apart, converting float dtypes
 * on the device. upload_bytes: bytes from host memory to device memory of device d (current). Both
 * return once the source has been read; the device finishes in stream order. */
msh_status msh_cuda_upload_rows(int device_index, void *dst, int dst_dtype, const void *src, int src_dtype,
                                int64_t rows, int64_t cols, int64_t ld);
msh_status msh_cuda_upload_bytes(msh_cuda_dev *d, void *dst, const void *src, uint64_t bytes);
/* msh_device_set_staging and msh_device_staging_stats of this backend. */
msh_status msh_cuda_staging_set(int device_index, uint64_t chunk_bytes, int n_buffers);
msh_status msh_cuda_staging_stats(int device_index, uint64_t *chunk_bytes, int *n_buffers, uint64_t *bytes,
                                  uint64_t *chunks);

/* ---------------------------------------------------------------------------------- NCCL */

#ifdef MSH_WITH_NCCL
/* The NCCL engine (comm_nccl.c), reached from comm.c through the module's registration:
 * msh_nccl_unique_id and msh_comm_new_nccl after their argument checks. */
msh_status msh_cuda_nccl_unique_id(uint8_t *id);
msh_status msh_cuda_nccl_comm_new(msh_comm **out, int rank, int world, const uint8_t *id, int device_index);
#endif

/* Tuning knob: M up to which matmul uses the GEMV kernel (clamped to [0, 16]); returns the
 * previous value. */
int msh_cuda_set_gemv_max_m(int device_index, int m);

#endif
