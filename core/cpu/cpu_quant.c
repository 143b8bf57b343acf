/* cpu_quant.c: block-quantized weights on the CPU: rows to and from f32, and the matmul of few
 * rows of x against Q8_0 / Q4_0 / Q4_1 weights kept as they come from the file.
 *
 * Blocks (ggml's layouts, 32 elements along a row; d and m are f16):
 *   Q8_0  34 bytes: d, q[32] i8               value d * q
 *   Q4_0  18 bytes: d, 16 bytes of nibbles    value d * (q - 8)   low nibbles: elements 0..15,
 *   Q4_1  20 bytes: d, m, 16 bytes of nibbles value d * q + m     high nibbles: 16..31
 *
 * matmul, M < 64 (decode, short prompts), the way llama.cpp does it: each row of x is quantized
 * once per call to 8-bit blocks (dx = amax / 127, qx = x / dx rounded to nearest even, and the
 * block sum sx = dx * sum(qx)), so that a weight block meets an x block in one integer dot:
 *   Q8_0: dw * dx * sum(qw * qx)
 *   Q4_0: dw * dx * sum(q * qx) - 8 dw * sx          (q the unsigned nibble)
 *   Q4_1: dw * dx * sum(q * qx) + m * sx
 * The integer sums are exact (AVX2: maddubs of unsigned by signed bytes into i16 pairs, at most
 * 2 * 255 * 127 in magnitude, then madd into i32); only the f32 scaling and the sum over blocks
 * round. Threads claim chunks of weight rows.
 *   M == 1: four weight rows at a time (x's block loaded once for the four), the weights
 *     prefetched a few KB ahead: decode streams every weight from memory once per token.
 *   M > 1: blocks of weight rows that stay in L1 while groups of four x rows pass over them; per
 *     weight block the four rows' integer sums fold into one vector, scaled once.
 * (M >= 64 goes through cpu_matmul.c: weights dequantized block by block, then sgemm.) */
#include "cpu_internal.h"

#include <omp.h>

enum {
  GRAIN_MACS = 1 << 16, /* multiply-adds per thread below which we stay on one thread */
  L1_BYTES = 16 * 1024, /* weight bytes per block of rows for M > 1 */
  PF_BYTES = 4096       /* M == 1: how far ahead of the rows being read to prefetch (measured:
                           2-8 KB all draw 17-19 GB/s from one core, none 7-12) */
};

static inline int64_t block_bytes(int dt) { return msh_dt_block_bytes(dt); }

static inline float half_at(const uint8_t *p) {
  uint16_t h;
  memcpy(&h, p, 2);
#if MSH_CPU_AVX2
  return _cvtsh_ss(h);
#else
  return msh_f16_to_f32(h);
#endif
}

static inline void put_half(uint8_t *p, float f) {
  uint16_t h = msh_f32_to_f16(f);
  memcpy(p, &h, 2);
}

/* -------------------------------------------------------------------------- dequantize */

static void dequant_q8_0(float *dst, const uint8_t *b, int64_t nb) {
  for (int64_t i = 0; i < nb; i++, b += 34, dst += MSH_QK) {
    float d = half_at(b);
#if MSH_CPU_AVX2
    __m256 vd = _mm256_set1_ps(d);
    for (int k = 0; k < 4; k++) {
      __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b + 2 + 8 * k)));
      _mm256_storeu_ps(dst + 8 * k, _mm256_mul_ps(_mm256_cvtepi32_ps(q), vd));
    }
#else
    for (int j = 0; j < MSH_QK; j++) dst[j] = d * (float)(int8_t)b[2 + j];
#endif
  }
}

/* Q4_0 (has_min 0) and Q4_1 (has_min 1). */
static void dequant_q4(float *dst, const uint8_t *b, int64_t nb, int has_min) {
  int64_t bb = has_min ? 20 : 18;
  for (int64_t i = 0; i < nb; i++, b += bb, dst += MSH_QK) {
    float d = half_at(b), m = has_min ? half_at(b + 2) : -8.0f * d;
    const uint8_t *q = b + (has_min ? 4 : 2);
#if MSH_CPU_AVX2
    const __m128i low = _mm_set1_epi8(0x0f);
    __m128i raw = _mm_loadu_si128((const __m128i *)q);
    __m128i lo = _mm_and_si128(raw, low), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
    __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m);
    __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int k = 0; k < 4; k++) {
      __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[k]));
      _mm256_storeu_ps(dst + 8 * k, has_min ? _mm256_fmadd_ps(v, vd, vm) : _mm256_mul_ps(_mm256_sub_ps(v, _mm256_set1_ps(8.0f)), vd));
    }
#else
    for (int j = 0; j < 16; j++) {
      int q0 = q[j] & 0x0f, q1 = q[j] >> 4;
      dst[j] = has_min ? d * (float)q0 + m : d * (float)(q0 - 8);
      dst[j + 16] = has_min ? d * (float)q1 + m : d * (float)(q1 - 8);
    }
#endif
  }
}

/* I8G: f32 d, G x i8. */
static void dequant_i8g(float *dst, const uint8_t *b, int64_t nb, int G) {
  for (int64_t i = 0; i < nb; i++, b += 4 + G, dst += G) {
    float d;
    memcpy(&d, b, 4);
#if MSH_CPU_AVX2
    __m256 vd = _mm256_set1_ps(d);
    for (int k = 0; k < G; k += 8) {
      __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b + 4 + k)));
      _mm256_storeu_ps(dst + k, _mm256_mul_ps(_mm256_cvtepi32_ps(q), vd));
    }
#else
    for (int j = 0; j < G; j++) dst[j] = d * (float)(int8_t)b[4 + j];
#endif
  }
}

/* I4G: f16 d, f16 m, G / 2 bytes; byte j: element j (low nibble), j + G / 2 (high). */
static void dequant_i4g(float *dst, const uint8_t *b, int64_t nb, int G) {
  int H = G / 2;
  for (int64_t i = 0; i < nb; i++, b += 4 + H, dst += G) {
    float d = half_at(b), m = half_at(b + 2);
    const uint8_t *q = b + 4;
#if MSH_CPU_AVX2
    const __m128i low = _mm_set1_epi8(0x0f);
    __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m);
    for (int k = 0; k < H; k += 16) {
      __m128i raw = _mm_loadu_si128((const __m128i *)(q + k));
      __m128i lo = _mm_and_si128(raw, low), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
      __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
      float *at[4] = {dst + k, dst + k + 8, dst + H + k, dst + H + k + 8};
      for (int p = 0; p < 4; p++)
        _mm256_storeu_ps(at[p], _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[p])), vd, vm));
    }
#else
    for (int j = 0; j < H; j++) {
      dst[j] = d * (float)(q[j] & 0x0f) + m;
      dst[j + H] = d * (float)(q[j] >> 4) + m;
    }
#endif
  }
}

void msh_cpu_dequant_row(float *dst, const void *src, int dt, int64_t n) {
  int64_t G = msh_dt_block_elems(dt), nb = n / G;
  if (dt == MSH_Q8_0) dequant_q8_0(dst, src, nb);
  else if (dt == MSH_Q4_0 || dt == MSH_Q4_1) dequant_q4(dst, src, nb, dt == MSH_Q4_1);
  else if (msh_dtype_is_i4g(dt)) dequant_i4g(dst, src, nb, (int)G);
  else dequant_i8g(dst, src, nb, (int)G);
}

/* ---------------------------------------------------------------------------- quantize */

/* Weights from f32, rounding to nearest (even) as the activations below, with ggml's scales:
 * Q8_0 d = amax / 127; Q4_0 d = -(the value of largest magnitude) / 8, so that it maps to q = 0;
 * Q4_1 d = (max - min) / 15, m = min. Values are clamped into the nibble range. */
/* I8G: d = amax / 127, q = x / d rounded to nearest even (symmetric). */
static void quant_i8g(uint8_t *b, const float *src, int64_t nb, int G) {
  for (int64_t i = 0; i < nb; i++, b += 4 + G, src += G) {
    float amax = 0;
    for (int j = 0; j < G; j++) amax = fabsf(src[j]) > amax ? fabsf(src[j]) : amax;
    float d = amax / 127.0f, id = d != 0 ? 1.0f / d : 0.0f;
    memcpy(b, &d, 4);
    for (int j = 0; j < G; j++) {
      float q = nearbyintf(src[j] * id);
      b[4 + j] = (uint8_t)(int8_t)(q < -127 ? -127 : q > 127 ? 127 : q);
    }
  }
}

/* I4G: asymmetric, value d q + m with q in 0..15. d and m are rounded to f16 before the nibbles
 * are chosen against them, so that the error measured is the one the reader sees. */
static inline float h16(float f) {
#if MSH_CPU_AVX2
  return _cvtsh_ss(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT)); /* an f16 value: put_half stores it exactly */
#else
  return msh_f16_to_f32(msh_f32_to_f16(f));
#endif
}

/* The nibble nearest to (x - m) * id: clamped into [0, 15] first (NaN to 0), then rounded to
 * nearest, ties to even, by adding and taking away 1.5 * 2^23 (what nearbyintf gives there,
 * without SSE4.1's round instruction). */
#define NIB_MAGIC 12582912.0f
static inline float nibble(float x, float m, float id) {
  float v = (x - m) * id;
  v = v > 0 ? v : 0;
  v = v < 15 ? v : 15;
  return (v + NIB_MAGIC) - NIB_MAGIC;
}

#if MSH_CPU_AVX2
MSH_CPU_INLINE __m256 nibble8(__m256 x, __m256 m, __m256 id) {
  __m256 v = _mm256_mul_ps(_mm256_sub_ps(x, m), id);
  v = _mm256_min_ps(_mm256_max_ps(v, _mm256_setzero_ps()), _mm256_set1_ps(15)); /* NaN -> 0 */
  return _mm256_sub_ps(_mm256_add_ps(v, _mm256_set1_ps(NIB_MAGIC)), _mm256_set1_ps(NIB_MAGIC));
}
#endif

/* The squared error of x (G values, a multiple of 32) on the grid d q + m, each value at its
 * nearest nibble. */
static float i4g_err(const float *x, int G, float d, float m) {
  float id = d != 0 ? 1.0f / d : 0.0f;
#if MSH_CPU_AVX2
  __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m), vid = _mm256_set1_ps(id), acc = _mm256_setzero_ps();
  for (int j = 0; j < G; j += 8) {
    __m256 xv = _mm256_loadu_ps(x + j);
    __m256 r = _mm256_sub_ps(_mm256_fmadd_ps(vd, nibble8(xv, vm, vid), vm), xv);
    acc = _mm256_fmadd_ps(r, r, acc);
  }
  return msh_cpu_hsum8(acc);
#else
  float e = 0;
  for (int j = 0; j < G; j++) {
    float r = d * nibble(x[j], m, id) + m - x[j];
    e += r * r;
  }
  return e;
#endif
}

/* Least squares d and m for x on the nibbles of scale iscale from lo: false when degenerate. */
static int i4g_refit(const float *x, int G, float lo, float iscale, float *d, float *m) {
  double L, L2, X, XL;
#if MSH_CPU_AVX2
  __m256 vlo = _mm256_set1_ps(lo), vis = _mm256_set1_ps(iscale);
  __m256 sl = _mm256_setzero_ps(), sl2 = sl, sx = sl, sxl = sl;
  for (int j = 0; j < G; j += 8) {
    __m256 xv = _mm256_loadu_ps(x + j), l = nibble8(xv, vlo, vis);
    sl = _mm256_add_ps(sl, l), sl2 = _mm256_fmadd_ps(l, l, sl2);
    sx = _mm256_add_ps(sx, xv), sxl = _mm256_fmadd_ps(xv, l, sxl);
  }
  float s4[4];
  _mm_storeu_ps(s4, msh_cpu_hsum4x8(sl, sl2, sx, sxl));
  L = s4[0], L2 = s4[1], X = s4[2], XL = s4[3];
#else
  float sl = 0, sl2 = 0, sx = 0, sxl = 0;
  for (int j = 0; j < G; j++) {
    float l = nibble(x[j], lo, iscale);
    sl += l, sl2 += l * l, sx += x[j], sxl += x[j] * l;
  }
  L = sl, L2 = sl2, X = sx, XL = sxl;
#endif
  double den = G * L2 - L * L;
  if (!(den > 0)) return 0;
  *d = h16((float)((G * XL - L * X) / den));
  *m = h16((float)((L2 * X - L * XL) / den));
  return *d > 0;
}

/* d and m of a group: the min/max grid (Q4_1's: m = min, d = (max - min) / 15), kept unless a
 * grid of the search has a smaller squared error. The search (as ggml's make_qkx2_quants for
 * Q4_K) tries 17 scales 1 / d from (15 - 2) / (max - min) to (15 + 2) / (max - min), rounds the
 * values on each and refits d and m to those nibbles by least squares: clipping a few extreme
 * values can lower the error of all the others. A grid the values already lie on (a Q4_1 block
 * converted to i4g32) has error 0 at the start and is kept exactly. On SmolLM2-135M's weights
 * (i4g64, wikitext-2, 4,096 tokens) perplexity 35.02 -> 30.35, f32 25.14. */
static void i4g_scale(const float *x, int G, float *d_out, float *m_out) {
  enum { NSTEP = 8 };
  float lo = x[0], hi = x[0];
  for (int j = 1; j < G; j++) lo = x[j] < lo ? x[j] : lo, hi = x[j] > hi ? x[j] : hi;
  float bd = h16((hi - lo) / 15.0f), bm = h16(lo);
  float best = i4g_err(x, G, bd, bm);
  for (int is = -NSTEP; is <= NSTEP && best > 0; is++) {
    float d, m;
    if (!i4g_refit(x, G, lo, (15.0f + 0.25f * (float)is) / (hi - lo), &d, &m)) continue;
    float e = i4g_err(x, G, d, m);
    if (e < best) best = e, bd = d, bm = m;
  }
  *d_out = bd, *m_out = bm;
}

static void quant_i4g(uint8_t *b, const float *src, int64_t nb, int G) {
  int H = G / 2;
  for (int64_t i = 0; i < nb; i++, b += 4 + H, src += G) {
    float d, m;
    i4g_scale(src, G, &d, &m);
    put_half(b, d);
    put_half(b + 2, m);
    float id = d != 0 ? 1.0f / d : 0.0f;
    for (int j = 0; j < H; j++) b[4 + j] = (uint8_t)((int)nibble(src[j], m, id) | (int)nibble(src[j + H], m, id) << 4);
  }
}

void msh_cpu_quant_row(void *dst, int dt, const float *src, int64_t n) {
  uint8_t *b = dst;
  if (msh_dtype_is_group(dt)) {
    int64_t G = msh_dt_block_elems(dt);
    if (msh_dtype_is_i4g(dt)) quant_i4g(b, src, n / G, (int)G);
    else quant_i8g(b, src, n / G, (int)G);
    return;
  }
  int64_t bb = block_bytes(dt);
  for (int64_t i = 0; i < n / MSH_QK; i++, b += bb, src += MSH_QK) {
    float amax = 0, vmax = 0, lo = src[0], hi = src[0];
    for (int j = 0; j < MSH_QK; j++) {
      float v = src[j], a = fabsf(v);
      if (a > amax) amax = a, vmax = v;
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
    }
    if (dt == MSH_Q8_0) {
      float d = amax / 127.0f, id = d != 0 ? 1.0f / d : 0.0f;
      put_half(b, d);
      for (int j = 0; j < MSH_QK; j++) b[2 + j] = (uint8_t)(int8_t)nearbyintf(src[j] * id);
      continue;
    }
    float d = dt == MSH_Q4_0 ? vmax / -8.0f : (hi - lo) / 15.0f, id = d != 0 ? 1.0f / d : 0.0f;
    float base = dt == MSH_Q4_0 ? 0.0f : lo, shift = dt == MSH_Q4_0 ? 8.0f : 0.0f;
    put_half(b, d);
    if (dt == MSH_Q4_1) put_half(b + 2, lo);
    uint8_t *q = b + (dt == MSH_Q4_1 ? 4 : 2);
    for (int j = 0; j < 16; j++) {
      float f0 = nearbyintf((src[j] - base) * id) + shift, f1 = nearbyintf((src[j + 16] - base) * id) + shift;
      int q0 = f0 < 0 ? 0 : f0 > 15 ? 15 : (int)f0, q1 = f1 < 0 ? 0 : f1 > 15 ? 15 : (int)f1;
      q[j] = (uint8_t)(q0 | q1 << 4);
    }
  }
}

/* ------------------------------------------------------------------ activations to 8 bits */

/* One row of x (K f32, K a multiple of 32) to qs (K i8) and per block a pair ds: the scale d and
 * the sum s = d * sum(q): d = amax / 127, q = x * (1 / d) rounded to nearest even (0 for a zero block). The
 * AVX2 and portable paths give the same bits. */
static void quant_x_row(int8_t *qs, float *ds, const float *x, int64_t K) {
  for (int64_t b = 0; b < K / MSH_QK; b++, x += MSH_QK, qs += MSH_QK) {
#if MSH_CPU_AVX2
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8), v2 = _mm256_loadu_ps(x + 16),
           v3 = _mm256_loadu_ps(x + 24);
    __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                             _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    float amax = msh_cpu_hmax8(m);
    float db = amax / 127.0f, id = db != 0 ? 1.0f / db : 0.0f;
    __m256 vid = _mm256_set1_ps(id);
    __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, vid)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, vid));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, vid)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, vid));
    __m256i t = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
    __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
    t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4e));
    t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xb1));
    int sum = _mm_cvtsi128_si32(t4);
    /* i32 -> i8 packs interleave the 128-bit lanes: the permute puts elements back in order */
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)qs, p);
#else
    float amax = 0;
    for (int j = 0; j < MSH_QK; j++) amax = fabsf(x[j]) > amax ? fabsf(x[j]) : amax;
    float db = amax / 127.0f, id = db != 0 ? 1.0f / db : 0.0f;
    int sum = 0;
    for (int j = 0; j < MSH_QK; j++) {
      int q = (int)nearbyintf(x[j] * id);
      qs[j] = (int8_t)q;
      sum += q;
    }
#endif
    ds[2 * b] = db;
    ds[2 * b + 1] = db * (float)sum;
  }
}

/* ------------------------------------------------------------------------- dot kernels */

/* A quantized x: row r at base + r * row bytes: qs (K i8), then (d, s) pairs (K / 32 of them). For
 * M > 1 also, per group of four rows (the last one padded with zero scales), the scales
 * transposed: d4[(g * nb + b) * 4 + c] = d of row 4g + c at block b, and s4 likewise. */
typedef struct {
  const uint8_t *base;
  int64_t row, K, M;
  const float *d4, *s4;
} qx_rows;

static inline const int8_t *qx_qs(const qx_rows *x, int64_t r) { return (const int8_t *)(x->base + r * x->row); }
/* Row r's scales, a pair a block: d at 2b, s at 2b + 1. */
static inline const float *qx_ds(const qx_rows *x, int64_t r) { return (const float *)(x->base + r * x->row + x->K); }

#if MSH_CPU_AVX2
/* The integer products of one weight block with one x block (32 i8), as 8 i32 partial sums:
 * maddubs multiplies unsigned by signed bytes and adds pairs into i16 (at most 2 * 255 * 127 in
 * magnitude here, no saturation), madd adds pairs of those into i32. Q8_0's signed weights give
 * their sign to x first, so that |w| can be the unsigned side. */
MSH_CPU_INLINE __m256i block_isum(const uint8_t *blk, __m256i xv, int dt) {
  const __m256i ones = _mm256_set1_epi16(1);
  if (dt == MSH_Q8_0) {
    __m256i wv = _mm256_loadu_si256((const __m256i *)(blk + 2));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv)), ones);
  }
  __m128i raw = _mm_loadu_si128((const __m128i *)(blk + (dt == MSH_Q4_1 ? 4 : 2)));
  __m256i wv = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0f));
  return _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), ones);
}
#endif

/* res[c] = dot(weight row w, x row m0 + c) for RX rows of x, block by block: each weight block is
 * unpacked once for all RX rows. RX and dt are constants at every call site, so the loops unroll
 * and the accumulators live in registers. Blocks [b0, nb) only (the tail of qdot_row). */
MSH_CPU_INLINE void qdot(float *res, const uint8_t *w, const qx_rows *x, int64_t m0, int RX, int dt, int64_t b0) {
  enum { MAXX = 4 };
  const int64_t nb = x->K / MSH_QK, bb = block_bytes(dt);
  const int8_t *xq[MAXX];
  const float *xds[MAXX];
  float mins[MAXX];
  for (int c = 0; c < RX; c++) xq[c] = qx_qs(x, m0 + c), xds[c] = qx_ds(x, m0 + c);
  for (int c = 0; c < RX; c++) mins[c] = 0;
#if MSH_CPU_AVX2
  __m256 acc[MAXX];
  for (int c = 0; c < RX; c++) acc[c] = _mm256_setzero_ps();
  for (int64_t b = b0; b < nb; b++) {
    const uint8_t *blk = w + b * bb;
    float dw = half_at(blk), cw = dt == MSH_Q4_1 ? half_at(blk + 2) : -8.0f * dw;
    for (int c = 0; c < RX; c++) {
      __m256i p = block_isum(blk, _mm256_loadu_si256((const __m256i *)(xq[c] + b * MSH_QK)), dt);
      acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * xds[c][2 * b]), acc[c]);
      if (dt != MSH_Q8_0) mins[c] += cw * xds[c][2 * b + 1];
    }
  }
  for (int c = 0; c < RX; c++) res[c] = msh_cpu_hsum8(acc[c]) + mins[c];
#else
  float acc[MAXX];
  for (int c = 0; c < RX; c++) acc[c] = 0;
  for (int64_t b = b0; b < nb; b++) {
    const uint8_t *blk = w + b * bb;
    float dw = half_at(blk), cw = dt == MSH_Q4_1 ? half_at(blk + 2) : -8.0f * dw;
    const uint8_t *q = blk + (dt == MSH_Q4_1 ? 4 : 2);
    for (int c = 0; c < RX; c++) {
      const int8_t *xb = xq[c] + b * MSH_QK;
      int32_t sum = 0;
      if (dt == MSH_Q8_0) {
        for (int j = 0; j < MSH_QK; j++) sum += (int8_t)q[j] * xb[j];
      } else {
        for (int j = 0; j < 16; j++) sum += (q[j] & 0x0f) * xb[j] + (q[j] >> 4) * xb[j + 16];
        mins[c] += cw * xds[c][2 * b + 1];
      }
      acc[c] += (float)sum * (dw * xds[c][2 * b]);
    }
  }
  for (int c = 0; c < RX; c++) res[c] = acc[c] + mins[c];
#endif
}

#if MSH_CPU_AVX2
/* res[c] = dot(weight row w, x row m0 + c), c < 4, m0 a multiple of 4 (rows past M compute on
 * row m0 with zero scales). Per block the weights are unpacked once; the four x rows' integer
 * sums are folded into one vector (lane c and c + 4: halves of row c's sum) and scaled by one
 * vector of dw * dx, so the float work per block does not grow with the rows. */
MSH_CPU_INLINE void qdot4(float *res, const uint8_t *w, const qx_rows *x, int64_t m0, int dt) {
  const int64_t nb = x->K / MSH_QK, bb = block_bytes(dt);
  const int8_t *xq[4];
  for (int c = 0; c < 4; c++) xq[c] = qx_qs(x, m0 + c < x->M ? m0 + c : m0);
  const float *d4 = x->d4 + m0 * nb, *s4 = x->s4 + m0 * nb; /* group m0 / 4: nb * 4 floats each */
  const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0f);
  __m256 acc = _mm256_setzero_ps();
  __m128 accm = _mm_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t *blk = w + b * bb;
    __m256i p[4];
    if (dt == MSH_Q8_0) {
      __m256i wv = _mm256_loadu_si256((const __m256i *)(blk + 2)), aw = _mm256_sign_epi8(wv, wv);
      for (int c = 0; c < 4; c++) {
        __m256i xv = _mm256_loadu_si256((const __m256i *)(xq[c] + b * MSH_QK));
        p[c] = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv)), ones);
      }
    } else {
      __m128i raw = _mm_loadu_si128((const __m128i *)(blk + (dt == MSH_Q4_1 ? 4 : 2)));
      __m256i wv = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low);
      for (int c = 0; c < 4; c++) {
        __m256i xv = _mm256_loadu_si256((const __m256i *)(xq[c] + b * MSH_QK));
        p[c] = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), ones);
      }
    }
    __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
    float dw = half_at(blk);
    __m256 sc = _mm256_mul_ps(_mm256_set1_ps(dw), _mm256_broadcast_ps((const __m128 *)(d4 + 4 * b)));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), sc, acc);
    if (dt == MSH_Q4_1) accm = _mm_fmadd_ps(_mm_set1_ps(half_at(blk + 2)), _mm_loadu_ps(s4 + 4 * b), accm);
    else if (dt == MSH_Q4_0) accm = _mm_fmadd_ps(_mm_set1_ps(-8.0f * dw), _mm_loadu_ps(s4 + 4 * b), accm);
  }
  __m128 r = _mm_add_ps(_mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1)), accm);
  _mm_storeu_ps(res, r);
}
#endif

/* res[i] = dot(weight row i, x row 0) for RW weight rows wrow bytes apart (M == 1): x's block is
 * loaded once for all RW rows. A weight block's f16 d (and Q4_1's m beside it) widen with one
 * conversion and meet x's (d, s) pair in one multiply: (dw * dx, m * sx). */
MSH_CPU_INLINE void qdot_rows(float *res, const uint8_t *w, int64_t wrow, const qx_rows *x, int RW, int dt) {
#if MSH_CPU_AVX2
  enum { MAXW = 4 };
  const int64_t nb = x->K / MSH_QK, bb = block_bytes(dt);
  const int8_t *xq = qx_qs(x, 0);
  const float *xds = qx_ds(x, 0);
  __m256 acc[MAXW];
  __m128 mins[MAXW]; /* lane 1: sum of m * sx (Q4_1), or of dw * sx (Q4_0, times -8 at the end) */
  for (int i = 0; i < RW; i++) acc[i] = _mm256_setzero_ps(), mins[i] = _mm_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + b * MSH_QK));
    __m128 xp = _mm_castpd_ps(_mm_load_sd((const double *)(xds + 2 * b))); /* (dx, sx, 0, 0) */
    for (int i = 0; i < RW; i++) {
      const uint8_t *blk = w + i * wrow + b * bb;
      __m256 p = _mm256_cvtepi32_ps(block_isum(blk, xv, dt));
      if (dt == MSH_Q8_0) {
        acc[i] = _mm256_fmadd_ps(p, _mm256_set1_ps(half_at(blk) * xds[2 * b]), acc[i]);
        continue;
      }
      int32_t dm;
      memcpy(&dm, blk, 4); /* Q4_1: (d, m); Q4_0: d and two bytes of nibbles */
      __m128 wd = _mm_cvtph_ps(_mm_cvtsi32_si128(dm));
      if (dt == MSH_Q4_0) wd = _mm_moveldup_ps(wd); /* (d, d) */
      __m128 pr = _mm_mul_ps(wd, xp);
      acc[i] = _mm256_fmadd_ps(p, _mm256_broadcastss_ps(pr), acc[i]);
      mins[i] = _mm_add_ps(mins[i], pr);
    }
  }
  float mn[MAXW];
  for (int i = 0; i < RW; i++)
    mn[i] = dt == MSH_Q8_0 ? 0.0f : (dt == MSH_Q4_0 ? -8.0f : 1.0f) * _mm_cvtss_f32(_mm_movehdup_ps(mins[i]));
  if (RW == 4) {
    float r[4];
    _mm_storeu_ps(r, msh_cpu_hsum4x8(acc[0], acc[1], acc[2], acc[3]));
    for (int i = 0; i < 4; i++) res[i] = r[i] + mn[i];
  } else {
    for (int i = 0; i < RW; i++) res[i] = msh_cpu_hsum8(acc[i]) + mn[i];
  }
#else
  for (int i = 0; i < RW; i++) qdot(res + i, w + i * wrow, x, 0, 1, dt, 0);
#endif
}

/* ------------------------------------------------------------------------ one thread's part */

typedef struct {
  float *out;       /* (M, N) */
  qx_rows x;        /* M quantized rows */
  const uint8_t *w; /* (N, K) blocks */
  int64_t M, N, wrow;
  int dt;
  int64_t chunk;    /* weight rows claimed at a time */
  int64_t next;     /* the first row nobody has claimed yet (atomic) */
} qmm_args;

/* Output columns [n0, n1) for weights of dtype dt (a constant after inlining). */
MSH_CPU_INLINE void qpart(const qmm_args *a, int64_t n0, int64_t n1, int dt) {
  int64_t M = a->M, N = a->N, wrow = a->wrow;
  if (M == 1) {
    /* four rows at a time; the weights stream through in order, prefetched a few KB ahead (the
     * hardware prefetchers alone leave a core at half the bandwidth it can draw) */
    const uint8_t *end = a->w + N * wrow;
    int64_t n = n0;
    for (; n < n1; n += 4) {
      const uint8_t *wn = a->w + n * wrow;
      for (const uint8_t *p = wn + PF_BYTES; p < wn + PF_BYTES + 4 * wrow && p < end; p += 64)
        __builtin_prefetch(p, 0, 3);
      if (n + 4 <= n1) qdot_rows(a->out + n, wn, wrow, &a->x, 4, dt);
      else
        for (; n < n1; n++, wn += wrow) qdot_rows(a->out + n, wn, wrow, &a->x, 1, dt);
    }
    return;
  }
  float r[4] = {0};
  int64_t rows = L1_BYTES / wrow;
  if (rows < 4) rows = 4;
  for (int64_t b0 = n0; b0 < n1; b0 += rows) {
    int64_t b1 = b0 + rows < n1 ? b0 + rows : n1;
    for (int64_t m = 0; m < M; m += 4) {
      int rx = M - m < 4 ? (int)(M - m) : 4;
      for (int64_t n = b0; n < b1; n++) {
        const uint8_t *wn = a->w + n * wrow;
#if MSH_CPU_AVX2
        qdot4(r, wn, &a->x, m, dt);
#else
        switch (rx) {
        case 4: qdot(r, wn, &a->x, m, 4, dt, 0); break;
        case 3: qdot(r, wn, &a->x, m, 3, dt, 0); break;
        case 2: qdot(r, wn, &a->x, m, 2, dt, 0); break;
        default: qdot(r, wn, &a->x, m, 1, dt, 0); break;
        }
#endif
        for (int c = 0; c < rx; c++) a->out[(m + c) * N + n] = r[c];
      }
    }
  }
}

static void qpart_q8_0(const qmm_args *a, int64_t n0, int64_t n1) { qpart(a, n0, n1, MSH_Q8_0); }
static void qpart_q4_0(const qmm_args *a, int64_t n0, int64_t n1) { qpart(a, n0, n1, MSH_Q4_0); }
static void qpart_q4_1(const qmm_args *a, int64_t n0, int64_t n1) { qpart(a, n0, n1, MSH_Q4_1); }

static void run_part(const qmm_args *a, int64_t n0, int64_t n1) {
  if (a->dt == MSH_Q8_0) qpart_q8_0(a, n0, n1);
  else if (a->dt == MSH_Q4_0) qpart_q4_0(a, n0, n1);
  else qpart_q4_1(a, n0, n1);
}

/* Claims chunks of weight rows until none are left (a thread on a busy core takes fewer). */
static void run_chunks(qmm_args *a) {
  for (;;) {
    int64_t n0 = __atomic_fetch_add(&a->next, a->chunk, __ATOMIC_RELAXED);
    if (n0 >= a->N) return;
    run_part(a, n0, n0 + a->chunk < a->N ? n0 + a->chunk : a->N);
  }
}

/* ------------------------------------------------------------------------------- entry */

msh_status msh_cpu_matmul_quant(msh_tensor *out, const msh_tensor *x, const msh_tensor *w) {
  int64_t M = x->shape[0], N = w->shape[0], K = x->shape[1];
  float *o = msh_tensor_ptr(out);
  if (M == 0 || N == 0) return MSH_OK;
  if (K == 0) {
    memset(o, 0, sizeof(float) * (size_t)(M * N));
    return MSH_OK;
  }
  /* x quantized once, into this thread's scratch (slot 1: slot 0 belongs to the workers): the
   * rows, then for M > 1 the transposed scales of each group of four rows */
  int64_t nb = K / MSH_QK, row = K + 2 * nb * (int64_t)sizeof(float), groups = M > 1 ? (M + 3) / 4 : 0;
  size_t floats = (size_t)(M * row / (int64_t)sizeof(float) + 2 * groups * nb * 4);
  uint8_t *xq = (uint8_t *)msh_cpu_scratch(1, floats);
  if (!xq)
    return MSH_FAIL(MSH_ENOMEM, "matmul: out of memory for %lld quantized rows of x (K %lld)", (long long)M,
                    (long long)K);
  const float *xf = msh_tensor_ptr(x);
  for (int64_t m = 0; m < M; m++) {
    uint8_t *r = xq + m * row;
    quant_x_row((int8_t *)r, (float *)(r + K), xf + m * K, K);
  }
  float *d4 = (float *)(xq + M * row), *s4 = d4 + groups * nb * 4;
  for (int64_t g = 0; g < groups; g++)
    for (int64_t b = 0; b < nb; b++)
      for (int64_t c = 0; c < 4; c++) {
        int64_t m = 4 * g + c, at = (g * nb + b) * 4 + c;
        d4[at] = m < M ? ((const float *)(xq + m * row + K))[2 * b] : 0.0f;
        s4[at] = m < M ? ((const float *)(xq + m * row + K))[2 * b + 1] : 0.0f;
      }
  qmm_args a = {o, {xq, row, K, M, d4, s4}, msh_tensor_ptr(w), M, N, msh_dtype_bytes(w->dtype, K), w->dtype, N, 0};
  int nt = msh_cpu_threads(M * N * K, GRAIN_MACS);
  if (nt > N / 32) nt = N >= 64 ? (int)(N / 32) : 1; /* at least 32 rows each */
  if (nt <= 1) {
    run_part(&a, 0, N);
    return MSH_OK;
  }
  int64_t per = 8 * nt, chunk = (N + per - 1) / per;
  a.chunk = (chunk + 15) & ~(int64_t)15;
#pragma omp parallel num_threads(nt)
  run_chunks(&a);
  return MSH_OK;
}
