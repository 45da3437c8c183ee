// Natural logarithm in double precision, written so that GCC/Clang vectorize a loop over it
// (no calls, no branches). The tail sums need log X(i) for ~k elements per call; libm's scalar
// log would cost more than reading the data.
//
// Method: x = 2^e * m with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s), s = (m-1)/(m+1),
// |s| <= 0.1716, by its Taylor series 2 sum s^(2j+1)/(2j+1) to j = 10: the first omitted term is
// below 2.3e-17 relative, so the result is within a few ulp of the exact logarithm (tested
// against numpy.log through the tail sums). m - 1 is exact (Sterbenz).
#pragma once
#include <cstdint>
#include <cstring>

namespace gradience::tail {

// log of a normal double scaled = 2^e m, minus exponent_shift ln 2 (the caller's prescaling).
inline double log_core(double scaled, int32_t exponent_shift) {
  constexpr double kLn2 = 0.69314718055994530942;
  constexpr double kSqrt2 = 1.41421356237309504880;
  uint64_t bits;
  std::memcpy(&bits, &scaled, sizeof bits);
  const int32_t biased = static_cast<int32_t>(bits >> 52);
  const uint64_t mantissa_bits = (bits & 0x000fffffffffffffull) | 0x3ff0000000000000ull;
  double m;
  std::memcpy(&m, &mantissa_bits, sizeof m);
  const bool halve = m > kSqrt2;
  m = halve ? m * 0.5 : m;
  const int32_t exponent = biased - 1023 + (halve ? 1 : 0) - exponent_shift;
  const double f = m - 1.0;
  const double s = f / (2.0 + f);
  const double z = s * s;
  double series = 1.0 / 21.0;
  series = series * z + 1.0 / 19.0;
  series = series * z + 1.0 / 17.0;
  series = series * z + 1.0 / 15.0;
  series = series * z + 1.0 / 13.0;
  series = series * z + 1.0 / 11.0;
  series = series * z + 1.0 / 9.0;
  series = series * z + 1.0 / 7.0;
  series = series * z + 1.0 / 5.0;
  series = series * z + 1.0 / 3.0;
  // 2s(1 + z*series) written as f - s*(f - 2z*series): f = s(2 + f) gives f - s*f = 2s, and the
  // exact f carries the leading term, so rounding only touches the small correction.
  const double log_m = f - s * (f - 2.0 * z * series);
  return static_cast<double>(exponent) * kLn2 + log_m;
}

inline double fast_log(double x) {
  constexpr double kTwo54 = 18014398509481984.0;
  constexpr double kMinNormal = 2.2250738585072014e-308;
  // Subnormal doubles (only reachable from float64 input) are scaled into the normal range.
  const bool subnormal = x < kMinNormal;
  return log_core(subnormal ? x * kTwo54 : x, subnormal ? 54 : 0);
}

}  // namespace gradience::tail
