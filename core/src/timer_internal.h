/* timer_internal.h: device timers (timer.c) and the CUDA events behind them (core/cuda/
 * cuda_timer.c), shared with comm.c, which times collectives with them. Not part of the public
 * API. */
#ifndef MSH_TIMER_INTERNAL_H
#define MSH_TIMER_INTERNAL_H

#include "internal.h"

enum {
  MSH_TIMER_UNSET = 0,   /* never recorded */
  MSH_TIMER_HOST = 1,    /* host_s holds the wall clock of the record (the CPU) */
  MSH_TIMER_DEVICE = 2   /* event was recorded on the device's stream */
};

struct msh_timer {
  int kind;         /* MSH_CPU, MSH_CUDA */
  int device_index;
  int state;        /* MSH_TIMER_* */
  double host_s;    /* CLOCK_MONOTONIC seconds of the last record (also kept for CUDA timers) */
  void *event;      /* cudaEvent_t of a CUDA timer */
};

/* Seconds of the monotonic clock (the clock of uv.hrtime()). */
double msh_clock_s(void);

/* Records t without touching the thread's last error when it cannot be recorded because a graph
 * is being captured on its device: returns 1 then (t left unset); 0 when recorded; a negative
 * status (message set) on a device error. */
int msh_timer_try_record(msh_timer *t);

#ifdef MSH_WITH_CUDA
/* CUDA events (cuda_timer.c): a timing event on a device; record on the device's current
 * stream (1 without recording while a graph is being captured there); 1 when reached, 0 when not
 * yet, -1 when the event failed (reading its time then reports why); elapsed milliseconds between two reached events; wait for one. */
msh_status msh_cuda_event_new(int device_index, void **out);
void msh_cuda_event_free(void *ev);
int msh_cuda_event_record(int device_index, void *ev);
int msh_cuda_event_done(void *ev);
msh_status msh_cuda_event_elapsed_ms(void *start, void *end, float *ms);
msh_status msh_cuda_event_wait(void *ev);
#endif

#endif
