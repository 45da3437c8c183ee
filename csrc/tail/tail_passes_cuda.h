// Torch-free launchers of the CUDA passes of the radix descent over |x| keys (the GPU twin of
// the CPU engine's count() and level_pass(); see order_stats_kernels.h for their contract).
// All pointers are device pointers; every launch goes to `stream`.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

namespace gradience::tail::cuda {

// format: 0 float16, 1 bfloat16, 2 float32, 3 float64 (FloatFormat).
// data:     [n] contiguous floats of `format`
// hist:     [2^top_bits] uint64, accumulated (top digit of the |x| key)
// specials: [3] uint64, accumulated: keys == 0, == inf, > inf (NaN)
cudaError_t launch_top_histogram(const void* data, int64_t n, int format,
                                 unsigned long long* hist, unsigned long long* specials,
                                 cudaStream_t stream);

// Blocks the level pass runs with (its partial-sum rows), for a device with `sm_count` SMs.
int level_pass_blocks(int64_t n, int sm_count);

// data:    [n] contiguous floats of `format`
// bins:    [m] ascending prefixes of level - 1 (int64)
// sub:     [m][2^digit_width(level)] uint64, accumulated
// partial: [blocks][2][m + 1] float64, written: per block, the bucket sums of y and y^2 of the
//          entries lo_key <= key <= max valid outside the bins (y = log|x| - log_ref), reduced
//          in a fixed order (deterministic for a given device and block count)
cudaError_t launch_level_pass(const void* data, int64_t n, int format, int level,
                              const int64_t* bins, int m, unsigned long long* sub,
                              double* partial, int blocks, uint64_t lo_key, double log_ref,
                              bool with_logs, cudaStream_t stream);

}  // namespace gradience::tail::cuda
