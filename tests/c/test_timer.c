/* test_timer.c: device timers on the CPU (the wall clock at the call): spans measured across a
 * sleep, a timer recorded again, misuse (never recorded, NULLs, devices that are not there). The
 * CUDA side is tests/gpu/test_cuda_timer.c. */
#define _GNU_SOURCE
#include "check.h"

#include <time.h>

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

int main(void) {
  msh_timer *a = NULL, *b = NULL;
  CHECK_OK(msh_timer_new(&a, MSH_CPU, 0));
  CHECK_OK(msh_timer_new(&b, MSH_CPU, 0));
  double s = 0;
  int done = 7;
  CHECK_OK(msh_timer_done(a, &done));
  CHECK(done == 0);
  CHECK_STATUS(msh_timer_elapsed(a, b, 0, &s), MSH_EINVAL);
  CHECK_OK(msh_timer_record(a));
  CHECK_STATUS(msh_timer_elapsed(a, b, 1, &s), MSH_EINVAL);
  sleep_ms(30);
  CHECK_OK(msh_timer_record(b));
  CHECK_OK(msh_timer_done(b, &done));
  CHECK(done == 1);
  CHECK_OK(msh_timer_elapsed(a, b, 0, &s));
  CHECK(s >= 0.025 && s < 2);
  /* recorded again: the span starts over */
  CHECK_OK(msh_timer_record(a));
  CHECK_OK(msh_timer_elapsed(a, b, 1, &s));
  CHECK(s <= 0);
  CHECK_OK(msh_timer_record(b));
  CHECK_OK(msh_timer_elapsed(a, b, 0, &s));
  CHECK(s >= 0 && s < 0.025);

  /* misuse */
  CHECK_STATUS(msh_timer_new(NULL, MSH_CPU, 0), MSH_EINVAL);
  msh_timer *c = NULL;
  CHECK_STATUS(msh_timer_new(&c, 9, 0), MSH_EINVAL);
  int n = 0;
  CHECK_OK(msh_device_count(MSH_CUDA, &n));
  if (n == 0) {
    msh_status st = msh_timer_new(&c, MSH_CUDA, 0);
    CHECK(st == MSH_EINVAL || st == MSH_EUNSUPPORTED);
    CHECK(c == NULL);
  }
  CHECK_STATUS(msh_timer_record(NULL), MSH_EINVAL);
  CHECK_STATUS(msh_timer_done(a, NULL), MSH_EINVAL);
  CHECK_STATUS(msh_timer_elapsed(a, NULL, 0, &s), MSH_EINVAL);
  msh_timer_free(NULL);
  msh_timer_free(a);
  msh_timer_free(b);
  return check_done("test_timer");
}
