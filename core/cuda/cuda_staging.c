/* cuda_staging.c: host-to-device copies of host memory (mapped weight files above all) through
 * pinned staging buffers. The host packs chunk i + 1 into one pinned buffer while the copy engine
 * moves chunk i out of another; an event recorded after each buffer's copy says when it may be
 * filled again. A conversion (f32 or f16 file, bf16 device) uploads the chunk in the source dtype
 * into device scratch and converts it there, so the host only ever copies bytes.
 *
 * The buffers of a device (n_buffers x chunk bytes of pinned memory) are allocated on its first
 * staged copy and kept for the process's life (msh_cuda_staging_set frees them). A staged copy
 * returns once every byte of the source sits in pinned memory or on the device: the source may
 * go at once, and the device finishes the copy in stream order, before any op queued later. */
#include "cuda_internal.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "msh_kernels.h"

enum {
  MAX_DEVICES = 64,
  MAX_BUFFERS = 8,
  DEFAULT_BUFFERS = 3,
  PACK_PIECE = 2 << 20,  /* bytes one host thread packs at a time in a large chunk */
  PACK_THREADS = 4       /* host threads packing one chunk (mapped pages fault in parallel) */
};
static const uint64_t DEFAULT_CHUNK = (uint64_t)32 << 20;
static const uint64_t MIN_CHUNK = 4096, MAX_CHUNK = (uint64_t)1 << 30;

typedef struct staging {
  pthread_mutex_t lock;
  uint64_t chunk;              /* bytes per buffer */
  int n;                       /* buffers in the ring */
  int next;                    /* the buffer the next chunk goes to */
  int unavailable;             /* pinned memory was refused: copies go straight from pageable memory */
  void *buf[MAX_BUFFERS];      /* pinned host memory, chunk bytes each (NULL until first use) */
  cudaEvent_t ev[MAX_BUFFERS]; /* recorded on the device's stream after the copy out of buf[i] */
  int pending[MAX_BUFFERS];    /* ev[i] was recorded and not waited for yet */
  uint64_t bytes, chunks;      /* statistics: source bytes and chunks that went through */
} staging;

static pthread_mutex_t table_lock = PTHREAD_MUTEX_INITIALIZER;
static staging *table[MAX_DEVICES];

static staging *staging_for(int device_index) {
  if (device_index < 0 || device_index >= MAX_DEVICES) return NULL;
  pthread_mutex_lock(&table_lock);
  staging *g = table[device_index];
  if (!g) {
    g = calloc(1, sizeof *g);
    if (g) {
      pthread_mutex_init(&g->lock, NULL);
      g->chunk = DEFAULT_CHUNK;
      g->n = DEFAULT_BUFFERS;
      table[device_index] = g;
    }
  }
  pthread_mutex_unlock(&table_lock);
  return g;
}

/* Waits for every buffer's last copy; then frees the buffers and events (g->lock held). */
static msh_status drain_and_free(staging *g) {
  msh_status s = MSH_OK;
  for (int i = 0; i < MAX_BUFFERS; i++) {
    if (g->pending[i]) {
      msh_status e = msh_cuda_check_at(MSH_CUDA_RT, cudaEventSynchronize(g->ev[i]), "cudaEventSynchronize", __FILE__,
                                       __LINE__, __func__);
      if (s == MSH_OK) s = e;
      g->pending[i] = 0;
    }
    if (g->ev[i]) cudaEventDestroy(g->ev[i]);
    if (g->buf[i]) cudaFreeHost(g->buf[i]);
    g->ev[i] = NULL;
    g->buf[i] = NULL;
  }
  (void)cudaGetLastError();
  g->next = 0;
  return s;
}

/* Allocates the ring on first use (g->lock held, the device current). Pinned memory refused:
 * g->unavailable, and copies go from pageable memory. */
static msh_status ensure_buffers(staging *g) {
  if (g->buf[0] || g->unavailable) return MSH_OK;
  for (int i = 0; i < g->n; i++) {
    cudaError_t e = cudaHostAlloc(&g->buf[i], (size_t)g->chunk, cudaHostAllocDefault);
    if (e == cudaSuccess) e = cudaEventCreateWithFlags(&g->ev[i], cudaEventDisableTiming);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      if (g->buf[i] && !g->ev[i]) {
        cudaFreeHost(g->buf[i]);
        g->buf[i] = NULL;
      }
      (void)drain_and_free(g);
      if (e == cudaErrorMemoryAllocation) { /* locked memory is limited here: stay correct, only slower */
        g->unavailable = 1;
        return MSH_OK;
      }
      return msh_cuda_check_at(MSH_CUDA_RT, e, "cudaHostAlloc/cudaEventCreate", __FILE__, __LINE__, __func__);
    }
  }
  return MSH_OK;
}

/* ---------------------------------------------------------------------------------- packing */

/* The source: rows of `cols` packed bytes, `ld` bytes apart. */
typedef struct src_rows {
  const char *p;
  uint64_t rows, cols, ld;
} src_rows;

/* Copies bytes [b0, b0 + n) of the packed source into dst. */
static void pack_range(char *dst, const src_rows *src, uint64_t b0, uint64_t n) {
  if (src->rows <= 1 || src->ld == src->cols) {
    memcpy(dst, src->p + b0, (size_t)n);
    return;
  }
  uint64_t r = b0 / src->cols, c = b0 % src->cols;
  while (n) {
    uint64_t take = src->cols - c < n ? src->cols - c : n;
    memcpy(dst, src->p + r * src->ld + c, (size_t)take);
    dst += take;
    n -= take;
    r++;
    c = 0;
  }
}

/* Packs n bytes from b0 into a pinned buffer, several threads for a large chunk. */
static void pack(char *dst, const src_rows *src, uint64_t b0, uint64_t n) {
  if (n < 2 * (uint64_t)PACK_PIECE) {
    pack_range(dst, src, b0, n);
    return;
  }
  int64_t pieces = (int64_t)((n + PACK_PIECE - 1) / PACK_PIECE);
  int nt = msh_get_num_threads();
  if (nt > PACK_THREADS) nt = PACK_THREADS;
  if (nt > pieces) nt = (int)pieces;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < pieces; i++) {
    uint64_t off = (uint64_t)i * PACK_PIECE;
    uint64_t len = n - off < (uint64_t)PACK_PIECE ? n - off : (uint64_t)PACK_PIECE;
    pack_range(dst + off, src, b0 + off, len);
  }
}

/* ------------------------------------------------------------------------------- the copy */

/* dst (contiguous, n = rows * cols elements of dst_dt on device d) = src (host rows of cols
 * elements of src_dt, ld elements apart). */
static msh_status staged_copy(msh_cuda_dev *d, void *dst, int dst_dt, const void *src, int src_dt, int64_t rows,
                              int64_t cols, int64_t ld) {
  size_t ses = msh_dtype_size(src_dt), des = msh_dtype_size(dst_dt);
  cudaStream_t st = msh_cuda_cur(d); /* the copy goes to this thread's current stream */
  int convert = src_dt != dst_dt;
  src_rows sr = {src, (uint64_t)rows, (uint64_t)cols * ses, (uint64_t)ld * ses};
  uint64_t total = sr.rows * sr.cols;
  if (!total) return MSH_OK;
  staging *g = staging_for(d->index);
  if (!g) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  pthread_mutex_lock(&g->lock);
  msh_status s = ensure_buffers(g);
  if (s != MSH_OK) goto done;
  /* a chunk holds whole source elements (the chunk size is a multiple of 64 bytes) */
  uint64_t chunk = g->chunk;
  void *scratch = NULL;
  if (convert) {
    s = msh_cuda_scratch(d, (size_t)(chunk < total ? chunk : total), &scratch);
    if (s != MSH_OK) goto done;
  }
  for (uint64_t b0 = 0; b0 < total; b0 += chunk) {
    uint64_t n = total - b0 < chunk ? total - b0 : chunk;
    char *dev_at = convert ? (char *)dst + b0 / ses * des : (char *)dst + b0;
    void *to = convert ? scratch : dev_at;
    if (g->unavailable) { /* pageable: CUDA stages it itself and returns once src was read */
      char *tmp = NULL;
      const void *from = src;
      if (sr.rows > 1 && sr.ld != sr.cols) {
        tmp = malloc((size_t)n);
        if (!tmp) {
          s = MSH_FAIL(MSH_ENOMEM, "out of memory");
          goto done;
        }
        pack_range(tmp, &sr, b0, n);
        from = tmp;
      } else {
        from = (const char *)src + b0;
      }
      cudaError_t e = cudaMemcpyAsync(to, from, (size_t)n, cudaMemcpyDefault, st); /* to: maybe mapped host */
      if (e == cudaSuccess) e = cudaStreamSynchronize(st);
      free(tmp);
      s = msh_cuda_check_at(MSH_CUDA_RT, e, "cudaMemcpyAsync", __FILE__, __LINE__, __func__);
    } else {
      int i = g->next;
      if (g->pending[i]) { /* the copy out of this buffer, queued n_buffers chunks ago */
        s = msh_cuda_check_at(MSH_CUDA_RT, cudaEventSynchronize(g->ev[i]), "cudaEventSynchronize", __FILE__, __LINE__,
                              __func__);
        g->pending[i] = 0;
        if (s != MSH_OK) goto done;
      }
      pack(g->buf[i], &sr, b0, n);
      s = msh_cuda_check_at(MSH_CUDA_RT, cudaMemcpyAsync(to, g->buf[i], (size_t)n, cudaMemcpyDefault, st),
                            "cudaMemcpyAsync", __FILE__, __LINE__, __func__);
      if (s == MSH_OK)
        s = msh_cuda_check_at(MSH_CUDA_RT, cudaEventRecord(g->ev[i], st), "cudaEventRecord", __FILE__, __LINE__,
                              __func__);
      if (s != MSH_OK) goto done;
      g->pending[i] = 1;
      g->next = (i + 1) % g->n;
    }
    if (s != MSH_OK) goto done;
    if (convert) {
      /* the next chunk's copy into the same scratch is queued after this kernel on the stream */
      s = msh_cuda_check_at(MSH_CUDA_RT, msh_k_convert(st, dev_at, dst_dt, scratch, src_dt, (int64_t)(n / ses)),
                            "msh_k_convert", __FILE__, __LINE__, __func__);
      if (s != MSH_OK) goto done;
    }
    g->bytes += n;
    g->chunks++;
  }
done:
  pthread_mutex_unlock(&g->lock);
  return s;
}

msh_status msh_cuda_upload_rows(int device_index, void *dst, int dst_dtype, const void *src, int src_dtype,
                                int64_t rows, int64_t cols, int64_t ld) {
  msh_cuda_dev *d;
  msh_status s = msh_cuda_dev_get(device_index, &d);
  if (s == MSH_OK) s = msh_cuda_check_not_capturing(d, "copying from the host to the device", __func__);
  if (s != MSH_OK) return s;
  if (rows < 0 || cols < 0 || (rows > 1 && ld < cols) || !msh_dtype_size(src_dtype) || !msh_dtype_size(dst_dtype))
    return MSH_FAIL(MSH_EINVAL, "bad staged copy: %lld rows of %lld elements, %lld apart, %s to %s", (long long)rows,
                    (long long)cols, (long long)ld, msh_dtype_name(src_dtype), msh_dtype_name(dst_dtype));
  return staged_copy(d, dst, dst_dtype, src, src_dtype, rows, cols, ld);
}

msh_status msh_cuda_upload_bytes(msh_cuda_dev *d, void *dst, const void *src, uint64_t bytes) {
  return staged_copy(d, dst, MSH_I8, src, MSH_I8, 1, (int64_t)bytes, (int64_t)bytes);
}

/* ------------------------------------------------------------------------------ settings */

msh_status msh_cuda_staging_set(int device_index, uint64_t chunk_bytes, int n_buffers) {
  msh_cuda_dev *d;
  msh_status s = msh_cuda_dev_get(device_index, &d);
  if (s != MSH_OK) return s;
  if (chunk_bytes == 0) chunk_bytes = DEFAULT_CHUNK;
  if (n_buffers == 0) n_buffers = DEFAULT_BUFFERS;
  if (chunk_bytes < MIN_CHUNK || chunk_bytes > MAX_CHUNK || n_buffers < 2 || n_buffers > MAX_BUFFERS)
    return MSH_FAIL(MSH_EINVAL, "staging of %d buffers of %llu bytes: want 2 to %d buffers of %llu bytes to %llu",
                    n_buffers, (unsigned long long)chunk_bytes, MAX_BUFFERS, (unsigned long long)MIN_CHUNK,
                    (unsigned long long)MAX_CHUNK);
  staging *g = staging_for(device_index);
  if (!g) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  pthread_mutex_lock(&g->lock);
  s = drain_and_free(g);
  g->chunk = (chunk_bytes + 63) & ~(uint64_t)63; /* whole elements of every dtype in each chunk */
  g->n = n_buffers;
  g->unavailable = 0;
  pthread_mutex_unlock(&g->lock);
  return s;
}

msh_status msh_cuda_staging_stats(int device_index, uint64_t *chunk_bytes, int *n_buffers, uint64_t *bytes,
                                  uint64_t *chunks) {
  msh_cuda_dev *d;
  msh_status s = msh_cuda_dev_get(device_index, &d);
  if (s != MSH_OK) return s;
  staging *g = staging_for(device_index);
  if (!g) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  pthread_mutex_lock(&g->lock);
  if (chunk_bytes) *chunk_bytes = g->chunk;
  if (n_buffers) *n_buffers = g->unavailable ? 0 : g->n;
  if (bytes) *bytes = g->bytes;
  if (chunks) *chunks = g->chunks;
  pthread_mutex_unlock(&g->lock);
  return MSH_OK;
}
