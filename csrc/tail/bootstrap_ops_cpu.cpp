// CPU glue of the bootstrap op: argument checks (naming argument and value) and allocation. The
// schema lives in csrc/registration.cpp, the kernel in bootstrap_cpu.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "tail/bootstrap_kernels.h"

namespace gradience::tail {
namespace {

at::Tensor bootstrap_tail_statistics_op(const at::Tensor& logs, int64_t m, at::IntArrayRef ks,
                                        int64_t n_resamples, int64_t seed,
                                        int64_t first_resample) {
  TORCH_CHECK_VALUE(logs.device().is_cpu(), "logs: expected a CPU tensor, got device ",
                    logs.device());
  TORCH_CHECK_TYPE(logs.scalar_type() == at::kDouble,
                   "logs: expected a float64 tensor, got dtype ", logs.scalar_type());
  TORCH_CHECK_VALUE(logs.dim() == 1, "logs: expected a 1-D tensor, got shape ", logs.sizes());
  const int64_t n = logs.numel();
  TORCH_CHECK_VALUE(n >= 2, "logs: expected at least 2 values, got ", n);
  TORCH_CHECK_VALUE(m >= 2, "m: the resample size must be >= 2, got m=", m);
  TORCH_CHECK_VALUE(n_resamples >= 0, "n_resamples must be >= 0, got n_resamples=",
                    n_resamples);
  TORCH_CHECK_VALUE(first_resample >= 0, "first_resample must be >= 0, got first_resample=",
                    first_resample);
  TORCH_CHECK_VALUE(!ks.empty(), "ks: expected at least one k, got an empty list");
  for (size_t g = 0; g < ks.size(); ++g) {
    TORCH_CHECK_VALUE(ks[g] >= 1 && ks[g] < m, "ks[", g, "]: k must be in [1, m), got k=",
                      ks[g], " for m=", m);
    TORCH_CHECK_VALUE(g == 0 || ks[g] > ks[g - 1], "ks[", g,
                      "]: ks must be strictly increasing, got ", ks[g - 1], " then ", ks[g]);
  }
  const at::Tensor values = logs.contiguous();
  const double* p = values.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(std::isfinite(p[i]), "logs[", i, "]: expected finite logs, got ", p[i]);
    TORCH_CHECK_VALUE(i == 0 || p[i] <= p[i - 1], "logs: expected descending values, got logs[",
                      i - 1, "]=", p[i - 1], " < logs[", i, "]=", p[i]);
  }
  const int64_t n_ks = static_cast<int64_t>(ks.size());
  at::Tensor out = at::empty({n_resamples, 2, n_ks}, at::TensorOptions().dtype(at::kDouble));
  bootstrap_tail_statistics_cpu(p, n, m, ks.data(), n_ks, n_resamples,
                                static_cast<uint64_t>(seed), first_resample,
                                out.data_ptr<double>());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gradience, CPU, m) {
  m.impl("bootstrap_tail_statistics", &bootstrap_tail_statistics_op);
}

}  // namespace gradience::tail
