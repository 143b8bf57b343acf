/* cuda_graph.c: CUDA graphs over a device's stream: capture (begin/end), replay and release.
 *
 * A capture records every op queued on the stream that was the calling thread's current one at
 * begin (the device's default stream unless msh_stream_set_current chose another), from any
 * thread queuing there, until the end; the
 * graph then replays those kernels with the same arguments. Ops that would wait for the device
 * meanwhile (host copies, results read back, allocation, scratch growth) refuse with MSH_EINVAL
 * rather than break the capture, and device memory released during it is freed at the end. The
 * graph keeps the scratch block it was captured over, so later growth of the scratch (an eager
 * prompt longer than any before) cannot free memory the graph still uses. */
#include "cuda_internal.h"

#include <stdlib.h>

typedef struct {
  int device_index;
  cudaGraphExec_t exec;
  cudaStream_t launched_on;  /* the stream of the last replay (waited for before the graph goes) */
  msh_cuda_block *scratch; /* the scratch block current at the end of the capture, or NULL */
} cuda_graph;

msh_status msh_cuda_graph_begin(int device_index) {
  msh_cuda_dev *d;
  msh_status s = msh_cuda_dev_get(device_index, &d);
  if (s != MSH_OK) return s;
  if (msh_cuda_capturing(d))
    return MSH_FAIL(MSH_EINVAL, "a graph is already being captured on CUDA device %d (msh_graph_end first)",
                    device_index);
  /* relaxed: other threads may still allocate and synchronize their own streams */
  cudaStream_t st = msh_cuda_cur(d);
  CUDA_TRY(cudaStreamBeginCapture(st, cudaStreamCaptureModeRelaxed));
  d->capture_stream = st;
  msh_cuda_set_capturing(d, 1);
  return MSH_OK;
}

msh_status msh_cuda_graph_end(int device_index, void **out) {
  msh_cuda_dev *d;
  msh_status s = msh_cuda_dev_get(device_index, &d);
  if (s != MSH_OK) return s;
  if (!__atomic_load_n(&d->capturing, __ATOMIC_ACQUIRE))
    return MSH_FAIL(MSH_EINVAL, "no graph is being captured on CUDA device %d (msh_graph_begin first)", device_index);
  cudaGraph_t graph = NULL;
  cudaStream_t st = d->capture_stream; /* the stream begin captured, whichever thread ends it */
  cudaError_t e = cudaStreamEndCapture(st, &graph);
  msh_cuda_set_capturing(d, 0); /* the stream runs ops again, whatever the outcome */
  if (e == cudaErrorStreamCaptureInvalidated) {
    (void)cudaGetLastError();
    if (graph) cudaGraphDestroy(graph);
    return MSH_FAIL(MSH_EDEVICE, "the capture on CUDA device %d was invalidated (an operation not allowed in a "
                    "graph reached the stream); nothing was recorded and the stream runs ops again", device_index);
  }
  CUDA_TRY(e);
  cuda_graph *g = calloc(1, sizeof *g);
  if (!g) {
    cudaGraphDestroy(graph);
    return MSH_FAIL(MSH_ENOMEM, "out of memory");
  }
  e = cudaGraphInstantiate(&g->exec, graph, 0);
  cudaGraphDestroy(graph); /* the executable graph is independent of it */
  if (e == cudaSuccess) e = cudaGraphUpload(g->exec, st); /* the first replay starts at once */
  s = msh_cuda_check_at(MSH_CUDA_RT, e, "cudaGraphInstantiate", __FILE__, __LINE__, __func__);
  if (s != MSH_OK) {
    if (g->exec) cudaGraphExecDestroy(g->exec);
    (void)cudaGetLastError();
    free(g);
    return s;
  }
  g->device_index = device_index;
  g->launched_on = st;
  g->scratch = d->scratch;
  if (g->scratch) msh_cuda_block_retain(g->scratch);
  *out = g;
  return MSH_OK;
}

msh_status msh_cuda_graph_launch(void *p) {
  cuda_graph *g = p;
  msh_cuda_dev *d;
  msh_status s = msh_cuda_dev_get(g->device_index, &d);
  if (s != MSH_OK) return s;
  cudaStream_t st = msh_cuda_cur(d);
  CUDA_TRY(cudaGraphLaunch(g->exec, st));
  g->launched_on = st;
  return MSH_OK;
}

void msh_cuda_graph_free(void *p) {
  cuda_graph *g = p;
  if (!g) return;
  msh_cuda_dev *d;
  if (msh_cuda_dev_get(g->device_index, &d) == MSH_OK) {
    /* replays still queued use the graph's scratch: let them finish (not possible, and not
     * needed, in the middle of a capture: the block is then freed at its end) */
    if (!msh_cuda_capturing(d)) (void)cudaStreamSynchronize(g->launched_on);
    cudaGraphExecDestroy(g->exec);
    (void)cudaGetLastError();
    msh_cuda_block_release(d, g->scratch);
  }
  free(g);
}
