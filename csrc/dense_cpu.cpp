// CPU implementation of the dense-block ops (see dense_cpu.h).
//
// Loops run along the smallest stride: over H*W for channel slices of NCHW
// buffers, over channels for channels_last ones. Reductions keep one
// sequential double accumulator per channel (eager CPU batch norm also sums
// float32 in double), so results do not depend on the number of threads.

#include "dense_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <vector>

#include "checks.h"

namespace fastres::cpu {
namespace {

constexpr int64_t kChannelTile = 16;         // channels per task when channels are innermost
constexpr int64_t kElementsPerTask = 32768;  // the smallest parallel task

struct Dims {
  int64_t n, c, hw;
  int64_t positions() const { return n * hw; }  // m: elements per channel
};

Dims dims_of(const at::Tensor& x) { return {x.size(0), x.size(1), x.size(2) * x.size(3)}; }

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

// Channels are t's innermost axis (channels_last): loops then run over channels innermost.
bool channels_innermost(const at::Tensor& t) {
  const Dims d = dims_of(t);
  const int64_t position_stride = d.hw > 1 ? merged_hw_stride(t) : t.stride(0);
  return d.c > 1 && t.stride(1) < position_stride;
}

int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(elements_per_item, 1));
}

template <typename T>
T relu(T y) {  // NaN stays NaN, like torch.relu
  return y <= T(0) ? T(0) : y;
}

// threshold_backward(g, y, 0): the gradient passes where not (y <= 0), NaN y included.
template <typename T>
T relu_grad(T y, T g) {
  return y <= T(0) ? T(0) : g;
}

template <typename T>
struct BnConsts {
  T mean, scale, shift;  // y = (x - mean) * scale + shift
};

template <typename T>
struct BnAffine {
  const T *mean, *invstd, *weight, *bias;  // [C]; weight, bias may be null (1, 0)
  BnConsts<T> consts(int64_t c) const {
    return {mean[c], weight ? invstd[c] * weight[c] : invstd[c], bias ? bias[c] : T(0)};
  }
};

template <typename T>
BnAffine<T> affine_of(const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight,
                      const at::Tensor& bias) {
  return {mean.data_ptr<T>(), invstd.data_ptr<T>(),
          weight.defined() ? weight.data_ptr<T>() : nullptr,
          bias.defined() ? bias.data_ptr<T>() : nullptr};
}

// Calls op(n, c, p, op.consts(c)) for every element, innermost along channels
// or along H*W, as `channels_inner` says (the layout of the written tensor).
template <class Op>
void for_each_element(const Dims& d, bool channels_inner, const Op& op) {
  using Consts = decltype(op.consts(0));
  if (!channels_inner) {
    at::parallel_for(0, d.n * d.c, grain_for(d.hw), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / d.c, c = row % d.c;
        const Consts k = op.consts(c);
        for (int64_t p = 0; p < d.hw; ++p) op(n, c, p, k);
      }
    });
    return;
  }
  std::vector<Consts> per_channel(d.c);
  for (int64_t c = 0; c < d.c; ++c) per_channel[c] = op.consts(c);
  at::parallel_for(0, d.n * d.hw, grain_for(d.c), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / d.hw, p = row % d.hw;
      for (int64_t c = 0; c < d.c; ++c) op(n, c, p, per_channel[c]);
    }
  });
}

// Folds op.add(state, n, c, p, op.consts(c)) over every position of each
// channel, in a fixed order, into one State per channel. With channels
// innermost a task takes a tile of adjacent channels, so that it reads whole
// cache lines.
template <class State, class Op>
std::vector<State> reduce_channels(const Dims& d, bool channels_inner, const Op& op) {
  using Consts = decltype(op.consts(0));
  std::vector<State> states(d.c);
  const int64_t tile = channels_inner ? kChannelTile : 1;
  at::parallel_for(0, at::divup(d.c, tile), grain_for(d.positions() * tile),
                   [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c0 = t * tile, width = std::min(tile, d.c - c0);
      if (width == 1) {
        State state{};
        const Consts k = op.consts(c0);
        for (int64_t n = 0; n < d.n; ++n)
          for (int64_t p = 0; p < d.hw; ++p) op.add(state, n, c0, p, k);
        states[c0] = state;
        continue;
      }
      State tile_states[kChannelTile] = {};
      Consts k[kChannelTile];
      for (int64_t j = 0; j < width; ++j) k[j] = op.consts(c0 + j);
      for (int64_t n = 0; n < d.n; ++n)
        for (int64_t p = 0; p < d.hw; ++p)
          for (int64_t j = 0; j < width; ++j) op.add(tile_states[j], n, c0 + j, p, k[j]);
      std::copy(tile_states, tile_states + width, states.begin() + c0);
    }
  });
  return states;
}

// ---- batch_stats: two passes (mean, then deviations from it) ----

template <typename T>
struct SumOp {
  View<const T> x;
  int consts(int64_t) const { return 0; }
  void add(double& sum, int64_t n, int64_t c, int64_t p, int) const { sum += x(n, c, p); }
};

struct DeviationSums {
  double sum, sum_sq;  // of x - mean: sum is ~0 and corrects sum_sq for mean's rounding
};

template <typename T>
struct DeviationOp {
  View<const T> x;
  const double* mean;
  double consts(int64_t c) const { return mean[c]; }
  void add(DeviationSums& s, int64_t n, int64_t c, int64_t p, double mu) const {
    const double dev = static_cast<double>(x(n, c, p)) - mu;
    s.sum += dev;
    s.sum_sq += dev * dev;
  }
};

template <typename T>
void batch_stats_impl(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var) {
  const Dims d = dims_of(x);
  const bool channels_inner = channels_innermost(x);
  const View<const T> xv = view_of<const T>(x);
  const double m = static_cast<double>(d.positions());  // 0 gives NaN, like an empty mean

  const std::vector<double> sums = reduce_channels<double>(d, channels_inner, SumOp<T>{xv});
  std::vector<double> mu(d.c);
  for (int64_t c = 0; c < d.c; ++c) mu[c] = sums[c] / m;
  const std::vector<DeviationSums> devs =
      reduce_channels<DeviationSums>(d, channels_inner, DeviationOp<T>{xv, mu.data()});

  T* mean_out = mean.data_ptr<T>();
  T* var_out = var.data_ptr<T>();
  for (int64_t c = 0; c < d.c; ++c) {
    const double v = (devs[c].sum_sq - devs[c].sum * devs[c].sum / m) / m;
    mean_out[c] = static_cast<T>(mu[c]);
    var_out[c] = static_cast<T>(v < 0 ? 0.0 : v);  // not std::max: NaN must stay NaN
  }
}

// ---- forward ----

template <typename T>
struct ForwardOp {
  View<const T> x;
  View<T> out;
  BnAffine<T> bn;
  BnConsts<T> consts(int64_t c) const { return bn.consts(c); }
  void operator()(int64_t n, int64_t c, int64_t p, const BnConsts<T>& k) const {
    out(n, c, p) = relu((x(n, c, p) - k.mean) * k.scale + k.shift);
  }
};

// ---- backward ----

struct GradSums {
  double dy, dy_xmu;
};

template <typename T>
struct GradSumsOp {
  View<const T> grad_out, x;
  BnAffine<T> bn;
  BnConsts<T> consts(int64_t c) const { return bn.consts(c); }
  void add(GradSums& s, int64_t n, int64_t c, int64_t p, const BnConsts<T>& k) const {
    const T xmu = x(n, c, p) - k.mean;
    const T dy = relu_grad(xmu * k.scale + k.shift, grad_out(n, c, p));
    s.dy += dy;
    s.dy_xmu += static_cast<double>(dy) * static_cast<double>(xmu);
  }
};

template <typename T>
struct GradInputConsts {
  BnConsts<T> bn;
  T mean_dy, proj;  // sum_dy / m and invstd^2 * sum_dy_xmu / m
};

// grad_in += dx. Eval takes dx = dy * scale alone: 0 * (x - mean) would turn an
// infinite x into NaN.
template <typename T, bool kTraining>
struct GradInputOp {
  View<const T> grad_out, x;
  View<T> grad_in;
  BnAffine<T> bn;
  const T *sum_dy, *sum_dy_xmu;
  T inv_m;
  GradInputConsts<T> consts(int64_t c) const {
    const T invstd = bn.invstd[c];
    return {bn.consts(c), sum_dy[c] * inv_m, invstd * invstd * sum_dy_xmu[c] * inv_m};
  }
  void operator()(int64_t n, int64_t c, int64_t p, const GradInputConsts<T>& k) const {
    const T xmu = x(n, c, p) - k.bn.mean;
    const T dy = relu_grad(xmu * k.bn.scale + k.bn.shift, grad_out(n, c, p));
    const T dx = kTraining ? (dy - k.mean_dy - xmu * k.proj) * k.bn.scale : dy * k.bn.scale;
    grad_in(n, c, p) += dx;
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> batch_stats(const at::Tensor& x) {
  const at::Tensor mean = at::empty({x.size(1)}, x.options());
  const at::Tensor var = at::empty({x.size(1)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_stats",
                             [&] { batch_stats_impl<scalar_t>(x, mean, var); });
  return {mean, var};
}

void bn_relu_forward(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                     const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_forward", [&] {
    const ForwardOp<scalar_t> op{view_of<const scalar_t>(x), view_of<scalar_t>(out),
                                 affine_of<scalar_t>(mean, invstd, weight, bias)};
    for_each_element(dims_of(x), channels_innermost(out), op);
  });
}

std::tuple<at::Tensor, at::Tensor> bn_relu_backward_reduce(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& bias) {
  const at::Tensor sum_dy = at::empty({x.size(1)}, x.options());
  const at::Tensor sum_dy_xmu = at::empty({x.size(1)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_backward_reduce", [&] {
    const GradSumsOp<scalar_t> op{view_of<const scalar_t>(grad_out), view_of<const scalar_t>(x),
                                  affine_of<scalar_t>(mean, invstd, weight, bias)};
    const std::vector<GradSums> sums =
        reduce_channels<GradSums>(dims_of(x), channels_innermost(x), op);
    scalar_t* dy_out = sum_dy.data_ptr<scalar_t>();
    scalar_t* dy_xmu_out = sum_dy_xmu.data_ptr<scalar_t>();
    for (size_t c = 0; c < sums.size(); ++c) {
      dy_out[c] = static_cast<scalar_t>(sums[c].dy);
      dy_xmu_out[c] = static_cast<scalar_t>(sums[c].dy_xmu);
    }
  });
  return {sum_dy, sum_dy_xmu};
}

void bn_relu_backward_input(const at::Tensor& grad_out, const at::Tensor& x,
                            const at::Tensor& mean, const at::Tensor& invstd,
                            const at::Tensor& weight, const at::Tensor& bias,
                            const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu,
                            const at::Tensor& grad_in, bool training) {
  const Dims d = dims_of(x);
  const bool channels_inner = channels_innermost(grad_in);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_relu_backward_input", [&] {
    using T = scalar_t;
    const auto run = [&](auto op) {
      op.grad_out = view_of<const T>(grad_out);
      op.x = view_of<const T>(x);
      op.grad_in = view_of<T>(grad_in);
      op.bn = affine_of<T>(mean, invstd, weight, bias);
      op.sum_dy = sum_dy.data_ptr<T>();
      op.sum_dy_xmu = sum_dy_xmu.data_ptr<T>();
      op.inv_m = T(1) / static_cast<T>(d.positions());
      for_each_element(d, channels_inner, op);
    };
    if (training) {
      run(GradInputOp<T, true>{});
    } else {
      run(GradInputOp<T, false>{});
    }
  });
}

}  // namespace fastres::cpu
