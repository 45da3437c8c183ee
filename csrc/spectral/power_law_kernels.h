// Torch-free interface of the CPU kernel of the continuous power-law fit of a spectral tail
// (Clauset, Shalizi, Newman, SIAM Review 51(4) 2009, eqs. 3.1-3.2 and section 3.3), with the
// conventions of the `powerlaw` package (2.x) for continuous data.
//
// For each layer, the values v (finite; positive, or non-positive ones dropped) at most xmax are
// sorted; u_0 < u_1 < ... < u_{m-1} are their distinct values. The candidates are xmin = u_c for
// c = 0..m-3 (powerlaw's Fit.find_xmin: unique values, the largest value and then the largest
// remaining one excluded). For candidate c the tail is every v >= u_c, of size n_c, and
//   S_c = sum_{tail} log(v / u_c),
//   alpha_c = 1 + n_c / S_c                              (CSN eq. 3.1; no xmax)
//   or the root of the truncated-power-law likelihood equation (with xmax, see below),
//   D_c = max_{k >= c} | E_c(u_k) - F_c(u_k) |           (CSN section 3.3)
// with the tail's empirical CDF taken left-continuous at the distinct values, as powerlaw's
// statistics.cdf does (searchsorted side='left'): E_c(u_k) = #{tail v < u_k} / n_c, and the
// fitted CDF F_c(x) = 1 - (x/u_c)^(1-alpha) (no xmax) or
// F_c(x) = (1 - (x/u_c)^(1-alpha)) / (1 - (xmax/u_c)^(1-alpha)) (with xmax).
// The fit is the candidate of minimal D_c among the eligible ones (alpha_lo < alpha_c < alpha_hi),
// the first one on ties (numpy.argmin); with no eligible candidate, the minimal D_c over all.
#pragma once
#include <cstdint>

namespace gradience::spectral {

// How alpha is estimated when xmax is finite.
enum class XmaxAlpha : int32_t {
  // The maximum-likelihood exponent of the power law truncated to [xmin, xmax]: the root t of
  // 1/t - L/(e^{tL} - 1) = S_c/n_c with L = log(xmax/xmin), alpha = 1 + t (any real alpha).
  kTruncatedMle = 0,
  // powerlaw 2.x's Power_Law.fit: the untruncated closed form 1 + n_c/S_c where it lies in
  // (1.5, 3], the truncated maximum-likelihood exponent elsewhere (which powerlaw approximates
  // by Nelder-Mead with tol=1e-4).
  kPowerlaw = 1,
};

// How D_c is computed. Both give bitwise the same D_c: the max of the same per-point values.
enum class DMode : int32_t {
  // Block bounds: E and F are non-decreasing along the tail, so on a block of points between
  // evaluated points a < b, |E - F| <= max(E_{b-1} - F_a, F_b - E_{a+1}); only blocks whose
  // bound exceeds the running max are refined. Exact and deterministic.
  kPruned = 0,
  // F evaluated at every distinct tail value (O(n^2) per layer; for tests and timing).
  kExhaustive = 1,
};

struct PowerLawOptions {
  double xmax;                 // +inf: no upper cutoff (the untruncated fit)
  XmaxAlpha xmax_alpha;        // used only when xmax is finite
  double alpha_lo, alpha_hi;   // eligibility, open interval; -inf, +inf: every candidate
  bool drop_nonpositive;       // v <= 0 dropped (counted) instead of expected absent
  DMode d_mode;
};

// Output columns.
enum FitColumn : int64_t { kFitXmin = 0, kFitAlpha, kFitD, kFitSigma, kFitColumns };
enum CountColumn : int64_t {
  kCountCandidates = 0,  // m - 2 (0 when the layer has fewer than 3 distinct values)
  kCountBest,            // index of the chosen candidate, -1 when there is none
  kCountTail,            // n_c of the chosen candidate
  kCountUsed,            // values used (positive, at most xmax)
  kCountDropped,         // values <= 0 dropped (drop_nonpositive)
  kCountAboveXmax,       // values above xmax left out
  kCountEligible,        // candidates with alpha_lo < alpha_c < alpha_hi
  kCountColumns,
};

// xs[l]:    [ns[l]] float64 values of layer l, any order, all finite; with drop_nonpositive
//           false, all > 0. Not modified.
// offsets:  [n_layers] first column of layer l in the curve outputs (the sum of ns before l).
// fits:     [n_layers][kFitColumns] float64: xmin, alpha, D, sigma = (alpha - 1)/sqrt(n_tail)
//           of the chosen candidate; NaN when the layer has no candidate.
// counts:   [n_layers][kCountColumns] int64 (see CountColumn).
// curves:   [3][n_total] float64, rows xmin_c, alpha_c, D_c: layer l's candidates in ascending
//           xmin at columns offsets[l] + c, c < counts[l][kCountCandidates]; 0 beyond (not
//           NaN: padding compares equal, as opcheck requires).
// n_tails:  [n_total] int64, n_c at the same columns; 0 beyond.
// Parallel over layers (sorting) and over (layer, candidate) pairs; every output entry is
// computed by one fixed sequence of operations, so results do not depend on the thread count.
void fit_power_law_cpu(const double* const* xs, const int64_t* ns, const int64_t* offsets,
                       int64_t n_layers, int64_t n_total, const PowerLawOptions& options,
                       double* fits, int64_t* counts, double* curves, int64_t* n_tails);

}  // namespace gradience::spectral
