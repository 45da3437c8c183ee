// The CUDA passes behind the OrderStatsEngine interface (see order_stats_cuda.h). Core torch
// headers only (the stream through the device guard interface), so this builds against the
// CPU wheel on the CI machines and against a CUDA torch on a GPU machine.
#ifdef GRADIENCE_WITH_CUDA
#include "tail/order_stats_cuda.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <algorithm>
#include <cmath>

#include "tail/host_descent.h"
#include "tail/tail_passes_cuda.h"

namespace gradience::tail {
namespace {

constexpr auto kCUDA = c10::DeviceType::CUDA;
// Chunks per SM in a pass's table: enough that blocks finish within a chunk of each other on
// unequal tensor sizes, few enough that the table stays a few hundred KiB at 10^9 entries.
constexpr int64_t kChunksPerSm = 64;
constexpr int64_t kMinChunk = int64_t{1} << 16;

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": ", cudaGetErrorString(err));
}

int bits_of(FloatFormat f) {
  return f == FloatFormat::kFloat64 ? 64 : f == FloatFormat::kFloat32 ? 32 : 16;
}

class CudaPasses final : public OrderStatsEngine {
 public:
  CudaPasses(at::TensorList xs, FloatFormat format, bool absolute)
      : format_(format), absolute_(absolute), device_(xs[0].device()) {
    const c10::DeviceGuard guard(device_);
    width_ = absolute ? bits_of(format) - 1 : bits_of(format);
    levels_ = (width_ + 15) / 16;
    check_cuda(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount,
                                      device_.index()),
               "cudaDeviceGetAttribute");
    for (const at::Tensor& x : xs) {
      if (x.numel() == 0) continue;
      flats_.push_back(x.is_contiguous() ? x : x.contiguous());
      total_ += x.numel();
    }
    const int64_t chunk =
        std::max(kMinChunk, (total_ + sm_count_ * kChunksPerSm - 1) / (sm_count_ * kChunksPerSm));
    std::vector<int64_t> addresses, rows;
    for (size_t s = 0; s < flats_.size(); ++s) {
      addresses.push_back(reinterpret_cast<int64_t>(flats_[s].data_ptr()));
      const int64_t n = flats_[s].numel();
      for (int64_t first = 0; first < n; first += chunk) {
        rows.insert(rows.end(), {static_cast<int64_t>(s), first, std::min(chunk, n - first)});
      }
    }
    const auto longs = at::TensorOptions().dtype(at::kLong);
    segment_data_ = at::tensor(addresses, longs).to(device_);
    chunks_ = at::tensor(rows, longs).to(device_);
    table_.segment_data = segment_data_.data_ptr<int64_t>();
    table_.chunks = chunks_.data_ptr<int64_t>();
    table_.n_chunks = static_cast<int64_t>(rows.size() / 3);
    counts_.n_total = total_;
  }

  const SampleCounts& count() override {
    const c10::DeviceGuard guard(device_);
    const auto longs = at::TensorOptions().dtype(at::kLong).device(device_);
    at::Tensor hist = at::zeros({int64_t{1} << digit_width(0)}, longs);
    at::Tensor specials = at::zeros({3}, longs);
    check_cuda(cuda::launch_top_histogram(
                   table_, static_cast<int>(format_), absolute_,
                   reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>()),
                   reinterpret_cast<unsigned long long*>(specials.data_ptr<int64_t>()),
                   cuda::pass_blocks(table_.n_chunks, sm_count_), stream()),
               "top histogram launch");
    const at::Tensor host = at::cat({hist, specials}).cpu();
    const int64_t* h = host.data_ptr<int64_t>();
    top_hist_.assign(h, h + hist.numel());
    const int64_t* s = h + hist.numel();
    counts_.n_nan = s[2];
    if (absolute_) {
      counts_.n_zero = s[0];
      counts_.n_inf = s[1];
      counts_.n_eff = total_ - s[0] - s[1] - s[2];
    } else {
      counts_.n_eff = total_;
    }
    return counts_;
  }

  const std::vector<uint64_t>& top_histogram() const override { return top_hist_; }

  void level_pass(int level, const std::vector<int64_t>& bins, bool with_log_sums,
                  LevelPass& out) override {
    const c10::DeviceGuard guard(device_);
    const int m = static_cast<int>(bins.size());
    const int digits = 1 << digit_width(level);
    const auto longs = at::TensorOptions().dtype(at::kLong).device(device_);
    const auto doubles = at::TensorOptions().dtype(at::kDouble).device(device_);
    const at::Tensor bins_device = at::tensor(bins, at::TensorOptions().dtype(at::kLong)).to(device_);
    at::Tensor sub = at::zeros({int64_t{m} * digits}, longs);
    const int blocks = cuda::pass_blocks(table_.n_chunks, sm_count_);
    const int64_t partial_rows = with_log_sums ? int64_t{blocks} * cuda::level_pass_warps() : 0;
    at::Tensor partial = at::zeros({std::max<int64_t>(1, partial_rows * 2 * (m + 1))}, doubles);
    at::Tensor sums = at::zeros({2 * (m + 1)}, doubles);
    const uint64_t lo_key = static_cast<uint64_t>(bins.front()) << shift(level - 1);
    const double log_ref =
        with_log_sums ? std::log(key_value(format_, absolute_, lo_key == 0 ? 1 : lo_key)) : 0.0;
    check_cuda(cuda::launch_level_pass(
                   table_, static_cast<int>(format_), absolute_, level,
                   bins_device.data_ptr<int64_t>(), m,
                   reinterpret_cast<unsigned long long*>(sub.data_ptr<int64_t>()),
                   partial.data_ptr<double>(), sums.data_ptr<double>(), blocks, lo_key, log_ref,
                   with_log_sums, stream()),
               "level pass launch");
    const at::Tensor sub_host = sub.cpu();
    const int64_t* h = sub_host.data_ptr<int64_t>();
    out.digit_bins = digits;
    out.sub_total.assign(h, h + sub_host.numel());
    out.bucket_count.assign(m + 1, 0);  // not computed on the device (the walk does not use it)
    out.bucket_log.assign(m + 1, 0.0);
    out.bucket_log_sq.assign(m + 1, 0.0);
    out.log_ref = log_ref;
    if (with_log_sums) {
      const at::Tensor sums_host = sums.cpu();
      const double* p = sums_host.data_ptr<double>();
      std::copy(p, p + m + 1, out.bucket_log.begin());
      std::copy(p + m + 1, p + 2 * (m + 1), out.bucket_log_sq.begin());
    }
  }

  void resolve(const std::vector<int64_t>&, bool, std::vector<RankResult>&, double*) override {
    throw std::logic_error("CudaPasses::resolve: wrap in make_host_descent");
  }
  bool resolve_sampled(const std::vector<RankRequest>&, bool, std::vector<RankResult>&, double*,
                       SampleCounts*) override {
    return false;
  }

 private:
  int shift(int level) const { return level == levels_ - 1 ? 0 : width_ - 16 * (level + 1); }
  int digit_width(int level) const {
    return level == levels_ - 1 ? width_ - 16 * (levels_ - 1) : 16;
  }
  cudaStream_t stream() const {
    return static_cast<cudaStream_t>(
        c10::impl::getDeviceGuardImpl(kCUDA)->getStream(device_).native_handle());
  }

  FloatFormat format_;
  bool absolute_;
  at::Device device_;
  int width_ = 0, levels_ = 0, sm_count_ = 1;
  int64_t total_ = 0;
  std::vector<at::Tensor> flats_;  // keeps the (possibly copied) data alive for the passes
  at::Tensor segment_data_, chunks_;
  cuda::ChunkTable table_{};
  std::vector<uint64_t> top_hist_;
  SampleCounts counts_;
};

}  // namespace

std::unique_ptr<OrderStatsEngine> make_order_stats_cuda(at::TensorList xs, FloatFormat format,
                                                        bool absolute) {
  return make_host_descent(std::make_unique<CudaPasses>(xs, format, absolute), format, absolute);
}

}  // namespace gradience::tail
#endif  // GRADIENCE_WITH_CUDA
