// CUDA passes of the radix descent (see tail_passes_cuda.h). Histograms: global 64-bit atomics,
// warp-aggregated (equal bins in a warp add once), because the top digit has 2^16 bins (too
// many for a privatised shared-memory copy per block). Log sums: each warp reduces the values
// of one bucket with a fixed shuffle tree and adds the result to its own row, so every sum is
// taken in an order fixed by the chunk table and the grid: deterministic on a given device.
// Compiled on the CPU machines (nvcc 13); run only where a GPU is lent (bench/gpu_check.sh).
#include <cuda_fp16.h>

#include <cstdint>

#include "tail/tail_passes_cuda.h"

namespace gradience::tail::cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <class B, int kBitsN, unsigned long long kInfBits>
struct Format {
  using Bits = B;
  static constexpr int kBits = kBitsN;
  static constexpr Bits kSign = Bits(1ull << (kBitsN - 1));
  static constexpr Bits kInf = Bits(kInfBits);
};
struct F16 : Format<uint16_t, 16, 0x7c00> {
  __device__ static double to_double(Bits b) {
    return static_cast<double>(__half2float(__ushort_as_half(b)));
  }
};
struct BF16 : Format<uint16_t, 16, 0x7f80> {
  __device__ static double to_double(Bits b) { return __uint_as_float(uint32_t(b) << 16); }
};
struct F32 : Format<uint32_t, 32, 0x7f800000u> {
  __device__ static double to_double(Bits b) { return __uint_as_float(b); }
};
struct F64 : Format<unsigned long long, 64, 0x7ff0000000000000ull> {
  __device__ static double to_double(Bits b) {
    return __longlong_as_double(static_cast<long long>(b));
  }
};

// KeyPolicy (float_keys.h) on the device: |x| keys drop the sign bit; signed keys flip the
// negative values so that unsigned order is numeric order.
template <class F, bool kAbs>
struct Policy {
  using Bits = typename F::Bits;
  static constexpr int kWidth = kAbs ? F::kBits - 1 : F::kBits;
  static constexpr int kLevels = (kWidth + 15) / 16;
  __host__ __device__ static constexpr int shift(int level) {
    return level == kLevels - 1 ? 0 : kWidth - 16 * (level + 1);
  }
  __host__ __device__ static constexpr int digit_width(int level) {
    return level == kLevels - 1 ? kWidth - 16 * (kLevels - 1) : 16;
  }
  __device__ static Bits key(Bits b) {
    if (kAbs) return Bits(b & Bits(~F::kSign));
    return (b & F::kSign) ? Bits(~b) : Bits(b | F::kSign);
  }
  // Keys that take part in the ranking: |x| excludes inf and NaN; signed keys keep all.
  __device__ static bool valid(Bits k) { return kAbs ? k < F::kInf : true; }
};

// The chunk a block works on, read once per chunk.
struct Chunk {
  const void* data;
  int64_t n;
};

__device__ Chunk chunk_at(const ChunkTable& t, int64_t c) {
  const int64_t* row = t.chunks + 3 * c;
  const int64_t base = t.segment_data[row[0]];
  return {reinterpret_cast<const void*>(base), row[2]};
}

__device__ int64_t chunk_first(const ChunkTable& t, int64_t c) { return t.chunks[3 * c + 1]; }

template <class F, bool kAbs>
__global__ void top_histogram_kernel(ChunkTable table, unsigned long long* __restrict__ hist,
                                     unsigned long long* __restrict__ specials) {
  using P = Policy<F, kAbs>;
  using Bits = typename F::Bits;
  const int lane = threadIdx.x & 31;
  unsigned long long zeros = 0, infs = 0, nans = 0;
  for (int64_t c = blockIdx.x; c < table.n_chunks; c += gridDim.x) {
    const Chunk chunk = chunk_at(table, c);
    const Bits* data = static_cast<const Bits*>(chunk.data) + chunk_first(table, c);
    // base is uniform over the block, so every lane of a warp runs the same iterations and the
    // warp votes below see all 32 lanes.
    for (int64_t base = 0; base < chunk.n; base += blockDim.x) {
      const int64_t i = base + threadIdx.x;
      const bool in = i < chunk.n;
      const Bits bits = in ? data[i] : Bits(0);
      const Bits key = P::key(bits);
      const unsigned bin = in ? unsigned(key >> P::shift(0)) : 0xffffffffu;
      const unsigned peers = __match_any_sync(kFull, bin);
      if (in && lane == __ffs(peers) - 1) {
        atomicAdd(&hist[bin], static_cast<unsigned long long>(__popc(peers)));
      }
      const Bits magnitude = Bits(bits & Bits(~F::kSign));
      zeros += in && kAbs && magnitude == 0;
      infs += in && kAbs && magnitude == F::kInf;
      nans += in && magnitude > F::kInf;
    }
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    zeros += __shfl_down_sync(kFull, zeros, offset);
    infs += __shfl_down_sync(kFull, infs, offset);
    nans += __shfl_down_sync(kFull, nans, offset);
  }
  if (lane == 0) {
    if (zeros) atomicAdd(&specials[0], zeros);
    if (infs) atomicAdd(&specials[1], infs);
    if (nans) atomicAdd(&specials[2], nans);
  }
}

__device__ int lower_bound(const int64_t* bins, int m, int64_t prefix) {
  int first = 0, len = m;
  while (len > 0) {
    const int half = len >> 1;
    if (bins[first + half] < prefix) {
      first += half + 1;
      len -= half + 1;
    } else {
      len = half;
    }
  }
  return first;
}

// Adds, for every bucket held by some lane, the lanes' (y, y^2) of that bucket to the warp's row
// (lane 0 writes): one fixed xor tree per distinct bucket, buckets taken lowest lane first.
__device__ void warp_bucket_add(int bucket, double y, double* row_log, double* row_log_sq) {
  unsigned pending = __ballot_sync(kFull, bucket >= 0);
  while (pending) {
    const int b = __shfl_sync(kFull, bucket, __ffs(pending) - 1);
    double s1 = bucket == b ? y : 0.0;
    double s2 = s1 * s1;
    for (int offset = 16; offset > 0; offset >>= 1) {
      s1 += __shfl_xor_sync(kFull, s1, offset);
      s2 += __shfl_xor_sync(kFull, s2, offset);
    }
    if ((threadIdx.x & 31) == 0) {
      row_log[b] += s1;
      row_log_sq[b] += s2;
    }
    pending &= __ballot_sync(kFull, bucket != b);
  }
}

template <class F, bool kAbs>
__global__ void level_pass_kernel(ChunkTable table, const int64_t* __restrict__ bins, int m,
                                  unsigned long long* __restrict__ sub,
                                  double* __restrict__ partial, int prefix_shift,
                                  int digit_shift, unsigned long long digit_mask, int digit_bins,
                                  typename F::Bits lo_key, double log_ref, bool with_logs) {
  using P = Policy<F, kAbs>;
  using Bits = typename F::Bits;
  extern __shared__ int64_t s_bins[];  // [m]
  for (int j = threadIdx.x; j < m; j += blockDim.x) s_bins[j] = bins[j];
  __syncthreads();
  const int warp = threadIdx.x >> 5;
  double* row_log = partial + (int64_t(blockIdx.x) * kWarps + warp) * 2 * (m + 1);
  double* row_log_sq = row_log + (m + 1);
  for (int64_t c = blockIdx.x; c < table.n_chunks; c += gridDim.x) {
    const Chunk chunk = chunk_at(table, c);
    const Bits* data = static_cast<const Bits*>(chunk.data) + chunk_first(table, c);
    for (int64_t base = 0; base < chunk.n; base += blockDim.x) {  // uniform over the block
      const int64_t i = base + threadIdx.x;
      int bucket = -1;
      double y = 0.0;
      if (i < chunk.n) {
        const Bits key = P::key(data[i]);
        if (P::valid(key)) {
          const int64_t prefix = int64_t(key >> prefix_shift);
          const int j = lower_bound(s_bins, m, prefix);
          if (j < m && s_bins[j] == prefix) {
            atomicAdd(&sub[int64_t(j) * digit_bins + int64_t((key >> digit_shift) & digit_mask)],
                      1ull);
          } else if (kAbs && with_logs && key >= lo_key && key > 0) {
            bucket = j;
            y = log(F::to_double(key)) - log_ref;
          }
        }
      }
      if (kAbs && with_logs) warp_bucket_add(bucket, y, row_log, row_log_sq);
    }
  }
}

// sums[c] = sum over rows r (in order) of partial[r][c]: one thread per column.
__global__ void reduce_rows_kernel(const double* __restrict__ partial, int64_t rows, int cols,
                                   double* __restrict__ sums) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= cols) return;
  double s = 0.0;
  for (int64_t r = 0; r < rows; ++r) s += partial[r * cols + col];
  sums[col] = s;
}

template <class F, bool kAbs>
cudaError_t top_histogram(const ChunkTable& table, unsigned long long* hist,
                          unsigned long long* specials, int blocks, cudaStream_t stream) {
  if (table.n_chunks <= 0) return cudaSuccess;
  top_histogram_kernel<F, kAbs><<<blocks, kThreads, 0, stream>>>(table, hist, specials);
  return cudaGetLastError();
}

template <class F, bool kAbs>
cudaError_t level_pass(const ChunkTable& table, int level, const int64_t* bins, int m,
                       unsigned long long* sub, double* partial, double* sums, int blocks,
                       uint64_t lo_key, double log_ref, bool with_logs, cudaStream_t stream) {
  using P = Policy<F, kAbs>;
  if (level < 1 || level >= P::kLevels) return cudaErrorInvalidValue;
  const int digit_width = P::digit_width(level);
  const size_t shared = sizeof(int64_t) * size_t(m);
  if (shared > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        level_pass_kernel<F, kAbs>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared));
    if (err != cudaSuccess) return err;
  }
  if (table.n_chunks > 0) {
    level_pass_kernel<F, kAbs><<<blocks, kThreads, shared, stream>>>(
        table, bins, m, sub, partial, P::shift(level - 1), P::shift(level),
        (1ull << digit_width) - 1, 1 << digit_width, static_cast<typename F::Bits>(lo_key),
        log_ref, with_logs);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (!with_logs) return cudaSuccess;
  const int cols = 2 * (m + 1);
  reduce_rows_kernel<<<(cols + 255) / 256, 256, 0, stream>>>(
      partial, int64_t(blocks) * kWarps, cols, sums);
  return cudaGetLastError();
}

template <bool kAbs>
cudaError_t top_histogram_for(const ChunkTable& table, int format, unsigned long long* hist,
                              unsigned long long* specials, int blocks, cudaStream_t stream) {
  switch (format) {
    case 0: return top_histogram<F16, kAbs>(table, hist, specials, blocks, stream);
    case 1: return top_histogram<BF16, kAbs>(table, hist, specials, blocks, stream);
    case 2: return top_histogram<F32, kAbs>(table, hist, specials, blocks, stream);
    case 3: return top_histogram<F64, kAbs>(table, hist, specials, blocks, stream);
  }
  return cudaErrorInvalidValue;
}

template <bool kAbs>
cudaError_t level_pass_for(const ChunkTable& table, int format, int level, const int64_t* bins,
                           int m, unsigned long long* sub, double* partial, double* sums,
                           int blocks, uint64_t lo_key, double log_ref, bool with_logs,
                           cudaStream_t stream) {
  switch (format) {
    // 16-bit |x| keys have a single level; signed 16-bit keys too (16 bits): no level pass.
    case 2:
      return level_pass<F32, kAbs>(table, level, bins, m, sub, partial, sums, blocks, lo_key,
                                   log_ref, with_logs, stream);
    case 3:
      return level_pass<F64, kAbs>(table, level, bins, m, sub, partial, sums, blocks, lo_key,
                                   log_ref, with_logs, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_top_histogram(const ChunkTable& table, int format, bool absolute,
                                 unsigned long long* hist, unsigned long long* specials,
                                 int blocks, cudaStream_t stream) {
  return absolute ? top_histogram_for<true>(table, format, hist, specials, blocks, stream)
                  : top_histogram_for<false>(table, format, hist, specials, blocks, stream);
}

int pass_blocks(int64_t n_chunks, int sm_count) {
  const int64_t cap = int64_t(sm_count > 0 ? sm_count : 1) * 8;
  return static_cast<int>(n_chunks < 1 ? 1 : (n_chunks < cap ? n_chunks : cap));
}

int level_pass_warps() { return kWarps; }

cudaError_t launch_level_pass(const ChunkTable& table, int format, bool absolute, int level,
                              const int64_t* bins, int m, unsigned long long* sub,
                              double* partial, double* sums, int blocks, uint64_t lo_key,
                              double log_ref, bool with_logs, cudaStream_t stream) {
  if (absolute) {
    return level_pass_for<true>(table, format, level, bins, m, sub, partial, sums, blocks,
                                lo_key, log_ref, with_logs, stream);
  }
  if (with_logs) return cudaErrorInvalidValue;  // log sums need |x| keys
  return level_pass_for<false>(table, format, level, bins, m, sub, partial, sums, blocks, 0,
                               0.0, false, stream);
}

}  // namespace gradience::tail::cuda
