/* test_cuda_stream.c: streams and events on a GPU.
 *   - a copy on one stream overlaps compute on another, ordered by events: the download of the
 *     compute's result waits for it (the output was NaN before), the compute that reads an upload
 *     waits for the upload (the buffer was NaN before); results checked against the CPU;
 *   - ops follow the thread's current stream; msh_device_sync and graphs still work on the
 *     default stream, and a graph captures a side stream made current; syncing a stream being
 *     captured is refused without breaking the capture;
 *   - pinned host tensors are pinned; copies from pageable memory and device-side conversions on
 *     a stream are right; events time work; misuse across devices is refused.
 * Timings belong to tools/bench_gpu_ops.c (stream_overlap). Exits 77 without a CUDA device. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "check.h"
#include "gpu_helpers.h"
#include "moonshard.h"

/* A device f32 tensor of NaN (an element read or copied before it is written shows). */
static msh_tensor *gpu_nan(int ndim, const int64_t *shape) {
  msh_tensor *h = cpu_new(MSH_F32, ndim, shape), *g = NULL;
  if (!h) return NULL;
  float *p = msh_tensor_data(h);
  for (int64_t i = 0; i < msh_tensor_numel(h); i++) p[i] = NAN;
  g = to_gpu(h);
  msh_tensor_free(h);
  return g;
}

static int all_equal(const msh_tensor *a, const msh_tensor *b) {
  return msh_tensor_numel(a) == msh_tensor_numel(b) &&
         !memcmp(msh_tensor_data(a), msh_tensor_data(b), (size_t)msh_tensor_numel(a) * sizeof(float));
}

/* ------------------------------------------------------------------- copy and compute overlap */

static void test_overlap(void) {
  printf("copy on one stream, compute on another\n");
  int64_t sq[2] = {4096, 4096}, vs[2] = {64, 4096}, bs[1] = {4096};
  msh_tensor *x = gpu_randn(MSH_F32, 2, sq, 1.0f), *w = gpu_randn(MSH_BF16, 2, sq, 0.02f);
  msh_tensor *o = gpu_nan(2, sq), *up = gpu_nan(2, vs), *out2 = gpu_nan(2, vs), *bias = gpu_randn(MSH_F32, 1, bs, 1.0f);
  msh_tensor *down = NULL, *src = NULL;
  CHECK_OK(msh_tensor_new_pinned(&down, MSH_F32, 2, sq));
  CHECK_OK(msh_tensor_new_pinned(&src, MSH_F32, 2, vs));
  CHECK(down && msh_tensor_is_pinned(down));
  msh_stream *compute = NULL, *copy = NULL;
  msh_event *computed = NULL, *uploaded = NULL;
  CHECK_OK(msh_stream_new(&compute, MSH_CUDA, 0));
  CHECK_OK(msh_stream_new(&copy, MSH_CUDA, 0));
  CHECK_OK(msh_event_new(&computed, MSH_CUDA, 0));
  CHECK_OK(msh_event_new(&uploaded, MSH_CUDA, 0));
  if (!(x && w && o && up && out2 && bias && down && src && compute && copy && computed && uploaded)) return;
  float *sp = msh_tensor_data(src);
  for (int64_t i = 0; i < 64 * 4096; i++) sp[i] = (float)((i * 7919) % 1000) * 0.001f - 0.5f;
  CHECK_OK(msh_device_sync(MSH_CUDA, 0)); /* the inputs, written on the default stream */

  /* compute: ~40 matmuls into o, then the event */
  CHECK_OK(msh_stream_set_current(MSH_CUDA, 0, compute));
  for (int i = 0; i < 40; i++) CHECK_OK(msh_op_matmul(o, x, w));
  CHECK_OK(msh_event_record(computed, NULL));
  /* copy: the upload goes at once (nothing orders it after the matmuls), then the download of o
   * waits for them */
  CHECK_OK(msh_tensor_copy_async(up, src, copy));
  CHECK_OK(msh_event_record(uploaded, copy));
  CHECK_OK(msh_stream_wait_event(copy, computed));
  CHECK_OK(msh_tensor_copy_async(down, o, copy));
  /* compute again, on the upload: waits for it */
  CHECK_OK(msh_stream_wait_event(NULL, uploaded));
  CHECK_OK(msh_op_scale(out2, up, 2.0f));
  CHECK_OK(msh_op_add_bias(out2, bias));
  int up_first = -1, comp_done = -1;
  CHECK_OK(msh_event_sync(uploaded));
  CHECK_OK(msh_event_query(computed, &comp_done));
  printf("  the upload finished while the matmuls were %s\n", comp_done ? "done already" : "still running (overlap)");
  up_first = !comp_done;
  (void)up_first;
  CHECK_OK(msh_stream_sync(copy));
  CHECK_OK(msh_stream_sync(compute));
  CHECK_OK(msh_stream_set_current(MSH_CUDA, 0, NULL));

  /* the download holds the matmul's result (no NaN: it waited) */
  msh_tensor *want = to_cpu(o);
  CHECK(want && all_equal(down, want));
  int nan_free = 1;
  const float *dp = msh_tensor_data(down);
  for (int64_t i = 0; i < 4096 * 4096; i += 4097) nan_free &= !isnan(dp[i]);
  CHECK(nan_free);
  /* the second compute read the uploaded values: out2 = 2 * src + bias, as the CPU computes it */
  msh_tensor *cw = cpu_new(MSH_F32, 2, vs), *cb = to_cpu(bias);
  if (cw && cb) {
    CHECK_OK(msh_op_scale(cw, src, 2.0f));
    CHECK_OK(msh_op_add_bias(cw, cb));
    COMPARE("2 * upload + bias after waiting for the upload", out2, cw, 1e-7);
  }
  msh_tensor *ts[] = {x, w, o, up, out2, bias, down, src, want, cw, cb};
  free_all(ts, 11);
  msh_event_free(computed);
  msh_event_free(uploaded);
  msh_stream_free(compute);
  msh_stream_free(copy);
}

/* ------------------------------------------------------------------ current stream, graphs */

static void test_current_and_graphs(void) {
  printf("current stream and graphs\n");
  int64_t n[1] = {1 << 16};
  msh_tensor *a = gpu_randn(MSH_F32, 1, n, 1.0f), *b = gpu_nan(1, n), *ca = a ? to_cpu(a) : NULL;
  msh_tensor *cb = cpu_new(MSH_F32, 1, n);
  msh_stream *s = NULL;
  CHECK_OK(msh_stream_new(&s, MSH_CUDA, 0));
  if (!(a && b && ca && cb && s)) return;
  CHECK_OK(msh_device_sync(MSH_CUDA, 0));
  CHECK_OK(msh_op_scale(cb, ca, 3.0f));

  /* an op on a side stream, then the default stream waits for it through an event */
  msh_event *e = NULL;
  CHECK_OK(msh_event_new(&e, MSH_CUDA, 0));
  CHECK_OK(msh_stream_set_current(MSH_CUDA, 0, s));
  CHECK_OK(msh_op_scale(b, a, 3.0f));
  CHECK_OK(msh_event_record(e, NULL));
  CHECK_OK(msh_stream_set_current(MSH_CUDA, 0, NULL));
  CHECK_OK(msh_stream_wait_event(NULL, e));
  COMPARE("scale on a side stream", b, cb, 0); /* the download runs on the default stream, after e */

  /* a graph on the default stream, as before streams */
  msh_graph *g = NULL;
  CHECK_OK(msh_graph_begin(MSH_CUDA, 0));
  CHECK_OK(msh_op_scale(b, a, -1.0f));
  CHECK_OK(msh_graph_end(MSH_CUDA, 0, &g));
  CHECK_OK(msh_op_scale(b, a, 5.0f)); /* overwritten by the replay below */
  CHECK_OK(msh_graph_launch(g));
  CHECK_OK(msh_op_scale(cb, ca, -1.0f));
  COMPARE("graph on the default stream", b, cb, 0);
  msh_graph_free(g);

  /* a graph captured on a side stream made current; syncing it meanwhile is refused */
  g = NULL;
  CHECK_OK(msh_stream_set_current(MSH_CUDA, 0, s));
  CHECK_OK(msh_graph_begin(MSH_CUDA, 0));
  CHECK_OK(msh_op_scale(b, a, 7.0f));
  CHECK_STATUS(msh_stream_sync(s), MSH_EINVAL);
  CHECK_OK(msh_graph_end(MSH_CUDA, 0, &g));
  CHECK_OK(msh_op_scale(b, a, 0.5f));
  CHECK_OK(msh_graph_launch(g)); /* on s, after the scale by 0.5 */
  CHECK_OK(msh_stream_sync(s));
  CHECK_OK(msh_stream_set_current(MSH_CUDA, 0, NULL));
  CHECK_OK(msh_op_scale(cb, ca, 7.0f));
  COMPARE("graph captured on a side stream", b, cb, 0);
  msh_graph_free(g);

  /* freeing the current stream makes the default current again */
  CHECK_OK(msh_stream_set_current(MSH_CUDA, 0, s));
  msh_stream_free(s);
  CHECK_OK(msh_op_scale(b, a, 3.0f));
  CHECK_OK(msh_op_scale(cb, ca, 3.0f));
  COMPARE("after freeing the current stream", b, cb, 0);

  msh_event_free(e);
  msh_tensor *ts[] = {a, b, ca, cb};
  free_all(ts, 4);
}

/* ---------------------------------------------------------------- copies, timing, misuse */

static void test_copies_and_events(int count) {
  printf("copies on a stream, events, misuse\n");
  int64_t sh[2] = {33, 257};
  msh_tensor *h = cpu_randn(MSH_F32, 2, sh, 1.0f), *d = gpu_nan(2, sh), *d16 = NULL, *back = cpu_new(MSH_F32, 2, sh);
  CHECK_OK(msh_tensor_new(&d16, MSH_BF16, 2, sh, MSH_CUDA, 0));
  msh_stream *s = NULL;
  CHECK_OK(msh_stream_new(&s, MSH_CUDA, 0));
  if (!(h && d && d16 && back && s)) return;
  CHECK_OK(msh_device_sync(MSH_CUDA, 0));
  /* pageable host memory: correct, just not overlapped */
  CHECK_OK(msh_tensor_copy_async(d, h, s));
  CHECK_OK(msh_tensor_copy_async(d16, d, s)); /* f32 -> bf16 on the device */
  CHECK_OK(msh_tensor_copy_async(d, d16, s)); /* and back */
  CHECK_OK(msh_tensor_copy_async(back, d, s));
  CHECK_OK(msh_stream_sync(s));
  msh_tensor *want = cpu_new(MSH_BF16, 2, sh), *want32 = cpu_new(MSH_F32, 2, sh);
  CHECK_OK(msh_tensor_copy(want, h));
  CHECK_OK(msh_tensor_copy(want32, want));
  CHECK(all_equal(back, want32));
  /* a host copy must be a byte copy */
  CHECK_STATUS(msh_tensor_copy_async(d16, h, s), MSH_EINVAL);

  /* events time work */
  msh_event *e0 = NULL, *e1 = NULL;
  CHECK_OK(msh_event_new(&e0, MSH_CUDA, 0));
  CHECK_OK(msh_event_new(&e1, MSH_CUDA, 0));
  CHECK_OK(msh_event_record(e0, s));
  int64_t big[1] = {1 << 24};
  msh_tensor *x = gpu_randn(MSH_F32, 1, big, 1.0f);
  CHECK_OK(msh_device_sync(MSH_CUDA, 0));
  CHECK_OK(msh_stream_set_current(MSH_CUDA, 0, s));
  for (int i = 0; i < 20 && x; i++) CHECK_OK(msh_op_scale(x, x, 1.0001f));
  CHECK_OK(msh_stream_set_current(MSH_CUDA, 0, NULL));
  CHECK_OK(msh_event_record(e1, s));
  CHECK_OK(msh_event_sync(e1));
  int ready = 0;
  CHECK_OK(msh_event_query(e1, &ready));
  CHECK(ready == 1);
  float ms = -1;
  CHECK_OK(msh_event_elapsed_ms(e0, e1, &ms));
  CHECK(ms > 0);
  printf("  20 scales of 64 MiB: %.3f ms of device time\n", ms);

  /* misuse: another device's stream, a device that does not exist */
  msh_stream *bad = NULL;
  CHECK_STATUS(msh_stream_new(&bad, MSH_CUDA, count), MSH_EINVAL);
  CHECK(bad == NULL);
  msh_stream *cpu = NULL;
  CHECK_OK(msh_stream_new(&cpu, MSH_CPU, 0));
  CHECK_STATUS(msh_event_record(e0, cpu), MSH_EINVAL);
  CHECK_STATUS(msh_tensor_copy_async(d, h, cpu), MSH_EINVAL);
  CHECK_STATUS(msh_stream_set_current(MSH_CUDA, 0, cpu), MSH_EINVAL);
  msh_stream_free(cpu);

  msh_event_free(e0);
  msh_event_free(e1);
  msh_stream_free(s);
  msh_tensor *ts[] = {h, d, d16, back, want, want32, x};
  free_all(ts, 7);
}

int main(void) {
  int count = 0;
  CHECK_OK(msh_device_count(MSH_CUDA, &count));
  if (count == 0) {
    printf("test_cuda_stream: no CUDA device, skipped\n");
    return 77;
  }
  test_overlap();
  test_current_and_graphs();
  test_copies_and_events(count);
  return check_done("test_cuda_stream");
}
