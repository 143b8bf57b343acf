/* msh_kernels.h: launchers of the CUDA kernels of kernels/, callable from C.
 *
 * Every launcher takes an explicit stream, enqueues its work and returns cudaGetLastError() of
 * the launch (cudaSuccess or the launch error); it never synchronizes unless stated. Operands are
 * device pointers that the caller (core/cuda) has validated. dtype arguments are msh_dtype values
 * (MSH_F32, MSH_F16, MSH_BF16; MSH_I32/MSH_I8 only where stated). */
#ifndef MSH_KERNELS_H
#define MSH_KERNELS_H

#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { MSH_K_MAX_DIMS = 8 };

/* ------------------------------------------------------------------------------ copy.cu */

/* dst[i] = src[i] for n contiguous elements, converting between f32/f16/bf16. */
cudaError_t msh_k_convert(cudaStream_t s, void *dst, int dst_dt, const void *src, int src_dt, int64_t n);

/* Rows: dst[r * dst_ld + c] = src[r * src_ld + c], r < rows, c < cols (element strides), any
 * f32/f16/bf16 pair, or equal dtypes of 1, 2 or 4 bytes copied bit for bit. */
cudaError_t msh_k_copy_rows(cudaStream_t s, void *dst, int dst_dt, int64_t dst_ld, const void *src,
                            int src_dt, int64_t src_ld, int64_t rows, int64_t cols);

/* Any strides (elements, may be negative), up to MSH_K_MAX_DIMS dims, same rules as above. */
cudaError_t msh_k_copy_strided(cudaStream_t s, void *dst, int dst_dt, const int64_t *dst_stride,
                               const void *src, int src_dt, const int64_t *src_stride, int ndim,
                               const int64_t *shape);

/* Batched row copies at rows read on the device (set_rows_dyn, CUDA graphs): for sequence
 * b < B, rows r < rows of src go to row r + clamp(row0[b], 0, max_row0) of dst's sequence b
 * (row0[0] for every b when n_row0 is 1; row0 is device int32). Conversions as above.
 * copy_rows_at: elements (b, r, c), c < cols, at b * bs + r * ld + c (element strides, any sign).
 * copy_strided_at: any strides over ndim >= 2 dims, dim 0 the sequence, dim 1 the row. */
cudaError_t msh_k_copy_rows_at(cudaStream_t s, void *dst, int dst_dt, int64_t dst_bs, int64_t dst_ld,
                               const void *src, int src_dt, int64_t src_bs, int64_t src_ld, int64_t B,
                               int64_t rows, int64_t cols, const int32_t *row0, int64_t n_row0,
                               int64_t max_row0);
cudaError_t msh_k_copy_strided_at(cudaStream_t s, void *dst, int dst_dt, const int64_t *dst_stride,
                                  const void *src, int src_dt, const int64_t *src_stride, int ndim,
                                  const int64_t *shape, const int32_t *row0, int64_t n_row0,
                                  int64_t max_row0);

/* ------------------------------------------------------------------------- embedding.cu */

/* out (T, D) f32 = table (V, D)[ids]; an id outside [0, V) writes zeros to its row and stores
 * 1 + its position into *bad (device int32, left alone when all ids are good). */
cudaError_t msh_k_embedding(cudaStream_t s, float *out, const void *table, int table_dt,
                            const int32_t *ids, int64_t T, int64_t D, int64_t V, int32_t *bad);

/* --------------------------------------------------------------------------- rmsnorm.cu */

/* out (R, D) = x / sqrt(mean(x^2) + eps) * w; out may alias x. */
cudaError_t msh_k_rmsnorm(cudaStream_t s, float *out, const float *x, const void *w, int w_dt,
                          int64_t R, int64_t D, float eps);
/* msh_k_rmsnorm with out of type out_dt (f32, f16 or bf16): the normalized rows straight into a
 * 16-bit GEMM operand. out must not overlap x unless out_dt is f32. */
cudaError_t msh_k_rmsnorm_to(cudaStream_t s, void *out, int out_dt, const float *x, const void *w, int w_dt,
                             int64_t R, int64_t D, float eps);

/* ------------------------------------------------------------------------------ gemv.cu */

/* out (M, N) = x (M, K) @ w (N, K)^T for 1 <= M <= 16, fp32 accumulation: the memory-bound
 * decode path (16-byte weight loads, several rows per block, warp-shuffle reductions). */
cudaError_t msh_k_gemv(cudaStream_t s, float *out, const float *x, const void *w, int w_dt, int64_t M,
                       int64_t N, int64_t K);
/* msh_k_gemv with an epilogue: 0 stores, 1 adds into out, 2 (GLU) reads w as (2N, K), gate rows
 * then up rows, and writes silu(x . gate_n) * (x . up_n). */
cudaError_t msh_k_gemv_epi(cudaStream_t s, int epi, float *out, const float *x, const void *w, int w_dt,
                           int64_t M, int64_t N, int64_t K);
/* The decode step's normalized projections in one pass (x one row, the raw residual): out =
 * rmsnorm(x) * g @ w^T (epi 0) or the GLU form of msh_k_gemv_epi (epi 2), the norm's sum of
 * squares formed while x is read. g (K) has w's type. cudaErrorNotSupported when K % 8 != 0 or a
 * pointer is not 16-byte aligned (the caller then normalizes first). */
cudaError_t msh_k_gemv_norm(cudaStream_t s, int epi, float *out, const float *x, const void *w, const void *g,
                            int w_dt, float eps, int64_t N, int64_t K);
/* A decode step's attention inputs in one pass (x one row, the raw residual): qkv = rmsnorm(x) * g
 * @ w^T (x @ w^T when g is NULL: x arrives normalized) for w ((H + 2 KVH) hd, K) stacked q/k/v
 * rows, then as msh_k_qkv_rope with one row at
 * *pos: q rotated into q_out (H, hd) f32, k rotated and v into row *pos of the caches (S, KVH,
 * hd) of kv_dt, rows rstride elements apart (no row written when *pos is outside [0, S)). No qkv
 * row is written. cudaErrorNotSupported unless the rotation covers whole heads (2 n_rot = hd,
 * hd % 4 == 0), K % 8 == 0 and x, w (and g) are 16-byte aligned, or for a tuning shape (see
 * msh_k_gemv_variant) without four rows a warp or block (the caller then composes). */
cudaError_t msh_k_gemv_norm_qkv(cudaStream_t s, float *q_out, void *k_cache, void *v_cache, int kv_dt, const float *x,
                                const void *w, const void *g, int w_dt, float eps, const int32_t *pos,
                                const float *inv_freq, int64_t H, int64_t KVH, int64_t hd, int64_t n_rot, int style,
                                int64_t S, int64_t rstride, int64_t K);
/* Tuning hook for benchmarks: selects the shape of the M = 1 kernel (rows per warp x 16-byte
 * chunks in flight per row): 0 the default (6), 1: 1 x 8, 2: 2 x 8, 3: 4 x 4, 4: 4 x 2, 5: 2 x 4;
 * 6: 4 x 2 and 7: 2 x 4 with K split over the block's 4 warps (rows per block, not per warp).
 * Returns the previous choice. MSH_GEMV_VARIANT in the environment sets the first choice. */
int msh_k_gemv_variant(int v);

/* ------------------------------------------------------------------------------ rope.cu */

/* In place on x (T, H, hd) f32: rotates the first 2R dims of each head. style 0 interleaved
 * pairs (2i, 2i+1), 1 half pairs (i, i + R). */
cudaError_t msh_k_rope(cudaStream_t s, float *x, const int32_t *pos, const float *inv_freq, int64_t T,
                       int64_t H, int64_t hd, int64_t R, int style);

/* ------------------------------------------------------------------------- attention */

typedef struct msh_k_attn {
  float *out;        /* (B, T, H, hd) f32, contiguous */
  const float *q;    /* (B, T, H, hd) f32, contiguous */
  const void *k;     /* sequence b, row s, head g at k + b * ksb + s * ks0 + g * hd (elements) */
  const void *v;
  int64_t ks0, vs0;  /* row strides, elements */
  int64_t ksb, vsb;  /* batch strides, elements (any sign) */
  int kv_dt;
  int B, T, H, KVH, hd;
  int64_t pos0;      /* position of query 0; with pos0_dev, the largest one the work is planned for */
  float scale;
  const int32_t *pos0_dev; /* NULL, or position of query 0 read on the device when the kernels
                            * run, clamped into [0, pos0] (CUDA graphs replay at any position):
                            * pos0_dev[b] for sequence b, or pos0_dev[0] for all when pos0_n is 1 */
  int pos0_n;
  /* A paged cache (block_table non-NULL; attn_decode.cu's paged forms, set by msh_k_attn_paged):
   * k and v are pools of NB blocks of BS rows, ks0 / vs0 elements a row; key s of sequence b is
   * row block_table[b * MB + s / BS] * BS + s % BS. q_start (seqs + 1) and ctx_len (seqs) say
   * which query rows are whose and where they stand; tiles (4 ints a tile: sequence, row tile,
   * first query row, rows) are the tile form's work list, built on the device. */
  const int32_t *block_table, *q_start, *ctx_len;
  int32_t *tiles;
  int BS, NB, MB, seqs, rows, max_ctx;
} msh_k_attn;

/* Split-KV decode (attn_decode.cu): any T (each query reads its own keys), hd <= 256, the batch
 * in the grid (B * KVH * head tiles <= 65535 blocks along y). The partials need
 * msh_k_attn_decode_workspace() bytes of device memory at work. The split plan depends on the
 * shapes and pos0 + T only (fewer splits as B grows: the batch alone fills the GPU), so with
 * pos0_dev the same launch (and workspace) serves every position up to pos0: blocks whose chunk
 * starts past a query's last key exit and the merge skips their partials. */
size_t msh_k_attn_decode_workspace(const msh_k_attn *a, int sm_count);
cudaError_t msh_k_attn_decode(cudaStream_t s, const msh_k_attn *a, void *work, int sm_count);

/* Merges `splits` partial results (per (b, t, h) row: max and sum of weights in ml, unnormalized
 * output in acc) of key chunks of `chunk` keys into a->out (attn_decode.cu). */
cudaError_t msh_k_attn_merge(cudaStream_t s, const msh_k_attn *a, int splits, int chunk, const float2 *ml,
                             const float *acc);

/* Flash-attention prefill on tensor cores (attn_prefill.cu; on Hopper the wgmma kernel of
 * attn_prefill_sm90.cu for sequences of 1024 keys or more): f16/bf16 caches, hd 64 or 128,
 * 16-byte aligned rows and sequences, host pos0 only (pos0_dev NULL). Splits
 * the keys when there are too few query rows to fill the GPU; the partials need
 * msh_k_attn_prefill_workspace() bytes at work. Returns cudaErrorNotSupported when the operands
 * do not qualify. */
int msh_k_attn_prefill_ok(const msh_k_attn *a);
size_t msh_k_attn_prefill_workspace(const msh_k_attn *a, int sm_count);
cudaError_t msh_k_attn_prefill(cudaStream_t s, const msh_k_attn *a, void *work, int sm_count);

/* --------------------------------------------------------------------- paged_attn.cu */

/* The paged KV cache (msh_op_kv_write, msh_op_paged_attention; operands validated). Pools
 * (NB, BS, KVH, hd) contiguous of kv_dt; q, out (R, H, hd) f32; q_start (B + 1), ctx_len (B),
 * block_table (B, MB) device int32 read when the kernels run (clamped: nothing is read out of
 * bounds). hd <= 256. The plan (splits of each row's keys) depends on R, B, KVH, max_ctx and
 * sm_count only; the workspace it needs is msh_k_paged_attn_workspace bytes (0: none). */
typedef struct msh_k_paged {
  float *out;
  const float *q;
  const void *k, *v;
  const int32_t *q_start, *ctx_len, *block_table;
  int kv_dt, R, B, H, KVH, hd, BS, NB, MB, max_ctx;
  float scale;
} msh_k_paged;
size_t msh_k_paged_attn_workspace(const msh_k_paged *a, int sm_count);
cudaError_t msh_k_paged_attn(cudaStream_t s, const msh_k_paged *a, void *work, int sm_count);
/* The tensor-core forms of paged attention (attn_decode.cu), which msh_k_paged_attn takes when
 * msh_k_attn_paged_ok: f16/bf16 pools, head dim 64 or 128, 16-byte aligned pools, q 8-byte
 * aligned. R == B (decodes): one block per (key split, kv head, row), split-KV as the slot
 * cache's decode; otherwise tiles of 16 (query, head) rows of one sequence over one kv head,
 * listed on the device by a first kernel. Both read keys through the block table in 64-key tiles
 * of the slot cache's tensor-core kernel. */
int msh_k_attn_paged_ok(const msh_k_paged *a);
size_t msh_k_attn_paged_workspace(const msh_k_paged *a, int sm_count);
cudaError_t msh_k_attn_paged(cudaStream_t s, const msh_k_paged *a, void *work, int sm_count);
/* Row r < R of k and v (row_elems = KVH * hd elements of k_dt and v_dt, rows k_ld / v_ld
 * elements apart) to pool row slots[r] of k_pool, v_pool (pool_dt, pool_rows rows); a slot
 * outside [0, pool_rows) writes nothing. */
cudaError_t msh_k_kv_write(cudaStream_t s, void *k_pool, void *v_pool, int pool_dt, int64_t pool_rows,
                           const void *k, int k_dt, const void *v, int v_dt, int64_t k_ld, int64_t v_ld,
                           const int32_t *slots, int R, int row_elems);

/* ------------------------------------------------------------------- elementwise ops */

/* silu_mul.cu: out = silu(g) * u; out may alias g or u. */
cudaError_t msh_k_silu_mul(cudaStream_t s, float *out, const float *g, const float *u, int64_t n);
/* out (M, F) = silu(gu[:, :F]) * gu[:, F:] for gu (M, 2F) contiguous. */
cudaError_t msh_k_glu(cudaStream_t s, float *out, const float *gu, int64_t M, int64_t F);
/* msh_k_glu over bf16 products (a GEMM's 16-bit output). */
cudaError_t msh_k_glu_bf16(cudaStream_t s, float *out, const void *gu, int64_t M, int64_t F);
/* msh_k_glu_bf16 writing bf16 (the next GEMM's operand). */
cudaError_t msh_k_glu_bf16_to_bf16(cudaStream_t s, void *out, const void *gu, int64_t M, int64_t F);

/* ------------------------------------------------------------------------- qkv_rope.cu */

/* The attention inputs of R rows of a fused projection qkv (R, (H + 2 KVH) hd) f32: q and k
 * rotated (rope over R pairs, angles pos[r] * inv_freq[i] in double), q into q_out (R, H, hd),
 * k and v into rows pos[r] of the caches (cache dtype kv_dt): element (b, p, head, e) at
 * b * bstride + p * rstride + head * hd + e, with b = r / T. Rows whose pos is outside [0, S)
 * write no cache row. */
cudaError_t msh_k_qkv_rope(cudaStream_t s, float *q_out, void *k_cache, void *v_cache, int kv_dt, const float *qkv,
                           const int32_t *pos, const float *inv_freq, int64_t R, int64_t T, int64_t H, int64_t KVH,
                           int64_t hd, int64_t n_rot, int style, int64_t S, int64_t bstride, int64_t rstride);
/* ------------------------------------------------------------------------ allreduce.cu */

enum { MSH_K_AR_MAX_RANKS = 8, MSH_K_AR_MAX_BLOCKS = 64 };

/* One-shot sum over the ranks of one host through peer-mapped memory (see allreduce.cu).
 * bufs[p], flags[p]: rank p's data slots ([2][size][slot_bytes]) and flags ([size]
 * [MSH_K_AR_MAX_BLOCKS] uint32, zero at first) as mapped in this process; epoch: this rank's
 * MSH_K_AR_MAX_BLOCKS uint32 counters (zero at first). x: n elements of dt (f32, f16, bf16),
 * 16-byte aligned, n * size of dt <= slot_bytes. add = 0: out = sum of every rank's x (out may be
 * x); add = 1: out += that sum (out must not overlap x). The same on every rank, bit for bit. A
 * peer missing for timeout_ns traps (the context is lost). Every rank must issue the same
 * sequence of calls with the same n. */
cudaError_t msh_k_allreduce_oneshot(cudaStream_t s, char *const *bufs, uint32_t *const *flags, uint32_t *epoch,
                                    int rank, int size, size_t slot_bytes, void *out, const void *x, int dt,
                                    int64_t n, int add, uint64_t timeout_ns);
/* All-gather over the same buffers: out + p * stride (bytes) = rank p's `bytes` of x, for every
 * rank p (this rank's part may already be in place: x == out + rank * stride). bytes and stride
 * multiples of 16, pointers 16-byte aligned, bytes <= slot_bytes. */
cudaError_t msh_k_allgather_oneshot(cudaStream_t s, char *const *bufs, uint32_t *const *flags, uint32_t *epoch,
                                    int rank, int size, size_t slot_bytes, void *out, int64_t stride, const void *x,
                                    int64_t bytes, uint64_t timeout_ns);
/* The same exchange for R <= MSH_K_AR_MAX_BLOCKS rows of D f32 (D % 4 == 0, R * D * 4 <=
 * slot_bytes), one block per row: acc += the sum of every rank's x, then h = acc / sqrt(mean(acc^2)
 * + eps) * w (w: D elements of w_dt), a residual add and the RMSNorm after it in one kernel. */
cudaError_t msh_k_allreduce_oneshot_norm(cudaStream_t s, char *const *bufs, uint32_t *const *flags, uint32_t *epoch,
                                         int rank, int size, size_t slot_bytes, float *acc, const float *x, float *h,
                                         const void *w, int w_dt, int64_t R, int64_t D, float eps,
                                         uint64_t timeout_ns);

/* add.cu: out = a + b; out may alias either. */
cudaError_t msh_k_add(cudaStream_t s, float *out, const float *a, const float *b, int64_t n);
/* add_bias.cu: out (R, N) += b (N), b of b_dt (f32, f16, bf16) broadcast over the rows. */
cudaError_t msh_k_add_bias(cudaStream_t s, float *out, const void *b, int b_dt, int64_t R, int64_t N);
/* scale.cu: out = x * v; out may alias x. */
cudaError_t msh_k_scale(cudaStream_t s, float *out, const float *x, float v, int64_t n);

/* softmax.cu: row-wise over rows of N; log != 0 gives log_softmax. out may alias x. */
cudaError_t msh_k_softmax(cudaStream_t s, float *out, const float *x, int64_t R, int64_t N, int log);

/* argmax.cu: out[r] (device int32) = first index of the largest value of row r. */
cudaError_t msh_k_argmax(cudaStream_t s, int32_t *out, const float *x, int64_t R, int64_t N);

/* randn.cu: out[i] = mean + std * msh_randn_value(seed, i) for n contiguous f32/f16/bf16. */
cudaError_t msh_k_randn(cudaStream_t s, void *out, int dt, int64_t n, uint64_t seed, float mean, float std);

/* ------------------------------------------------------------------------ gemv_quant.cu */
/* Block-quantized weights (w_dt MSH_Q8_0, MSH_Q4_0, MSH_Q4_1 or a group-wise MSH_I8G* / MSH_I4G*;
 * rows of K / G blocks, contiguous), dequantized in the kernel, f32 accumulation. */

/* out (M, NO) = x (M, K) @ w^T for 1 <= M <= 16 with msh_k_gemv_epi's epilogues (0 store, 1 add,
 * 2 GLU over w (2 NO, K)). cudaErrorNotSupported for M outside [1, 16], K not a multiple of 32, x
 * not 16-byte aligned, or another dtype. */
cudaError_t msh_k_gemv_quant(cudaStream_t s, int epi, float *out, const float *x, const void *w, int w_dt,
                             int64_t M, int64_t NO, int64_t K);
/* msh_k_gemv_quant for one row with the RMSNorm before it folded in (x the raw residual, g (K) of
 * g_dt f32 / bf16 / f16): out = rmsnorm(x) * g @ w^T (epi 0) or its GLU form (epi 2). Where the
 * tensor-core kernel of the 4-bit dtypes is picked (gemv_quant_mma.cu); else cudaErrorNotSupported
 * (the caller normalizes first). */
cudaError_t msh_k_gemv_quant_norm(cudaStream_t s, int epi, float *out, const float *x, const void *w, int w_dt,
                                  const void *g, int g_dt, float eps, int64_t NO, int64_t K);
/* dst (rows, K) of dst_dt (f32, f16, bf16) = the values of rows of blocks src (a GEMM operand). */
cudaError_t msh_k_dequant(cudaStream_t s, void *dst, int dst_dt, const void *src, int src_dt, int64_t rows,
                          int64_t K);
/* msh_k_embedding for a table of blocks (V, D). */
cudaError_t msh_k_embedding_quant(cudaStream_t s, float *out, const void *table, int table_dt,
                                  const int32_t *ids, int64_t T, int64_t D, int64_t V, int32_t *bad);

#ifdef __cplusplus
}
#endif

#endif
