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

/* Per-device state, created on first use of the device and kept for the process's life. */
typedef struct msh_cuda_dev {
  int index;
  int sm_count;
  cudaStream_t stream;     /* the device's current stream: non-blocking, every op runs on it */
  cublasHandle_t blas;     /* bound to stream */
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

/* Device scratch of at least bytes (contents undefined). Growing it waits for the device (the
 * old block goes once no graph holds it), so size it once before a hot loop; during a graph
 * capture growing fails with MSH_EINVAL. */
msh_status msh_cuda_scratch(msh_cuda_dev *d, size_t bytes, void **out);

/* One more reference to a block of device d / one less (the memory goes with the last, through
 * msh_cuda_free_later). */
void msh_cuda_block_retain(msh_cuda_block *b);
void msh_cuda_block_release(msh_cuda_dev *d, msh_cuda_block *b);

/* ------------------------------------------------------------------------ graph capture */

/* 1 while the device's stream is being captured into a graph (by msh_graph_begin or directly by
 * cudaStreamBeginCapture), 0 otherwise. */
int msh_cuda_capturing(msh_cuda_dev *d);

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

/* The current stream of a device (for events and timing in benchmarks and tests). */
msh_status msh_cuda_stream(int device_index, cudaStream_t *out);

/* Waits until all work queued on the device's stream has finished (MSH_EINVAL during a graph
 * capture). */
msh_status msh_cuda_sync(int device_index);

/* ------------------------------------------------------------------------------ staging */

/* Host-to-device copies through the device's pinned staging buffers (cuda_staging.c); see
 * msh_device_set_staging in moonshard.h. upload_rows: dst (contiguous, rows * cols elements of
 * dst_dtype) = host rows of cols elements of src_dtype, ld elements apart, converting float dtypes
 * on the device. upload_bytes: bytes from host memory to device memory of device d (current). Both
 * return once the source has been read; the device finishes in stream order. */
msh_status msh_cuda_upload_rows(int device_index, void *dst, int dst_dtype, const void *src, int src_dtype,
                                int64_t rows, int64_t cols, int64_t ld);
msh_status msh_cuda_upload_bytes(msh_cuda_dev *d, void *dst, const void *src, uint64_t bytes);
/* msh_cuda_staging_set / _stats are declared in internal.h (the public wrappers call them). */

/* Tuning knob: M up to which matmul uses the GEMV kernel (clamped to [0, 16]); returns the
 * previous value. */
int msh_cuda_set_gemv_max_m(int device_index, int m);

#endif
