/* cpu_backend.c: the CPU backend: threads, per-thread scratch, host memory, copies with dtype
 * conversion, and the vtable. The ops live in cpu_ops.c, cpu_matmul.c and cpu_attention.c. */
#include "cpu_internal.h"
#include "randn.h"

#include <cblas.h>
#include <omp.h>
#include <pthread.h>
#include <stdlib.h>

/* ------------------------------------------------------------------------------ threads */

static int num_threads = 0; /* 0: the default (online cores) */
static int num_procs = 0;   /* omp_get_num_procs() asks the kernel each time: ask once */

void msh_set_num_threads(int n) { __atomic_store_n(&num_threads, n > 0 ? n : 0, __ATOMIC_RELAXED); }

int msh_get_num_threads(void) {
  int n = __atomic_load_n(&num_threads, __ATOMIC_RELAXED);
  if (n > 0) return n;
  n = __atomic_load_n(&num_procs, __ATOMIC_RELAXED);
  if (n <= 0) {
    n = omp_get_num_procs();
    if (n < 1) n = 1;
    __atomic_store_n(&num_procs, n, __ATOMIC_RELAXED);
  }
  return n;
}

/* OpenBLAS's own thread pool would fight our OpenMP threads for the cores: matmul splits output
 * columns between our threads instead, and each calls sgemm on one thread. (This is process-wide;
 * nothing else in moonshard calls BLAS.) */
static pthread_once_t blas_once = PTHREAD_ONCE_INIT;
static void blas_single_thread(void) { openblas_set_num_threads(1); }
void msh_cpu_blas_init(void) { pthread_once(&blas_once, blas_single_thread); }

/* ------------------------------------------------------------------------------ scratch */

typedef struct {
  float *p;
  size_t cap; /* floats */
} scratch_buf;

static _Thread_local scratch_buf scratch[2];

/* A thread's buffers go when the thread exits (a key with a destructor: _Thread_local has none). */
static pthread_key_t scratch_key;
static int scratch_key_ok;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void scratch_release(void *bufs) {
  scratch_buf *b = bufs;
  for (int i = 0; i < 2; i++) {
    free(b[i].p);
    b[i].p = NULL;
    b[i].cap = 0;
  }
}

static void scratch_key_new(void) { scratch_key_ok = pthread_key_create(&scratch_key, scratch_release) == 0; }

float *msh_cpu_scratch(int slot, size_t n) {
  scratch_buf *b = &scratch[slot];
  if (n <= b->cap) return b->p;
  if (!scratch[0].p && !scratch[1].p) { /* this thread's first buffer: free it at thread exit */
    pthread_once(&scratch_once, scratch_key_new);
    if (scratch_key_ok) pthread_setspecific(scratch_key, scratch);
  }
  size_t cap = b->cap + b->cap / 2;
  if (cap < n) cap = n;
  cap = (cap + 15) & ~(size_t)15; /* whole 64-byte lines */
  float *p = aligned_alloc(64, cap * sizeof(float));
  if (!p) return NULL;
  free(b->p);
  b->p = p;
  b->cap = cap;
  return p;
}

/* ------------------------------------------------------------------------------- memory */

static msh_status cpu_alloc(int device_index, uint64_t bytes, void **out) {
  (void)device_index;
  /* large buffers on page boundaries: the disk tier reads into them with O_DIRECT, which takes
   * only page-aligned addresses (msh_reader reads other ranges through the page cache) */
  size_t align = bytes >= (1u << 20) ? 4096 : 64;
  size_t n = (size_t)((bytes + align - 1) & ~(uint64_t)(align - 1));
  void *p = aligned_alloc(align, n ? n : 64);
  if (!p) return MSH_FAIL(MSH_ENOMEM, "cannot allocate %llu bytes of host memory", (unsigned long long)bytes);
  memset(p, 0, n);
  *out = p;
  return MSH_OK;
}

static void cpu_release(int device_index, void *p) {
  (void)device_index;
  free(p);
}

static msh_status cpu_bytes(int device_index, void *dst, const void *src, uint64_t bytes) {
  (void)device_index;
  memcpy(dst, src, (size_t)bytes);
  return MSH_OK;
}

/* ---------------------------------------------------------------------- dtype conversion */

static void f16_to_f32(float *d, const uint16_t *s, int64_t n) {
  int64_t i = 0;
#if MSH_CPU_AVX2
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
#endif
  for (; i < n; i++) d[i] = msh_f16_to_f32(s[i]);
}

static void f32_to_f16(uint16_t *d, const float *s, int64_t n) {
  int64_t i = 0;
#if MSH_CPU_AVX2
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(s + i);
    if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q))) { /* NaNs: canonical, as msh_f32_to_f16 */
      for (int j = 0; j < 8; j++) d[i + j] = msh_f32_to_f16(s[i + j]);
      continue;
    }
    _mm_storeu_si128((__m128i *)(d + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#endif
  for (; i < n; i++) d[i] = msh_f32_to_f16(s[i]);
}

static void bf16_to_f32(float *d, const uint16_t *s, int64_t n) {
  for (int64_t i = 0; i < n; i++) d[i] = msh_cpu_bf16_f32(s[i]);
}

static void f32_to_bf16(uint16_t *d, const float *s, int64_t n) {
  for (int64_t i = 0; i < n; i++) d[i] = msh_cpu_f32_bf16(s[i]);
}

void msh_cpu_convert(void *dst, int ddt, const void *src, int sdt, int64_t n) {
  if (ddt == sdt) {
    memcpy(dst, src, (size_t)n * msh_dtype_size(ddt));
  } else if (ddt == MSH_F32) {
    if (sdt == MSH_F16) f16_to_f32(dst, src, n);
    else bf16_to_f32(dst, src, n);
  } else if (sdt == MSH_F32) {
    if (ddt == MSH_F16) f32_to_f16(dst, src, n);
    else f32_to_bf16(dst, src, n);
  } else { /* f16 <-> bf16 through f32 in blocks: f16 -> f32 is exact, so this rounds once */
    float tmp[256];
    for (int64_t i = 0; i < n; i += 256) {
      int64_t m = n - i < 256 ? n - i : 256;
      msh_cpu_convert(tmp, MSH_F32, (const uint16_t *)src + i, sdt, m);
      msh_cpu_convert((uint16_t *)dst + i, ddt, tmp, MSH_F32, m);
    }
  }
}

/* ------------------------------------------------------------------------------- copies */

/* n elements of es bytes, element strides ds and ss. */
static void strided_move(char *d, int64_t ds, const char *s, int64_t ss, size_t es, int64_t n) {
  if (es == 4)
    for (int64_t i = 0; i < n; i++) ((uint32_t *)d)[i * ds] = ((const uint32_t *)s)[i * ss];
  else if (es == 2)
    for (int64_t i = 0; i < n; i++) ((uint16_t *)d)[i * ds] = ((const uint16_t *)s)[i * ss];
  else
    for (int64_t i = 0; i < n; i++) d[i * ds] = s[i * ss];
}

/* One run of n elements with element strides ds, ss (in elements of each side's dtype). */
static void copy_run(char *d, int ddt, int64_t ds, const char *s, int sdt, int64_t ss, int64_t n) {
  size_t des = msh_dtype_size(ddt), ses = msh_dtype_size(sdt);
  if (ds == 1 && ss == 1) {
    msh_cpu_convert(d, ddt, s, sdt, n);
  } else if (ddt == sdt) {
    strided_move(d, ds, s, ss, des, n);
  } else { /* strided and converting: gather, convert, scatter by blocks (no dtype switch per element) */
    enum { B = 256 };
    float sbuf[B], dbuf[B];
    for (int64_t i = 0; i < n; i += B) {
      int64_t m = n - i < B ? n - i : B;
      strided_move((char *)sbuf, 1, s + i * ss * (int64_t)ses, ss, ses, m);
      msh_cpu_convert(dbuf, ddt, sbuf, sdt, m);
      strided_move(d + i * ds * (int64_t)des, ds, (const char *)dbuf, 1, des, m);
    }
  }
}

/* Merges adjacent dims that are laid out as one in both tensors; returns the new ndim. */
static int merge_dims(int nd, int64_t *shape, int64_t *dst, int64_t *src) {
  int m = 0;
  for (int i = 0; i < nd; i++) {
    if (shape[i] == 1) continue; /* a dim of one moves nothing */
    if (m > 0 && dst[m - 1] == dst[i] * shape[i] && src[m - 1] == src[i] * shape[i]) {
      shape[m - 1] *= shape[i];
      dst[m - 1] = dst[i];
      src[m - 1] = src[i];
    } else {
      shape[m] = shape[i];
      dst[m] = dst[i];
      src[m] = src[i];
      m++;
    }
  }
  if (m == 0) { /* a single element */
    shape[0] = 1;
    dst[0] = src[0] = 1;
    m = 1;
  }
  return m;
}

/* Runs [r0, r1) of the outer dims (all but the last), each a copy_run along the last dim. */
static void copy_rows(char *d, int ddt, const char *s, int sdt, int nd, const int64_t *shape,
                      const int64_t *dstr, const int64_t *sstr, int64_t r0, int64_t r1) {
  size_t des = msh_dtype_size(ddt), ses = msh_dtype_size(sdt);
  int64_t idx[MSH_MAX_DIMS] = {0}, rem = r0;
  for (int k = nd - 2; k >= 0; k--) { /* unravel r0 */
    idx[k] = rem % shape[k];
    rem /= shape[k];
  }
  for (int64_t r = r0; r < r1; r++) {
    int64_t so = 0, doff = 0;
    for (int k = 0; k < nd - 1; k++) {
      so += idx[k] * sstr[k];
      doff += idx[k] * dstr[k];
    }
    copy_run(d + doff * (int64_t)des, ddt, dstr[nd - 1], s + so * (int64_t)ses, sdt, sstr[nd - 1], shape[nd - 1]);
    for (int k = nd - 2; k >= 0; k--) {
      if (++idx[k] < shape[k]) break;
      idx[k] = 0;
    }
  }
}

/* Rows [r0, r1) (over all dims but the last) between a block-quantized tensor and a float one (or
 * another block dtype), through an f32 buffer a few blocks at a time: dequantizing when src has
 * blocks, quantizing when dst has them. Both have whole blocks along a unit-stride last dim (tensor.c checks). */
static void block_copy_rows(msh_tensor *dst, const msh_tensor *src, int64_t r0, int64_t r1) {
  enum { B = 8 * MSH_QK };
  float buf[B];
  int nd = src->ndim, ddt = dst->dtype, sdt = src->dtype;
  int64_t K = src->shape[nd - 1], ds = dst->stride[nd - 1], ss = src->stride[nd - 1];
  char *dbase = dst->st->base;
  const char *sbase = src->st->base;
  for (int64_t r = r0; r < r1; r++) {
    int64_t rem = r, doff = dst->offset, soff = src->offset;
    for (int k = nd - 2; k >= 0; k--) {
      int64_t i = rem % src->shape[k];
      rem /= src->shape[k];
      doff += i * dst->stride[k];
      soff += i * src->stride[k];
    }
    for (int64_t k0 = 0; k0 < K; k0 += B) {
      int64_t m = K - k0 < B ? K - k0 : B;
      if (msh_dtype_is_block(sdt)) {
        msh_cpu_dequant_row(buf, sbase + msh_dtype_bytes(sdt, soff + k0), sdt, m);
        if (msh_dtype_is_block(ddt)) /* one block dtype to another: through f32 */
          msh_cpu_quant_row(dbase + msh_dtype_bytes(ddt, doff + k0), ddt, buf, m);
        else
          copy_run(dbase + msh_dtype_bytes(ddt, doff + k0 * ds), ddt, ds, (const char *)buf, MSH_F32, 1, m);
      } else {
        copy_run((char *)buf, MSH_F32, 1, sbase + msh_dtype_bytes(sdt, soff + k0 * ss), sdt, ss, m);
        msh_cpu_quant_row(dbase + msh_dtype_bytes(ddt, doff + k0), ddt, buf, m);
      }
    }
  }
}

msh_status msh_cpu_copy(msh_tensor *dst, const msh_tensor *src) {
  int64_t n = msh_tensor_numel(src);
  if (n == 0) return MSH_OK;
  if (msh_dtype_is_block(dst->dtype) || msh_dtype_is_block(src->dtype)) {
    if (dst->dtype == src->dtype) { /* blocks move as bytes */
      msh_tensor d = msh_tensor_block_bytes(dst), sb = msh_tensor_block_bytes(src);
      return msh_cpu_copy(&d, &sb);
    }
    int64_t rows = n / src->shape[src->ndim - 1];
    int nt = msh_cpu_threads(n, 1 << 16);
    if (nt > rows) nt = (int)rows;
    if (nt <= 1) {
      block_copy_rows(dst, src, 0, rows);
      return MSH_OK;
    }
#pragma omp parallel num_threads(nt)
    {
      int64_t r0, r1;
      msh_cpu_split(rows, omp_get_thread_num(), omp_get_num_threads(), 1, &r0, &r1);
      block_copy_rows(dst, src, r0, r1);
    }
    return MSH_OK;
  }
  char *d = msh_tensor_ptr(dst);
  const char *s = msh_tensor_ptr(src);
  if (dst->dtype == src->dtype && msh_tensor_is_contiguous(dst) && msh_tensor_is_contiguous(src)) {
    memmove(d, s, (size_t)n * msh_dtype_size(src->dtype));
    return MSH_OK;
  }
  int64_t shape[MSH_MAX_DIMS], dstr[MSH_MAX_DIMS], sstr[MSH_MAX_DIMS];
  memcpy(shape, src->shape, sizeof shape);
  memcpy(dstr, dst->stride, sizeof dstr);
  memcpy(sstr, src->stride, sizeof sstr);
  int nd = merge_dims(src->ndim, shape, dstr, sstr);
  int64_t rows = n / shape[nd - 1];
  int nt = msh_cpu_threads(n, 1 << 18);
  if (nd == 1 && nt > 1) { /* one long run: split it */
    int dt = dst->dtype, st = src->dtype;
    int64_t ds = dstr[0] * (int64_t)msh_dtype_size(dt), ss = sstr[0] * (int64_t)msh_dtype_size(st);
#pragma omp parallel num_threads(nt)
    {
      int64_t i0, i1;
      msh_cpu_split(n, omp_get_thread_num(), omp_get_num_threads(), 64, &i0, &i1);
      if (i1 > i0) copy_run(d + i0 * ds, dt, dstr[0], s + i0 * ss, st, sstr[0], i1 - i0);
    }
    return MSH_OK;
  }
  if (nt > rows) nt = (int)rows;
  if (nt <= 1) {
    copy_rows(d, dst->dtype, s, src->dtype, nd, shape, dstr, sstr, 0, rows);
    return MSH_OK;
  }
#pragma omp parallel num_threads(nt)
  {
    int64_t r0, r1;
    msh_cpu_split(rows, omp_get_thread_num(), omp_get_num_threads(), 1, &r0, &r1);
    copy_rows(d, dst->dtype, s, src->dtype, nd, shape, dstr, sstr, r0, r1);
  }
  return MSH_OK;
}

/* ---------------------------------------------------------------- positions in tensors */

/* The ops that take a position from a tensor (for CUDA graphs) read it here and run the host
 * versions, with the position clamped as the device kernels clamp it. */

static int64_t clamp_i64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : x > hi ? hi : x; }

/* dst (B, S, ...), src (B, T, ...): sequence by sequence, a stack view of rows [r, r + T) of
 * dst[b] takes src[b], r = row0[b] (or row0[0] for all). */
static msh_status cpu_set_rows_dyn(msh_tensor *dst, const msh_tensor *row0, const msh_tensor *src) {
  const int32_t *r0 = msh_tensor_ptr(row0);
  int64_t B = dst->shape[0], T = src->shape[1], n = msh_tensor_numel(row0);
  msh_tensor rows = *dst, from = *src;
  rows.ndim = from.ndim = dst->ndim - 1;
  for (int i = 0; i < rows.ndim; i++) {
    rows.shape[i] = dst->shape[i + 1];
    rows.stride[i] = dst->stride[i + 1];
    from.shape[i] = src->shape[i + 1];
    from.stride[i] = src->stride[i + 1];
  }
  rows.shape[0] = T;
  for (int64_t b = 0; b < B; b++) {
    int64_t r = clamp_i64(r0[n == 1 ? 0 : b], 0, dst->shape[1] - T);
    rows.offset = dst->offset + b * dst->stride[0] + r * dst->stride[1];
    from.offset = src->offset + b * src->stride[0];
    msh_status s = msh_cpu_copy(&rows, &from);
    if (s != MSH_OK) return s;
  }
  return MSH_OK;
}

/* ------------------------------------------------------------------------------- vtable */

static msh_status cpu_device_count(int *out) {
  *out = 1; /* the host: its cores are threads of one device */
  return MSH_OK;
}

/* No streams, events, staging or pinning: ops run as they are issued, so core/src/stream.c gives
 * streams and events their synchronous meaning (work done before the call returns, events
 * complete once recorded). */

/* msh_tensor_randn on a contiguous host tensor: randn.h's counter-based stream draws element i
 * from (seed, i) alone, so the threads split the elements and draw the same values as one loop
 * (the dummy loader's weights: a single thread drew about 20 M values a second). */
static msh_status cpu_randn(msh_tensor *t, uint64_t seed, float mean, float std) {
  enum { B = 1024 };
  int64_t n = msh_tensor_numel(t);
  int dt = t->dtype;
  size_t es = msh_dtype_size(dt);
  char *base = msh_tensor_ptr(t);
  int nt = msh_cpu_threads(n, 1 << 15);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    int64_t lo, hi;
    msh_cpu_split(n, omp_get_thread_num(), omp_get_num_threads(), B, &lo, &hi);
    float buf[B];
    for (int64_t i = lo; i < hi; i += B) {
      int64_t m = hi - i < B ? hi - i : B;
      float *p = dt == MSH_F32 ? (float *)base + i : buf;
      for (int64_t j = 0; j < m; j++) p[j] = msh_randn_scaled(seed, (uint64_t)(i + j), mean, std);
      if (dt != MSH_F32) copy_run(base + i * (int64_t)es, dt, 1, (const char *)buf, MSH_F32, 1, m);
    }
  }
  return MSH_OK;
}

const msh_backend msh_cpu_backend = {
    .name = "cpu",
    .alloc = cpu_alloc,
    .release = cpu_release,
    .copy = msh_cpu_copy,
    .upload = cpu_bytes,
    .download = cpu_bytes,
    .embedding = msh_cpu_embedding,
    .rmsnorm = msh_cpu_rmsnorm,
    .matmul = msh_cpu_matmul,
    .matmul_acc = msh_cpu_matmul_acc,
    .matmul_glu = msh_cpu_matmul_glu,
    .qkv_rope = msh_cpu_qkv_rope,
    .rope = msh_cpu_rope,
    .attention = msh_cpu_attention,
    .set_rows_dyn = cpu_set_rows_dyn,
    .attention_dyn = msh_cpu_attention_dyn,
    .kv_write = msh_cpu_kv_write,
    .paged_attention = msh_cpu_paged_attention,
    .silu_mul = msh_cpu_silu_mul,
    .add = msh_cpu_add,
    .add_bias = msh_cpu_add_bias,
    .scale = msh_cpu_scale,
    .softmax = msh_cpu_softmax,
    .argmax = msh_cpu_argmax,
    .randn = cpu_randn,
    .device_count = cpu_device_count,
};
