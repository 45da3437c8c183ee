// CPU glue of the power-law fit op: argument checks (naming the argument and the value, all
// before any work), float64 views of the layers, allocation. The schema lives in
// csrc/registration.cpp, the kernel in power_law_cpu.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "spectral/power_law_kernels.h"

namespace gradience::spectral {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fit_power_law_op(
    at::TensorList xs, std::optional<double> xmax, c10::string_view xmax_alpha,
    at::ArrayRef<double> alpha_range, bool drop_nonpositive, c10::string_view d_mode) {
  TORCH_CHECK_VALUE(!xs.empty(), "xs: expected at least one tensor, got an empty list");
  PowerLawOptions opt;
  opt.xmax = std::numeric_limits<double>::infinity();
  if (xmax.has_value()) {
    TORCH_CHECK_VALUE(std::isfinite(*xmax) && *xmax > 0,
                      "xmax: expected a finite value > 0, got xmax=", *xmax);
    opt.xmax = *xmax;
  }
  if (xmax_alpha == "mle") {
    opt.xmax_alpha = XmaxAlpha::kTruncatedMle;
  } else if (xmax_alpha == "powerlaw") {
    opt.xmax_alpha = XmaxAlpha::kPowerlaw;
  } else {
    TORCH_CHECK_VALUE(false, "xmax_alpha: expected 'mle' or 'powerlaw', got xmax_alpha='",
                      std::string(xmax_alpha), "'");
  }
  if (d_mode == "pruned") {
    opt.d_mode = DMode::kPruned;
  } else if (d_mode == "exhaustive") {
    opt.d_mode = DMode::kExhaustive;
  } else {
    TORCH_CHECK_VALUE(false, "d_mode: expected 'pruned' or 'exhaustive', got d_mode='",
                      std::string(d_mode), "'");
  }
  opt.alpha_lo = -std::numeric_limits<double>::infinity();
  opt.alpha_hi = std::numeric_limits<double>::infinity();
  if (!alpha_range.empty()) {
    TORCH_CHECK_VALUE(alpha_range.size() == 2,
                      "alpha_range: expected [] or [low, high], got ", alpha_range.size(),
                      " values");
    TORCH_CHECK_VALUE(alpha_range[0] < alpha_range[1], "alpha_range: expected low < high, got [",
                      alpha_range[0], ", ", alpha_range[1], "]");
    opt.alpha_lo = alpha_range[0];
    opt.alpha_hi = alpha_range[1];
  }
  opt.drop_nonpositive = drop_nonpositive;

  const int64_t n_layers = static_cast<int64_t>(xs.size());
  std::vector<at::Tensor> values;
  values.reserve(xs.size());
  std::vector<const double*> ptrs(xs.size());
  std::vector<int64_t> ns(xs.size()), offsets(xs.size());
  int64_t n_total = 0;
  for (int64_t l = 0; l < n_layers; ++l) {
    const at::Tensor& x = xs[l];
    TORCH_CHECK_VALUE(x.device().is_cpu(), "xs[", l, "]: expected a CPU tensor, got device ",
                      x.device());
    TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "xs[", l,
                     "]: expected a floating-point tensor, got dtype ", x.scalar_type());
    TORCH_CHECK_VALUE(x.dim() == 1, "xs[", l, "]: expected a 1-D tensor, got shape ", x.sizes());
    TORCH_CHECK_VALUE(x.numel() > 0, "xs[", l, "]: expected at least one value, got none");
    // A float64 contiguous view (a copy only for other dtypes or strides); the kernel sorts its
    // own copy, the input is never written.
    values.push_back(x.to(at::kDouble).contiguous());
    const double* p = values.back().data_ptr<double>();
    const int64_t n = x.numel();
    double smallest = std::numeric_limits<double>::infinity();
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK_VALUE(std::isfinite(p[i]), "xs[", l, "][", i, "]: expected finite values, got ",
                        p[i]);
      TORCH_CHECK_VALUE(drop_nonpositive || p[i] > 0, "xs[", l, "][", i,
                        "]: expected positive values (pass nonpositive='drop' to drop values "
                        "<= 0), got ", p[i]);
      if (p[i] > 0 && p[i] < smallest) smallest = p[i];
    }
    TORCH_CHECK_VALUE(smallest < std::numeric_limits<double>::infinity(), "xs[", l,
                      "]: no positive values to fit (all ", n, " values are <= 0)");
    TORCH_CHECK_VALUE(!xmax.has_value() || *xmax > smallest, "xmax: must exceed the smallest "
                      "positive value of xs[", l, "], got xmax=", *xmax, " <= ", smallest);
    ptrs[l] = p;
    ns[l] = n;
    offsets[l] = n_total;
    n_total += n;
  }
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const auto i64 = at::TensorOptions().dtype(at::kLong);
  at::Tensor fits = at::empty({n_layers, kFitColumns}, f64);
  at::Tensor counts = at::empty({n_layers, kCountColumns}, i64);
  at::Tensor curves = at::empty({3, n_total}, f64);
  at::Tensor n_tails = at::empty({n_total}, i64);
  fit_power_law_cpu(ptrs.data(), ns.data(), offsets.data(), n_layers, n_total, opt,
                    fits.data_ptr<double>(), counts.data_ptr<int64_t>(),
                    curves.data_ptr<double>(), n_tails.data_ptr<int64_t>());
  return {fits, counts, curves, n_tails};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradience, CPU, m) { m.impl("fit_power_law", &fit_power_law_op); }

}  // namespace gradience::spectral
