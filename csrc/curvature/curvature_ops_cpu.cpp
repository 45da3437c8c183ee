// CPU glue of the curvature multi-tensor ops (schemas in csrc/registration.cpp, kernels in
// multi_tensor_cpu.cpp): argument checks naming the argument and the value, all before any
// work; contiguous views (a copy only for strided inputs, written back for in-place outputs);
// float64 kernel results cast to the accumulation dtype (float64 for float64 data, else
// float32), as the torch and Triton paths return.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "curvature/multi_tensor_kernels.h"

namespace gradience::curvature {
namespace {

Storage storage_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf: return Storage::kFloat16;
    case at::kBFloat16: return Storage::kBFloat16;
    case at::kFloat: return Storage::kFloat32;
    case at::kDouble: return Storage::kFloat64;
    default:
      TORCH_CHECK_TYPE(false, name, "[0]: expected a float dtype (float16, bfloat16, float32, "
                       "float64), got ", t.scalar_type());
  }
}

// A non-empty list of CPU float tensors of one dtype; batched: each [b, ...] with one b.
void check_list(at::TensorList xs, const char* name, bool batched) {
  TORCH_CHECK_VALUE(!xs.empty(), name, ": expected at least one tensor, got an empty list");
  storage_of(xs[0], name);
  for (size_t i = 0; i < xs.size(); ++i) {
    const at::Tensor& t = xs[i];
    TORCH_CHECK_VALUE(t.device().is_cpu(), name, "[", i, "]: expected a CPU tensor, got device ",
                      t.device());
    TORCH_CHECK_TYPE(t.scalar_type() == xs[0].scalar_type(), name, "[", i, "]: dtype ",
                     t.scalar_type(), " differs from ", name, "[0]'s ", xs[0].scalar_type());
    if (batched) {
      TORCH_CHECK_VALUE(t.dim() > 0, name, "[", i, "]: expected a batch [b, *shape], got a 0-d "
                        "tensor");
      TORCH_CHECK_VALUE(t.size(0) == xs[0].size(0), name, "[", i, "]: batch size ", t.size(0),
                        " differs from ", name, "[0]'s ", xs[0].size(0));
    }
  }
}

int64_t row_len(const at::Tensor& t, bool batched) {
  if (!batched) return t.numel();
  return t.size(0) == 0 ? 0 : t.numel() / t.size(0);
}

void check_pair(at::TensorList x, at::TensorList y, bool same_batch) {
  check_list(x, "x", true);
  check_list(y, "y", true);
  TORCH_CHECK_VALUE(x.size() == y.size(), "y: expected ", x.size(), " tensors (as x), got ",
                    y.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const bool same_rest = x[i].sizes().slice(1) == y[i].sizes().slice(1);
    TORCH_CHECK_VALUE(same_rest && (!same_batch || x[i].size(0) == y[i].size(0)), "y[", i,
                      "]: expected shape ", x[i].sizes(), " (as x[", i, "]), got ", y[i].sizes());
  }
}

struct BlockArgs {
  std::vector<int64_t> members, sizes;
};

BlockArgs check_blocks(at::IntArrayRef members, at::IntArrayRef sizes, int64_t n) {
  int64_t total = 0;
  for (size_t j = 0; j < sizes.size(); ++j) {
    TORCH_CHECK_VALUE(sizes[j] >= 0, "sizes[", j, "]: expected a block size >= 0, got ",
                      sizes[j]);
    total += sizes[j];
  }
  TORCH_CHECK_VALUE(!sizes.empty(), "sizes: expected at least one block, got none");
  TORCH_CHECK_VALUE(total == static_cast<int64_t>(members.size()), "sizes: block sizes ", sizes,
                    " do not add up to ", members.size(), " members");
  for (size_t i = 0; i < members.size(); ++i)
    TORCH_CHECK_VALUE(members[i] >= 0 && members[i] < n, "members[", i, "]: tensor index ",
                      members[i], " out of range for ", n, " tensors");
  return {members.vec(), sizes.vec()};
}

void check_probe_range(int64_t first, int64_t batch, int64_t offset, int64_t numel) {
  TORCH_CHECK_VALUE(first >= 0, "first: expected an int >= 0, got ", first);
  TORCH_CHECK_VALUE(offset >= 0, "offset: expected an int >= 0, got ", offset);
  TORCH_CHECK_VALUE(first <= INT64_MAX - batch, "first: probe indices first + batch exceed 2^63");
  // The Gaussian hash indexes 2 x entries: entry indices must stay below 2^62.
  TORCH_CHECK_VALUE(offset < (int64_t{1} << 62) - numel, "offset: entry indices offset + P = ",
                    offset, " + ", numel, " reach 2^62");
}

// Contiguous [rows, n] views of a list (copies kept alive in `hold`).
Batch view_of(at::TensorList xs, bool batched, std::vector<at::Tensor>& hold,
              std::vector<TensorRows>& rows, const char* name) {
  hold.clear();
  rows.clear();
  for (const at::Tensor& t : xs) {
    hold.push_back(t.contiguous());
    rows.push_back({hold.back().data_ptr(), row_len(t, batched)});
  }
  const int64_t b = batched ? xs[0].size(0) : 1;
  return {rows.data(), static_cast<int64_t>(rows.size()), b, storage_of(xs[0], name)};
}

// Writes contiguous working copies back into strided in-place arguments.
void write_back(at::TensorList xs, const std::vector<at::Tensor>& work) {
  for (size_t i = 0; i < xs.size(); ++i)
    if (!work[i].is_same(xs[i])) const_cast<at::Tensor&>(xs[i]).copy_(work[i]);
}

at::ScalarType acc_of(at::ScalarType a, at::ScalarType b) {
  return (a == at::kDouble || b == at::kDouble) ? at::kDouble : at::kFloat;
}

int64_t total_numel(at::TensorList xs, bool batched) {
  int64_t n = 0;
  for (const at::Tensor& t : xs) n += row_len(t, batched);
  return n;
}

// ------------------------------------------------------------------ ops
void fill_probes_op(at::TensorList probes, int64_t seed, int64_t first, bool gaussian,
                    int64_t offset) {
  check_list(probes, "probes", true);
  const int64_t b = probes[0].size(0), numel = total_numel(probes, true);
  check_probe_range(first, b, offset, numel);
  if (b == 0 || numel == 0) return;
  std::vector<at::Tensor> hold;
  std::vector<TensorRows> rows;
  const Batch out = view_of(probes, true, hold, rows, "probes");
  fill_probes(out, static_cast<uint32_t>(seed), first, gaussian, offset);
  write_back(probes, hold);
}

at::Tensor probe_dots_op(at::TensorList y, at::IntArrayRef members, at::IntArrayRef sizes,
                         int64_t seed, int64_t first, bool gaussian, int64_t offset) {
  check_list(y, "y", true);
  BlockArgs blocks = check_blocks(members, sizes, static_cast<int64_t>(y.size()));
  const int64_t b = y[0].size(0), numel = total_numel(y, true);
  check_probe_range(first, b, offset, numel);
  const auto acc = acc_of(y[0].scalar_type(), y[0].scalar_type());
  at::Tensor out = at::zeros({static_cast<int64_t>(sizes.size()), b}, at::kDouble);
  if (b > 0 && numel > 0) {
    std::vector<at::Tensor> hold;
    std::vector<TensorRows> rows;
    const Batch yb = view_of(y, true, hold, rows, "y");
    probe_dots(yb, {blocks.members.data(), blocks.sizes.data(), out.size(0)},
               static_cast<uint32_t>(seed), first, gaussian, offset, out.data_ptr<double>());
  }
  return out.to(acc);
}

// The glue of block_dots and block_gram: checks, contiguous views, kernel(x, y, blocks, out)
// into a float64 [n_blocks, *shape] result (zeros when x or y has no rows or no entries),
// cast to the accumulation dtype.
template <typename Kernel>
at::Tensor block_pair_op(at::TensorList x, at::TensorList y, at::IntArrayRef members,
                         at::IntArrayRef sizes, bool same_batch, std::vector<int64_t> shape,
                         Kernel kernel) {
  check_pair(x, y, same_batch);
  BlockArgs blocks = check_blocks(members, sizes, static_cast<int64_t>(x.size()));
  const auto acc = acc_of(x[0].scalar_type(), y[0].scalar_type());
  const int64_t n_blocks = static_cast<int64_t>(sizes.size());
  shape.insert(shape.begin(), n_blocks);
  at::Tensor out = at::zeros(shape, at::kDouble);
  if (x[0].size(0) > 0 && y[0].size(0) > 0 && total_numel(x, true) > 0) {
    std::vector<at::Tensor> hx, hy;
    std::vector<TensorRows> rx, ry;
    const Batch xb = view_of(x, true, hx, rx, "x");
    const Batch yb = view_of(y, true, hy, ry, "y");
    kernel(xb, yb, Blocks{blocks.members.data(), blocks.sizes.data(), n_blocks},
           out.data_ptr<double>());
  }
  return out.to(acc);
}

at::Tensor block_dots_op(at::TensorList x, at::TensorList y, at::IntArrayRef members,
                         at::IntArrayRef sizes) {
  return block_pair_op(x, y, members, sizes, true, {x.empty() ? 0 : x[0].size(0)},
                       [](const Batch& xb, const Batch& yb, const Blocks& bl, double* out) {
                         block_dots(xb, yb, bl, out);
                       });
}

at::Tensor block_gram_op(at::TensorList x, at::TensorList y, at::IntArrayRef members,
                         at::IntArrayRef sizes) {
  return block_pair_op(
      x, y, members, sizes, false,
      {x.empty() ? 0 : x[0].size(0), y.empty() ? 0 : y[0].size(0)},
      [](const Batch& xb, const Batch& yb, const Blocks& bl, double* out) {
        block_gram(xb, yb, bl, out);
      });
}

// w a vector list, basis a batch of rows of the same shapes, count <= the basis' rows.
void check_vector_and_basis(at::TensorList w, at::TensorList basis, int64_t count) {
  check_list(w, "w", false);
  check_list(basis, "basis", true);
  TORCH_CHECK_VALUE(count >= 0, "count: expected an int >= 0, got ", count);
  TORCH_CHECK_VALUE(count <= basis[0].size(0), "count: ", count, " exceeds the basis' m_max = ",
                    basis[0].size(0), " rows");
  TORCH_CHECK_VALUE(basis.size() == w.size(), "basis: expected ", w.size(),
                    " tensors (one per tensor of w), got ", basis.size());
  for (size_t i = 0; i < w.size(); ++i)
    TORCH_CHECK_VALUE(basis[i].sizes().slice(1) == w[i].sizes(), "basis[", i,
                      "]: expected shape [m_max, ", w[i].sizes(), "] (as w[", i, "]), got ",
                      basis[i].sizes());
}

at::Tensor orthogonalize_op(at::TensorList w, at::TensorList basis, int64_t count,
                            int64_t passes) {
  check_vector_and_basis(w, basis, count);
  TORCH_CHECK_VALUE(passes >= 1, "passes: expected an int >= 1, got ", passes);
  const auto acc = acc_of(w[0].scalar_type(), w[0].scalar_type());
  at::Tensor total = at::zeros({count}, at::kDouble);
  if (count > 0 && total_numel(w, false) > 0) {
    std::vector<at::Tensor> hw, hq;
    std::vector<TensorRows> rw, rq;
    const Batch wb = view_of(w, false, hw, rw, "w");
    const Batch qb = view_of(basis, true, hq, rq, "basis");
    orthogonalize(wb, qb, count, passes, total.data_ptr<double>());
    write_back(w, hw);
  }
  return total.to(acc);
}

std::tuple<at::Tensor, at::Tensor> reorthogonalize_op(at::TensorList w, at::TensorList basis,
                                                      int64_t count, int64_t lo, double ratio,
                                                      int64_t out_row, double min_norm) {
  check_vector_and_basis(w, basis, count);
  const int64_t m_max = basis[0].size(0);
  TORCH_CHECK_VALUE(lo >= 0 && lo <= count, "lo: expected 0 <= lo <= count = ", count, ", got ",
                    lo);
  TORCH_CHECK_VALUE(ratio >= 0.0 && ratio <= 1.0, "ratio: expected a value in [0, 1], got ",
                    ratio);
  TORCH_CHECK_VALUE(out_row == -1 || (out_row >= count && out_row < m_max),
                    "out_row: expected -1 or a row in [count, m_max) = [", count, ", ", m_max,
                    "), got ", out_row);
  TORCH_CHECK_VALUE(min_norm >= 0.0, "min_norm: expected a value >= 0, got ", min_norm);
  at::Tensor total = at::zeros({count}, at::kDouble);
  at::Tensor norm2 = at::zeros({}, at::kDouble);
  if (total_numel(w, false) > 0) {
    std::vector<at::Tensor> hw, hq;
    std::vector<TensorRows> rw, rq;
    const Batch wb = view_of(w, false, hw, rw, "w");
    const Batch qb = view_of(basis, true, hq, rq, "basis");
    reorthogonalize(wb, qb, count, lo, ratio, out_row, min_norm, total.data_ptr<double>(),
                    norm2.data_ptr<double>());
    write_back(w, hw);
    if (out_row >= 0) write_back(basis, hq);
  }
  return {total, norm2};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradience, CPU, m) {
  m.impl("reorthogonalize", &reorthogonalize_op);
  m.impl("fill_probes", &fill_probes_op);
  m.impl("probe_dots", &probe_dots_op);
  m.impl("block_dots", &block_dots_op);
  m.impl("block_gram", &block_gram_op);
  m.impl("orthogonalize", &orthogonalize_op);
}

}  // namespace gradience::curvature
