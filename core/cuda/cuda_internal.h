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

/* Per-device state, created on first use of the device and kept for the process's life. */
typedef struct msh_cuda_dev {
  int index;
  int sm_count;
  cudaStream_t stream;     /* the device's current stream: non-blocking, every op runs on it */
  cublasHandle_t blas;     /* bound to stream */
  void *scratch;           /* grows on demand: converted activations, attention partials */
  size_t scratch_bytes;
  int32_t *dev_words;      /* 64 device int32: error flags, small results */
  int32_t *host_words;     /* 64 pinned host int32 */
  int gemv_max_m;          /* matmul takes the GEMV kernel for M <= this (default 1) */
} msh_cuda_dev;

/* Makes device_index current on this thread and returns its state (created on first use).
 * MSH_EINVAL "CUDA device 3 does not exist (2 present)" for an index out of range. */
msh_status msh_cuda_dev_get(int device_index, msh_cuda_dev **out);

/* Device scratch of at least bytes (contents undefined). Growing it waits for the device (the
 * old block is freed), so size it once before a hot loop or graph capture. */
msh_status msh_cuda_scratch(msh_cuda_dev *d, size_t bytes, void **out);

/* The current stream of a device (for events and timing in benchmarks and tests). */
msh_status msh_cuda_stream(int device_index, cudaStream_t *out);

/* Waits until all work queued on the device's stream has finished. */
msh_status msh_cuda_sync(int device_index);

/* Tuning knob: M up to which matmul uses the GEMV kernel (clamped to [0, 16]); returns the
 * previous value. */
int msh_cuda_set_gemv_max_m(int device_index, int m);

#endif
