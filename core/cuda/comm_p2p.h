/* comm_p2p.h: peer-mapped all-reduce buffers of an NCCL communicator (comm_p2p.c). Not part of
 * the public API. */
#ifndef MSH_COMM_P2P_H
#define MSH_COMM_P2P_H

#include "internal.h"

#include <cuda_runtime_api.h>

typedef struct msh_p2p msh_p2p;

/* What a rank tells its peers about its region (exchanged as bytes). */
typedef struct msh_p2p_info {
  uint8_t handle[64]; /* cudaIpcMemHandle_t */
  uint64_t host;      /* same value on one running host */
  uint64_t ptr;       /* the region's address in its own process */
  int32_t pid, device;
  int32_t ok;         /* 1: the region exists and may be mapped */
  int32_t pad;
} msh_p2p_info;

/* Bytes of one rank's slot: the largest all-reduce taken (MSH_P2P_BYTES, default 2 MiB). */
size_t msh_p2p_slot_bytes(void);

/* Makes this rank's region and fills *info (always; info->ok 0 when the rank cannot take part:
 * MSH_P2P_ALLREDUCE=0, a size outside [2, 8], no memory). *out is NULL then. */
msh_status msh_p2p_prepare(int device_index, int rank, int size, double timeout, msh_p2p **out,
                           msh_p2p_info *info);

/* Maps every peer's region from all (size entries, by rank). 1 on success; 0 when some rank is
 * not ok, on another host, or cannot be mapped (p stays to be freed). */
int msh_p2p_connect(msh_p2p *p, const msh_p2p_info *all);

/* 1 when an all-reduce of t (op, optional acc) can take the one-shot path. */
int msh_p2p_fits(const msh_p2p *p, const msh_tensor *t, const msh_tensor *acc, int op);

/* Enqueues on st: acc += sum over ranks of t (acc non-NULL), or t = that sum. */
msh_status msh_p2p_all_reduce(msh_p2p *p, cudaStream_t st, msh_tensor *acc, const msh_tensor *t);

/* 1 when acc += sum of t, out = rmsnorm(acc) * w can run as one kernel: f32, rows of a multiple
 * of 4 elements, at most MSH_K_AR_MAX_BLOCKS rows, within the slot. */
int msh_p2p_fits_norm(const msh_p2p *p, const msh_tensor *acc, const msh_tensor *t, const msh_tensor *out);

/* Enqueues on st: acc += sum over ranks of t; out = acc / sqrt(mean(acc^2) + eps) * w, by rows. */
msh_status msh_p2p_all_reduce_norm(msh_p2p *p, cudaStream_t st, msh_tensor *acc, const msh_tensor *t,
                                   msh_tensor *out, const msh_tensor *w, float eps);

/* 1 when out = every rank's in (rank order) can take the one-shot gather: 16-byte multiples and
 * alignment (any size: it goes in slot-sized launches). */
int msh_p2p_fits_gather(const msh_p2p *p, const msh_tensor *out, const msh_tensor *in);
msh_status msh_p2p_all_gather(msh_p2p *p, cudaStream_t st, msh_tensor *out, const msh_tensor *in);

void msh_p2p_free(msh_p2p *p);

#endif
