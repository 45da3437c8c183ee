// Torch-free interface of the CPU kernels of the curvature estimators' multi-tensor steps (the
// C++ backend of gradience_kernels/curvature_kernels.py; Triton runs them on CUDA).
//
// A "batch" is a list of tensors, tensor t a contiguous [rows, n_t] matrix (a parameter-shaped
// [rows, *shape] batch flattened per row); a "vector" is the same with one row. Entries of a
// batch are numbered across the list in order from `offset` (the global probe index).
//
// Work is split into items of whole entry ranges of one tensor (all rows together), fixed by
// the sizes alone; every reduction writes one partial per item and adds them in item order, so
// results are bitwise reproducible whatever the thread count. Reductions accumulate in float64.
// Extra memory: O(items x rows), items <= kMaxItems.
#pragma once
#include <cstdint>

namespace gradience::curvature {

enum class Storage : int32_t { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

struct TensorRows {
  void* data;      // [rows, n], row r at element r * n
  int64_t n;       // entries per row
};

struct Batch {
  const TensorRows* tensors;  // [n_tensors]
  int64_t n_tensors;
  int64_t rows;
  Storage type;               // one dtype for the whole list
};

// out[block][r] = sum over members of block of per-tensor values, given per-tensor [T][rows]:
// blocks are consecutive runs of block_sizes[j] entries of members.
struct Blocks {
  const int64_t* members;
  const int64_t* sizes;
  int64_t n_blocks;
};

// Probes first .. first+rows-1 of stream `seed` into every tensor of `out` (Rademacher +-1,
// or Box-Muller Gaussian in float64 rounded to the storage type through float32 as torch does).
void fill_probes(const Batch& out, uint32_t seed, int64_t first, bool gaussian, int64_t offset);

// D[j][r] = sum over block j's tensors of <z_r, y_t[r]>, z_r = probe first + r, regenerated
// on the fly (never stored). out: float64 [n_blocks][rows].
void probe_dots(const Batch& y, const Blocks& blocks, uint32_t seed, int64_t first,
                bool gaussian, int64_t offset, double* out);

// D[j][r] = sum over block j's tensors of <x_t[r], y_t[r]>. out: float64 [n_blocks][rows].
void block_dots(const Batch& x, const Batch& y, const Blocks& blocks, double* out);

// G[j][a][c] = sum over block j's tensors of <x_t[a], y_t[c]> for x of A rows and y of C rows
// (same per-tensor sizes). out: float64 [n_blocks][A][C]. Within a piece of 2048 entries the
// sums run in float32 unless x or y is float64 (as BLAS sgemm); pieces add in float64.
void block_gram(const Batch& x, const Batch& y, const Blocks& blocks, double* out);

// w <- (I - Q Q^T)^passes w in place (classical Gram-Schmidt), Q = rows 0..count-1 of the basis
// (basis tensor t is [m_max, n_t]); each update pass computes the next pass's dots on the chunk
// it has just written (one read of Q per pass, plus one for the first dots). total: float64
// [count], the coefficients summed over the passes. Arithmetic of the update in float64 when w
// or the basis is float64, else float32 (as BLAS on the torch path); so are the dots within a
// chunk of at most 32768 entries, whose partials are then added in float64.
void orthogonalize(const Batch& w, const Batch& basis, int64_t count, int64_t passes,
                   double* total);

// One Lanczos product's reorthogonalization in place: CGS against rows lo..count-1, then against
// rows 0..count-1, again when that pass left ||w||^2 < ratio^2 (||w||^2 + ||c||^2) (Kahan's
// test), the local update fused with the full pass's dots and each full update with the norm;
// then, when out_row >= 0 and ||w|| > min_norm, basis row out_row = w / ||w|| (the basis is
// written there only). total: float64 [count], the coefficients summed over the passes;
// norm2: ||w||^2 after.
void reorthogonalize(const Batch& w, const Batch& basis, int64_t count, int64_t lo,
                     double ratio, int64_t out_row, double min_norm, double* total,
                     double* norm2);

}  // namespace gradience::curvature
