/* tensor.c: tensor handles, storage reference counting, views and copies. */
#include "internal.h"
#include "randn.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ----------------------------------------------------------------------------- storage */

void msh_storage_release(msh_storage *st) {
  if (!st || --st->refs > 0) return;
  if (st->pinned_by) {
    st->pinned_by->host_release(st->base);
  } else if (st->owned) {
    const msh_backend *be = msh_backend_find(st->device);
    if (be) be->release(st->device_index, st->base);
  }
  msh_storage_release(st->host); /* a device-mapped view's host memory (NULL-safe) */
  msh_file_free(st->file);
  free(st);
}

static msh_storage *storage_new(int device, int device_index, void *base, uint64_t bytes) {
  msh_storage *st = calloc(1, sizeof *st);
  if (!st) return NULL;
  st->refs = 1; /* the caller's reference, dropped once a tensor holds its own */
  st->device = device;
  st->device_index = device_index;
  st->base = base;
  st->bytes = bytes;
  return st;
}

/* ----------------------------------------------------------------------------- helpers */

static msh_status check_shape(int dtype, int ndim, const int64_t *shape, uint64_t *numel) {
  if (!msh_dt_block_bytes(dtype)) return MSH_FAIL(MSH_EINVAL, "unknown dtype %d", dtype);
  if (ndim < 0 || ndim > MSH_MAX_DIMS)
    return MSH_FAIL(MSH_EINVAL, "ndim %d outside [0, %d]", ndim, MSH_MAX_DIMS);
  if (ndim > 0 && !shape) return MSH_FAIL(MSH_EINVAL, "NULL shape");
  if (msh_dtype_is_block(dtype) && (ndim == 0 || shape[ndim - 1] % msh_dt_block_elems(dtype)))
    return MSH_FAIL(MSH_EINVAL, "%s tensors need a last dim that is a multiple of %d (got %lld)",
                    msh_dtype_name(dtype), (int)msh_dt_block_elems(dtype), ndim ? (long long)shape[ndim - 1] : 0LL);
  uint64_t n = 1;
  for (int i = 0; i < ndim; i++) {
    if (shape[i] < 0) return MSH_FAIL(MSH_EINVAL, "dim %d is negative (%lld)", i, (long long)shape[i]);
    if (shape[i] > 0 && n > UINT64_MAX / 16 / (uint64_t)shape[i])
      return MSH_FAIL(MSH_ERANGE, "shape too large");
    n *= (uint64_t)shape[i];
  }
  *numel = n;
  return MSH_OK;
}

const char *msh_shape_str(const msh_tensor *t, char *buf, size_t cap) {
  size_t n = 0;
  n += (size_t)snprintf(buf + n, cap - n, "(");
  for (int i = 0; i < t->ndim && n < cap; i++)
    n += (size_t)snprintf(buf + n, cap - n, i ? ", %lld" : "%lld", (long long)t->shape[i]);
  if (n < cap) snprintf(buf + n, cap - n, ") %s", msh_dtype_name(t->dtype));
  return buf;
}

/* Element span [lo, hi] touched by a view, relative to its offset. */
static void view_span(int ndim, const int64_t *shape, const int64_t *stride, int64_t *lo,
                      int64_t *hi) {
  *lo = 0;
  *hi = 0;
  for (int i = 0; i < ndim; i++) {
    if (shape[i] == 0) {
      *lo = 0;
      *hi = -1;
      return;
    }
    int64_t ext = (shape[i] - 1) * stride[i];
    if (ext < 0) *lo += ext;
    else *hi += ext;
  }
}

/* A block-quantized layout: whole blocks along a unit-stride last dim, offset and the other
 * strides (of dims longer than 1) at block boundaries. */
static int whole_blocks(const msh_tensor *t) {
  int last = t->ndim - 1;
  int64_t be = msh_dt_block_elems(t->dtype);
  if (last < 0 || t->shape[last] % be || t->offset % be) return 0;
  if (t->shape[last] > 0 && t->stride[last] != 1) return 0;
  for (int i = 0; i < last; i++)
    if (t->shape[i] > 1 && t->stride[i] % be) return 0;
  return 1;
}

msh_status msh_tensor_make(msh_tensor **out, msh_storage *st, int dtype, int ndim,
                           const int64_t *shape, const int64_t *strides, int64_t offset) {
  uint64_t n;
  msh_status s = check_shape(dtype, ndim, shape, &n);
  if (s != MSH_OK) return s;
  msh_tensor *t = calloc(1, sizeof *t);
  if (!t) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  t->st = st;
  t->dtype = dtype;
  t->ndim = ndim;
  t->offset = offset;
  int64_t acc = 1;
  for (int i = ndim - 1; i >= 0; i--) {
    t->shape[i] = shape[i];
    t->stride[i] = strides ? strides[i] : acc;
    acc *= shape[i];
  }
  if (msh_dtype_is_block(dtype) && !whole_blocks(t)) {
    int64_t last = ndim ? shape[ndim - 1] : 0, last_stride = ndim ? t->stride[ndim - 1] : 0;
    free(t);
    return MSH_FAIL(MSH_EINVAL, "a view of a %s tensor would split its %d-element blocks (%d dims, last dim %lld, "
                    "its stride %lld, offset %lld)", msh_dtype_name(dtype), (int)msh_dt_block_elems(dtype), ndim, (long long)last,
                    (long long)last_stride, (long long)offset);
  }
  int64_t lo, hi;
  view_span(ndim, t->shape, t->stride, &lo, &hi);
  if (hi >= lo && (offset + lo < 0 || (uint64_t)msh_dtype_bytes(dtype, offset + hi + 1) > st->bytes)) {
    free(t);
    return MSH_FAIL(MSH_ERANGE, "view of %llu elements at offset %lld exceeds its %llu-byte storage",
                    (unsigned long long)n, (long long)offset, (unsigned long long)st->bytes);
  }
  st->refs++;
  *out = t;
  return MSH_OK;
}

/* ------------------------------------------------------------------------ constructors */

msh_status msh_tensor_new(msh_tensor **out, int dtype, int ndim, const int64_t *shape, int device,
                          int device_index) {
  if (!out) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  uint64_t n;
  msh_status s = check_shape(dtype, ndim, shape, &n);
  if (s != MSH_OK) return s;
  const msh_backend *be = msh_backend_for(device);
  if (!be) return MSH_EUNSUPPORTED;
  uint64_t bytes = (uint64_t)msh_dtype_bytes(dtype, (int64_t)n);
  msh_storage *st = storage_new(device, device_index, NULL, bytes);
  if (!st) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  s = be->alloc(device_index, bytes ? bytes : 1, &st->base);
  if (s != MSH_OK) {
    free(st);
    return s;
  }
  st->owned = 1;
  s = msh_tensor_make(out, st, dtype, ndim, shape, NULL, 0);
  msh_storage_release(st); /* the tensor holds the only reference now (or none on failure) */
  return s;
}

msh_status msh_tensor_new_pinned(msh_tensor **out, int dtype, int ndim, const int64_t *shape) {
  if (!out) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  uint64_t n;
  msh_status s = check_shape(dtype, ndim, shape, &n);
  if (s != MSH_OK) return s;
  const msh_backend *pin = msh_backend_pinner();
  if (!pin) return msh_tensor_new(out, dtype, ndim, shape, MSH_CPU, 0);
  uint64_t bytes = (uint64_t)msh_dtype_bytes(dtype, (int64_t)n);
  msh_storage *st = storage_new(MSH_CPU, 0, NULL, bytes);
  if (!st) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  if (pin->host_alloc(bytes ? bytes : 1, &st->base) != MSH_OK) {
    /* refused (no driver, no device, a limit on locked memory): ordinary memory instead */
    free(st);
    msh_clear_error();
    return msh_tensor_new(out, dtype, ndim, shape, MSH_CPU, 0);
  }
  st->owned = 1;
  st->pinned_by = pin;
  s = msh_tensor_make(out, st, dtype, ndim, shape, NULL, 0);
  msh_storage_release(st);
  return s;
}

msh_status msh_tensor_map_host(msh_tensor **out, msh_tensor *host, int device, int device_index) {
  if (!out || !host) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (host->st->device != MSH_CPU || host->st->host)
    return MSH_FAIL(MSH_EINVAL, "the tensor to map is not in host memory (a %s tensor)",
                    host->st->host ? "device-mapped" : "device");
  if (device == MSH_CPU) /* the CPU reaches its own memory: a view */
    return msh_tensor_make(out, host->st, host->dtype, host->ndim, host->shape, host->stride, host->offset);
  const msh_backend *be = msh_backend_for(device);
  if (!be) return MSH_EUNSUPPORTED;
  msh_status s = msh_backend_check_index(be, device_index);
  if (s != MSH_OK) return s;
  if (host->st->pinned_by != be)
    return MSH_FAIL(MSH_EINVAL, "%s device %d can reach only host memory its backend page-locked "
                    "(msh_tensor_new_pinned); this tensor is in ordinary memory", be->name, device_index);
  if (!be->host_map) return MSH_FAIL(MSH_EUNSUPPORTED, "%s devices cannot map host memory", be->name);
  void *base = NULL;
  s = be->host_map(device_index, host->st->base, host->st->bytes, &base);
  if (s != MSH_OK) return s;
  msh_storage *st = storage_new(device, device_index, base, host->st->bytes);
  if (!st) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  st->readonly = host->st->readonly;
  st->host = host->st;
  host->st->refs++;
  s = msh_tensor_make(out, st, host->dtype, host->ndim, host->shape, host->stride, host->offset);
  msh_storage_release(st); /* the tensor holds the only reference now (or none on failure) */
  return s;
}

int msh_tensor_is_host_mapped(const msh_tensor *t) { return t && t->st->host != NULL; }

msh_status msh_tensor_from_file(msh_tensor **out, msh_file *f, uint64_t offset, int dtype, int ndim,
                                const int64_t *shape) {
  if (!out || !f) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  uint64_t n;
  msh_status s = check_shape(dtype, ndim, shape, &n);
  if (s != MSH_OK) return s;
  uint64_t bytes = (uint64_t)msh_dtype_bytes(dtype, (int64_t)n);
  uint64_t size = msh_file_size(f);
  if (offset > size || bytes > size - offset)
    return MSH_FAIL(MSH_ERANGE, "'%s': %llu bytes at offset %llu run past the end of the file (%llu bytes)",
                    msh_file_path(f), (unsigned long long)bytes, (unsigned long long)offset,
                    (unsigned long long)size);
  /* the view starts at the tensor's own bytes, so any byte offset works */
  msh_storage *st = storage_new(MSH_CPU, 0, (char *)msh_file_data(f) + offset, bytes);
  if (!st) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  st->readonly = 1;
  st->file = f;
  msh_file_retain(f);
  s = msh_tensor_make(out, st, dtype, ndim, shape, NULL, 0);
  msh_storage_release(st);
  return s;
}

msh_status msh_tensor_wrap(msh_tensor **out, void *data, int dtype, int ndim, const int64_t *shape) {
  if (!out || !data) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  uint64_t n;
  msh_status s = check_shape(dtype, ndim, shape, &n);
  if (s != MSH_OK) return s;
  msh_storage *st = storage_new(MSH_CPU, 0, data, (uint64_t)msh_dtype_bytes(dtype, (int64_t)n));
  if (!st) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  s = msh_tensor_make(out, st, dtype, ndim, shape, NULL, 0);
  msh_storage_release(st);
  return s;
}

void msh_tensor_free(msh_tensor *t) {
  if (!t) return;
  msh_storage_release(t->st);
  free(t);
}

/* --------------------------------------------------------------------------- accessors */

int msh_tensor_dtype(const msh_tensor *t) { return t->dtype; }
int msh_tensor_ndim(const msh_tensor *t) { return t->ndim; }

int64_t msh_tensor_dim(const msh_tensor *t, int i) {
  if (i < 0) i += t->ndim;
  return (i < 0 || i >= t->ndim) ? 0 : t->shape[i];
}

int64_t msh_tensor_stride(const msh_tensor *t, int i) {
  if (i < 0) i += t->ndim;
  return (i < 0 || i >= t->ndim) ? 0 : t->stride[i];
}

int64_t msh_tensor_numel(const msh_tensor *t) {
  int64_t n = 1;
  for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
  return n;
}

int msh_tensor_device(const msh_tensor *t) { return t->st->device; }
int msh_tensor_device_index(const msh_tensor *t) { return t->st->device_index; }
int msh_tensor_is_readonly(const msh_tensor *t) { return t->st->readonly; }
int msh_tensor_is_pinned(const msh_tensor *t) { return t->st->pinned_by != NULL; }
void *msh_tensor_data(const msh_tensor *t) { return msh_tensor_ptr(t); }

int msh_tensor_is_contiguous(const msh_tensor *t) {
  int64_t acc = 1;
  for (int i = t->ndim - 1; i >= 0; i--) {
    if (t->shape[i] != 1 && t->stride[i] != acc) return 0;
    acc *= t->shape[i];
  }
  return 1;
}

/* ------------------------------------------------------------------------------- views */

msh_status msh_tensor_view(msh_tensor **out, msh_tensor *t, int ndim, const int64_t *shape,
                           const int64_t *strides, int64_t offset) {
  if (!out || !t || (ndim > 0 && (!shape || !strides))) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  return msh_tensor_make(out, t->st, t->dtype, ndim, shape, strides, t->offset + offset);
}

msh_status msh_tensor_narrow(msh_tensor **out, msh_tensor *t, int dim, int64_t start, int64_t len) {
  if (!out || !t) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (dim < 0) dim += t->ndim;
  if (dim < 0 || dim >= t->ndim) return MSH_FAIL(MSH_EINVAL, "dim %d out of range for %d dims", dim, t->ndim);
  if (start < 0 || len < 0 || start + len > t->shape[dim])
    return MSH_FAIL(MSH_ERANGE, "narrow [%lld, %lld) of dim %d outside [0, %lld)", (long long)start,
                    (long long)(start + len), dim, (long long)t->shape[dim]);
  int64_t shape[MSH_MAX_DIMS];
  memcpy(shape, t->shape, sizeof shape);
  shape[dim] = len;
  return msh_tensor_make(out, t->st, t->dtype, t->ndim, shape, t->stride,
                         t->offset + start * t->stride[dim]);
}

msh_status msh_tensor_reshape(msh_tensor **out, msh_tensor *t, int ndim, const int64_t *shape) {
  if (!out || !t || (ndim > 0 && !shape)) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (ndim < 0 || ndim > MSH_MAX_DIMS) return MSH_FAIL(MSH_EINVAL, "bad ndim %d", ndim);
  if (!msh_tensor_is_contiguous(t)) return MSH_FAIL(MSH_EINVAL, "reshape needs a contiguous tensor");
  int64_t s[MSH_MAX_DIMS], known = 1, total = msh_tensor_numel(t);
  int infer = -1;
  for (int i = 0; i < ndim; i++) {
    s[i] = shape[i];
    if (s[i] == -1) {
      if (infer >= 0) return MSH_FAIL(MSH_EINVAL, "more than one -1 in reshape");
      infer = i;
    } else if (s[i] < 0) {
      return MSH_FAIL(MSH_EINVAL, "negative dim in reshape");
    } else {
      known *= s[i];
    }
  }
  if (infer >= 0) {
    if (known == 0 || total % known) return MSH_FAIL(MSH_EINVAL, "cannot infer dim of reshape");
    s[infer] = total / known;
    known = total;
  }
  if (known != total)
    return MSH_FAIL(MSH_EINVAL, "reshape of %lld elements into %lld", (long long)total, (long long)known);
  return msh_tensor_make(out, t->st, t->dtype, ndim, s, NULL, t->offset);
}

msh_status msh_tensor_transpose(msh_tensor **out, msh_tensor *t, int d0, int d1) {
  if (!out || !t) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (d0 < 0) d0 += t->ndim;
  if (d1 < 0) d1 += t->ndim;
  if (d0 < 0 || d1 < 0 || d0 >= t->ndim || d1 >= t->ndim)
    return MSH_FAIL(MSH_EINVAL, "transpose dims out of range");
  int64_t shape[MSH_MAX_DIMS], stride[MSH_MAX_DIMS];
  memcpy(shape, t->shape, sizeof shape);
  memcpy(stride, t->stride, sizeof stride);
  shape[d0] = t->shape[d1];
  shape[d1] = t->shape[d0];
  stride[d0] = t->stride[d1];
  stride[d1] = t->stride[d0];
  return msh_tensor_make(out, t->st, t->dtype, t->ndim, shape, stride, t->offset);
}

/* ------------------------------------------------------------------------------ copies */

static int is_float(int dt) { return dt == MSH_F32 || dt == MSH_F16 || dt == MSH_BF16; }

/* Host to a contiguous device tensor through the backend's streaming upload (pinned staging,
 * conversion on the device) when it has one and src is laid out in rows; 0 when not taken. */
static int upload_streamed(const msh_backend *be, msh_tensor *dst, const msh_tensor *src, msh_status *s) {
  int64_t rows, cols, ld;
  if (!be->upload_rows || !msh_tensor_is_contiguous(dst) || !msh_packed_rows(src, &rows, &cols, &ld)) return 0;
  if (dst->dtype != src->dtype && !(is_float(dst->dtype) && is_float(src->dtype))) return 0;
  *s = be->upload_rows(dst->st->device_index, msh_tensor_ptr(dst), dst->dtype, msh_tensor_ptr(src), src->dtype, rows,
                       cols, ld);
  return 1;
}

msh_status msh_tensor_copy(msh_tensor *dst, const msh_tensor *src) {
  if (!dst || !src) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  char a[128], b[128];
  if (dst->ndim != src->ndim || memcmp(dst->shape, src->shape, sizeof(int64_t) * (size_t)src->ndim))
    return MSH_FAIL(MSH_EINVAL, "shapes differ: dst %s, src %s", msh_shape_str(dst, a, sizeof a),
                    msh_shape_str(src, b, sizeof b));
  int dq = msh_dtype_is_block(dst->dtype), sq = msh_dtype_is_block(src->dtype);
  if (dst->dtype != src->dtype && !((is_float(dst->dtype) || dq) && (is_float(src->dtype) || sq)))
    return MSH_FAIL(MSH_EINVAL, "cannot convert %s to %s", msh_dtype_name(src->dtype),
                    msh_dtype_name(dst->dtype));
  if (dst->st->readonly) return MSH_FAIL(MSH_EINVAL, "destination is read-only");
  if (dq && dst->dtype == src->dtype) { /* blocks move as bytes, on any device */
    msh_tensor d = msh_tensor_block_bytes(dst), sb = msh_tensor_block_bytes(src);
    return msh_tensor_copy(&d, &sb);
  }
  int same_dev = dst->st->device == src->st->device && dst->st->device_index == src->st->device_index;
  if ((dq || sq) && !(same_dev && dst->st->device == MSH_CPU)) {
    /* (de)quantizing runs on the CPU: the device side goes through a host tensor in its dtype */
    const msh_tensor *dev = src->st->device != MSH_CPU ? src : dst;
    msh_tensor *host = NULL;
    msh_status s = msh_tensor_new(&host, dev->dtype, dev->ndim, dev->shape, MSH_CPU, 0);
    if (s == MSH_OK) s = msh_tensor_copy(host, src);
    if (s == MSH_OK) s = msh_tensor_copy(dst, host);
    msh_tensor_free(host);
    return s;
  }
  if (same_dev) {
    const msh_backend *be = msh_backend_for(dst->st->device);
    return be ? be->copy(dst, src) : MSH_EUNSUPPORTED;
  }
  /* across devices: make both sides contiguous and same-dtype on the host, then move bytes */
  int64_t n = msh_tensor_numel(src);
  size_t bytes = (size_t)msh_dtype_bytes(dst->dtype, n);
  msh_status s = MSH_OK;
  if (src->st->device == MSH_CPU) {
    const msh_backend *be = msh_backend_for(dst->st->device);
    if (!be) return MSH_EUNSUPPORTED;
    if (upload_streamed(be, dst, src, &s)) return s;
    msh_tensor *tmp = NULL, *stage = NULL;
    if (msh_tensor_is_contiguous(dst)) {
      s = msh_tensor_contiguous(&tmp, src, dst->dtype);
      if (s == MSH_OK) s = be->upload(dst->st->device_index, msh_tensor_ptr(dst), msh_tensor_ptr(tmp), bytes);
    } else {
      /* upload into a contiguous device tensor, then a strided device-side copy */
      s = msh_tensor_contiguous(&tmp, src, src->dtype);
      if (s == MSH_OK)
        s = msh_tensor_new(&stage, src->dtype, src->ndim, src->shape, dst->st->device, dst->st->device_index);
      if (s == MSH_OK)
        s = be->upload(dst->st->device_index, msh_tensor_ptr(stage), msh_tensor_ptr(tmp),
                       (size_t)msh_dtype_bytes(src->dtype, n));
      if (s == MSH_OK) s = be->copy(dst, stage);
    }
    msh_tensor_free(stage);
    msh_tensor_free(tmp);
    return s;
  }
  if (dst->st->device == MSH_CPU) {
    const msh_backend *be = msh_backend_for(src->st->device);
    if (!be) return MSH_EUNSUPPORTED;
    msh_tensor *stage = NULL, *host = NULL;
    s = msh_tensor_contiguous(&stage, src, src->dtype); /* contiguous on the source device */
    if (s == MSH_OK) s = msh_tensor_new(&host, src->dtype, src->ndim, src->shape, MSH_CPU, 0);
    if (s == MSH_OK)
      s = be->download(src->st->device_index, msh_tensor_ptr(host), msh_tensor_ptr(stage),
                       (size_t)msh_dtype_bytes(src->dtype, n));
    if (s == MSH_OK) s = msh_cpu_backend.copy(dst, host);
    msh_tensor_free(host);
    msh_tensor_free(stage);
    return s;
  }
  /* device to another device: through the host */
  msh_tensor *host = NULL;
  s = msh_tensor_new(&host, src->dtype, src->ndim, src->shape, MSH_CPU, 0);
  if (s == MSH_OK) s = msh_tensor_copy(host, src);
  if (s == MSH_OK) s = msh_tensor_copy(dst, host);
  msh_tensor_free(host);
  return s;
}

msh_status msh_tensor_contiguous(msh_tensor **out, const msh_tensor *src, int dtype) {
  if (!out || !src) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  msh_tensor *t = NULL;
  msh_status s = msh_tensor_new(&t, dtype, src->ndim, src->shape, src->st->device, src->st->device_index);
  if (s == MSH_OK) s = msh_tensor_copy(t, src);
  if (s != MSH_OK) {
    msh_tensor_free(t);
    return s;
  }
  *out = t;
  return MSH_OK;
}

/* ------------------------------------------------------------------------------ random */

float msh_randn_at(uint64_t seed, uint64_t i) { return msh_randn_value(seed, i); }

msh_status msh_tensor_randn(msh_tensor *t, uint64_t seed, float mean, float std) {
  if (!t) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (!is_float(t->dtype)) return MSH_FAIL(MSH_EINVAL, "randn needs a float tensor");
  if (t->st->readonly) return MSH_FAIL(MSH_EINVAL, "tensor is read-only");
  const msh_backend *be = msh_backend_for(t->st->device);
  if (!be) return MSH_EUNSUPPORTED;
  if (be->randn && msh_tensor_is_contiguous(t)) return be->randn(t, seed, mean, std);
  int64_t n = msh_tensor_numel(t);
  msh_tensor *host = NULL;
  int64_t shape1[1] = {n};
  msh_status s = msh_tensor_new(&host, MSH_F32, 1, shape1, MSH_CPU, 0);
  if (s != MSH_OK) return s;
  float *p = msh_tensor_ptr(host);
  for (int64_t i = 0; i < n; i++) p[i] = msh_randn_scaled(seed, (uint64_t)i, mean, std);
  /* copy in row-major element order into t, whatever its strides */
  msh_tensor *shaped = NULL;
  s = msh_tensor_reshape(&shaped, host, t->ndim, t->shape);
  if (s == MSH_OK) s = msh_tensor_copy(t, shaped);
  msh_tensor_free(shaped);
  msh_tensor_free(host);
  return s;
}
