// Shared pieces of the CPU order-statistics engine: block and buffer sizes, per-thread scratch
// buffers, and the digit layout of a key policy. Included by the engine and its sinks only.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "tail/float_keys.h"

namespace gradience::tail::engine {

// Blocks of at most 2^30 entries keep the per-thread 32-bit counters from overflowing; they
// are flushed into 64-bit totals after each block. Below 2^16 entries one thread does the work.
constexpr int64_t kMaxBlock = int64_t{1} << 30;
constexpr int64_t kMinBlock = int64_t{1} << 16;
constexpr int kBuffer = 2048;      // candidate keys buffered before classification
constexpr int kMinRoom = 256;      // flush when fewer free slots remain
constexpr int kInterleave = 4;     // independent accumulators per bucket: hides FP add latency
constexpr int kHitBuffer = 1 << 16;  // pending sub-histogram increments per thread

// Per-thread buffers reused across calls: histograms are zeroed rather than allocated afresh, so
// a call does not pay page faults on megabytes of new memory (measured: ~12% of a 64-rank
// hill_plot). They keep their size between calls, bounded by the bins of the largest call.
template <class T, int kTag>
inline std::vector<T>& thread_scratch() {
  static thread_local std::vector<T> buffer;
  return buffer;
}

// A per-thread buffer of at least `capacity` keys, kept between calls like thread_scratch but
// never value-initialised: only the pages a call writes become resident (fresh pages cost a
// page fault each, measured at ~8 ms for the 16 MiB of a 1e8-entry Hill plot in this VM).
template <class T>
inline T* thread_window_buffer(int64_t capacity) {
  static thread_local std::unique_ptr<T[]> buffer;
  static thread_local int64_t size = 0;
  if (size < capacity) {
    buffer.reset(new T[static_cast<size_t>(capacity)]);
    size = capacity;
  }
  return buffer.get();
}

inline void atomic_add(uint64_t& target, uint64_t value) {
  std::atomic_ref<uint64_t>(target).fetch_add(value, std::memory_order_relaxed);
}

// Adds the nonzero per-thread counts of a finished block to the shared 64-bit totals and zeroes
// them for the next block.
inline void flush_counts(uint32_t* counts, size_t n, uint64_t* totals) {
  for (size_t b = 0; b < n; ++b) {
    if (counts[b]) {
      atomic_add(totals[b], counts[b]);
      counts[b] = 0;
    }
  }
}

// Index of the first prefix >= p in ascending `prefixes` (m of them).
template <class Bits>
inline int lower_bound_index(const Bits* prefixes, int m, Bits p) {
  int first = 0;
  int len = m;
  while (len > 0) {
    const int half = len >> 1;
    if (prefixes[first + half] < p) {
      first += half + 1;
      len -= half + 1;
    } else {
      len = half;
    }
  }
  return first;
}

// Digit layout of a key policy's top level (see KeyPolicy in float_keys.h).
template <class Policy>
struct EngineLayout {
  static constexpr int kLevels = Policy::kLevels;
  static constexpr int kTopShift = Policy::shift(0);
  static constexpr int kTopBins = 1 << Policy::digit_width(0);
};

}  // namespace gradience::tail::engine
