// CPU kernel of the bootstrap statistics (see bootstrap_kernels.h). Per resample: m + 1
// exponential variates (a vectorised log of uniforms), then one walk over the sorted draws that
// gathers log X(J(i)) in increasing rank order (a forward sweep through `logs`) and keeps the
// running power sums; the statistics are formed only at the requested ks.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/parallel.h"
#include "tail/bootstrap_kernels.h"
#include "tail/engine_support.h"
#include "tail/simd_scan.h"

namespace gradience::tail {
namespace {

// splitmix64 (Steele, Lea, Flood 2014): seeds the per-resample generator.
uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// xoshiro256** (Blackman, Vigna 2018).
struct Xoshiro256 {
  uint64_t s[4];
  Xoshiro256(uint64_t seed, uint64_t stream) {
    uint64_t state = seed ^ (stream * 0xd1b54a32d192ed03ull);
    for (auto& v : s) v = splitmix64(state);
  }
  static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t next() {
    const uint64_t result = rotl(s[1] * 5, 7) * 9;
    const uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
  }
  // Uniform on (0, 1]: 53 random bits, never 0 (its log must be finite).
  double uniform_open0() { return static_cast<double>((next() >> 11) + 1) * 0x1.0p-53; }
};

struct Moments {
  double m1, m2, m3;
};

// M_j of the top k about c = log X*(k+1), from power sums s_j = sum_{i<=k} y_i of y = log - ref
// and y_c = c - ref (expanded, as the reference scripts compute them).
Moments centred_moments(double s1, double s2, double s3, double k, double yc) {
  const double a1 = s1 / k, a2 = s2 / k, a3 = s3 / k;
  return {a1 - yc, a2 - 2 * yc * a1 + yc * yc,
          a3 - 3 * yc * a2 + 3 * yc * yc * a1 - yc * yc * yc};
}

double hill_statistic(const Moments& m) {
  const double d = m.m2 - 2 * m.m1 * m.m1;
  return d * d;
}

double moment_statistic(const Moments& m) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  if (!(m.m2 > 0) || m.m3 == 0) return nan;
  const double r2 = 1 - m.m1 * m.m1 / m.m2;
  const double r3 = 1 - m.m1 * m.m2 / m.m3;
  if (std::fabs(r2) < 1e-10 || std::fabs(r3) < 1e-10) return nan;
  const double xi2 = m.m1 + 1 - 0.5 / r2;
  const double xi3 = std::sqrt(0.5 * m.m2) + 1 - (2.0 / 3.0) / r3;
  const double d = xi2 - xi3;
  return d * d;
}

constexpr int64_t kChunk = 512;

}  // namespace

void bootstrap_tail_statistics_cpu(const double* logs, int64_t n, int64_t m, const int64_t* ks,
                                   int64_t n_ks, int64_t n_resamples, uint64_t seed,
                                   int64_t first_resample, double* out) {
  if (n_resamples <= 0 || n_ks <= 0) return;
  // Sums of logs relative to their middle value: the expanded moments then cancel less.
  const double ref = logs[n / 2];
  const int64_t last_k = ks[n_ks - 1];
  parallel_blocks(n_resamples, [&](int64_t b0, int64_t b1, int) {
    std::vector<double> spacing(static_cast<size_t>(last_k) + 2);
    for (int64_t b = b0; b < b1; ++b) {
      Xoshiro256 rng(seed, static_cast<uint64_t>(first_resample + b));
      // Sorted uniforms U(i) = (E_0 + ... + E_{i-1}) / (E_0 + ... + E_m): only the first
      // last_k + 1 spacings are walked; the others enter through their sum alone.
      const int64_t walked = last_k + 1;
      // Uniforms and their logs in L1-sized chunks, summed on four lanes (one running sum
      // would chain every addition's latency).
      double lanes[4] = {0, 0, 0, 0};
      auto exponentials = [&](double* dst, int64_t count) {
        for (int64_t i = 0; i < count; ++i) dst[i] = rng.uniform_open0();
        simd::log_minus(dst, dst, count, 0.0);  // log U <= 0: the spacing is -dst[i]
        int64_t i = 0;
        for (; i + 4 <= count; i += 4) {
          for (int l = 0; l < 4; ++l) lanes[l] -= dst[i + l];
        }
        for (; i < count; ++i) lanes[0] -= dst[i];
      };
      for (int64_t i = 0; i < walked; i += kChunk) {
        exponentials(spacing.data() + i, std::min<int64_t>(kChunk, walked - i));
      }
      double rest[kChunk];
      for (int64_t left = m + 1 - walked; left > 0; left -= kChunk) {
        exponentials(rest, std::min<int64_t>(left, kChunk));
      }
      const double total = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
      const double scale = static_cast<double>(n) / total;
      double* hill_out = out + (b * 2) * n_ks;
      double* moment_out = hill_out + n_ks;
      double cumulative = 0, s1 = 0, s2 = 0, s3 = 0;
      int64_t g = 0;
      for (int64_t i = 1; i <= walked && g < n_ks; ++i) {
        cumulative -= spacing[i - 1];
        const int64_t rank = std::min<int64_t>(n - 1, static_cast<int64_t>(cumulative * scale));
        const double y = logs[rank] - ref;
        // i - 1 draws are summed: the statistics of k = i - 1 take y as log X*(k+1) - ref.
        while (g < n_ks && ks[g] == i - 1) {
          const Moments mo = centred_moments(s1, s2, s3, static_cast<double>(i - 1), y);
          hill_out[g] = hill_statistic(mo);
          moment_out[g] = moment_statistic(mo);
          ++g;
        }
        s1 += y;
        s2 += y * y;
        s3 += y * y * y;
      }
    }
  });
}

}  // namespace gradience::tail
