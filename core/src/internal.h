/* internal.h: private declarations shared by the C core (not part of the public API). */
#ifndef MSH_INTERNAL_H
#define MSH_INTERNAL_H

#include "moonshard.h"

#include <stdarg.h>
#include <stdbool.h>

/* ------------------------------------------------------------------------------ errors */

/* Records "func: message (file:line)" as the thread's last error and returns s. */
msh_status msh_fail_at(msh_status s, const char *file, int line, const char *func,
                       const char *fmt, ...) __attribute__((format(printf, 5, 6)));
#define MSH_FAIL(s, ...) msh_fail_at((s), __FILE__, __LINE__, __func__, __VA_ARGS__)

/* ------------------------------------------------------------------------------ dtypes */

enum { MSH_QK = 32 }; /* elements per block of ggml's block-quantized dtypes (Q8_0, Q4_0, Q4_1) */

static inline int msh_dtype_is_block(int dt) { return dt >= MSH_Q8_0 && dt < MSH_DTYPE_COUNT; }
/* moonshard's group-wise dtypes (I8G*, I4G*), blocks of 32, 64 or 128 elements */
static inline int msh_dtype_is_group(int dt) { return dt >= MSH_I8G32 && dt < MSH_DTYPE_COUNT; }
static inline int msh_dtype_is_i4g(int dt) { return dt >= MSH_I4G32 && dt < MSH_DTYPE_COUNT; }

/* Elements per block (1 for plain dtypes, 0 if unknown) and bytes per block (element size). */
static inline int64_t msh_dt_block_elems(int dt) {
  switch (dt) {
  case MSH_Q8_0: case MSH_Q4_0: case MSH_Q4_1: case MSH_I8G32: case MSH_I4G32: return MSH_QK;
  case MSH_I8G64: case MSH_I4G64: return 64;
  case MSH_I8G128: case MSH_I4G128: return 128;
  default: return dt >= 0 && dt < MSH_Q8_0 ? 1 : 0;
  }
}

static inline int64_t msh_dt_block_bytes(int dt) {
  switch (dt) {
  case MSH_F32: case MSH_I32: return 4;
  case MSH_F16: case MSH_BF16: return 2;
  case MSH_I8: return 1;
  case MSH_Q8_0: return 34;
  case MSH_Q4_0: return 18;
  case MSH_Q4_1: return 20;
  case MSH_I8G32: case MSH_I8G64: case MSH_I8G128: return 4 + msh_dt_block_elems(dt); /* f32 d, G x i8 */
  case MSH_I4G32: case MSH_I4G64: case MSH_I4G128: return 4 + msh_dt_block_elems(dt) / 2; /* f16 d, m, nibbles */
  default: return 0;
  }
}

/* Bytes that n consecutive elements of dtype dt take, rounded up to whole blocks: every byte-size
 * and byte-offset computation goes through here (offsets of block dtypes are whole blocks). */
static inline int64_t msh_dtype_bytes(int dt, int64_t n) {
  if (!msh_dtype_is_block(dt)) return n * msh_dt_block_bytes(dt);
  int64_t be = msh_dt_block_elems(dt);
  return (n + be - 1) / be * msh_dt_block_bytes(dt);
}

/* ---------------------------------------------------------------------------- storage */

/* The memory behind one or more tensors. */
typedef struct msh_storage {
  int refs;
  int device;       /* msh_device_kind */
  int device_index;
  int readonly;
  void *base;
  uint64_t bytes;
  int owned;        /* base is freed through the device's backend when refs drop to 0 */
  msh_file *file;   /* a mapped file this storage keeps alive, or NULL */
  /* host memory page-locked by this backend (msh_tensor_new_pinned), which also frees it */
  const struct msh_backend *pinned_by;
  /* device-mapped host memory (msh_tensor_map_host): base is the device's address of the
   * page-locked bytes of this host storage, which it keeps alive (one reference); NULL otherwise */
  struct msh_storage *host;
} msh_storage;

struct msh_tensor {
  msh_storage *st;
  int dtype;
  int ndim;
  int64_t offset;                 /* elements from st->base to element 0 */
  int64_t shape[MSH_MAX_DIMS];
  int64_t stride[MSH_MAX_DIMS];   /* elements */
};

void msh_file_retain(msh_file *f);

/* Makes a tensor handle over a storage (takes one reference on st). */
msh_status msh_tensor_make(msh_tensor **out, msh_storage *st, int dtype, int ndim,
                           const int64_t *shape, const int64_t *strides, int64_t offset);

static inline void *msh_tensor_ptr(const msh_tensor *t) {
  return (char *)t->st->base + msh_dtype_bytes(t->dtype, t->offset);
}

/* The bytes of a block-quantized tensor as an i8 tensor of the same storage (rows of blocks
 * become rows of bytes), so that same-dtype copies move bytes on any backend. */
static inline msh_tensor msh_tensor_block_bytes(const msh_tensor *t) {
  msh_tensor v = *t;
  int64_t bb = msh_dt_block_bytes(t->dtype), last = t->ndim - 1;
  v.dtype = MSH_I8;
  int64_t be = msh_dt_block_elems(t->dtype);
  v.offset = t->offset / be * bb;
  for (int i = 0; i < last; i++) v.stride[i] = t->stride[i] / be * bb;
  v.shape[last] = t->shape[last] / be * bb;
  v.stride[last] = 1;
  return v;
}

/* The first M x N elements of a contiguous t as an (M, N) tensor (a stack view of the same
 * storage): the scratch operands of the fused ops. */
static inline msh_tensor msh_rows_view(const msh_tensor *t, int64_t M, int64_t N) {
  msh_tensor v = *t;
  v.ndim = 2;
  v.shape[0] = M;
  v.shape[1] = N;
  v.stride[0] = N;
  v.stride[1] = 1;
  return v;
}

/* t as `rows` rows of `cols` packed elements, ld apart (dims 1.. packed, a row stride that does
 * not overlap rows): the layout of a weight, of its slices along either dim, and of a cache's
 * rows. A 0-dim tensor is one row of one element. */
static inline int msh_packed_rows(const msh_tensor *t, int64_t *rows, int64_t *cols, int64_t *ld) {
  if (t->ndim == 0) {
    *rows = *cols = *ld = 1;
    return 1;
  }
  int64_t acc = 1;
  for (int i = t->ndim - 1; i >= 1; i--) {
    if (t->shape[i] != 1 && t->stride[i] != acc) return 0;
    acc *= t->shape[i];
  }
  if (t->shape[0] > 1 && t->stride[0] < acc) return 0;
  *rows = t->shape[0];
  *cols = acc;
  *ld = t->shape[0] > 1 ? t->stride[0] : acc;
  return 1;
}

static inline int64_t msh_rows(const msh_tensor *t) {
  return t->ndim == 0 ? 1 : msh_tensor_numel(t) / t->shape[t->ndim - 1];
}

/* "(2, 3, 4) f32" into buf. */
const char *msh_shape_str(const msh_tensor *t, char *buf, size_t cap);

/* ---------------------------------------------------------------------------- backends */

/* A device backend: memory and ops over validated operands. The generic layer (tensor.c, ops.c)
 * checks shapes, dtypes, contiguity and devices before calling in, so implementations may
 * assume: outputs contiguous f32 unless stated, inputs as documented in moonshard.h. */
typedef struct msh_backend {
  const char *name;
  msh_status (*alloc)(int device_index, uint64_t bytes, void **out); /* zero-filled */
  void (*release)(int device_index, void *p);
  /* dst = src, same device, equal shapes, any strides, dtype conversion as msh_tensor_copy. */
  msh_status (*copy)(msh_tensor *dst, const msh_tensor *src);
  /* Contiguous bytes between host memory and this device. */
  msh_status (*upload)(int device_index, void *dst, const void *src, uint64_t bytes);
  msh_status (*download)(int device_index, void *dst, const void *src, uint64_t bytes);
  /* Optional (NULL: the generic path): dst (contiguous, rows * cols elements of dst_dtype on
   * this device) = host memory holding rows of cols elements of src_dtype, ld elements apart,
   * converting between float dtypes on the device (equal dtypes otherwise). Returns once src has
   * been read. */
  msh_status (*upload_rows)(int device_index, void *dst, int dst_dtype, const void *src, int src_dtype,
                            int64_t rows, int64_t cols, int64_t ld);

  msh_status (*embedding)(msh_tensor *out, const msh_tensor *table, const msh_tensor *ids);
  msh_status (*rmsnorm)(msh_tensor *out, const msh_tensor *x, const msh_tensor *w, float eps);
  msh_status (*matmul)(msh_tensor *out, const msh_tensor *x, const msh_tensor *w);
  msh_status (*rope)(msh_tensor *x, const msh_tensor *pos, const msh_tensor *inv_freq, int style);
  /* Batched: out, q (B, T, H, hd) contiguous; k, v (B, S, KVH, hd) with packed heads and any
   * row and batch strides (3-D operands arrive as B = 1); T >= 1 and pos0 + T <= S. Every
   * sequence's queries sit at pos0 .. pos0 + T - 1. */
  msh_status (*attention)(msh_tensor *out, const msh_tensor *q, const msh_tensor *k,
                          const msh_tensor *v, int64_t pos0, float scale);
  /* Positions read from device memory when the op runs (row0, pos0: contiguous i32 on the
   * device, 1 element shared by every sequence or B, one per sequence).
   * set_rows_dyn: dst (B, S, ...), src (B, T, ...) on dst's device, equal in dim 0 and past
   * dim 1 (a plain (S, ...) form arrives as B = 1), 0 < T <= S, any strides; row r of sequence b
   * goes to row row0[b] + r of dst[b], the row clamped into [0, S - T]. attention_dyn: operands
   * as attention, T <= max_len <= S; each sequence's pos0 is clamped into [0, max_len - T] and
   * the work is planned for max_len. */
  msh_status (*set_rows_dyn)(msh_tensor *dst, const msh_tensor *row0, const msh_tensor *src);
  msh_status (*attention_dyn)(msh_tensor *out, const msh_tensor *q, const msh_tensor *k,
                              const msh_tensor *v, const msh_tensor *pos0, int64_t max_len, float scale);
  /* Optional (NULL: MSH_EUNSUPPORTED): the paged KV cache (moonshard.h), operands checked by
   * msh_op_kv_write / msh_op_paged_attention: pools (NB, BS, KVH, hd) contiguous of one float
   * dtype; the i32 arrays contiguous on the device; R >= 1 rows; the values in the arrays are
   * the backend's to check (host) or clamp (device). */
  msh_status (*kv_write)(msh_tensor *k_pool, msh_tensor *v_pool, const msh_tensor *k, const msh_tensor *v,
                         const msh_tensor *slots);
  msh_status (*paged_attention)(msh_tensor *out, const msh_tensor *q, const msh_tensor *k_pool,
                                const msh_tensor *v_pool, const msh_tensor *q_start, const msh_tensor *ctx_len,
                                const msh_tensor *block_table, int64_t max_ctx, float scale);
  /* The fused ops (moonshard.h): matmul_acc adds into out; matmul_glu may use scratch; qkv_rope
   * gets caches (B, S, KVH, hd) (a 3-D cache as B = 1), T = rows / B. */
  msh_status (*matmul_acc)(msh_tensor *out, const msh_tensor *x, const msh_tensor *w);
  msh_status (*matmul_glu)(msh_tensor *out, const msh_tensor *x, const msh_tensor *w, msh_tensor *scratch);
  msh_status (*qkv_rope)(msh_tensor *q_out, msh_tensor *k_cache, msh_tensor *v_cache, const msh_tensor *qkv,
                         const msh_tensor *pos, const msh_tensor *inv_freq, int style);
  /* Optional (NULL: rmsnorm into h, then matmul or matmul_glu): operands checked as
   * msh_op_rmsnorm_matmul's, gu NULL for the plain projection. */
  msh_status (*rmsnorm_matmul)(msh_tensor *out, const msh_tensor *x, const msh_tensor *norm_w, float eps,
                               const msh_tensor *w, msh_tensor *h, msh_tensor *gu);
  /* Optional (NULL: rmsnorm_matmul's GLU form into g, then matmul_acc into x): operands checked
   * as msh_op_rmsnorm_mlp's. */
  msh_status (*rmsnorm_mlp)(msh_tensor *x, const msh_tensor *norm_w, float eps, const msh_tensor *w_gu,
                            const msh_tensor *w_down, msh_tensor *h, msh_tensor *g, msh_tensor *gu);
  /* Optional (NULL: rmsnorm_matmul into qkv, then qkv_rope): operands checked as
   * msh_op_rmsnorm_qkv_rope's. */
  msh_status (*rmsnorm_qkv_rope)(msh_tensor *q_out, msh_tensor *k_cache, msh_tensor *v_cache, msh_tensor *qkv,
                                 const msh_tensor *x, const msh_tensor *norm_w, float eps, const msh_tensor *w,
                                 msh_tensor *h, const msh_tensor *pos, const msh_tensor *inv_freq, int style);
  msh_status (*silu_mul)(msh_tensor *out, const msh_tensor *gate, const msh_tensor *up);
  msh_status (*add)(msh_tensor *out, const msh_tensor *a, const msh_tensor *b);
  /* out (R, N) contiguous f32 += b (N) contiguous f32/f16/bf16, row by row (R = rows of out). */
  msh_status (*add_bias)(msh_tensor *out, const msh_tensor *b);
  msh_status (*scale)(msh_tensor *out, const msh_tensor *x, float s);
  msh_status (*softmax)(msh_tensor *out, const msh_tensor *x, int log);
  msh_status (*argmax)(const msh_tensor *x, int32_t *out);
  /* out (i32 on the device) = argmax of each row, without waiting; NULL: out is host memory and
   * argmax writes it */
  msh_status (*argmax_into)(msh_tensor *out, const msh_tensor *x);
  /* Optional (NULL: filled on the host and copied): t contiguous float, values
   * mean + std * msh_randn_at(seed, i) for element i in row-major order. */
  msh_status (*randn)(msh_tensor *t, uint64_t seed, float mean, float std);
  /* Optional: waits for the device's queued work; free and total memory in bytes. */
  msh_status (*sync)(int device_index);
  msh_status (*mem_info)(int device_index, uint64_t *free_bytes, uint64_t *total_bytes);
  /* Optional (NULL: no graphs on this backend): capture of the ops queued on a device's current
   * stream between begin and end into a graph (an opaque handle of the backend), replay on the
   * current stream, release. */
  msh_status (*graph_begin)(int device_index);
  msh_status (*graph_end)(int device_index, void **out);
  msh_status (*graph_launch)(void *g);
  void (*graph_free)(void *g);

  /* Devices of this kind present (0, when the driver or the device is missing, is not an error). */
  msh_status (*device_count)(int *out);
  /* Optional (NULL: MSH_EUNSUPPORTED): the pinned staging of uploads, msh_device_set_staging and
   * msh_device_staging_stats (out-params may be NULL). */
  msh_status (*set_staging)(int device_index, uint64_t chunk_bytes, int n_buffers);
  msh_status (*staging_stats)(int device_index, uint64_t *chunk_bytes, int *n_buffers, uint64_t *bytes,
                              uint64_t *chunks);
  /* Optional (NULL: this backend does not page-lock host memory): zero-filled page-locked host
   * memory for msh_tensor_new_pinned, and its release. */
  msh_status (*host_alloc)(uint64_t bytes, void **out);
  void (*host_release)(void *p);
  /* Optional (NULL: this backend's kernels cannot reach host memory): the address through which
   * device_index's kernels and copies read and write `bytes` of page-locked host memory at host
   * (from host_alloc), for msh_tensor_map_host. */
  msh_status (*host_map)(int device_index, void *host, uint64_t bytes, void **out);

  /* Streams and events: optional, all or none. NULL: the backend runs work as it is issued (the
   * CPU), so core/src/stream.c makes a stream a token and an event a host timestamp, complete once
   * recorded. Otherwise handles are the backend's own, and stream NULL below means the device's
   * current stream on the calling thread (its default stream unless stream_set_current chose
   * another). The generic layer checked that streams and events lie on device_index. */
  msh_status (*stream_new)(int device_index, void **out);
  /* Also resets the calling thread's current stream of the device when it was s. */
  void (*stream_free)(int device_index, void *s);
  msh_status (*stream_sync)(int device_index, void *s);
  /* Makes s (NULL: the default stream) the device's current stream on the calling thread: every
   * op, copy, collective, timer and graph launched afterwards from this thread goes there. */
  msh_status (*stream_set_current)(int device_index, void *s);
  msh_status (*event_new)(int device_index, void **out);
  void (*event_free)(void *e);
  msh_status (*event_record)(int device_index, void *e, void *s);
  msh_status (*stream_wait_event)(int device_index, void *s, void *e);
  /* 1 reached (or never recorded), 0 not yet, -1 failed (event_sync then reports why). */
  int (*event_query)(void *e);
  msh_status (*event_sync)(void *e);
  /* Milliseconds between two reached events. */
  msh_status (*event_elapsed_ms)(void *start, void *end, float *ms);
  /* 1 while a graph is being captured on the device (host timestamps would be replayed, not taken). */
  int (*capturing)(int device_index);
  /* Optional (NULL: msh_tensor_copy, which finishes before it returns): dst = src queued on stream
   * s. Either both on device_index (any layout, as copy), or one of them in host memory, both
   * contiguous and of one dtype (a byte copy). */
  msh_status (*copy_async)(msh_tensor *dst, const msh_tensor *src, void *s);
} msh_backend;

/* The CPU backend (core/cpu), always built in. */
extern const msh_backend msh_cpu_backend;

/* The backend of a device kind, or NULL (with the error set, saying why) when it is not
 * available (backend.c holds the table of backends). Asking for MSH_CUDA loads the CUDA module
 * on first use (see msh_backend_module); the CPU backend is always there. */
const msh_backend *msh_backend_for(int device);
/* The same without touching the last error (NULL when not available). */
const msh_backend *msh_backend_find(int device);
/* The first available backend that page-locks host memory, or NULL (loads the CUDA module). */
const msh_backend *msh_backend_pinner(void);

/* What a backend module (libmoonshard_cuda.so, built from core/cuda and kernels/) hands the core
 * when it loads. The core dlopen()s the module on the first use of a CUDA device, so a CPU-only
 * process never maps the CUDA libraries; the module's load-time constructor calls
 * msh_backend_register (also when a GPU test or a benchmark links the module directly). */
enum { MSH_BACKEND_ABI = 1 }; /* bump when msh_backend or this struct changes meaning */
typedef struct msh_backend_module {
  int abi;            /* MSH_BACKEND_ABI of the headers the module was built with */
  size_t vt_bytes;    /* sizeof(msh_backend) there */
  int device;         /* the device kind it serves (MSH_CUDA) */
  const msh_backend *backend;
  /* Entry points beyond the device vtable (NULL when the module has no NCCL): the NCCL
   * communicator of comm.c (msh_nccl_unique_id, msh_comm_new_nccl, after their checks). */
  msh_status (*nccl_unique_id)(uint8_t *id);
  msh_status (*nccl_comm_new)(msh_comm **out, int rank, int world, const uint8_t *id, int device_index);
} msh_backend_module;

/* Puts a module's backend in the table (backend.c). Called from the module's load-time
 * constructor (one thread, before dlopen returns), never afterwards; a module built against
 * other headers (abi or vt_bytes differ) is refused, and the load reports why. */
void msh_backend_register(const msh_backend_module *m);

/* Fails with MSH_EINVAL unless device_index names a present device of be's kind. */
msh_status msh_backend_check_index(const msh_backend *be, int device_index);

/* ------------------------------------------------------------------------------ misc */

/* Deterministic normal samples: the i-th value of the stream for seed (Box-Muller over a
 * counter-based hash), so every device can produce the same values. */
float msh_randn_at(uint64_t seed, uint64_t i);

#endif
