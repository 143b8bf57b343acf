/* timer.c: device timers. Where work runs as it is issued (the CPU) a timer is the monotonic wall
 * clock at the call; on a backend with events it is an event recorded on the device's current
 * stream, read without waiting. */
#include "timer_internal.h"

#include <stdlib.h>
#include <time.h>

double msh_clock_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

msh_status msh_timer_new(msh_timer **out, int kind, int device_index) {
  if (!out) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (kind != MSH_CPU && kind != MSH_CUDA) return MSH_FAIL(MSH_EINVAL, "unknown device kind %d", kind);
  const msh_backend *be = msh_backend_for(kind);
  if (!be) return MSH_EUNSUPPORTED;
  if (!be->event_new) device_index = 0; /* one clock */
  msh_timer *t = calloc(1, sizeof *t);
  if (!t) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  t->be = be;
  t->kind = kind;
  t->device_index = device_index;
  if (be->event_new) {
    msh_status s = be->event_new(device_index, &t->event);
    if (s != MSH_OK) {
      free(t);
      return s;
    }
  }
  *out = t;
  return MSH_OK;
}

void msh_timer_free(msh_timer *t) {
  if (!t) return;
  if (t->event) t->be->event_free(t->event);
  free(t);
}

int msh_timer_try_record(msh_timer *t) {
  t->host_s = msh_clock_s();
  if (!t->event) {
    t->state = MSH_TIMER_HOST;
    return 0;
  }
  if (t->be->capturing(t->device_index)) return 1;
  msh_status s = t->be->event_record(t->device_index, t->event, NULL);
  t->state = s == MSH_OK ? MSH_TIMER_DEVICE : MSH_TIMER_UNSET;
  return s;
}

msh_status msh_timer_record(msh_timer *t) {
  if (!t) return MSH_FAIL(MSH_EINVAL, "NULL timer");
  int r = msh_timer_try_record(t);
  if (r == 1)
    return MSH_FAIL(MSH_EINVAL, "a graph is being captured on %s device %d: a timestamp inside it would be "
                    "replayed, not taken (record before msh_graph_begin or after msh_graph_end)", t->be->name,
                    t->device_index);
  return r;
}

/* 1 reached (or failed: elapsed then says why), 0 not yet (never waits). */
static int reached(const msh_timer *t) {
  if (t->state == MSH_TIMER_HOST) return 1;
  if (t->state == MSH_TIMER_DEVICE) return t->be->event_query(t->event) != 0;
  return 0;
}

msh_status msh_timer_done(const msh_timer *t, int *done) {
  if (!t || !done) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  *done = reached(t);
  return MSH_OK;
}

msh_status msh_timer_elapsed(const msh_timer *start, const msh_timer *end, int wait, double *seconds) {
  if (!start || !end || !seconds) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (start->state == MSH_TIMER_UNSET || end->state == MSH_TIMER_UNSET)
    return MSH_FAIL(MSH_EINVAL, "the %s timer was never recorded", start->state == MSH_TIMER_UNSET ? "start" : "end");
  if (start->kind != end->kind || start->device_index != end->device_index)
    return MSH_FAIL(MSH_EINVAL, "the timers lie on different devices (%s:%d and %s:%d)", start->be->name,
                    start->device_index, end->be->name, end->device_index);
  if (start->state == MSH_TIMER_HOST) {
    *seconds = end->host_s - start->host_s;
    return MSH_OK;
  }
  const msh_backend *be = start->be;
  if (wait) {
    msh_status s = be->event_sync(end->event);
    if (s == MSH_OK) s = be->event_sync(start->event);
    if (s != MSH_OK) return s;
  } else if (!reached(end) || !reached(start)) {
    *seconds = -1;
    return MSH_OK;
  }
  float ms = 0;
  msh_status s = be->event_elapsed_ms(start->event, end->event, &ms);
  if (s != MSH_OK) return s;
  *seconds = ms * 1e-3;
  return MSH_OK;
}
