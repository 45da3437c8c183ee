// AVX2 inner loops of the CPU engine for the hot case (contiguous float32 |x| keys) and the
// vectorised logarithm. Each has a portable fallback used when AVX2 is not compiled in; the
// engine picks them by format, key mode and stride.
//
// Measured on the 2-core AMD EPYC (Zen 3) dev machine, per thread: pass 1 went from 1.1 to
// ~0.6 ns/entry (zero/inf counted by vector compares instead of scalar ones, two histogram
// copies against store-forwarding stalls on hot bins), the candidate selection of the last
// pass from 0.7 to ~0.25 ns/entry (left-packing through a permutation table instead of a
// scalar loop), and the log of a selected entry from ~17 ns (libm-free scalar code, not
// vectorised by GCC) to ~1.5 ns.
#pragma once
#include <cstdint>
#include <cstring>

#include "tail/compensated_sum.h"
#include "tail/fast_log.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace gradience::tail::simd {

#if defined(__AVX2__)
inline constexpr bool kHaveAvx2 = true;
#else
inline constexpr bool kHaveAvx2 = false;
#endif

// Pass 1 over contiguous float32 bit patterns: histogram of (|x| key >> 15) split across two
// copies (even/odd entries), and exact counts of zero and inf keys.
inline void count_f32_abs(const uint32_t* p, int64_t n, uint32_t* hist_a, uint32_t* hist_b,
                          uint64_t& zeros, uint64_t& infs) {
  constexpr uint32_t kAbs = 0x7fffffffu;
  constexpr uint32_t kInf = 0x7f800000u;
  int64_t i = 0;
#if defined(__AVX2__)
  const __m256i abs_mask = _mm256_set1_epi32(static_cast<int>(kAbs));
  const __m256i inf_key = _mm256_set1_epi32(static_cast<int>(kInf));
  const __m256i zero = _mm256_setzero_si256();
  __m256i zero_count = _mm256_setzero_si256();
  __m256i inf_count = _mm256_setzero_si256();
  // Lane counters are 32-bit: drain them before 2^31 groups could accumulate.
  int64_t groups = 0;
  auto drain = [&] {
    alignas(32) uint32_t z[8], f[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(z), zero_count);
    _mm256_store_si256(reinterpret_cast<__m256i*>(f), inf_count);
    for (int l = 0; l < 8; ++l) {
      zeros += z[l];
      infs += f[l];
    }
    zero_count = _mm256_setzero_si256();
    inf_count = _mm256_setzero_si256();
    groups = 0;
  };
  for (; i + 8 <= n; i += 8) {
    const __m256i keys =
        _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)), abs_mask);
    zero_count = _mm256_sub_epi32(zero_count, _mm256_cmpeq_epi32(keys, zero));
    inf_count = _mm256_sub_epi32(inf_count, _mm256_cmpeq_epi32(keys, inf_key));
    // Bin indices computed in the vector unit and read back from the stack: one load per
    // increment instead of a load, mask and shift.
    alignas(32) uint32_t bin[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(bin), _mm256_srli_epi32(keys, 15));
    ++hist_a[bin[0]];
    ++hist_b[bin[1]];
    ++hist_a[bin[2]];
    ++hist_b[bin[3]];
    ++hist_a[bin[4]];
    ++hist_b[bin[5]];
    ++hist_a[bin[6]];
    ++hist_b[bin[7]];
    if (++groups == (int64_t{1} << 30)) drain();
  }
  drain();
#endif
  for (; i < n; ++i) {
    const uint32_t key = p[i] & kAbs;
    ++hist_a[key >> 15];
    zeros += key == 0;
    infs += key == kInf;
  }
}

// Pass 1 over contiguous 16-bit floats: the 15-bit |x| key is the whole histogram index.
// Four keys per 64-bit load and four histogram copies: measured 0.35-0.45 ns/entry against
// 0.5-0.8 for one 16-bit load and increment per entry.
inline void count_u16_abs(const uint16_t* p, int64_t n, uint32_t* h0, uint32_t* h1, uint32_t* h2,
                          uint32_t* h3) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    uint64_t v;
    std::memcpy(&v, p + i, sizeof v);
    ++h0[v & 0x7fff];
    ++h1[(v >> 16) & 0x7fff];
    ++h2[(v >> 32) & 0x7fff];
    ++h3[(v >> 48) & 0x7fff];
  }
  for (; i < n; ++i) ++h0[p[i] & 0x7fff];
}

#if defined(__AVX2__)
// Lane indices that move the set lanes of an 8-bit mask to the front, for _mm256_permutevar8x32.
struct LeftPackTable {
  alignas(32) int32_t index[256][8];
  constexpr LeftPackTable() : index{} {
    for (int mask = 0; mask < 256; ++mask) {
      int out = 0;
      for (int lane = 0; lane < 8; ++lane) {
        if (mask & (1 << lane)) index[mask][out++] = lane;
      }
      for (; out < 8; ++out) index[mask][out] = 0;
    }
  }
};
inline constexpr LeftPackTable kLeftPack{};
#endif

// Appends to out the |x| keys of contiguous float32 entries with lo <= key <= lo + span and
// returns how many; out needs room for n + 8 keys. With kCountSpecials, also counts the zero,
// inf and NaN keys over all n entries (the sampled single pass has no pass-1 histogram to take
// them from); n < 2^31 then (32-bit lane counters).
template <bool kCountSpecials>
inline int64_t select_f32_abs_impl(const uint32_t* p, int64_t n, uint32_t lo, uint32_t span,
                                   uint32_t* out, uint64_t& zeros, uint64_t& infs,
                                   uint64_t& nans) {
  constexpr uint32_t kAbs = 0x7fffffffu;
  constexpr uint32_t kInf = 0x7f800000u;
  int64_t count = 0;
  int64_t i = 0;
#if defined(__AVX2__)
  const __m256i abs_mask = _mm256_set1_epi32(static_cast<int>(kAbs));
  const __m256i lo_v = _mm256_set1_epi32(static_cast<int>(lo));
  const __m256i span_v = _mm256_set1_epi32(static_cast<int>(span));
  const __m256i inf_v = _mm256_set1_epi32(static_cast<int>(kInf));
  const __m256i zero = _mm256_setzero_si256();
  __m256i zero_count = zero, inf_count = zero, nan_count = zero;
  for (; i + 8 <= n; i += 8) {
    const __m256i keys =
        _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)), abs_mask);
    if constexpr (kCountSpecials) {
      zero_count = _mm256_sub_epi32(zero_count, _mm256_cmpeq_epi32(keys, zero));
      inf_count = _mm256_sub_epi32(inf_count, _mm256_cmpeq_epi32(keys, inf_v));
      nan_count = _mm256_sub_epi32(nan_count, _mm256_cmpgt_epi32(keys, inf_v));
    }
    const __m256i offset = _mm256_sub_epi32(keys, lo_v);
    // Unsigned offset <= span  <=>  max(offset, span) == span.
    const __m256i in_range = _mm256_cmpeq_epi32(_mm256_max_epu32(offset, span_v), span_v);
    const int mask = _mm256_movemask_ps(_mm256_castsi256_ps(in_range));
    const __m256i perm =
        _mm256_load_si256(reinterpret_cast<const __m256i*>(kLeftPack.index[mask]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + count),
                        _mm256_permutevar8x32_epi32(keys, perm));
    count += __builtin_popcount(static_cast<unsigned>(mask));
  }
  if constexpr (kCountSpecials) {
    alignas(32) uint32_t z[8], f[8], q[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(z), zero_count);
    _mm256_store_si256(reinterpret_cast<__m256i*>(f), inf_count);
    _mm256_store_si256(reinterpret_cast<__m256i*>(q), nan_count);
    for (int l = 0; l < 8; ++l) {
      zeros += z[l];
      infs += f[l];
      nans += q[l];
    }
  }
#endif
  for (; i < n; ++i) {
    const uint32_t key = p[i] & kAbs;
    if constexpr (kCountSpecials) {
      zeros += key == 0;
      infs += key == kInf;
      nans += key > kInf;
    }
    out[count] = key;
    count += (key - lo) <= span;
  }
  return count;
}

inline int64_t select_f32_abs(const uint32_t* p, int64_t n, uint32_t lo, uint32_t span,
                              uint32_t* out) {
  uint64_t unused = 0;
  return select_f32_abs_impl<false>(p, n, lo, span, out, unused, unused, unused);
}

inline int64_t select_count_f32_abs(const uint32_t* p, int64_t n, uint32_t lo, uint32_t span,
                                    uint32_t* out, uint64_t& zeros, uint64_t& infs,
                                    uint64_t& nans) {
  return select_f32_abs_impl<true>(p, n, lo, span, out, zeros, infs, nans);
}

// For contiguous 16-bit floats: appends to out (as 32-bit values) the |x| keys with
// lo <= key < inf_key, returns how many, and counts zero, inf and NaN keys over all n entries.
// out needs room for n + 16 keys; n < 2^16 per call (16-bit lane counters).
inline int64_t select_count_u16_abs(const uint16_t* p, int64_t n, uint16_t lo, uint16_t inf_key,
                                    uint32_t* out, uint64_t& zeros, uint64_t& infs,
                                    uint64_t& nans) {
  int64_t count = 0;
  int64_t i = 0;
#if defined(__AVX2__) && defined(__BMI2__)
  const __m256i abs_mask = _mm256_set1_epi16(0x7fff);
  const __m256i below_lo = _mm256_set1_epi16(static_cast<int16_t>(lo - 1));
  const __m256i inf_v = _mm256_set1_epi16(static_cast<int16_t>(inf_key));
  const __m256i zero = _mm256_setzero_si256();
  __m256i zero_count = zero, inf_count = zero, nan_count = zero;
  for (; i + 16 <= n; i += 16) {
    const __m256i keys =
        _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)), abs_mask);
    zero_count = _mm256_sub_epi16(zero_count, _mm256_cmpeq_epi16(keys, zero));
    inf_count = _mm256_sub_epi16(inf_count, _mm256_cmpeq_epi16(keys, inf_v));
    nan_count = _mm256_sub_epi16(nan_count, _mm256_cmpgt_epi16(keys, inf_v));
    // Keys are below 2^15, so signed 16-bit compares are exact.
    const __m256i in_range = _mm256_and_si256(_mm256_cmpgt_epi16(keys, below_lo),
                                              _mm256_cmpgt_epi16(inf_v, keys));
    const uint32_t byte_mask = static_cast<uint32_t>(_mm256_movemask_epi8(in_range));
    const uint32_t lane_mask = _pext_u32(byte_mask, 0x55555555u);  // one bit per 16-bit lane
    const __m256i low = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(keys));
    const __m256i high = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(keys, 1));
    const unsigned m0 = lane_mask & 0xff, m1 = lane_mask >> 8;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + count),
                        _mm256_permutevar8x32_epi32(low, _mm256_load_si256(
                            reinterpret_cast<const __m256i*>(kLeftPack.index[m0]))));
    count += __builtin_popcount(m0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + count),
                        _mm256_permutevar8x32_epi32(high, _mm256_load_si256(
                            reinterpret_cast<const __m256i*>(kLeftPack.index[m1]))));
    count += __builtin_popcount(m1);
  }
  alignas(32) uint16_t z[16], f[16], q[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(z), zero_count);
  _mm256_store_si256(reinterpret_cast<__m256i*>(f), inf_count);
  _mm256_store_si256(reinterpret_cast<__m256i*>(q), nan_count);
  for (int l = 0; l < 16; ++l) {
    zeros += z[l];
    infs += f[l];
    nans += q[l];
  }
#endif
  for (; i < n; ++i) {
    const uint32_t key = p[i] & 0x7fffu;
    zeros += key == 0;
    infs += key == inf_key;
    nans += key > inf_key;
    out[count] = key;
    count += key >= lo && key < inf_key;
  }
  return count;
}

#if defined(__AVX2__)
// log of 4 positive finite doubles (subnormals included): the method of fast_log().
inline __m256d log_pd(__m256d v) {
  const __m256d ln2 = _mm256_set1_pd(0.69314718055994530942);
  const __m256d sqrt2 = _mm256_set1_pd(1.41421356237309504880);
  const __m256d min_normal = _mm256_set1_pd(2.2250738585072014e-308);
  const __m256d two54 = _mm256_set1_pd(18014398509481984.0);
  const __m256i mantissa_mask = _mm256_set1_epi64x(0x000fffffffffffffll);
  const __m256i one_bits = _mm256_set1_epi64x(0x3ff0000000000000ll);
  // Adding 2^52 as bits turns a small integer into a double: (2^52 + e) - 2^52 = e exactly.
  const __m256i magic_bits = _mm256_set1_epi64x(0x4330000000000000ll);
  const __m256d magic = _mm256_set1_pd(4503599627370496.0);
  const __m256d one = _mm256_set1_pd(1.0);
  const __m256d two = _mm256_set1_pd(2.0);
  const __m256d half = _mm256_set1_pd(0.5);
  const __m256d subnormal = _mm256_cmp_pd(v, min_normal, _CMP_LT_OQ);
  v = _mm256_blendv_pd(v, _mm256_mul_pd(v, two54), subnormal);
  const __m256i bits = _mm256_castpd_si256(v);
  const __m256i biased = _mm256_srli_epi64(bits, 52);
  __m256d exponent =
      _mm256_sub_pd(_mm256_castsi256_pd(_mm256_or_si256(biased, magic_bits)), magic);
  exponent = _mm256_sub_pd(exponent, _mm256_set1_pd(1023.0));
  exponent = _mm256_sub_pd(exponent, _mm256_and_pd(subnormal, _mm256_set1_pd(54.0)));
  __m256d m =
      _mm256_castsi256_pd(_mm256_or_si256(_mm256_and_si256(bits, mantissa_mask), one_bits));
  const __m256d big = _mm256_cmp_pd(m, sqrt2, _CMP_GT_OQ);
  m = _mm256_blendv_pd(m, _mm256_mul_pd(m, half), big);
  exponent = _mm256_add_pd(exponent, _mm256_and_pd(big, one));
  const __m256d f = _mm256_sub_pd(m, one);
  const __m256d s = _mm256_div_pd(f, _mm256_add_pd(two, f));
  const __m256d z = _mm256_mul_pd(s, s);
  __m256d series = _mm256_set1_pd(1.0 / 21.0);
  series = _mm256_fmadd_pd(series, z, _mm256_set1_pd(1.0 / 19.0));
  series = _mm256_fmadd_pd(series, z, _mm256_set1_pd(1.0 / 17.0));
  series = _mm256_fmadd_pd(series, z, _mm256_set1_pd(1.0 / 15.0));
  series = _mm256_fmadd_pd(series, z, _mm256_set1_pd(1.0 / 13.0));
  series = _mm256_fmadd_pd(series, z, _mm256_set1_pd(1.0 / 11.0));
  series = _mm256_fmadd_pd(series, z, _mm256_set1_pd(1.0 / 9.0));
  series = _mm256_fmadd_pd(series, z, _mm256_set1_pd(1.0 / 7.0));
  series = _mm256_fmadd_pd(series, z, _mm256_set1_pd(1.0 / 5.0));
  series = _mm256_fmadd_pd(series, z, _mm256_set1_pd(1.0 / 3.0));
  // log m = f - s (f - 2 z series), as in fast_log().
  const __m256d correction = _mm256_fnmadd_pd(_mm256_mul_pd(two, z), series, f);
  const __m256d log_m = _mm256_fnmadd_pd(s, correction, f);
  return _mm256_fmadd_pd(exponent, ln2, log_m);
}
#endif

// y[i] = log(x[i]) - ref for positive finite x (subnormals included), n >= 0.
inline void log_minus(const double* x, double* y, int64_t n, double ref) {
  int64_t i = 0;
#if defined(__AVX2__)
  const __m256d ref_v = _mm256_set1_pd(ref);
  for (; i + 4 <= n; i += 4) {
    _mm256_storeu_pd(y + i, _mm256_sub_pd(log_pd(_mm256_loadu_pd(x + i)), ref_v));
  }
#endif
  for (; i < n; ++i) y[i] = fast_log(x[i]) - ref;
}

// For float32 |x| keys: adds y = log(x) - ref and y^2, over the keys whose prefix
// (key >> shift) is above `prefix`, to four compensated lane sums (sums[lane], sums_sq[lane]);
// the other keys are skipped.
inline void sum_log_f32_above(const uint32_t* keys, int64_t n, uint32_t prefix, int shift,
                              double ref, CompensatedSum* sums, CompensatedSum* sums_sq) {
  int64_t i = 0;
#if defined(__AVX2__)
  const __m256d ref_v = _mm256_set1_pd(ref);
  const __m128i prefix_v = _mm_set1_epi32(static_cast<int>(prefix));
  const __m128i shift_v = _mm_cvtsi32_si128(shift);
  alignas(32) double lane[4][4];
  for (int l = 0; l < 4; ++l) {
    lane[0][l] = sums[l].sum;
    lane[1][l] = sums[l].comp;
    lane[2][l] = sums_sq[l].sum;
    lane[3][l] = sums_sq[l].comp;
  }
  __m256d acc = _mm256_load_pd(lane[0]), comp = _mm256_load_pd(lane[1]);
  __m256d acc_sq = _mm256_load_pd(lane[2]), comp_sq = _mm256_load_pd(lane[3]);
  // Fast2Sum on four lanes: (a - t) + y is the exact rounding error of t = a + y when
  // |a| >= |y|. Here y >= 0 (x lies above the reference edge; fast_log is accurate to a few
  // ulp, so y >= -1e-15) and a is a running sum of such terms, so the condition holds but for
  // the first terms, where the sums are exact or the error is of order eps |y|. Measured: the
  // Neumaier form with magnitude blends cost 25% of the single-hill time, this one ~5%.
  auto add = [](__m256d& a, __m256d& c, __m256d y) {
    const __m256d t = _mm256_add_pd(a, y);
    c = _mm256_add_pd(c, _mm256_add_pd(_mm256_sub_pd(a, t), y));
    a = t;
  };
  for (; i + 4 <= n; i += 4) {
    const __m128i k = _mm_loadu_si128(reinterpret_cast<const __m128i*>(keys + i));
    // Prefixes of finite keys are below 2^16, so the signed compare is exact.
    const __m128i above = _mm_cmpgt_epi32(_mm_srl_epi32(k, shift_v), prefix_v);
    const __m256d keep = _mm256_castsi256_pd(_mm256_cvtepi32_epi64(above));
    const __m256d y = _mm256_and_pd(
        _mm256_sub_pd(log_pd(_mm256_cvtps_pd(_mm_castsi128_ps(k))), ref_v), keep);
    add(acc, comp, y);
    add(acc_sq, comp_sq, _mm256_mul_pd(y, y));
  }
  _mm256_store_pd(lane[0], acc);
  _mm256_store_pd(lane[1], comp);
  _mm256_store_pd(lane[2], acc_sq);
  _mm256_store_pd(lane[3], comp_sq);
  for (int l = 0; l < 4; ++l) {
    sums[l] = {lane[0][l], lane[1][l]};
    sums_sq[l] = {lane[2][l], lane[3][l]};
  }
#endif
  for (; i < n; ++i) {
    if ((keys[i] >> shift) <= prefix) continue;
    float f;
    std::memcpy(&f, &keys[i], sizeof f);
    const double y = fast_log(f) - ref;
    sums[i & 3].add(y);
    sums_sq[i & 3].add(y * y);
  }
}

}  // namespace gradience::tail::simd
