// CPU radix selection over float keys (see float_keys.h) with the tail log sums fused in.
//
// Exact path: (1) a histogram of the top 16-bit digit of every key with the zero/inf/NaN
// counts; (2..L-1) for 64-bit keys, histograms of the next digit restricted to the bins that
// hold a requested rank; (L) the last digit for those bins and, for every entry above the
// lowest of them, log|x| added to the sums of the interval between consecutive requested bins.
// A 32-bit float takes 2 passes, a 16-bit float 1 (its 15-bit key is one digit).
//
// Sampled paths (|x| of 16- and 32-bit floats, from 2^22 entries): a stratified sample bounds
// the bins that can hold each rank. A 16-bit float then takes one pass over the keys above the
// lowest bound; a 32-bit float one pass (few ranks: the last digit inside the sampled windows)
// or two (many ranks: pass 1 restricted to the tail). A rank found outside its bound sends the
// call to the exact path, so results never depend on the sample.
//
// Passes select candidates without branches (every key is written to a small buffer and the
// write position advances only for keys in range), then classify the buffer and evaluate the
// logarithms in a vectorised loop: the data loop stays a streaming read.
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <stdexcept>

#include "common/parallel.h"
#include "tail/compensated_sum.h"
#include "tail/engine_sinks.h"
#include "tail/fast_log.h"
#include "tail/order_stats_kernels.h"
#include "tail/simd_scan.h"

namespace gradience::tail {
namespace {

using namespace engine;

template <class Policy>
class RadixEngine final : public OrderStatsEngine {
  using Bits = typename Policy::Bits;
  using Traits = typename Policy::Traits;
  static constexpr int kLevels = Policy::kLevels;
  static constexpr int kTopShift = Policy::shift(0);
  static constexpr int kTopBins = 1 << Policy::digit_width(0);
  using CountSink = engine::CountSink<Policy>;
  using SelectConfig = engine::SelectConfig<Policy>;
  using SelectSink = engine::SelectSink<Policy>;
  using TopTailConfig = engine::TopTailConfig<Policy>;
  using TopTailSink = engine::TopTailSink<Policy>;
  using TailCountSink = engine::TailCountSink<Policy>;

 public:
  RadixEngine(const StridedView* views, int64_t n_views) : views_(views, views + n_views) {
    offsets_.reserve(views_.size() + 1);
    offsets_.push_back(0);
    for (const auto& v : views_) offsets_.push_back(offsets_.back() + v.numel);
    total_ = offsets_.back();
    counts_.n_total = total_;
  }

  const SampleCounts& count() override {
    top_hist_.assign(kTopBins, 0);
    std::vector<CountSink> sinks(max_threads());
    run_pass(sinks, [&](CountSink& s) { s.end_block(top_hist_); });

    uint64_t zeros = 0, infs = 0, nans = 0;
    for (auto& s : sinks) {
      zeros += s.zeros;
      infs += s.infs;
      nans += s.nans;
    }
    if constexpr (Policy::kAbs) {
      if constexpr (kLevels == 1) {
        zeros = top_hist_[0];
        infs = top_hist_[Traits::kInf];
        nans = 0;
        for (int b = Traits::kInf + 1; b < kTopBins; ++b) nans += top_hist_[b];
      } else {
        uint64_t nonfinite = 0;
        for (uint64_t b = uint64_t(Traits::kInf) >> kTopShift; b < uint64_t(kTopBins); ++b) {
          nonfinite += top_hist_[b];
        }
        nans = nonfinite - infs;
      }
      set_abs_counts(zeros, infs, nans);
    } else {
      counts_.n_nan = static_cast<int64_t>(nans);
      counts_.n_eff = total_;
    }
    counted_ = true;
    return counts_;
  }

  void resolve(const std::vector<int64_t>& ranks, bool with_log_sums,
               std::vector<RankResult>& out, double* log_ref) override {
    if (!counted_) throw std::logic_error("OrderStatsEngine::resolve before count");
    if constexpr (!Policy::kAbs) {
      if (with_log_sums) throw std::logic_error("log sums need |x| keys");
    }
    const int n_ranks = static_cast<int>(ranks.size());
    out.assign(n_ranks, RankResult{});
    if (n_ranks == 0) return;

    std::vector<Bits> prefix(n_ranks);
    std::vector<int64_t> residual(n_ranks);
    walk_top(ranks, prefix, residual);

    if constexpr (kLevels == 1) {
      finish_single_level(ranks, prefix, residual, with_log_sums, out, log_ref);
    } else {
      for (int level = 1; level < kLevels; ++level) {
        const bool last = level == kLevels - 1;
        refine(level, last && with_log_sums, ranks, prefix, residual, out, log_ref);
      }
    }
  }

  // The sampled single pass (2-level |x| keys, i.e. float32): a stratified sample of the data
  // (evenly spaced blocks) bounds the top-digit bins that can hold each requested rank; one pass
  // then histograms the last digit inside those windows, counts and log-sums everything above
  // them, and counts zero/inf/NaN. If a rank turns out to lie outside its window (probability
  // below ~1e-9 for the 6-sigma windows, or on adversarial layouts) this returns false and the
  // caller runs the exact two-pass path: results are exact either way.
  bool resolve_sampled(const std::vector<RankRequest>& requests, bool with_log_sums,
                       std::vector<RankResult>& out, double* log_ref,
                       SampleCounts* counts) override {
    if constexpr (!Policy::kAbs) {
      return false;
    } else if constexpr (kLevels == 1) {
      return resolve_sampled_single_level(requests, with_log_sums, out, log_ref, counts);
    } else if constexpr (kLevels != 2) {
      return false;
    } else {
      SampleWindows windows;
      if (!sample_windows(requests, windows)) return false;
      std::vector<Bits> bins;
      bool narrow = true;
      for (size_t t = 0; t < requests.size() && narrow; ++t) {
        narrow = windows.hi_bin[t] != kNoUpperBound &&
                 windows.hi_bin[t] - windows.lo_bin[t] <= kMaxWindowBins;
        for (int64_t b = windows.lo_bin[t]; narrow && b <= windows.hi_bin[t]; ++b) {
          bins.push_back(static_cast<Bits>(b));
        }
      }
      std::sort(bins.begin(), bins.end());
      bins.erase(std::unique(bins.begin(), bins.end()), bins.end());
      if (!narrow || static_cast<int64_t>(bins.size()) > kMaxSampledBins) {
        // Many ranks, or ranks above the sample's reach: two passes, the first restricted to
        // the keys above the lowest window.
        return resolve_sampled_two_pass(requests, windows, with_log_sums, out, log_ref, counts);
      }

      PassResult pass;
      select_pass(1, bins, with_log_sums, /*count_all=*/true, pass);
      set_abs_counts(pass.zeros, pass.infs, pass.nans);
      *counts = counts_;
      const int m = static_cast<int>(bins.size());
      std::vector<int64_t> ranks;
      if (!exact_ranks(requests, ranks)) return true;  // a rank outside [1, n_eff]: caller raises
      // Entries above each window bin j: buckets j+1..m and bins j+1..m-1.
      std::vector<int64_t> full(m), above(m);
      for (int j = 0; j < m; ++j) {
        const uint64_t* h = pass.sub_total.data() + static_cast<size_t>(j) * pass.cfg.digit_bins;
        full[j] = static_cast<int64_t>(std::accumulate(h, h + pass.cfg.digit_bins, uint64_t{0}));
      }
      int64_t running = static_cast<int64_t>(pass.bucket_count[m]);
      for (int j = m - 1; j >= 0; --j) {
        above[j] = running;
        running += full[j] + static_cast<int64_t>(pass.bucket_count[j]);
      }
      std::vector<Bits> prefix(requests.size());
      std::vector<int64_t> residual(requests.size());
      for (size_t t = 0; t < requests.size(); ++t) {
        int j = m - 1;
        while (j >= 0 && !(above[j] < ranks[t] && ranks[t] <= above[j] + full[j])) --j;
        if (j < 0) {
          counted_ = false;
          return false;  // outside every window: the exact path takes over
        }
        prefix[t] = bins[j];
        residual[t] = ranks[t] - above[j];
      }
      out.assign(requests.size(), RankResult{});
      descend(1, bins, pass, ranks, prefix, residual, out, log_ref);
      return true;
    }
  }

  const std::vector<uint64_t>& top_histogram() const override {
    if (!counted_) throw std::logic_error("OrderStatsEngine::top_histogram before count");
    return top_hist_;
  }

  void level_pass(int level, const std::vector<int64_t>& bins, bool with_log_sums,
                  LevelPass& out) override {
    if (level < 1 || level >= kLevels) throw std::invalid_argument("level out of range");
    if constexpr (!Policy::kAbs) {
      if (with_log_sums) throw std::logic_error("log sums need |x| keys");
    }
    std::vector<Bits> prefixes(bins.begin(), bins.end());
    PassResult pass;
    select_pass(level, prefixes, with_log_sums, /*count_all=*/false, pass);
    const size_t m = prefixes.size();
    out.digit_bins = pass.cfg.digit_bins;
    out.sub_total.assign(pass.sub_total.begin(),
                         pass.sub_total.begin() + m * static_cast<size_t>(out.digit_bins));
    out.bucket_count = pass.bucket_count;
    out.bucket_log = pass.bucket_log;
    out.bucket_log_sq = pass.bucket_log_sq;
    out.log_ref = pass.cfg.log_ref;
  }

 private:
  void set_abs_counts(uint64_t zeros, uint64_t infs, uint64_t nans) {
    counts_.n_zero = static_cast<int64_t>(zeros);
    counts_.n_inf = static_cast<int64_t>(infs);
    counts_.n_nan = static_cast<int64_t>(nans);
    counts_.n_eff = total_ - counts_.n_zero - counts_.n_inf - counts_.n_nan;
  }

  // The ranks of the requests once n_eff is known; false if one lies outside [1, n_eff].
  bool exact_ranks(const std::vector<RankRequest>& requests, std::vector<int64_t>& ranks) const {
    ranks.resize(requests.size());
    for (size_t t = 0; t < requests.size(); ++t) {
      const RankRequest& q = requests[t];
      const int64_t k =
          q.ratio > 0 ? static_cast<int64_t>(std::floor(q.ratio * counts_.n_eff)) : q.k;
      ranks[t] = k + q.offset;
      if (ranks[t] < 1 || ranks[t] > counts_.n_eff) return false;
    }
    return true;
  }

  // Rank walk over the top-digit histogram (bins descending): the bin of each rank and its
  // rank inside the bin. Returns the lowest bin it had to look at.
  int64_t walk_top(const std::vector<int64_t>& ranks, std::vector<Bits>& prefix,
                   std::vector<int64_t>& residual) const {
    const int n_ranks = static_cast<int>(ranks.size());
    std::vector<int> order(n_ranks);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int a, int b) { return ranks[a] < ranks[b]; });
    int64_t bin = static_cast<int64_t>(Policy::kMaxValidKey >> kTopShift);
    int64_t above = 0;
    for (int idx : order) {
      const int64_t r = ranks[idx];
      while (bin > 0 && above + static_cast<int64_t>(top_hist_[bin]) < r) {
        above += static_cast<int64_t>(top_hist_[bin]);
        --bin;
      }
      prefix[idx] = static_cast<Bits>(bin);
      residual[idx] = r - above;
    }
    return bin;
  }

  // Sampling shared by the single-pass paths: the top-digit histogram of kSampleBlocks evenly
  // spread blocks, and for each request the bin window that holds its rank with probability
  // 1 - 1e-9 (6 binomial standard deviations). Returns false if the sample cannot place them.
  struct SampleWindows {
    // Per request, inclusive; hi_bin is kNoUpperBound for ranks above the sample's reach (its
    // largest few entries), which only the two-pass path can take.
    std::vector<int64_t> lo_bin, hi_bin;
    // The sample's top-digit histogram and the entries each sampled entry stands for.
    std::vector<uint64_t> sample_hist;
    double population_per_sample = 0.0;
  };
  bool sample_windows(const std::vector<RankRequest>& requests, SampleWindows& windows) {
    if (total_ < kSampledMinEntries || requests.empty()) return false;
    const int64_t n_blocks = std::min<int64_t>(kSampleBlocks, total_ / (16 * kSampleBlock));
    if (n_blocks < 16) return false;
    CountSink sample;
    sample.init();
    std::vector<uint64_t> sample_hist(kTopBins, 0);
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int64_t begin = static_cast<int64_t>(
          (static_cast<__int128>(b) * (total_ - kSampleBlock)) / (n_blocks - 1));
      consume_range(sample, begin, begin + kSampleBlock);
    }
    sample.end_block(sample_hist);
    const double s = static_cast<double>(n_blocks * kSampleBlock);
    uint64_t s_nonfinite = 0;
    for (uint64_t b = uint64_t(Traits::kInf) >> kTopShift; b < uint64_t(kTopBins); ++b) {
      s_nonfinite += sample_hist[b];
    }
    const uint64_t s_zero = kLevels == 1 ? sample_hist[0] : sample.zeros;
    const double s_eff = s - static_cast<double>(s_zero + s_nonfinite);
    if (s_eff < 1024) return false;
    const double n = static_cast<double>(total_);
    const double valid_fraction = s_eff / s;
    const int64_t top_valid_bin = static_cast<int64_t>(Policy::kMaxValidKey >> kTopShift);
    // cumulative[i] = sampled valid entries in bins top_valid_bin - i and above.
    std::vector<double> cumulative(top_valid_bin + 1);
    double running = 0;
    for (int64_t i = 0; i <= top_valid_bin; ++i) {
      running += static_cast<double>(sample_hist[top_valid_bin - i]);
      cumulative[i] = running;
    }
    auto bin_of_sample_rank = [&](double rank) -> int64_t {
      if (rank > s_eff) return -1;
      const auto it = std::lower_bound(cumulative.begin(), cumulative.end(), rank);
      if (it == cumulative.end()) return 0;
      return std::max<int64_t>(0, top_valid_bin - (it - cumulative.begin()));
    };
    for (const RankRequest& q : requests) {
      const double rank = (q.ratio > 0 ? q.ratio * n * valid_fraction
                                       : static_cast<double>(q.k)) + static_cast<double>(q.offset);
      const double p = std::clamp(rank / n, 0.0, 1.0);
      double spread = 6.0 * std::sqrt(s * p * (1.0 - p)) + 16.0;
      if (q.ratio > 0) spread += 6.0 * q.ratio * std::sqrt(s * valid_fraction * (1 - valid_fraction));
      const double sample_rank = rank * s / n;
      // The top of a window must lie inside the sample: a rank the sample cannot bound from
      // above (the largest few entries) is left to the exact path.
      const int64_t lo_bin = bin_of_sample_rank(sample_rank + spread);
      if (lo_bin < 0) return false;
      windows.lo_bin.push_back(lo_bin);
      windows.hi_bin.push_back(sample_rank - spread < 1.0 ? kNoUpperBound
                                                          : bin_of_sample_rank(sample_rank - spread));
    }
    windows.sample_hist = std::move(sample_hist);
    windows.population_per_sample = n / s;
    return true;
  }

  // Single-level formats (16-bit floats): one pass that histograms only the keys at or above
  // the lowest window (every key there is exact) and counts zero/inf/NaN over all entries.
  bool resolve_sampled_single_level(const std::vector<RankRequest>& requests,
                                    bool with_log_sums, std::vector<RankResult>& out,
                                    double* log_ref, SampleCounts* counts) {
    SampleWindows windows;
    if (!sample_windows(requests, windows)) return false;
    const Bits lo = static_cast<Bits>(
        *std::min_element(windows.lo_bin.begin(), windows.lo_bin.end()));
    if (lo <= 1) return false;  // the whole range: the counting pass is as fast
    top_hist_.assign(kTopBins, 0);
    std::vector<TailCountSink> sinks(max_threads());
    for (auto& s : sinks) s.lo = lo;
    run_pass(sinks, [&](TailCountSink& s) { s.end_block(top_hist_); });
    uint64_t zeros = 0, infs = 0, nans = 0;
    for (auto& s : sinks) {
      zeros += s.zeros;
      infs += s.infs;
      nans += s.nans;
    }
    set_abs_counts(zeros, infs, nans);
    *counts = counts_;
    std::vector<int64_t> ranks;
    if (!exact_ranks(requests, ranks)) return true;  // a rank outside [1, n_eff]: caller raises
    std::vector<Bits> key(requests.size());
    std::vector<int64_t> residual(requests.size());
    walk_top(ranks, key, residual);
    for (size_t t = 0; t < requests.size(); ++t) {
      // A rank below lo, or on lo itself with more entries of lo below it than were counted:
      // the histogram is exact only from lo up.
      if (key[t] < lo || residual[t] > static_cast<int64_t>(top_hist_[key[t]])) return false;
    }
    out.assign(requests.size(), RankResult{});
    finish_single_level(ranks, key, residual, with_log_sums, out, log_ref);
    counted_ = false;  // top_hist_ holds only keys >= lo
    return true;
  }


  // Two-pass path with a sampled lower bound (2-level |x| keys): pass 1 histograms and
  // log-sums, per top-digit bin, only the keys at or above the lowest window (and counts
  // zero/inf/NaN everywhere); pass 2 resolves the last digit inside the rank bins. Exact; if a
  // rank lies below the bound the caller falls back to the full two-pass path.
  bool resolve_sampled_two_pass(const std::vector<RankRequest>& requests,
                                const SampleWindows& windows, bool with_log_sums,
                                std::vector<RankResult>& out, double* log_ref,
                                SampleCounts* counts) {
    const int64_t lo_bin = *std::min_element(windows.lo_bin.begin(), windows.lo_bin.end());
    if (lo_bin <= 1) return false;  // the whole range: the plain counting pass is as fast
    const int64_t top_valid_bin = static_cast<int64_t>(Policy::kMaxValidKey >> kTopShift);
    TopTailConfig tcfg;
    tcfg.lo_bin = lo_bin;
    tcfg.n_bins = top_valid_bin - lo_bin + 1;
    tcfg.lo_key = Bits(Bits(lo_bin) << kTopShift);
    tcfg.with_logs = with_log_sums;
    tcfg.log_ref = fast_log(Policy::value_of_key(tcfg.lo_key));
    // Keys of the window bins are kept in pass 1 when the sample expects them to fit the
    // budget: the last digit of the rank bins is then read from this buffer (a few percent of
    // the data) instead of a second pass over all of it.
    const int threads = max_threads();
    const int64_t capacity = window_buffer_bytes() / static_cast<int64_t>(sizeof(Bits));
    std::vector<uint8_t> in_window;
    if (plan_window_buffer(windows, lo_bin, tcfg.n_bins, threads, capacity, in_window)) {
      tcfg.in_window = in_window.data();
      tcfg.window_cap = capacity / threads;
    }
    top_hist_.assign(kTopBins, 0);
    std::vector<TopTailSink> sinks(threads);
    for (auto& sink : sinks) sink.cfg = &tcfg;
    run_pass(sinks, [&](TopTailSink& sink) { sink.end_block(top_hist_); });

    uint64_t zeros = 0, infs = 0, nans = 0;
    std::vector<CompensatedSum> bin_log(tcfg.n_bins), bin_log_sq(tcfg.n_bins);
    for (auto& sink : sinks) {
      if (sink.keys.empty()) continue;  // thread not used
      zeros += sink.zeros;
      infs += sink.infs;
      nans += sink.nans;
      if (!with_log_sums) continue;
      for (int64_t b = 0; b < tcfg.n_bins; ++b) {
        bin_log[b].add(sink.bin_log[b]);
        bin_log_sq[b].add(sink.bin_log_sq[b]);
      }
    }
    set_abs_counts(zeros, infs, nans);
    *counts = counts_;
    counted_ = false;  // top_hist_ holds only the bins from lo_bin up
    std::vector<int64_t> ranks;
    if (!exact_ranks(requests, ranks)) return true;  // a rank outside [1, n_eff]: caller raises
    std::vector<Bits> prefix(requests.size());
    std::vector<int64_t> residual(requests.size());
    walk_top(ranks, prefix, residual);
    for (size_t t = 0; t < requests.size(); ++t) {
      if (static_cast<int64_t>(prefix[t]) < lo_bin ||
          residual[t] > static_cast<int64_t>(top_hist_[prefix[t]])) {
        return false;  // below the sampled bound: the exact path takes over
      }
    }
    TopBinSums sums;
    sums.lo_bin = lo_bin;
    sums.log_ref = tcfg.log_ref;
    sums.above_log.assign(tcfg.n_bins, 0.0);
    sums.above_log_sq.assign(tcfg.n_bins, 0.0);
    CompensatedSum above, above_sq;
    for (int64_t b = tcfg.n_bins - 1; b >= 0; --b) {
      sums.above_log[b] = above.value();
      sums.above_log_sq[b] = above_sq.value();
      above.add(bin_log[b]);
      above_sq.add(bin_log_sq[b]);
    }
    std::vector<Bits> bins(prefix.begin(), prefix.end());
    std::sort(bins.begin(), bins.end());
    bins.erase(std::unique(bins.begin(), bins.end()), bins.end());
    bool buffered = tcfg.in_window != nullptr;
    for (const auto& sink : sinks) {
      buffered = buffered && !sink.window_overflow;  // an overflow drops the thread's keys
    }
    for (Bits b : bins) buffered = buffered && in_window[static_cast<int64_t>(b) - lo_bin];
    // Slots hold the row in 17 bits and row_of is 16-bit: far more ranks take the data pass.
    buffered = buffered && bins.size() < 65535;
    PassResult pass;
    if (buffered) {
      // Pass 2 over the buffered keys: every key of a rank bin is among them.
      std::vector<KeyRun> runs;
      for (auto& sink : sinks) {
        if (sink.n_window > 0) runs.push_back({sink.window, sink.n_window});
      }
      histogram_buffered_bins(bins, runs, pass);
    } else {
      select_pass(1, bins, /*with_logs=*/false, /*count_all=*/false, pass);
    }
    out.assign(requests.size(), RankResult{});
    descend(1, bins, pass, ranks, prefix, residual, out, log_ref,
            with_log_sums ? &sums : nullptr);
    return true;
  }



  // Marks the window bins from lo_bin up (in_window[bin - lo_bin]) and says whether their keys,
  // as the sample estimates them, fit half the buffer budget (the other half absorbs uneven
  // thread shares and sampling error; a thread that still overflows falls back to pass 2).
  bool plan_window_buffer(const SampleWindows& windows, int64_t lo_bin, int64_t n_bins,
                          int threads, int64_t capacity, std::vector<uint8_t>& in_window) const {
    in_window.assign(static_cast<size_t>(n_bins), 0);
    double expected = 0.0;
    for (size_t t = 0; t < windows.lo_bin.size(); ++t) {
      const int64_t hi = windows.hi_bin[t] == kNoUpperBound ? lo_bin + n_bins - 1
                                                            : windows.hi_bin[t];
      for (int64_t b = windows.lo_bin[t]; b <= hi; ++b) {
        if (in_window[b - lo_bin]) continue;
        in_window[b - lo_bin] = 1;
        expected += static_cast<double>(windows.sample_hist[b]);
      }
    }
    expected *= windows.population_per_sample;
    return threads > 0 && capacity > 0 && expected <= 0.5 * static_cast<double>(capacity);
  }

  // Budget of the window key buffer, all threads together: 48 MiB (1e8 Gaussian entries with 64
  // log-spaced ks put about 4e6 keys, 16 MiB, in the windows), or
  // GRADIENCE_WINDOW_BUFFER_MIB (0 turns the buffer off; the tests use it to reach every path).
  static int64_t window_buffer_bytes() {
    const char* env = std::getenv("GRADIENCE_WINDOW_BUFFER_MIB");
    const double mib = env ? std::strtod(env, nullptr) : 48.0;
    return mib > 0 ? static_cast<int64_t>(mib * 1048576.0) : 0;
  }

  static constexpr int64_t kNoUpperBound = -1;

  static constexpr int64_t kSampledMinEntries = int64_t{1} << 22;
  static constexpr int64_t kSampleBlock = 4096;
  static constexpr int64_t kSampleBlocks = 256;  // 2^20 sampled entries at most
  static constexpr int64_t kMaxWindowBins = 64;
  // Above this many window bins (many ranks) the window sub-histograms cost more than the
  // counting pass they save: the exact two-pass path is faster.
  static constexpr int64_t kMaxSampledBins = 24;


  // Runs sinks[thread].consume over all runs of every view, in blocks; after each block calls
  // end_block(sink) on that thread's sink.
  template <class Sink, class EndBlock>
  void run_pass(std::vector<Sink>& sinks, EndBlock end_block) {
    const int threads = static_cast<int>(sinks.size());
    const int64_t per_thread = (total_ + threads - 1) / threads;
    const int64_t block = std::clamp<int64_t>(per_thread, kMinBlock, kMaxBlock);
    const int64_t n_blocks = (total_ + block - 1) / block;
    std::vector<char> ready(threads, 0);
    parallel_blocks(n_blocks, [&](int64_t b0, int64_t b1, int thread) {
      Sink& sink = sinks[thread];
      if (!ready[thread]) {
        sink.init();
        ready[thread] = 1;
      }
      for (int64_t b = b0; b < b1; ++b) {
        consume_range(sink, b * block, std::min(total_, (b + 1) * block));
        end_block(sink);
      }
    });
  }

  // sink.consume over the runs of the entries [begin, end) of the sample (all views in order).
  template <class Sink>
  void consume_range(Sink& sink, int64_t begin, int64_t end) {
    // First view that ends after `begin`.
    size_t v = std::upper_bound(offsets_.begin(), offsets_.end(), begin) - offsets_.begin() - 1;
    for (; v < views_.size() && offsets_[v] < end; ++v) {
      const int64_t lo = std::max(begin, offsets_[v]) - offsets_[v];
      const int64_t hi = std::min(end, offsets_[v + 1]) - offsets_[v];
      for_each_run<Bits>(views_[v], lo, hi, [&](const Bits* p, int64_t n, int64_t stride) {
        sink.consume(p, n, stride);
      });
    }
  }



  // Result of one selection pass over `bins` (ascending prefixes of the previous level).
  struct PassResult {
    // [m][digit_bins]: the calling thread's scratch, valid until the next pass of this thread.
    std::vector<uint64_t>& sub_total = thread_scratch<uint64_t, 2>();
    // [m + 1], with count_all: bucket j holds prefixes in (bins[j-1], bins[j]), m above all.
    std::vector<uint64_t> bucket_count;
    std::vector<double> bucket_log, bucket_log_sq;
    uint64_t zeros = 0, infs = 0, nans = 0;  // with count_all
    SelectConfig cfg;
  };

  void select_pass(int level, const std::vector<Bits>& bins, bool with_logs, bool count_all,
                   PassResult& result) {
    const int m = static_cast<int>(bins.size());
    SelectConfig& cfg = result.cfg;
    cfg.prefix_shift = Policy::shift(level - 1);
    cfg.digit_shift = Policy::shift(level);
    cfg.digit_bins = 1 << Policy::digit_width(level);
    cfg.digit_mask = Bits(cfg.digit_bins - 1);
    cfg.prefixes = bins.data();
    cfg.m = m;
    cfg.with_logs = with_logs;
    cfg.count_all = count_all;
    cfg.contiguous = static_cast<uint64_t>(bins.back() - bins.front()) + 1 == static_cast<uint64_t>(m);
    cfg.lo = Bits(Bits(bins.front()) << cfg.prefix_shift);
    const Bits top_of_last_bin =
        Bits((Bits(bins.back()) << cfg.prefix_shift) | ((Bits(1) << cfg.prefix_shift) - 1));
    // With log sums every finite entry above the lowest bin is a candidate.
    cfg.hi = (with_logs || count_all) ? Policy::kMaxValidKey : top_of_last_bin;
    if (with_logs) {
      const Bits ref_key = cfg.lo == 0 ? Bits(1) : cfg.lo;
      cfg.log_ref = fast_log(Policy::value_of_key(ref_key));
    }
    if (Policy::kWidth - cfg.prefix_shift <= 16 && m > 1 && m < (1 << 15)) {
      // Only prefixes of candidates, [bins.front(), hi >> shift], need a class: a table of a
      // few KiB stays in L1 while the sub-histograms stream through L2.
      cfg.class_base = bins.front();
      cfg.class_of_prefix.resize(static_cast<size_t>((cfg.hi >> cfg.prefix_shift) - bins.front()) + 1);
      int j = 0;
      for (size_t i = 0; i < cfg.class_of_prefix.size(); ++i) {
        const size_t p = static_cast<size_t>(bins.front()) + i;
        while (j < m && bins[j] < p) ++j;
        cfg.class_of_prefix[i] =
            static_cast<uint16_t>(2 * j + (j < m && bins[j] == p ? 1 : 0));
      }
    }

    // Zeroed by all threads: with many ranks this is tens of MB (the largest serial step).
    const size_t sub_entries = static_cast<size_t>(m) * cfg.digit_bins;
    result.sub_total.resize(sub_entries);
    const int64_t zero_chunks = std::max<int64_t>(1, static_cast<int64_t>(sub_entries >> 20));
    parallel_blocks(zero_chunks, [&](int64_t c0, int64_t c1, int) {
      const size_t begin = sub_entries * c0 / zero_chunks, end = sub_entries * c1 / zero_chunks;
      std::fill(result.sub_total.begin() + begin, result.sub_total.begin() + end, 0);
    });
    std::vector<SelectSink> sinks(max_threads());
    for (auto& s : sinks) s.cfg = &cfg;
    run_pass(sinks, [&](SelectSink& s) { s.end_block(result.sub_total); });

    // Per-thread partial results, merged in thread order (deterministic).
    result.bucket_count.assign(m + 1, 0);
    std::vector<CompensatedSum> bucket_log(m + 1), bucket_log_sq(m + 1);
    for (auto& s : sinks) {
      if (s.keys.empty()) continue;  // thread not used
      result.zeros += s.zeros;
      result.infs += s.infs;
      result.nans += s.nans;
      for (int r = 0; r < kInterleave; ++r) {
        for (int b = 0; b <= m; ++b) {
          result.bucket_count[b] += s.bucket_count[static_cast<size_t>(r) * (m + 1) + b];
        }
      }
      if (!with_logs) continue;
      for (int r = 0; r < kInterleave; ++r) {
        for (int b = 0; b <= m; ++b) {
          bucket_log[b].add(s.sum_log[static_cast<size_t>(r) * (m + 1) + b]);
          bucket_log_sq[b].add(s.sum_log_sq[static_cast<size_t>(r) * (m + 1) + b]);
        }
      }
    }
    result.bucket_log.assign(m + 1, 0.0);
    result.bucket_log_sq.assign(m + 1, 0.0);
    for (int b = 0; b <= m; ++b) {
      result.bucket_log[b] = bucket_log[b].value();
      result.bucket_log_sq[b] = bucket_log_sq[b].value();
    }
  }

  struct KeyRun {
    Bits* keys;  // overwritten by the histogramming
    int64_t n;
  };

  // The last-digit histograms of the rank bins `bins` (ascending) from buffered keys, as
  // select_pass(1, bins, false, false) would compute them over the whole data: pass.sub_total
  // [m][digit_bins]. A counting sort by bin first, so that each bin's histogram (256 KiB) is
  // built in cache by one thread. The runs' keys are overwritten with their (row, digit) slots.
  void histogram_buffered_bins(const std::vector<Bits>& bins, const std::vector<KeyRun>& runs,
                               PassResult& pass) const {
    const int m = static_cast<int>(bins.size());
    SelectConfig& cfg = pass.cfg;
    cfg.prefix_shift = Policy::shift(0);
    cfg.digit_shift = Policy::shift(1);
    cfg.digit_bins = 1 << Policy::digit_width(1);
    cfg.digit_mask = Bits(cfg.digit_bins - 1);
    cfg.prefixes = bins.data();
    cfg.m = m;
    // row_of[prefix - bins.front()] = row + 1 for a rank bin, 0 otherwise.
    const Bits base = bins.front();
    std::vector<uint16_t> row_of(static_cast<size_t>(bins.back() - base) + 1, 0);
    for (int j = 0; j < m; ++j) row_of[bins[j] - base] = static_cast<uint16_t>(j + 1);
    const Bits first_key = Bits(base << cfg.prefix_shift);
    const Bits key_span = Bits(((Bits(bins.back()) + 1) << cfg.prefix_shift) - 1 - first_key);
    const int n_runs = static_cast<int>(runs.size());
    // Per run: the slots (row, digit) of its keys in rank bins, written over the keys (a slot
    // never overtakes the key it replaces), and their count per row.
    static_assert(sizeof(Bits) == sizeof(uint32_t), "slots are written over 32-bit keys");
    std::vector<int64_t> n_slots(n_runs, 0);
    std::vector<std::vector<int64_t>> per_row(n_runs, std::vector<int64_t>(m + 1, 0));
    const int digit_bits = Policy::digit_width(1);
    parallel_blocks(n_runs, [&](int64_t r0, int64_t r1, int) {
      for (int64_t r = r0; r < r1; ++r) {
        Bits* keys = runs[r].keys;
        uint32_t* out = keys;
        int64_t* count = per_row[r].data();
        int64_t w = 0;
        for (int64_t i = 0; i < runs[r].n; ++i) {
          const Bits key = keys[i];
          const bool in_span = Bits(key - first_key) <= key_span;
          const int row = in_span ? row_of[(key >> cfg.prefix_shift) - base] : 0;
          out[w] = (static_cast<uint32_t>(row) << digit_bits) | uint32_t(key & cfg.digit_mask);
          w += row != 0;
          ++count[row];
        }
        n_slots[r] = w;
      }
    });
    // Grouped by row (1-based in the slots), runs in order within a row.
    std::vector<int64_t> start(static_cast<size_t>(m + 1) * n_runs + 1, 0);
    int64_t total = 0;
    for (int j = 1; j <= m; ++j) {
      for (int r = 0; r < n_runs; ++r) {
        start[static_cast<size_t>(j) * n_runs + r] = total;
        total += per_row[r][j];
      }
    }
    std::vector<uint32_t>& grouped = thread_scratch<uint32_t, 5>();
    grouped.resize(static_cast<size_t>(total));
    parallel_blocks(n_runs, [&](int64_t r0, int64_t r1, int) {
      for (int64_t r = r0; r < r1; ++r) {
        std::vector<int64_t> next(m + 1);
        for (int j = 1; j <= m; ++j) next[j] = start[static_cast<size_t>(j) * n_runs + r];
        for (int64_t i = 0; i < n_slots[r]; ++i) {
          const uint32_t slot = runs[r].keys[i];
          grouped[next[slot >> digit_bits]++] = slot;
        }
      }
    });
    const size_t row_width = static_cast<size_t>(cfg.digit_bins);
    pass.sub_total.resize(static_cast<size_t>(m) * row_width);
    parallel_blocks(m, [&](int64_t j0, int64_t j1, int) {
      for (int64_t j = j0; j < j1; ++j) {
        uint64_t* row = pass.sub_total.data() + static_cast<size_t>(j) * row_width;
        std::fill(row, row + row_width, 0);
        const int64_t begin = start[static_cast<size_t>(j + 1) * n_runs];
        const int64_t end = j + 1 < m ? start[static_cast<size_t>(j + 2) * n_runs] : total;
        for (int64_t i = begin; i < end; ++i) ++row[grouped[i] & cfg.digit_mask];
      }
    });
  }

  // One refinement level: histogram the digit of `level` inside the current rank bins, then
  // move every rank one digit down. On the last level with log sums, also the tail sums.
  void refine(int level, bool with_logs, const std::vector<int64_t>& ranks,
              std::vector<Bits>& prefix, std::vector<int64_t>& residual,
              std::vector<RankResult>& out, double* log_ref) {
    std::vector<Bits> bins(prefix.begin(), prefix.end());
    std::sort(bins.begin(), bins.end());
    bins.erase(std::unique(bins.begin(), bins.end()), bins.end());
    PassResult pass;
    select_pass(level, bins, with_logs, /*count_all=*/false, pass);
    descend(level, bins, pass, ranks, prefix, residual, out, log_ref);
  }

  // After the pass of `level`: move each rank one digit down; on the last level, the results.
  // Sums of y = log x - log_ref over whole top-digit bins, as suffix sums: above[b - lo_bin]
  // is the sum over the bins strictly above bin b (from the counting pass of the sampled
  // two-pass path, which makes the bucket sums of the last pass unnecessary).
  struct TopBinSums {
    int64_t lo_bin = 0;
    double log_ref = 0.0;
    std::vector<double> above_log, above_log_sq;
  };

  void descend(int level, const std::vector<Bits>& bins, const PassResult& pass,
               const std::vector<int64_t>& ranks, std::vector<Bits>& prefix,
               std::vector<int64_t>& residual, std::vector<RankResult>& out, double* log_ref,
               const TopBinSums* top_sums = nullptr) {
    const int n_ranks = static_cast<int>(ranks.size());
    const int m = static_cast<int>(bins.size());
    const SelectConfig& cfg = pass.cfg;
    const std::vector<uint64_t>& sub_total = pass.sub_total;
    const std::vector<double>& bucket_log = pass.bucket_log;
    const std::vector<double>& bucket_log_sq = pass.bucket_log_sq;
    const bool with_logs = cfg.with_logs || top_sums != nullptr;
    const double ref = top_sums ? top_sums->log_ref : cfg.log_ref;
    // Move each rank one digit down.
    std::vector<int> bin_of_rank(n_ranks);
    std::vector<int> digit_of_rank(n_ranks);
    // Ranks walk their bins independently (up to 2^15 digits each): shared out over threads.
    parallel_blocks(n_ranks, [&](int64_t t0, int64_t t1, int) {
      for (int64_t t = t0; t < t1; ++t) {
        const int j = lower_bound_index(bins.data(), m, prefix[t]);
        const uint64_t* h = sub_total.data() + static_cast<size_t>(j) * cfg.digit_bins;
        int64_t above = 0;
        int d = cfg.digit_bins - 1;
        while (d > 0 && above + static_cast<int64_t>(h[d]) < residual[t]) {
          above += static_cast<int64_t>(h[d]);
          --d;
        }
        residual[t] -= above;
        prefix[t] = Bits((Bits(prefix[t]) << Policy::digit_width(level)) | Bits(d));
        bin_of_rank[t] = j;
        digit_of_rank[t] = d;
      }
    });
    if (level != kLevels - 1) return;

    for (int t = 0; t < n_ranks; ++t) {
      out[t].value = Policy::value_of_key(prefix[t]);
      out[t].n_above = ranks[t] - residual[t];
    }
    if (!with_logs) return;
    *log_ref = ref;

    // Sums above each rank: buckets above its bin, whole bins above its bin, and the digits
    // above its own inside its bin (exact values: the last digit completes the key).
    std::vector<double> full_log(m, 0.0), full_log_sq(m, 0.0);
    std::vector<std::vector<int>> ranks_in_bin(m);
    for (int t = 0; t < n_ranks; ++t) ranks_in_bin[bin_of_rank[t]].push_back(t);
    // Bins are independent (each rank belongs to one), so they are shared out over threads:
    // with 64 ks this walk over ~100 x 2^15 digits was the largest serial part of hill_plot.
    parallel_blocks(m, [&](int64_t j0, int64_t j1, int) {
      std::vector<int> digits;
      std::vector<double> values, logs;
      for (int64_t j = j0; j < j1; ++j) {
        auto& members = ranks_in_bin[j];
        std::sort(members.begin(), members.end(),
                  [&](int a, int b) { return digit_of_rank[a] > digit_of_rank[b]; });
        const uint64_t* h = sub_total.data() + static_cast<size_t>(j) * cfg.digit_bins;
        // Values of the nonempty digits (descending), their logs in one vectorised call. With
        // whole-bin sums from the counting pass only the digits above the lowest rank matter.
        if (top_sums && members.empty()) continue;
        const int lowest_digit = top_sums ? digit_of_rank[members.back()] : 0;
        digits.clear();
        values.clear();
        for (int d = cfg.digit_bins - 1; d >= lowest_digit; --d) {
          const Bits key = Bits((Bits(bins[j]) << cfg.prefix_shift) | Bits(d));
          if (h[d] == 0 || key == 0) continue;  // zeros are not in any tail sum
          digits.push_back(d);
          values.push_back(Policy::value_of_key(key));
        }
        logs.resize(values.size());
        simd::log_minus(values.data(), logs.data(), static_cast<int64_t>(values.size()), ref);
        CompensatedSum run_log, run_log_sq;
        size_t next = 0;
        for (size_t e = 0; e <= digits.size(); ++e) {
          const int d = e < digits.size() ? digits[e] : -1;
          while (next < members.size() && digit_of_rank[members[next]] >= d) {
            out[members[next]].sum_log = run_log.value();
            out[members[next]].sum_log_sq = run_log_sq.value();
            ++next;
          }
          if (e == digits.size()) break;
          const double c = static_cast<double>(h[d]);
          run_log.add(c * logs[e]);
          run_log_sq.add(c * logs[e] * logs[e]);
        }
        full_log[j] = run_log.value();
        full_log_sq[j] = run_log_sq.value();
      }
    });
    for (int t = 0; t < n_ranks; ++t) {
      const int j = bin_of_rank[t];
      CompensatedSum s1, s2;
      s1.add(out[t].sum_log);
      s2.add(out[t].sum_log_sq);
      if (top_sums) {
        const size_t b = static_cast<size_t>(bins[j]) - static_cast<size_t>(top_sums->lo_bin);
        s1.add(top_sums->above_log[b]);
        s2.add(top_sums->above_log_sq[b]);
        out[t].sum_log = s1.value();
        out[t].sum_log_sq = s2.value();
        out[t].log_value = fast_log(out[t].value) - ref;
        continue;
      }
      for (int b = j + 1; b <= m; ++b) {
        s1.add(bucket_log[b]);
        s2.add(bucket_log_sq[b]);
      }
      for (int i = j + 1; i < m; ++i) {
        s1.add(full_log[i]);
        s2.add(full_log_sq[i]);
      }
      out[t].sum_log = s1.value();
      out[t].sum_log_sq = s2.value();
      out[t].log_value = fast_log(out[t].value) - ref;
    }
  }

  // 16-bit formats: the pass-1 histogram holds every key exactly.
  void finish_single_level(const std::vector<int64_t>& ranks, const std::vector<Bits>& key,
                           const std::vector<int64_t>& residual, bool with_logs,
                           std::vector<RankResult>& out, double* log_ref) {
    const int n_ranks = static_cast<int>(ranks.size());
    Bits lowest = key[0];
    for (int t = 0; t < n_ranks; ++t) {
      out[t].value = Policy::value_of_key(key[t]);
      out[t].n_above = ranks[t] - residual[t];
      lowest = std::min(lowest, key[t]);
    }
    if (!with_logs) return;
    const double ref = fast_log(Policy::value_of_key(lowest));
    *log_ref = ref;
    std::vector<int> order(n_ranks);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int a, int b) { return key[a] > key[b]; });
    CompensatedSum run_log, run_log_sq;
    int next = 0;
    for (int64_t k = Policy::kMaxValidKey; k >= lowest; --k) {
      while (next < n_ranks && key[order[next]] == k) {
        out[order[next]].sum_log = run_log.value();
        out[order[next]].sum_log_sq = run_log_sq.value();
        out[order[next]].log_value = fast_log(out[order[next]].value) - ref;
        ++next;
      }
      const uint64_t c = top_hist_[k];
      if (c == 0 || k == 0) continue;
      const double y = fast_log(Policy::value_of_key(static_cast<Bits>(k))) - ref;
      run_log.add(static_cast<double>(c) * y);
      run_log_sq.add(static_cast<double>(c) * y * y);
    }
  }

  std::vector<StridedView> views_;
  std::vector<int64_t> offsets_;
  int64_t total_ = 0;
  std::vector<uint64_t> top_hist_;
  SampleCounts counts_;
  bool counted_ = false;
};

template <FloatFormat F>
std::unique_ptr<OrderStatsEngine> make_for_format(bool absolute, const StridedView* views,
                                                  int64_t n_views) {
  if (absolute) return std::make_unique<RadixEngine<KeyPolicy<F, true>>>(views, n_views);
  return std::make_unique<RadixEngine<KeyPolicy<F, false>>>(views, n_views);
}

}  // namespace

std::unique_ptr<OrderStatsEngine> make_order_stats_cpu(FloatFormat format, bool absolute,
                                                       const StridedView* views,
                                                       int64_t n_views) {
  switch (format) {
    case FloatFormat::kFloat16:
      return make_for_format<FloatFormat::kFloat16>(absolute, views, n_views);
    case FloatFormat::kBFloat16:
      return make_for_format<FloatFormat::kBFloat16>(absolute, views, n_views);
    case FloatFormat::kFloat32:
      return make_for_format<FloatFormat::kFloat32>(absolute, views, n_views);
    case FloatFormat::kFloat64:
      return make_for_format<FloatFormat::kFloat64>(absolute, views, n_views);
  }
  throw std::invalid_argument("unknown float format");
}

TailRow tail_row(int64_t k, const RankResult& rank_k, const RankResult& rank_k1, double log_ref) {
  // Entries tied with X(k+1) that fall inside the top k contribute log X(k+1) each.
  const double n_above = static_cast<double>(rank_k1.n_above);
  const double ties = static_cast<double>(k) - n_above;
  const double c = rank_k1.log_value;
  TailRow row;
  row.k = static_cast<double>(k);
  row.x_k1 = rank_k1.value;
  row.x_k = rank_k.value;
  row.h1 = rank_k1.sum_log - n_above * c;
  row.h2 = rank_k1.sum_log_sq - 2.0 * c * rank_k1.sum_log + n_above * c * c;
  const double kd = static_cast<double>(k);
  row.s1 = rank_k1.sum_log + ties * c + kd * log_ref;
  const double top = c + log_ref;
  row.s2 = rank_k1.sum_log_sq + 2.0 * log_ref * rank_k1.sum_log + n_above * log_ref * log_ref +
           ties * top * top;
  return row;
}

}  // namespace gradience::tail
