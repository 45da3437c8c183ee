// The one threading entry point of the CPU kernels. It keeps kernel files free of torch types
// while running on ATen's intra-op thread pool (the pool torch.set_num_threads controls).
#pragma once
#include <cstdint>
#include <functional>

namespace gradience {

// Number of worker threads a parallel_blocks call may use; thread ids passed to the body are
// in [0, max_threads()).
int max_threads();

// Splits blocks [0, n_blocks) into contiguous ranges, one per thread, and calls
// body(first_block, end_block, thread_id) once per range. The split depends only on n_blocks and
// the thread count, so per-thread partial sums merged in thread order are deterministic.
void parallel_blocks(int64_t n_blocks,
                     const std::function<void(int64_t, int64_t, int)>& body);

}  // namespace gradience
