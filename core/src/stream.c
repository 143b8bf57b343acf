/* stream.c: the public face of streams and events, handed to the backend of the device kind.
 * Backends without streams (the CPU: work runs as it is issued) get the synchronous meaning here:
 * a stream is a token whose work is done, an event is complete once recorded and holds the host
 * clock of the record. */
#include "timer_internal.h"

#include <stdlib.h>

struct msh_stream {
  const msh_backend *be;
  int device, device_index;
  void *impl; /* the backend's stream, NULL where work runs as issued */
};

struct msh_event {
  const msh_backend *be;
  int device, device_index;
  void *impl;     /* the backend's event, NULL where work runs as issued */
  int recorded;   /* recorded at least once */
  double host_s;  /* the host clock of the last record */
};

/* The backend of device, with its index checked. */
static msh_status device_backend(int device, int device_index, const msh_backend **out) {
  if (device != MSH_CPU && device != MSH_CUDA) return MSH_FAIL(MSH_EINVAL, "unknown device kind %d", device);
  const msh_backend *be = msh_backend_for(device);
  if (!be) return MSH_EUNSUPPORTED;
  msh_status s = msh_backend_check_index(be, device_index);
  if (s == MSH_OK) *out = be;
  return s;
}

/* ----------------------------------------------------------------------------- streams */

msh_status msh_stream_new(msh_stream **out, int device, int device_index) {
  if (!out) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  const msh_backend *be = NULL;
  msh_status bs = device_backend(device, device_index, &be);
  if (bs != MSH_OK) return bs;
  msh_stream *s = calloc(1, sizeof *s);
  if (!s) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  s->be = be;
  s->device = device;
  s->device_index = device_index;
  if (be->stream_new) {
    msh_status st = be->stream_new(device_index, &s->impl);
    if (st != MSH_OK) {
      free(s);
      return st;
    }
  }
  *out = s;
  return MSH_OK;
}

void msh_stream_free(msh_stream *s) {
  if (!s) return;
  if (s->impl) s->be->stream_free(s->device_index, s->impl);
  free(s);
}

int msh_stream_device(const msh_stream *s) { return s ? s->device : -1; }
int msh_stream_device_index(const msh_stream *s) { return s ? s->device_index : -1; }

msh_status msh_stream_sync(msh_stream *s) {
  if (!s) return MSH_FAIL(MSH_EINVAL, "NULL stream");
  return s->impl ? s->be->stream_sync(s->device_index, s->impl) : MSH_OK;
}

msh_status msh_stream_set_current(int device, int device_index, msh_stream *s) {
  const msh_backend *be = NULL;
  msh_status bs = device_backend(device, device_index, &be);
  if (bs != MSH_OK) return bs;
  if (s && (s->device != device || s->device_index != device_index))
    return MSH_FAIL(MSH_EINVAL, "the stream lies on %s:%d, not on %s:%d", s->be->name, s->device_index, be->name,
                    device_index);
  return be->stream_set_current ? be->stream_set_current(device_index, s ? s->impl : NULL) : MSH_OK;
}

/* ------------------------------------------------------------------------------ events */

msh_status msh_event_new(msh_event **out, int device, int device_index) {
  if (!out) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  const msh_backend *be = NULL;
  msh_status bs = device_backend(device, device_index, &be);
  if (bs != MSH_OK) return bs;
  msh_event *e = calloc(1, sizeof *e);
  if (!e) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  e->be = be;
  e->device = device;
  e->device_index = device_index;
  if (be->event_new) {
    msh_status st = be->event_new(device_index, &e->impl);
    if (st != MSH_OK) {
      free(e);
      return st;
    }
  }
  *out = e;
  return MSH_OK;
}

void msh_event_free(msh_event *e) {
  if (!e) return;
  if (e->impl) e->be->event_free(e->impl);
  free(e);
}

msh_status msh_event_record(msh_event *e, msh_stream *s) {
  if (!e) return MSH_FAIL(MSH_EINVAL, "NULL event");
  if (s && (s->device != e->device || s->device_index != e->device_index))
    return MSH_FAIL(MSH_EINVAL, "the event lies on %s:%d, the stream on %s:%d", e->be->name, e->device_index,
                    s->be->name, s->device_index);
  if (e->impl) {
    msh_status st = e->be->event_record(e->device_index, e->impl, s ? s->impl : NULL);
    if (st != MSH_OK) return st;
  }
  e->host_s = msh_clock_s();
  e->recorded = 1;
  return MSH_OK;
}

msh_status msh_stream_wait_event(msh_stream *s, const msh_event *e) {
  if (!e) return MSH_FAIL(MSH_EINVAL, "NULL event");
  if (s && s->device != e->device)
    return MSH_FAIL(MSH_EINVAL, "the event lies on %s:%d, the stream on %s:%d", e->be->name, e->device_index,
                    s->be->name, s->device_index);
  if (!e->impl) return MSH_OK; /* complete once recorded */
  return e->be->stream_wait_event(s ? s->device_index : e->device_index, s ? s->impl : NULL, e->impl);
}

msh_status msh_event_query(const msh_event *e, int *ready) {
  if (!e || !ready) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (!e->impl) {
    *ready = 1;
    return MSH_OK;
  }
  int r = e->be->event_query(e->impl);
  if (r < 0) return e->be->event_sync(e->impl); /* reports the failure */
  *ready = r;
  return MSH_OK;
}

msh_status msh_event_sync(msh_event *e) {
  if (!e) return MSH_FAIL(MSH_EINVAL, "NULL event");
  return e->impl ? e->be->event_sync(e->impl) : MSH_OK;
}

msh_status msh_event_elapsed_ms(const msh_event *start, const msh_event *end, float *out) {
  if (!start || !end || !out) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (!start->recorded || !end->recorded)
    return MSH_FAIL(MSH_EINVAL, "the %s event was never recorded", start->recorded ? "end" : "start");
  if (start->device != end->device || start->device_index != end->device_index)
    return MSH_FAIL(MSH_EINVAL, "the events lie on different devices (%s:%d and %s:%d)", start->be->name,
                    start->device_index, end->be->name, end->device_index);
  if (!start->impl) {
    *out = (float)((end->host_s - start->host_s) * 1e3);
    return MSH_OK;
  }
  return start->be->event_elapsed_ms(start->impl, end->impl, out);
}

/* ------------------------------------------------------------------------------ copies */

static int is_float(int dt) { return dt == MSH_F32 || dt == MSH_F16 || dt == MSH_BF16; }

static int same_shape(const msh_tensor *a, const msh_tensor *b) {
  if (a->ndim != b->ndim) return 0;
  for (int i = 0; i < a->ndim; i++)
    if (a->shape[i] != b->shape[i]) return 0;
  return 1;
}

msh_status msh_tensor_copy_async(msh_tensor *dst, const msh_tensor *src, msh_stream *s) {
  if (!dst || !src) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  const msh_storage *ds = dst->st, *ss = src->st;
  if (ds->device == MSH_CPU && ss->device == MSH_CPU) {
    if (s && s->device != MSH_CPU)
      return MSH_FAIL(MSH_EINVAL, "both tensors are in host memory, the stream on %s:%d", s->be->name, s->device_index);
    return msh_tensor_copy(dst, src);
  }
  /* the device side: both there, or one of them with the other in host memory */
  const msh_storage *dev = ds->device != MSH_CPU ? ds : ss;
  int on_device = ds->device == ss->device;
  if (on_device && ds->device_index != ss->device_index)
    return MSH_FAIL(MSH_EINVAL, "dst and src lie on two devices (%d and %d): use msh_tensor_copy", ds->device_index,
                    ss->device_index);
  if (s && (s->device != dev->device || s->device_index != dev->device_index))
    return MSH_FAIL(MSH_EINVAL, "the stream lies on %s:%d, the tensors' device is %d:%d", s->be->name, s->device_index,
                    dev->device, dev->device_index);
  const msh_backend *be = msh_backend_for(dev->device);
  if (!be) return MSH_EUNSUPPORTED;
  char a[128], b[128];
  if (!same_shape(dst, src))
    return MSH_FAIL(MSH_EINVAL, "shapes differ: dst %s, src %s", msh_shape_str(dst, a, sizeof a),
                    msh_shape_str(src, b, sizeof b));
  if (ds->readonly) return MSH_FAIL(MSH_EINVAL, "destination is read-only");
  if (!on_device && (dst->dtype != src->dtype || !msh_tensor_is_contiguous(dst) || !msh_tensor_is_contiguous(src)))
    return MSH_FAIL(MSH_EINVAL, "copy_async between the host and a device moves bytes: it needs contiguous tensors "
                    "of one dtype (dst %s%s, src %s%s; msh_tensor_copy converts and gathers)",
                    msh_shape_str(dst, a, sizeof a), msh_tensor_is_contiguous(dst) ? "" : " strided",
                    msh_shape_str(src, b, sizeof b), msh_tensor_is_contiguous(src) ? "" : " strided");
  if (on_device && dst->dtype != src->dtype && !(is_float(dst->dtype) && is_float(src->dtype)))
    return MSH_FAIL(MSH_EINVAL, "copy_async on a device converts between f32, f16 and bf16 only (not %s to %s; "
                    "msh_tensor_copy does the rest)", msh_dtype_name(src->dtype), msh_dtype_name(dst->dtype));
  if (!be->copy_async) return msh_tensor_copy(dst, src); /* done when it returns */
  if (on_device && msh_dtype_is_block(dst->dtype)) { /* blocks move as bytes */
    msh_tensor d = msh_tensor_block_bytes(dst), sb = msh_tensor_block_bytes(src);
    return be->copy_async(&d, &sb, s ? s->impl : NULL);
  }
  return be->copy_async(dst, src, s ? s->impl : NULL);
}
