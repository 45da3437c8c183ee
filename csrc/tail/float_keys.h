// Order-preserving integer keys of IEEE floats, the basis of the radix selection.
//
// |x| keys: clearing the sign bit leaves a bit pattern whose unsigned order is the order of |x|
// (zero lowest, then subnormals, normals, +inf, then NaNs), so ranks of |x| are ranks of keys.
// Signed keys: flipping all bits of negatives and the sign bit of positives gives the total
// order -NaN < -inf < ... < -0 < +0 < ... < +inf < +NaN.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace gradience::tail {

enum class FloatFormat : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

template <FloatFormat F>
struct FormatTraits;

template <>
struct FormatTraits<FloatFormat::kFloat16> {
  using Bits = uint16_t;
  static constexpr int kBits = 16;
  static constexpr Bits kSign = 0x8000;
  static constexpr Bits kInf = 0x7c00;  // exponent all ones, mantissa zero
  static double to_double(Bits h) {
    const int exponent = (h >> 10) & 0x1f;
    const int mantissa = h & 0x3ff;
    double magnitude;
    if (exponent == 0) {
      magnitude = std::ldexp(static_cast<double>(mantissa), -24);
    } else if (exponent == 31) {
      magnitude = mantissa ? std::numeric_limits<double>::quiet_NaN()
                           : std::numeric_limits<double>::infinity();
    } else {
      magnitude = std::ldexp(static_cast<double>(1024 + mantissa), exponent - 25);
    }
    return (h & kSign) ? -magnitude : magnitude;
  }
};

template <>
struct FormatTraits<FloatFormat::kBFloat16> {
  using Bits = uint16_t;
  static constexpr int kBits = 16;
  static constexpr Bits kSign = 0x8000;
  static constexpr Bits kInf = 0x7f80;
  static double to_double(Bits h) {
    const uint32_t wide = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &wide, sizeof f);
    return f;
  }
};

template <>
struct FormatTraits<FloatFormat::kFloat32> {
  using Bits = uint32_t;
  static constexpr int kBits = 32;
  static constexpr Bits kSign = 0x80000000u;
  static constexpr Bits kInf = 0x7f800000u;
  static double to_double(Bits b) {
    float f;
    std::memcpy(&f, &b, sizeof f);
    return f;
  }
};

template <>
struct FormatTraits<FloatFormat::kFloat64> {
  using Bits = uint64_t;
  static constexpr int kBits = 64;
  static constexpr Bits kSign = 0x8000000000000000ull;
  static constexpr Bits kInf = 0x7ff0000000000000ull;
  static double to_double(Bits b) {
    double d;
    std::memcpy(&d, &b, sizeof d);
    return d;
  }
};

// Key layout for radix selection: the key is cut into digits of 16 bits from the top, the last
// digit taking what remains (15 bits for |x| keys of 32/64-bit floats). A 16-bit float's |x| key
// (15 bits) is a single digit: one histogram answers every rank exactly.
template <FloatFormat F, bool kAbsolute>
struct KeyPolicy {
  using Traits = FormatTraits<F>;
  using Bits = typename Traits::Bits;
  static constexpr bool kAbs = kAbsolute;
  static constexpr FloatFormat kFormat = F;
  static constexpr int kWidth = kAbsolute ? Traits::kBits - 1 : Traits::kBits;
  static constexpr int kLevels = (kWidth + 15) / 16;
  // Largest key that takes part in the ranking: |x| ranks exclude +inf and NaN (and zero, which
  // is key 0 and sits below every rank that is validated against n_eff).
  static constexpr Bits kMaxValidKey =
      kAbsolute ? Bits(Traits::kInf - 1) : std::numeric_limits<Bits>::max();

  static constexpr int digit_width(int level) {
    return level == kLevels - 1 ? kWidth - 16 * (kLevels - 1) : 16;
  }
  static constexpr int shift(int level) {
    return level == kLevels - 1 ? 0 : kWidth - 16 * (level + 1);
  }
  static inline Bits key(Bits b) {
    if constexpr (kAbsolute) {
      return Bits(b & Bits(~Traits::kSign));
    } else {
      return (b & Traits::kSign) ? Bits(~b) : Bits(b | Traits::kSign);
    }
  }
  static inline Bits bits_of_key(Bits k) {
    if constexpr (kAbsolute) {
      return k;
    } else {
      return (k & Traits::kSign) ? Bits(k ^ Traits::kSign) : Bits(~k);
    }
  }
  static inline double value_of_key(Bits k) { return Traits::to_double(bits_of_key(k)); }
};

}  // namespace gradience::tail
