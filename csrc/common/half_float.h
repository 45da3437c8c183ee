// float16 / bfloat16 <-> float32 conversions on raw uint16 storage, torch-free, rounding as
// c10::Half / c10::BFloat16 do (round to nearest even; NaN stays NaN), so kernels that store
// 16-bit floats agree bitwise with torch's casts.
#pragma once
#include <cstdint>
#include <cstring>

namespace gradience {

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bfloat16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bfloat16(float f) {
  if (f != f) return 0x7FC0;
  const uint32_t u = float_to_bits(f);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// IEEE binary16 -> binary32: exact (every half is a float). Subnormal halves are rebuilt by a
// float subtraction of the implicit bit (exact).
inline float float16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t body = static_cast<uint32_t>(h & 0x7FFFu) << 13;  // exponent+mantissa, shifted
  const uint32_t exp = body & 0x0F800000u;
  uint32_t out = body + ((127u - 15u) << 23);
  if (exp == 0x0F800000u) {          // Inf / NaN: exponent all ones
    out += (128u - 16u) << 23;
  } else if (exp == 0) {             // zero / subnormal: renormalize through float arithmetic
    out = float_to_bits(bits_to_float(out + (1u << 23)) - bits_to_float(113u << 23));
  }
  return bits_to_float(out | sign);
}

// binary32 -> binary16, round to nearest even, overflow to Inf, NaN to a quiet NaN.
inline uint16_t float_to_float16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) return static_cast<uint16_t>(sign | (a > 0x7F800000u ? 0x7E00u : 0x7C00u));
  if (a >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds to >= 65520
  if (a < 0x38800000u) {
    // Result subnormal (or zero): |f| < 2^-14. Adding 0.5 (2^-1) puts the half's subnormal
    // quantum 2^-24 at the float's last mantissa place, so float addition rounds to nearest even.
    const float r = bits_to_float(a) + 0.5f;
    return static_cast<uint16_t>(sign | (float_to_bits(r) - 0x3F000000u));
  }
  // Normal: rebias the exponent and round the 13 dropped bits to nearest even.
  const uint32_t odd = (a >> 13) & 1u;
  const uint32_t r = a + 0xC8000FFFu + odd;  // (15 - 127) << 23 rebias, + 0xFFF + odd rounding
  return static_cast<uint16_t>(sign | (r >> 13));
}

}  // namespace gradience
