// CPU kernels of the curvature estimators' multi-tensor steps (see multi_tensor_kernels.h).
// Memory-bound loops over parameter-sized data: probes are generated in L1-sized tiles and
// consumed there (dots never write them out); orthogonalization walks the vector in chunks whose
// basis rows stay in L2 between a pass's update and the next pass's dots.
#include "curvature/multi_tensor_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/half_float.h"
#include "common/parallel.h"
#include "curvature/probe_hash.h"
#include "curvature/probe_simd.h"
#include "tail/simd_scan.h"

namespace gradience::curvature {
namespace {

constexpr int64_t kTile = 256;          // probe entries generated at a time (L1)
constexpr int64_t kProbeChunk = 16384;  // entries per work item of the probe/dot kernels
// Entries per item of orthogonalize: row segments as long as possible for the hardware
// prefetcher, but short enough that a pass's update and the next pass's dots find the item's
// count basis rows in L2 (kOrthoCache bytes); the chunk depends on count and the sizes only.
constexpr int64_t kOrthoChunk = 32768;
constexpr int64_t kOrthoMinChunk = 1024;
constexpr int64_t kOrthoCache = 256 * 1024;
constexpr int64_t kMaxItems = 8192;     // bounds the partial sums: chunks grow beyond this

// ------------------------------------------------------------------ storage types
template <Storage S> struct Elem;
template <> struct Elem<Storage::kFloat16> { using T = uint16_t; };
template <> struct Elem<Storage::kBFloat16> { using T = uint16_t; };
template <> struct Elem<Storage::kFloat32> { using T = float; };
template <> struct Elem<Storage::kFloat64> { using T = double; };

// The compiler's _Float16 with F16C conversions (vcvtph2ps / vcvtps2ph, vectorized by GCC);
// otherwise the bit-level forms of half_float.h.
#if defined(__F16C__) && defined(__FLT16_MAX__)
#define GRADIENCE_F16C_FLOAT16 1
#else
#define GRADIENCE_F16C_FLOAT16 0
#endif

template <Storage S>
inline auto load(const typename Elem<S>::T* p, int64_t i) {
#if GRADIENCE_F16C_FLOAT16
  // Through the compiler's _Float16, which vectorizes to vcvtph2ps (exact, as the bit-level
  // form): the bit-level form's branches kept GCC 12 from vectorizing float16 loops without
  // AVX-512, and they ran 3.5-8x float32's time on an AVX2 machine.
  if constexpr (S == Storage::kFloat16) {
    _Float16 h;
    std::memcpy(&h, p + i, sizeof h);
    return static_cast<float>(h);
  }
#else
  if constexpr (S == Storage::kFloat16) return float16_to_float(p[i]);
#endif
  else if constexpr (S == Storage::kBFloat16) return bfloat16_to_float(p[i]);
  else return p[i];
}

// Stores a value as torch casts it: float64 -> float32 -> 16-bit (c10 converts from float).
template <Storage S, typename V>
inline void store(typename Elem<S>::T* p, int64_t i, V v) {
  if constexpr (S == Storage::kFloat64) p[i] = static_cast<double>(v);
  else if constexpr (S == Storage::kFloat32) p[i] = static_cast<float>(v);
  else if constexpr (S == Storage::kBFloat16) p[i] = float_to_bfloat16(static_cast<float>(v));
#if GRADIENCE_F16C_FLOAT16
  else {  // vcvtps2ph, round to nearest even as torch's vectorized casts (NaN stays NaN)
    const _Float16 h = static_cast<_Float16>(static_cast<float>(v));
    std::memcpy(p + i, &h, sizeof h);
  }
#else
  else p[i] = float_to_float16(static_cast<float>(v));
#endif
}

// Calls f.template operator()<S>() for the runtime storage type.
template <typename F>
void dispatch(Storage s, F&& f) {
  switch (s) {
    case Storage::kFloat16: f.template operator()<Storage::kFloat16>(); break;
    case Storage::kBFloat16: f.template operator()<Storage::kBFloat16>(); break;
    case Storage::kFloat32: f.template operator()<Storage::kFloat32>(); break;
    case Storage::kFloat64: f.template operator()<Storage::kFloat64>(); break;
  }
}

// ------------------------------------------------------------------ work items
struct Item {
  int64_t tensor, start, stop;
};

std::vector<Item> make_items(const TensorRows* ts, int64_t n_tensors, int64_t chunk) {
  int64_t total = 0;
  for (int64_t t = 0; t < n_tensors; ++t) total += ts[t].n;
  chunk = std::max(chunk, (total + kMaxItems - 1) / kMaxItems);
  std::vector<Item> items;
  for (int64_t t = 0; t < n_tensors; ++t)
    for (int64_t s = 0; s < ts[t].n; s += chunk) items.push_back({t, s, std::min(ts[t].n, s + chunk)});
  return items;
}

// Runs body(first_item, end_item) on contiguous item ranges of about equal entry counts, one
// per thread: items of different tensors differ in length (a split by item count left one of
// two threads 20% more entries on the MLP's tensors). Results stay independent of the thread
// count: every item writes its own partial.
template <typename Body>
void parallel_items(const std::vector<Item>& items, Body&& body) {
  const int64_t n = static_cast<int64_t>(items.size());
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(max_threads(), n));
  int64_t total = 0;
  for (const Item& it : items) total += it.stop - it.start;
  std::vector<int64_t> bounds(parts + 1, n);
  bounds[0] = 0;
  int64_t k = 0, seen = 0;
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t target = total * p / parts;  // entries before part p
    // An item goes to the part that holds its middle entry.
    while (k < n && seen + (items[k].stop - items[k].start) / 2 < target) {
      seen += items[k].stop - items[k].start;
      ++k;
    }
    bounds[p] = std::max(k, bounds[p - 1]);
  }
  parallel_blocks(parts, [&](int64_t lo, int64_t hi, int) {
    for (int64_t p = lo; p < hi; ++p) body(bounds[p], bounds[p + 1]);
  });
}

std::vector<int64_t> entry_offsets(const Batch& b, int64_t offset) {
  std::vector<int64_t> out(b.n_tensors);
  for (int64_t t = 0; t < b.n_tensors; ++t) {
    out[t] = offset;
    offset += b.tensors[t].n;
  }
  return out;
}

// Dot product in float64 over kLanes independent accumulators (4 AVX2 registers: enough
// independent FMA chains to stream at memory speed; 8 lanes measured 1.3x slower than BLAS),
// summed in a fixed tree: deterministic and vectorized.
constexpr int kLanes = 16;

template <typename A, typename B>
inline double dot_lanes(const A& a, const B& b, int64_t n) {
  double acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j)
      acc[j] += static_cast<double>(a(i + j)) * static_cast<double>(b(i + j));
  double tail = 0;
  for (; i < n; ++i) tail += static_cast<double>(a(i)) * static_cast<double>(b(i));
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) acc[j] += acc[j + width];
  return acc[0] + tail;
}

// Per-item partials [items][rows] -> per-tensor sums [T][rows] in item order -> blocks.
void reduce_to_blocks(const std::vector<Item>& items, const std::vector<double>& partial,
                      int64_t n_tensors, int64_t rows, const Blocks& blocks, double* out) {
  std::vector<double> per(static_cast<size_t>(n_tensors * rows), 0.0);
  for (size_t k = 0; k < items.size(); ++k)
    for (int64_t r = 0; r < rows; ++r) per[items[k].tensor * rows + r] += partial[k * rows + r];
  int64_t m = 0;
  for (int64_t j = 0; j < blocks.n_blocks; ++j) {
    for (int64_t r = 0; r < rows; ++r) out[j * rows + r] = 0.0;
    for (int64_t e = 0; e < blocks.sizes[j]; ++e, ++m)
      for (int64_t r = 0; r < rows; ++r) out[j * rows + r] += per[blocks.members[m] * rows + r];
  }
}

// ------------------------------------------------------------------ probe tiles
// Hashes of entries e0 .. e0+n-1 of one key into h, split where the high word of the entry
// index changes (entry_hashes takes one high word).
void hash_range(uint32_t key, uint64_t e0, int64_t n, uint32_t* h) {
  int64_t done = 0;
  while (done < n) {
    const uint64_t e = e0 + static_cast<uint64_t>(done);
    const uint64_t room = (uint64_t{1} << 32) - (e & 0xFFFFFFFFull);
    const int64_t len = static_cast<int64_t>(std::min<uint64_t>(room, static_cast<uint64_t>(n - done)));
    entry_hashes(key, static_cast<uint32_t>(e >> 32), static_cast<uint32_t>(e), len, h + done);
    done += len;
  }
}

// Probe values of entries e0 .. e0+n-1 (n <= kTile) of one key: float +-1 or float64 normal.
void rademacher_tile(uint32_t key, uint64_t e0, int64_t n, float* z) {
  uint32_t h[kTile];
  hash_range(key, e0, n, h);
  for (int64_t i = 0; i < n; ++i) z[i] = rademacher_of(h[i]);
}

// Box-Muller (Box & Muller 1958) on pairs: entries 2k and 2k+1 are r cos(2 pi u2) and
// r sin(2 pi u2), r = sqrt(-2 log u1), u1 and u2 = (h + 1/2) 2^-32 in (0, 1) of the hashes of
// 2k and 2k+1 (log u finite): two normals per log, sqrt and pair of hashes, where using only
// the cosine made one. The steps are separate loops that each vectorize under AVX2 (the log
// and cos/sin through their 4-lane forms): one fused loop vectorized only under AVX-512 and
// ran scalar, ~26 ns/entry, on a 2-core Zen machine. A tile that starts at an odd entry
// computes the pair of its first entry in full (one extra pair per tile).
void gaussian_tile(uint32_t key, uint64_t e0, int64_t n, double* z) {
  constexpr int64_t kPairs = kTile / 2 + 1;  // a tile starting at an odd entry spans one more
  uint32_t h[2 * kPairs];
  double u1[kPairs], u2[kPairs], c[kPairs], s[kPairs], both[2 * kPairs];
  const uint64_t k0 = e0 >> 1;
  const int64_t first = static_cast<int64_t>(e0 & 1);  // entry e0 is the sine of pair k0
  const int64_t pairs = (first + n + 1) / 2;
  hash_range(key, 2 * k0, 2 * pairs, h);
  for (int64_t i = 0; i < pairs; ++i) {
    u1[i] = unit_of(h[2 * i]);
    u2[i] = unit_of(h[2 * i + 1]);
  }
  tail::simd::log_minus(u1, u1, pairs, 0.0);  // u >= 2^-33: normal, the subnormal path idle
  simd::cos_sin_two_pi_n(u2, c, s, pairs);
  for (int64_t i = 0; i < pairs; ++i) {
    const double r = std::sqrt(-2.0 * u1[i]);
    both[2 * i] = r * c[i];
    both[2 * i + 1] = r * s[i];
  }
  std::copy(both + first, both + first + n, z);
}

// Calls use(z, n) on each tile of probe values of entries [start, stop) of one row: z points to
// float +-1 (Rademacher) or float64 normals (Gaussian).
template <typename Use>
void for_each_probe_tile(uint32_t key, int64_t entry0, int64_t start, int64_t stop,
                         bool gaussian, Use&& use) {
  float zf[kTile];
  double zd[kTile];
  for (int64_t s = start; s < stop; s += kTile) {
    const int64_t n = std::min(kTile, stop - s);
    const uint64_t e0 = static_cast<uint64_t>(entry0 + s);
    if (gaussian) {
      gaussian_tile(key, e0, n, zd);
      use(s, zd, n);
    } else {
      rademacher_tile(key, e0, n, zf);
      use(s, zf, n);
    }
  }
}

}  // namespace

// ------------------------------------------------------------------ fill_probes
void fill_probes(const Batch& out, uint32_t seed, int64_t first, bool gaussian, int64_t offset) {
  const auto items = make_items(out.tensors, out.n_tensors, kProbeChunk);
  const auto offsets = entry_offsets(out, offset);
  std::vector<uint32_t> keys(out.rows);
  for (int64_t r = 0; r < out.rows; ++r) keys[r] = probe_key(seed, static_cast<uint64_t>(first + r));
  dispatch(out.type, [&]<Storage S>() {
    using T = typename Elem<S>::T;
    parallel_items(items, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        const Item& it = items[k];
        const TensorRows& t = out.tensors[it.tensor];
        for (int64_t r = 0; r < out.rows; ++r) {
          T* row = static_cast<T*>(t.data) + r * t.n;
          for_each_probe_tile(keys[r], offsets[it.tensor], it.start, it.stop, gaussian,
                              [&](int64_t s, const auto* z, int64_t n) {
                                for (int64_t i = 0; i < n; ++i) store<S>(row, s + i, z[i]);
                              });
        }
      }
    });
  });
}

// ------------------------------------------------------------------ probe_dots / block_dots
void probe_dots(const Batch& y, const Blocks& blocks, uint32_t seed, int64_t first,
                bool gaussian, int64_t offset, double* out) {
  const auto items = make_items(y.tensors, y.n_tensors, kProbeChunk);
  const auto offsets = entry_offsets(y, offset);
  const int64_t rows = y.rows;
  std::vector<uint32_t> keys(rows);
  for (int64_t r = 0; r < rows; ++r) keys[r] = probe_key(seed, static_cast<uint64_t>(first + r));
  std::vector<double> partial(items.size() * rows, 0.0);
  dispatch(y.type, [&]<Storage S>() {
    using T = typename Elem<S>::T;
    parallel_items(items, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        const Item& it = items[k];
        const TensorRows& t = y.tensors[it.tensor];
        for (int64_t r = 0; r < rows; ++r) {
          const T* row = static_cast<const T*>(t.data) + r * t.n;
          double sum = 0;
          for_each_probe_tile(keys[r], offsets[it.tensor], it.start, it.stop, gaussian,
                              [&](int64_t s, const auto* z, int64_t n) {
                                sum += dot_lanes([&](int64_t i) { return z[i]; },
                                            [&](int64_t i) { return load<S>(row, s + i); }, n);
                              });
          partial[k * rows + r] = sum;
        }
      }
    });
  });
  reduce_to_blocks(items, partial, y.n_tensors, rows, blocks, out);
}

void block_dots(const Batch& x, const Batch& y, const Blocks& blocks, double* out) {
  const auto items = make_items(x.tensors, x.n_tensors, kProbeChunk);
  const int64_t rows = x.rows;
  std::vector<double> partial(items.size() * rows, 0.0);
  dispatch(x.type, [&]<Storage SX>() {
    dispatch(y.type, [&]<Storage SY>() {
      using TX = typename Elem<SX>::T;
      using TY = typename Elem<SY>::T;
      parallel_items(items, [&](int64_t lo, int64_t hi) {
        for (int64_t k = lo; k < hi; ++k) {
          const Item& it = items[k];
          const int64_t n = x.tensors[it.tensor].n;
          for (int64_t r = 0; r < rows; ++r) {
            const TX* a = static_cast<const TX*>(x.tensors[it.tensor].data) + r * n + it.start;
            const TY* b = static_cast<const TY*>(y.tensors[it.tensor].data) + r * n + it.start;
            partial[k * rows + r] = dot_lanes([&](int64_t i) { return load<SX>(a, i); },
                                         [&](int64_t i) { return load<SY>(b, i); },
                                         it.stop - it.start);
          }
        }
      });
    });
  });
  reduce_to_blocks(items, partial, x.n_tensors, rows, blocks, out);
}

// ------------------------------------------------------------------ block_gram
namespace {

constexpr int64_t kGramChunk = 16384;  // entries per work item
constexpr int64_t kGramPiece = 2048;   // entries per sweep: 4 + 4 row pieces of 8 KB in L2
constexpr int kGramLanes = 8;

// g[ia * C + ic] += <x_ia, y_ic> over len entries for X rows a0..a0+3 and Y rows c0..c0+CT-1
// (CT = 4 or 2; rows `stride` apart), Acc lanes (float32 unless an operand is float64, as BLAS
// sgemm). A 4 x 4 tile: 16 accumulator vectors and 8 loads per 8 entries (2 FMAs per load;
// 4 x 2 measured 1.13x slower than sgemm at 32 x 16 rows, compute-bound); the accumulators are
// spelled out so that the compiler keeps them in registers.
template <Storage SX, Storage SY, typename Acc, int CT>
void gram_tile(const typename Elem<SX>::T* x, const typename Elem<SY>::T* y, int64_t stride,
               int64_t len, int64_t C, double* g) {
  static_assert(CT == 2 || CT == 4);
  const typename Elem<SX>::T* xs[4] = {x, x + stride, x + 2 * stride, x + 3 * stride};
  const typename Elem<SY>::T* ys[4] = {y, y + stride, y + (CT > 2 ? 2 : 0) * stride,
                                       y + (CT > 2 ? 3 : 1) * stride};
  Acc a00[kGramLanes] = {}, a01[kGramLanes] = {}, a02[kGramLanes] = {}, a03[kGramLanes] = {},
      a10[kGramLanes] = {}, a11[kGramLanes] = {}, a12[kGramLanes] = {}, a13[kGramLanes] = {},
      a20[kGramLanes] = {}, a21[kGramLanes] = {}, a22[kGramLanes] = {}, a23[kGramLanes] = {},
      a30[kGramLanes] = {}, a31[kGramLanes] = {}, a32[kGramLanes] = {}, a33[kGramLanes] = {};
  const int64_t body = len - len % kGramLanes;
  for (int64_t i = 0; i < body; i += kGramLanes)
    for (int j = 0; j < kGramLanes; ++j) {
      const Acc u0 = static_cast<Acc>(load<SX>(xs[0], i + j)),
                u1 = static_cast<Acc>(load<SX>(xs[1], i + j)),
                u2 = static_cast<Acc>(load<SX>(xs[2], i + j)),
                u3 = static_cast<Acc>(load<SX>(xs[3], i + j));
      const Acc v0 = static_cast<Acc>(load<SY>(ys[0], i + j)),
                v1 = static_cast<Acc>(load<SY>(ys[1], i + j));
      a00[j] += u0 * v0;
      a01[j] += u0 * v1;
      a10[j] += u1 * v0;
      a11[j] += u1 * v1;
      a20[j] += u2 * v0;
      a21[j] += u2 * v1;
      a30[j] += u3 * v0;
      a31[j] += u3 * v1;
      if constexpr (CT == 4) {
        const Acc v2 = static_cast<Acc>(load<SY>(ys[2], i + j)),
                  v3 = static_cast<Acc>(load<SY>(ys[3], i + j));
        a02[j] += u0 * v2;
        a03[j] += u0 * v3;
        a12[j] += u1 * v2;
        a13[j] += u1 * v3;
        a22[j] += u2 * v2;
        a23[j] += u2 * v3;
        a32[j] += u3 * v2;
        a33[j] += u3 * v3;
      }
    }
  Acc* acc[4][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}, {a20, a21, a22, a23},
                    {a30, a31, a32, a33}};
  for (int ia = 0; ia < 4; ++ia)
    for (int ic = 0; ic < CT; ++ic) {
      double sum = 0.0;
      for (int j = 0; j < kGramLanes; ++j) sum += static_cast<double>(acc[ia][ic][j]);
      for (int64_t i = body; i < len; ++i)
        sum += static_cast<double>(load<SX>(xs[ia], i)) * static_cast<double>(load<SY>(ys[ic], i));
      g[ia * C + ic] += sum;
    }
}

// One row pair off the tiles.
template <Storage SX, Storage SY, typename Acc>
double gram_dot(const typename Elem<SX>::T* x, const typename Elem<SY>::T* y, int64_t len) {
  Acc a[kGramLanes] = {};
  const int64_t body = len - len % kGramLanes;
  for (int64_t i = 0; i < body; i += kGramLanes)
    for (int j = 0; j < kGramLanes; ++j)
      a[j] += static_cast<Acc>(load<SX>(x, i + j)) * static_cast<Acc>(load<SY>(y, i + j));
  double sum = 0.0;
  for (int j = 0; j < kGramLanes; ++j) sum += static_cast<double>(a[j]);
  for (int64_t i = body; i < len; ++i)
    sum += static_cast<double>(load<SX>(x, i)) * static_cast<double>(load<SY>(y, i));
  return sum;
}

// g [A][C] += the Gram products of one piece of X and Y rows.
template <Storage SX, Storage SY, typename Acc>
void gram_piece(const typename Elem<SX>::T* x, const typename Elem<SY>::T* y, int64_t stride,
                int64_t len, int64_t A, int64_t C, double* g) {
  const int64_t A4 = A - A % 4, C4 = C - C % 4, C2 = C - C % 2;
  for (int64_t a = 0; a < A4; a += 4) {
    for (int64_t c = 0; c < C4; c += 4)
      gram_tile<SX, SY, Acc, 4>(x + a * stride, y + c * stride, stride, len, C, g + a * C + c);
    if (C2 > C4)
      gram_tile<SX, SY, Acc, 2>(x + a * stride, y + C4 * stride, stride, len, C, g + a * C + C4);
  }
  for (int64_t a = 0; a < A; ++a)
    for (int64_t c = (a < A4 ? C2 : 0); c < C; ++c)
      g[a * C + c] += gram_dot<SX, SY, Acc>(x + a * stride, y + c * stride, len);
}

}  // namespace

void block_gram(const Batch& x, const Batch& y, const Blocks& blocks, double* out) {
  const auto items = make_items(x.tensors, x.n_tensors, kGramChunk);
  const int64_t A = x.rows, C = y.rows;
  std::vector<double> partial(items.size() * A * C, 0.0);
  const bool f64 = x.type == Storage::kFloat64 || y.type == Storage::kFloat64;
  dispatch(x.type, [&]<Storage SX>() {
    dispatch(y.type, [&]<Storage SY>() {
      using TX = typename Elem<SX>::T;
      using TY = typename Elem<SY>::T;
      parallel_items(items, [&](int64_t lo, int64_t hi) {
        for (int64_t k = lo; k < hi; ++k) {
          const Item& it = items[k];
          const int64_t n = x.tensors[it.tensor].n;
          const TX* xt = static_cast<const TX*>(x.tensors[it.tensor].data);
          const TY* yt = static_cast<const TY*>(y.tensors[it.tensor].data);
          double* g = partial.data() + k * A * C;
          for (int64_t s = it.start; s < it.stop; s += kGramPiece) {
            const int64_t len = std::min(kGramPiece, it.stop - s);
            if (f64)
              gram_piece<SX, SY, double>(xt + s, yt + s, n, len, A, C, g);
            else
              gram_piece<SX, SY, float>(xt + s, yt + s, n, len, A, C, g);
          }
        }
      });
    });
  });
  reduce_to_blocks(items, partial, x.n_tensors, A * C, blocks, out);
}

// ------------------------------------------------------------------ orthogonalize
namespace {

// Rows are taken kRowGroup at a time: one read of the chunk buffer serves 4 basis rows (dots:
// 4 x 16 independent chains; update: w -= c0 q0 + .. + c3 q3 in one sweep), so the chunk is
// swept count / 4 times instead of count times and 4 row streams run concurrently. With rows
// of 32768 entries (kOrthoChunk) this measured 0.95x the time of BLAS sgemv + saxpy-shaped
// addmv on the MLP's tensors and 0.5-0.8x on the transformer's 31 (one call, not 3 per tensor).
constexpr int64_t kRowGroup = 4;

// dots[r] = <q_r, buf> for rows 0..count-1 of q (row_stride apart), accumulated in Acc over
// kDotLanes lanes: float32 when neither operand is float64, as BLAS sgemv does (a lane adds at
// most kOrthoChunk / 16 products of one chunk; chunks are then summed in float64). Float64
// lanes measured 1.15x slower: the float -> double conversions, not memory, bound the loop.
// Four rows are spelled out (a generic [G][lanes] accumulator array measured 2x slower: the
// compiler kept it in memory).
constexpr int kDotLanes = 16;

template <Storage SQ, typename Acc>
void chunk_dots(const typename Elem<SQ>::T* q, int64_t row_stride, const Acc* buf, int64_t len,
                int64_t count, double* dots) {
  const int64_t body = len - len % kDotLanes;
  auto finish = [&](Acc* acc, const auto* qr) {
    double tail = 0;
    for (int64_t i = body; i < len; ++i)
      tail += static_cast<double>(load<SQ>(qr, i)) * static_cast<double>(buf[i]);
    for (int width = kDotLanes / 2; width > 0; width /= 2)
      for (int j = 0; j < width; ++j) acc[j] += acc[j + width];
    return static_cast<double>(acc[0]) + tail;
  };
  int64_t r = 0;
  for (; r + kRowGroup <= count; r += kRowGroup) {
    const auto* q0 = q + r * row_stride;
    const auto* q1 = q0 + row_stride;
    const auto* q2 = q1 + row_stride;
    const auto* q3 = q2 + row_stride;
    Acc a0[kDotLanes] = {}, a1[kDotLanes] = {}, a2[kDotLanes] = {}, a3[kDotLanes] = {};
    for (int64_t i = 0; i < body; i += kDotLanes)
      for (int j = 0; j < kDotLanes; ++j) {
        const Acc b = buf[i + j];
        a0[j] += static_cast<Acc>(load<SQ>(q0, i + j)) * b;
        a1[j] += static_cast<Acc>(load<SQ>(q1, i + j)) * b;
        a2[j] += static_cast<Acc>(load<SQ>(q2, i + j)) * b;
        a3[j] += static_cast<Acc>(load<SQ>(q3, i + j)) * b;
      }
    dots[r] = finish(a0, q0);
    dots[r + 1] = finish(a1, q1);
    dots[r + 2] = finish(a2, q2);
    dots[r + 3] = finish(a3, q3);
  }
  for (; r < count; ++r) {
    const auto* qr = q + r * row_stride;
    Acc a[kDotLanes] = {};
    for (int64_t i = 0; i < body; i += kDotLanes)
      for (int j = 0; j < kDotLanes; ++j) a[j] += static_cast<Acc>(load<SQ>(qr, i + j)) * buf[i + j];
    dots[r] = finish(a, qr);
  }
}

// buf -= sum_r coeffs[r] q_r over rows 0..count-1, in Acc.
template <Storage SQ, typename Acc>
void chunk_update(const typename Elem<SQ>::T* q, int64_t row_stride, const double* coeffs,
                  int64_t len, int64_t count, Acc* buf) {
  int64_t r = 0;
  for (; r + kRowGroup <= count; r += kRowGroup) {
    const auto* q0 = q + r * row_stride;
    const auto* q1 = q0 + row_stride;
    const auto* q2 = q1 + row_stride;
    const auto* q3 = q2 + row_stride;
    const Acc c0 = static_cast<Acc>(coeffs[r]), c1 = static_cast<Acc>(coeffs[r + 1]),
              c2 = static_cast<Acc>(coeffs[r + 2]), c3 = static_cast<Acc>(coeffs[r + 3]);
    for (int64_t i = 0; i < len; ++i)
      buf[i] -= (c0 * static_cast<Acc>(load<SQ>(q0, i)) + c1 * static_cast<Acc>(load<SQ>(q1, i))) +
                (c2 * static_cast<Acc>(load<SQ>(q2, i)) + c3 * static_cast<Acc>(load<SQ>(q3, i)));
  }
  for (; r < count; ++r) {
    const auto* qr = q + r * row_stride;
    const Acc c = static_cast<Acc>(coeffs[r]);
    for (int64_t i = 0; i < len; ++i) buf[i] -= c * static_cast<Acc>(load<SQ>(qr, i));
  }
}

// What one sweep over w does to each chunk, in this order: w -= sum over rows r in [u0, u1) of
// cu[r - u0] q_r; the dots of the updated chunk with rows [d0, d1); its squared norm; and
// basis row out_row = scale * w (rounded to the basis' storage type). A pass's update and the
// next pass's dots share one sweep, so the chunk is read once for both.
struct Sweep {
  int64_t u0 = 0, u1 = 0;
  const double* cu = nullptr;
  int64_t d0 = 0, d1 = 0;
  bool norm = false;
  int64_t out_row = -1;
  double scale = 1.0;
};

template <Storage SW, Storage SQ, typename Acc>
void sweep_chunk(typename Elem<SW>::T* w, typename Elem<SQ>::T* q, int64_t row_stride,
                 int64_t len, const Sweep& sw, double* dots, double* norm2) {
  Acc buf[kOrthoChunk];
  for (int64_t i = 0; i < len; ++i) buf[i] = static_cast<Acc>(load<SW>(w, i));
  if (sw.u1 > sw.u0) {
    chunk_update<SQ, Acc>(q + sw.u0 * row_stride, row_stride, sw.cu, len, sw.u1 - sw.u0, buf);
    for (int64_t i = 0; i < len; ++i) store<SW>(w, i, buf[i]);
  }
  if (sw.d1 > sw.d0)
    chunk_dots<SQ, Acc>(q + sw.d0 * row_stride, row_stride, buf, len, sw.d1 - sw.d0, dots);
  if (sw.norm)
    *norm2 = dot_lanes([&](int64_t i) { return buf[i]; }, [&](int64_t i) { return buf[i]; }, len);
  if (sw.out_row >= 0) {
    auto* row = q + sw.out_row * row_stride;
    const Acc scale = static_cast<Acc>(sw.scale);
    for (int64_t i = 0; i < len; ++i) store<SQ>(row, i, buf[i] * scale);
  }
}

// Walks w's items (threads split by entries) applying `sw` to every chunk; returns the dots
// with rows [d0, d1) and the squared norm, each summed over items in item order.
class Sweeper {
 public:
  Sweeper(const Batch& w, const Batch& basis, int64_t chunk)
      : w_(w), basis_(basis), items_(make_items(w.tensors, w.n_tensors, chunk)),
        step_(std::min(chunk, kOrthoChunk)),  // the buffer's size bounds a piece
        f64_(w.type == Storage::kFloat64 || basis.type == Storage::kFloat64) {}

  void run(const Sweep& sw, double* dots_out, double* norm2_out) {
    const int64_t nd = sw.d1 - sw.d0;
    const size_t n_items = items_.size();
    std::vector<double> partial(n_items * std::max<int64_t>(nd, 0), 0.0), norms(n_items, 0.0);
    dispatch(w_.type, [&]<Storage SW>() {
      dispatch(basis_.type, [&]<Storage SQ>() {
        using TW = typename Elem<SW>::T;
        using TQ = typename Elem<SQ>::T;
        parallel_items(items_, [&](int64_t lo, int64_t hi) {
          std::vector<double> piece(std::max<int64_t>(nd, 0));
          for (int64_t k = lo; k < hi; ++k) {
            const Item& it = items_[k];
            const int64_t n = w_.tensors[it.tensor].n;
            TW* wt = static_cast<TW*>(w_.tensors[it.tensor].data);
            TQ* qt = static_cast<TQ*>(basis_.tensors[it.tensor].data);
            double* dots = partial.data() + k * nd;
            for (int64_t s = it.start; s < it.stop; s += step_) {
              const int64_t len = std::min(step_, it.stop - s);
              double piece_norm = 0.0;
              if (f64_)
                sweep_chunk<SW, SQ, double>(wt + s, qt + s, n, len, sw, piece.data(), &piece_norm);
              else
                sweep_chunk<SW, SQ, float>(wt + s, qt + s, n, len, sw, piece.data(), &piece_norm);
              for (int64_t r = 0; r < nd; ++r) dots[r] += piece[r];
              norms[k] += piece_norm;
            }
          }
        });
      });
    });
    if (dots_out) {
      for (int64_t r = 0; r < nd; ++r) dots_out[r] = 0.0;
      for (size_t k = 0; k < n_items; ++k)
        for (int64_t r = 0; r < nd; ++r) dots_out[r] += partial[k * nd + r];
    }
    if (norm2_out) {
      double sum = 0.0;
      for (size_t k = 0; k < n_items; ++k) sum += norms[k];
      *norm2_out = sum;
    }
  }

 private:
  const Batch& w_;
  const Batch& basis_;
  std::vector<Item> items_;
  int64_t step_;
  bool f64_;
};

}  // namespace

void orthogonalize(const Batch& w, const Batch& basis, int64_t count, int64_t passes,
                   double* total) {
  for (int64_t r = 0; r < count; ++r) total[r] = 0.0;
  if (count == 0 || passes <= 0) return;
  // With several passes, a chunk's count basis rows should stay in L2 between a pass's update
  // and the next pass's dots (kOrthoCache bytes); the chunk depends on count and sizes only.
  const int64_t elem = basis.type == Storage::kFloat64 ? 8 : basis.type == Storage::kFloat32 ? 4 : 2;
  const int64_t chunk =
      passes == 1 ? kOrthoChunk
                  : std::clamp(kOrthoCache / (count * elem), kOrthoMinChunk, kOrthoChunk);
  Sweeper sweeper(w, basis, chunk);
  std::vector<double> coeffs(count), next(count);
  Sweep dots;
  dots.d1 = count;
  sweeper.run(dots, coeffs.data(), nullptr);
  for (int64_t p = 0; p < passes; ++p) {
    for (int64_t r = 0; r < count; ++r) total[r] += coeffs[r];
    Sweep pass;  // this pass's update, fused with the next pass's dots
    pass.u1 = count;
    pass.cu = coeffs.data();
    if (p + 1 < passes) pass.d1 = count;
    sweeper.run(pass, next.data(), nullptr);
    coeffs.swap(next);
  }
}

void reorthogonalize(const Batch& w, const Batch& basis, int64_t count, int64_t lo,
                     double ratio, int64_t out_row, double min_norm, double* total,
                     double* norm2) {
  for (int64_t r = 0; r < count; ++r) total[r] = 0.0;
  Sweeper sweeper(w, basis, kOrthoChunk);
  std::vector<double> local(count - lo), c(count);
  if (lo < count) {
    Sweep local_dots;
    local_dots.d0 = lo;
    local_dots.d1 = count;
    sweeper.run(local_dots, local.data(), nullptr);
    for (int64_t r = lo; r < count; ++r) total[r] += local[r - lo];
    Sweep local_update;  // fused with the full pass's dots
    local_update.u0 = lo;
    local_update.u1 = count;
    local_update.cu = local.data();
    local_update.d1 = count;
    sweeper.run(local_update, c.data(), nullptr);
  } else {
    // No local rows (lo = count): the full pass alone, one sweep fewer (partial
    // reorthogonalization passes its two local rows as the whole basis this way).
    Sweep full_dots;
    full_dots.d1 = count;
    sweeper.run(full_dots, c.data(), nullptr);
  }
  // Without local rows the first full pass removes w's large components (alpha q_j and
  // beta q_{j-1}), so Kahan's test below nearly always asks for the second pass: its dots are
  // then taken in the first pass's update sweep (free of memory traffic: the chunk's rows and
  // w are in cache), one sweep fewer. After a local pass the second full pass is rare and the
  // extra dots would cost count multiply-adds per entry for nothing, so they stay separate.
  const bool fuse_second_dots = lo == count;
  std::vector<double> next(count);
  double after = 0.0;
  for (int pass = 0; pass < 2; ++pass) {
    Sweep full;  // the full pass's update, fused with the norm after it
    full.u1 = count;
    full.cu = c.data();
    full.norm = true;
    if (pass == 0 && fuse_second_dots) full.d1 = count;
    sweeper.run(full, next.data(), &after);
    double removed = 0.0;
    for (int64_t r = 0; r < count; ++r) {
      total[r] += c[r];
      removed += c[r] * c[r];
    }
    // w - Q c is orthogonal to Q c, so ||w before||^2 = after + ||c||^2: a second full pass
    // only when this one removed more than 1 - ratio of the norm (Kahan).
    if (pass == 1 || after >= ratio * ratio * (after + removed)) break;
    if (fuse_second_dots) {
      c.swap(next);
    } else {
      Sweep full_dots;
      full_dots.d1 = count;
      sweeper.run(full_dots, c.data(), nullptr);
    }
  }
  *norm2 = after;
  if (out_row >= 0 && after > 0.0 && std::sqrt(after) > min_norm) {
    Sweep store;
    store.out_row = out_row;
    store.scale = 1.0 / std::sqrt(after);
    sweeper.run(store, nullptr, nullptr);
  }
}


}  // namespace gradience::curvature
