/* comm_p2p.c: the peer-mapped buffers behind the one-shot all-reduce of kernels/allreduce.cu.
 *
 * A communicator whose ranks all sit on one host (and whose GPUs can reach each other) gives
 * every rank a region of device memory that every peer maps: through CUDA IPC handles between
 * processes, or directly with peer access between threads of one process. comm_nccl.c makes the
 * exchange (msh_p2p_info over an NCCL all-gather) and the agreement (every rank connected, or
 * none uses it); this file owns the regions and runs the kernel. Small all-reduces go through it
 * instead of NCCL: a few microseconds against NCCL's tens, and capturable in CUDA graphs. */
#ifdef MSH_WITH_NCCL

#include "cuda_internal.h"
#include "comm_p2p.h"
#include "msh_kernels.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct msh_p2p {
  int rank, size, device_index;
  size_t slot;                          /* bytes of one source's slot */
  char *region;                         /* this rank's: data [2][size][slot], then the flags */
  uint32_t *epoch;                      /* this rank's per-block counters */
  char *bufs[MSH_K_AR_MAX_RANKS];       /* every rank's data, as mapped here */
  uint32_t *flags[MSH_K_AR_MAX_RANKS];  /* every rank's flags, as mapped here */
  void *opened[MSH_K_AR_MAX_RANKS];     /* IPC mappings to close */
  uint64_t timeout_ns;
};

static size_t data_bytes(int size, size_t slot) { return 2 * (size_t)size * slot; }
static size_t flag_bytes(int size) { return (size_t)size * MSH_K_AR_MAX_BLOCKS * sizeof(uint32_t); }

/* FNV-1a of the host name and the boot id: equal for processes of one running host. */
static uint64_t host_id(void) {
  char buf[512] = {0};
  gethostname(buf, 255);
  FILE *f = fopen("/proc/sys/kernel/random/boot_id", "r");
  if (f) {
    size_t n = strlen(buf);
    if (!fgets(buf + n, (int)(sizeof buf - n), f)) buf[n] = 0;
    fclose(f);
  }
  uint64_t h = 1469598103934665603ull;
  for (const char *p = buf; *p; p++) h = (h ^ (unsigned char)*p) * 1099511628211ull;
  return h;
}

size_t msh_p2p_slot_bytes(void) {
  const char *e = getenv("MSH_P2P_BYTES");
  long long v = e ? atoll(e) : 0;
  return v >= 4096 ? (size_t)v : (size_t)2 << 20;
}

msh_status msh_p2p_prepare(int device_index, int rank, int size, double timeout, msh_p2p **out,
                           msh_p2p_info *info) {
  memset(info, 0, sizeof *info);
  *out = NULL;
  info->host = host_id();
  info->pid = (int32_t)getpid();
  info->device = device_index;
  const char *env = getenv("MSH_P2P_ALLREDUCE");
  if ((env && strcmp(env, "0") == 0) || size < 2 || size > MSH_K_AR_MAX_RANKS) return MSH_OK; /* ok = 0 */
  msh_cuda_dev *d;
  msh_status s = msh_cuda_dev_get(device_index, &d);
  if (s != MSH_OK) return s;
  msh_p2p *p = calloc(1, sizeof *p);
  if (!p) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  p->rank = rank;
  p->size = size;
  p->device_index = device_index;
  p->slot = msh_p2p_slot_bytes();
  p->timeout_ns = (uint64_t)(timeout * 1e9);
  size_t bytes = data_bytes(size, p->slot) + flag_bytes(size);
  /* without memory for the region this rank says no; the others then go without it too */
  if (cudaMalloc((void **)&p->region, bytes) != cudaSuccess ||
      cudaMalloc((void **)&p->epoch, MSH_K_AR_MAX_BLOCKS * sizeof(uint32_t)) != cudaSuccess ||
      cudaMemset(p->region, 0, bytes) != cudaSuccess ||
      cudaMemset(p->epoch, 0, MSH_K_AR_MAX_BLOCKS * sizeof(uint32_t)) != cudaSuccess ||
      cudaIpcGetMemHandle((cudaIpcMemHandle_t *)info->handle, p->region) != cudaSuccess ||
      cudaDeviceSynchronize() != cudaSuccess) {
    (void)cudaGetLastError();
    msh_p2p_free(p);
    return MSH_OK;
  }
  info->ptr = (uint64_t)(uintptr_t)p->region;
  info->ok = 1;
  *out = p;
  return MSH_OK;
}

int msh_p2p_connect(msh_p2p *p, const msh_p2p_info *all) {
  if (!p) return 0;
  for (int r = 0; r < p->size; r++)
    if (!all[r].ok || all[r].host != all[p->rank].host) return 0;
  for (int r = 0; r < p->size; r++) {
    char *base = NULL;
    if (r == p->rank) {
      base = p->region;
    } else if (all[r].pid == all[p->rank].pid) {
      /* another thread of this process: the pointer itself, with peer access */
      int can = 0;
      if (cudaDeviceCanAccessPeer(&can, p->device_index, all[r].device) != cudaSuccess || !can) {
        (void)cudaGetLastError();
        if (all[r].device != p->device_index) return 0;
      } else {
        cudaError_t e = cudaDeviceEnablePeerAccess(all[r].device, 0);
        if (e != cudaSuccess && e != cudaErrorPeerAccessAlreadyEnabled) {
          (void)cudaGetLastError();
          return 0;
        }
        (void)cudaGetLastError();
      }
      base = (char *)(uintptr_t)all[r].ptr;
    } else {
      cudaIpcMemHandle_t h;
      memcpy(&h, all[r].handle, sizeof h);
      if (cudaIpcOpenMemHandle((void **)&base, h, cudaIpcMemLazyEnablePeerAccess) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
      }
      p->opened[r] = base;
    }
    p->bufs[r] = base;
    p->flags[r] = (uint32_t *)(base + data_bytes(p->size, p->slot));
  }
  return 1;
}

int msh_p2p_fits(const msh_p2p *p, const msh_tensor *t, const msh_tensor *acc, int op) {
  if (!p || op != MSH_REDUCE_SUM) return 0;
  if (t->dtype != MSH_F32 && t->dtype != MSH_F16 && t->dtype != MSH_BF16) return 0;
  if ((uint64_t)msh_tensor_numel(t) * msh_dtype_size(t->dtype) > p->slot) return 0;
  if (((uintptr_t)msh_tensor_ptr(t) & 15) != 0) return 0;
  if (acc && (acc->dtype != t->dtype || ((uintptr_t)msh_tensor_ptr(acc) & 15) != 0)) return 0;
  return 1;
}

msh_status msh_p2p_all_reduce(msh_p2p *p, cudaStream_t st, msh_tensor *acc, const msh_tensor *t) {
  void *out = acc ? msh_tensor_ptr(acc) : msh_tensor_ptr(t);
  CUDA_TRY(msh_k_allreduce_oneshot(st, p->bufs, p->flags, p->epoch, p->rank, p->size, p->slot, out,
                                   msh_tensor_ptr(t), t->dtype, msh_tensor_numel(t), acc != NULL, p->timeout_ns));
  return MSH_OK;
}

int msh_p2p_fits_norm(const msh_p2p *p, const msh_tensor *acc, const msh_tensor *t, const msh_tensor *out) {
  if (!msh_p2p_fits(p, t, acc, MSH_REDUCE_SUM) || t->dtype != MSH_F32 || out->dtype != MSH_F32) return 0;
  int64_t D = t->ndim ? t->shape[t->ndim - 1] : 1, R = D ? msh_tensor_numel(t) / D : 0;
  return D % 4 == 0 && R <= MSH_K_AR_MAX_BLOCKS && ((uintptr_t)msh_tensor_ptr(out) & 15) == 0;
}

msh_status msh_p2p_all_reduce_norm(msh_p2p *p, cudaStream_t st, msh_tensor *acc, const msh_tensor *t,
                                   msh_tensor *out, const msh_tensor *w, float eps) {
  int64_t D = t->ndim ? t->shape[t->ndim - 1] : 1, R = msh_tensor_numel(t) / D;
  CUDA_TRY(msh_k_allreduce_oneshot_norm(st, p->bufs, p->flags, p->epoch, p->rank, p->size, p->slot,
                                        msh_tensor_ptr(acc), msh_tensor_ptr(t), msh_tensor_ptr(out),
                                        msh_tensor_ptr(w), w->dtype, R, D, eps, p->timeout_ns));
  return MSH_OK;
}

int msh_p2p_fits_gather(const msh_p2p *p, const msh_tensor *out, const msh_tensor *in) {
  if (!p) return 0;
  uint64_t bytes = (uint64_t)msh_tensor_numel(in) * msh_dtype_size(in->dtype);
  return bytes % 16 == 0 && ((uintptr_t)msh_tensor_ptr(in) & 15) == 0 && ((uintptr_t)msh_tensor_ptr(out) & 15) == 0;
}

msh_status msh_p2p_all_gather(msh_p2p *p, cudaStream_t st, msh_tensor *out, const msh_tensor *in) {
  int64_t bytes = (int64_t)msh_tensor_numel(in) * (int64_t)msh_dtype_size(in->dtype);
  char *o = msh_tensor_ptr(out);
  const char *x = msh_tensor_ptr(in);
  /* slot-sized pieces, one launch each (every rank makes the same launches) */
  for (int64_t off = 0; off < bytes; off += (int64_t)p->slot) {
    int64_t n = bytes - off < (int64_t)p->slot ? bytes - off : (int64_t)p->slot;
    CUDA_TRY(msh_k_allgather_oneshot(st, p->bufs, p->flags, p->epoch, p->rank, p->size, p->slot, o + off, bytes,
                                     x + off, n, p->timeout_ns));
  }
  return MSH_OK;
}

void msh_p2p_free(msh_p2p *p) {
  if (!p) return;
  for (int r = 0; r < MSH_K_AR_MAX_RANKS; r++)
    if (p->opened[r]) cudaIpcCloseMemHandle(p->opened[r]);
  cudaFree(p->region);
  cudaFree(p->epoch);
  (void)cudaGetLastError();
  free(p);
}

#else
typedef int msh_comm_p2p_unused;
#endif
