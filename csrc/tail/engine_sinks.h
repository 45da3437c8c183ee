// The per-thread sinks of the CPU engine's passes: each consumes runs of raw float bits
// (contiguous or strided) into thread-private histograms and sums, and flushes its counts into
// shared 64-bit totals at the end of each block. Hot contiguous cases go to simd_scan.h.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "tail/compensated_sum.h"
#include "tail/engine_support.h"
#include "tail/fast_log.h"
#include "tail/simd_scan.h"

namespace gradience::tail::engine {

// Pass 1 sink: top-digit histogram and the exact zero/inf/NaN counts.
template <class Policy>
struct CountSink {
  using Bits = typename Policy::Bits;
  using Traits = typename Policy::Traits;
  using L = EngineLayout<Policy>;
  // Several histogram copies (consecutive entries go to different copies) so that runs of
  // equal bins do not serialise on store-to-load forwarding; summed at the end of each block.
  static constexpr int kCopies = 4;
  uint32_t* hist = nullptr;  // [kCopies][L::kTopBins], this thread's scratch
  uint64_t zeros = 0, infs = 0, nans = 0;
  void init() {
    auto& store = thread_scratch<uint32_t, 0>();
    store.assign(kCopies * L::kTopBins, 0);
    hist = store.data();
  }
  void consume(const Bits* p, int64_t n, int64_t stride) {
    if constexpr (Policy::kFormat == FloatFormat::kFloat32 && Policy::kAbs) {
      if (stride == 1) {
        simd::count_f32_abs(p, n, hist, hist + L::kTopBins, zeros, infs);
        return;
      }
    }
    if constexpr (sizeof(Bits) == 2 && Policy::kAbs) {
      if (stride == 1) {
        uint32_t* h = hist;
        simd::count_u16_abs(p, n, h, h + L::kTopBins, h + 2 * L::kTopBins, h + 3 * L::kTopBins);
        return;
      }
    }
    if (stride == 1) {
      run(n, [p](int64_t i) { return p[i]; });
    } else {
      run(n, [p, stride](int64_t i) { return p[i * stride]; });
    }
  }
  template <class Load>
  inline void run(int64_t n, Load load) {
    uint32_t* ha = hist;
    uint32_t* hb = hist + L::kTopBins;
    uint64_t z = 0, f = 0, q = 0;
    auto one = [&](Bits raw, uint32_t* h) {
      const Bits key = Policy::key(raw);
      ++h[key >> L::kTopShift];
      if constexpr (Policy::kAbs && L::kLevels > 1) {
        // Bin 0 mixes zero with the smallest subnormals and the inf bin mixes inf with
        // NaNs, so these two keys are counted exactly here (n_eff is needed after pass 1).
        z += key == 0;
        f += key == Traits::kInf;
      }
      if constexpr (!Policy::kAbs) {
        q += Bits(raw & Bits(~Traits::kSign)) > Traits::kInf;
      }
    };
    int64_t i = 0;
    for (; i + 2 <= n; i += 2) {
      one(load(i), ha);
      one(load(i + 1), hb);
    }
    if (i < n) one(load(i), ha);
    zeros += z;
    infs += f;
    nans += q;
  }
  void end_block(std::vector<uint64_t>& total) {
    for (int b = 0; b < L::kTopBins; ++b) {
      uint64_t c = 0;
      for (int copy = 0; copy < kCopies; ++copy) {
        c += hist[copy * L::kTopBins + b];
        hist[copy * L::kTopBins + b] = 0;
      }
      if (c) atomic_add(total[b], c);
    }
  }
};

// Configuration of one selection pass over the bins `prefixes` (ascending, distinct) of the
// previous level.
template <class Policy>
struct SelectConfig {
  using Bits = typename Policy::Bits;
  using Traits = typename Policy::Traits;
  using L = EngineLayout<Policy>;
  Bits lo = 0, hi = 0;         // candidate keys: lo <= key <= hi
  int prefix_shift = 0;        // prefix = key >> prefix_shift
  int digit_shift = 0;         // digit = (key >> digit_shift) & digit_mask
  Bits digit_mask = 0;
  int digit_bins = 0;
  const Bits* prefixes = nullptr;
  int m = 0;
  bool with_logs = false;
  double log_ref = 0.0;
  // For prefixes of at most 16 bits: class_of_prefix[p - class_base] = 2 j + 1 if p is prefixes[j], else
  // 2 j with j the index of the first prefix above p (its bucket). Replaces a binary search
  // whose branches mispredict on every candidate when many ranks are asked for.
  std::vector<uint16_t> class_of_prefix;  // indexed by prefix - class_base
  Bits class_base = 0;
  bool contiguous = false;  // prefixes are consecutive integers
  bool count_all = false;   // also count zero/inf/NaN keys over every entry
};

template <class Policy>
struct SelectSink {
  using Bits = typename Policy::Bits;
  using Traits = typename Policy::Traits;
  using L = EngineLayout<Policy>;
  const SelectConfig<Policy>* cfg = nullptr;
  std::vector<Bits> keys;
  int n_keys = 0;
  uint32_t* sub = nullptr;       // [m][digit_bins], this thread's scratch
  size_t sub_size = 0;
  std::vector<double> values;    // [kBuffer] candidates above all matching bins
  std::vector<int> buckets;      // [kBuffer]
  std::vector<double> logs;      // [kBuffer]
  std::vector<CompensatedSum> sum_log;  // [kInterleave][m + 1]
  std::vector<CompensatedSum> sum_log_sq;
  // [kInterleave][m + 1] with cfg->count_all only (the sampled window path needs the counts):
  // runs of candidates in one bucket would otherwise chain every increment through memory.
  std::vector<uint64_t> bucket_count;
  uint64_t zeros = 0, infs = 0, nans = 0;
  // Sub-histogram slots of candidates inside the rank bins, applied bin by bin: with many
  // ranks the sub-histograms (128 KiB each for float32) outgrow L2, and applying increments
  // in arrival order missed cache on nearly every one (measured: 80% of the pass's time with
  // 64 ks; grouping by bin keeps each bin's histogram in L2 while it is updated).
  std::vector<Bits> window_keys;  // flush_bin_range_f32: candidates inside the window bins
  std::vector<uint32_t> hits, grouped;
  std::vector<uint32_t> group_start;
  int n_hits = 0;
  bool group_hits = false;

  void init() {
    keys.assign(kBuffer, 0);
    // The class-table path always queues its hits (branch-free); otherwise only when the
    // sub-histograms outgrow L2.
    group_hits = !cfg->class_of_prefix.empty() ||
                 static_cast<size_t>(cfg->m) * cfg->digit_bins * sizeof(uint32_t) > (256u << 10);
    if (group_hits) {
      hits.assign(kHitBuffer, 0);
      grouped.assign(kHitBuffer, 0);
      group_start.assign(cfg->m + 1, 0);
    }
    auto& store = thread_scratch<uint32_t, 1>();
    sub_size = static_cast<size_t>(cfg->m) * cfg->digit_bins;
    store.assign(sub_size, 0);
    sub = store.data();
    bucket_count.assign(static_cast<size_t>(kInterleave) * (cfg->m + 1), 0);
    if (cfg->with_logs) {
      values.assign(kBuffer, 0.0);
      buckets.assign(kBuffer, 0);
      logs.assign(kBuffer, 0.0);
      sum_log.assign(static_cast<size_t>(kInterleave) * (cfg->m + 1), CompensatedSum{});
      sum_log_sq.assign(sum_log.size(), CompensatedSum{});
    }
  }

  void consume(const Bits* p, int64_t n, int64_t stride) {
    if constexpr (Policy::kFormat == FloatFormat::kFloat32 && Policy::kAbs) {
      if (stride == 1) {
        select_contiguous_f32(p, n);
        return;
      }
    }
    if (stride == 1) {
      run(n, [p](int64_t i) { return p[i]; });
    } else {
      run(n, [p, stride](int64_t i) { return p[i * stride]; });
    }
  }

  void select_contiguous_f32(const Bits* p, int64_t n) {
    const Bits span = Bits(cfg->hi - cfg->lo);
    int64_t i = 0;
    while (i < n) {
      const int64_t take = std::min<int64_t>(n - i, kBuffer - 8 - n_keys);
      Bits* out = keys.data() + n_keys;
      n_keys += static_cast<int>(
          cfg->count_all
              ? simd::select_count_f32_abs(p + i, take, cfg->lo, span, out, zeros, infs, nans)
              : simd::select_f32_abs(p + i, take, cfg->lo, span, out));
      i += take;
      if (n_keys > kBuffer - kMinRoom) flush();
    }
  }

  template <class Load>
  inline void run(int64_t n, Load load) {
    const Bits lo = cfg->lo;
    const Bits span = Bits(cfg->hi - lo);
    Bits* buf = keys.data();
    int64_t i = 0;
    while (i < n) {
      const int64_t stop = i + std::min<int64_t>(n - i, kBuffer - n_keys);
      int count = n_keys;
      if (cfg->count_all) {
        uint64_t z = 0, f = 0, q = 0;
        for (; i < stop; ++i) {
          const Bits key = Policy::key(load(i));
          z += key == 0;
          f += key == Traits::kInf;
          q += key > Traits::kInf;
          buf[count] = key;
          count += Bits(key - lo) <= span;
        }
        zeros += z;
        infs += f;
        nans += q;
      } else {
        for (; i < stop; ++i) {
          const Bits key = Policy::key(load(i));
          buf[count] = key;
          count += Bits(key - lo) <= span;
        }
      }
      n_keys = count;
      if (n_keys > kBuffer - kMinRoom) flush();
    }
  }

  void flush() {
    const SelectConfig<Policy>& c = *cfg;
    if constexpr (Policy::kFormat == FloatFormat::kFloat32 && Policy::kAbs) {
      // Consecutive bins (a single hill): every other candidate is above them, so the tail
      // sums need no bucket scatter and vectorise whole.
      if (c.contiguous && c.with_logs) {
        flush_bin_range_f32();
        return;
      }
    }
    int n_values = 0;
    if (!c.class_of_prefix.empty()) {
      // Branch-free classification: with many ranks about a third of the candidates are hits,
      // so a branch on the class mispredicts often (hill_plot with 64 ks: ~10% faster without
      // it, one noisy run). Every candidate is written to the hit list and only the right
      // count advances.
      const uint16_t* __restrict classes = c.class_of_prefix.data();
      const Bits base = c.class_base;
      if (n_hits + n_keys > kHitBuffer) apply_hits();
      const int n = n_keys;
      const int prefix_shift = c.prefix_shift;
      const int digit_bits = __builtin_ctz(static_cast<unsigned>(c.digit_bins));
      const int digit_shift = c.digit_shift;
      const Bits digit_mask = c.digit_mask;
      const bool with_logs = c.with_logs;
      uint32_t* __restrict pending = hits.data();
      uint64_t* __restrict counts = bucket_count.data();
      const bool count_buckets = c.count_all;
      const int stride = c.m + 1;
      int n_pending = n_hits;
      for (int i = 0; i < n; ++i) {
        const Bits key = keys[i];
        const int cls = classes[(key >> prefix_shift) - base];
        const int hit = cls & 1;
        const int j = cls >> 1;
        pending[n_pending] = (static_cast<uint32_t>(j) << digit_bits) +
                             static_cast<uint32_t>((key >> digit_shift) & digit_mask);
        n_pending += hit;
        if (count_buckets) counts[(i & (kInterleave - 1)) * stride + j] += static_cast<uint64_t>(1 - hit);
        if (with_logs) {
          values[n_values] = Policy::value_of_key(key);
          buckets[n_values] = j;
          n_values += 1 - hit;
        }
      }
      n_hits = n_pending;
    } else {
      for (int i = 0; i < n_keys; ++i) {
        const Bits key = keys[i];
        const Bits p = Bits(key >> c.prefix_shift);
        const int j = c.m == 1 ? (p > c.prefixes[0] ? 1 : 0)
                               : lower_bound_index(c.prefixes, c.m, p);
        if (j < c.m && c.prefixes[j] == p) {
          ++sub[static_cast<size_t>(j) * c.digit_bins +
                ((key >> c.digit_shift) & c.digit_mask)];
        } else {
          ++bucket_count[static_cast<size_t>(i & (kInterleave - 1)) * (c.m + 1) + j];
          if (c.with_logs) {
            values[n_values] = Policy::value_of_key(key);
            buckets[n_values] = j;
            ++n_values;
          }
        }
      }
    }
    n_keys = 0;
    if (n_values == 0) return;
    const double ref = c.log_ref;
    double* y = logs.data();
    const double* x = values.data();
    simd::log_minus(x, y, n_values, ref);
    const int stride = c.m + 1;
    for (int i = 0; i < n_values; ++i) {
      const size_t slot = static_cast<size_t>(i & (kInterleave - 1)) * stride + buckets[i];
      sum_log[slot].add_nonnegative(y[i]);
      sum_log_sq[slot].add_nonnegative(y[i] * y[i]);
    }
  }

  void flush_bin_range_f32() {
    const SelectConfig<Policy>& c = *cfg;
    const Bits first = c.prefixes[0];
    const Bits last = c.prefixes[c.m - 1];
    // Locals, so that the increments through `sub` cannot alias the loop's bounds and
    // parameters (otherwise reloaded from memory after every increment).
    const int n = n_keys;
    const int prefix_shift = c.prefix_shift;
    const int digit_bits = Policy::digit_width(L::kLevels - 1);
    const Bits digit_mask = c.digit_mask;
    // The keys inside the window bins (a few percent of the candidates) are left-packed by the
    // vector selection rather than found by a branch per candidate.
    const Bits window_lo = Bits(first << prefix_shift);
    const Bits window_hi = Bits((last << prefix_shift) | ((Bits(1) << prefix_shift) - 1));
    if (window_keys.size() < keys.size() + 8) window_keys.resize(keys.size() + 8);
    const int in_window = static_cast<int>(simd::select_f32_abs(
        keys.data(), n, window_lo, Bits(window_hi - window_lo), window_keys.data()));
    const Bits* __restrict key_ptr = window_keys.data();
    uint32_t* __restrict hist = sub;
    if (group_hits) {
      if (n_hits + in_window > kHitBuffer) apply_hits();
      uint32_t* __restrict pending = hits.data();
      for (int i = 0; i < in_window; ++i) {
        const Bits key = key_ptr[i];
        pending[n_hits + i] = (static_cast<uint32_t>((key >> prefix_shift) - first) << digit_bits) +
                              (key & digit_mask);
      }
      n_hits += in_window;
    } else {
      for (int i = 0; i < in_window; ++i) {
        const Bits key = key_ptr[i];
        ++hist[(static_cast<size_t>((key >> prefix_shift) - first) << digit_bits) +
               (key & digit_mask)];
      }
    }
    const uint64_t above = static_cast<uint64_t>(n - in_window);
    bucket_count[c.m] += above;  // interleave copy 0
    // Bucket m (above the last bin) of interleave lanes 0..3.
    CompensatedSum lanes[kInterleave], lanes_sq[kInterleave];
    const size_t stride = static_cast<size_t>(c.m) + 1;
    for (int r = 0; r < kInterleave; ++r) {
      lanes[r] = sum_log[r * stride + c.m];
      lanes_sq[r] = sum_log_sq[r * stride + c.m];
    }
    simd::sum_log_f32_above(keys.data(), n_keys, last, c.prefix_shift, c.log_ref, lanes,
                            lanes_sq);
    for (int r = 0; r < kInterleave; ++r) {
      sum_log[r * stride + c.m] = lanes[r];
      sum_log_sq[r * stride + c.m] = lanes_sq[r];
    }
    n_keys = 0;
  }

  // Counting sort of the pending slots by bin, then the increments bin after bin.
  void apply_hits() {
    const int m = cfg->m;
    const int shift = __builtin_ctz(static_cast<unsigned>(cfg->digit_bins));  // a power of 2
    auto bin_of = [shift](uint32_t slot) { return slot >> shift; };
    std::fill(group_start.begin(), group_start.end(), 0);
    for (int i = 0; i < n_hits; ++i) ++group_start[bin_of(hits[i]) + 1];
    for (int j = 0; j < m; ++j) group_start[j + 1] += group_start[j];
    for (int i = 0; i < n_hits; ++i) grouped[group_start[bin_of(hits[i])]++] = hits[i];
    for (int i = 0; i < n_hits; ++i) ++sub[grouped[i]];
    n_hits = 0;
  }

  void end_block(std::vector<uint64_t>& total) {
    flush();
    if (group_hits) apply_hits();
    flush_counts(sub, sub_size, total.data());
  }
};

template <class Policy>
struct TopTailConfig {
  using Bits = typename Policy::Bits;
  using Traits = typename Policy::Traits;
  using L = EngineLayout<Policy>;
  int64_t lo_bin = 0, n_bins = 0;
  Bits lo_key = 0;
  bool with_logs = false;
  double log_ref = 0.0;
  // Optional key buffer of the bins the sample places ranks in: in_window[bin - lo_bin] is 1
  // for those bins, and each thread keeps at most window_cap of their keys (else it stops and
  // reports an overflow). Null: no buffering.
  const uint8_t* in_window = nullptr;
  int64_t window_cap = 0;
};

// Pass-1 sink of the sampled two-pass path: top-digit histogram and per-bin log sums of the
// keys from lo_key up, zero/inf/NaN counts of all.
template <class Policy>
struct TopTailSink {
  using Bits = typename Policy::Bits;
  using Traits = typename Policy::Traits;
  using L = EngineLayout<Policy>;
  const TopTailConfig<Policy>* cfg = nullptr;
  uint32_t* hist = nullptr;  // [L::kTopBins], this thread's scratch
  std::vector<Bits> keys;
  int n_keys = 0;
  std::vector<double> values, logs;
  std::vector<int32_t> bin_of_value;
  std::vector<CompensatedSum> bin_log, bin_log_sq;  // [n_bins]
  uint64_t zeros = 0, infs = 0, nans = 0;
  Bits* window = nullptr;  // [cfg->window_cap]: keys of the window bins (thread_window_buffer)
  int64_t n_window = 0;
  bool window_overflow = false;

  void init() {
    auto& store = thread_scratch<uint32_t, 4>();
    store.assign(L::kTopBins, 0);
    hist = store.data();
    keys.assign(kBuffer + 8, 0);
    values.assign(kBuffer + 8, 0.0);
    logs.assign(kBuffer + 8, 0.0);
    bin_of_value.assign(kBuffer + 8, 0);
    if (cfg->with_logs) {
      bin_log.assign(cfg->n_bins, CompensatedSum{});
      bin_log_sq.assign(cfg->n_bins, CompensatedSum{});
    }
    if (cfg->in_window != nullptr) window = thread_window_buffer<Bits>(cfg->window_cap);
  }
  void consume(const Bits* p, int64_t n, int64_t stride) {
    const Bits lo = cfg->lo_key;
    const Bits span = Bits(Policy::kMaxValidKey - lo);
    if constexpr (Policy::kFormat == FloatFormat::kFloat32) {
      if (stride == 1) {
        for (int64_t i = 0; i < n;) {
          const int64_t take = std::min<int64_t>(n - i, kBuffer - n_keys);
          n_keys += static_cast<int>(simd::select_count_f32_abs(
              p + i, take, lo, span, keys.data() + n_keys, zeros, infs, nans));
          i += take;
          if (n_keys > kBuffer - kMinRoom) flush();
        }
        return;
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      const Bits key = Policy::key(p[i * stride]);
      zeros += key == 0;
      infs += key == Traits::kInf;
      nans += key > Traits::kInf;
      keys[n_keys] = key;
      n_keys += Bits(key - lo) <= span;
      if (n_keys == kBuffer) flush();
    }
  }
  void flush() {
    const int n = n_keys;
    const int64_t lo_bin = cfg->lo_bin;
    if (window != nullptr && n_window + n > cfg->window_cap) {
      window_overflow = true;  // the caller resolves the ranks by a second pass instead
      window = nullptr;
    }
    if (window != nullptr) {
      classify<true>(n, lo_bin);
    } else {
      classify<false>(n, lo_bin);
    }
    n_keys = 0;
    if (!cfg->with_logs) return;
    simd::log_minus(values.data(), logs.data(), n, cfg->log_ref);
    for (int i = 0; i < n; ++i) {
      bin_log[bin_of_value[i]].add_nonnegative(logs[i]);
      bin_log_sq[bin_of_value[i]].add_nonnegative(logs[i] * logs[i]);
    }
  }
  // Histogram, bin and value of each buffered key; with kWindow, also append the keys of the
  // window bins: every key is written and the position advances only inside them (branch-free:
  // about a third of the candidates are in them).
  template <bool kWindow>
  void classify(int n, int64_t lo_bin) {
    const uint8_t* __restrict in_window = cfg->in_window;
    Bits* __restrict out = window;
    int64_t w = n_window;
    for (int i = 0; i < n; ++i) {
      const Bits key = keys[i];
      const int64_t bin = static_cast<int64_t>(key >> L::kTopShift);
      ++hist[bin];
      bin_of_value[i] = static_cast<int32_t>(bin - lo_bin);
      values[i] = Policy::value_of_key(key);
      if constexpr (kWindow) {
        out[w] = key;
        w += in_window[bin - lo_bin];
      }
    }
    if constexpr (kWindow) n_window = w;
  }

  void end_block(std::vector<uint64_t>& total) {
    flush();
    flush_counts(hist, L::kTopBins, total.data());
  }
};

// Pass sink of the single-level sampled path.
template <class Policy>
struct TailCountSink {
  using Bits = typename Policy::Bits;
  using Traits = typename Policy::Traits;
  using L = EngineLayout<Policy>;
  Bits lo = 0;
  uint32_t* hist = nullptr;  // [2][L::kTopBins], this thread's scratch
  std::vector<uint32_t> keys;
  uint64_t zeros = 0, infs = 0, nans = 0;
  void init() {
    auto& store = thread_scratch<uint32_t, 3>();
    store.assign(2 * L::kTopBins, 0);
    hist = store.data();
    keys.assign(kBuffer + 16, 0);
  }
  void consume(const Bits* p, int64_t n, int64_t stride) {
    if constexpr (sizeof(Bits) == 2) {
      if (stride == 1) {
        for (int64_t i = 0; i < n; i += kBuffer) {
          const int64_t take = std::min<int64_t>(n - i, kBuffer);
          const int64_t c = simd::select_count_u16_abs(p + i, take, lo, Traits::kInf,
                                                       keys.data(), zeros, infs, nans);
          add_keys(c);
        }
        return;
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      const Bits key = Policy::key(p[i * stride]);
      zeros += key == 0;
      infs += key == Traits::kInf;
      nans += key > Traits::kInf;
      if (key >= lo && key < Traits::kInf) ++hist[key];
    }
  }
  void add_keys(int64_t c) {
    const uint32_t* k = keys.data();
    int64_t j = 0;
    for (; j + 2 <= c; j += 2) {
      ++hist[k[j]];
      ++hist[L::kTopBins + k[j + 1]];
    }
    if (j < c) ++hist[k[j]];
  }
  void end_block(std::vector<uint64_t>& total) {
    for (int b = 0; b < L::kTopBins; ++b) {
      const uint64_t c = uint64_t{hist[b]} + hist[L::kTopBins + b];
      hist[b] = hist[L::kTopBins + b] = 0;
      if (c) atomic_add(total[b], c);
    }
  }
};

}  // namespace gradience::tail::engine
