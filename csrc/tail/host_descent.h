// The radix descent walked on the host over the histograms of another engine's passes.
//
// The CUDA engine computes its passes on the device (tail_passes_cuda.cu) and brings each
// pass's histograms back to walk them here; the CPU engine has the same passes (count(),
// top_histogram(), level_pass()), so tests run this walk over the CPU passes on machines without
// a GPU and hold it to the same references as the fused CPU engine (GRADIENCE_HOST_DESCENT=1).
#pragma once
#include <memory>

#include "tail/order_stats_kernels.h"

namespace gradience::tail {

// An engine whose resolve() walks the passes of `passes` (count(), top_histogram(),
// level_pass(); its resolve methods are never called). Keys follow KeyPolicy<format, absolute>.
std::unique_ptr<OrderStatsEngine> make_host_descent(std::unique_ptr<OrderStatsEngine> passes,
                                                    FloatFormat format, bool absolute);

// The value of a key of KeyPolicy<format, absolute> (the CUDA passes' log reference).
double key_value(FloatFormat format, bool absolute, uint64_t key);

// True when GRADIENCE_HOST_DESCENT=1: the CPU tail ops then resolve ranks through
// make_host_descent over the CPU passes (read once per call; for tests).
bool host_descent_requested();

}  // namespace gradience::tail
