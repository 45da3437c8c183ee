// A torch-free description of one strided array: the glue fills it from a Tensor, the kernels
// walk it. Dimensions are stored innermost first (smallest stride first) because traversal order
// does not matter to order statistics and runs along the smallest stride read memory linearly.
#pragma once
#include <algorithm>
#include <cstdint>

namespace gradience {

inline constexpr int kMaxViewDims = 64;

struct StridedView {
  const void* data = nullptr;  // first element
  int64_t numel = 0;
  int ndim = 0;                     // 0 means a single element
  int64_t sizes[kMaxViewDims];      // [ndim], innermost first
  int64_t strides[kMaxViewDims];    // [ndim], in elements, innermost first, >= 0
};

// Calls run(ptr, count, stride) for maximal runs along the innermost dimension that cover the
// logical elements [begin, end) of `view` (logical order: innermost dimension fastest).
template <class Elem, class RunFn>
inline void for_each_run(const StridedView& view, int64_t begin, int64_t end, RunFn&& run) {
  const Elem* base = static_cast<const Elem*>(view.data);
  if (begin >= end) return;
  if (view.ndim <= 1) {
    const int64_t stride = view.ndim == 1 ? view.strides[0] : 1;
    run(base + begin * stride, end - begin, stride);
    return;
  }
  int64_t index[kMaxViewDims];
  int64_t offset = 0;
  int64_t rest = begin;
  for (int d = 0; d < view.ndim; ++d) {
    index[d] = rest % view.sizes[d];
    rest /= view.sizes[d];
    offset += index[d] * view.strides[d];
  }
  int64_t position = begin;
  while (position < end) {
    const int64_t count = std::min(view.sizes[0] - index[0], end - position);
    run(base + offset, count, view.strides[0]);
    position += count;
    index[0] += count;
    offset += count * view.strides[0];
    for (int d = 0; d + 1 < view.ndim && index[d] == view.sizes[d]; ++d) {
      offset -= view.sizes[d] * view.strides[d];
      index[d] = 0;
      ++index[d + 1];
      offset += view.strides[d + 1];
    }
  }
}

}  // namespace gradience
