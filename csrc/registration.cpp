// Every schema of the gradience op library, in one place. Kernels are registered per dispatch
// key beside their glue (csrc/<area>/*_ops*.cpp); fake kernels from Python beside the wrappers.
#include <torch/library.h>

TORCH_LIBRARY(gradience, m) {
  // Tail order statistics of |x| over one sample (a list of tensors read as one set of values).
  // rows: float64 [len(ks) + len(k_ratios), 7] = (k, X(k+1), X(k), S1, S2, H1, H2), with
  //   S1 = sum_{i<=k} log X(i), S2 = sum_{i<=k} log^2 X(i), H1 = sum_{i<=k} log(X(i)/X(k+1)),
  //   H2 = sum_{i<=k} log^2(X(i)/X(k+1)); k_ratios give k = floor(k_ratio * n_eff).
  // counts: int64 [4] = (n_eff, n_zero, n_nan, n_inf).
  m.def("tail_stats(Tensor[] xs, int[] ks, float[] k_ratios) -> (Tensor rows, Tensor counts)");
  // The same for each tensor of xs separately: rows [len(xs), K, 7], counts [len(xs), 4].
  m.def(
      "tail_stats_per_tensor(Tensor[] xs, int[] ks, float[] k_ratios) -> "
      "(Tensor rows, Tensor counts)");
  // Hill tail index alpha = k / sum_{i<=k} log(X(i)/X(k+1)) of |x|, float64 0-dim.
  m.def("hill(Tensor x, int k) -> Tensor");
  // Order statistics, float64 [len(ranks)]: absolute=True, the rank-th largest finite nonzero
  // |x|; absolute=False, the rank-th smallest x (NaN everywhere if x holds a NaN).
  m.def("order_statistics(Tensor[] xs, int[] ranks, bool absolute) -> Tensor");
  // numpy.quantile / torch.quantile of the sample for each q, in the input dtype.
  m.def("quantile(Tensor[] xs, float[] q, str interpolation) -> Tensor");
  // The radix descent's passes, for exact results across processes (their histograms and sums
  // add, so torch.distributed.all_reduce merges them): pass 1, the top-digit histogram of the
  // keys (|x| if absolute, else signed) [2^16, or 2^15 for |x| of 16-bit floats] and the counts
  // (n_eff, n_zero, n_nan, n_inf); a later pass at `level` over ascending prefix `bins` of level
  // - 1: digit histograms [len(bins), 2^digit_width] and, with log sums, the bucket sums of
  // y = log|x| - log_ref [len(bins) + 1] over the other entries above bins[0] (bucket j between
  // bins[j-1] and bins[j], bucket len(bins) above all), and log_ref (0-dim).
  m.def("tail_histogram(Tensor[] xs, bool absolute) -> (Tensor hist, Tensor counts)");
  m.def(
      "tail_level_pass(Tensor[] xs, bool absolute, int level, int[] bins, bool with_log_sums) "
      "-> (Tensor sub_hist, Tensor bucket_log, Tensor bucket_log_sq, Tensor log_ref)");
  // Bootstrap statistics of the double-bootstrap choice of k, float64 [n_resamples, 2, len(ks)]:
  // for resamples of size m drawn with replacement from the values whose sorted logs are `logs`
  // (descending), the Hill statistic (M2 - 2 M1^2)^2 and the moment statistic (xi2 - xi3)^2 at
  // each k (see csrc/tail/bootstrap_kernels.h). Resample b uses stream (seed, first_resample + b).
  m.def(
      "bootstrap_tail_statistics(Tensor logs, int m, int[] ks, int n_resamples, int seed, "
      "int first_resample) -> Tensor");
  // Continuous power-law fit of each layer's values (Clauset-Shalizi-Newman 2009, powerlaw's
  // conventions; see csrc/spectral/power_law_kernels.h): for every candidate xmin (the distinct
  // values but the largest two) the MLE alpha and the KS distance D, the fit at minimal D among
  // candidates with alpha_range[0] < alpha < alpha_range[1] (every one if alpha_range is []).
  // fits: float64 [len(xs), 4] = (xmin, alpha, D, sigma); counts: int64 [len(xs), 7] =
  // (n_candidates, best, n_tail, n_used, n_dropped, n_above_xmax, n_eligible); curves: float64
  // [3, N] rows (xmin, alpha, D) and n_tails: int64 [N], N = sum of numel, layer l's candidates
  // from column sum_{j<l} numel(xs[j]) on. xmax_alpha: 'mle' | 'powerlaw'; d_mode: 'pruned' |
  // 'exhaustive' (the same D).
  m.def(
      "fit_power_law(Tensor[] xs, float? xmax, str xmax_alpha, float[] alpha_range, "
      "bool drop_nonpositive, str d_mode) -> (Tensor fits, Tensor counts, Tensor curves, "
      "Tensor n_tails)");
  // Curvature estimators' multi-tensor steps over lists of parameter-shaped tensors (CPU; the
  // same ops in Triton are gradience_triton::*, gradience_kernels/curvature_kernels.py). A batch
  // is a list of [b, *shape_t] tensors; entries are numbered across the list from `offset`;
  // blocks are consecutive runs of `sizes` entries of `members` (tensor indices). Results in
  // float64 for float64 inputs, else float32 (accumulated in float64).
  // Probes first .. first+b-1 of stream `seed` written into `probes` (Rademacher, or Gaussian).
  m.def("fill_probes(Tensor(a!)[] probes, int seed, int first, bool gaussian, int offset) -> ()");
  // D[j, r] = sum over block j's tensors of <z_r, y_t[r]>, z_r = probe first + r (regenerated).
  m.def(
      "probe_dots(Tensor[] y, int[] members, int[] sizes, int seed, int first, bool gaussian, "
      "int offset) -> Tensor");
  // D[j, r] = sum over block j's tensors of <x_t[r], y_t[r]>: [n_blocks, b].
  m.def("block_dots(Tensor[] x, Tensor[] y, int[] members, int[] sizes) -> Tensor");
  // G[j] = sum over block j's tensors of x_t y_t^T: [n_blocks, a, c] (x [a, ...], y [c, ...]).
  m.def("block_gram(Tensor[] x, Tensor[] y, int[] members, int[] sizes) -> Tensor");
  // w <- (I - Q Q^T)^passes w in place (classical Gram-Schmidt), Q = rows 0..count-1 of the
  // basis ([m_max, *shape_t] per tensor, any float dtype); returns Q^T w summed over passes.
  m.def("orthogonalize(Tensor(a!)[] w, Tensor[] basis, int count, int passes) -> Tensor");
  // The reorthogonalization of one Lanczos product w in place: a pass against rows lo..count-1
  // (the three-term recurrence's), a full pass against rows 0..count-1, a second full pass
  // when the first removed more than 1 - ratio of the norm (Kahan); then, when out_row >= 0
  // and ||w|| > min_norm, basis row out_row = w / ||w||. Returns (coefficients Q^T w summed
  // over the passes, float64 [count]; ||w||^2 after, float64 0-d).
  m.def(
      "reorthogonalize(Tensor(a!)[] w, Tensor(b!)[] basis, int count, int lo, float ratio, "
      "int out_row, float min_norm) -> (Tensor, Tensor)");
}
