/* check.h: the few helpers every C test uses. A test binary prints one line per failed check and
 * exits non-zero when any check failed (77 means "skipped", for ctest's SKIP_RETURN_CODE). */
#ifndef MSH_TEST_CHECK_H
#define MSH_TEST_CHECK_H

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include "moonshard.h"

static int check_failures = 0;
static int check_count = 0;

static inline void check_at(int ok, const char *what, const char *file, int line) {
  check_count++;
  if (!ok) {
    check_failures++;
    fprintf(stderr, "FAIL %s:%d: %s\n", file, line, what);
  }
}
#define CHECK(cond) check_at(!!(cond), #cond, __FILE__, __LINE__)

/* A call that must succeed; prints the library's message when it does not. */
static inline void check_ok_at(msh_status s, const char *what, const char *file, int line) {
  check_count++;
  if (s != MSH_OK) {
    check_failures++;
    fprintf(stderr, "FAIL %s:%d: %s -> %s: %s\n", file, line, what, msh_status_name(s), msh_last_error());
  }
}
#define CHECK_OK(call) check_ok_at((call), #call, __FILE__, __LINE__)

/* A call that must fail with a given status. */
static inline void check_status_at(msh_status got, msh_status want, const char *what, const char *file,
                                   int line) {
  check_count++;
  if (got != want) {
    check_failures++;
    fprintf(stderr, "FAIL %s:%d: %s -> %s, wanted %s (%s)\n", file, line, what, msh_status_name(got),
            msh_status_name(want), msh_last_error());
  }
}
#define CHECK_STATUS(call, want) check_status_at((call), (want), #call, __FILE__, __LINE__)

/* |got - want| <= atol + rtol * |want| */
static inline int close_enough(double got, double want, double rtol, double atol) {
  return fabs(got - want) <= atol + rtol * fabs(want) && !isnan(got);
}

/* CHECK and CHECK_OK from several threads (one per rank or GPU): the counters and the output
 * are taken under a lock. */
static pthread_mutex_t check_lock = PTHREAD_MUTEX_INITIALIZER;
static inline void tcheck_at(int ok, const char *what, const char *file, int line) {
  pthread_mutex_lock(&check_lock);
  check_at(ok, what, file, line);
  pthread_mutex_unlock(&check_lock);
}
static inline void tcheck_ok_at(msh_status s, const char *what, const char *file, int line) {
  pthread_mutex_lock(&check_lock);
  check_ok_at(s, what, file, line);
  pthread_mutex_unlock(&check_lock);
}
#define TCHECK(cond) tcheck_at(!!(cond), #cond, __FILE__, __LINE__)
#define TCHECK_OK(call) tcheck_ok_at((call), #call, __FILE__, __LINE__)

static inline int check_done(const char *name) {
  printf("%s: %d checks, %d failed\n", name, check_count, check_failures);
  return check_failures ? 1 : 0;
}

#endif
