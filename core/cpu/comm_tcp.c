/* comm_tcp.c: the TCP communicator between CPU ranks.
 *
 * Every pair of ranks shares one TCP connection (a full mesh, made at creation: rank r connects
 * to each lower rank's listener and accepts the higher ranks). Sockets are non-blocking; a small
 * progress engine moves the bytes of one step (a send and a receive, or several) at once with
 * poll(), so rings never deadlock on full socket buffers, and fails a step that makes no progress
 * for the communicator's timeout or whose peer goes away.
 *
 *   all_reduce      ring reduce-scatter then ring all-gather (2 (W - 1) steps of n / W elements)
 *   reduce_scatter  the first half, on a copy of the input
 *   all_gather      the second half
 *   broadcast       a chain from the root, pipelined in segments
 *   send / recv     an 8-byte length, then the bytes (the receiver checks the length)
 *   barrier         dissemination: ceil(log2 W) rounds of one-byte tokens
 *   split           all-gather of (color, key, port), then a new mesh among each color's ranks
 */
#define _GNU_SOURCE
#include "comm_internal.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { HELLO_MAGIC = 0x4d534843u /* "MSHC" */, HELLO_VERSION = 1, SEGMENT = 1 << 18 };

/* ----------------------------------------------------------------------------- helpers */

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int poll_ms(double seconds) {
  if (seconds <= 0) return 0;
  double ms = seconds * 1000 + 1;
  return ms > 1e9 ? 1000000000 : (int)ms;
}

static void close_fd(int *fd) {
  if (*fd >= 0) close(*fd);
  *fd = -1;
}

static int set_nonblocking(int fd) {
  int fl = fcntl(fd, F_GETFL, 0);
  return fl < 0 ? -1 : fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static void set_nodelay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* Splits "host:port" (the last colon separates; "[v6]:port" brackets are dropped). */
static int parse_addr(const char *addr, char *host, size_t cap, int *port) {
  const char *colon = strrchr(addr, ':');
  if (!colon || colon == addr) return -1;
  const char *h = addr;
  size_t hl = (size_t)(colon - addr);
  if (h[0] == '[' && hl >= 2 && h[hl - 1] == ']') {
    h++;
    hl -= 2;
  }
  if (hl == 0 || hl >= cap) return -1;
  memcpy(host, h, hl);
  host[hl] = '\0';
  char *end;
  long p = strtol(colon + 1, &end, 10);
  if (*end || end == colon + 1 || p <= 0 || p > 65535) return -1;
  *port = (int)p;
  return 0;
}

/* ---------------------------------------------------------------------------- listener */

struct msh_tcp_listener {
  int fd;
  int port;
};

msh_status msh_tcp_listen(msh_tcp_listener **out, const char *host, int port) {
  if (!out) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (port < 0 || port > 65535) return MSH_FAIL(MSH_EINVAL, "port %d out of range", port);
  if (!host || !*host) host = "0.0.0.0";
  struct addrinfo hints = {0}, *res = NULL;
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  char ports[16];
  snprintf(ports, sizeof ports, "%d", port);
  int rc = getaddrinfo(host, ports, &hints, &res);
  if (rc != 0) return MSH_FAIL(MSH_EIO, "cannot resolve '%s': %s", host, gai_strerror(rc));
  int fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    freeaddrinfo(res);
    return MSH_FAIL(MSH_EIO, "socket: %s", strerror(errno));
  }
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (bind(fd, res->ai_addr, res->ai_addrlen) != 0 || listen(fd, SOMAXCONN) != 0) {
    int e = errno;
    freeaddrinfo(res);
    close(fd);
    return MSH_FAIL(MSH_EIO, "cannot listen on %s:%d: %s", host, port, strerror(e));
  }
  freeaddrinfo(res);
  struct sockaddr_in sa;
  socklen_t len = sizeof sa;
  if (getsockname(fd, (struct sockaddr *)&sa, &len) != 0 || set_nonblocking(fd) != 0) {
    int e = errno;
    close(fd);
    return MSH_FAIL(MSH_EIO, "listening socket: %s", strerror(e));
  }
  msh_tcp_listener *l = malloc(sizeof *l);
  if (!l) {
    close(fd);
    return MSH_FAIL(MSH_ENOMEM, "out of memory");
  }
  l->fd = fd;
  l->port = ntohs(sa.sin_port);
  *out = l;
  return MSH_OK;
}

int msh_tcp_listener_port(const msh_tcp_listener *l) { return l ? l->port : -1; }

void msh_tcp_listener_free(msh_tcp_listener *l) {
  if (!l) return;
  close(l->fd);
  free(l);
}

/* -------------------------------------------------------------------------- communicator */

typedef struct tcp_comm {
  msh_comm head;
  int *fds;        /* size entries: the connection to each rank, -1 for this rank */
  char **addrs;    /* "host:port" of each rank, for messages and splits */
  char *scratch;   /* receive and work space, grown on demand */
  size_t scratch_cap;
} tcp_comm;

static const msh_comm_vt tcp_vt;

static void tcp_destroy(msh_comm *base) {
  tcp_comm *c = (tcp_comm *)base;
  for (int i = 0; c->fds && i < base->size; i++) close_fd(&c->fds[i]);
  for (int i = 0; c->addrs && i < base->size; i++) free(c->addrs[i]);
  free(c->fds);
  free(c->addrs);
  free(c->scratch);
  msh_comm_free_head(base);
  free(c);
}

static void tcp_abort(msh_comm *base) {
  tcp_comm *c = (tcp_comm *)base;
  for (int i = 0; i < base->size; i++)
    if (c->fds[i] >= 0) shutdown(c->fds[i], SHUT_RDWR);
}

static const char *peer_addr(const tcp_comm *c, int r) { return c->addrs[r] ? c->addrs[r] : "?"; }

static msh_status scratch(tcp_comm *c, size_t bytes, char **out) {
  if (bytes > c->scratch_cap) {
    char *p = realloc(c->scratch, bytes);
    if (!p) return MSH_FAIL(MSH_ENOMEM, "out of memory (%zu bytes of scratch)", bytes);
    c->scratch = p;
    c->scratch_cap = bytes;
  }
  *out = c->scratch;
  return MSH_OK;
}

/* ---------------------------------------------------------------------- progress engine */

typedef struct {
  int peer;      /* rank in the communicator */
  int is_send;
  char *buf;
  size_t n, done;
} io_t;

static int aborted(const tcp_comm *c) { return __atomic_load_n(&c->head.broken, __ATOMIC_ACQUIRE); }

/* Moves every io's bytes, concurrently. Fails (MSH_EIO) when a peer closes its connection or an
 * error occurs, or when no byte moves for the communicator's timeout. */
static msh_status progress(tcp_comm *c, const char *op, io_t *io, int nio) {
  struct pollfd pfd[8];
  int idx[8];
  if (nio > 8) return MSH_FAIL(MSH_EINVAL, "too many transfers at once (%d)", nio);
  double last = now_s();
  for (;;) {
    int moved = 0, pending = 0;
    for (int i = 0; i < nio; i++) {
      io_t *x = &io[i];
      int fd = c->fds[x->peer];
      while (x->done < x->n) {
        ssize_t k = x->is_send ? send(fd, x->buf + x->done, x->n - x->done, MSG_NOSIGNAL)
                               : recv(fd, x->buf + x->done, x->n - x->done, 0);
        if (k > 0) {
          x->done += (size_t)k;
          moved = 1;
          continue;
        }
        if (k < 0 && errno == EINTR) continue;
        if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        int wr = c->head.world_ranks[x->peer];
        if (aborted(c)) return MSH_FAIL(MSH_EIO, "%s: the communicator was aborted", op);
        if (k == 0 || errno == ECONNRESET || errno == EPIPE)
          return MSH_FAIL(MSH_EIO, "%s: rank %d (%s) closed the connection (did it exit?)", op, wr,
                          peer_addr(c, x->peer));
        return MSH_FAIL(MSH_EIO, "%s: connection to rank %d (%s) failed: %s", op, wr,
                        peer_addr(c, x->peer), strerror(errno));
      }
      if (x->done < x->n) {
        pfd[pending].fd = fd;
        pfd[pending].events = x->is_send ? POLLOUT : POLLIN;
        pfd[pending].revents = 0;
        idx[pending++] = i;
      }
    }
    if (!pending) return MSH_OK;
    double t = now_s();
    if (moved) last = t;
    double left = c->head.timeout - (t - last);
    int rc = left > 0 ? poll(pfd, (nfds_t)pending, poll_ms(left)) : 0;
    if (rc < 0 && errno != EINTR) return MSH_FAIL(MSH_EIO, "%s: poll: %s", op, strerror(errno));
    if (rc == 0 && now_s() - last >= c->head.timeout) {
      io_t *x = &io[idx[0]];
      if (aborted(c)) return MSH_FAIL(MSH_EIO, "%s: the communicator was aborted", op);
      return MSH_FAIL(MSH_EIO, "%s: timed out after %g s %s rank %d (%s)", op, c->head.timeout,
                      x->is_send ? "sending to" : "waiting for", c->head.world_ranks[x->peer],
                      peer_addr(c, x->peer));
    }
  }
}

static inline io_t io_send(int peer, const void *buf, size_t n) {
  io_t x = {peer, 1, (char *)buf, n, 0};
  return x;
}
static inline io_t io_recv(int peer, void *buf, size_t n) {
  io_t x = {peer, 0, (char *)buf, n, 0};
  return x;
}

/* One ring step: send to the right neighbour while receiving from the left. */
static msh_status ring_step(tcp_comm *c, const char *op, const void *sbuf, size_t sn, void *rbuf,
                            size_t rn) {
  int W = c->head.size, r = c->head.rank;
  io_t io[2];
  int n = 0;
  if (sn) io[n++] = io_send((r + 1) % W, sbuf, sn);
  if (rn) io[n++] = io_recv((r + W - 1) % W, rbuf, rn);
  return progress(c, op, io, n);
}

/* ---------------------------------------------------------------------------- reductions */

static void reduce_into(void *dst, const void *src, int64_t n, int dtype, int op) {
  if (dtype == MSH_F32) {
    float *d = dst;
    const float *s = src;
    if (op == MSH_REDUCE_SUM)
      for (int64_t i = 0; i < n; i++) d[i] += s[i];
    else
      for (int64_t i = 0; i < n; i++) d[i] = s[i] > d[i] ? s[i] : d[i];
  } else {
    int32_t *d = dst;
    const int32_t *s = src;
    if (op == MSH_REDUCE_SUM)
      for (int64_t i = 0; i < n; i++) d[i] = (int32_t)((uint32_t)d[i] + (uint32_t)s[i]);
    else
      for (int64_t i = 0; i < n; i++) d[i] = s[i] > d[i] ? s[i] : d[i];
  }
}

/* Chunk i of the ring covers elements [off[i], off[i + 1]). */
static inline int mod(int a, int w) { return ((a % w) + w) % w; }

/* Ring reduce-scatter over buf in place: afterwards this rank's chunk `rank` holds the reduction
 * over all ranks (other chunks hold partial sums). tmp holds the largest chunk. */
static msh_status ring_reduce_scatter(tcp_comm *c, const char *op_name, char *buf, const int64_t *off,
                                      size_t es, int dtype, int op, char *tmp) {
  int W = c->head.size, r = c->head.rank;
  for (int s = 0; s < W - 1; s++) {
    int si = mod(r - s - 1, W), ri = mod(r - s - 2, W);
    int64_t rn = off[ri + 1] - off[ri];
    msh_status st = ring_step(c, op_name, buf + off[si] * es, (size_t)(off[si + 1] - off[si]) * es, tmp,
                              (size_t)rn * es);
    if (st != MSH_OK) return st;
    reduce_into(buf + off[ri] * es, tmp, rn, dtype, op);
  }
  return MSH_OK;
}

/* Ring all-gather in place: this rank's chunk `rank` goes to everyone. */
static msh_status ring_all_gather(tcp_comm *c, const char *op_name, char *buf, const int64_t *off,
                                  size_t es) {
  int W = c->head.size, r = c->head.rank;
  for (int s = 0; s < W - 1; s++) {
    int si = mod(r - s, W), ri = mod(r - s - 1, W);
    msh_status st = ring_step(c, op_name, buf + off[si] * es, (size_t)(off[si + 1] - off[si]) * es,
                              buf + off[ri] * es, (size_t)(off[ri + 1] - off[ri]) * es);
    if (st != MSH_OK) return st;
  }
  return MSH_OK;
}

/* Offsets of W chunks: equal ones of n each, or a near-even split of n. */
static msh_status chunk_offsets(int W, int64_t n, int even, int64_t **out) {
  int64_t *off = malloc(sizeof(int64_t) * (size_t)(W + 1));
  if (!off) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  for (int i = 0; i <= W; i++) off[i] = even ? n * i : n * i / W;
  *out = off;
  return MSH_OK;
}

/* --------------------------------------------------------------------------- collectives */

static msh_status tcp_all_reduce(msh_comm *base, msh_tensor *t, int op) {
  tcp_comm *c = (tcp_comm *)base;
  int W = base->size;
  int64_t n = msh_tensor_numel(t);
  size_t es = msh_dtype_size(t->dtype);
  int64_t *off = NULL;
  msh_status s = chunk_offsets(W, n, 0, &off);
  if (s != MSH_OK) return s;
  char *tmp = NULL;
  s = scratch(c, (size_t)((n + W - 1) / W) * es, &tmp);
  if (s == MSH_OK) s = ring_reduce_scatter(c, "all_reduce", msh_tensor_ptr(t), off, es, t->dtype, op, tmp);
  if (s == MSH_OK) s = ring_all_gather(c, "all_reduce", msh_tensor_ptr(t), off, es);
  free(off);
  return s;
}

static msh_status tcp_reduce_scatter(msh_comm *base, msh_tensor *out, const msh_tensor *in, int op) {
  tcp_comm *c = (tcp_comm *)base;
  int W = base->size;
  int64_t n = msh_tensor_numel(out);
  size_t es = msh_dtype_size(out->dtype);
  int64_t *off = NULL;
  msh_status s = chunk_offsets(W, n, 1, &off);
  if (s != MSH_OK) return s;
  char *work = NULL;
  s = scratch(c, (size_t)(n * (W + 1)) * es, &work); /* a copy of in, then one chunk to receive */
  if (s == MSH_OK) {
    memcpy(work, msh_tensor_ptr(in), (size_t)(n * W) * es);
    s = ring_reduce_scatter(c, "reduce_scatter", work, off, es, out->dtype, op, work + (size_t)(n * W) * es);
  }
  if (s == MSH_OK) memcpy(msh_tensor_ptr(out), work + (size_t)(n * base->rank) * es, (size_t)n * es);
  free(off);
  return s;
}

static msh_status tcp_all_gather(msh_comm *base, msh_tensor *out, const msh_tensor *in) {
  tcp_comm *c = (tcp_comm *)base;
  int64_t n = msh_tensor_numel(in);
  size_t es = msh_dtype_size(in->dtype);
  char *dst = (char *)msh_tensor_ptr(out), *own = dst + (size_t)(n * base->rank) * es;
  const char *src = msh_tensor_ptr(in);
  if (src != own) memmove(own, src, (size_t)n * es);
  int64_t *off = NULL;
  msh_status s = chunk_offsets(base->size, n, 1, &off);
  if (s != MSH_OK) return s;
  s = ring_all_gather(c, "all_gather", dst, off, es);
  free(off);
  return s;
}

static msh_status tcp_broadcast(msh_comm *base, msh_tensor *t, int root) {
  tcp_comm *c = (tcp_comm *)base;
  int W = base->size, p = mod(base->rank - root, W);
  size_t bytes = (size_t)msh_tensor_numel(t) * msh_dtype_size(t->dtype);
  size_t nseg = (bytes + SEGMENT - 1) / SEGMENT;
  char *buf = msh_tensor_ptr(t);
  /* iteration i receives segment i from the left and forwards segment i - 1 to the right */
  for (size_t i = 0; i <= nseg; i++) {
    io_t io[2];
    int n = 0;
    if (p > 0 && i < nseg) {
      size_t len = i + 1 < nseg ? SEGMENT : bytes - i * SEGMENT;
      io[n++] = io_recv(mod(base->rank - 1, W), buf + i * SEGMENT, len);
    }
    if (p < W - 1 && i > 0) {
      size_t len = i < nseg ? SEGMENT : bytes - (i - 1) * SEGMENT;
      io[n++] = io_send(mod(base->rank + 1, W), buf + (i - 1) * SEGMENT, len);
    }
    msh_status s = progress(c, "broadcast", io, n);
    if (s != MSH_OK) return s;
  }
  return MSH_OK;
}

static void put_u64(unsigned char *b, uint64_t v) {
  for (int i = 0; i < 8; i++) b[i] = (unsigned char)(v >> (8 * i));
}
static uint64_t get_u64(const unsigned char *b) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++) v |= (uint64_t)b[i] << (8 * i);
  return v;
}

static msh_status tcp_send(msh_comm *base, const msh_tensor *t, int peer) {
  tcp_comm *c = (tcp_comm *)base;
  uint64_t bytes = (uint64_t)msh_tensor_numel(t) * msh_dtype_size(t->dtype);
  unsigned char hdr[8];
  put_u64(hdr, bytes);
  io_t io = io_send(peer, hdr, 8);
  msh_status s = progress(c, "send", &io, 1);
  if (s != MSH_OK || !bytes) return s;
  io = io_send(peer, msh_tensor_ptr(t), bytes);
  return progress(c, "send", &io, 1);
}

static msh_status tcp_recv(msh_comm *base, msh_tensor *t, int peer) {
  tcp_comm *c = (tcp_comm *)base;
  uint64_t bytes = (uint64_t)msh_tensor_numel(t) * msh_dtype_size(t->dtype);
  unsigned char hdr[8];
  io_t io = io_recv(peer, hdr, 8);
  msh_status s = progress(c, "recv", &io, 1);
  if (s != MSH_OK) return s;
  uint64_t got = get_u64(hdr);
  if (got != bytes)
    return MSH_FAIL(MSH_EIO, "recv: rank %d sent %llu bytes, rank %d expected %llu",
                    base->world_ranks[peer], (unsigned long long)got, base->world_ranks[base->rank],
                    (unsigned long long)bytes);
  if (!bytes) return MSH_OK;
  io = io_recv(peer, msh_tensor_ptr(t), bytes);
  return progress(c, "recv", &io, 1);
}

static msh_status tcp_barrier(msh_comm *base) {
  tcp_comm *c = (tcp_comm *)base;
  int W = base->size, r = base->rank;
  for (int d = 1; d < W; d *= 2) {
    char out = 'b', in = 0;
    io_t io[2] = {io_send((r + d) % W, &out, 1), io_recv(mod(r - d, W), &in, 1)};
    msh_status s = progress(c, "barrier", io, 2);
    if (s != MSH_OK) return s;
    if (in != 'b')
      return MSH_FAIL(MSH_EIO, "barrier: unexpected data from rank %d (the ranks issued different "
                      "collectives)", base->world_ranks[mod(r - d, W)]);
  }
  return MSH_OK;
}

/* ------------------------------------------------------------------------------- setup */

/* Hello: magic, version, sender's rank, world size (4 big-endian u32). */
static void hello_make(unsigned char *b, int rank, int world) {
  uint32_t v[4] = {htonl(HELLO_MAGIC), htonl(HELLO_VERSION), htonl((uint32_t)rank), htonl((uint32_t)world)};
  memcpy(b, v, 16);
}

/* Blocking-with-deadline transfer on a non-blocking socket (setup only). */
static int xfer_until(int fd, void *buf, size_t n, int is_send, double deadline) {
  size_t done = 0;
  while (done < n) {
    ssize_t k = is_send ? send(fd, (char *)buf + done, n - done, MSG_NOSIGNAL)
                        : recv(fd, (char *)buf + done, n - done, 0);
    if (k > 0) {
      done += (size_t)k;
      continue;
    }
    if (k == 0) return -2;
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
    struct pollfd p = {fd, (short)(is_send ? POLLOUT : POLLIN), 0};
    double left = deadline - now_s();
    if (left <= 0 || poll(&p, 1, poll_ms(left)) == 0) return -3;
  }
  return 0;
}

/* Connects to host:port, retrying refused connections until the deadline. Returns the fd or -1
 * with why (a static string or strerror) in *why. */
static int connect_until(const char *host, int port, double deadline, const char **why) {
  struct addrinfo hints = {0}, *res = NULL;
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  char ports[16];
  snprintf(ports, sizeof ports, "%d", port);
  int rc = getaddrinfo(host, ports, &hints, &res);
  if (rc != 0) {
    *why = gai_strerror(rc);
    return -1;
  }
  *why = "timed out";
  for (;;) {
    int fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
      *why = strerror(errno);
      break;
    }
    int err = 0;
    if (connect(fd, res->ai_addr, res->ai_addrlen) != 0) {
      err = errno;
      if (err == EINPROGRESS) {
        struct pollfd p = {fd, POLLOUT, 0};
        double left = deadline - now_s();
        if (left > 0 && poll(&p, 1, poll_ms(left)) > 0) {
          socklen_t len = sizeof err;
          getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
        } else {
          err = ETIMEDOUT;
        }
      }
    }
    if (err == 0) {
      freeaddrinfo(res);
      return fd;
    }
    close(fd);
    *why = strerror(err);
    if (now_s() >= deadline) break;
    struct timespec ts = {0, 50 * 1000 * 1000};
    nanosleep(&ts, NULL);
    if (now_s() >= deadline) break;
  }
  freeaddrinfo(res);
  return -1;
}

/* Lists the ranks in [from, world) whose fds are still -1 ("2, 3"). */
static void missing_ranks(const tcp_comm *c, char *buf, size_t cap) {
  size_t n = 0;
  buf[0] = '\0';
  for (int r = 0; r < c->head.size && n < cap; r++)
    if (r != c->head.rank && c->fds[r] < 0)
      n += (size_t)snprintf(buf + n, cap - n, n ? ", %d" : "%d", c->head.world_ranks[r]);
}

static msh_status tcp_connect_all(tcp_comm *c, msh_tcp_listener *l, double timeout) {
  int rank = c->head.rank, world = c->head.size;
  const int *wr = c->head.world_ranks;
  double deadline = now_s() + timeout;
  unsigned char hello[16], got[16];
  hello_make(hello, rank, world);
  /* lower ranks: connect and say hello */
  for (int j = 0; j < rank; j++) {
    char host[256];
    int port;
    if (parse_addr(c->addrs[j], host, sizeof host, &port) != 0)
      return MSH_FAIL(MSH_EINVAL, "address of rank %d is not host:port: '%s'", wr[j], c->addrs[j]);
    const char *why;
    int fd = connect_until(host, port, deadline, &why);
    if (fd < 0)
      return MSH_FAIL(MSH_EIO, "rank %d cannot connect to rank %d at %s within %g s: %s", wr[rank], wr[j],
                      c->addrs[j], timeout, why);
    c->fds[j] = fd;
    if (xfer_until(fd, hello, 16, 1, deadline) != 0)
      return MSH_FAIL(MSH_EIO, "rank %d: sending to rank %d at %s failed", wr[rank], wr[j], c->addrs[j]);
  }
  /* higher ranks: accept, read their hello, answer */
  int expected = world - 1 - rank;
  while (expected > 0) {
    struct pollfd p = {l->fd, POLLIN, 0};
    double left = deadline - now_s();
    if (left <= 0 || poll(&p, 1, poll_ms(left)) == 0) {
      char miss[256];
      missing_ranks(c, miss, sizeof miss);
      return MSH_FAIL(MSH_EIO, "rank %d: timed out after %g s waiting for rank%s %s to connect", wr[rank],
                      timeout, strchr(miss, ',') ? "s" : "", miss);
    }
    int fd = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR || errno == ECONNABORTED) continue;
      return MSH_FAIL(MSH_EIO, "accept: %s", strerror(errno));
    }
    uint32_t v[4];
    if (xfer_until(fd, got, 16, 0, deadline) != 0) {
      close(fd); /* a stray connection: keep waiting for the real ones */
      continue;
    }
    memcpy(v, got, 16);
    int from = (int)ntohl(v[2]), their_world = (int)ntohl(v[3]);
    if (ntohl(v[0]) != HELLO_MAGIC || ntohl(v[1]) != HELLO_VERSION) {
      close(fd);
      continue;
    }
    if (their_world != world) {
      close(fd);
      return MSH_FAIL(MSH_EIO, "a peer with rank %d has a world of %d ranks, rank %d has %d", from,
                      their_world, wr[rank], world);
    }
    if (from <= rank || from >= world || c->fds[from] >= 0) {
      close(fd);
      return MSH_FAIL(MSH_EIO, "rank %d: unexpected connection claiming rank %d", wr[rank], from);
    }
    c->fds[from] = fd;
    if (xfer_until(fd, hello, 16, 1, deadline) != 0)
      return MSH_FAIL(MSH_EIO, "rank %d: answering rank %d failed", wr[rank], wr[from]);
    expected--;
  }
  /* the lower ranks' answers confirm who we reached */
  for (int j = 0; j < rank; j++) {
    int rc = xfer_until(c->fds[j], got, 16, 0, deadline);
    if (rc != 0)
      return MSH_FAIL(MSH_EIO, "rank %d: no answer from rank %d at %s within %g s%s", wr[rank], wr[j],
                      c->addrs[j], timeout, rc == -2 ? " (connection closed)" : "");
    uint32_t v[4];
    memcpy(v, got, 16);
    if (ntohl(v[0]) != HELLO_MAGIC || (int)ntohl(v[2]) != j || (int)ntohl(v[3]) != world)
      return MSH_FAIL(MSH_EIO, "rank %d: %s answered as rank %d of %d, expected rank %d of %d", wr[rank],
                      c->addrs[j], (int)ntohl(v[2]), (int)ntohl(v[3]), wr[j], world);
  }
  for (int j = 0; j < world; j++)
    if (c->fds[j] >= 0) set_nodelay(c->fds[j]);
  return MSH_OK;
}

msh_status msh_tcp_comm_new(msh_comm **out, msh_tcp_listener *l, int rank, int world,
                            const char *const *addrs, const int *world_ranks, double timeout_s) {
  tcp_comm *c = calloc(1, sizeof *c);
  if (!c) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  msh_status s = msh_comm_init_head(&c->head, &tcp_vt, MSH_COMM_TCP, MSH_CPU, 0, rank, world,
                                    world_ranks, timeout_s);
  if (s != MSH_OK) {
    free(c);
    return s;
  }
  c->fds = malloc(sizeof(int) * (size_t)world);
  c->addrs = calloc((size_t)world, sizeof(char *));
  if (!c->fds || !c->addrs) {
    tcp_destroy(&c->head);
    return MSH_FAIL(MSH_ENOMEM, "out of memory");
  }
  for (int i = 0; i < world; i++) {
    c->fds[i] = -1;
    c->addrs[i] = strdup(addrs[i] ? addrs[i] : "self");
    if (!c->addrs[i]) {
      tcp_destroy(&c->head);
      return MSH_FAIL(MSH_ENOMEM, "out of memory");
    }
  }
  s = tcp_connect_all(c, l, timeout_s);
  if (s != MSH_OK) {
    tcp_destroy(&c->head);
    return s;
  }
  *out = &c->head;
  return MSH_OK;
}

/* ------------------------------------------------------------------------------- split */

typedef struct {
  int color, key, rank;
} member_t;

static int member_cmp(const void *a, const void *b) {
  const member_t *x = a, *y = b;
  if (x->key != y->key) return x->key < y->key ? -1 : 1;
  return x->rank < y->rank ? -1 : x->rank > y->rank;
}

static msh_status tcp_split(msh_comm *base, int color, int key, msh_comm **out) {
  tcp_comm *c = (tcp_comm *)base;
  int W = base->size;
  msh_tcp_listener *l = NULL;
  msh_status s = MSH_OK;
  if (color >= 0 && (s = msh_tcp_listen(&l, "0.0.0.0", 0)) != MSH_OK) return s;
  /* everyone's (color, key, port) */
  int32_t mine[3] = {color, key, l ? l->port : 0};
  int32_t *all = malloc(sizeof(int32_t) * 3 * (size_t)W);
  member_t *mem = malloc(sizeof(member_t) * (size_t)W);
  char **addrs = calloc((size_t)W, sizeof(char *));
  int *wr = malloc(sizeof(int) * (size_t)W);
  msh_tensor *tin = NULL, *tout = NULL;
  if (!all || !mem || !addrs || !wr) {
    s = MSH_FAIL(MSH_ENOMEM, "out of memory");
    goto out;
  }
  int64_t n3 = 3, nall = 3 * (int64_t)W;
  if ((s = msh_tensor_wrap(&tin, mine, MSH_I32, 1, &n3)) != MSH_OK ||
      (s = msh_tensor_wrap(&tout, all, MSH_I32, 1, &nall)) != MSH_OK ||
      (s = tcp_all_gather(base, tout, tin)) != MSH_OK)
    goto out;
  if (color < 0) goto out;
  int n = 0;
  for (int r = 0; r < W; r++)
    if (all[3 * r] == color) mem[n++] = (member_t){color, all[3 * r + 1], r};
  qsort(mem, (size_t)n, sizeof *mem, member_cmp);
  int me = -1;
  for (int i = 0; i < n; i++) {
    int r = mem[i].rank;
    if (r == base->rank) me = i;
    wr[i] = base->world_ranks[r];
    char host[256];
    int port;
    if (r == base->rank) continue;
    if (parse_addr(c->addrs[r], host, sizeof host, &port) != 0) {
      s = MSH_FAIL(MSH_EINVAL, "address of rank %d is not host:port: '%s'", wr[i], c->addrs[r]);
      goto out;
    }
    size_t len = strlen(host) + 16;
    addrs[i] = malloc(len);
    if (!addrs[i]) {
      s = MSH_FAIL(MSH_ENOMEM, "out of memory");
      goto out;
    }
    snprintf(addrs[i], len, "%s:%d", host, all[3 * r + 2]);
  }
  s = msh_tcp_comm_new(out, l, me, n, (const char *const *)addrs, wr, base->timeout);
out:
  msh_tensor_free(tin);
  msh_tensor_free(tout);
  for (int i = 0; addrs && i < W; i++) free(addrs[i]);
  free(addrs);
  free(wr);
  free(mem);
  free(all);
  msh_tcp_listener_free(l);
  return s;
}

static const msh_comm_vt tcp_vt = {
    .name = "tcp",
    .all_reduce = tcp_all_reduce,
    .all_gather = tcp_all_gather,
    .reduce_scatter = tcp_reduce_scatter,
    .broadcast = tcp_broadcast,
    .send = tcp_send,
    .recv = tcp_recv,
    .barrier = tcp_barrier,
    .split = tcp_split,
    .abort = tcp_abort,
    .destroy = tcp_destroy,
};
