/*
 * moonshard.h: the one public header of libmoonshard.
 *
 * Conventions
 *   - Every fallible call returns msh_status: MSH_OK (0) or a negative MSH_E* code. Results come
 *     back through out-params, which are left untouched on failure unless stated otherwise.
 *   - msh_last_error() returns a thread-local message naming the failing call, the reason and the
 *     file:line that raised it. It stays valid until the next failing call on the same thread.
 *   - Handles are opaque. Every *_new / *_open has a NULL-safe *_free.
 *   - Indices are 0-based. Shapes are int64_t; strides are in elements, not bytes.
 *   - Nothing here exits, aborts or calls back into Lua.
 *
 * The text between the ffi markers below is turned into the LuaJIT binding at build time
 * (tools/gen_cdef.lua): keep it free of macros, varargs, bitfields and structs passed by value.
 */
#ifndef MOONSHARD_H
#define MOONSHARD_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ffi:begin */

/* ======================================================================== status, errors */

typedef int msh_status;

enum {
  MSH_OK = 0,
  MSH_EINVAL = -1,       /* bad argument: misuse by the caller (shapes, dtypes, NULLs) */
  MSH_ENOMEM = -2,       /* host or device allocation failed */
  MSH_EIO = -3,          /* open, stat, read or mmap failed */
  MSH_EFORMAT = -4,      /* a file's content is malformed */
  MSH_ERANGE = -5,       /* an index, offset or size is out of range; a buffer is too small */
  MSH_EUNSUPPORTED = -6, /* well-formed but not supported (a dtype, a version, a device) */
  MSH_EDEVICE = -7,      /* the device (CUDA, cuBLAS, NCCL) reported an error */
  MSH_ENOENT = -8        /* a named thing (file, tensor) does not exist */
};

/* Thread-local message of the last failure on this thread ("" if none). */
const char *msh_last_error(void);
/* Clears the message. */
void msh_clear_error(void);
/* "EINVAL", "ENOMEM", ... ("OK" for 0, "EUNKNOWN" otherwise). */
const char *msh_status_name(msh_status s);
/* "0.1.0" */
const char *msh_version(void);

/* ============================================================================ threads */

/* Number of threads CPU ops may use (default: online cores). n <= 0 restores the default. */
void msh_set_num_threads(int n);
int msh_get_num_threads(void);

/* ============================================================================= dtypes */

typedef enum {
  MSH_F32 = 0,
  MSH_F16 = 1,
  MSH_BF16 = 2,
  MSH_I32 = 3,
  MSH_I8 = 4,
  /* Block-quantized, in ggml's layouts: blocks of 32 consecutive elements along the last dim.
   * d and m are f16; Q4 nibbles: the low ones are elements 0..15, the high ones 16..31. */
  MSH_Q8_0 = 5, /* 34 bytes a block: d, 32 x i8 q; value d * q */
  MSH_Q4_0 = 6, /* 18 bytes: d, 16 bytes of nibbles q; value d * (q - 8) */
  MSH_Q4_1 = 7, /* 20 bytes: d, m, 16 bytes of nibbles q; value d * q + m */
  /* Group-wise, moonshard's own (quantized at load from f32/f16/bf16): a block is a group of G
   * consecutive elements along the last dim, G = 32, 64 or 128 (the name's number).
   * I8G: f32 d, then G x i8 q; value d * q (symmetric, d = amax / 127; 4 + G bytes).
   * I4G: f16 d, f16 m, then G / 2 bytes of nibbles: byte j holds element j (low nibble) and
   * element j + G / 2 (high); value d * q + m (d = (max - min) / 15, m = min; 4 + G / 2 bytes).
   * I4G32 has Q4_1's layout. */
  MSH_I8G32 = 8,
  MSH_I8G64 = 9,
  MSH_I8G128 = 10,
  MSH_I4G32 = 11,
  MSH_I4G64 = 12,
  MSH_I4G128 = 13,
  MSH_DTYPE_COUNT = 14
} msh_dtype;

/* Bytes per element (0 for an unknown dtype and for block-quantized ones: see below). */
size_t msh_dtype_size(int dtype);
/* Elements per block: 32 for Q8_0/Q4_0/Q4_1, G for I8G/I4G, 1 for the others, 0 if unknown. */
int msh_dtype_block_elems(int dtype);
/* Bytes per block: 34, 18, 20 for Q8_0, Q4_0, Q4_1; 4 + G (I8G), 4 + G / 2 (I4G); the element size
 * for the others; 0 if unknown. */
size_t msh_dtype_block_bytes(int dtype);
/* "f32", "f16", "bf16", "i32", "i8", "q8_0", "q4_0", "q4_1", "i8g32", "i8g64", "i8g128", "i4g32",
 * "i4g64", "i4g128" ("?" for an unknown dtype). */
const char *msh_dtype_name(int dtype);

/* Scalar conversions (round-to-nearest-even for the narrowing ones). */
float msh_f16_to_f32(uint16_t h);
uint16_t msh_f32_to_f16(float f);
float msh_bf16_to_f32(uint16_t h);
uint16_t msh_f32_to_bf16(float f);

/* ============================================================================ devices */

typedef enum { MSH_CPU = 0, MSH_CUDA = 1 } msh_device_kind;

/* Number of devices of a kind: 1 for MSH_CPU; CUDA devices (0 when the build has no CUDA or no
 * GPU is present, which is not an error). */
msh_status msh_device_count(int kind, int *out);
/* 1 if the CUDA backend is available: its module (libmoonshard_cuda.so, loaded on this first
 * use) was built and loads; 0 otherwise, with the loader's reason in msh_last_error(). */
int msh_has_cuda(void);
/* Waits until the device has finished the work queued so far on its default stream and on the
 * calling thread's current stream (a no-op on the CPU); msh_stream_sync waits for other streams. */
msh_status msh_device_sync(int kind, int device_index);
/* Free and total memory of a device in bytes (MSH_EUNSUPPORTED on the CPU). */
msh_status msh_device_mem_info(int kind, int device_index, uint64_t *free_bytes, uint64_t *total_bytes);
/* Host-to-device copies (msh_tensor_copy from a CPU tensor: mapped weight files above all) go
 * through each GPU's pinned staging buffers: n_buffers of chunk_bytes (default 3 of 32 MiB),
 * allocated on the first such copy and kept. The host packs one chunk while the previous ones are
 * copied; a source laid out in rows (a weight or a slice of one) is packed straight from the
 * file, and one bound for another float dtype (f32 or f16 file, bf16 device) is converted on the
 * device. Such a copy returns once the source has been read; the device finishes it before any
 * op queued after it. Where pinned memory is refused, copies go from pageable memory instead.
 * set_staging: waits for the copies in flight, frees the buffers and takes the sizes for the
 * next copy (0: the default; 4 KiB to 1 GiB and 2 to 8 buffers, else MSH_EINVAL).
 * staging_stats: the sizes in effect (*n_buffers 0 when pinned memory was refused), and the source
 * bytes and chunks staged so far; any out-param may be NULL. Both MSH_EUNSUPPORTED on the CPU. */
msh_status msh_device_set_staging(int kind, int device_index, uint64_t chunk_bytes, int n_buffers);
msh_status msh_device_staging_stats(int kind, int device_index, uint64_t *chunk_bytes, int *n_buffers,
                                    uint64_t *bytes, uint64_t *chunks);

/* ============================================================================== files */

/* A read-only memory map of a whole file, reference-counted: tensors that view it keep it alive. */
typedef struct msh_file msh_file;

/* Fails with MSH_ENOENT (no such path), MSH_EIO (not a regular file, unreadable, mmap failed). */
msh_status msh_file_open(msh_file **out, const char *path);
void msh_file_free(msh_file *f);
uint64_t msh_file_size(const msh_file *f);
const void *msh_file_data(const msh_file *f);
const char *msh_file_path(const msh_file *f);

/* ============================================================================= arenas */

/* A bump allocator over one block of device or host memory. Tensors made in an arena do not own
 * their memory: they must not outlive the arena, and msh_arena_reset invalidates them all. */
typedef struct msh_arena msh_arena;

msh_status msh_arena_new(msh_arena **out, int device, int device_index, uint64_t capacity);
void msh_arena_free(msh_arena *a);
uint64_t msh_arena_used(const msh_arena *a);
uint64_t msh_arena_capacity(const msh_arena *a);
void msh_arena_reset(msh_arena *a);

/* ============================================================================ tensors */

enum { MSH_MAX_DIMS = 8 };

typedef struct msh_tensor msh_tensor;

/* A new contiguous tensor owning zero-filled memory on the device. */
msh_status msh_tensor_new(msh_tensor **out, int dtype, int ndim, const int64_t *shape, int device,
                          int device_index);
/* A new contiguous tensor whose memory comes from an arena (64-byte aligned, not zero-filled).
 * MSH_ERANGE when the arena is full (the message says how much was asked and how much is left). */
msh_status msh_tensor_new_arena(msh_tensor **out, msh_arena *a, int dtype, int ndim,
                                const int64_t *shape);
/* A read-only, zero-copy CPU tensor over bytes [offset, offset + numel * size) of a mapped file.
 * MSH_ERANGE when that range does not lie inside the file. */
msh_status msh_tensor_from_file(msh_tensor **out, msh_file *f, uint64_t offset, int dtype, int ndim,
                                const int64_t *shape);
/* A new contiguous CPU tensor owning zero-filled page-locked (pinned) host memory, which a
 * device can read and write while the host runs on: the host side of msh_tensor_copy_async.
 * Where no backend of the build can pin memory, or pinning is refused (no driver or device, a
 * limit on locked memory), the tensor gets ordinary memory instead (msh_tensor_is_pinned says
 * which); it works the same, its asynchronous copies just finish before they return. */
msh_status msh_tensor_new_pinned(msh_tensor **out, int dtype, int ndim, const int64_t *shape);
/* A CPU tensor over caller-owned memory, which must outlive it. */
msh_status msh_tensor_wrap(msh_tensor **out, void *data, int dtype, int ndim, const int64_t *shape);
/* Releases the handle; the memory goes when its last view goes. */
void msh_tensor_free(msh_tensor *t);

int msh_tensor_dtype(const msh_tensor *t);
int msh_tensor_ndim(const msh_tensor *t);
int64_t msh_tensor_dim(const msh_tensor *t, int i);    /* i < 0 counts from the end; 0 if out of range */
int64_t msh_tensor_stride(const msh_tensor *t, int i); /* in elements; same indexing as dim */
int64_t msh_tensor_numel(const msh_tensor *t);
int msh_tensor_device(const msh_tensor *t);
int msh_tensor_device_index(const msh_tensor *t);
int msh_tensor_is_contiguous(const msh_tensor *t);
int msh_tensor_is_readonly(const msh_tensor *t);
/* 1 for a view of memory from msh_tensor_new_pinned that was page-locked. */
int msh_tensor_is_pinned(const msh_tensor *t);
/* A tensor of device (device, device_index) over the bytes of a host tensor (same dtype, shape,
 * strides and offset; it keeps host's memory alive): device-mapped host memory. The device's ops
 * and copies take it as one of their own operands and read and write the host bytes directly
 * across the link, at fixed addresses (a CUDA graph may record them). On the CPU the result is a
 * plain view of host. Any other device needs host's memory page-locked by that device's backend
 * (msh_tensor_new_pinned or a pinned pool's buffer; MSH_EINVAL for ordinary memory, which a
 * device cannot reach) and a backend that maps host memory (MSH_EUNSUPPORTED otherwise);
 * MSH_EINVAL when host is not a CPU tensor or the device does not exist. Nothing is made on
 * failure. */
msh_status msh_tensor_map_host(msh_tensor **out, msh_tensor *host, int device, int device_index);
/* 1 for a tensor from msh_tensor_map_host on a device other than the CPU (and its views). */
int msh_tensor_is_host_mapped(const msh_tensor *t);
/* Address of element 0 (a device address for device tensors). */
void *msh_tensor_data(const msh_tensor *t);

/* Views share memory with t. Each checks that the view lies inside t's memory.
 * Block-quantized tensors keep whole blocks: the last dim is a multiple of 32 with stride 1, and
 * every other stride and the offset are multiples of 32 elements. Views that select rows (narrow,
 * reshape or transpose of the outer dims) work; one that would split a block is MSH_EINVAL. */
msh_status msh_tensor_view(msh_tensor **out, msh_tensor *t, int ndim, const int64_t *shape,
                           const int64_t *strides, int64_t offset);
msh_status msh_tensor_narrow(msh_tensor **out, msh_tensor *t, int dim, int64_t start, int64_t len);
/* Needs a contiguous t; one dim may be -1 (inferred). */
msh_status msh_tensor_reshape(msh_tensor **out, msh_tensor *t, int ndim, const int64_t *shape);
msh_status msh_tensor_transpose(msh_tensor **out, msh_tensor *t, int d0, int d1);

/* dst = src elementwise: equal shapes, any strides, any of f32/f16/bf16 to any of them, i32 and
 * i8 to themselves; across devices. dst must be writable. Block-quantized tensors: to the same
 * dtype by bytes (any devices); to f32/f16/bf16 dequantizing, and from them quantizing (ggml's
 * rounding rules; I8G/I4G as moonshard.h's dtypes say), to another block dtype through f32, all
 * computed on the CPU (a device operand goes through host memory). */
msh_status msh_tensor_copy(msh_tensor *dst, const msh_tensor *src);
/* A new contiguous tensor of dtype on the same device holding src's values. */
msh_status msh_tensor_contiguous(msh_tensor **out, const msh_tensor *src, int dtype);
/* Fills a writable CPU or device tensor with normal(mean, std) values from a seeded generator
 * (the same values on every device for the same seed and shape). */
msh_status msh_tensor_randn(msh_tensor *t, uint64_t seed, float mean, float std);

/* ================================================================================ ops */
/*
 * All ops run on the device of their tensors (all operands on one device). Outputs are f32
 * unless stated, contiguous, and must not alias inputs unless stated. Weight operands may be
 * f32, f16 or bf16; matmul and embedding also take block-quantized ones (Q8_0, Q4_0, Q4_1) on the
 * CPU (MSH_EUNSUPPORTED on other devices). Shapes are checked; a mismatch is MSH_EINVAL with both
 * shapes in the message.
 */

/* out (T, D) = table[ids[t]] ; table (V, D); ids (T) i32. An id outside [0, V) is MSH_ERANGE. */
msh_status msh_op_embedding(msh_tensor *out, const msh_tensor *table, const msh_tensor *ids);

/* out (.., D) = x / sqrt(mean(x^2) + eps) * w ; w (D). out may alias x. */
msh_status msh_op_rmsnorm(msh_tensor *out, const msh_tensor *x, const msh_tensor *w, float eps);

/* out (M, N) = x (M, K) @ w (N, K)^T ; x and out f32, w f32/f16/bf16 (row-major [out, in]), or
 * block-quantized on the CPU: then for M < 64 each row of x is quantized to 8 bits per 32-element
 * block (scale amax / 127, round to nearest even) and multiplied in integers, block by block, as
 * llama.cpp does; for M >= 64 the weights are dequantized to f32 block by block (x exact). */
msh_status msh_op_matmul(msh_tensor *out, const msh_tensor *x, const msh_tensor *w);

typedef enum {
  MSH_ROPE_INTERLEAVED = 0, /* rotates pairs (x[2i], x[2i+1]): llama2.c, GGUF */
  MSH_ROPE_HALF = 1         /* rotates pairs (x[i], x[i + rot/2]): Hugging Face checkpoints */
} msh_rope_style;

/* In place: x (T, H, hd) f32; pos (T) i32 positions; inv_freq (R) f32 frequencies, rotating the
 * first 2R dims of each head (2R <= hd). Angle of pair i at position p: p * inv_freq[i]. */
msh_status msh_op_rope(msh_tensor *x, const msh_tensor *pos, const msh_tensor *inv_freq, int style);

/* Fused forms of a layer's ops (fewer passes over memory and fewer launches on a device).
 *
 * msh_op_matmul_acc: out (M, N) += x (M, K) @ w (N, K)^T, operands as msh_op_matmul: the residual
 * add of an output projection folded into it.
 *
 * msh_op_matmul_glu: out (M, F) = silu(x @ w[0:F]^T) * (x @ w[F:2F]^T) for w (2F, K), the gate
 * rows stacked over the up rows. scratch (M, 2F) f32 on out's device, contiguous, not overlapping
 * the operands: room for backends that form both products first (left unspecified).
 *
 * msh_op_qkv_rope: a layer's attention inputs from its fused projection qkv (R, (H + 2 KVH) hd)
 * f32, each row holding its q, k and v heads; pos (R) i32 the rows' positions. Rotates q and k as
 * msh_op_rope (inv_freq (n) with 2n <= hd, style), writes q to q_out (R, H, hd) f32 and k, v into
 * row pos[r] of k_cache and v_cache: (S, KVH, hd), or (B, S, KVH, hd) with R = B * T and row r
 * belonging to sequence r / T; f32/f16/bf16, (KVH, hd) packed, any row and batch strides.
 * Positions are read when the op runs (a captured graph serves every position): a position
 * outside [0, S) is MSH_ERANGE on the CPU, and writes no cache row on a device (the host cannot
 * see it there).
 *
 * msh_op_rmsnorm_matmul: a projection of the RMSNorm of x, the norm folded into it: with
 * h = rmsnorm(x, norm_w, eps) as msh_op_rmsnorm, out = h @ w^T as msh_op_matmul (gu NULL), or
 * out = silu(h @ w[0:F]^T) * (h @ w[F:2F]^T) as msh_op_matmul_glu with gu its scratch. h (M, K)
 * f32 contiguous on out's device, apart from the operands: scratch for backends that form the
 * normalized rows (its contents are left unspecified). x is only read.
 *
 * msh_op_rmsnorm_qkv_rope: a layer's attention inputs from its residual x: msh_op_rmsnorm_matmul
 * (qkv, x, norm_w, eps, w, h, NULL) then msh_op_qkv_rope(q_out, k_cache, v_cache, qkv, pos,
 * inv_freq, style), operands as theirs. qkv and h are scratch (left unspecified: a backend may
 * form the decode step's single row without writing them). norm_w NULL: x arrives normalized (a
 * tensor-parallel rank's sum brought the norm), qkv = x @ w^T, and h is unused (may be NULL).
 *
 * msh_op_rmsnorm_mlp: a layer's feed-forward block added into its residual x (M, K):
 * x += (silu(h @ gate^T) * (h @ up^T)) @ w_down^T with h = rmsnorm(x, norm_w, eps), w_gu (2F, K)
 * the gate rows stacked over the up rows and w_down (K, F); as msh_op_rmsnorm_matmul(g, x,
 * norm_w, eps, w_gu, h, gu) then msh_op_matmul_acc(x, g, w_down). h (M, K), g (M, F) and
 * gu (M, 2F) are f32 scratch (left unspecified: a backend may keep the feed-forward activations
 * in 16 bits for its GEMMs instead). */
msh_status msh_op_rmsnorm_matmul(msh_tensor *out, const msh_tensor *x, const msh_tensor *norm_w, float eps,
                                 const msh_tensor *w, msh_tensor *h, msh_tensor *gu);
msh_status msh_op_matmul_acc(msh_tensor *out, const msh_tensor *x, const msh_tensor *w);
msh_status msh_op_matmul_glu(msh_tensor *out, const msh_tensor *x, const msh_tensor *w, msh_tensor *scratch);
msh_status msh_op_qkv_rope(msh_tensor *q_out, msh_tensor *k_cache, msh_tensor *v_cache, const msh_tensor *qkv,
                           const msh_tensor *pos, const msh_tensor *inv_freq, int style);
msh_status msh_op_rmsnorm_mlp(msh_tensor *x, const msh_tensor *norm_w, float eps, const msh_tensor *w_gu,
                              const msh_tensor *w_down, msh_tensor *h, msh_tensor *g, msh_tensor *gu);
msh_status msh_op_rmsnorm_qkv_rope(msh_tensor *q_out, msh_tensor *k_cache, msh_tensor *v_cache, msh_tensor *qkv,
                                   const msh_tensor *x, const msh_tensor *norm_w, float eps, const msh_tensor *w,
                                   msh_tensor *h, const msh_tensor *pos, const msh_tensor *inv_freq, int style);

/* dst rows [row0, row0 + T) = src (T, ...): copies along dim 0 (with dtype conversion as in
 * msh_tensor_copy). Batched: dst (B, S, ...) and src (B, T, ...) (equal in dim 0 and past dim 1):
 * row r of sequence b goes to dst[b, row0 + r] (when src has dst's shape both readings write
 * the same). dst may be any view (a narrowed batch range of a larger cache, say). MSH_EINVAL when
 * the shapes fit neither form; MSH_ERANGE when the rows do not fit. */
msh_status msh_op_set_rows(msh_tensor *dst, int64_t row0, const msh_tensor *src);

/* Causal grouped-query attention of T new queries over a cache.
 * out (T, H, hd); q (T, H, hd); k, v (S, KVH, hd) with H % KVH == 0 and S >= pos0 + T.
 * Query t sits at position pos0 + t and attends keys 0 .. pos0 + t. scores = q.k * scale.
 * Batched: out, q (B, T, H, hd) and k, v (B, S, KVH, hd): sequence b's queries attend its own
 * cache k[b], v[b], every sequence at positions pos0 .. pos0 + T - 1. k and v need packed heads
 * (KVH, hd); their row and batch strides may be any (views into a fused or larger cache, a
 * narrowed batch range). q and out are contiguous. */
msh_status msh_op_attention(msh_tensor *out, const msh_tensor *q, const msh_tensor *k,
                            const msh_tensor *v, int64_t pos0, float scale);

/* Like msh_op_set_rows, with row0 read from device memory when the op runs (so that a captured
 * graph serves every position): row0 (1) i32 and src on dst's device; src (T, ...) with dst's
 * trailing dims, T <= rows(dst) (else MSH_ERANGE); dst must not overlap src or row0. A row0 with
 * rows that do not fit is clamped on the device into [0, rows(dst) - T] (nothing is written out
 * of bounds): the host cannot see the value. Batched (dst (B, S, ...), src (B, T, ...) as in
 * msh_op_set_rows): row0 holds 1 element (every sequence starts there) or B (row0[b] for
 * sequence b, each clamped into [0, S - T]). */
msh_status msh_op_set_rows_dyn(msh_tensor *dst, const msh_tensor *row0, const msh_tensor *src);

/* Like msh_op_attention, with pos0 read from device memory when the op runs: pos0 (1) i32 on the
 * operands' device, or for batched operands 1 or B elements (pos0[b]: the position of sequence
 * b's first query, so sequences of different lengths decode together). The work is planned for
 * positions up to max_len (T <= max_len <= S, else MSH_ERANGE), so one captured graph serves
 * every pos0 below that bound; a pos0 outside [0, max_len - T] is clamped into it on the device.
 * The device scratch it needs depends on max_len and the shapes only. On CUDA it always takes the
 * split-KV decode kernels (fast for a few queries; many queries belong to msh_op_attention),
 * splitting each sequence's keys less as the batch grows. out must not overlap pos0. */
msh_status msh_op_attention_dyn(msh_tensor *out, const msh_tensor *q, const msh_tensor *k,
                                const msh_tensor *v, const msh_tensor *pos0, int64_t max_len, float scale);

/* A paged KV cache: each layer's K and V live in a pool of fixed-size blocks, k_pool and v_pool
 * (num_blocks, block_size, KVH, hd) f32/f16/bf16 (one dtype, contiguous), and a sequence's
 * positions map to blocks through its block table: position p of a sequence whose table is bt
 * sits at row p % block_size of block bt[p / block_size]. Blocks are shared freely (a cached
 * prefix, say); nothing but the tables says which sequence owns a block.
 *
 * msh_op_kv_write: the new rows k, v (R, KVH, hd) (f32/f16/bf16, packed heads, any row stride)
 * go to the pool rows slots[r] = block * block_size + offset: slots (R) contiguous i32 on the
 * pools' device, read when the op runs (a captured graph serves every step). A slot < 0 writes
 * nothing (a padding row). A slot >= num_blocks * block_size is MSH_ERANGE on the CPU (nothing
 * written then) and writes nothing on a device (the host cannot see it there).
 *
 * msh_op_paged_attention: causal grouped-query attention of the new query rows of B sequences,
 * held back to back (varlen): q, out (R, H, hd) f32 contiguous, H % KVH == 0; i32 arrays on the
 * pools' device, read when the op runs: q_start (B + 1) cumulative query rows (q_start[0] = 0,
 * q_start[B] = R, non-decreasing: sequence b's queries are rows q_start[b] .. q_start[b+1] - 1),
 * ctx_len (B) each sequence's context after this step (its new rows included: n_new[b] =
 * q_start[b+1] - q_start[b] <= ctx_len[b]), block_table (B, max_blocks) contiguous. Query i of
 * sequence b sits at position ctx_len[b] - n_new[b] + i and attends keys 0 .. that position of
 * its own blocks; scores = q.k * scale. The work is planned for contexts up to max_ctx
 * (1 <= max_ctx <= max_blocks * block_size, else MSH_ERANGE), so one captured graph serves every
 * step whose contexts stay below it. On the CPU the arrays are checked before anything is read:
 * q_start not as above, a ctx_len outside [n_new, max_ctx], or a block id the context reaches
 * outside [0, num_blocks) is MSH_ERANGE (out untouched). On a device a ctx_len is clamped into
 * [n_new, max_ctx] and a block id into [0, num_blocks) (nothing is read out of bounds). On CUDA,
 * rows of one query per sequence (decodes) take split-KV kernels, others a kernel per query row
 * tile. out must not overlap the inputs. */
msh_status msh_op_kv_write(msh_tensor *k_pool, msh_tensor *v_pool, const msh_tensor *k, const msh_tensor *v,
                           const msh_tensor *slots);
msh_status msh_op_paged_attention(msh_tensor *out, const msh_tensor *q, const msh_tensor *k_pool,
                                  const msh_tensor *v_pool, const msh_tensor *q_start, const msh_tensor *ctx_len,
                                  const msh_tensor *block_table, int64_t max_ctx, float scale);

/* out = silu(gate) * up, elementwise. out may alias gate or up. */
msh_status msh_op_silu_mul(msh_tensor *out, const msh_tensor *gate, const msh_tensor *up);

/* out = a + b, elementwise, equal shapes. out may alias a or b. */
msh_status msh_op_add(msh_tensor *out, const msh_tensor *a, const msh_tensor *b);

/* In place: out (M, N) f32 += b (N) broadcast over the rows; b f32, f16 or bf16 (a weight: the
 * bias of a projection). out may be any (.., N): its rows are the product of the leading dims.
 * MSH_EINVAL with both shapes when b is not one row of out's last dim. */
msh_status msh_op_add_bias(msh_tensor *out, const msh_tensor *b);

/* out = x * s, elementwise. out may alias x. */
msh_status msh_op_scale(msh_tensor *out, const msh_tensor *x, float s);

/* Row-wise over the last dim. out may alias x. */
msh_status msh_op_softmax(msh_tensor *out, const msh_tensor *x);
msh_status msh_op_log_softmax(msh_tensor *out, const msh_tensor *x);

/* out[r] = index of the largest value of row r of x (.., N); the first one on ties.
 * out must hold numel(x) / N values. */
msh_status msh_op_argmax(const msh_tensor *x, int32_t *out);
/* The same into a tensor on x's device: out (numel(x) / N) contiguous i32. On a GPU nothing
 * waits (the ids stay there: fed to a collective, say); CUDA graphs may capture it. */
msh_status msh_op_argmax_into(msh_tensor *out, const msh_tensor *x);

/* ============================================================================ sampler */

/* Seeded, reproducible sampling from logits: the same seed and logits give the same tokens. */
typedef struct msh_sampler msh_sampler;

msh_status msh_sampler_new(msh_sampler **out, uint64_t seed);
void msh_sampler_free(msh_sampler *s);
void msh_sampler_reseed(msh_sampler *s, uint64_t seed);
/* logits (N) f32 on the CPU. temperature <= 0: argmax. Else softmax(logits / temperature),
 * keeping the top_k most likely (top_k <= 0: all), then the smallest set whose mass reaches top_p
 * (top_p >= 1: all), renormalized, and one draw. */
msh_status msh_sampler_sample(msh_sampler *s, const msh_tensor *logits, float temperature, int top_k,
                              float top_p, int32_t *out_token);

/* ============================================================================= graphs */

/* CUDA graphs over a device's current stream: a decode step captured once and replayed with one
 * launch instead of hundreds. msh_graph_begin: the ops queued on the calling thread's current
 * stream of that device from then on (the default stream, unless msh_stream_set_current chose
 * another; from any thread whose current stream it is) are recorded, not run, until
 * msh_graph_end, which returns the graph. A replay runs the same kernels on the same memory with the same host
 * arguments: positions that change between replays must live in device tensors
 * (msh_op_set_rows_dyn, msh_op_attention_dyn, msh_op_rope's pos), updated before each launch
 * (msh_tensor_copy from the host is fine there).
 *
 * Between begin and end nothing may wait for the device: uploads and downloads (msh_tensor_copy
 * to or from the host), msh_op_argmax, msh_device_sync, allocating device memory (msh_tensor_new,
 * msh_tensor_contiguous, arenas; views and tensors from an existing arena are fine) and growing
 * the device scratch all fail with MSH_EINVAL saying so, and leave the capture going. The scratch
 * (attention partials, converted activations) grows on the first use of a size: run the step
 * once eagerly before capturing it. Device memory freed during a capture goes at its end. The
 * tensors a graph uses must outlive it; the graph keeps the scratch it was captured over.
 *
 * begin: MSH_EUNSUPPORTED on the CPU (and without CUDA), MSH_EINVAL when a capture is already
 * going on that device. end: MSH_EINVAL without a capture; MSH_EDEVICE when CUDA refused the
 * capture (the stream runs ops again either way). */
typedef struct msh_graph msh_graph;

msh_status msh_graph_begin(int kind, int device_index);
msh_status msh_graph_end(int kind, int device_index, msh_graph **out);
/* Queues one replay on the calling thread's current stream of the device; returns without waiting. */
msh_status msh_graph_launch(msh_graph *g);
/* Waits for queued replays and frees the graph (NULL-safe). */
void msh_graph_free(msh_graph *g);

/* ============================================================================= timers */

/* Device timers: a point in a device's queue of work, for timing spans of it without waiting.
 * On CUDA a timer is an event recorded on the calling thread's current stream of the device (the
 * one its ops run on): it is reached once the work queued before it has run. On the CPU, where ops run
 * synchronously, it is the monotonic wall clock at the call. Reading a span waits only when
 * asked to: a CUDA timer not yet reached reads as pending. A timer may be recorded again, which
 * replaces its point. Recording while a graph is being captured on the device is MSH_EINVAL (a
 * timestamp inside a graph would be replayed, not taken); the capture goes on. */
typedef struct msh_timer msh_timer;

/* A timer on a device. MSH_EINVAL for an unknown kind or a CUDA device that does not exist,
 * MSH_EUNSUPPORTED for CUDA in a build without it, MSH_EDEVICE when no event can be made. */
msh_status msh_timer_new(msh_timer **out, int kind, int device_index);
void msh_timer_free(msh_timer *t);
/* Takes the point now (CPU) or queues it on the device's stream (CUDA). */
msh_status msh_timer_record(msh_timer *t);
/* *done = 1 when t was recorded and the device has reached that point, else 0. Never waits. */
msh_status msh_timer_done(const msh_timer *t, int *done);
/* Seconds from start's point to end's (both recorded, on the same device). wait 0: *seconds = -1
 * while either point is not reached yet; wait 1: waits for both. MSH_EINVAL when either was never
 * recorded or they lie on different devices; MSH_EDEVICE when an event failed. */
msh_status msh_timer_elapsed(const msh_timer *start, const msh_timer *end, int wait, double *seconds);

/* ==================================================================== streams, events */

/* A stream is a queue of work on a device: work queued on one stream runs in order; work on two
 * streams may overlap (a copy on one, compute on another). Each device has a default stream
 * (the one every op used before streams existed), and each thread a current stream per device,
 * the default unless msh_stream_set_current chose another: every op, copy, collective, timer and
 * graph capture or replay that the thread issues for that device goes to its current stream.
 * An event marks a point in a stream's work; another stream can wait for it (msh_stream_wait_event)
 * without the host waiting, and the host can poll or wait for it.
 *
 * On the CPU, where work runs as it is issued, streams exist so that the same code runs there:
 * their work is done before the call returns, msh_stream_sync returns at once, an event is
 * complete as soon as it is recorded and holds the host clock of the record.
 *
 * Errors: MSH_EINVAL for NULL handles, a device that does not exist (the message names it), and
 * a stream and an event of different devices; MSH_EUNSUPPORTED for a device kind the build
 * lacks; MSH_EDEVICE with the driver's message. A failed call leaves its handles as they were. */
typedef struct msh_stream msh_stream;
typedef struct msh_event msh_event;

/* A new stream on a device (on CUDA a non-blocking stream: it does not wait for the default). */
msh_status msh_stream_new(msh_stream **out, int device, int device_index);
/* Frees s once its queued work is done, without waiting for it (NULL-safe). If s is the calling
 * thread's current stream of its device, the device's default stream becomes current again; s
 * must not be current on any other thread. */
void msh_stream_free(msh_stream *s);
int msh_stream_device(const msh_stream *s);
int msh_stream_device_index(const msh_stream *s);
/* Waits until the work queued on s so far has finished. MSH_EINVAL while s is being captured
 * into a graph (waiting would break the capture). */
msh_status msh_stream_sync(msh_stream *s);
/* Makes s the device's current stream on the calling thread; s NULL: the device's default stream
 * again. MSH_EINVAL when s lies on another device. The choice is per thread: other threads keep
 * theirs. Nothing already queued moves; order work across streams with events. The device's
 * scratch memory (converted activations, attention partials) is shared by all its streams: ops
 * that use it must not run on two streams at once unless events order them (copies never use
 * it). Device memory from msh_tensor_new is zero-filled on the allocating thread's current
 * stream: another stream that uses it first waits for that (an event, or msh_device_sync). Graph
 * capture: msh_graph_begin captures the thread's current stream. */
msh_status msh_stream_set_current(int device, int device_index, msh_stream *s);

/* A new event on a device, not yet recorded (a never-recorded event counts as complete). */
msh_status msh_event_new(msh_event **out, int device, int device_index);
/* NULL-safe. An event may be freed while streams wait for it: they still wait for its point. */
void msh_event_free(msh_event *e);
/* Marks the point after the work queued so far on s (NULL: the calling thread's current stream
 * of e's device); recording again moves the point. Allowed during a graph capture (it then
 * orders streams inside the graph: record on the captured stream, wait on another, and join back
 * the same way before msh_graph_end); such an event must not be polled or waited for from the
 * host. MSH_EINVAL when s lies on another device than e. */
msh_status msh_event_record(msh_event *e, msh_stream *s);
/* Work queued on s (NULL: the calling thread's current stream of e's device) after this call
 * waits until e's point has been reached; the host does not wait. e may lie on another device of
 * the same kind. */
msh_status msh_stream_wait_event(msh_stream *s, const msh_event *e);
/* *ready = 1 when e's point has been reached (or e was never recorded), else 0. Never waits.
 * MSH_EDEVICE when the work before the point failed. */
msh_status msh_event_query(const msh_event *e, int *ready);
/* Waits on the host until e's point has been reached. */
msh_status msh_event_sync(msh_event *e);
/* Milliseconds of device time from start's point to end's, both recorded and reached, on the
 * same device (on the CPU: host time between the two records). MSH_EINVAL when either was never
 * recorded or they lie on different devices; MSH_EDEVICE when a point is not reached yet (sync
 * end first) or the device reports another error. */
msh_status msh_event_elapsed_ms(const msh_event *start, const msh_event *end, float *out);

/* dst = src queued on stream s (NULL: the calling thread's current stream of the device side),
 * returning without waiting where the device allows: shapes equal; either both on s's device
 * (any strides, dtype conversion as msh_tensor_copy), or one in host memory and the other on s's
 * device, both contiguous and of one dtype (a byte copy; else MSH_EINVAL: msh_tensor_copy does
 * the rest). Both on the CPU: a plain copy. The host side must stay alive and untouched (not
 * written for an upload, not read for a download) until the stream has passed the copy: sync
 * the stream or an event recorded after it. Truly asynchronous only when the host side is pinned
 * (msh_tensor_new_pinned); from or to ordinary (pageable) memory CUDA stages the bytes and the
 * call returns only once the host side has been read (an upload) or written (a download), still
 * in stream order (correct, just not overlapped with the host). During a graph capture only
 * pinned host memory may take part (else MSH_EINVAL; the capture goes on). MSH_EINVAL for a
 * read-only dst, tensors on two different devices, or s on another device. */
msh_status msh_tensor_copy_async(msh_tensor *dst, const msh_tensor *src, msh_stream *s);

/* ========================================================================== tokenizer */

typedef struct msh_tokenizer msh_tokenizer;

/* A SentencePiece-style BPE vocabulary in the llama2.c tokenizer.bin format: int32
 * max_token_length, then per token: f32 score, i32 length, bytes. Tokens 0, 1, 2 are <unk>, <s>,
 * </s>; "<0xNN>" pieces are byte fallbacks. MSH_EFORMAT on a truncated or inconsistent file. */
msh_status msh_tokenizer_load_sp(msh_tokenizer **out, const char *path, int vocab_size);
void msh_tokenizer_free(msh_tokenizer *t);
int msh_tokenizer_vocab_size(const msh_tokenizer *t);
int msh_tokenizer_bos(const msh_tokenizer *t);
int msh_tokenizer_eos(const msh_tokenizer *t);
/* Encodes len bytes of text (a leading space is added to non-empty text, as SentencePiece does),
 * optionally preceded by BOS. MSH_ERANGE when cap is too small; *n_out then holds the number of
 * ids needed. */
msh_status msh_tokenizer_encode(const msh_tokenizer *t, const char *text, size_t len, int add_bos,
                                int32_t *ids, int cap, int *n_out);
/* The bytes token id stands for (byte fallbacks resolved to their single byte; <s> and </s> give
 * ""). The pointer stays valid for the tokenizer's life. */
msh_status msh_tokenizer_piece(const msh_tokenizer *t, int32_t id, const char **piece, size_t *len);

/* ======================================================================= safetensors */

/* A safetensors file, mmap'd, with its header parsed and every entry checked: dtype known, shape
 * non-negative, offsets ordered, inside the data section and consistent with dtype x shape. */
typedef struct msh_safetensors msh_safetensors;

/* MSH_ENOENT, MSH_EIO, or MSH_EFORMAT naming the file and the offending entry. */
msh_status msh_safetensors_open(msh_safetensors **out, const char *path);
void msh_safetensors_free(msh_safetensors *st);
int msh_safetensors_count(const msh_safetensors *st);
/* Name of entry i (NULL if out of range). */
const char *msh_safetensors_name(const msh_safetensors *st, int i);
/* Index of the entry called name; MSH_ENOENT if absent. */
msh_status msh_safetensors_find(const msh_safetensors *st, const char *name, int *index);
/* dtype (msh_dtype, or -1 for a valid dtype moonshard does not load), ndim, shape[MSH_MAX_DIMS]. */
msh_status msh_safetensors_info(const msh_safetensors *st, int i, int *dtype, int *ndim,
                                int64_t *shape);
/* A zero-copy view of entry i; MSH_EUNSUPPORTED for dtypes moonshard does not load. */
msh_status msh_safetensors_tensor(const msh_safetensors *st, int i, msh_tensor **out);

/* ========================================================================== llama2.c */

/* Reads and checks the 28-byte header of a llama2.c checkpoint: cfg receives dim, hidden_dim,
 * n_layers, n_heads, n_kv_heads, vocab_size (made positive), seq_len; *shared is 1 when the
 * classifier is the token embedding. MSH_EFORMAT when a field is not positive, dim is not a
 * multiple of n_heads, n_heads not a multiple of n_kv_heads, or the file's size is not exactly
 * what the header implies. */
msh_status msh_llama2c_header(const msh_file *f, int32_t *cfg, int *shared);

/* =============================================================================== gguf */

/* A GGUF file (versions 2 and 3, little-endian), mmap'd, with its metadata and tensor infos
 * parsed and checked on open: every length, count and offset lies inside the file, tensor
 * dims (at most 4) do not overflow, tensor data lies inside the data section and starts at a
 * multiple of general.alignment (default 32). Strings returned below point into the map: they
 * are not NUL-terminated and live as long as the handle. Key and tensor names are copies, NUL-
 * terminated. Indices are 0-based; an index out of range is MSH_ERANGE. */
typedef struct msh_gguf msh_gguf;

/* Metadata value types, numbered as in the file. */
typedef enum {
  MSH_GGUF_U8 = 0,
  MSH_GGUF_I8 = 1,
  MSH_GGUF_U16 = 2,
  MSH_GGUF_I16 = 3,
  MSH_GGUF_U32 = 4,
  MSH_GGUF_I32 = 5,
  MSH_GGUF_F32 = 6,
  MSH_GGUF_BOOL = 7,
  MSH_GGUF_STRING = 8,
  MSH_GGUF_ARRAY = 9,
  MSH_GGUF_U64 = 10,
  MSH_GGUF_I64 = 11,
  MSH_GGUF_F64 = 12
} msh_gguf_type;

/* ggml tensor types moonshard loads (others keep their ggml number; see msh_gguf_ggml_type_name). */
enum {
  MSH_GGML_F32 = 0,
  MSH_GGML_F16 = 1,
  MSH_GGML_Q4_0 = 2,
  MSH_GGML_Q4_1 = 3,
  MSH_GGML_Q8_0 = 8,
  MSH_GGML_I8 = 24,
  MSH_GGML_I32 = 26,
  MSH_GGML_BF16 = 30
};

/* MSH_ENOENT / MSH_EIO as msh_file_open; MSH_EFORMAT naming the file and what is wrong (magic,
 * truncation, a count or length the file cannot hold, bad alignment, dims, duplicate names,
 * tensor data past the end); MSH_EUNSUPPORTED for version 1, big-endian files, nested arrays and
 * unknown ggml tensor types. Nothing is allocated on failure. */
msh_status msh_gguf_open(msh_gguf **out, const char *path);
void msh_gguf_free(msh_gguf *g);
uint32_t msh_gguf_version(const msh_gguf *g);
uint32_t msh_gguf_alignment(const msh_gguf *g);
/* The mapped file (borrowed: retained by the handle). */
msh_file *msh_gguf_file(const msh_gguf *g);

int msh_gguf_key_count(const msh_gguf *g);
/* Name of key i (NULL if out of range). */
const char *msh_gguf_key_name(const msh_gguf *g, int i);
/* Index of the key called name; MSH_ENOENT if absent. */
msh_status msh_gguf_find_key(const msh_gguf *g, const char *name, int *index);
/* msh_gguf_type of key i, or -1 if out of range. */
int msh_gguf_key_type(const msh_gguf *g, int i);
/* Integer keys (u8 .. i64, bool). MSH_EINVAL for another type; MSH_ERANGE for a u64 above
 * INT64_MAX. */
msh_status msh_gguf_get_int(const msh_gguf *g, int i, int64_t *out);
/* Float keys (f32, f64); integer keys are converted too. MSH_EINVAL for other types. */
msh_status msh_gguf_get_float(const msh_gguf *g, int i, double *out);
/* String keys: *s points into the map, *len bytes. MSH_EINVAL for other types. */
msh_status msh_gguf_get_string(const msh_gguf *g, int i, const char **s, size_t *len);
/* Array keys: element type (msh_gguf_type, never MSH_GGUF_ARRAY) and length. */
msh_status msh_gguf_get_array(const msh_gguf *g, int i, int *elem_type, uint64_t *n);
/* Element j of array key i, with the conversions of the scalar getters above. MSH_EINVAL when
 * key i is not an array or its elements have the wrong type; MSH_ERANGE when j >= length. */
msh_status msh_gguf_array_int(const msh_gguf *g, int i, uint64_t j, int64_t *out);
msh_status msh_gguf_array_float(const msh_gguf *g, int i, uint64_t j, double *out);
msh_status msh_gguf_array_string(const msh_gguf *g, int i, uint64_t j, const char **s, size_t *len);
/* The packed little-endian elements of a numeric array, in the map (possibly unaligned).
 * MSH_EINVAL for arrays of strings and for non-arrays. */
msh_status msh_gguf_array_data(const msh_gguf *g, int i, const void **data);

int msh_gguf_tensor_count(const msh_gguf *g);
/* Name of tensor i (NULL if out of range). */
const char *msh_gguf_tensor_name(const msh_gguf *g, int i);
/* Index of the tensor called name; MSH_ENOENT if absent. */
msh_status msh_gguf_find_tensor(const msh_gguf *g, const char *name, int *index);
/* ggml type, ndim (0..4), shape[4] in row-major order (GGUF stores dims innermost first; here
 * the last dim is the contiguous one), the absolute file offset of the data and its size in
 * bytes. Any out-param may be NULL. */
msh_status msh_gguf_tensor_info(const msh_gguf *g, int i, int *ggml_type, int *ndim,
                                int64_t *shape, uint64_t *offset, uint64_t *nbytes);
/* "F32", "Q4_K", ... ("?" for an unknown number). */
const char *msh_gguf_ggml_type_name(int ggml_type);
/* Tensor i as a moonshard tensor: a zero-copy read-only view of the map of dtype F32, F16, BF16,
 * I8, I32, Q8_0, Q4_0 or Q4_1 (msh_tensor_contiguous(&f, t, MSH_F32) dequantizes a quantized
 * one). MSH_EUNSUPPORTED naming the tensor and its type for any other type; MSH_ENOMEM. */
msh_status msh_gguf_tensor(const msh_gguf *g, int i, msh_tensor **out);

/* ===================================================================== byte-level BPE */

/* A byte-level BPE tokenizer (GPT-2, Llama-3, Qwen2, SmolLM2 style) that produces the ids the
 * Hugging Face tokenizers library produces, built from data the caller has read (tokenizer.json
 * or GGUF tokenizer.ggml.*). Encoding uses scratch memory and a cache inside the handle, so a
 * handle must not encode on two threads at once; everything else is read-only. */
typedef struct msh_bpe msh_bpe;

/* Token kinds. */
enum {
  MSH_BPE_NORMAL = 0,  /* a vocabulary entry in GPT-2's byte-to-unicode form ("\xc4\xa0the") */
  MSH_BPE_SPECIAL = 1, /* a special (control) token; literal text, found in input only when
                          encoding with MSH_BPE_PARSE_SPECIAL */
  MSH_BPE_ADDED = 2,   /* an added (user-defined) token; literal text, always found in input */
  MSH_BPE_UNUSED = 3   /* a placeholder that encoding never produces */
};

/* msh_bpe_new flags. */
enum {
  MSH_BPE_IGNORE_MERGES = 1 /* a pre-token that is itself in the vocabulary is one token
                               (tokenizer.json "ignore_merges": Llama-3) */
};

/* msh_bpe_encode flags. */
enum {
  MSH_BPE_PARSE_SPECIAL = 1 /* special tokens written in the text become their ids */
};

/* Builds a tokenizer.
 *   vocab: n_tokens tokens; token i is text[offsets[i] .. offsets[i + 1]) (offsets has
 *     n_tokens + 1 non-decreasing entries); kinds[i] is its MSH_BPE_* kind (kinds NULL: all
 *     normal). When two tokens have the same text, the later id wins.
 *   merges: n_merges merges, highest priority first; merge r is
 *     merges[merge_offsets[r] .. merge_offsets[r + 1]), written "left right" as in tokenizer.json
 *     and GGUF; left, right and their concatenation must be normal tokens.
 *   patterns: n_patterns pre-tokenizer regexes (PCRE2 syntax, compiled with UTF and UCP) applied
 *     in order; each splits every piece of the text into its matches and the text between them
 *     (GPT-2: its one regex; SmolLM2: "\\p{N}" then GPT-2's; Llama-3, Qwen2: their one regex).
 *   flags: MSH_BPE_IGNORE_MERGES or 0.
 * MSH_EINVAL for NULL or inconsistent arguments and for a pattern PCRE2 rejects (with its message
 * and position); MSH_EFORMAT naming a merge that is not "left right" or names a token absent from
 * the vocabulary; MSH_ENOMEM. Nothing is allocated on failure. */
msh_status msh_bpe_new(msh_bpe **out, int n_tokens, const char *text, const int64_t *offsets,
                       const uint8_t *kinds, int n_merges, const char *merges,
                       const int64_t *merge_offsets, int n_patterns, const char *const *patterns,
                       int flags);
void msh_bpe_free(msh_bpe *b);
int msh_bpe_vocab_size(const msh_bpe *b);
/* MSH_BPE_* kind of token id, or -1 if out of range. */
int msh_bpe_token_kind(const msh_bpe *b, int32_t id);
/* Encodes len bytes of text: added tokens (and special ones with MSH_BPE_PARSE_SPECIAL) are cut
 * out first, the longest at the leftmost position; the text between them is split by the patterns
 * and each piece is merged, its bytes mapped to byte-level tokens. Bytes that are not valid UTF-8
 * match no pattern and still encode through their byte tokens. MSH_ERANGE when cap is too small;
 * *n_out then holds the number of ids needed. */
msh_status msh_bpe_encode(msh_bpe *b, const char *text, size_t len, int flags, int32_t *ids, int cap,
                          int *n_out);
/* The bytes token id stands for: normal tokens mapped back from byte-to-unicode form, special and
 * added tokens their literal text. The pointer stays valid for the handle's life. */
msh_status msh_bpe_piece(const msh_bpe *b, int32_t id, const char **piece, size_t *len);
/* The id of a special or added token whose text is exactly text, else of the normal token whose
 * bytes are; MSH_ENOENT if none. */
msh_status msh_bpe_find(const msh_bpe *b, const char *text, size_t len, int32_t *id);

/* ====================================================================== communicators */

/* A communicator: a fixed group of ranks (processes) running collectives together. One
 * interface, two engines: TCP between CPU ranks (tensors in host memory; every distributed path
 * runs without GPUs) and NCCL between GPU ranks (tensors on the communicator's device; ops are
 * queued on the device's current stream and return before they finish).
 *
 * Every rank of a communicator must issue the same collectives, with the same sizes, dtypes and
 * roots, in the same order. Calls block (TCP) until this rank's part is done. A TCP call that
 * makes no progress for the communicator's timeout, or whose peer closes its connection, fails
 * with MSH_EIO naming the peer's rank (its rank in the world communicator it came from); after
 * any failure the communicator is broken: every later call fails at once with the first message,
 * and only msh_comm_free remains useful. Tensors must be contiguous; outputs writable. */
typedef struct msh_comm msh_comm;

/* A listening TCP socket, made before the rendezvous so that its port can be published. */
typedef struct msh_tcp_listener msh_tcp_listener;

enum { MSH_COMM_TCP = 0, MSH_COMM_NCCL = 1 };
typedef enum { MSH_REDUCE_SUM = 0, MSH_REDUCE_MAX = 1 } msh_reduce_op;
enum {
  MSH_COMM_NO_COLOR = -1,  /* msh_comm_split: this rank joins no group */
  MSH_NCCL_ID_BYTES = 128  /* size of an NCCL unique id */
};

/* Listens on host ("0.0.0.0": every interface; NULL is the same) and port (0: any free port).
 * MSH_EIO naming the address when the socket cannot be bound. */
msh_status msh_tcp_listen(msh_tcp_listener **out, const char *host, int port);
/* The port it listens on. */
int msh_tcp_listener_port(const msh_tcp_listener *l);
void msh_tcp_listener_free(msh_tcp_listener *l);

/* Connects rank `rank` of `world` to every other rank: addrs[r] is "host:port" of rank r's
 * listener (addrs[rank] is not used), l this rank's own listener (still owned by the caller,
 * who may free it afterwards). Collective: every rank calls it with the same table. Connections
 * are retried until timeout_s seconds have passed, which is also the communicator's timeout
 * (msh_comm_set_timeout changes it). MSH_EIO "cannot connect to rank 2 at host:port within 5 s"
 * or naming the ranks that never connected; MSH_EINVAL for a bad table; nothing is left open on
 * failure. */
msh_status msh_comm_new_tcp(msh_comm **out, msh_tcp_listener *l, int rank, int world,
                            const char *const *addrs, double timeout_s);

/* A fresh NCCL unique id (MSH_NCCL_ID_BYTES bytes into id), made by one rank and handed to the
 * others (through the rendezvous) for msh_comm_new_nccl. MSH_EUNSUPPORTED without NCCL. */
msh_status msh_nccl_unique_id(uint8_t *id);
/* An NCCL communicator of rank `rank` of `world` on CUDA device device_index, from an id made by
 * msh_nccl_unique_id. Collective; blocks until every rank has joined. MSH_EUNSUPPORTED without
 * NCCL, MSH_EDEVICE with NCCL's message. */
msh_status msh_comm_new_nccl(msh_comm **out, int rank, int world, const uint8_t *id,
                             int device_index);
/* 1 if this build contains the NCCL communicator. */
int msh_has_nccl(void);

/* Frees the communicator and closes its connections (peers blocked on them fail). NULL-safe.
 * For NCCL, waits for queued operations unless the communicator was aborted. */
void msh_comm_free(msh_comm *c);
/* Breaks the communicator at once: connections are shut down so that peers blocked in a
 * collective fail fast; NCCL operations are aborted. Safe to call from another thread while a
 * collective is blocked; the blocked call then fails. */
void msh_comm_abort(msh_comm *c);
int msh_comm_rank(const msh_comm *c);
int msh_comm_size(const msh_comm *c);
/* MSH_COMM_TCP or MSH_COMM_NCCL. */
int msh_comm_kind(const msh_comm *c);
/* Where its tensors live: MSH_CPU (TCP) or MSH_CUDA (NCCL), and the device index. */
int msh_comm_device(const msh_comm *c);
int msh_comm_device_index(const msh_comm *c);
/* The world rank (rank in the communicator it was split from, recursively) of rank r. */
int msh_comm_world_rank(const msh_comm *c, int r);
/* Seconds a TCP call may wait without progress before failing (> 0). */
void msh_comm_set_timeout(msh_comm *c, double seconds);
double msh_comm_timeout(const msh_comm *c);

/* Splits c into groups, as MPI_Comm_split: ranks calling with the same color >= 0 form one new
 * communicator, ordered by key (ties by rank in c); *out is NULL for MSH_COMM_NO_COLOR.
 * Collective over c. */
msh_status msh_comm_split(msh_comm **out, msh_comm *c, int color, int key);

/* In place: t = op over ranks of t. TCP: f32 and i32 (a ring: every rank gets bit-identical
 * values); NCCL: f32, f16, bf16, i32, i8. */
msh_status msh_comm_all_reduce(msh_comm *c, msh_tensor *t, int op);
/* acc += sum over ranks of t; t's values afterwards are unspecified. Same dtype and element
 * count; dtypes as all_reduce (and msh_op_add: f32 on a GPU). On NCCL ranks of one host, sums
 * up to MSH_P2P_BYTES (default 2 MiB) take a one-shot kernel over peer-mapped memory with the
 * add fused in (MSH_P2P_ALLREDUCE=0 turns it off); larger ones NCCL, then msh_op_add. Every rank
 * gets bit-identical values. */
msh_status msh_comm_all_reduce_add(msh_comm *c, msh_tensor *acc, msh_tensor *t);
/* all_reduce_add, then out = acc / sqrt(mean(acc^2) + eps) * w by rows of acc's last dim (the
 * RMSNorm that follows a residual add; msh_op_rmsnorm's rules). acc, t, out f32. On the one-shot
 * path (up to 64 rows, rows a multiple of 4) one kernel does all of it. */
msh_status msh_comm_all_reduce_add_norm(msh_comm *c, msh_tensor *acc, msh_tensor *t, msh_tensor *out,
                                       const msh_tensor *w, float eps);
/* 1 when op (MSH_COMM_OP_ALL_REDUCE: a sum of a tensor like t, in place or _add; or
 * MSH_COMM_OP_ALL_GATHER with t as the input) may be captured into a CUDA graph on this
 * communicator: the one-shot paths of an NCCL communicator (all-gathers of 16-byte multiples at
 * any size), or a single rank. 0 for other ops. */
int msh_comm_capturable(const msh_comm *c, int op, const msh_tensor *t);
/* out (size * n elements) = every rank's in (n elements) in rank order. in may be out's own
 * slice (rank * n). Any dtype; equal dtypes. */
msh_status msh_comm_all_gather(msh_comm *c, msh_tensor *out, const msh_tensor *in);
/* out (n elements) = op over ranks of slice `rank` of in (size * n elements). Dtypes as
 * all_reduce. */
msh_status msh_comm_reduce_scatter(msh_comm *c, msh_tensor *out, const msh_tensor *in, int op);
/* t on every rank = t on root. Any dtype. */
msh_status msh_comm_broadcast(msh_comm *c, msh_tensor *t, int root);
/* Point to point: t's bytes to peer / from peer. Sizes must match (TCP checks: MSH_EIO naming
 * both sizes). A TCP send returns once its bytes are in the kernel's buffers, so two ranks
 * sending large tensors to each other at once may wait on each other: order sends and receives. */
msh_status msh_comm_send(msh_comm *c, const msh_tensor *t, int peer);
msh_status msh_comm_recv(msh_comm *c, msh_tensor *t, int peer);
/* Returns once every rank has entered it (NCCL: once the device reaches it). */
msh_status msh_comm_barrier(msh_comm *c);

/* Per-communicator counters, by operation: calls, bytes of this rank's tensors (the input's for
 * all_gather and reduce_scatter), and seconds inside the calls (host wall time: for TCP the whole
 * transfer; for NCCL the time to enqueue, the device's time needs CUDA events). Failed calls
 * count too. MSH_EINVAL for an unknown op; any out-param may be NULL. */
typedef enum {
  MSH_COMM_OP_ALL_REDUCE = 0,
  MSH_COMM_OP_ALL_GATHER = 1,
  MSH_COMM_OP_REDUCE_SCATTER = 2,
  MSH_COMM_OP_BROADCAST = 3,
  MSH_COMM_OP_SEND = 4,
  MSH_COMM_OP_RECV = 5,
  MSH_COMM_OP_BARRIER = 6,
  MSH_COMM_OP_COUNT = 7
} msh_comm_op;
msh_status msh_comm_stats(const msh_comm *c, int op, uint64_t *calls, uint64_t *bytes, double *seconds);
void msh_comm_reset_stats(msh_comm *c);

/* Per-call events, for telemetry. With capacity > 0, every successful call of the operations
 * above appends a record to a ring of that many entries: its op (msh_comm_op), bytes (as
 * msh_comm_stats counts them), peer (send and recv: the peer; broadcast: the root; else -1), t
 * (CLOCK_MONOTONIC seconds at the call, the clock of uv.hrtime()), and its duration in seconds:
 * for TCP the host time inside the call (the whole transfer); for NCCL the device time between
 * two CUDA events recorded on the stream around the enqueue (the collective's kernel, including
 * its wait for the other ranks). NCCL calls made while a graph is being captured carry the host
 * time of the enqueue instead (device flag 0). Nothing waits on the device on the way: a record
 * becomes readable once its end event has been reached. A full ring drops its oldest record
 * (counted). Capacity 0 (the default) turns recording off and discards the records; a new
 * capacity discards them too. MSH_EINVAL for a negative capacity; MSH_ENOMEM; MSH_EDEVICE when
 * the events cannot be made (recording is then off). */
msh_status msh_comm_set_events(msh_comm *c, int capacity);
/* Moves up to max of the oldest readable records, in call order, into the arrays (each NULL or
 * of max entries): op, bytes, peer, t, seconds, device (1: timed on the device). *n gets the
 * count. It stops at the first record whose device time is not known yet, unless wait is 1
 * (then it waits for the device). *dropped (may be NULL) gets the records lost to a full ring
 * since the last call. A record whose events failed comes out with its host time (device 0). */
msh_status msh_comm_drain_events(msh_comm *c, int max, int wait, int *op, uint64_t *bytes, int *peer, double *t,
                                 double *seconds, int *device, int *n, uint64_t *dropped);

/* ============================================================================ offload */

/* Buffers for weights that live off the device: a pinned host pool with a guard on how much may
 * be locked, a file reader (io_uring with O_DIRECT where the build has liburing and the file
 * system allows it; pread otherwise), and a ring of layer buffers on a device. */

/* The most host memory a pinned pool may take: share (0 < share <= 1; <= 0 means the default,
 * $MSH_PIN_SHARE or 0.5) of MemTotal, and, when memlock is 1, at most RLIMIT_MEMLOCK if that is
 * finite. Any out-param may be NULL (*memlock_limit is UINT64_MAX when unlimited). MSH_EIO when
 * /proc/meminfo cannot be read. */
msh_status msh_pin_limit(double share, int memlock, uint64_t *allowed, uint64_t *mem_total,
                         uint64_t *memlock_limit);

/* A pool of host memory taken once, in page-locked memory where the build's backend can pin
 * (msh_tensor_new_pinned; ordinary memory otherwise: msh_pin_pool_is_pinned), from which
 * 4096-byte aligned i8 buffers are handed out (O_DIRECT reads and copies to devices need no
 * staging). Before anything is allocated, bytes are checked against msh_pin_limit(share,
 * memlock): memlock < 0 applies RLIMIT_MEMLOCK only where memory is really pinned, 1 always, 0
 * never. MSH_ENOMEM "pinning 12.0 GiB refused: allowed 8.0 GiB (50% of MemTotal 16.0 GiB, ...);
 * would fit: ..." when over the limit (nothing is allocated), or when allocation fails. */
typedef struct msh_pin_pool msh_pin_pool;
msh_status msh_pin_pool_new(msh_pin_pool **out, uint64_t bytes, double share, int memlock);
void msh_pin_pool_free(msh_pin_pool *p);
/* A new 1-D i8 tensor of `bytes` (4096-aligned start) viewing the pool; it keeps the pool's
 * memory alive. MSH_ERANGE (what was asked, what is left) when the pool is full. */
msh_status msh_pin_pool_take(msh_pin_pool *p, msh_tensor **out, uint64_t bytes);
uint64_t msh_pin_pool_used(const msh_pin_pool *p);
uint64_t msh_pin_pool_capacity(const msh_pin_pool *p);
int msh_pin_pool_is_pinned(const msh_pin_pool *p);

/* A view of the bytes of a contiguous tensor (any device, any dtype) as a contiguous tensor of
 * another dtype and shape, starting byte_offset bytes in: how a flat layer buffer holds each of
 * its weights. MSH_EINVAL unless byte_offset lands on a whole element (block) of dtype;
 * MSH_ERANGE when the view runs past the buffer. */
msh_status msh_tensor_view_bytes(msh_tensor **out, msh_tensor *buf, uint64_t byte_offset, int dtype,
                                 int ndim, const int64_t *shape);

/* 64-bit checksum of n bytes of host memory, continuing from seed (0 to start). */
uint64_t msh_hash64(const void *p, uint64_t n, uint64_t seed);

/* Writes bytes [0, n) of the contiguous CPU tensor t (all of it when n is 0) into the file at
 * offset, creating it when create is 1 (truncating it to `truncate_to` bytes first when that is
 * not UINT64_MAX). MSH_EIO naming the file and the reason (a full disk says so). */
msh_status msh_file_write_at(const char *path, uint64_t offset, const msh_tensor *t, uint64_t n, int create,
                             uint64_t truncate_to);
/* Free bytes of the file system holding dir and whether this process may create files there.
 * MSH_ENOENT for a missing dir, MSH_EIO when it is not a directory. */
msh_status msh_dir_space(const char *dir, uint64_t *free_bytes, int *writable);

/* Reads file ranges into host buffers, up to queue_depth requests of chunk_bytes in flight.
 * direct: 1 opens the file with O_DIRECT (falls back to buffered reads where the file system
 * refuses it, e.g. tmpfs; msh_reader_stats says which), 0 buffered. Builds without liburing (or
 * with MSH_READER_PREAD=1 in the environment) read with pread, synchronously. Ranges whose buffer address,
 * offset and length are all multiples of 4096 go through O_DIRECT; other ranges go buffered. */
typedef struct msh_reader msh_reader;
msh_status msh_reader_open(msh_reader **out, const char *path, int queue_depth, uint64_t chunk_bytes,
                           int direct);
void msh_reader_free(msh_reader *r);
/* Queues bytes [offset, offset + bytes) of the file into dst (a contiguous CPU tensor of at
 * least `bytes` bytes), returning a ticket for msh_reader_wait. With io_uring the reads run
 * while the caller goes on; without it they are done before this returns. At most 256 tickets
 * may be outstanding (MSH_ERANGE). dst must stay alive until the ticket is waited for. */
msh_status msh_reader_submit(msh_reader *r, msh_tensor *dst, uint64_t offset, uint64_t bytes, uint64_t *ticket);
/* Waits until every read of the ticket is done. MSH_EIO naming the file, the offset and the reason
 * (a read past the end of the file: "short file"); the ticket is done either way. */
msh_status msh_reader_wait(msh_reader *r, uint64_t ticket);
/* 1 when the ticket's reads are done (reaping finished reads without waiting), else 0. */
int msh_reader_done(msh_reader *r, uint64_t ticket);
/* Counters since open: bytes read, seconds inside msh_reader_wait, the most requests in flight
 * at once, the queue depth, and the engine: *uring 1 for io_uring, *direct 1 when O_DIRECT is on.
 * Any out-param may be NULL. */
void msh_reader_stats(const msh_reader *r, uint64_t *bytes, double *wait_s, int *max_in_flight, int *queue_depth,
                      int *uring, int *direct);

/* A ring of n layer buffers (1-D i8 tensors of slot_bytes each) on a device, allocated once and
 * reused: a slot is claimed for a key (a layer), found by its key while held, and released. */
typedef struct msh_ring msh_ring;
msh_status msh_ring_new(msh_ring **out, int n, uint64_t slot_bytes, int device, int device_index);
void msh_ring_free(msh_ring *r);
int msh_ring_size(const msh_ring *r);
/* Slot i's buffer, owned by the ring (valid until msh_ring_free). NULL when i is out of range. */
msh_tensor *msh_ring_buffer(msh_ring *r, int i);
/* The slot holding key, or -1. */
int msh_ring_find(const msh_ring *r, int64_t key);
/* Claims the next free slot (in ring order) for key: *slot. MSH_ERANGE when every slot is held
 * (the message names their keys); MSH_EINVAL when key is held already or negative. */
msh_status msh_ring_claim(msh_ring *r, int64_t key, int *slot);
/* Frees a held slot for the next claim. MSH_EINVAL for a slot not held. */
msh_status msh_ring_release(msh_ring *r, int slot);

/* ============================================================================== HTTP */

/* HTTP/1.x messages parsed by http_parser (Node's, 2.9) into buffers the caller reads; the
 * server and client around it (sockets, responses) are Lua (moonshard.http). One parser per
 * connection. Pointers returned by the accessors stay valid until the next feed, next or reset. */
typedef struct msh_http msh_http;
enum { MSH_HTTP_REQUEST = 0, MSH_HTTP_RESPONSE = 1 };

/* kind: MSH_HTTP_REQUEST (a server's parser) or MSH_HTTP_RESPONSE (a client's). Limits:
 * max_head bytes of url, header names and values together (more: 431); max_body bytes of body
 * held at once (a larger Content-Length fails as soon as the headers end; more: 413);
 * max_headers header lines (more: 431). MSH_EINVAL for a bad kind or non-positive limits
 * (max_body may be 0); MSH_ENOMEM. */
msh_status msh_http_new(msh_http **out, int kind, int64_t max_head, int64_t max_body, int max_headers);
void msh_http_free(msh_http *h);
/* Parses up to n bytes of data (n == 0: the peer closed, which ends a body read to EOF). *used
 * gets the bytes consumed; parsing stops right after a complete message, so the bytes of a
 * pipelined next one stay unused until msh_http_next. *state: 0 the head is incomplete, 1 the
 * head is complete and the body is not (responses: the body so far is readable), 2 the message
 * is complete. Failures leave the parser failed until msh_http_reset: MSH_EFORMAT for malformed
 * input (the message and msh_http_error_name give http_parser's errno name, e.g.
 * "HPE_INVALID_METHOD"), MSH_ERANGE for a limit (msh_http_error_status gives 413 or 431),
 * MSH_ENOMEM; MSH_EINVAL for NULLs or a failed parser. */
msh_status msh_http_feed(msh_http *h, const char *data, size_t n, size_t *used, int *state);
/* Forgets the complete message and parses the next one of the connection (keep-alive).
 * MSH_EINVAL when no message is complete or the parser failed. */
msh_status msh_http_next(msh_http *h);
/* Back to the start of a connection; clears a failure. NULL-safe. */
void msh_http_reset(msh_http *h);
/* The message once its head is complete: method ("GET"; "" for responses and before),
 * response status code, keep-alive (1 when the connection may carry another message), HTTP
 * version (11 for 1.1). */
const char *msh_http_method(const msh_http *h);
int msh_http_status_code(const msh_http *h);
int msh_http_keep_alive(const msh_http *h);
int msh_http_version(const msh_http *h);
/* After a failed feed: the status a server answers (400, 413, 431; 500 out of memory) and the
 * error's name (http_parser's errno name, or MSH_BODY_TOO_LARGE, MSH_TOO_MANY_HEADERS,
 * HPE_HEADER_OVERFLOW for the limits); 0 and "" otherwise. */
int msh_http_error_status(const msh_http *h);
const char *msh_http_error_name(const msh_http *h);
/* The request target as sent ("/v1/models?x=1"), *n its length. */
const char *msh_http_url(const msh_http *h, size_t *n);
/* Header lines in order, names as sent (case kept); i from 0. MSH_ERANGE out of range. */
int msh_http_header_count(const msh_http *h);
msh_status msh_http_header(const msh_http *h, int i, const char **name, size_t *name_len, const char **value,
                           size_t *value_len);
/* The body bytes received and not consumed (chunked bodies de-chunked), *n their count. */
const char *msh_http_body(const msh_http *h, size_t *n);
/* Drops the first n bytes of the body held (a streamed response read as it arrives; the
 * max_body limit counts the bytes held). MSH_ERANGE for more than is held. */
msh_status msh_http_body_consume(msh_http *h, size_t n);

/* ========================================================================== Topology */

/* The machine as JSON text (core/src/topology.c), decoded by moonshard.topology: hwloc's
 * packages, NUMA nodes (memory, page sizes), cores and the PCI tree's NVIDIA GPUs (bus id, NUMA
 * node, the bridges above them); NVML's GPUs (memory, power cap, clocks, PCIe, NVLink peers) and
 * pairwise matrices when libnvidia-ml.so.1 loads ($MSH_NVML_LIBRARY names another), else
 * "nvml": {"status": "absent"}; RLIMIT_MEMLOCK. xml_path (NULL or "": this machine) is an hwloc
 * XML file standing in for the machine. flags: MSH_TOPOLOGY_NO_NVML skips NVML. MSH_EIO for an
 * unreadable file or a failed discovery, MSH_EFORMAT for a file hwloc rejects, MSH_EUNSUPPORTED
 * for an XML file in a build without hwloc; nothing is allocated then. */
typedef struct msh_topology msh_topology;
enum { MSH_TOPOLOGY_NO_NVML = 1 };
msh_status msh_topology_load(msh_topology **out, const char *xml_path, int flags);
void msh_topology_free(msh_topology *t);
/* The JSON text, valid until msh_topology_free; *len its length (len may be NULL). */
const char *msh_topology_json(const msh_topology *t, size_t *len);

/* Binds the calling process to NUMA node os_index (hwloc's os_index, as moonshard.topology lists
 * it): every thread of the process runs on the node's CPUs and memory the process allocates from
 * now on (pinned host buffers included) comes from the node's memory. MSH_EINVAL for a node this
 * machine does not have, MSH_EUNSUPPORTED in a build without hwloc, MSH_EIO when the system
 * refuses (the message says which of the two bindings failed). */
msh_status msh_numa_bind(int os_index);
/* The process's current CPU binding and memory binding as hwloc list strings ("0-15", "0"):
 * cpus (cap bytes) and nodes (cap bytes). MSH_EUNSUPPORTED without hwloc. */
msh_status msh_numa_binding(char *cpus, size_t cpus_cap, char *nodes, size_t nodes_cap);

/* ffi:end */

#ifdef __cplusplus
}
#endif

#endif /* MOONSHARD_H */
