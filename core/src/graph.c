/* graph.c: the public face of device graphs (capture, replay, release), handed to the backend of
 * the device kind; backends without graphs (the CPU) answer MSH_EUNSUPPORTED. */
#include "internal.h"

#include <stdlib.h>

struct msh_graph {
  const msh_backend *be;
  void *impl; /* the backend's graph */
};

/* The backend of kind if it records graphs; NULL with the error set otherwise. */
static const msh_backend *graph_backend(int kind) {
  const msh_backend *be = msh_backend_for(kind);
  if (!be) return NULL;
  if (!be->graph_begin) {
    MSH_FAIL(MSH_EUNSUPPORTED, "the %s backend has no graphs: ops run as they are issued", be->name);
    return NULL;
  }
  return be;
}

msh_status msh_graph_begin(int kind, int device_index) {
  const msh_backend *be = graph_backend(kind);
  if (!be) return MSH_EUNSUPPORTED;
  return be->graph_begin(device_index);
}

msh_status msh_graph_end(int kind, int device_index, msh_graph **out) {
  if (!out) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  const msh_backend *be = graph_backend(kind);
  if (!be) return MSH_EUNSUPPORTED;
  void *impl = NULL;
  msh_status s = be->graph_end(device_index, &impl); /* the capture ends here, whatever follows */
  if (s != MSH_OK) return s;
  msh_graph *g = calloc(1, sizeof *g);
  if (!g) {
    be->graph_free(impl);
    return MSH_FAIL(MSH_ENOMEM, "out of memory");
  }
  g->be = be;
  g->impl = impl;
  *out = g;
  return MSH_OK;
}

msh_status msh_graph_launch(msh_graph *g) {
  if (!g) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  return g->be->graph_launch(g->impl);
}

void msh_graph_free(msh_graph *g) {
  if (!g) return;
  g->be->graph_free(g->impl);
  free(g);
}
