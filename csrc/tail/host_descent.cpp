#include "tail/host_descent.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <utility>
#include <stdexcept>
#include <vector>

#include "tail/compensated_sum.h"

namespace gradience::tail {
namespace {

// The digit layout and key values of KeyPolicy<format, absolute>, at run time.
struct RuntimeKeys {
  FloatFormat format;
  bool absolute;
  int width, levels;

  RuntimeKeys(FloatFormat f, bool abs) : format(f), absolute(abs) {
    const int bits = f == FloatFormat::kFloat64 ? 64 : f == FloatFormat::kFloat32 ? 32 : 16;
    width = abs ? bits - 1 : bits;
    levels = (width + 15) / 16;
  }
  int shift(int level) const { return level == levels - 1 ? 0 : width - 16 * (level + 1); }
  int digit_width(int level) const {
    return level == levels - 1 ? width - 16 * (levels - 1) : 16;
  }
  uint64_t max_valid_key() const {
    switch (format) {
      case FloatFormat::kFloat16: return max_valid<FloatFormat::kFloat16>();
      case FloatFormat::kBFloat16: return max_valid<FloatFormat::kBFloat16>();
      case FloatFormat::kFloat32: return max_valid<FloatFormat::kFloat32>();
      case FloatFormat::kFloat64: return max_valid<FloatFormat::kFloat64>();
    }
    throw std::invalid_argument("unknown float format");
  }
  double value(uint64_t key) const {
    switch (format) {
      case FloatFormat::kFloat16: return value_of<FloatFormat::kFloat16>(key);
      case FloatFormat::kBFloat16: return value_of<FloatFormat::kBFloat16>(key);
      case FloatFormat::kFloat32: return value_of<FloatFormat::kFloat32>(key);
      case FloatFormat::kFloat64: return value_of<FloatFormat::kFloat64>(key);
    }
    throw std::invalid_argument("unknown float format");
  }

 private:
  template <FloatFormat F>
  uint64_t max_valid() const {
    return absolute ? uint64_t(KeyPolicy<F, true>::kMaxValidKey)
                    : uint64_t(KeyPolicy<F, false>::kMaxValidKey);
  }
  template <FloatFormat F>
  double value_of(uint64_t key) const {
    using Bits = typename FormatTraits<F>::Bits;
    return absolute ? KeyPolicy<F, true>::value_of_key(Bits(key))
                    : KeyPolicy<F, false>::value_of_key(Bits(key));
  }
};

// Walks one histogram (bins top..0 descending) for ranks in ascending order of rank: the bin of
// each rank and its rank inside the bin.
void walk(const uint64_t* hist, int64_t top, const std::vector<int64_t>& ranks,
          const std::vector<int>& order, std::vector<uint64_t>& bin_of,
          std::vector<int64_t>& residual) {
  int64_t bin = top, above = 0;
  for (int idx : order) {
    const int64_t r = ranks[idx];
    while (bin > 0 && above + static_cast<int64_t>(hist[bin]) < r) {
      above += static_cast<int64_t>(hist[bin]);
      --bin;
    }
    bin_of[idx] = static_cast<uint64_t>(bin);
    residual[idx] = r - above;
  }
}

// Suffix sums over a histogram row of c * y and c * y^2, y = log(value(key)) - ref, for the
// keys (prefix << width) | d: above[d] = sum over digits > d (above[D - 1] = 0), compensated.
struct RowSums {
  std::vector<double> above_log, above_log_sq;
  double total_log = 0.0, total_log_sq = 0.0;
};

RowSums row_sums(const RuntimeKeys& keys, const uint64_t* counts, int digits, uint64_t prefix,
                 int width, double ref) {
  const uint64_t max_valid = keys.max_valid_key();  // inf and NaN keys hold no sum
  RowSums out;
  out.above_log.assign(digits, 0.0);
  out.above_log_sq.assign(digits, 0.0);
  CompensatedSum s1, s2;
  for (int d = digits - 1; d >= 0; --d) {
    out.above_log[d] = s1.value();
    out.above_log_sq[d] = s2.value();
    const uint64_t c = counts[d];
    const uint64_t key = (prefix << width) | static_cast<uint64_t>(d);
    if (c == 0 || key == 0 || key > max_valid) continue;
    const double y = std::log(keys.value(key)) - ref;
    const double cd = static_cast<double>(c);
    s1.add(cd * y);
    s2.add(cd * y * y);
  }
  out.total_log = s1.value();
  out.total_log_sq = s2.value();
  return out;
}

class HostDescent final : public OrderStatsEngine {
 public:
  HostDescent(std::unique_ptr<OrderStatsEngine> passes, FloatFormat format, bool absolute)
      : passes_(std::move(passes)), keys_(format, absolute) {}

  const std::vector<uint64_t>& top_histogram() const override {
    return passes_->top_histogram();
  }
  void level_pass(int level, const std::vector<int64_t>& bins, bool with_log_sums,
                  LevelPass& out) override {
    passes_->level_pass(level, bins, with_log_sums, out);
  }
  const SampleCounts& count() override {
    counted_ = true;
    return passes_->count();
  }
  bool resolve_sampled(const std::vector<RankRequest>&, bool, std::vector<RankResult>&, double*,
                       SampleCounts*) override {
    return false;
  }

  void resolve(const std::vector<int64_t>& ranks, bool with_log_sums,
               std::vector<RankResult>& out, double* log_ref) override {
    if (!counted_) throw std::logic_error("OrderStatsEngine::resolve before count");
    if (with_log_sums && !keys_.absolute) throw std::logic_error("log sums need |x| keys");
    const int n = static_cast<int>(ranks.size());
    out.assign(n, RankResult{});
    if (n == 0) return;
    std::vector<int> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int a, int b) { return ranks[a] < ranks[b]; });

    std::vector<uint64_t> key(n);
    std::vector<int64_t> residual(n);
    const std::vector<uint64_t>& top = passes_->top_histogram();
    walk(top.data(), static_cast<int64_t>(keys_.max_valid_key() >> keys_.shift(0)), ranks, order,
         key, residual);
    // Log sums of the entries above each rank: over the bins above its last-level bin and the
    // digits above it inside that bin (one level: the top histogram is every key).
    std::vector<double> sum_log(n, 0.0), sum_log_sq(n, 0.0);
    double ref = 0.0;
    if (keys_.levels == 1) {
      if (with_log_sums) {
        const uint64_t lowest = *std::min_element(key.begin(), key.end());
        ref = std::log(keys_.value(lowest == 0 ? 1 : lowest));
        const int digits = static_cast<int>(top.size());
        const RowSums sums = row_sums(keys_, top.data(), digits, 0, 0, ref);
        for (int t = 0; t < n; ++t) {
          sum_log[t] = sums.above_log[key[t]];
          sum_log_sq[t] = sums.above_log_sq[key[t]];
        }
      }
    } else {
      for (int level = 1; level < keys_.levels; ++level) {
        const bool last = level == keys_.levels - 1;
        const bool sums = last && with_log_sums;
        std::vector<int64_t> bins(key.begin(), key.end());
        std::sort(bins.begin(), bins.end());
        bins.erase(std::unique(bins.begin(), bins.end()), bins.end());
        LevelPass pass;
        passes_->level_pass(level, bins, sums, pass);
        const int width = keys_.digit_width(level);
        const int digits = pass.digit_bins;
        const int m = static_cast<int>(bins.size());
        // Each rank one digit down: its row, the digit holding it, its rank among that digit.
        std::vector<int> row_of(n), digit(n);
        for (int t = 0; t < n; ++t) {
          row_of[t] = static_cast<int>(
              std::lower_bound(bins.begin(), bins.end(), static_cast<int64_t>(key[t])) -
              bins.begin());
          const auto [d, above] = digit_of(pass, row_of[t], residual[t]);
          digit[t] = d;
          residual[t] -= above;
        }
        if (sums) {
          ref = pass.log_ref;
          std::vector<RowSums> rows(m);
          for (int j = 0; j < m; ++j) {
            rows[j] = row_sums(keys_, pass.sub_total.data() + static_cast<size_t>(j) * digits,
                               digits, static_cast<uint64_t>(bins[j]), width, ref);
          }
          // Above all of row j: its buckets j + 1..m and the rows above it, as suffix sums.
          std::vector<CompensatedSum> above1(m + 1), above2(m + 1);
          for (int j = m - 1; j >= 0; --j) {
            above1[j] = above1[j + 1];
            above2[j] = above2[j + 1];
            above1[j].add(pass.bucket_log[j + 1]);
            above2[j].add(pass.bucket_log_sq[j + 1]);
            if (j + 1 < m) {
              above1[j].add(rows[j + 1].total_log);
              above2[j].add(rows[j + 1].total_log_sq);
            }
          }
          for (int t = 0; t < n; ++t) {
            const int j = row_of[t];
            CompensatedSum s1 = above1[j], s2 = above2[j];
            s1.add(rows[j].above_log[digit[t]]);
            s2.add(rows[j].above_log_sq[digit[t]]);
            sum_log[t] = s1.value();
            sum_log_sq[t] = s2.value();
          }
        }
        for (int t = 0; t < n; ++t) key[t] = (key[t] << width) | static_cast<uint64_t>(digit[t]);
      }
    }
    for (int t = 0; t < n; ++t) {
      RankResult& r = out[t];
      r.value = keys_.value(key[t]);
      r.n_above = ranks[t] - residual[t];
      if (with_log_sums) {
        r.log_value = std::log(r.value) - ref;
        r.sum_log = sum_log[t];
        r.sum_log_sq = sum_log_sq[t];
      }
    }
    if (log_ref) *log_ref = ref;
  }

 private:
  // The digit of row j (walked from the top) that holds the residual rank, and the count of the
  // row's entries above that digit.
  static std::pair<int, int64_t> digit_of(const LevelPass& pass, int j, int64_t residual) {
    const uint64_t* h = pass.sub_total.data() + static_cast<size_t>(j) * pass.digit_bins;
    int64_t above = 0;
    int d = pass.digit_bins - 1;
    while (d > 0 && above + static_cast<int64_t>(h[d]) < residual) {
      above += static_cast<int64_t>(h[d]);
      --d;
    }
    return {d, above};
  }

  std::unique_ptr<OrderStatsEngine> passes_;
  RuntimeKeys keys_;
  bool counted_ = false;
};

}  // namespace

std::unique_ptr<OrderStatsEngine> make_host_descent(std::unique_ptr<OrderStatsEngine> passes,
                                                    FloatFormat format, bool absolute) {
  return std::make_unique<HostDescent>(std::move(passes), format, absolute);
}

double key_value(FloatFormat format, bool absolute, uint64_t key) {
  return RuntimeKeys(format, absolute).value(key);
}

bool host_descent_requested() {
  const char* v = std::getenv("GRADIENCE_HOST_DESCENT");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

}  // namespace gradience::tail
