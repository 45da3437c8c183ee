// 4-lane AVX2 form of the Gaussian probes' cos and sin of 2 pi u (probe_hash.h's
// cos_sin_two_pi, same reduction and series), for the CPU kernels. GCC 12 leaves that loop scalar
// under AVX2 ("control flow in loop": the selects are not if-converted without AVX-512 masks),
// which made Gaussian probes ~26 ns/entry on a Zen machine; the log has its AVX2 form in
// tail/simd_scan.h. Each function has the portable loop as its fallback.
#pragma once
#include <cstdint>

#include "curvature/probe_hash.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace gradience::curvature::simd {

#if defined(__AVX2__) && defined(__FMA__)
inline void cos_sin_two_pi_pd(__m256d u, __m256d& cos_out, __m256d& sin_out) {
  const __m256d one = _mm256_set1_pd(1.0);
  const __m256d sign = _mm256_set1_pd(-0.0);
  const __m256d upper = _mm256_cmp_pd(u, _mm256_sub_pd(one, u), _CMP_GE_OQ);  // not "lower"
  __m256d a = _mm256_blendv_pd(u, _mm256_sub_pd(one, u), upper);  // [0, 1/2], exact
  const __m256d flip = _mm256_cmp_pd(a, _mm256_set1_pd(0.25), _CMP_GT_OQ);
  a = _mm256_blendv_pd(a, _mm256_sub_pd(_mm256_set1_pd(0.5), a), flip);
  const __m256d swap = _mm256_cmp_pd(a, _mm256_set1_pd(0.125), _CMP_GT_OQ);
  const __m256d t = _mm256_blendv_pd(a, _mm256_sub_pd(_mm256_set1_pd(0.25), a), swap);
  const __m256d x = _mm256_mul_pd(_mm256_set1_pd(6.28318530717958647692), t);
  const __m256d z = _mm256_mul_pd(x, x);
  __m256d c = _mm256_set1_pd(kCosTaylor[0]);
  for (size_t k = 1; k < std::size(kCosTaylor); ++k)
    c = _mm256_fmadd_pd(c, z, _mm256_set1_pd(kCosTaylor[k]));
  __m256d s = _mm256_set1_pd(kSinTaylor[0]);
  for (size_t k = 1; k < std::size(kSinTaylor); ++k)
    s = _mm256_fmadd_pd(s, z, _mm256_set1_pd(kSinTaylor[k]));
  s = _mm256_fmadd_pd(_mm256_mul_pd(x, z), s, x);
  // Sign flips by xor with the sign bit where the mask is set.
  cos_out = _mm256_xor_pd(_mm256_blendv_pd(c, s, swap), _mm256_and_pd(flip, sign));
  sin_out = _mm256_xor_pd(_mm256_blendv_pd(s, c, swap), _mm256_and_pd(upper, sign));
}
#endif

// c[i] = cos(2 pi u[i]), s[i] = sin(2 pi u[i]) for u in (0, 1), n >= 0.
inline void cos_sin_two_pi_n(const double* u, double* c, double* s, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; i + 4 <= n; i += 4) {
    __m256d cv, sv;
    cos_sin_two_pi_pd(_mm256_loadu_pd(u + i), cv, sv);
    _mm256_storeu_pd(c + i, cv);
    _mm256_storeu_pd(s + i, sv);
  }
#endif
  for (; i < n; ++i) {
    const CosSin r = cos_sin_two_pi(u[i]);
    c[i] = r.cos;
    s[i] = r.sin;
  }
}

}  // namespace gradience::curvature::simd
