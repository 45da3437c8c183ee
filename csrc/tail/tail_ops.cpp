// Glue of the tail ops for CPU and CUDA tensors: argument checks, rank planning, allocation of
// outputs. The schemas live in csrc/registration.cpp; the engines in order_stats_cpu.cpp (CPU)
// and order_stats_cuda.cpp (CUDA passes walked on the host). Results are planned on the host
// and moved to the sample's device: a handful of float64 rows.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "tail/host_descent.h"
#include "tail/order_stats_cuda.h"
#include "tail/order_stats_kernels.h"
#include "tail/tensor_views.h"

namespace gradience::tail {
namespace {

constexpr auto kCPU = c10::DeviceType::CPU;
constexpr auto kCUDA = c10::DeviceType::CUDA;

// The engine of a sample's device: the fused CPU engine, the CUDA passes walked on the host,
// or (GRADIENCE_HOST_DESCENT=1, for tests on machines without a GPU) the CPU passes walked on
// the host like the CUDA ones. `views` must outlive the engine.
std::unique_ptr<OrderStatsEngine> make_engine(at::TensorList xs, FloatFormat format,
                                              bool absolute, std::vector<StridedView>& views) {
#ifdef GRADIENCE_WITH_CUDA
  if (xs[0].device().type() == kCUDA) return make_order_stats_cuda(xs, format, absolute);
#endif
  TORCH_CHECK_VALUE(xs[0].device().type() == kCPU, "xs: no kernel for device ", xs[0].device());
  views = strided_views_of(xs);
  auto cpu = make_order_stats_cpu(format, absolute, views.data(),
                                  static_cast<int64_t>(views.size()));
  if (host_descent_requested()) return make_host_descent(std::move(cpu), format, absolute);
  return cpu;
}

// A result planned on the host, on the sample's device.
at::Tensor on_device_of(const at::Tensor& result, at::TensorList xs) {
  return xs[0].device().is_cpu() ? result : result.to(xs[0].device());
}

void check_k_arguments(at::IntArrayRef ks, at::ArrayRef<double> k_ratios, int64_t n_total) {
  for (size_t i = 0; i < ks.size(); ++i) {
    TORCH_CHECK_VALUE(ks[i] >= 1, "ks[", i, "]: k must be >= 1, got k=", ks[i]);
    TORCH_CHECK_VALUE(ks[i] < n_total, "ks[", i, "]: k must be < n_eff, got k=", ks[i],
                      " for a sample of only ", n_total, " entries");
  }
  for (size_t i = 0; i < k_ratios.size(); ++i) {
    const double r = k_ratios[i];
    TORCH_CHECK_VALUE(std::isfinite(r) && r > 0.0 && r < 1.0, "k_ratios[", i,
                      "]: k_ratio must be in (0, 1), got k_ratio=", r);
  }
}

// ks followed by floor(k_ratio * n_eff), each checked against n_eff.
std::vector<int64_t> plan_ks(at::IntArrayRef ks, at::ArrayRef<double> k_ratios,
                             const SampleCounts& counts, const std::string& where) {
  std::vector<int64_t> all(ks.begin(), ks.end());
  for (size_t i = 0; i < k_ratios.size(); ++i) {
    const int64_t k = static_cast<int64_t>(std::floor(k_ratios[i] * counts.n_eff));
    TORCH_CHECK_VALUE(k >= 1, where, "k_ratios[", i, "]=", k_ratios[i], " gives k=floor(",
                      k_ratios[i], " * n_eff)=", k, " for n_eff=", counts.n_eff,
                      "; k must be >= 1");
    all.push_back(k);
  }
  for (size_t i = 0; i < all.size(); ++i) {
    TORCH_CHECK_VALUE(all[i] < counts.n_eff, where, "k=", all[i], " must be < n_eff=",
                      counts.n_eff, " (finite nonzero entries; n_zero=", counts.n_zero,
                      ", n_nan=", counts.n_nan, ", n_inf=", counts.n_inf, ")");
  }
  return all;
}

void write_counts(const SampleCounts& c, int64_t* out) {
  out[0] = c.n_eff;
  out[1] = c.n_zero;
  out[2] = c.n_nan;
  out[3] = c.n_inf;
}

void write_row(const TailRow& row, double* out) {
  out[0] = row.k;
  out[1] = row.x_k1;
  out[2] = row.x_k;
  out[3] = row.s1;
  out[4] = row.s2;
  out[5] = row.h1;
  out[6] = row.h2;
}

// Runs the engine over one sample and writes one row per k into rows ([n_k, kTailRowWidth]).
void tail_rows_for_sample(at::TensorList xs, at::IntArrayRef ks, at::ArrayRef<double> k_ratios,
                          double* rows, int64_t* counts_out, const std::string& where) {
  const FloatFormat format = check_sample(xs, "xs", xs[0].device().type());
  std::vector<StridedView> views;
  auto engine = make_engine(xs, format, /*absolute=*/true, views);
  if (ks.empty() && k_ratios.empty()) {
    write_counts(engine->count(), counts_out);
    return;
  }
  // Ranks k and k+1 of every row: X(k+1) and the sums above it, and X(k).
  std::vector<RankRequest> requests;
  for (int64_t k : ks) {
    requests.push_back({k, 0.0, 0});
    requests.push_back({k, 0.0, 1});
  }
  for (double r : k_ratios) {
    requests.push_back({0, r, 0});
    requests.push_back({0, r, 1});
  }
  std::vector<RankResult> sampled;
  double sampled_ref = 0.0;
  SampleCounts sampled_counts;
  if (engine->resolve_sampled(requests, /*with_log_sums=*/true, sampled, &sampled_ref,
                              &sampled_counts)) {
    write_counts(sampled_counts, counts_out);
    const std::vector<int64_t> all_ks = plan_ks(ks, k_ratios, sampled_counts, where);
    for (size_t i = 0; i < all_ks.size(); ++i) {
      write_row(tail_row(all_ks[i], sampled[2 * i], sampled[2 * i + 1], sampled_ref),
                rows + i * kTailRowWidth);
    }
    return;
  }
  const SampleCounts& counts = engine->count();
  write_counts(counts, counts_out);
  const std::vector<int64_t> all_ks = plan_ks(ks, k_ratios, counts, where);
  std::vector<int64_t> ranks;
  for (int64_t k : all_ks) {
    ranks.push_back(k);
    ranks.push_back(k + 1);
  }
  std::sort(ranks.begin(), ranks.end());
  ranks.erase(std::unique(ranks.begin(), ranks.end()), ranks.end());
  std::vector<RankResult> results;
  double log_ref = 0.0;
  engine->resolve(ranks, /*with_log_sums=*/true, results, &log_ref);
  auto result_of = [&](int64_t r) -> const RankResult& {
    return results[std::lower_bound(ranks.begin(), ranks.end(), r) - ranks.begin()];
  };
  for (size_t i = 0; i < all_ks.size(); ++i) {
    write_row(tail_row(all_ks[i], result_of(all_ks[i]), result_of(all_ks[i] + 1), log_ref),
              rows + i * kTailRowWidth);
  }
}

at::TensorOptions f64() { return at::TensorOptions().dtype(at::kDouble); }
at::TensorOptions i64() { return at::TensorOptions().dtype(at::kLong); }

template <c10::DeviceType D>
std::tuple<at::Tensor, at::Tensor> tail_stats_op(at::TensorList xs, at::IntArrayRef ks,
                                                 at::ArrayRef<double> k_ratios) {
  check_sample(xs, "xs", D);
  const int64_t n_total = total_numel(xs);
  TORCH_CHECK_VALUE(n_total > 0, "xs: expected a non-empty sample, got 0 elements");
  check_k_arguments(ks, k_ratios, n_total);
  const int64_t n_k = static_cast<int64_t>(ks.size() + k_ratios.size());
  at::Tensor rows = at::empty({n_k, kTailRowWidth}, f64());
  at::Tensor counts = at::empty({4}, i64());
  tail_rows_for_sample(xs, ks, k_ratios, rows.data_ptr<double>(), counts.data_ptr<int64_t>(),
                       "");
  return {on_device_of(rows, xs), on_device_of(counts, xs)};
}

// One descent per tensor (on CUDA one launch sequence per tensor: a single sequence for all of
// them needs per-tensor histograms on the device, not done yet).
template <c10::DeviceType D>
std::tuple<at::Tensor, at::Tensor> tail_stats_per_tensor_op(at::TensorList xs,
                                                            at::IntArrayRef ks,
                                                            at::ArrayRef<double> k_ratios) {
  check_sample(xs, "xs", D);
  for (size_t t = 0; t < xs.size(); ++t) {
    TORCH_CHECK_VALUE(xs[t].numel() > 0, "xs[", t, "]: expected a non-empty tensor");
    check_k_arguments(ks, k_ratios, xs[t].numel());
  }
  const int64_t n_t = static_cast<int64_t>(xs.size());
  const int64_t n_k = static_cast<int64_t>(ks.size() + k_ratios.size());
  at::Tensor rows = at::empty({n_t, n_k, kTailRowWidth}, f64());
  at::Tensor counts = at::empty({n_t, 4}, i64());
  for (int64_t t = 0; t < n_t; ++t) {
    tail_rows_for_sample(xs.slice(t, 1), ks, k_ratios,
                         rows.data_ptr<double>() + t * n_k * kTailRowWidth,
                         counts.data_ptr<int64_t>() + t * 4, "xs[" + std::to_string(t) + "]: ");
  }
  return {on_device_of(rows, xs), on_device_of(counts, xs)};
}

template <c10::DeviceType D>
at::Tensor hill_op(const at::Tensor& x, int64_t k) {
  const at::Tensor xs[] = {x};
  check_sample(xs, "x", D);
  TORCH_CHECK_VALUE(x.numel() > 0, "x: expected a non-empty tensor, got 0 elements");
  TORCH_CHECK_VALUE(k >= 1, "k must be >= 1, got k=", k);
  TORCH_CHECK_VALUE(k < x.numel(), "k must be < n_eff, got k=", k, " for a tensor of only ",
                    x.numel(), " entries");
  double row[kTailRowWidth];
  int64_t counts[4];
  const int64_t ks[] = {k};
  tail_rows_for_sample(xs, ks, {}, row, counts, "");
  // alpha = 1 / gamma, gamma = H1 / k (Hill 1975).
  return on_device_of(at::scalar_tensor(row[0] / row[5], f64()), xs);
}

// Ascending 1-based ranks of signed x, or descending ranks of |x| (finite nonzero), in float64.
// On the host: quantile reads the values before they go to the device.
at::Tensor order_statistics_host(at::TensorList xs, at::IntArrayRef ranks, bool absolute) {
  const FloatFormat format = check_sample(xs, "xs", xs[0].device().type());
  const int64_t n_total = total_numel(xs);
  TORCH_CHECK_VALUE(n_total > 0, "xs: expected a non-empty sample, got 0 elements");
  for (size_t i = 0; i < ranks.size(); ++i) {
    TORCH_CHECK_VALUE(ranks[i] >= 1 && ranks[i] <= n_total, "ranks[", i,
                      "]: rank must be in [1, n], got rank=", ranks[i], " for n=", n_total);
  }
  at::Tensor out = at::empty({static_cast<int64_t>(ranks.size())}, f64());
  if (ranks.empty()) return out;
  std::vector<StridedView> views;
  auto engine = make_engine(xs, format, absolute, views);
  const SampleCounts& counts = engine->count();
  double* result = out.data_ptr<double>();
  if (!absolute && counts.n_nan > 0) {
    // Like torch.quantile / numpy: NaN in the sample makes every order statistic NaN.
    std::fill(result, result + ranks.size(), std::numeric_limits<double>::quiet_NaN());
    return out;
  }
  std::vector<int64_t> descending(ranks.size());
  for (size_t i = 0; i < ranks.size(); ++i) {
    if (absolute) {
      TORCH_CHECK_VALUE(ranks[i] <= counts.n_eff, "ranks[", i, "]: rank=", ranks[i],
                        " must be <= n_eff=", counts.n_eff, " (finite nonzero |x|; n_zero=",
                        counts.n_zero, ", n_nan=", counts.n_nan, ", n_inf=", counts.n_inf,
                        ")");
      descending[i] = ranks[i];
    } else {
      descending[i] = n_total + 1 - ranks[i];
    }
  }
  std::vector<RankResult> results;
  engine->resolve(descending, /*with_log_sums=*/false, results, nullptr);
  for (size_t i = 0; i < ranks.size(); ++i) result[i] = results[i].value;
  return out;
}

template <c10::DeviceType D>
at::Tensor order_statistics_op(at::TensorList xs, at::IntArrayRef ranks, bool absolute) {
  check_sample(xs, "xs", D);
  return on_device_of(order_statistics_host(xs, ranks, absolute), xs);
}

// numpy's two-sided lerp (numpy.lib._function_base_impl._lerp, also torch.lerp's form).
double lerp(double a, double b, double t) {
  const double diff = b - a;
  return t >= 0.5 ? b - diff * (1.0 - t) : a + diff * t;
}

template <c10::DeviceType D>
at::Tensor quantile_op(at::TensorList xs, at::ArrayRef<double> q,
                       c10::string_view interpolation) {
  check_sample(xs, "xs", D);
  const std::string mode(interpolation);
  TORCH_CHECK_VALUE(mode == "linear" || mode == "lower" || mode == "higher" ||
                        mode == "nearest" || mode == "midpoint",
                    "interpolation must be one of 'linear', 'lower', 'higher', 'nearest', "
                    "'midpoint', got interpolation='", mode, "'");
  const int64_t n = total_numel(xs);
  TORCH_CHECK_VALUE(n > 0, "xs: expected a non-empty sample, got 0 elements");
  for (size_t i = 0; i < q.size(); ++i) {
    TORCH_CHECK_VALUE(q[i] >= 0.0 && q[i] <= 1.0, "q[", i, "]: q must be in [0, 1], got q=",
                      q[i]);
  }
  const auto out_dtype = xs[0].scalar_type();
  if (q.empty()) return at::empty({0}, at::TensorOptions().dtype(out_dtype).device(xs[0].device()));

  // Positions as numpy computes them: virtual index h = (n - 1) q in float64.
  std::vector<int64_t> below(q.size()), above(q.size());
  std::vector<double> weight(q.size());
  for (size_t i = 0; i < q.size(); ++i) {
    const double h = static_cast<double>(n - 1) * q[i];
    const double fl = std::floor(h);
    const double ce = std::ceil(h);
    if (mode == "linear") {
      below[i] = static_cast<int64_t>(fl);
      above[i] = std::min<int64_t>(below[i] + 1, n - 1);
      weight[i] = h - fl;
    } else if (mode == "lower") {
      below[i] = above[i] = static_cast<int64_t>(fl);
      weight[i] = 0.0;
    } else if (mode == "higher") {
      below[i] = above[i] = static_cast<int64_t>(ce);
      weight[i] = 0.0;
    } else if (mode == "nearest") {
      below[i] = above[i] = static_cast<int64_t>(std::nearbyint(h));  // half to even
      weight[i] = 0.0;
    } else {  // midpoint
      below[i] = static_cast<int64_t>(fl);
      above[i] = static_cast<int64_t>(ce);
      weight[i] = fl == ce ? 0.0 : 0.5;
    }
  }
  std::vector<int64_t> ranks;
  for (size_t i = 0; i < q.size(); ++i) {
    ranks.push_back(below[i] + 1);
    ranks.push_back(above[i] + 1);
  }
  std::sort(ranks.begin(), ranks.end());
  ranks.erase(std::unique(ranks.begin(), ranks.end()), ranks.end());
  const at::Tensor values = order_statistics_host(xs, ranks, /*absolute=*/false);
  const double* v = values.data_ptr<double>();
  auto value_at = [&](int64_t index) {
    return v[std::lower_bound(ranks.begin(), ranks.end(), index + 1) - ranks.begin()];
  };
  at::Tensor result = at::empty({static_cast<int64_t>(q.size())}, f64());
  double* r = result.data_ptr<double>();
  for (size_t i = 0; i < q.size(); ++i) {
    const double a = value_at(below[i]);
    const double b = value_at(above[i]);
    r[i] = (mode == "linear" || mode == "midpoint") ? lerp(a, b, weight[i]) : a;
  }
  return on_device_of(result.to(out_dtype), xs);
}

// Pass 1 of the radix descent for merging across processes: the top-digit histogram of the
// keys (|x| or signed) and the counts (n_eff, n_zero, n_nan, n_inf).
template <c10::DeviceType D>
std::tuple<at::Tensor, at::Tensor> tail_histogram_op(at::TensorList xs, bool absolute) {
  const FloatFormat format = check_sample(xs, "xs", D);
  TORCH_CHECK_VALUE(total_numel(xs) > 0, "xs: expected a non-empty sample, got 0 elements");
  std::vector<StridedView> views;
  auto engine = make_engine(xs, format, absolute, views);
  const SampleCounts& c = engine->count();
  const std::vector<uint64_t>& h = engine->top_histogram();
  at::Tensor hist = at::empty({static_cast<int64_t>(h.size())}, i64());
  std::copy(h.begin(), h.end(), hist.data_ptr<int64_t>());
  at::Tensor counts = at::empty({4}, i64());
  write_counts(c, counts.data_ptr<int64_t>());
  return {on_device_of(hist, xs), on_device_of(counts, xs)};
}

// One later pass of the descent: digit histograms [len(bins), 2^width] of `level` inside the
// prefix bins of level - 1 and, with log sums (|x| only), the bucket sums of y = log|x| -
// log_ref of the other entries above the lowest bin.
template <c10::DeviceType D>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tail_level_pass_op(
    at::TensorList xs, bool absolute, int64_t level, at::IntArrayRef bins, bool with_log_sums) {
  const FloatFormat format = check_sample(xs, "xs", D);
  check_level_pass(key_layout(format, absolute), xs, absolute, level, bins, with_log_sums);
  std::vector<StridedView> views;
  auto engine = make_engine(xs, format, absolute, views);
  LevelPass pass;
  engine->level_pass(static_cast<int>(level), std::vector<int64_t>(bins.begin(), bins.end()),
                     with_log_sums, pass);
  const int64_t m = static_cast<int64_t>(bins.size());
  at::Tensor sub = at::empty({m, pass.digit_bins}, i64());
  std::copy(pass.sub_total.begin(), pass.sub_total.end(), sub.data_ptr<int64_t>());
  at::Tensor bucket_log = at::zeros({m + 1}, f64());
  at::Tensor bucket_log_sq = at::zeros({m + 1}, f64());
  if (with_log_sums) {
    std::copy(pass.bucket_log.begin(), pass.bucket_log.end(), bucket_log.data_ptr<double>());
    std::copy(pass.bucket_log_sq.begin(), pass.bucket_log_sq.end(),
              bucket_log_sq.data_ptr<double>());
  }
  return {on_device_of(sub, xs), on_device_of(bucket_log, xs), on_device_of(bucket_log_sq, xs),
          on_device_of(at::scalar_tensor(pass.log_ref, f64()), xs)};
}

}  // namespace

// The same glue serves both devices; the engine is chosen by the sample's device.
template <c10::DeviceType D>
void register_tail_ops(torch::Library& m) {
  m.impl("tail_histogram", &tail_histogram_op<D>);
  m.impl("tail_level_pass", &tail_level_pass_op<D>);
  m.impl("tail_stats", &tail_stats_op<D>);
  m.impl("tail_stats_per_tensor", &tail_stats_per_tensor_op<D>);
  m.impl("hill", &hill_op<D>);
  m.impl("order_statistics", &order_statistics_op<D>);
  m.impl("quantile", &quantile_op<D>);
}

TORCH_LIBRARY_IMPL(gradience, CPU, m) { register_tail_ops<kCPU>(m); }

#ifdef GRADIENCE_WITH_CUDA
TORCH_LIBRARY_IMPL(gradience, CUDA, m) { register_tail_ops<kCUDA>(m); }
#endif

}  // namespace gradience::tail
