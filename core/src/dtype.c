/* dtype.c: element and block sizes, names and scalar conversions between f32, f16 and bf16. */
#include "internal.h"

#include <string.h>

size_t msh_dtype_size(int dtype) { return msh_dtype_is_block(dtype) ? 0 : (size_t)msh_dt_block_bytes(dtype); }
int msh_dtype_block_elems(int dtype) { return (int)msh_dt_block_elems(dtype); }
size_t msh_dtype_block_bytes(int dtype) { return (size_t)msh_dt_block_bytes(dtype); }

const char *msh_dtype_name(int dtype) {
  switch (dtype) {
  case MSH_F32: return "f32";
  case MSH_F16: return "f16";
  case MSH_BF16: return "bf16";
  case MSH_I32: return "i32";
  case MSH_I8: return "i8";
  case MSH_Q8_0: return "q8_0";
  case MSH_Q4_0: return "q4_0";
  case MSH_Q4_1: return "q4_1";
  case MSH_I8G32: return "i8g32";
  case MSH_I8G64: return "i8g64";
  case MSH_I8G128: return "i8g128";
  case MSH_I4G32: return "i4g32";
  case MSH_I4G64: return "i4g64";
  case MSH_I4G128: return "i4g128";
  default: return "?";
  }
}

static inline uint32_t f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

static inline float bits_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

float msh_bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

uint16_t msh_f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
  u += 0x7fffu + ((u >> 16) & 1u);                                           /* nearest even */
  return (uint16_t)(u >> 16);
}

float msh_f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0) {
    if (man == 0) return bits_f32(sign);
    /* subnormal: value = man * 2^-24 */
    float v = (float)man * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  if (exp == 31) return bits_f32(sign | 0x7f800000u | (man << 13));
  return bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

uint16_t msh_f32_to_f16(float f) {
  uint32_t u = f32_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);  /* NaN */
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* overflow to inf (>= 65520) */
  if (a < 0x38800000u) {                                   /* subnormal or zero in f16 */
    /* round a * 2^24 to nearest even integer */
    float v = bits_f32(a) * 16777216.0f;
    uint32_t m = (uint32_t)v;
    float rem = v - (float)m;
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) m++;
    return (uint16_t)(sign | m);
  }
  uint32_t exp = ((a >> 23) - 112) << 10;
  uint32_t man = (a >> 13) & 0x3ffu;
  uint32_t rest = a & 0x1fffu;
  uint32_t h = exp | man;
  if (rest > 0x1000u || (rest == 0x1000u && (man & 1u))) h++;
  return (uint16_t)(sign | h);
}
