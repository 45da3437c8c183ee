// CUDA glue of the pass ops (tail_histogram, tail_level_pass): checks, allocation, the current
// stream, launches of tail_passes_cuda.cu. Core torch headers only (the stream through the
// device guard interface), so it builds against CPU and CUDA torch alike; compiled when CMake
// finds nvcc (GRADIENCE_WITH_CUDA). Not yet run on a GPU (issue 4).
#ifdef GRADIENCE_WITH_CUDA
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <cmath>

#include "tail/float_keys.h"
#include "tail/tail_passes_cuda.h"
#include "tail/tensor_views.h"

namespace gradience::tail {
namespace {

constexpr auto kCUDA = c10::DeviceType::CUDA;

cudaStream_t current_stream(const at::Device& device) {
  return static_cast<cudaStream_t>(
      c10::impl::getDeviceGuardImpl(kCUDA)->getStream(device).native_handle());
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": ", cudaGetErrorString(err));
}

double key_value(FloatFormat format, uint64_t key) {
  switch (format) {
    case FloatFormat::kFloat16:
      return FormatTraits<FloatFormat::kFloat16>::to_double(static_cast<uint16_t>(key));
    case FloatFormat::kBFloat16:
      return FormatTraits<FloatFormat::kBFloat16>::to_double(static_cast<uint16_t>(key));
    case FloatFormat::kFloat32:
      return FormatTraits<FloatFormat::kFloat32>::to_double(static_cast<uint32_t>(key));
    case FloatFormat::kFloat64:
      return FormatTraits<FloatFormat::kFloat64>::to_double(key);
  }
  return 0.0;
}

std::tuple<at::Tensor, at::Tensor> tail_histogram_cuda(at::TensorList xs, bool absolute) {
  const FloatFormat format = check_sample(xs, "xs", kCUDA);
  TORCH_CHECK_VALUE(absolute, "tail_histogram on CUDA ranks |x| only: absolute must be True");
  const int64_t total = total_numel(xs);
  TORCH_CHECK_VALUE(total > 0, "xs: expected a non-empty sample, got 0 elements");
  const KeyLayout layout = key_layout(format, true);
  const c10::DeviceGuard guard(xs[0].device());
  const auto longs = at::TensorOptions().dtype(at::kLong).device(xs[0].device());
  at::Tensor hist = at::zeros({int64_t{1} << (layout.width - layout.shift(0))}, longs);
  at::Tensor specials = at::zeros({3}, longs);  // zero, inf, NaN keys
  const cudaStream_t stream = current_stream(xs[0].device());
  for (const at::Tensor& x : xs) {
    if (x.numel() == 0) continue;
    // Strided tensors are read through one contiguous copy (a bounded chunked read: TODO of
    // issue 4, measured first).
    const at::Tensor flat = x.contiguous();
    check_cuda(cuda::launch_top_histogram(
                   flat.data_ptr(), flat.numel(), static_cast<int>(format),
                   reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>()),
                   reinterpret_cast<unsigned long long*>(specials.data_ptr<int64_t>()), stream),
               "tail_histogram launch");
  }
  // (n_eff, n_zero, n_nan, n_inf), on the device.
  at::Tensor counts = at::stack({specials.sum().neg().add(total), specials[0], specials[2],
                                 specials[1]});
  return {hist, counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tail_level_pass_cuda(
    at::TensorList xs, bool absolute, int64_t level, at::IntArrayRef bins, bool with_log_sums) {
  const FloatFormat format = check_sample(xs, "xs", kCUDA);
  TORCH_CHECK_VALUE(absolute, "tail_level_pass on CUDA ranks |x| only: absolute must be True");
  const KeyLayout layout = key_layout(format, true);
  check_level_pass(layout, xs, absolute, level, bins, with_log_sums);
  const c10::DeviceGuard guard(xs[0].device());
  const at::Device device = xs[0].device();
  const int64_t m = static_cast<int64_t>(bins.size());
  const int digit_bins = 1 << layout.digit_width(static_cast<int>(level));
  const auto longs = at::TensorOptions().dtype(at::kLong).device(device);
  const auto doubles = at::TensorOptions().dtype(at::kDouble).device(device);
  at::Tensor bins_device = at::tensor(bins, at::TensorOptions().dtype(at::kLong)).to(device);
  at::Tensor sub = at::zeros({m, digit_bins}, longs);
  at::Tensor sums = at::zeros({2, m + 1}, doubles);
  const uint64_t lo_key = static_cast<uint64_t>(bins[0])
                          << layout.shift(static_cast<int>(level) - 1);
  const double log_ref = std::log(key_value(format, lo_key == 0 ? 1 : lo_key));
  int sm_count = 1;
  check_cuda(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device.index()),
             "device attribute");
  const cudaStream_t stream = current_stream(device);
  for (const at::Tensor& x : xs) {
    if (x.numel() == 0) continue;
    const at::Tensor flat = x.contiguous();
    const int blocks = cuda::level_pass_blocks(flat.numel(), sm_count);
    at::Tensor partial = at::zeros({blocks, 2, m + 1}, doubles);
    check_cuda(cuda::launch_level_pass(
                   flat.data_ptr(), flat.numel(), static_cast<int>(format),
                   static_cast<int>(level), bins_device.data_ptr<int64_t>(),
                   static_cast<int>(m),
                   reinterpret_cast<unsigned long long*>(sub.data_ptr<int64_t>()),
                   partial.data_ptr<double>(), blocks, lo_key, log_ref, with_log_sums, stream),
               "tail_level_pass launch");
    if (with_log_sums) sums.add_(partial.sum(0));  // fixed-shape reduction: deterministic
  }
  return {sub, sums[0].clone(), sums[1].clone(), at::scalar_tensor(log_ref, doubles)};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradience, CUDA, m) {
  m.impl("tail_histogram", &tail_histogram_cuda);
  m.impl("tail_level_pass", &tail_level_pass_cuda);
}

}  // namespace gradience::tail
#endif  // GRADIENCE_WITH_CUDA
