/* randn.h: the counter-based normal generator behind msh_tensor_randn, shared by the host and
 * CUDA code so that every device produces the same values for the same seed and index. */
#ifndef MSH_RANDN_H
#define MSH_RANDN_H

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define MSH_HD __host__ __device__
#else
#define MSH_HD
#endif

static inline MSH_HD uint64_t msh_mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

/* Value i of the stream for seed: Box-Muller over a pair of hashed counters. */
static inline MSH_HD float msh_randn_value(uint64_t seed, uint64_t i) {
  uint64_t pair = i >> 1;
  uint64_t h1 = msh_mix64(seed * 0x9e3779b97f4a7c15ULL + pair * 2 + 1);
  uint64_t h2 = msh_mix64(h1 ^ 0xd1b54a32d192ed03ULL);
  double u1 = ((double)(h1 >> 11) + 1.0) * (1.0 / 9007199254740993.0); /* (0, 1] */
  double u2 = (double)(h2 >> 11) * (1.0 / 9007199254740992.0);
  double r = sqrt(-2.0 * log(u1));
  double a = 6.283185307179586 * u2;
  return (float)((i & 1) ? r * sin(a) : r * cos(a));
}

/* Element i of a tensor drawn with mean and std: one expression for every backend's loop. */
static inline MSH_HD float msh_randn_scaled(uint64_t seed, uint64_t i, float mean, float std) {
  return mean + std * msh_randn_value(seed, i);
}

#endif
