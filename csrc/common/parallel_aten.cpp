#include "common/parallel.h"

#include <ATen/Parallel.h>

namespace gradience {

int max_threads() { return at::get_num_threads(); }

void parallel_blocks(int64_t n_blocks,
                     const std::function<void(int64_t, int64_t, int)>& body) {
  if (n_blocks <= 0) return;
  if (n_blocks == 1) {
    body(0, 1, 0);
    return;
  }
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    // Inside a nested parallel region ATen runs the body inline on the caller's thread, whose
    // id is still below get_num_threads().
    body(begin, end, at::get_thread_num());
  });
}

}  // namespace gradience
