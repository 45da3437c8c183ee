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

}  // namespace gradience::tail
