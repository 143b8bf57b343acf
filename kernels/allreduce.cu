/* allreduce.cu: one-shot all-reduce between the GPUs of one host, over peer-mapped memory.
 *
 * Every rank owns a region that all its peers can write (CUDA IPC or peer access): data slots
 * [2 phases][size sources][slot_bytes] and flags [size sources][MSH_K_AR_MAX_BLOCKS] (uint32).
 * Block b of a call takes one contiguous chunk of the elements and
 *   1. pushes its chunk of x into slot `rank` of every peer's region (phase = epoch & 1),
 *   2. raises its flag in every peer's region (release at system scope),
 *   3. waits until every peer's block b raised its flag in this rank's region (acquire),
 *   4. sums the chunk over the sources in rank order (f32) and writes it out.
 * Summing in rank order makes the result bit-identical on every rank. The epoch is a per-block
 * counter in this rank's device memory, advanced by the kernel itself, so a CUDA graph that
 * captured the call stays correct on every replay. Two phases make one flag wait per call enough:
 * a peer writes phase e & 1 again at epoch e + 2 only after this rank raised its flag of epoch
 * e + 1, which it does after it finished reading epoch e (stream order).
 * Every block waits for its peers, so all blocks must be resident at once: at most
 * MSH_K_AR_MAX_BLOCKS blocks, fewer than any GPU this runs on has SMs. */
#include "msh_kutil.cuh"

using namespace msh;

namespace {

constexpr int THREADS = 512;

struct Peers {
  char *buf[MSH_K_AR_MAX_RANKS];
  uint32_t *flag[MSH_K_AR_MAX_RANKS];
};

__device__ __forceinline__ void st_release_sys(uint32_t *p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t *p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

/* V elements of T in 16 bytes, summed in f32. */
template <typename T> struct Pack {
  static constexpr int V = 16 / sizeof(T);
  union {
    uint4 u;
    T e[V];
  };
};

/* Steps 2 and 3 of block b at epoch e, between barriers: every thread's pushes are visible to
 * the peers before the flags go up (fence, release), and the peers' before any thread reads. */
__device__ __forceinline__ void exchange(const Peers &peers, int rank, int size, int b, uint32_t e,
                                         uint64_t timeout_ns) {
  __syncthreads();
  const int tid = threadIdx.x;
  if (tid < size && tid != rank) {
    __threadfence_system();
    st_release_sys(peers.flag[tid] + (size_t)rank * MSH_K_AR_MAX_BLOCKS + b, e);
    const uint32_t *mine = peers.flag[rank] + (size_t)tid * MSH_K_AR_MAX_BLOCKS + b;
    uint64_t start = global_ns();
    while ((int32_t)(ld_acquire_sys(mine) - e) < 0) {
      if (global_ns() - start > timeout_ns) __trap(); /* a peer never arrived */
    }
  }
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(THREADS)
    oneshot(Peers peers, uint32_t *epoch, int rank, int size, size_t slot_bytes, T *out, const T *x, int64_t n,
            int64_t chunk, int add, uint64_t timeout_ns) {
  constexpr int V = Pack<T>::V;
  const int b = blockIdx.x, tid = threadIdx.x;
  const uint32_t e = epoch[b] + 1;
  const size_t phase_off = (size_t)(e & 1) * (size_t)size * slot_bytes;
  const int64_t lo = (int64_t)b * chunk, hi = min(n, lo + chunk);
  const int64_t packs = hi > lo ? (hi - lo) / V : 0, tail = hi > lo ? (hi - lo) % V : 0;
  const uint4 *xv = reinterpret_cast<const uint4 *>(x + lo);

  /* 1. push this rank's chunk into every peer's slot `rank` */
  for (int p = 0; p < size; p++) {
    if (p == rank) continue;
    T *dst = reinterpret_cast<T *>(peers.buf[p] + phase_off + (size_t)rank * slot_bytes) + lo;
    uint4 *dv = reinterpret_cast<uint4 *>(dst);
    for (int64_t i = tid; i < packs; i += THREADS) dv[i] = xv[i];
    if (tid < tail) dst[packs * V + tid] = x[lo + packs * V + tid];
  }
  /* 2. raise this block's flag at every peer; 3. wait for every peer's */
  exchange(peers, rank, size, b, e, timeout_ns);
  /* 4. sum in rank order */
  const char *base = peers.buf[rank] + phase_off;
  for (int64_t i = tid; i < packs; i += THREADS) {
    float acc[V];
    for (int j = 0; j < V; j++) acc[j] = 0.f;
    for (int p = 0; p < size; p++) {
      Pack<T> v;
      if (p == rank) v.u = xv[i];
      else v.u = __ldcg(reinterpret_cast<const uint4 *>(reinterpret_cast<const T *>(base + (size_t)p * slot_bytes) + lo) + i);
      for (int j = 0; j < V; j++) acc[j] += to_f(v.e[j]);
    }
    uint4 *ov = reinterpret_cast<uint4 *>(out + lo) + i;
    Pack<T> r;
    if (add) r.u = *ov;
    for (int j = 0; j < V; j++) r.e[j] = from_f<T>(add ? to_f(r.e[j]) + acc[j] : acc[j]);
    *ov = r.u;
  }
  if (tid < tail) {
    const int64_t k = lo + packs * V + tid;
    float acc = 0.f;
    for (int p = 0; p < size; p++)
      acc += to_f(p == rank ? x[k] : __ldcg(reinterpret_cast<const T *>(base + (size_t)p * slot_bytes) + k));
    out[k] = from_f<T>(add ? to_f(out[k]) + acc : acc);
  }
  if (tid == 0) epoch[b] = e;
}

/* One block per row of D f32 (D % 4 == 0): acc += the sum over ranks of x, then
 * h = acc / sqrt(mean(acc^2) + eps) * w (the next layer's RMSNorm, as rmsnorm.cu computes it). */
template <typename W>
__global__ void __launch_bounds__(THREADS)
    oneshot_norm(Peers peers, uint32_t *epoch, int rank, int size, size_t slot_bytes, float *acc, const float *x,
                 float *h, const W *__restrict__ w, int64_t D, float eps, uint64_t timeout_ns) {
  __shared__ float red[32];
  const int b = blockIdx.x, tid = threadIdx.x;
  const uint32_t e = epoch[b] + 1;
  const size_t phase_off = (size_t)(e & 1) * (size_t)size * slot_bytes;
  const int64_t lo = (int64_t)b * D, packs = D / 4;
  const float4 *xv = reinterpret_cast<const float4 *>(x + lo);
  for (int p = 0; p < size; p++) {
    if (p == rank) continue;
    float4 *dv = reinterpret_cast<float4 *>(reinterpret_cast<float *>(peers.buf[p] + phase_off + (size_t)rank * slot_bytes) + lo);
    for (int64_t i = tid; i < packs; i += THREADS) dv[i] = xv[i];
  }
  exchange(peers, rank, size, b, e, timeout_ns);
  const char *base = peers.buf[rank] + phase_off;
  float4 *av = reinterpret_cast<float4 *>(acc + lo);
  float ss = 0.f;
  for (int64_t i = tid; i < packs; i += THREADS) {
    float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int p = 0; p < size; p++) {
      float4 v = p == rank ? xv[i] : __ldcg(reinterpret_cast<const float4 *>(reinterpret_cast<const float *>(base + (size_t)p * slot_bytes) + lo) + i);
      s.x += v.x; s.y += v.y; s.z += v.z; s.w += v.w;
    }
    float4 a = av[i];
    a.x += s.x; a.y += s.y; a.z += s.z; a.w += s.w;
    av[i] = a;
    ss += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w;
  }
  ss = block_sum(ss, red);
  const float inv = 1.0f / sqrtf(ss / (float)D + eps);
  float4 *hv = reinterpret_cast<float4 *>(h + lo);
  for (int64_t i = tid; i < packs; i += THREADS) {
    float4 a = av[i]; /* this thread's own write */
    const W *wi = w + 4 * i;
    hv[i] = make_float4(a.x * inv * to_f(wi[0]), a.y * inv * to_f(wi[1]), a.z * inv * to_f(wi[2]), a.w * inv * to_f(wi[3]));
  }
  if (tid == 0) epoch[b] = e;
}

/* All-gather of `bytes` (a multiple of 16, 16-byte aligned) per rank: every block pushes its
 * chunk into every peer's slot `rank`, exchanges flags, then copies each rank's chunk to
 * out + p * stride (bytes); this rank's own part comes from x unless it is already in place. */
__global__ void __launch_bounds__(THREADS)
    gather_oneshot(Peers peers, uint32_t *epoch, int rank, int size, size_t slot_bytes, char *out, const char *x,
                   int64_t packs, int64_t chunk, int64_t stride, uint64_t timeout_ns) {
  const int b = blockIdx.x, tid = threadIdx.x;
  const uint32_t e = epoch[b] + 1;
  const size_t phase_off = (size_t)(e & 1) * (size_t)size * slot_bytes;
  const int64_t lo = (int64_t)b * chunk, hi = min(packs, lo + chunk);
  const uint4 *xv = reinterpret_cast<const uint4 *>(x);
  for (int p = 0; p < size; p++) {
    if (p == rank) continue;
    uint4 *dv = reinterpret_cast<uint4 *>(peers.buf[p] + phase_off + (size_t)rank * slot_bytes);
    for (int64_t i = lo + tid; i < hi; i += THREADS) dv[i] = xv[i];
  }
  exchange(peers, rank, size, b, e, timeout_ns);
  for (int p = 0; p < size; p++) {
    uint4 *ov = reinterpret_cast<uint4 *>(out + (int64_t)p * stride);
    const uint4 *src = p == rank ? xv : reinterpret_cast<const uint4 *>(peers.buf[rank] + phase_off + (size_t)p * slot_bytes);
    if (p == rank && src == ov) continue;
    for (int64_t i = lo + tid; i < hi; i += THREADS) ov[i] = p == rank ? src[i] : __ldcg(src + i);
  }
  if (tid == 0) epoch[b] = e;
}

template <typename T>
cudaError_t launch(cudaStream_t s, const Peers &peers, uint32_t *epoch, int rank, int size, size_t slot_bytes,
                   void *out, const void *x, int64_t n, int add, uint64_t timeout_ns) {
  constexpr int V = Pack<T>::V;
  int64_t packs = (n + V - 1) / V;
  int64_t want = (packs + THREADS - 1) / THREADS;
  int blocks = want < 1 ? 1 : want > MSH_K_AR_MAX_BLOCKS ? MSH_K_AR_MAX_BLOCKS : (int)want;
  int64_t chunk = (packs + blocks - 1) / blocks * V; /* elements per block, whole packs */
  oneshot<T><<<blocks, THREADS, 0, s>>>(peers, epoch, rank, size, slot_bytes, static_cast<T *>(out),
                                        static_cast<const T *>(x), n, chunk, add, timeout_ns);
  return cudaGetLastError();
}

} // namespace

extern "C" cudaError_t msh_k_allreduce_oneshot(cudaStream_t s, char *const *bufs, uint32_t *const *flags,
                                               uint32_t *epoch, int rank, int size, size_t slot_bytes, void *out,
                                               const void *x, int dt, int64_t n, int add, uint64_t timeout_ns) {
  if (size < 1 || size > MSH_K_AR_MAX_RANKS || rank < 0 || rank >= size) return cudaErrorInvalidValue;
  if (n <= 0) return cudaGetLastError();
  Peers peers = {};
  for (int p = 0; p < size; p++) {
    peers.buf[p] = bufs[p];
    peers.flag[p] = flags[p];
  }
  switch (dt) {
  case MSH_F32: return launch<float>(s, peers, epoch, rank, size, slot_bytes, out, x, n, add, timeout_ns);
  case MSH_F16: return launch<f16>(s, peers, epoch, rank, size, slot_bytes, out, x, n, add, timeout_ns);
  case MSH_BF16: return launch<bf16>(s, peers, epoch, rank, size, slot_bytes, out, x, n, add, timeout_ns);
  default: return cudaErrorInvalidValue;
  }
}

extern "C" cudaError_t msh_k_allreduce_oneshot_norm(cudaStream_t s, char *const *bufs, uint32_t *const *flags,
                                                    uint32_t *epoch, int rank, int size, size_t slot_bytes,
                                                    float *acc, const float *x, float *h, const void *w, int w_dt,
                                                    int64_t R, int64_t D, float eps, uint64_t timeout_ns) {
  if (size < 1 || size > MSH_K_AR_MAX_RANKS || rank < 0 || rank >= size || R > MSH_K_AR_MAX_BLOCKS || D % 4 != 0)
    return cudaErrorInvalidValue;
  if (R <= 0 || D <= 0) return cudaGetLastError();
  Peers peers = {};
  for (int p = 0; p < size; p++) {
    peers.buf[p] = bufs[p];
    peers.flag[p] = flags[p];
  }
  dim3 g((unsigned)R), blk(THREADS);
  switch (w_dt) {
  case MSH_F32:
    oneshot_norm<float><<<g, blk, 0, s>>>(peers, epoch, rank, size, slot_bytes, acc, x, h, (const float *)w, D, eps, timeout_ns);
    break;
  case MSH_F16:
    oneshot_norm<f16><<<g, blk, 0, s>>>(peers, epoch, rank, size, slot_bytes, acc, x, h, (const f16 *)w, D, eps, timeout_ns);
    break;
  case MSH_BF16:
    oneshot_norm<bf16><<<g, blk, 0, s>>>(peers, epoch, rank, size, slot_bytes, acc, x, h, (const bf16 *)w, D, eps, timeout_ns);
    break;
  default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

extern "C" cudaError_t msh_k_allgather_oneshot(cudaStream_t s, char *const *bufs, uint32_t *const *flags,
                                               uint32_t *epoch, int rank, int size, size_t slot_bytes, void *out,
                                               int64_t stride, const void *x, int64_t bytes, uint64_t timeout_ns) {
  if (size < 1 || size > MSH_K_AR_MAX_RANKS || rank < 0 || rank >= size || bytes % 16 || stride % 16 ||
      (size_t)bytes > slot_bytes)
    return cudaErrorInvalidValue;
  if (bytes <= 0) return cudaGetLastError();
  Peers peers = {};
  for (int p = 0; p < size; p++) {
    peers.buf[p] = bufs[p];
    peers.flag[p] = flags[p];
  }
  int64_t packs = bytes / 16, want = (packs + THREADS - 1) / THREADS;
  int blocks = want < 1 ? 1 : want > MSH_K_AR_MAX_BLOCKS ? MSH_K_AR_MAX_BLOCKS : (int)want;
  int64_t chunk = (packs + blocks - 1) / blocks;
  gather_oneshot<<<blocks, THREADS, 0, s>>>(peers, epoch, rank, size, slot_bytes, static_cast<char *>(out),
                                            static_cast<const char *>(x), packs, chunk, stride, timeout_ns);
  return cudaGetLastError();
}
