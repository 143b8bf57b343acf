/* test_stream.c: streams and events on the CPU backend (work runs as it is issued, so streams are
 * done at once and events complete once recorded), pinned host tensors, msh_tensor_copy_async's
 * checks, and the misuse every backend refuses alike. */
#define _POSIX_C_SOURCE 200809L /* nanosleep */
#include "check.h"

#include <string.h>
#include <time.h>

static void sleep_ms(int ms) {
  struct timespec ts = {0, ms * 1000000L};
  nanosleep(&ts, NULL);
}

static void test_cpu_streams(void) {
  msh_stream *s = NULL, *s2 = NULL;
  CHECK_OK(msh_stream_new(&s, MSH_CPU, 0));
  CHECK_OK(msh_stream_new(&s2, MSH_CPU, 0));
  CHECK(s && s2);
  CHECK(msh_stream_device(s) == MSH_CPU && msh_stream_device_index(s) == 0);
  CHECK_OK(msh_stream_sync(s));

  msh_event *e = NULL, *e2 = NULL;
  CHECK_OK(msh_event_new(&e, MSH_CPU, 0));
  CHECK_OK(msh_event_new(&e2, MSH_CPU, 0));
  int ready = -1;
  CHECK_OK(msh_event_query(e, &ready));
  CHECK(ready == 1); /* never recorded: complete */
  float ms = 0;
  CHECK_STATUS(msh_event_elapsed_ms(e, e2, &ms), MSH_EINVAL); /* never recorded */
  CHECK(strstr(msh_last_error(), "never recorded") != NULL);

  CHECK_OK(msh_event_record(e, s));
  sleep_ms(20);
  CHECK_OK(msh_event_record(e2, NULL)); /* the current stream */
  ready = -1;
  CHECK_OK(msh_event_query(e2, &ready));
  CHECK(ready == 1);
  CHECK_OK(msh_stream_wait_event(s2, e));
  CHECK_OK(msh_stream_wait_event(NULL, e));
  CHECK_OK(msh_event_sync(e2));
  CHECK_OK(msh_event_elapsed_ms(e, e2, &ms));
  CHECK(ms >= 15 && ms < 2000);

  /* ops on a chosen stream: the CPU runs them at once, in any case */
  CHECK_OK(msh_stream_set_current(MSH_CPU, 0, s));
  int64_t shape[2] = {3, 4};
  msh_tensor *a = NULL, *b = NULL;
  CHECK_OK(msh_tensor_new(&a, MSH_F32, 2, shape, MSH_CPU, 0));
  CHECK_OK(msh_tensor_randn(a, 7, 0, 1));
  CHECK_OK(msh_tensor_new(&b, MSH_F32, 2, shape, MSH_CPU, 0));
  CHECK_OK(msh_op_scale(b, a, 2.0f));
  CHECK(((float *)msh_tensor_data(b))[5] == 2.0f * ((float *)msh_tensor_data(a))[5]);
  CHECK_OK(msh_stream_set_current(MSH_CPU, 0, NULL));
  msh_tensor_free(a);
  msh_tensor_free(b);

  msh_event_free(e);
  msh_event_free(e2);
  msh_stream_free(s);
  msh_stream_free(s2);
}

static void test_pinned_and_copy_async(void) {
  int64_t shape[2] = {5, 6};
  msh_tensor *p = NULL, *q = NULL, *h = NULL;
  CHECK_OK(msh_tensor_new_pinned(&p, MSH_F32, 2, shape));
  CHECK(p != NULL && msh_tensor_device(p) == MSH_CPU && msh_tensor_is_contiguous(p));
  int zero = 1;
  for (int i = 0; p && i < 30; i++) zero &= ((float *)msh_tensor_data(p))[i] == 0.0f;
  CHECK(zero);
  /* pinned or not (a machine without a GPU gets ordinary memory), it works the same */
  CHECK(msh_tensor_is_pinned(p) == 0 || msh_tensor_is_pinned(p) == 1);
  CHECK_OK(msh_tensor_new(&h, MSH_F32, 2, shape, MSH_CPU, 0));
  CHECK(msh_tensor_is_pinned(h) == 0);
  CHECK_OK(msh_tensor_randn(p, 3, 1, 2));
  msh_stream *s = NULL;
  CHECK_OK(msh_stream_new(&s, MSH_CPU, 0));
  CHECK_OK(msh_tensor_copy_async(h, p, s));
  CHECK_OK(msh_stream_sync(s));
  CHECK(!memcmp(msh_tensor_data(h), msh_tensor_data(p), 30 * sizeof(float)));
  /* a view: the pinned memory stays with its storage */
  CHECK_OK(msh_tensor_narrow(&q, p, 0, 1, 2));
  CHECK(msh_tensor_is_pinned(q) == msh_tensor_is_pinned(p));
  msh_tensor_free(p);
  CHECK(((float *)msh_tensor_data(q))[0] == ((float *)msh_tensor_data(h))[6]);
  msh_tensor_free(q);

  /* checks: shapes, read-only, NULLs */
  int64_t other[2] = {6, 5};
  msh_tensor *o = NULL;
  CHECK_OK(msh_tensor_new(&o, MSH_F32, 2, other, MSH_CPU, 0));
  CHECK_STATUS(msh_tensor_copy_async(o, h, s), MSH_EINVAL);
  CHECK_STATUS(msh_tensor_copy_async(NULL, h, s), MSH_EINVAL);
  CHECK_STATUS(msh_tensor_new_pinned(NULL, MSH_F32, 2, shape), MSH_EINVAL);
  CHECK_STATUS(msh_tensor_new_pinned(&q, 99, 2, shape), MSH_EINVAL);
  msh_tensor_free(o);
  msh_tensor_free(h);
  msh_stream_free(s);
}

static void test_misuse(void) {
  msh_stream *s = NULL;
  msh_event *e = NULL;
  CHECK_STATUS(msh_stream_new(NULL, MSH_CPU, 0), MSH_EINVAL);
  CHECK_STATUS(msh_stream_new(&s, MSH_CPU, 1), MSH_EINVAL); /* one CPU device */
  CHECK(strstr(msh_last_error(), "does not exist") != NULL);
  CHECK_STATUS(msh_stream_new(&s, 9, 0), MSH_EINVAL);
  CHECK(s == NULL);
  CHECK_STATUS(msh_event_new(&e, MSH_CPU, -1), MSH_EINVAL);
  CHECK(e == NULL);
  int n = 0;
  CHECK_OK(msh_device_count(MSH_CUDA, &n));
  if (n == 0) { /* no GPU, or no CUDA backend: a clear failure, nothing made */
    msh_status st = msh_stream_new(&s, MSH_CUDA, 0);
    CHECK(st == MSH_EINVAL || st == MSH_EUNSUPPORTED);
    CHECK(s == NULL);
    st = msh_event_new(&e, MSH_CUDA, 0);
    CHECK(st == MSH_EINVAL || st == MSH_EUNSUPPORTED);
    CHECK(e == NULL);
    st = msh_stream_set_current(MSH_CUDA, 0, NULL);
    CHECK(st == MSH_EINVAL || st == MSH_EUNSUPPORTED);
  }
  CHECK_STATUS(msh_stream_sync(NULL), MSH_EINVAL);
  CHECK_STATUS(msh_event_record(NULL, NULL), MSH_EINVAL);
  CHECK_STATUS(msh_stream_wait_event(NULL, NULL), MSH_EINVAL);
  CHECK_STATUS(msh_event_sync(NULL), MSH_EINVAL);
  int r = 0;
  CHECK_STATUS(msh_event_query(NULL, &r), MSH_EINVAL);
  CHECK_STATUS(msh_stream_set_current(7, 0, NULL), MSH_EINVAL);
  CHECK(msh_stream_device(NULL) == -1);
  msh_stream_free(NULL);
  msh_event_free(NULL);

  /* the device count and backends through the table */
  CHECK_OK(msh_device_count(MSH_CPU, &n));
  CHECK(n == 1);
  CHECK_STATUS(msh_device_count(5, &n), MSH_EINVAL);
  CHECK_STATUS(msh_device_set_staging(MSH_CPU, 0, 0, 0), MSH_EUNSUPPORTED);
  CHECK(strstr(msh_last_error(), "staging") != NULL);
  CHECK_STATUS(msh_device_staging_stats(MSH_CPU, 0, NULL, NULL, NULL, NULL), MSH_EUNSUPPORTED);
  CHECK(msh_has_cuda() == 0 || msh_has_cuda() == 1);
}

int main(void) {
  test_cpu_streams();
  test_pinned_and_copy_async();
  test_misuse();
  return check_done("test_stream");
}
