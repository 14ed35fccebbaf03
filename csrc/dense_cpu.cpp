// CPU implementation of the dense-block ops (see dense_cpu.h).
//
// Layouts. Two layouts get raw-pointer loops that the compiler vectorizes:
//   rows      H*W contiguous (stride_hw == 1): channel slices of NCHW buffers.
//             Row (n, c) is a contiguous run of H*W elements.
//   channels  channels contiguous (stride_c == 1): channel slices of
//             channels_last buffers. Position (n, h, w) holds C contiguous
//             channels.
// An op takes one when all its tensors of x's shape have it; anything else
// (mixed layouts, other strides) takes a generic strided path.
//
// Reductions are deterministic and do not depend on the number of threads:
// each channel's elements are cut into chunks whose size depends on the shape
// only (kChunkElements), each chunk is reduced in a fixed order into double
// accumulators (eager CPU batch norm also sums float32 in double), and the
// chunks' partial results are combined in chunk order after the parallel
// loop. In the rows layout a chunk is a range of n of one channel, summed into
// kLanes independent lanes (element p of a row goes to lane p % kLanes) that
// a fixed pairwise tree folds; in the channels layout a chunk is a range of
// positions, and each channel of a tile of kChannelTile channels has its own
// accumulator (vectorized across channels), kUnroll positions at a time.
//
// batch_stats reads x from memory once: a chunk computes its sum, then the
// sums of its deviations from its own mean (a second pass over data still in
// cache), and the chunks are merged with Chan et al.'s formula
//     M2 = sum_k M2_k + n_k * (mean_k - mean)^2.
// batch_moments stops there; merge_batch_stats merges several processes'
// moments with the same formula and finishes them as batch_stats does.
//
// The hot loops are compiled twice on x86-64 Linux with GCC (target_clones):
// for x86-64-v3 (AVX2, FMA) and for the baseline; the dynamic loader picks one
// per CPU. Results are identical for any number of threads on one machine;
// the two builds may differ in the last bits (the v3 one fuses multiply-adds).
#include "dense_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <vector>

#include "checks.h"
#include "dense_math.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTRES_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FASTRES_CLONES
#endif

#if defined(__GNUC__)
#define FASTRES_INLINE inline __attribute__((always_inline))
#else
#define FASTRES_INLINE inline
#endif

namespace fastres::cpu {
namespace {

constexpr int64_t kElementsPerTask = 32768;  // the smallest parallel task
constexpr int64_t kChunkElements = 32768;    // elements of a reduction chunk (fixed: determinism)
constexpr int kLanes = 16;                   // accumulator lanes of a row (rows layout)
constexpr int64_t kChannelTile = 128;        // channels per reduction task (channels layout)
constexpr int64_t kStridedTile = 16;         // channels per task of the strided path

struct Dims {
  int64_t n, c, hw;
  int64_t positions() const { return n * hw; }  // m: elements per channel
};

Dims dims_of(const at::Tensor& x) { return {x.size(0), x.size(1), x.size(2) * x.size(3)}; }

struct Strides {
  int64_t n, c, hw;
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), merged_hw_stride(t)}; }

// Channels are t's innermost axis (channels_last): loops then run over channels innermost.
bool channels_innermost(const at::Tensor& t) {
  const Dims d = dims_of(t);
  const int64_t position_stride = d.hw > 1 ? merged_hw_stride(t) : t.stride(0);
  return d.c > 1 && t.stride(1) < position_stride;
}

int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(elements_per_item, 1));
}

enum class Layout { kRows, kChannels, kStrided };

// The layout shared by all of ts (x first); `channels_inner` breaks ties
// (both hold when H*W == 1 or C == 1).
Layout layout_of(std::initializer_list<const at::Tensor*> ts, bool channels_inner) {
  const Dims d = dims_of(**ts.begin());
  bool rows = true, channels = true;
  for (const at::Tensor* t : ts) {
    rows = rows && (d.hw <= 1 || merged_hw_stride(*t) == 1);
    channels = channels && (d.c <= 1 || t->stride(1) == 1);
  }
  if (channels && (channels_inner || !rows)) return Layout::kChannels;
  return rows ? Layout::kRows : Layout::kStrided;
}

// The per-element and per-channel arithmetic is dense_math.h's, shared with CUDA kernels.
using math::Moments;
using math::relu;
using math::relu_grad;

// ---- chunks of the reductions (functions of the shape only) ----

// Rows layout: chunk k of channel c is rows n in [k * rows, (k + 1) * rows);
// item c * count + k.
struct RowChunks {
  int64_t count, rows;
  int64_t elements(int64_t k, const Dims& d) const {
    return (std::min(d.n, (k + 1) * rows) - k * rows) * d.hw;
  }
};

RowChunks row_chunks(const Dims& d) {
  if (d.positions() == 0) return {0, 1};
  const int64_t wanted = std::min(d.n, at::divup(d.positions(), kChunkElements));
  const int64_t rows = at::divup(d.n, wanted);
  return {at::divup(d.n, rows), rows};
}

// Channels layout: chunk k is positions [k * positions, (k + 1) * positions)
// of all channels; item k * tiles + t reduces channel tile t of it, into
// partials [k * C + c].
struct PositionChunks {
  int64_t count, positions, tiles;
  int64_t elements(int64_t k, const Dims& d) const {  // per channel
    return std::min(d.positions(), (k + 1) * positions) - k * positions;
  }
};

PositionChunks position_chunks(const Dims& d) {
  const int64_t width = std::max<int64_t>(1, std::min(d.c, kChannelTile));
  const int64_t positions = std::max<int64_t>(1, kChunkElements / width);
  return {at::divup(d.positions(), positions), positions, at::divup(d.c, kChannelTile)};
}

// Walks rows row = n * C + c in order (no division per row: H*W may be tiny).
struct RowWalker {
  int64_t n, c, channels;
  RowWalker(int64_t row, int64_t channels_)
      : n(row / channels_), c(row % channels_), channels(channels_) {}
  void next() {
    if (++c == channels) {
      c = 0;
      ++n;
    }
  }
};

// Walks positions pos = n * hw + p in order.
struct PositionWalker {
  int64_t n, p, hw;
  PositionWalker(int64_t pos, int64_t hw_) : n(pos / hw_), p(pos % hw_), hw(hw_) {}
  int64_t offset(const Strides& s) const { return n * s.n + p * s.hw; }
  void next() {
    if (++p == hw) {
      p = 0;
      ++n;
    }
  }
};

// ---- small vectors (GCC vector extensions) ----
//
// A group is 4 consecutive elements: float4 or double4 for the math in the
// dtype, double4 for the sums. Without AVX, GCC splits double4 into two SSE2
// registers. Vectors travel by reference: by value, 32-byte ones draw -Wpsabi
// notes from the baseline build.

typedef float f32x4 __attribute__((vector_size(16)));
typedef double f64x4 __attribute__((vector_size(32)));

template <typename T>
struct Group;
template <>
struct Group<float> {
  using type = f32x4;
};
template <>
struct Group<double> {
  using type = f64x4;
};
template <typename T>
using Vec = typename Group<T>::type;  // 4 elements of T

template <typename V, typename T>
FASTRES_INLINE void load(V& v, const T* p) {
  std::memcpy(&v, p, sizeof v);
}

template <typename V, typename T>
FASTRES_INLINE void store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof v);
}

// As doubles (written element by element, GCC makes one vcvtps2pd of it).
FASTRES_INLINE void widen(const f32x4& v, f64x4& out) {
  out = f64x4{static_cast<double>(v[0]), static_cast<double>(v[1]), static_cast<double>(v[2]),
              static_cast<double>(v[3])};
}
FASTRES_INLINE void widen(const f64x4& v, f64x4& out) { out = v; }

template <typename T>
FASTRES_INLINE void load_wide(f64x4& out, const T* p) {
  Vec<T> v;
  load(v, p);
  widen(v, out);
}

// relu_grad of a group, into g.
template <typename V>
FASTRES_INLINE void relu_grad_group(const V& y, V& g) {
  using Mask = decltype(y <= y);
  g = reinterpret_cast<V>(reinterpret_cast<Mask>(g) & ~(y <= V{}));
}

// dy and x - mean of a group, as doubles.
template <typename T>
FASTRES_INLINE void grad_group(const T* x, const T* g, const Vec<T>& mean, const Vec<T>& scale,
                               const Vec<T>& shift, f64x4& dy_out, f64x4& xmu_out) {
  Vec<T> xmu, dy;
  load(xmu, x);
  load(dy, g);
  xmu -= mean;
  relu_grad_group(xmu * scale + shift, dy);
  widen(dy, dy_out);
  widen(xmu, xmu_out);
}

// The same for one element.
template <typename T>
FASTRES_INLINE void grad_one(T xv, T gv, T mean, T scale, T shift, double& dy_out,
                             double& xmu_out) {
  const T xmu = xv - mean;
  dy_out = static_cast<double>(relu_grad(xmu * scale + shift, gv));
  xmu_out = static_cast<double>(xmu);
}

// Rows layout lanes: element p of a row goes to lane p % kLanes. Whole blocks
// of kLanes elements accumulate in kGroups double4s (registers), the tail of a
// row in a plain array; a lane's total is the two added, and the lanes fold
// pairwise: a fixed order throughout.
constexpr int kGroups = kLanes / 4;

FASTRES_INLINE double fold(const f64x4* acc, const double* tail) {
  double lanes[kLanes];
  std::memcpy(lanes, acc, sizeof lanes);
  for (int l = 0; l < kLanes; ++l) lanes[l] += tail[l];
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  return lanes[0];
}

// Channels layout: the values of kUnroll positions are summed pairwise, then
// added to their channel's accumulator (a quarter of the loads and stores of it).
constexpr int kUnroll = 4;

// The pointers to channel c0 of the next kUnroll positions.
template <typename T>
FASTRES_INLINE void next_positions(PositionWalker& w, const T* base, const Strides& s,
                                   const T** rows) {
  for (int u = 0; u < kUnroll; ++u, w.next()) rows[u] = base + w.offset(s);
}

// ---- kernels ----

// What a reduction task reads and where it writes its partials.
template <typename T>
struct ReduceArgs {
  Dims d;
  const T* x;
  Strides xs;
  const T* g;  // grad_out (gradient sums only)
  Strides gs;
  const T *mean, *scale, *shift;  // [C] (gradient sums only)
  int64_t begin, end;             // items
  double *out0, *out1;            // partials: sum, M2 or sum_g, sum_gx
};

// Per item: the chunk's sum and sum of squared deviations from its mean.
template <typename T>
FASTRES_INLINE void stats_rows_impl(const ReduceArgs<T>& a) {
  const RowChunks rc = row_chunks(a.d);
  const int64_t hw = a.d.hw, full = hw - hw % kLanes;
  for (int64_t item = a.begin; item < a.end; ++item) {
    const int64_t c = item / rc.count, k = item % rc.count;
    const int64_t n0 = k * rc.rows, n1 = std::min(a.d.n, n0 + rc.rows);
    const T* base = a.x + c * a.xs.c;
    f64x4 acc[kGroups] = {};
    double acc_tail[kLanes] = {};
    for (int64_t n = n0; n < n1; ++n) {
      const T* x = base + n * a.xs.n;
      for (int64_t i = 0; i < full; i += kLanes)
        for (int q = 0; q < kGroups; ++q) {
          f64x4 v;
          load_wide(v, x + i + 4 * q);
          acc[q] += v;
        }
      for (int64_t i = full; i < hw; ++i) acc_tail[i - full] += static_cast<double>(x[i]);
    }
    const double sum = fold(acc, acc_tail);
    const double count = static_cast<double>((n1 - n0) * hw);
    const double mu = sum / count;
    const f64x4 mu_v = f64x4{} + mu;
    f64x4 s[kGroups] = {}, q2[kGroups] = {};
    double s_tail[kLanes] = {}, q2_tail[kLanes] = {};
    for (int64_t n = n0; n < n1; ++n) {
      const T* x = base + n * a.xs.n;
      for (int64_t i = 0; i < full; i += kLanes)
        for (int q = 0; q < kGroups; ++q) {
          f64x4 dev;
          load_wide(dev, x + i + 4 * q);
          dev -= mu_v;
          s[q] += dev;
          q2[q] += dev * dev;
        }
      for (int64_t i = full; i < hw; ++i) {
        const double dev = static_cast<double>(x[i]) - mu;
        s_tail[i - full] += dev;
        q2_tail[i - full] += dev * dev;
      }
    }
    const double dev_sum = fold(s, s_tail);  // ~0: corrects for mu's rounding
    a.out0[item] = sum;
    a.out1[item] = fold(q2, q2_tail) - dev_sum * dev_sum / count;
  }
}

// Channel c0 + j accumulates in [j]; groups of 4 channels, then the last
// width % 4 one by one, with the same arithmetic.
template <typename T>
FASTRES_INLINE void stats_channels_impl(const ReduceArgs<T>& a) {
  const PositionChunks pc = position_chunks(a.d);
  const int64_t m = a.d.positions();
  for (int64_t item = a.begin; item < a.end; ++item) {
    const int64_t k = item / pc.tiles, c0 = item % pc.tiles * kChannelTile;
    const int64_t width = std::min(kChannelTile, a.d.c - c0), full = width - width % 4;
    const int64_t pos0 = k * pc.positions, pos1 = std::min(m, pos0 + pc.positions);
    const int64_t pos_full = pos0 + (pos1 - pos0) / kUnroll * kUnroll;
    const T* base = a.x + c0;
    double acc[kChannelTile] = {}, s[kChannelTile] = {}, q2[kChannelTile] = {};
    double mu[kChannelTile];

    PositionWalker w(pos0, a.d.hw);
    for (int64_t pos = pos0; pos < pos_full; pos += kUnroll) {
      const T* x[kUnroll];
      next_positions(w, base, a.xs, x);
      for (int64_t j = 0; j < full; j += 4) {
        f64x4 v[kUnroll], sum;
        for (int u = 0; u < kUnroll; ++u) load_wide(v[u], x[u] + j);
        load(sum, acc + j);
        sum += (v[0] + v[1]) + (v[2] + v[3]);
        store(acc + j, sum);
      }
      for (int64_t j = full; j < width; ++j)
        acc[j] += (static_cast<double>(x[0][j]) + static_cast<double>(x[1][j])) +
                  (static_cast<double>(x[2][j]) + static_cast<double>(x[3][j]));
    }
    for (int64_t pos = pos_full; pos < pos1; ++pos, w.next()) {
      const T* x = base + w.offset(a.xs);
      for (int64_t j = 0; j < width; ++j) acc[j] += static_cast<double>(x[j]);
    }

    const double count = static_cast<double>(pos1 - pos0);
    for (int64_t j = 0; j < width; ++j) mu[j] = acc[j] / count;

    w = PositionWalker(pos0, a.d.hw);
    for (int64_t pos = pos0; pos < pos_full; pos += kUnroll) {
      const T* x[kUnroll];
      next_positions(w, base, a.xs, x);
      for (int64_t j = 0; j < full; j += 4) {
        f64x4 dev[kUnroll], mu_v, s_v, q_v;
        load(mu_v, mu + j);
        for (int u = 0; u < kUnroll; ++u) {
          load_wide(dev[u], x[u] + j);
          dev[u] -= mu_v;
        }
        load(s_v, s + j);
        load(q_v, q2 + j);
        s_v += (dev[0] + dev[1]) + (dev[2] + dev[3]);
        q_v += (dev[0] * dev[0] + dev[1] * dev[1]) + (dev[2] * dev[2] + dev[3] * dev[3]);
        store(s + j, s_v);
        store(q2 + j, q_v);
      }
      for (int64_t j = full; j < width; ++j) {
        double dev[kUnroll];
        for (int u = 0; u < kUnroll; ++u) dev[u] = static_cast<double>(x[u][j]) - mu[j];
        s[j] += (dev[0] + dev[1]) + (dev[2] + dev[3]);
        q2[j] += (dev[0] * dev[0] + dev[1] * dev[1]) + (dev[2] * dev[2] + dev[3] * dev[3]);
      }
    }
    for (int64_t pos = pos_full; pos < pos1; ++pos, w.next()) {
      const T* x = base + w.offset(a.xs);
      for (int64_t j = 0; j < width; ++j) {
        const double dev = static_cast<double>(x[j]) - mu[j];
        s[j] += dev;
        q2[j] += dev * dev;
      }
    }

    double* sum_out = a.out0 + k * a.d.c + c0;
    double* m2_out = a.out1 + k * a.d.c + c0;
    for (int64_t j = 0; j < width; ++j) {
      sum_out[j] = acc[j];
      m2_out[j] = q2[j] - s[j] * s[j] / count;
    }
  }
}

// Per item: sum of dy and of dy * (x - mean) over the chunk (in double: the
// products of two floats are exact).
template <typename T>
FASTRES_INLINE void grad_sums_rows_impl(const ReduceArgs<T>& a) {
  const RowChunks rc = row_chunks(a.d);
  const int64_t hw = a.d.hw, full = hw - hw % kLanes;
  for (int64_t item = a.begin; item < a.end; ++item) {
    const int64_t c = item / rc.count, k = item % rc.count;
    const int64_t n0 = k * rc.rows, n1 = std::min(a.d.n, n0 + rc.rows);
    const T mean = a.mean[c], scale = a.scale[c], shift = a.shift[c];
    const Vec<T> mean_v = Vec<T>{} + mean, scale_v = Vec<T>{} + scale,
                 shift_v = Vec<T>{} + shift;
    f64x4 sdy[kGroups] = {}, sdx[kGroups] = {};
    double sdy_tail[kLanes] = {}, sdx_tail[kLanes] = {};
    for (int64_t n = n0; n < n1; ++n) {
      const T* x = a.x + n * a.xs.n + c * a.xs.c;
      const T* g = a.g + n * a.gs.n + c * a.gs.c;
      for (int64_t i = 0; i < full; i += kLanes)
        for (int q = 0; q < kGroups; ++q) {
          f64x4 dy, xmu;
          grad_group(x + i + 4 * q, g + i + 4 * q, mean_v, scale_v, shift_v, dy, xmu);
          sdy[q] += dy;
          sdx[q] += dy * xmu;
        }
      for (int64_t i = full; i < hw; ++i) {
        double dy, xmu;
        grad_one(x[i], g[i], mean, scale, shift, dy, xmu);
        sdy_tail[i - full] += dy;
        sdx_tail[i - full] += dy * xmu;
      }
    }
    a.out0[item] = fold(sdy, sdy_tail);
    a.out1[item] = fold(sdx, sdx_tail);
  }
}

template <typename T>
FASTRES_INLINE void grad_sums_channels_impl(const ReduceArgs<T>& a) {
  const PositionChunks pc = position_chunks(a.d);
  const int64_t m = a.d.positions();
  for (int64_t item = a.begin; item < a.end; ++item) {
    const int64_t k = item / pc.tiles, c0 = item % pc.tiles * kChannelTile;
    const int64_t width = std::min(kChannelTile, a.d.c - c0), full = width - width % 4;
    const int64_t pos0 = k * pc.positions, pos1 = std::min(m, pos0 + pc.positions);
    const int64_t pos_full = pos0 + (pos1 - pos0) / kUnroll * kUnroll;
    const T *mean = a.mean + c0, *scale = a.scale + c0, *shift = a.shift + c0;
    double sdy[kChannelTile] = {}, sdx[kChannelTile] = {};

    PositionWalker w(pos0, a.d.hw);
    for (int64_t pos = pos0; pos < pos_full; pos += kUnroll) {
      PositionWalker wg = w;
      const T *x[kUnroll], *g[kUnroll];
      next_positions(w, a.x + c0, a.xs, x);
      next_positions(wg, a.g + c0, a.gs, g);
      for (int64_t j = 0; j < full; j += 4) {
        Vec<T> mean_v, scale_v, shift_v;
        load(mean_v, mean + j);
        load(scale_v, scale + j);
        load(shift_v, shift + j);
        f64x4 dy[kUnroll], xmu[kUnroll], sdy_v, sdx_v;
        for (int u = 0; u < kUnroll; ++u)
          grad_group(x[u] + j, g[u] + j, mean_v, scale_v, shift_v, dy[u], xmu[u]);
        load(sdy_v, sdy + j);
        load(sdx_v, sdx + j);
        sdy_v += (dy[0] + dy[1]) + (dy[2] + dy[3]);
        sdx_v += (dy[0] * xmu[0] + dy[1] * xmu[1]) + (dy[2] * xmu[2] + dy[3] * xmu[3]);
        store(sdy + j, sdy_v);
        store(sdx + j, sdx_v);
      }
      for (int64_t j = full; j < width; ++j) {
        double dy[kUnroll], xmu[kUnroll];
        for (int u = 0; u < kUnroll; ++u)
          grad_one(x[u][j], g[u][j], mean[j], scale[j], shift[j], dy[u], xmu[u]);
        sdy[j] += (dy[0] + dy[1]) + (dy[2] + dy[3]);
        sdx[j] += (dy[0] * xmu[0] + dy[1] * xmu[1]) + (dy[2] * xmu[2] + dy[3] * xmu[3]);
      }
    }
    for (int64_t pos = pos_full; pos < pos1; ++pos, w.next()) {
      const T* x = a.x + w.offset(a.xs) + c0;
      const T* g = a.g + w.offset(a.gs) + c0;
      for (int64_t j = 0; j < width; ++j) {
        double dy, xmu;
        grad_one(x[j], g[j], mean[j], scale[j], shift[j], dy, xmu);
        sdy[j] += dy;
        sdx[j] += dy * xmu;
      }
    }
    std::copy(sdy, sdy + width, a.out0 + k * a.d.c + c0);
    std::copy(sdx, sdx + width, a.out1 + k * a.d.c + c0);
  }
}

// What an elementwise task reads and writes.
template <typename T>
struct ElementArgs {
  Dims d;
  const T* x;
  Strides xs;
  const T* g;  // grad_out (backward only)
  Strides gs;
  T* out;  // out or grad_in
  Strides os;
  const T *mean, *scale, *shift, *mean_g, *proj;  // [C]; mean_g, proj: backward only
  bool training;
  int64_t begin, end;  // rows n * C + c, or positions
};

template <typename T>
FASTRES_INLINE void forward_rows_impl(const ElementArgs<T>& a) {
  RowWalker r(a.begin, a.d.c);
  for (int64_t row = a.begin; row < a.end; ++row, r.next()) {
    const int64_t n = r.n, c = r.c;
    const T* x = a.x + n * a.xs.n + c * a.xs.c;
    T* out = a.out + n * a.os.n + c * a.os.c;
    const T mean = a.mean[c], scale = a.scale[c], shift = a.shift[c];
    for (int64_t p = 0; p < a.d.hw; ++p) out[p] = math::bn_relu(x[p], mean, scale, shift);
  }
}

template <typename T>
FASTRES_INLINE void forward_channels_impl(const ElementArgs<T>& a) {
  PositionWalker w(a.begin, a.d.hw);
  for (int64_t pos = a.begin; pos < a.end; ++pos, w.next()) {
    const T* x = a.x + w.offset(a.xs);
    T* out = a.out + w.offset(a.os);
    for (int64_t c = 0; c < a.d.c; ++c) out[c] = math::bn_relu(x[c], a.mean[c], a.scale[c], a.shift[c]);
  }
}

using math::grad_input;

template <typename T, bool kTraining>
FASTRES_INLINE void backward_input_rows(const ElementArgs<T>& a) {
  RowWalker r(a.begin, a.d.c);
  for (int64_t row = a.begin; row < a.end; ++row, r.next()) {
    const int64_t n = r.n, c = r.c;
    const T* x = a.x + n * a.xs.n + c * a.xs.c;
    const T* g = a.g + n * a.gs.n + c * a.gs.c;
    T* out = a.out + n * a.os.n + c * a.os.c;
    const T mean = a.mean[c], scale = a.scale[c], shift = a.shift[c];
    const T mean_g = a.mean_g[c], proj = a.proj[c];
    for (int64_t p = 0; p < a.d.hw; ++p)
      out[p] += grad_input<T, kTraining>(x[p], g[p], mean, scale, shift, mean_g, proj);
  }
}

template <typename T, bool kTraining>
FASTRES_INLINE void backward_input_channels(const ElementArgs<T>& a) {
  PositionWalker w(a.begin, a.d.hw);
  for (int64_t pos = a.begin; pos < a.end; ++pos, w.next()) {
    const T* x = a.x + w.offset(a.xs);
    const T* g = a.g + w.offset(a.gs);
    T* out = a.out + w.offset(a.os);
    for (int64_t c = 0; c < a.d.c; ++c)
      out[c] += grad_input<T, kTraining>(x[c], g[c], a.mean[c], a.scale[c], a.shift[c],
                                         a.mean_g[c], a.proj[c]);
  }
}

template <typename T>
FASTRES_INLINE void backward_input_rows_impl(const ElementArgs<T>& a) {
  a.training ? backward_input_rows<T, true>(a) : backward_input_rows<T, false>(a);
}

template <typename T>
FASTRES_INLINE void backward_input_channels_impl(const ElementArgs<T>& a) {
  a.training ? backward_input_channels<T, true>(a) : backward_input_channels<T, false>(a);
}

// The entry points, one per dtype, each compiled per target (FASTRES_CLONES).
#define FASTRES_KERNEL(name, Args)                                              \
  FASTRES_CLONES void name(const Args<float>& a) { name##_impl<float>(a); }    \
  FASTRES_CLONES void name(const Args<double>& a) { name##_impl<double>(a); }

FASTRES_KERNEL(stats_rows, ReduceArgs)
FASTRES_KERNEL(stats_channels, ReduceArgs)
FASTRES_KERNEL(grad_sums_rows, ReduceArgs)
FASTRES_KERNEL(grad_sums_channels, ReduceArgs)
FASTRES_KERNEL(forward_rows, ElementArgs)
FASTRES_KERNEL(forward_channels, ElementArgs)
FASTRES_KERNEL(backward_input_rows, ElementArgs)
FASTRES_KERNEL(backward_input_channels, ElementArgs)

#undef FASTRES_KERNEL

// Per-channel constants: y = (x - mean) * scale + shift.
template <typename T>
struct ChannelConsts {
  std::vector<T> mean, scale, shift, mean_g, proj;
};

template <typename T>
ChannelConsts<T> channel_consts(const at::Tensor& mean, const at::Tensor& rstd,
                                const at::Tensor& weight, const at::Tensor& bias) {
  const int64_t channels = mean.numel();
  const T* mean_p = mean.data_ptr<T>();
  const T* rstd_p = rstd.data_ptr<T>();
  const T* weight_p = weight.defined() ? weight.data_ptr<T>() : nullptr;
  const T* bias_p = bias.defined() ? bias.data_ptr<T>() : nullptr;
  ChannelConsts<T> k;
  k.mean.assign(mean_p, mean_p + channels);
  k.scale.resize(channels);
  k.shift.resize(channels);
  for (int64_t c = 0; c < channels; ++c) {
    k.scale[c] = math::channel_scale(rstd_p[c], weight_p, c);
    k.shift[c] = math::channel_shift(bias_p, c);
  }
  return k;
}

// Runs a reduction kernel over its items in parallel, into the partials out0
// and out1: [c * chunks + k] in the rows layout, [k * C + c] in the channels one.
template <typename T>
void run_reduction(Layout layout, ReduceArgs<T> a, std::vector<double>& out0,
                   std::vector<double>& out1, void (*rows)(const ReduceArgs<T>&),
                   void (*channels)(const ReduceArgs<T>&)) {
  int64_t items, per_item, partials;
  if (layout == Layout::kRows) {
    const RowChunks rc = row_chunks(a.d);
    items = partials = a.d.c * rc.count;
    per_item = rc.rows * a.d.hw;
  } else {
    const PositionChunks pc = position_chunks(a.d);
    items = pc.count * pc.tiles;
    partials = pc.count * a.d.c;
    per_item = pc.positions * std::min(a.d.c, kChannelTile);
  }
  out0.assign(partials, 0.0);
  out1.assign(partials, 0.0);
  a.out0 = out0.data();
  a.out1 = out1.data();
  const auto kernel = layout == Layout::kRows ? rows : channels;
  at::parallel_for(0, items, grain_for(per_item), [&](int64_t begin, int64_t end) {
    ReduceArgs<T> task = a;
    task.begin = begin;
    task.end = end;
    kernel(task);
  });
}

// ---- strided path: generic loops through a strided accessor ----

// A 4-D tensor seen as [N, C, HW] through its strides.
template <typename T>
struct View {
  T* data;
  int64_t stride_n, stride_c, stride_hw;
  T& operator()(int64_t n, int64_t c, int64_t p) const {
    return data[n * stride_n + c * stride_c + p * stride_hw];
  }
};

template <typename T>
View<T> view_of(const at::Tensor& t) {
  return {static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), merged_hw_stride(t)};
}

// Calls op(n, c, p) for every element, innermost along channels or along
// H*W, as `channels_inner` says (the layout of the written tensor).
template <class Op>
void for_each_element(const Dims& d, bool channels_inner, const Op& op) {
  if (!channels_inner) {
    at::parallel_for(0, d.n * d.c, grain_for(d.hw), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / d.c, c = row % d.c;
        for (int64_t p = 0; p < d.hw; ++p) op(n, c, p);
      }
    });
    return;
  }
  at::parallel_for(0, d.n * d.hw, grain_for(d.c), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / d.hw, p = row % d.hw;
      for (int64_t c = 0; c < d.c; ++c) op(n, c, p);
    }
  });
}

// Folds op.add(state, n, c, p) over every position of each channel, in a
// fixed order, into one State per channel. With channels innermost a task
// takes a tile of adjacent channels, so that it reads whole cache lines.
template <class State, class Op>
std::vector<State> reduce_channels(const Dims& d, bool channels_inner, const Op& op) {
  std::vector<State> states(d.c);
  const int64_t tile = channels_inner ? kStridedTile : 1;
  at::parallel_for(0, at::divup(d.c, tile), grain_for(d.positions() * tile),
                   [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c0 = t * tile, width = std::min(tile, d.c - c0);
      State tile_states[kStridedTile] = {};
      for (int64_t n = 0; n < d.n; ++n)
        for (int64_t p = 0; p < d.hw; ++p)
          for (int64_t j = 0; j < width; ++j) op.add(tile_states[j], n, c0 + j, p);
      std::copy(tile_states, tile_states + width, states.begin() + c0);
    }
  });
  return states;
}

template <typename T>
struct SumOp {
  View<const T> x;
  void add(double& sum, int64_t n, int64_t c, int64_t p) const { sum += x(n, c, p); }
};

struct DeviationSums {
  double sum, sum_sq;  // of x - mean: sum is ~0 and corrects sum_sq for mean's rounding
};

template <typename T>
struct DeviationOp {
  View<const T> x;
  const double* mean;
  void add(DeviationSums& s, int64_t n, int64_t c, int64_t p) const {
    const double dev = static_cast<double>(x(n, c, p)) - mean[c];
    s.sum += dev;
    s.sum_sq += dev * dev;
  }
};

struct GradSums {
  double g, gx;  // sum(g), sum(g * (x - mean))
};

template <typename T>
struct GradSumsOp {
  View<const T> grad_out, x;
  const ChannelConsts<T>* k;
  void add(GradSums& s, int64_t n, int64_t c, int64_t p) const {
    const T xmu = x(n, c, p) - k->mean[c];
    const T dy = relu_grad(xmu * k->scale[c] + k->shift[c], grad_out(n, c, p));
    s.g += dy;
    s.gx += static_cast<double>(dy) * static_cast<double>(xmu);
  }
};

// ---- batch statistics: moments, Chan's merge, finalize ----

// Chan et al.'s merge of parts k = 0 .. parts - 1 (part(k) gives their
// Moments), summed in part order: M2 = sum_k M2_k + n_k * (mean_k - mean)^2.
// Empty parts add nothing (an empty batch's mean is NaN).
template <class Part>
Moments merge_moments(int64_t parts, const Part& part) {
  Moments total{0.0, 0.0, 0.0};
  for (int64_t k = 0; k < parts; ++k) {
    const Moments p = part(k);
    total.count += p.count;
    total.sum += p.sum;
  }
  const double mean = total.sum / total.count;
  for (int64_t k = 0; k < parts; ++k) total.m2 += math::chan_term(part(k), mean);
  return total;
}

using math::rstd_of;

// Per-channel moments of x (the chunks merged in chunk order).
template <typename T>
std::vector<Moments> channel_moments(const at::Tensor& x) {
  const Dims d = dims_of(x);
  const double m = static_cast<double>(d.positions());
  std::vector<Moments> moments(d.c);
  const Layout layout = layout_of({&x}, channels_innermost(x));

  if (layout == Layout::kStrided) {
    const View<const T> xv = view_of<const T>(x);
    const bool channels_inner = channels_innermost(x);
    const std::vector<double> sums = reduce_channels<double>(d, channels_inner, SumOp<T>{xv});
    std::vector<double> mu(d.c);
    for (int64_t c = 0; c < d.c; ++c) mu[c] = sums[c] / m;
    const std::vector<DeviationSums> devs =
        reduce_channels<DeviationSums>(d, channels_inner, DeviationOp<T>{xv, mu.data()});
    for (int64_t c = 0; c < d.c; ++c)
      moments[c] = {m, sums[c], devs[c].sum_sq - devs[c].sum * devs[c].sum / m};
    return moments;
  }
  ReduceArgs<T> a{};
  a.d = d;
  a.x = x.const_data_ptr<T>();
  a.xs = strides_of(x);
  std::vector<double> chunk_sum, chunk_m2;
  run_reduction<T>(layout, a, chunk_sum, chunk_m2, stats_rows, stats_channels);
  // Channel c's chunk k, in order: partials [first + k * step].
  const bool rows = layout == Layout::kRows;
  const RowChunks rc = row_chunks(d);
  const PositionChunks pc = position_chunks(d);
  const int64_t chunks = rows ? rc.count : pc.count, step = rows ? 1 : d.c;
  for (int64_t c = 0; c < d.c; ++c) {
    const int64_t first = rows ? c * rc.count : c;
    moments[c] = merge_moments(chunks, [&](int64_t k) {
      const double count = static_cast<double>(rows ? rc.elements(k, d) : pc.elements(k, d));
      return Moments{count, chunk_sum[first + k * step], chunk_m2[first + k * step]};
    });
  }
  return moments;
}

// Mean, rstd (of the biased variance) and the running statistics' update
// (unbiased variance), all in double (as eager CPU batch norm), rounded once.
// Undefined running buffers: no update.
template <typename T>
void finalize(const std::vector<Moments>& moments, const at::Tensor& running_mean,
              const at::Tensor& running_var, double momentum, double eps,
              const at::Tensor& mean, const at::Tensor& rstd) {
  T* mean_out = mean.data_ptr<T>();
  T* rstd_out = rstd.data_ptr<T>();
  T* running_mean_p = running_mean.defined() ? running_mean.data_ptr<T>() : nullptr;
  T* running_var_p = running_var.defined() ? running_var.data_ptr<T>() : nullptr;
  for (size_t c = 0; c < moments.size(); ++c) {
    const double rm = running_mean_p != nullptr ? static_cast<double>(running_mean_p[c]) : 0.0;
    const double rv = running_var_p != nullptr ? static_cast<double>(running_var_p[c]) : 0.0;
    const math::Finished f = math::finish(moments[c], eps, momentum, rm, rv);
    mean_out[c] = static_cast<T>(f.mean);
    rstd_out[c] = static_cast<T>(f.rstd);
    if (running_mean_p != nullptr) {
      running_mean_p[c] = static_cast<T>(f.running_mean);
      running_var_p[c] = static_cast<T>(f.running_var);
    }
  }
}

// A [3, C] float64 moments tensor holds rows sum, M2 and count.
Moments moments_at(const double* t, int64_t channels, int64_t c) {
  return {t[2 * channels + c], t[c], t[channels + c]};
}

void set_moments(double* t, int64_t channels, int64_t c, const Moments& m) {
  t[c] = m.sum;
  t[channels + c] = m.m2;
  t[2 * channels + c] = m.count;
}

// ---- the ops ----

// What every elementwise task shares: x, the written tensor and the BN constants
// (backward adds grad_out and its two per-channel terms).
template <typename T>
ElementArgs<T> element_args(const Dims& d, const at::Tensor& x, const at::Tensor& out,
                            const ChannelConsts<T>& k) {
  ElementArgs<T> a{};
  a.d = d;
  a.x = x.const_data_ptr<T>();
  a.xs = strides_of(x);
  a.out = out.data_ptr<T>();
  a.os = strides_of(out);
  a.mean = k.mean.data();
  a.scale = k.scale.data();
  a.shift = k.shift.data();
  return a;
}

// Splits elementwise work over (n, c) rows or over positions and runs each range.
template <typename T, class RowsTask, class ChannelsTask>
void parallel_elements(const ElementArgs<T>& a, bool rows, RowsTask rows_task,
                       ChannelsTask channels_task) {
  const Dims& d = a.d;
  at::parallel_for(0, rows ? d.n * d.c : d.positions(), grain_for(rows ? d.hw : d.c),
                   [&](int64_t begin, int64_t end) {
    ElementArgs<T> task = a;
    task.begin = begin;
    task.end = end;
    rows ? rows_task(task) : channels_task(task);
  });
}

template <typename T>
void bn_relu_forward_impl(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
                          const at::Tensor& weight, const at::Tensor& bias,
                          const at::Tensor& out) {
  const Dims d = dims_of(x);
  const ChannelConsts<T> k = channel_consts<T>(mean, rstd, weight, bias);
  const bool channels_inner = channels_innermost(out);
  const Layout layout = layout_of({&x, &out}, channels_inner);
  if (layout == Layout::kStrided) {
    const View<const T> xv = view_of<const T>(x);
    const View<T> ov = view_of<T>(out);
    for_each_element(d, channels_inner, [&](int64_t n, int64_t c, int64_t p) {
      ov(n, c, p) = math::bn_relu(xv(n, c, p), k.mean[c], k.scale[c], k.shift[c]);
    });
    return;
  }
  parallel_elements(element_args(d, x, out, k), layout == Layout::kRows,
                    [](const ElementArgs<T>& task) { forward_rows(task); },
                    [](const ElementArgs<T>& task) { forward_channels(task); });
}

template <typename T>
void bn_relu_backward_reduce_impl(const at::Tensor& grad_out, const at::Tensor& x,
                                  const at::Tensor& mean, const at::Tensor& rstd,
                                  const at::Tensor& weight, const at::Tensor& bias,
                                  const at::Tensor& sum_g, const at::Tensor& sum_gx) {
  const Dims d = dims_of(x);
  const ChannelConsts<T> k = channel_consts<T>(mean, rstd, weight, bias);
  std::vector<double> g(d.c), gx(d.c);
  const Layout layout = layout_of({&x, &grad_out}, channels_innermost(x));
  if (layout == Layout::kStrided) {
    const GradSumsOp<T> op{view_of<const T>(grad_out), view_of<const T>(x), &k};
    const std::vector<GradSums> sums = reduce_channels<GradSums>(d, channels_innermost(x), op);
    for (int64_t c = 0; c < d.c; ++c) {
      g[c] = sums[c].g;
      gx[c] = sums[c].gx;
    }
  } else {
    ReduceArgs<T> a{};
    a.d = d;
    a.x = x.const_data_ptr<T>();
    a.xs = strides_of(x);
    a.g = grad_out.const_data_ptr<T>();
    a.gs = strides_of(grad_out);
    a.mean = k.mean.data();
    a.scale = k.scale.data();
    a.shift = k.shift.data();
    std::vector<double> part_g, part_gx;
    run_reduction<T>(layout, a, part_g, part_gx, grad_sums_rows, grad_sums_channels);
    const bool rows = layout == Layout::kRows;
    const int64_t chunks = rows ? row_chunks(d).count : position_chunks(d).count;
    const int64_t step = rows ? 1 : d.c;  // channel c's chunks, in order
    for (int64_t c = 0; c < d.c; ++c) {
      const int64_t first = rows ? c * chunks : c;
      for (int64_t i = 0; i < chunks; ++i) {
        g[c] += part_g[first + i * step];
        gx[c] += part_gx[first + i * step];
      }
    }
  }
  T* g_out = sum_g.data_ptr<T>();
  T* gx_out = sum_gx.data_ptr<T>();
  for (int64_t c = 0; c < d.c; ++c) {
    g_out[c] = static_cast<T>(g[c]);
    gx_out[c] = static_cast<T>(gx[c]);
  }
}

template <typename T>
void bn_relu_backward_input_impl(const at::Tensor& grad_out, const at::Tensor& x,
                                 const at::Tensor& mean, const at::Tensor& rstd,
                                 const at::Tensor& weight, const at::Tensor& bias,
                                 const at::Tensor& sum_g, const at::Tensor& sum_gx,
                                 const at::Tensor& grad_in, bool training) {
  const Dims d = dims_of(x);
  ChannelConsts<T> k = channel_consts<T>(mean, rstd, weight, bias);
  const T inv_m = T(1) / static_cast<T>(d.positions());
  const T* rstd_p = rstd.data_ptr<T>();
  const T* sum_g_p = sum_g.data_ptr<T>();
  const T* sum_gx_p = sum_gx.data_ptr<T>();
  k.mean_g.resize(d.c);
  k.proj.resize(d.c);
  for (int64_t c = 0; c < d.c; ++c)
    math::backward_consts(rstd_p[c], sum_g_p[c], sum_gx_p[c], inv_m, k.mean_g[c], k.proj[c]);

  const bool channels_inner = channels_innermost(grad_in);
  const Layout layout = layout_of({&x, &grad_out, &grad_in}, channels_inner);
  if (layout == Layout::kStrided) {
    const View<const T> gv = view_of<const T>(grad_out), xv = view_of<const T>(x);
    const View<T> iv = view_of<T>(grad_in);
    const auto run = [&](auto training_tag) {
      constexpr bool kTraining = decltype(training_tag)::value;
      for_each_element(d, channels_inner, [&](int64_t n, int64_t c, int64_t p) {
        iv(n, c, p) += grad_input<T, kTraining>(xv(n, c, p), gv(n, c, p), k.mean[c], k.scale[c],
                                                k.shift[c], k.mean_g[c], k.proj[c]);
      });
    };
    training ? run(std::true_type{}) : run(std::false_type{});
    return;
  }
  ElementArgs<T> a = element_args(d, x, grad_in, k);
  a.g = grad_out.const_data_ptr<T>();
  a.gs = strides_of(grad_out);
  a.mean_g = k.mean_g.data();
  a.proj = k.proj.data();
  a.training = training;
  parallel_elements(a, layout == Layout::kRows,
                    [](const ElementArgs<T>& task) { backward_input_rows(task); },
                    [](const ElementArgs<T>& task) { backward_input_channels(task); });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> batch_stats(const at::Tensor& x, const at::Tensor& running_mean,
                                               const at::Tensor& running_var, double momentum,
                                               double eps) {
  const at::Tensor mean = at::empty({x.size(1)}, x.options());
  const at::Tensor rstd = at::empty({x.size(1)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_stats", [&] {
    finalize<scalar_t>(channel_moments<scalar_t>(x), running_mean, running_var, momentum, eps,
                       mean, rstd);
  });
  return {mean, rstd};
}

at::Tensor batch_moments(const at::Tensor& x) {
  std::vector<Moments> moments;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_moments",
                             [&] { moments = channel_moments<scalar_t>(x); });
  const int64_t channels = x.size(1);
  const at::Tensor out = at::empty({3, channels}, x.options().dtype(at::kDouble));
  double* p = out.data_ptr<double>();
  for (int64_t c = 0; c < channels; ++c) set_moments(p, channels, c, moments[c]);
  return out;
}

std::tuple<at::Tensor, at::Tensor> merge_batch_stats(const at::Tensor& moments,
                                                     const at::Tensor& running_mean,
                                                     const at::Tensor& running_var,
                                                     double momentum, double eps,
                                                     at::ScalarType dtype) {
  const int64_t parts = moments.size(0), channels = moments.size(2);
  const double* p = moments.const_data_ptr<double>();
  std::vector<Moments> merged(channels);
  for (int64_t c = 0; c < channels; ++c)
    merged[c] = merge_moments(
        parts, [&](int64_t k) { return moments_at(p + k * 3 * channels, channels, c); });
  const at::Tensor mean = at::empty({channels}, moments.options().dtype(dtype));
  const at::Tensor rstd = at::empty({channels}, moments.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "merge_batch_stats", [&] {
    finalize<scalar_t>(merged, running_mean, running_var, momentum, eps, mean, rstd);
  });
  return {mean, rstd};
}

std::tuple<at::Tensor, at::Tensor> running_stats(const at::Tensor& running_mean,
                                                 const at::Tensor& running_var, double eps) {
  const int64_t channels = running_var.size(0);
  const at::Tensor mean = at::empty({channels}, running_mean.options());
  const at::Tensor rstd = at::empty({channels}, running_var.options());
  AT_DISPATCH_FLOATING_TYPES(running_var.scalar_type(), "running_stats", [&] {
    const scalar_t* rm = running_mean.const_data_ptr<scalar_t>();
    const scalar_t* rv = running_var.const_data_ptr<scalar_t>();
    scalar_t* mean_out = mean.data_ptr<scalar_t>();
    scalar_t* rstd_out = rstd.data_ptr<scalar_t>();
    for (int64_t c = 0; c < channels; ++c) {
      mean_out[c] = rm[c];
      rstd_out[c] = static_cast<scalar_t>(rstd_of(static_cast<double>(rv[c]), eps));
    }
  });
  return {mean, rstd};
}

void bn_relu_forward(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
                     const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_forward", [&] {
    bn_relu_forward_impl<scalar_t>(x, mean, rstd, weight, bias, out);
  });
}

std::tuple<at::Tensor, at::Tensor> bn_relu_backward_reduce(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& weight, const at::Tensor& bias) {
  const at::Tensor sum_g = at::empty({x.size(1)}, x.options());
  const at::Tensor sum_gx = at::empty({x.size(1)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_backward_reduce", [&] {
    bn_relu_backward_reduce_impl<scalar_t>(grad_out, x, mean, rstd, weight, bias, sum_g,
                                           sum_gx);
  });
  return {sum_g, sum_gx};
}

void bn_relu_backward_input(const at::Tensor& grad_out, const at::Tensor& x,
                            const at::Tensor& mean, const at::Tensor& rstd,
                            const at::Tensor& weight, const at::Tensor& bias,
                            const at::Tensor& sum_g, const at::Tensor& sum_gx,
                            const at::Tensor& grad_in, bool training) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_backward_input", [&] {
    bn_relu_backward_input_impl<scalar_t>(grad_out, x, mean, rstd, weight, bias, sum_g,
                                          sum_gx, grad_in, training);
  });
}

}  // namespace fastres::cpu
