// Torch-free launchers of the CUDA passes of the radix descent (the GPU twin of the CPU engine's
// count() and level_pass(); see order_stats_kernels.h for their contract). Keys are |x| keys
// (absolute) or order-preserving signed keys, as KeyPolicy in float_keys.h defines them.
// All pointers are device pointers; every launch goes to `stream`.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

namespace gradience::tail::cuda {

// The tensors of one sample, read in one launch per pass without concatenating them: each
// tensor is cut into chunks of consecutive entries and the blocks of a launch take chunks in a
// fixed order (so results are deterministic for a given chunk table and grid).
struct ChunkTable {
  const int64_t* segment_data;  // [n_segments] device addresses of the tensors' first entries
  const int64_t* chunks;        // [n_chunks][3]: (segment, first entry, entries)
  int64_t n_chunks;
};

// format: 0 float16, 1 bfloat16, 2 float32, 3 float64 (FloatFormat).
// hist:     [2^digit_width(0)] uint64, accumulated (top digit of the key)
// specials: [3] uint64, accumulated: |x| keys == 0, == inf, NaN (signed keys: NaN only)
cudaError_t launch_top_histogram(const ChunkTable& table, int format, bool absolute,
                                 unsigned long long* hist, unsigned long long* specials,
                                 int blocks, cudaStream_t stream);

// Blocks a pass runs with over `n_chunks` chunks on a device with `sm_count` SMs.
int pass_blocks(int64_t n_chunks, int sm_count);
// Warps per block of the level pass (rows of its partial sums per block).
int level_pass_warps();

// bins:    [m] ascending prefixes of level - 1 (int64)
// sub:     [m][2^digit_width(level)] uint64, accumulated
// partial: [blocks * level_pass_warps()][2][m + 1] float64, zeroed by the caller: per warp, the
//          bucket sums of y and y^2 over the entries lo_key <= key <= max valid key that lie in
//          no bin (y = log|x| - log_ref; |x| keys only), each warp adding in a fixed order
// sums:    [2][m + 1] float64, written: the rows of partial added in row order
cudaError_t launch_level_pass(const ChunkTable& table, int format, bool absolute, int level,
                              const int64_t* bins, int m, unsigned long long* sub,
                              double* partial, double* sums, int blocks, uint64_t lo_key,
                              double log_ref, bool with_logs, cudaStream_t stream);

}  // namespace gradience::tail::cuda
