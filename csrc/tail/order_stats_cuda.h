// The CUDA order-statistics engine: passes on the device (tail_passes_cuda.cu, one launch per
// pass over every tensor of the sample), walked on the host (host_descent.h). Glue-level: it
// allocates device buffers with ATen and runs on the current stream of the tensors' device.
#pragma once
#ifdef GRADIENCE_WITH_CUDA
#include <ATen/core/Tensor.h>

#include <memory>

#include "tail/order_stats_kernels.h"

namespace gradience::tail {

// xs: CUDA tensors of one format on one device (checked by the caller). Non-contiguous tensors
// are read through one contiguous copy each.
std::unique_ptr<OrderStatsEngine> make_order_stats_cuda(at::TensorList xs, FloatFormat format,
                                                        bool absolute);

}  // namespace gradience::tail
#endif  // GRADIENCE_WITH_CUDA
