#include "tail/tensor_views.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <numeric>

namespace gradience::tail {

namespace {
FloatFormat format_of(const at::Tensor& x, const char* arg, size_t index) {
  switch (x.scalar_type()) {
    case at::kHalf:
      return FloatFormat::kFloat16;
    case at::kBFloat16:
      return FloatFormat::kBFloat16;
    case at::kFloat:
      return FloatFormat::kFloat32;
    case at::kDouble:
      return FloatFormat::kFloat64;
    default:
      TORCH_CHECK_TYPE(false, arg, "[", index,
                       "]: expected a float16, bfloat16, float32 or float64 tensor, got dtype ",
                       x.scalar_type());
  }
}
}  // namespace

FloatFormat check_sample(at::TensorList xs, const char* arg, c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(!xs.empty(), arg, ": expected at least one tensor, got an empty list");
  const FloatFormat format = format_of(xs[0], arg, 0);
  for (size_t i = 0; i < xs.size(); ++i) {
    const at::Tensor& x = xs[i];
    TORCH_CHECK_VALUE(x.defined(), arg, "[", i, "]: expected a tensor, got None");
    TORCH_CHECK_VALUE(x.device().type() == device_type, arg, "[", i, "]: expected a ",
                      c10::DeviceTypeName(device_type), " tensor, got device ", x.device());
    TORCH_CHECK_VALUE(x.device() == xs[0].device(), arg, "[", i,
                      "]: all tensors must be on one device, got ", x.device(), " and ",
                      xs[0].device());
    TORCH_CHECK_TYPE(format_of(x, arg, i) == format, arg, "[", i,
                     "]: all tensors of one sample must share a dtype, got ", x.scalar_type(),
                     " and ", xs[0].scalar_type());
  }
  return format;
}

StridedView strided_view_of(const at::Tensor& x) {
  StridedView view;
  view.data = x.data_ptr();
  view.numel = x.numel();
  // Dimensions of size 1 never move the pointer; the rest are ordered innermost first.
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (x.size(d) != 1) dims.emplace_back(x.stride(d), x.size(d));
  }
  // Broadcast (stride 0) dimensions go outermost so that inner runs stay over distinct memory.
  std::stable_sort(dims.begin(), dims.end(), [](const auto& a, const auto& b) {
    const uint64_t sa = a.first == 0 ? UINT64_MAX : static_cast<uint64_t>(a.first);
    const uint64_t sb = b.first == 0 ? UINT64_MAX : static_cast<uint64_t>(b.first);
    return sa < sb;
  });
  std::vector<std::pair<int64_t, int64_t>> merged;
  for (const auto& [stride, size] : dims) {
    if (!merged.empty() && merged.back().first * merged.back().second == stride &&
        merged.back().first != 0) {
      merged.back().second *= size;
    } else {
      merged.emplace_back(stride, size);
    }
  }
  TORCH_CHECK_VALUE(static_cast<int>(merged.size()) <= kMaxViewDims, "tensor with ",
                    merged.size(), " non-mergeable dimensions exceeds the supported ",
                    kMaxViewDims);
  view.ndim = static_cast<int>(merged.size());
  for (int d = 0; d < view.ndim; ++d) {
    view.strides[d] = merged[d].first;
    view.sizes[d] = merged[d].second;
  }
  return view;
}

std::vector<StridedView> strided_views_of(at::TensorList xs) {
  std::vector<StridedView> views;
  views.reserve(xs.size());
  for (const auto& x : xs) {
    if (x.numel() > 0) views.push_back(strided_view_of(x));
  }
  return views;
}

int64_t total_numel(at::TensorList xs) {
  int64_t n = 0;
  for (const auto& x : xs) n += x.numel();
  return n;
}

KeyLayout key_layout(FloatFormat format, bool absolute) {
  const int bits = format == FloatFormat::kFloat64 ? 64 : format == FloatFormat::kFloat32 ? 32 : 16;
  const int width = absolute ? bits - 1 : bits;
  return {width, (width + 15) / 16};
}

void check_level_pass(const KeyLayout& layout, at::TensorList xs, bool absolute, int64_t level,
                      at::IntArrayRef bins, bool with_log_sums) {
  TORCH_CHECK_VALUE(total_numel(xs) > 0, "xs: expected a non-empty sample, got 0 elements");
  TORCH_CHECK_VALUE(level >= 1 && level < layout.levels, "level must be in [1, ", layout.levels,
                    ") for dtype ", xs[0].scalar_type(), ", got level=", level);
  TORCH_CHECK_VALUE(!with_log_sums || absolute, "with_log_sums needs absolute=True");
  TORCH_CHECK_VALUE(!bins.empty(), "bins: expected at least one prefix, got an empty list");
  const int prefix_bits = layout.width - layout.shift(static_cast<int>(level) - 1);
  const int64_t limit = int64_t{1} << prefix_bits;
  for (size_t i = 0; i < bins.size(); ++i) {
    TORCH_CHECK_VALUE(bins[i] >= 0 && bins[i] < limit, "bins[", i, "]: a prefix of ",
                      prefix_bits, " bits must be in [0, ", limit, "), got ", bins[i]);
    TORCH_CHECK_VALUE(i == 0 || bins[i] > bins[i - 1], "bins[", i,
                      "]: bins must be strictly increasing, got ", bins[i - 1], " then ",
                      bins[i]);
  }
}

}  // namespace gradience::tail
