/* timer_internal.h: device timers (timer.c), over the backends' events, shared with comm.c,
 * which times collectives with them. Not part of the public API. */
#ifndef MSH_TIMER_INTERNAL_H
#define MSH_TIMER_INTERNAL_H

#include "internal.h"

enum {
  MSH_TIMER_UNSET = 0,   /* never recorded */
  MSH_TIMER_HOST = 1,    /* host_s holds the wall clock of the record (the CPU) */
  MSH_TIMER_DEVICE = 2   /* event was recorded on the device's stream */
};

struct msh_timer {
  const msh_backend *be;
  int kind;         /* msh_device_kind */
  int device_index;
  int state;        /* MSH_TIMER_* */
  double host_s;    /* CLOCK_MONOTONIC seconds of the last record (also kept for device timers) */
  void *event;      /* the backend's event of a device timer (NULL where work runs as issued) */
};

/* Seconds of the monotonic clock (the clock of uv.hrtime()). */
double msh_clock_s(void);

/* Records t without touching the thread's last error when it cannot be recorded because a graph
 * is being captured on its device: returns 1 then (t left unset); 0 when recorded; a negative
 * status (message set) on a device error. */
int msh_timer_try_record(msh_timer *t);

#endif
