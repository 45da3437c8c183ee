// The counter-based probe hash of the curvature estimators, torch-free. The same integer
// specification as the torch path (gradience_kernels/curvature_kernels.py, NumPy uint32) and
// the Triton kernels (gradience_kernels/triton/curvature_kernels.py), so probe j of a stream is
// bitwise the same on every backend (Rademacher), or equal to rounding (Gaussian, whose log/cos
// implementations differ by a few ulps between backends).
//
//   s      = fmix32(seed * 0x9E3779B9)                       (all arithmetic mod 2^32)
//   key_j  = fmix32(j * 0x9E3779B9 + s)                       probe j of stream seed
//   h(e)   = fmix32(fmix32(key_j + lo * 0x7FEB352D) ^ hi * 0x846CA68B),  e = hi 2^32 + lo
// fmix32 is MurmurHash3's 32-bit finalizer; counter-based generation as in Salmon et al. 2011
// ("Parallel random numbers: as easy as 1, 2, 3").
#pragma once
#include <cstddef>
#include <cstdint>
#include <iterator>

#include "common/half_float.h"

namespace gradience::curvature {

inline uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  return x ^ (x >> 16);
}

inline uint32_t probe_key(uint32_t seed, uint64_t probe) {
  const uint32_t s = fmix32(seed * 0x9E3779B9u);
  return fmix32(static_cast<uint32_t>(probe) * 0x9E3779B9u + s);
}

// The hash of entries lo0 .. lo0+n-1 that share the high word `hi` (the caller splits ranges
// at multiples of 2^32), into out[0..n). A plain loop of uint32 operations: vectorized by the
// compiler (8 lanes under AVX2).
inline void entry_hashes(uint32_t key, uint32_t hi, uint32_t lo0, int64_t n, uint32_t* out) {
  const uint32_t hmix = hi * 0x846CA68Bu;  // x ^ 0 = x: entries below 2^32 are unchanged
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t lo = lo0 + static_cast<uint32_t>(i);
    out[i] = fmix32(fmix32(key + lo * 0x7FEB352Du) ^ hmix);
  }
}

// Rademacher value of a hash: -1 when the top bit is set, else +1 (exact in every float format).
inline float rademacher_of(uint32_t h) { return bits_to_float(0x3F800000u | (h & 0x80000000u)); }

// cos(2 pi u) and sin(2 pi u) for u in (0, 1), branch-free (loops over it can be if-converted):
// the distance a = min(u, 1 - u) to the nearest integer is exact (1 - u is exact for u >= 1/2,
// Sterbenz, and not chosen below); cos is even and sin odd about 0 and 1, so cos(2 pi u) =
// cos(2 pi a) and sin(2 pi u) = sin(2 pi a), negated for u > 1/2. a > 1/4 is reflected to
// a' = 1/2 - a (cos changes sign, sin does not), then a' > 1/8 to t = 1/4 - a' (cos and sin
// swap), so x = 2 pi t or 2 pi a' lies in [0, pi/4], where cos x and sin x are Taylor series to
// x^16 / x^17 (first omitted term < 3e-18). 1/2 - a and 1/4 - a' are exact, so the error is a
// few ulps.
struct CosSin {
  double cos, sin;
};

// Horner coefficients in z = x^2, highest first: cos x = sum_k (-1)^k z^k / (2k)! to k = 8,
// sin x = x (1 + z sum_k (-1)^(k+1) z^k / (2k+3)!) to x^17. Shared by the AVX2 form
// (probe_simd.h), so both evaluate the same series.
inline constexpr double kCosTaylor[] = {
    1.0 / 20922789888000.0, -1.0 / 87178291200.0, 1.0 / 479001600.0, -1.0 / 3628800.0,
    1.0 / 40320.0,          -1.0 / 720.0,         1.0 / 24.0,        -0.5,
    1.0};
inline constexpr double kSinTaylor[] = {
    1.0 / 355687428096000.0, -1.0 / 1307674368000.0, 1.0 / 6227020800.0, -1.0 / 39916800.0,
    1.0 / 362880.0,          -1.0 / 5040.0,          1.0 / 120.0,        -1.0 / 6.0};

inline CosSin cos_sin_two_pi(double u) {
  constexpr double kTwoPi = 6.28318530717958647692;
  const bool lower = u < 1.0 - u;
  double a = lower ? u : 1.0 - u;                 // [0, 1/2]
  const bool flip = a > 0.25;
  a = flip ? 0.5 - a : a;                         // [0, 1/4]
  const bool swap = a > 0.125;
  const double x = kTwoPi * (swap ? 0.25 - a : a);  // [0, pi/4]
  const double z = x * x;
  double c = kCosTaylor[0];
  for (size_t k = 1; k < std::size(kCosTaylor); ++k) c = c * z + kCosTaylor[k];
  double s = kSinTaylor[0];
  for (size_t k = 1; k < std::size(kSinTaylor); ++k) s = s * z + kSinTaylor[k];
  s = x + x * z * s;
  const double cos_a = swap ? s : c;
  const double sin_a = swap ? c : s;
  return {flip ? -cos_a : cos_a, lower ? sin_a : -sin_a};
}

// (h + 1/2) 2^-32 in (0, 1) for a hash h, exactly: through int32 (a packed conversion on AVX2;
// uint32 -> double is not), h + 1/2 < 2^32 is representable.
inline double unit_of(uint32_t h) {
  return (static_cast<double>(static_cast<int32_t>(h ^ 0x80000000u)) + 2147483648.5) *
         (1.0 / 4294967296.0);
}

}  // namespace gradience::curvature
