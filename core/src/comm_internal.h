/* comm_internal.h: the communicator interface shared by comm.c (checks, dispatch) and the
 * engines (core/cpu/comm_tcp.c, core/cuda/comm_nccl.c). Not part of the public API. */
#ifndef MSH_COMM_INTERNAL_H
#define MSH_COMM_INTERNAL_H

#include "internal.h"
#include "timer_internal.h"

/* An engine's operations. comm.c has checked every operand before calling in: tensors contiguous
 * and on the communicator's device, dtypes and element counts consistent, roots and peers in
 * range, outputs writable, and the communicator not broken. */
typedef struct msh_comm_vt {
  const char *name;
  msh_status (*all_reduce)(msh_comm *c, msh_tensor *t, int op);
  /* acc += sum over ranks of t (t may change); NULL: all_reduce, then msh_op_add */
  msh_status (*all_reduce_add)(msh_comm *c, msh_tensor *acc, msh_tensor *t);
  /* acc += sum over ranks of t, then out = rmsnorm(acc) * w; NULL: all_reduce_add, then
   * msh_op_rmsnorm (comm.c has checked out and w) */
  msh_status (*all_reduce_add_norm)(msh_comm *c, msh_tensor *acc, msh_tensor *t, msh_tensor *out,
                                    const msh_tensor *w, float eps);
  /* 1 when an all-reduce (sum) of t, or an all-gather of t (op), can be captured into a CUDA
   * graph; NULL: never */
  int (*capturable)(const msh_comm *c, int op, const msh_tensor *t);
  msh_status (*all_gather)(msh_comm *c, msh_tensor *out, const msh_tensor *in);
  msh_status (*reduce_scatter)(msh_comm *c, msh_tensor *out, const msh_tensor *in, int op);
  msh_status (*broadcast)(msh_comm *c, msh_tensor *t, int root);
  msh_status (*send)(msh_comm *c, const msh_tensor *t, int peer);
  msh_status (*recv)(msh_comm *c, msh_tensor *t, int peer);
  msh_status (*barrier)(msh_comm *c);
  /* As msh_comm_split (color >= 0 or MSH_COMM_NO_COLOR; *out NULL for no color). */
  msh_status (*split)(msh_comm *c, int color, int key, msh_comm **out);
  void (*abort)(msh_comm *c);
  void (*destroy)(msh_comm *c); /* frees the engine's state and the struct itself */
} msh_comm_vt;

/* One call in the event ring (msh_comm_set_events). */
typedef struct msh_comm_rec {
  int op, peer;
  int device;          /* 1: start and end were recorded on the device's stream */
  uint64_t bytes;
  double t, seconds;   /* host clock at the call; host seconds inside it */
  msh_timer *start, *end; /* device timers of an NCCL communicator (NULL for TCP) */
} msh_comm_rec;

/* The common head of every communicator (engines embed it first). */
struct msh_comm {
  const msh_comm_vt *vt;
  int kind;          /* MSH_COMM_TCP, MSH_COMM_NCCL */
  int device;        /* MSH_CPU, MSH_CUDA */
  int device_index;
  int rank, size;
  int *world_ranks;  /* size entries: world rank of each rank, for messages */
  double timeout;    /* seconds without progress before a call fails */
  int broken;        /* set by the first failure or by abort */
  char error[512];   /* the first failure's message */
  uint64_t calls[MSH_COMM_OP_COUNT], bytes[MSH_COMM_OP_COUNT];
  double seconds[MSH_COMM_OP_COUNT];
  /* event ring: records [tail, head) are pending, slot i % cap; cap 0: recording off */
  msh_comm_rec *ring;
  int ring_cap;
  uint64_t ring_head, ring_tail, ring_dropped;
};

/* Fills the head (world_ranks copied, or the identity when NULL). MSH_ENOMEM. */
msh_status msh_comm_init_head(msh_comm *c, const msh_comm_vt *vt, int kind, int device,
                              int device_index, int rank, int size, const int *world_ranks,
                              double timeout);
void msh_comm_free_head(msh_comm *c);

/* Marks c broken with the thread's last error as the reason (first failure wins); returns s. */
msh_status msh_comm_fail(msh_comm *c, msh_status s);

/* Engines. */
msh_status msh_tcp_comm_new(msh_comm **out, msh_tcp_listener *l, int rank, int world,
                            const char *const *addrs, const int *world_ranks, double timeout_s);
#ifdef MSH_WITH_NCCL
msh_status msh_nccl_get_unique_id(uint8_t *id);
msh_status msh_nccl_comm_new(msh_comm **out, int rank, int world, const uint8_t *id,
                             int device_index);
#endif

#endif
