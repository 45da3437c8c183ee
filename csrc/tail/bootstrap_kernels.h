// Torch-free interface of the CPU bootstrap kernel of the double-bootstrap choice of k
// (Danielsson et al. 2001 for Hill, Draisma et al. 1999 for the moment estimator).
//
// A bootstrap resample of size m from the n values is, once sorted, X(J(1)) >= ... >= X(J(m))
// with J(1) <= ... <= J(m) the sorted draws of m ranks uniform on {1..n}. The kernel draws those
// sorted ranks directly (exponential spacings: sorted uniforms are normalised partial sums of
// m+1 exponentials) and walks them once, so a resample costs O(m) with no sort and no copy of
// the data; the sorted data enter only through their logs.
#pragma once
#include <cstdint>

namespace gradience::tail {

// logs:   [n]      log X(1) >= ... >= log X(n) (the sorted finite nonzero |x|)
// ks:     [n_ks]   ascending, 1 <= ks[g] < m
// out:    [n_resamples][2][n_ks] float64: for resample b and k = ks[g],
//           out[b][0][g] = (M2 - 2 M1^2)^2                 (Hill statistic, Danielsson 2001)
//           out[b][1][g] = (xi2 - xi3)^2 or NaN            (moment statistic, Draisma 1999)
//         with M_j = (1/k) sum_{i<=k} (log X*(i) - log X*(k+1))^j of the resample X*,
//         xi2 = M1 + 1 - (1/2) / (1 - M1^2/M2), xi3 = sqrt(M2/2) + 1 - (2/3) / (1 - M1 M2/M3),
//         NaN where M2 <= 0, M3 == 0, |1 - M1^2/M2| < 1e-10 or |1 - M1 M2/M3| < 1e-10.
// Resample b draws from its own random stream (seed, first_resample + b), so results do not
// depend on the thread count or on how resamples are split between calls.
void bootstrap_tail_statistics_cpu(const double* logs, int64_t n, int64_t m, const int64_t* ks,
                                   int64_t n_ks, int64_t n_resamples, uint64_t seed,
                                   int64_t first_resample, double* out);

}  // namespace gradience::tail
