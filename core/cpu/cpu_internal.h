/* cpu_internal.h: what the files of the CPU backend share: thread counts, per-thread scratch,
 * dtype widening of rows and a few vector helpers (AVX2 + FMA + F16C when the build targets them,
 * portable C otherwise).
 *
 * The backend's ops live in cpu_backend.c (memory, copies, the vtable), cpu_ops.c (elementwise,
 * norms, softmax, rope, embedding, argmax), cpu_matmul.c, cpu_quant.c (block-quantized rows and
 * their matmul) and cpu_attention.c. */
#ifndef MSH_CPU_INTERNAL_H
#define MSH_CPU_INTERNAL_H

#include "internal.h"

#include <math.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MSH_CPU_AVX2 1
#else
#define MSH_CPU_AVX2 0
#endif

#define MSH_CPU_INLINE static inline __attribute__((always_inline))

/* ------------------------------------------------------------------------------ threads */

/* Threads to use for `work` units when each thread should get at least `grain` of them, so that
 * small work runs on the calling thread and pays no fork/join. Never more than msh_get_num_threads. */
static inline int msh_cpu_threads(int64_t work, int64_t grain) {
  int nt = msh_get_num_threads();
  if (nt <= 1 || work < 2 * grain) return 1;
  int64_t most = work / grain;
  return most < nt ? (int)most : nt;
}

/* Thread i of nt gets items [*lo, *hi) of n, cut at multiples of align. */
static inline void msh_cpu_split(int64_t n, int i, int nt, int64_t align, int64_t *lo, int64_t *hi) {
  int64_t chunks = (n + align - 1) / align;
  int64_t c0 = chunks * i / nt, c1 = chunks * (i + 1) / nt;
  *lo = c0 * align < n ? c0 * align : n;
  *hi = c1 * align < n ? c1 * align : n;
}

/* A per-thread f32 buffer of at least n floats (64-byte aligned), kept across calls and grown as
 * needed; slot 0 or 1 lets one op hold two. NULL when out of memory: a worker thread must not call
 * MSH_FAIL (the message is thread-local), it reports back to the calling thread instead. */
float *msh_cpu_scratch(int slot, size_t n);

/* OpenBLAS runs single-threaded inside our own threads; called before any cblas call. */
void msh_cpu_blas_init(void);

/* ----------------------------------------------------------------------- scalar dtypes */

static inline float msh_cpu_bf16_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* f32 -> bf16, round to nearest even, NaN kept quiet (the same bits as msh_f32_to_bf16). */
static inline uint16_t msh_cpu_f32_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  uint32_t quiet = (u >> 16) | 0x40u;
  return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);
}

MSH_CPU_INLINE float msh_cpu_load(const void *p, int64_t i, int dt) {
  if (dt == MSH_F32) return ((const float *)p)[i];
  if (dt == MSH_F16) return msh_f16_to_f32(((const uint16_t *)p)[i]);
  return msh_cpu_bf16_f32(((const uint16_t *)p)[i]);
}

/* Converts n contiguous values between float dtypes (dst and src must not overlap). */
void msh_cpu_convert(void *dst, int ddt, const void *src, int sdt, int64_t n);

/* Block-quantized rows (cpu_quant.c): n (a multiple of 32) consecutive elements of dtype dt,
 * that is n / 32 blocks, to f32 and from f32 (ggml's rounding rules). */
void msh_cpu_dequant_row(float *dst, const void *src, int dt, int64_t n);
void msh_cpu_quant_row(void *dst, int dt, const float *src, int64_t n);

/* dst (n) f32 = src (n) of a float dtype, or n / 32 blocks of a block-quantized one. */
static inline void msh_cpu_row_f32(float *dst, const void *src, int dt, int64_t n) {
  if (dt == MSH_F32) memcpy(dst, src, sizeof(float) * (size_t)n);
  else if (msh_dtype_is_block(dt)) msh_cpu_dequant_row(dst, src, dt, n);
  else msh_cpu_convert(dst, MSH_F32, src, dt, n);
}

/* ------------------------------------------------------------------------ vector helpers */

#if MSH_CPU_AVX2
/* 8 consecutive values of a float dtype at p[i], widened to f32. dt is a constant at every call
 * site, so the branches fold away. */
MSH_CPU_INLINE __m256 msh_cpu_load8(const void *p, int64_t i, int dt) {
  if (dt == MSH_F32) return _mm256_loadu_ps((const float *)p + i);
  __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
  if (dt == MSH_F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

MSH_CPU_INLINE float msh_cpu_hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

/* {sum(a), sum(b), sum(c), sum(d)} */
MSH_CPU_INLINE __m128 msh_cpu_hsum4x8(__m256 a, __m256 b, __m256 c, __m256 d) {
  __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

MSH_CPU_INLINE float msh_cpu_hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

/* exp(x) for 8 lanes: x = n ln2 + r with |r| <= ln2/2, a degree-6 polynomial for exp(r) (Cephes
 * coefficients, about 1 ulp), then 2^n applied in two halves so that results from 2^-149 (gradual
 * underflow) to FLT_MAX come out right; x > 88.72 gives +inf, x < -103.97 gives 0, NaN stays NaN. */
MSH_CPU_INLINE __m256 msh_cpu_exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.72283935546875f), lo = _mm256_set1_ps(-103.972084045410f);
  __m256 big = _mm256_cmp_ps(x, hi, _CMP_GT_OQ), tiny = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi); /* NaN -> lo, repaired below */
  __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i ni = _mm256_cvtps_epi32(n);          /* in [-150, 128] */
  __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
  y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), big);
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), tiny);
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

/* exp(x) for x <= 0 (or NaN), the case of softmax: the same polynomial with fewer range checks;
 * results below FLT_MIN (x < -87.34) flush to 0. */
MSH_CPU_INLINE __m256 msh_cpu_exp8_nonpos(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3365447505531f);
  __m256 tiny = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  __m256 xc = _mm256_max_ps(lo, x); /* a NaN x comes through (maxps returns its second operand) */
  __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); /* in [-126, 0] */
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}
#endif

/* exp(x) through the vector path when there is one, so scalar tails round like vector bodies. */
static inline float msh_cpu_expf(float x) {
#if MSH_CPU_AVX2
  return _mm256_cvtss_f32(msh_cpu_exp8(_mm256_set1_ps(x)));
#else
  return expf(x);
#endif
}

/* y[i] = exp(x[i] - shift) for shift >= every x[i] (softmax: shift is the max); returns the sum of
 * the y[i]. Values below FLT_MIN flush to 0. y may be NULL (sum only) or alias x. */
float msh_cpu_exp_sum(float *y, const float *x, int64_t n, float shift);
/* Largest value of x[0 .. n) (NaNs ignored; -inf for none). */
float msh_cpu_max(const float *x, int64_t n);

/* ----------------------------------------------------------------------- backend entries */

msh_status msh_cpu_copy(msh_tensor *dst, const msh_tensor *src);
msh_status msh_cpu_embedding(msh_tensor *out, const msh_tensor *table, const msh_tensor *ids);
msh_status msh_cpu_rmsnorm(msh_tensor *out, const msh_tensor *x, const msh_tensor *w, float eps);
msh_status msh_cpu_matmul(msh_tensor *out, const msh_tensor *x, const msh_tensor *w);
/* matmul with block-quantized w and few rows of x (cpu_quant.c): x quantized to 8 bits, integer
 * dot products. */
msh_status msh_cpu_matmul_quant(msh_tensor *out, const msh_tensor *x, const msh_tensor *w);
msh_status msh_cpu_rope(msh_tensor *x, const msh_tensor *pos, const msh_tensor *inv_freq, int style);
/* Rotates rows t0 .. t1 of x (T, H, hd) by positions pos[t] (msh_op_rope's arithmetic). */
void msh_cpu_rope_rows(float *x, const int32_t *pos, const float *inv_freq, int64_t H, int64_t hd, int64_t R,
                       int style, int64_t t0, int64_t t1);
/* The fused ops (cpu_fused.c). */
msh_status msh_cpu_matmul_acc(msh_tensor *out, const msh_tensor *x, const msh_tensor *w);
msh_status msh_cpu_matmul_glu(msh_tensor *out, const msh_tensor *x, const msh_tensor *w, msh_tensor *scratch);
msh_status msh_cpu_qkv_rope(msh_tensor *q_out, msh_tensor *k_cache, msh_tensor *v_cache, const msh_tensor *qkv,
                            const msh_tensor *pos, const msh_tensor *inv_freq, int style);
msh_status msh_cpu_attention(msh_tensor *out, const msh_tensor *q, const msh_tensor *k,
                             const msh_tensor *v, int64_t pos0, float scale);
msh_status msh_cpu_paged_attention(msh_tensor *out, const msh_tensor *q, const msh_tensor *k_pool,
                                   const msh_tensor *v_pool, const msh_tensor *q_start, const msh_tensor *ctx_len,
                                   const msh_tensor *block_table, int64_t max_ctx, float scale);
msh_status msh_cpu_kv_write(msh_tensor *k_pool, msh_tensor *v_pool, const msh_tensor *k, const msh_tensor *v,
                            const msh_tensor *slots);
msh_status msh_cpu_attention_dyn(msh_tensor *out, const msh_tensor *q, const msh_tensor *k, const msh_tensor *v,
                                 const msh_tensor *pos0, int64_t max_len, float scale);
msh_status msh_cpu_silu_mul(msh_tensor *out, const msh_tensor *gate, const msh_tensor *up);
msh_status msh_cpu_add(msh_tensor *out, const msh_tensor *a, const msh_tensor *b);
msh_status msh_cpu_add_bias(msh_tensor *out, const msh_tensor *b);
msh_status msh_cpu_scale(msh_tensor *out, const msh_tensor *x, float s);
msh_status msh_cpu_softmax(msh_tensor *out, const msh_tensor *x, int log);
msh_status msh_cpu_argmax(const msh_tensor *x, int32_t *out);

#endif
