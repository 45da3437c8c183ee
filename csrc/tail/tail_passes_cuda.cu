// CUDA passes of the radix descent over |x| keys (see tail_passes_cuda.h). First version:
// global 64-bit atomics for the histograms, warp-aggregated for the top digit (equal bins in a
// warp add once); log sums reduced per block in a fixed order (deterministic for a given device
// and block count). Not yet measured on a GPU (issue 4).
#include <climits>
#include <cstdint>

#include "tail/tail_passes_cuda.h"

namespace gradience::tail::cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kThreads = 256;
constexpr int kItems = 8;  // entries per thread per tile of the level pass

template <class B, int kWidthBits, unsigned long long kInfKey>
struct FormatBase {
  using Bits = B;
  static constexpr int kWidth = kWidthBits;
  static constexpr Bits kKeyMask = Bits((1ull << kWidthBits) - 1);
  static constexpr Bits kInf = Bits(kInfKey);
  static constexpr int kLevels = (kWidthBits + 15) / 16;
  __host__ __device__ static constexpr int shift(int level) {
    return level == kLevels - 1 ? 0 : kWidth - 16 * (level + 1);
  }
};

// 16-bit formats have a single level (the top histogram is every key): no values needed.
struct F16 : FormatBase<uint16_t, 15, 0x7c00> {};
struct BF16 : FormatBase<uint16_t, 15, 0x7f80> {};
struct F32 : FormatBase<uint32_t, 31, 0x7f800000u> {
  __device__ static double value(Bits k) { return __uint_as_float(k); }
};
struct F64 : FormatBase<unsigned long long, 63, 0x7ff0000000000000ull> {
  __device__ static double value(Bits k) { return __longlong_as_double(static_cast<long long>(k)); }
};

template <class F>
__global__ void top_histogram_kernel(const typename F::Bits* __restrict__ data, int64_t n,
                                     unsigned long long* __restrict__ hist,
                                     unsigned long long* __restrict__ specials) {
  using Bits = typename F::Bits;
  const int lane = threadIdx.x & 31;
  unsigned long long zeros = 0, infs = 0, nans = 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  // Every lane of a warp runs the same iterations (base is uniform), so the warp votes below
  // see all 32 lanes.
  for (int64_t base = int64_t(blockIdx.x) * blockDim.x; base < n; base += stride) {
    const int64_t i = base + threadIdx.x;
    const bool valid = i < n;
    const Bits key = valid ? Bits(data[i] & F::kKeyMask) : Bits(0);
    const unsigned bin = valid ? unsigned(key >> F::shift(0)) : 0xffffffffu;
    const unsigned peers = __match_any_sync(kFull, bin);
    if (valid && lane == __ffs(peers) - 1) {
      atomicAdd(&hist[bin], static_cast<unsigned long long>(__popc(peers)));
    }
    zeros += valid && key == 0;
    infs += valid && key == F::kInf;
    nans += valid && key > F::kInf;
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

// Sum of a and b over the block, in a fixed order; thread 0 gets the totals.
__device__ void block_sum2(double& a, double& b, double* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int offset = 16; offset > 0; offset >>= 1) {
    a += __shfl_down_sync(kFull, a, offset);
    b += __shfl_down_sync(kFull, b, offset);
  }
  if (lane == 0) {
    scratch[warp] = a;
    scratch[warps + warp] = b;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    a = 0;
    b = 0;
    for (int w = 0; w < warps; ++w) {
      a += scratch[w];
      b += scratch[warps + w];
    }
  }
  __syncthreads();
}

template <class F>
__global__ void level_pass_kernel(const typename F::Bits* __restrict__ data, int64_t n,
                                  const int64_t* __restrict__ bins, int m,
                                  unsigned long long* __restrict__ sub,
                                  double* __restrict__ partial, int prefix_shift,
                                  int digit_shift, unsigned long long digit_mask, int digit_bins,
                                  typename F::Bits lo_key, double log_ref, bool with_logs) {
  using Bits = typename F::Bits;
  extern __shared__ double shared[];
  double* block_sums = shared;                      // [2][m + 1]
  double* scratch = block_sums + 2 * (m + 1);        // [2][warps]
  int64_t* s_bins = reinterpret_cast<int64_t*>(scratch + 2 * (blockDim.x >> 5));  // [m]
  __shared__ int bucket_lo, bucket_hi;
  for (int j = threadIdx.x; j < m; j += blockDim.x) s_bins[j] = bins[j];
  for (int j = threadIdx.x; j < 2 * (m + 1); j += blockDim.x) block_sums[j] = 0;
  __syncthreads();
  const int64_t tile = int64_t(blockDim.x) * kItems;
  for (int64_t base = int64_t(blockIdx.x) * tile; base < n; base += int64_t(gridDim.x) * tile) {
    int bucket[kItems];
    double y[kItems];
    int lo = INT_MAX, hi = -1;
#pragma unroll
    for (int it = 0; it < kItems; ++it) {
      bucket[it] = -1;
      y[it] = 0;
      const int64_t i = base + int64_t(it) * blockDim.x + threadIdx.x;
      if (i >= n) continue;
      const Bits key = Bits(data[i] & F::kKeyMask);
      if (key >= F::kInf) continue;  // inf and NaN are in no rank and no sum
      const int64_t prefix = int64_t(key >> prefix_shift);
      const int j = lower_bound(s_bins, m, prefix);
      if (j < m && s_bins[j] == prefix) {
        atomicAdd(&sub[int64_t(j) * digit_bins + int64_t((key >> digit_shift) & digit_mask)],
                  1ull);
      } else if (with_logs && key >= lo_key && key > 0) {
        bucket[it] = j;
        y[it] = log(F::value(key)) - log_ref;
        lo = min(lo, j);
        hi = max(hi, j);
      }
    }
    if (!with_logs) continue;
    if (threadIdx.x == 0) {
      bucket_lo = INT_MAX;
      bucket_hi = -1;
    }
    __syncthreads();
    if (hi >= 0) {
      atomicMin(&bucket_lo, lo);
      atomicMax(&bucket_hi, hi);
    }
    __syncthreads();
    const int b0 = bucket_lo, b1 = bucket_hi;
    for (int b = b0; b <= b1; ++b) {
      double s1 = 0, s2 = 0;
#pragma unroll
      for (int it = 0; it < kItems; ++it) {
        if (bucket[it] == b) {
          s1 += y[it];
          s2 += y[it] * y[it];
        }
      }
      block_sum2(s1, s2, scratch);
      if (threadIdx.x == 0) {
        block_sums[b] += s1;
        block_sums[m + 1 + b] += s2;
      }
    }
    __syncthreads();
  }
  __syncthreads();
  double* row = partial + int64_t(blockIdx.x) * 2 * (m + 1);
  for (int j = threadIdx.x; j < 2 * (m + 1); j += blockDim.x) row[j] = block_sums[j];
}

template <class F>
cudaError_t top_histogram(const void* data, int64_t n, unsigned long long* hist,
                          unsigned long long* specials, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t needed = (n + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(needed < int64_t(sms) * 8 ? needed : int64_t(sms) * 8);
  top_histogram_kernel<F><<<blocks, kThreads, 0, stream>>>(
      static_cast<const typename F::Bits*>(data), n, hist, specials);
  return cudaGetLastError();
}

template <class F>
cudaError_t level_pass(const void* data, int64_t n, int level, const int64_t* bins, int m,
                       unsigned long long* sub, double* partial, int blocks, uint64_t lo_key,
                       double log_ref, bool with_logs, cudaStream_t stream) {
  const int digit_width = level == F::kLevels - 1 ? F::kWidth - 16 * (F::kLevels - 1) : 16;
  const size_t shared = sizeof(double) * (2 * (m + 1) + 2 * (kThreads / 32)) +
                        sizeof(int64_t) * size_t(m);
  if (shared > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        level_pass_kernel<F>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared));
    if (err != cudaSuccess) return err;
  }
  level_pass_kernel<F><<<blocks, kThreads, shared, stream>>>(
      static_cast<const typename F::Bits*>(data), n, bins, m, sub, partial, F::shift(level - 1),
      F::shift(level), (1ull << digit_width) - 1, 1 << digit_width,
      static_cast<typename F::Bits>(lo_key), log_ref, with_logs);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_top_histogram(const void* data, int64_t n, int format,
                                 unsigned long long* hist, unsigned long long* specials,
                                 cudaStream_t stream) {
  switch (format) {
    case 0: return top_histogram<F16>(data, n, hist, specials, stream);
    case 1: return top_histogram<BF16>(data, n, hist, specials, stream);
    case 2: return top_histogram<F32>(data, n, hist, specials, stream);
    case 3: return top_histogram<F64>(data, n, hist, specials, stream);
  }
  return cudaErrorInvalidValue;
}

int level_pass_blocks(int64_t n, int sm_count) {
  const int64_t tile = int64_t(kThreads) * kItems;
  const int64_t needed = (n + tile - 1) / tile;
  const int64_t cap = int64_t(sm_count > 0 ? sm_count : 1) * 4;
  return static_cast<int>(needed < 1 ? 1 : (needed < cap ? needed : cap));
}

cudaError_t launch_level_pass(const void* data, int64_t n, int format, int level,
                              const int64_t* bins, int m, unsigned long long* sub,
                              double* partial, int blocks, uint64_t lo_key, double log_ref,
                              bool with_logs, cudaStream_t stream) {
  switch (format) {
    case 2:
      return level_pass<F32>(data, n, level, bins, m, sub, partial, blocks, lo_key, log_ref,
                             with_logs, stream);
    case 3:
      return level_pass<F64>(data, n, level, bins, m, sub, partial, blocks, lo_key, log_ref,
                             with_logs, stream);
  }
  return cudaErrorInvalidValue;  // 16-bit formats have one level: no level pass
}

}  // namespace gradience::tail::cuda
