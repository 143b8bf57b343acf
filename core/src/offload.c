/* offload.c: buffers for weights that live off the device.
 *
 *   pin limit / pool   how much host memory may be locked, checked before anything is taken; one
 *                      allocation handing out 4096-aligned buffers
 *   byte views         a flat layer buffer seen as its weights (any dtype, any device)
 *   file writes        the disk tier's file, written once at load
 *   reader             file ranges into host buffers: io_uring (liburing) with O_DIRECT, or pread
 *   ring               n layer buffers on a device, claimed by layer and released
 */
#define _GNU_SOURCE /* O_DIRECT */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#ifdef MSH_WITH_URING
#include <liburing.h>
#endif

enum { ALIGN = 4096, MAX_TICKETS = 256 };

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* "12.0 GiB" into buf */
static const char *human(uint64_t b, char *buf, size_t n) {
  const char *unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = (double)b;
  int i = 0;
  while (v >= 1024 && i < 4) {
    v /= 1024;
    i++;
  }
  if (b == UINT64_MAX) snprintf(buf, n, "unlimited");
  else if (i == 0) snprintf(buf, n, "%llu B", (unsigned long long)b);
  else snprintf(buf, n, "%.1f %s", v, unit[i]);
  return buf;
}

/* ------------------------------------------------------------------------- pin limit */

static msh_status mem_total(uint64_t *out) {
  FILE *f = fopen("/proc/meminfo", "r");
  if (!f) return MSH_FAIL(MSH_EIO, "cannot read /proc/meminfo: %s", strerror(errno));
  char line[256];
  unsigned long long kb = 0;
  while (fgets(line, sizeof line, f))
    if (sscanf(line, "MemTotal: %llu kB", &kb) == 1) break;
  fclose(f);
  if (!kb) return MSH_FAIL(MSH_EIO, "no MemTotal in /proc/meminfo");
  *out = (uint64_t)kb * 1024;
  return MSH_OK;
}

static double default_share(double share) {
  if (share > 0) return share;
  const char *env = getenv("MSH_PIN_SHARE");
  double v = env ? strtod(env, NULL) : 0;
  return (v > 0 && v <= 1) ? v : 0.5;
}

msh_status msh_pin_limit(double share, int memlock, uint64_t *allowed, uint64_t *mem_total_out,
                         uint64_t *memlock_limit) {
  if (share > 1 || share != share) return MSH_FAIL(MSH_EINVAL, "share %g is not in (0, 1]", share);
  share = default_share(share);
  uint64_t total;
  msh_status s = mem_total(&total);
  if (s != MSH_OK) return s;
  struct rlimit rl;
  uint64_t lock = UINT64_MAX;
  if (getrlimit(RLIMIT_MEMLOCK, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) lock = (uint64_t)rl.rlim_cur;
  uint64_t a = (uint64_t)((double)total * share);
  if (memlock && lock < a) a = lock;
  if (allowed) *allowed = a;
  if (mem_total_out) *mem_total_out = total;
  if (memlock_limit) *memlock_limit = lock;
  return MSH_OK;
}

/* ------------------------------------------------------------------------------ pool */

struct msh_pin_pool {
  msh_tensor *mem; /* (capacity + ALIGN) i8 */
  char *base;      /* the first aligned byte */
  uint64_t capacity, used;
};

msh_status msh_pin_pool_new(msh_pin_pool **out, uint64_t bytes, double share, int memlock) {
  if (!out) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  int pins = msh_backend_pinner() != NULL;
  int lock = memlock < 0 ? pins : memlock != 0;
  uint64_t allowed, total, lim;
  msh_status s = msh_pin_limit(share, lock, &allowed, &total, &lim);
  if (s != MSH_OK) return s;
  if (bytes > allowed) {
    char a[32], b[32], c[32], d[32];
    return MSH_FAIL(MSH_ENOMEM,
                    "pinning %s refused: allowed %s (%.0f%% of MemTotal %s%s%s); would fit: %s "
                    "(set MSH_PIN_SHARE, raise `ulimit -l`, or stream from disk)",
                    human(bytes, a, sizeof a), human(allowed, b, sizeof b), default_share(share) * 100,
                    human(total, c, sizeof c), lock ? ", RLIMIT_MEMLOCK " : "",
                    lock ? human(lim, d, sizeof d) : "", human(allowed, b, sizeof b));
  }
  msh_pin_pool *p = calloc(1, sizeof *p);
  if (!p) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  int64_t n = (int64_t)(bytes + ALIGN);
  s = msh_tensor_new_pinned(&p->mem, MSH_I8, 1, &n);
  if (s != MSH_OK) {
    free(p);
    return s;
  }
  uintptr_t a0 = (uintptr_t)msh_tensor_data(p->mem);
  p->base = (char *)((a0 + ALIGN - 1) / ALIGN * ALIGN);
  p->capacity = bytes;
  *out = p;
  return MSH_OK;
}

void msh_pin_pool_free(msh_pin_pool *p) {
  if (!p) return;
  msh_tensor_free(p->mem); /* buffers handed out keep the memory until they go */
  free(p);
}

msh_status msh_pin_pool_take(msh_pin_pool *p, msh_tensor **out, uint64_t bytes) {
  if (!p || !out) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  uint64_t at = (p->used + ALIGN - 1) / ALIGN * ALIGN;
  if (at > p->capacity || bytes > p->capacity - at) {
    char a[32], b[32];
    return MSH_FAIL(MSH_ERANGE, "pinned pool full: %s asked, %s left", human(bytes, a, sizeof a),
                    human(at > p->capacity ? 0 : p->capacity - at, b, sizeof b));
  }
  int64_t start = (int64_t)(p->base - (char *)msh_tensor_data(p->mem)) + (int64_t)at;
  msh_status s = msh_tensor_narrow(out, p->mem, 0, start, (int64_t)bytes);
  if (s == MSH_OK) p->used = at + bytes;
  return s;
}

uint64_t msh_pin_pool_used(const msh_pin_pool *p) { return p ? p->used : 0; }
uint64_t msh_pin_pool_capacity(const msh_pin_pool *p) { return p ? p->capacity : 0; }
int msh_pin_pool_is_pinned(const msh_pin_pool *p) { return p && msh_tensor_is_pinned(p->mem); }

/* ------------------------------------------------------------------------ byte views */

msh_status msh_tensor_view_bytes(msh_tensor **out, msh_tensor *buf, uint64_t byte_offset, int dtype,
                                 int ndim, const int64_t *shape) {
  if (!out || !buf || (ndim > 0 && !shape)) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (!msh_tensor_is_contiguous(buf)) return MSH_FAIL(MSH_EINVAL, "the buffer is not contiguous");
  int64_t bb = msh_dt_block_bytes(dtype), be = msh_dt_block_elems(dtype);
  if (!bb || !be) return MSH_FAIL(MSH_EINVAL, "unknown dtype %d", dtype);
  if (ndim < 0 || ndim > MSH_MAX_DIMS) return MSH_FAIL(MSH_EINVAL, "ndim %d out of range", ndim);
  int64_t n = 1;
  for (int i = 0; i < ndim; i++) {
    if (shape[i] < 0) return MSH_FAIL(MSH_EINVAL, "negative dim %lld", (long long)shape[i]);
    n *= shape[i];
  }
  uint64_t start = (uint64_t)msh_dtype_bytes(buf->dtype, buf->offset) + byte_offset;
  if (start % (uint64_t)bb)
    return MSH_FAIL(MSH_EINVAL, "byte offset %llu is not on a whole %s element (%lld bytes)",
                    (unsigned long long)byte_offset, msh_dtype_name(dtype), (long long)bb);
  uint64_t have = (uint64_t)msh_dtype_bytes(buf->dtype, msh_tensor_numel(buf));
  uint64_t need = (uint64_t)msh_dtype_bytes(dtype, n);
  if (byte_offset > have || need > have - byte_offset)
    return MSH_FAIL(MSH_ERANGE, "%llu bytes at offset %llu run past the buffer's %llu", (unsigned long long)need,
                    (unsigned long long)byte_offset, (unsigned long long)have);
  return msh_tensor_make(out, buf->st, dtype, ndim, shape, NULL, (int64_t)(start / (uint64_t)bb) * be);
}

/* --------------------------------------------------------------------------- hashing */

uint64_t msh_hash64(const void *p, uint64_t n, uint64_t seed) {
  /* four lanes of a multiply-rotate mix over 8-byte words (xxhash-like), then the tail */
  const uint64_t K1 = 0x9E3779B185EBCA87ull, K2 = 0xC2B2AE3D27D4EB4Full;
  const unsigned char *b = p;
  uint64_t h[4] = {seed + K1, seed + K2, seed, seed - K1};
  uint64_t i = 0;
  for (; i + 32 <= n; i += 32)
    for (int j = 0; j < 4; j++) {
      uint64_t w;
      memcpy(&w, b + i + 8 * j, 8);
      h[j] += w * K2;
      h[j] = (h[j] << 31 | h[j] >> 33) * K1;
    }
  uint64_t acc = n;
  for (int j = 0; j < 4; j++) acc = (acc ^ h[j]) * K1 + K2;
  for (; i < n; i++) acc = (acc ^ b[i]) * 0x100000001B3ull;
  acc ^= acc >> 29;
  acc *= K2;
  acc ^= acc >> 32;
  return acc;
}

/* ----------------------------------------------------------------------- file writes */

msh_status msh_file_write_at(const char *path, uint64_t offset, const msh_tensor *t, uint64_t n, int create,
                             uint64_t truncate_to) {
  if (!path) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  const char *src = NULL;
  uint64_t have = 0;
  if (t) {
    if (msh_tensor_device(t) != MSH_CPU || !msh_tensor_is_contiguous(t))
      return MSH_FAIL(MSH_EINVAL, "'%s': the source must be a contiguous CPU tensor", path);
    src = msh_tensor_data(t);
    have = (uint64_t)msh_dtype_bytes(t->dtype, msh_tensor_numel(t));
  }
  if (n == 0) n = have;
  if (n > have) return MSH_FAIL(MSH_ERANGE, "'%s': %llu bytes asked of a %llu-byte tensor", path,
                                (unsigned long long)n, (unsigned long long)have);
  int fd = open(path, O_WRONLY | O_CLOEXEC | (create ? O_CREAT : 0), 0644);
  if (fd < 0) {
    int e = errno;
    return MSH_FAIL(e == ENOENT ? MSH_ENOENT : MSH_EIO, "cannot open '%s' for writing: %s", path, strerror(e));
  }
  if (truncate_to != UINT64_MAX && ftruncate(fd, (off_t)truncate_to) != 0) {
    int e = errno;
    close(fd);
    return MSH_FAIL(MSH_EIO, "cannot size '%s' to %llu bytes: %s", path, (unsigned long long)truncate_to,
                    strerror(e));
  }
  uint64_t done = 0;
  while (done < n) {
    ssize_t w = pwrite(fd, src + done, n - done > (1u << 30) ? (1u << 30) : n - done, (off_t)(offset + done));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      int e = w < 0 ? errno : ENOSPC;
      close(fd);
      return MSH_FAIL(MSH_EIO, "cannot write %llu bytes at offset %llu of '%s': %s", (unsigned long long)(n - done),
                      (unsigned long long)(offset + done), path, strerror(e));
    }
    done += (uint64_t)w;
  }
  if (close(fd) != 0) return MSH_FAIL(MSH_EIO, "cannot close '%s': %s", path, strerror(errno));
  return MSH_OK;
}

msh_status msh_dir_space(const char *dir, uint64_t *free_bytes, int *writable) {
  if (!dir) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  struct stat sb;
  if (stat(dir, &sb) != 0) {
    int e = errno;
    return MSH_FAIL(e == ENOENT ? MSH_ENOENT : MSH_EIO, "'%s': %s", dir, strerror(e));
  }
  if (!S_ISDIR(sb.st_mode)) return MSH_FAIL(MSH_EIO, "'%s' is not a directory", dir);
  struct statvfs vs;
  if (statvfs(dir, &vs) != 0) return MSH_FAIL(MSH_EIO, "cannot stat the file system of '%s': %s", dir, strerror(errno));
  if (free_bytes) *free_bytes = (uint64_t)vs.f_bavail * (uint64_t)vs.f_frsize;
  if (writable) *writable = access(dir, W_OK | X_OK) == 0 && !(vs.f_flag & ST_RDONLY);
  return MSH_OK;
}

/* ---------------------------------------------------------------------------- reader */

/* One read of at most chunk_bytes; requests are split into these. */
typedef struct {
  char *dst;
  uint64_t off, len;
  int direct;
  int ticket; /* slot in tickets[] */
} chunk;

struct msh_reader {
  char *path;
  int fd, fd_direct; /* fd_direct: -1 when O_DIRECT is off */
  int qd;
  uint64_t chunk_bytes, file_size;
  /* chunks not yet submitted: a FIFO, grown when needed (then reused) */
  chunk *pend;
  int pend_head, pend_n, pend_cap;
  /* chunks in flight, by user_data index; free list of indices */
  chunk *fly;
  int *fly_free, n_free, in_flight;
  /* tickets: remaining chunks and the first error of each */
  uint64_t next_ticket;
  int remaining[MAX_TICKETS];
  msh_status status[MAX_TICKETS];
  char err[MAX_TICKETS][160];
  /* stats */
  uint64_t bytes;
  double wait_s;
  int max_in_flight;
  int uring;
#ifdef MSH_WITH_URING
  struct io_uring ring;
#endif
};

void msh_reader_free(msh_reader *r) {
  if (!r) return;
#ifdef MSH_WITH_URING
  if (r->uring) {
    /* reads still in flight write into buffers the caller may free next: wait for them */
    while (r->in_flight > 0) {
      struct io_uring_cqe *cqe;
      if (io_uring_wait_cqe(&r->ring, &cqe) != 0) break;
      io_uring_cqe_seen(&r->ring, cqe);
      r->in_flight--;
    }
    io_uring_queue_exit(&r->ring);
  }
#endif
  if (r->fd >= 0) close(r->fd);
  if (r->fd_direct >= 0) close(r->fd_direct);
  free(r->pend);
  free(r->fly);
  free(r->fly_free);
  free(r->path);
  free(r);
}

msh_status msh_reader_open(msh_reader **out, const char *path, int queue_depth, uint64_t chunk_bytes,
                           int direct) {
  if (!out || !path) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (queue_depth < 1 || queue_depth > 4096)
    return MSH_FAIL(MSH_EINVAL, "queue depth %d is not in 1..4096", queue_depth);
  if (chunk_bytes == 0) chunk_bytes = 1u << 20;
  if (chunk_bytes % ALIGN) return MSH_FAIL(MSH_EINVAL, "chunk of %llu bytes is not a multiple of %d",
                                           (unsigned long long)chunk_bytes, ALIGN);
  msh_reader *r = calloc(1, sizeof *r);
  if (!r) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  r->fd = r->fd_direct = -1;
  r->qd = queue_depth;
  r->chunk_bytes = chunk_bytes;
  r->path = strdup(path);
  r->fly = calloc((size_t)queue_depth, sizeof *r->fly);
  r->fly_free = calloc((size_t)queue_depth, sizeof *r->fly_free);
  if (!r->path || !r->fly || !r->fly_free) {
    msh_reader_free(r);
    return MSH_FAIL(MSH_ENOMEM, "out of memory");
  }
  for (int i = 0; i < queue_depth; i++) r->fly_free[i] = queue_depth - 1 - i;
  r->n_free = queue_depth;
  r->fd = open(path, O_RDONLY | O_CLOEXEC);
  if (r->fd < 0) {
    int e = errno;
    msh_reader_free(r);
    return MSH_FAIL(e == ENOENT ? MSH_ENOENT : MSH_EIO, "cannot open '%s': %s", path, strerror(e));
  }
  struct stat sb;
  if (fstat(r->fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
    msh_reader_free(r);
    return MSH_FAIL(MSH_EIO, "'%s' is not a regular file", path);
  }
  r->file_size = (uint64_t)sb.st_size;
  /* tmpfs and some others refuse O_DIRECT (EINVAL): buffered reads there */
  if (direct) r->fd_direct = open(path, O_RDONLY | O_CLOEXEC | O_DIRECT);
#ifdef MSH_WITH_URING
  /* MSH_READER_PREAD=1: the synchronous path of builds without liburing */
  const char *no = getenv("MSH_READER_PREAD");
  if (!(no && no[0] == '1') && io_uring_queue_init((unsigned)queue_depth, &r->ring, 0) == 0) r->uring = 1;
#endif
  *out = r;
  return MSH_OK;
}

/* Records the first error of a chunk's ticket. */
static void chunk_fail(msh_reader *r, const chunk *c, int err, const char *what) {
  int t = c->ticket;
  if (r->status[t] != MSH_OK) return;
  r->status[t] = MSH_EIO;
  if (err)
    snprintf(r->err[t], sizeof r->err[t], "reading %llu bytes at offset %llu: %s", (unsigned long long)c->len,
             (unsigned long long)c->off, strerror(err));
  else
    snprintf(r->err[t], sizeof r->err[t], "%s: %llu bytes wanted at offset %llu, the file has %llu",
             what, (unsigned long long)c->len, (unsigned long long)c->off, (unsigned long long)r->file_size);
}

/* The synchronous path: one chunk with pread (short reads continued; 0 bytes: the end of the file). */
static void read_chunk_sync(msh_reader *r, chunk *c) {
  uint64_t done = 0;
  int fd = c->direct ? r->fd_direct : r->fd;
  while (done < c->len) {
    ssize_t n = pread(fd, c->dst + done, c->len - done, (off_t)(c->off + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && c->direct && errno == EINVAL) { /* O_DIRECT refused for this file: buffered */
      fd = r->fd;
      continue;
    }
    if (n <= 0) {
      chunk cc = *c;
      cc.off += done;
      cc.len -= done;
      chunk_fail(r, &cc, n < 0 ? errno : 0, "short file");
      break;
    }
    done += (uint64_t)n;
  }
  r->bytes += done;
  r->remaining[c->ticket]--;
}

static msh_status push_pending(msh_reader *r, chunk c) {
  if (r->pend_head + r->pend_n == r->pend_cap) {
    if (r->pend_head > 0) { /* slide the queue to the front before growing */
      memmove(r->pend, r->pend + r->pend_head, (size_t)r->pend_n * sizeof *r->pend);
      r->pend_head = 0;
    }
    if (r->pend_n == r->pend_cap) {
      int cap = r->pend_cap ? r->pend_cap * 2 : 64;
      chunk *p = realloc(r->pend, (size_t)cap * sizeof *p);
      if (!p) return MSH_FAIL(MSH_ENOMEM, "out of memory");
      r->pend = p;
      r->pend_cap = cap;
    }
  }
  r->pend[r->pend_head + r->pend_n++] = c;
  return MSH_OK;
}

#ifdef MSH_WITH_URING
/* Moves pending chunks into the submission queue while slots are free; submits. */
static void fill(msh_reader *r) {
  int added = 0;
  while (r->pend_n > 0 && r->n_free > 0) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    if (!sqe) break;
    int i = r->fly_free[--r->n_free];
    r->fly[i] = r->pend[r->pend_head++];
    r->pend_n--;
    chunk *c = &r->fly[i];
    io_uring_prep_read(sqe, c->direct ? r->fd_direct : r->fd, c->dst, (unsigned)c->len, c->off);
    io_uring_sqe_set_data64(sqe, (uint64_t)i);
    r->in_flight++;
    added++;
  }
  if (r->pend_n == 0) r->pend_head = 0;
  if (r->in_flight > r->max_in_flight) r->max_in_flight = r->in_flight;
  if (added) io_uring_submit(&r->ring);
}

/* Handles one completion: done, continued (a short read) or failed. */
static void complete(msh_reader *r, struct io_uring_cqe *cqe) {
  int i = (int)io_uring_cqe_get_data64(cqe);
  int res = cqe->res;
  io_uring_cqe_seen(&r->ring, cqe);
  chunk c = r->fly[i];
  r->fly_free[r->n_free++] = i;
  r->in_flight--;
  if (res == -EINVAL && c.direct) { /* O_DIRECT refused: again, buffered */
    c.direct = 0;
    push_pending(r, c);
    return;
  }
  if (res == -EINTR || res == -EAGAIN) {
    push_pending(r, c);
    return;
  }
  if (res <= 0) {
    chunk_fail(r, &c, res < 0 ? -res : 0, "short file");
    r->remaining[c.ticket]--;
    return;
  }
  r->bytes += (uint64_t)res;
  if ((uint64_t)res < c.len) { /* the rest of a short read; O_DIRECT needs it aligned */
    c.dst += res;
    c.off += (uint64_t)res;
    c.len -= (uint64_t)res;
    if (c.off % ALIGN || (uintptr_t)c.dst % ALIGN || c.len % ALIGN) c.direct = 0;
    push_pending(r, c);
    return;
  }
  r->remaining[c.ticket]--;
}

/* Reaps finished reads; waits for one when `block`. */
static void reap(msh_reader *r, int block) {
  struct io_uring_cqe *cqe;
  if (block && r->in_flight > 0) {
    if (io_uring_wait_cqe(&r->ring, &cqe) == 0) complete(r, cqe);
  }
  while (r->in_flight > 0 && io_uring_peek_cqe(&r->ring, &cqe) == 0) complete(r, cqe);
  fill(r);
}
#endif

msh_status msh_reader_submit(msh_reader *r, msh_tensor *dst, uint64_t offset, uint64_t bytes, uint64_t *ticket) {
  if (!r || !dst || !ticket) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (msh_tensor_device(dst) != MSH_CPU || !msh_tensor_is_contiguous(dst))
    return MSH_FAIL(MSH_EINVAL, "'%s': reads go into contiguous host tensors", r->path);
  uint64_t have = (uint64_t)msh_dtype_bytes(dst->dtype, msh_tensor_numel(dst));
  if (bytes > have)
    return MSH_FAIL(MSH_ERANGE, "'%s': %llu bytes do not fit a %llu-byte buffer", r->path,
                    (unsigned long long)bytes, (unsigned long long)have);
  int t = (int)(r->next_ticket % MAX_TICKETS);
  if (r->remaining[t] > 0)
    return MSH_FAIL(MSH_ERANGE, "'%s': more than %d reads outstanding", r->path, MAX_TICKETS);
  r->status[t] = MSH_OK;
  r->err[t][0] = 0;
  char *p = msh_tensor_data(dst);
  int direct = r->fd_direct >= 0 && offset % ALIGN == 0 && bytes % ALIGN == 0 && (uintptr_t)p % ALIGN == 0;
  int n = 0;
  for (uint64_t at = 0; at < bytes; at += r->chunk_bytes, n++) {
    chunk c = {p + at, offset + at, bytes - at < r->chunk_bytes ? bytes - at : r->chunk_bytes, direct, t};
    r->remaining[t]++;
    if (r->uring) {
      msh_status s = push_pending(r, c);
      if (s != MSH_OK) {
        r->remaining[t]--;
        chunk_fail(r, &c, ENOMEM, "");
        break;
      }
    } else {
      read_chunk_sync(r, &c);
    }
  }
  (void)n;
  if (!r->uring && r->max_in_flight < 1 && bytes) r->max_in_flight = 1;
#ifdef MSH_WITH_URING
  if (r->uring) reap(r, 0);
#endif
  *ticket = r->next_ticket++;
  return MSH_OK;
}

int msh_reader_done(msh_reader *r, uint64_t ticket) {
  if (!r || ticket >= r->next_ticket) return 0;
  if (r->next_ticket - ticket > MAX_TICKETS) return 1;
#ifdef MSH_WITH_URING
  if (r->uring) reap(r, 0);
#endif
  return r->remaining[ticket % MAX_TICKETS] == 0;
}

msh_status msh_reader_wait(msh_reader *r, uint64_t ticket) {
  if (!r) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (ticket >= r->next_ticket) return MSH_FAIL(MSH_EINVAL, "'%s': no ticket %llu", r->path, (unsigned long long)ticket);
  if (r->next_ticket - ticket > MAX_TICKETS) return MSH_OK; /* long done and forgotten */
  int t = (int)(ticket % MAX_TICKETS);
  double t0 = now_s();
#ifdef MSH_WITH_URING
  while (r->uring && r->remaining[t] > 0) reap(r, 1);
#endif
  r->wait_s += now_s() - t0;
  if (r->status[t] != MSH_OK) {
    msh_status s = r->status[t];
    r->status[t] = MSH_OK;
    return MSH_FAIL(s, "'%s': %s", r->path, r->err[t]);
  }
  return MSH_OK;
}

void msh_reader_stats(const msh_reader *r, uint64_t *bytes, double *wait_s, int *max_in_flight, int *queue_depth,
                      int *uring, int *direct) {
  if (!r) return;
  if (bytes) *bytes = r->bytes;
  if (wait_s) *wait_s = r->wait_s;
  if (max_in_flight) *max_in_flight = r->max_in_flight;
  if (queue_depth) *queue_depth = r->uring ? r->qd : 1;
  if (uring) *uring = r->uring;
  if (direct) *direct = r->fd_direct >= 0;
}

/* ------------------------------------------------------------------------------ ring */

struct msh_ring {
  int n, next;
  msh_tensor **buf;
  int64_t *key; /* -1: free */
};

void msh_ring_free(msh_ring *r) {
  if (!r) return;
  for (int i = 0; i < r->n; i++) msh_tensor_free(r->buf[i]);
  free(r->buf);
  free(r->key);
  free(r);
}

msh_status msh_ring_new(msh_ring **out, int n, uint64_t slot_bytes, int device, int device_index) {
  if (!out) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (n < 1 || n > 1024) return MSH_FAIL(MSH_EINVAL, "%d slots is not in 1..1024", n);
  msh_ring *r = calloc(1, sizeof *r);
  if (!r) return MSH_FAIL(MSH_ENOMEM, "out of memory");
  r->buf = calloc((size_t)n, sizeof *r->buf);
  r->key = malloc((size_t)n * sizeof *r->key);
  if (!r->buf || !r->key) {
    msh_ring_free(r);
    return MSH_FAIL(MSH_ENOMEM, "out of memory");
  }
  r->n = n;
  for (int i = 0; i < n; i++) {
    r->key[i] = -1;
    int64_t len = (int64_t)(slot_bytes ? slot_bytes : 1);
    msh_status s = msh_tensor_new(&r->buf[i], MSH_I8, 1, &len, device, device_index);
    if (s != MSH_OK) {
      msh_ring_free(r);
      return s;
    }
  }
  *out = r;
  return MSH_OK;
}

int msh_ring_size(const msh_ring *r) { return r ? r->n : 0; }
msh_tensor *msh_ring_buffer(msh_ring *r, int i) { return (r && i >= 0 && i < r->n) ? r->buf[i] : NULL; }

int msh_ring_find(const msh_ring *r, int64_t key) {
  if (!r || key < 0) return -1;
  for (int i = 0; i < r->n; i++)
    if (r->key[i] == key) return i;
  return -1;
}

msh_status msh_ring_claim(msh_ring *r, int64_t key, int *slot) {
  if (!r || !slot) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (key < 0) return MSH_FAIL(MSH_EINVAL, "negative key %lld", (long long)key);
  if (msh_ring_find(r, key) >= 0) return MSH_FAIL(MSH_EINVAL, "key %lld is held already", (long long)key);
  for (int k = 0; k < r->n; k++) {
    int i = (r->next + k) % r->n;
    if (r->key[i] < 0) {
      r->key[i] = key;
      r->next = (i + 1) % r->n;
      *slot = i;
      return MSH_OK;
    }
  }
  char held[256];
  size_t at = 0;
  for (int i = 0; i < r->n && at + 24 < sizeof held; i++)
    at += (size_t)snprintf(held + at, sizeof held - at, "%s%lld", i ? ", " : "", (long long)r->key[i]);
  return MSH_FAIL(MSH_ERANGE, "every one of the %d slots is held (keys %s)", r->n, held);
}

msh_status msh_ring_release(msh_ring *r, int slot) {
  if (!r) return MSH_FAIL(MSH_EINVAL, "NULL argument");
  if (slot < 0 || slot >= r->n || r->key[slot] < 0) return MSH_FAIL(MSH_EINVAL, "slot %d is not held", slot);
  r->key[slot] = -1;
  return MSH_OK;
}
