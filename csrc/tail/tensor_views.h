// Glue helpers shared by the tail ops: argument checks that name the argument and the value,
// and the Tensor -> StridedView conversion (no copies, whatever the strides).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <vector>

#include "common/strided_view.h"
#include "tail/float_keys.h"

namespace gradience::tail {

// Checks every tensor of a sample (float dtype, one dtype, one device of `device_type`) and
// returns their common format. `arg` names the argument in messages.
FloatFormat check_sample(at::TensorList xs, const char* arg, c10::DeviceType device_type);

// The tensor as a view whose dimensions are sorted by stride and merged where contiguous, so
// that permuted and sliced tensors are read along their memory order.
StridedView strided_view_of(const at::Tensor& x);

std::vector<StridedView> strided_views_of(at::TensorList xs);

int64_t total_numel(at::TensorList xs);

// Digit layout of a format's keys (KeyPolicy in float_keys.h), for the pass ops' checks.
struct KeyLayout {
  int width, levels;
  int shift(int level) const { return level == levels - 1 ? 0 : width - 16 * (level + 1); }
  int digit_width(int level) const { return level == levels - 1 ? width - 16 * (levels - 1) : 16; }
};
KeyLayout key_layout(FloatFormat format, bool absolute);

// Checks of tail_level_pass's arguments (level in range, bins ascending prefixes of the level
// above, log sums only for |x|), naming argument and value.
void check_level_pass(const KeyLayout& layout, at::TensorList xs, bool absolute, int64_t level,
                      at::IntArrayRef bins, bool with_log_sums);

}  // namespace gradience::tail
