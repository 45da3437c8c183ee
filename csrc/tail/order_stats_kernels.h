// Torch-free interface of the CPU order-statistics engine: exact ranks of |x| (or of signed x)
// by radix selection over integer keys, with the log sums of the tail fused into the last pass.
//
// Memory: O(histogram bins x distinct rank bins) per thread, never O(n): no copy of |x|, no
// mask, no sort. Deterministic for a given thread count (per-thread sums merged in order).
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "common/strided_view.h"
#include "tail/float_keys.h"

namespace gradience::tail {

struct SampleCounts {
  int64_t n_total = 0;  // all entries
  int64_t n_eff = 0;    // entries that are ranked: finite nonzero for |x|; non-NaN for signed x
  int64_t n_zero = 0;   // |x| only: +0.0 and -0.0
  int64_t n_nan = 0;
  int64_t n_inf = 0;    // |x| only
};

// One rank r (descending, 1-based among ranked entries): the value X(r) and, when log sums are
// asked for, the sums over the entries strictly above X(r) of y = log|x| - log_ref.
struct RankResult {
  double value = 0.0;
  int64_t n_above = 0;
  double log_value = 0.0;   // log X(r) - log_ref
  double sum_log = 0.0;     // sum_{x > X(r)} (log x - log_ref)
  double sum_log_sq = 0.0;  // sum_{x > X(r)} (log x - log_ref)^2
};

// A rank asked for before n_eff is known: (ratio > 0 ? floor(ratio * n_eff) : k) + offset.
struct RankRequest {
  int64_t k = 0;
  double ratio = 0.0;
  int64_t offset = 0;
};

// One selection pass of the radix descent, exposed for merging across processes (histograms
// add): the digit histograms of `level` inside the given prefix bins of the level above, and,
// with log sums, the counts and sums of y = log|x| - log_ref of the entries above the lowest
// bin that are not in a bin, by bucket (bucket j: prefixes between bins[j-1] and bins[j];
// bucket m: above every bin).
struct LevelPass {
  int digit_bins = 0;
  std::vector<uint64_t> sub_total;      // [m][digit_bins]
  std::vector<uint64_t> bucket_count;   // [m + 1]
  std::vector<double> bucket_log, bucket_log_sq;  // [m + 1], with log sums
  double log_ref = 0.0;
};

class OrderStatsEngine {
 public:
  virtual ~OrderStatsEngine() = default;
  // The top-digit histogram of pass 1 (count()), [2^digit_width(0)].
  virtual const std::vector<uint64_t>& top_histogram() const = 0;
  // One pass at `level` >= 1 over the ascending, distinct prefixes `bins` of level - 1.
  virtual void level_pass(int level, const std::vector<int64_t>& bins, bool with_log_sums,
                          LevelPass& out) = 0;
  // Pass 1: histogram of the top key digit and the counts. Call once, before resolve().
  virtual const SampleCounts& count() = 0;
  // Resolves descending ranks, each in [1, n_eff] (the caller checks). With log sums (|x| mode
  // only) fills the sum fields; *log_ref receives the reference the sums are taken against.
  virtual void resolve(const std::vector<int64_t>& ranks, bool with_log_sums,
                       std::vector<RankResult>& out, double* log_ref) = 0;
  // One pass instead of count() + resolve() where the format allows and a sample locates the
  // ranks (see order_stats_cpu.cpp). Returns false when it cannot answer: then call count()
  // and resolve(). On true, *counts is exact; results are valid only if every request's rank
  // lies in [1, n_eff], which the caller checks before reading them.
  virtual bool resolve_sampled(const std::vector<RankRequest>& requests, bool with_log_sums,
                               std::vector<RankResult>& out, double* log_ref,
                               SampleCounts* counts) = 0;
};

// views: the tensors of one sample (all of format `format`), treated as one set of values.
std::unique_ptr<OrderStatsEngine> make_order_stats_cpu(FloatFormat format, bool absolute,
                                                       const StridedView* views,
                                                       int64_t n_views);

// The fused tail primitive for one k, from the results of ranks k and k+1 (DESIGN 3.1):
// X(k+1), X(k), S1 = sum_{i<=k} log X(i), S2 = sum_{i<=k} log^2 X(i), and the same sums centred
// at log X(k+1), H1 and H2, which the estimators use because they carry no cancellation.
struct TailRow {
  double k, x_k1, x_k, s1, s2, h1, h2;
};
inline constexpr int kTailRowWidth = 7;
TailRow tail_row(int64_t k, const RankResult& rank_k, const RankResult& rank_k1, double log_ref);

}  // namespace gradience::tail
