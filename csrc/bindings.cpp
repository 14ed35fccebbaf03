// fastres._C: BatchNorm+ReLU ops for DenseNet's shared feature buffers, on
// CPU (dense_cpu.cpp) and on CUDA (dense_cuda_host.cpp -> dense_cuda.cu).
//
// Checks every argument, then runs the implementation for x's device. Both
// share their arithmetic (dense_math.h). A CUDA tensor given to a build
// without the CUDA kernels raises a RuntimeError that says so.
//
// Supported dtypes:
//
//   tensor                                 dtype
//   -------------------------------------  ----------------------------------------------------
//   x, grad_out, out, grad_in              float32, float64; on CUDA also float16, bfloat16
//   mean, rstd, sum_g, sum_gx ([C])        float64 for float64 x, float32 otherwise
//   weight, bias ([C])                     as mean; for float16/bfloat16 x also x's dtype
//                                          (converted: a [C] copy)
//   running_mean, running_var ([C])        any floating dtype (updated through a copy in the
//                                          parameter dtype when theirs differs, or when strided)
//   moments ([3, C] or gathered [W, 3, C])  float64
//
// Math runs in double for float64 x and in float otherwise. On CPU the
// reductions are summed in double for float32 too, as eager CPU batch norm
// does; on CUDA they accumulate in the math type per thread and in double
// across blocks.
//
// x and the tensors shaped like it are [N, C, H, W] with any strides under
// which H and W merge into one axis: channel slices buf[:, a:b] of NCHW and of
// channels_last buffers qualify.

#include <torch/extension.h>

#include <algorithm>
#include <optional>
#include <vector>
#include <tuple>

#include "checks.h"
#include "dense_cpu.h"
#include "dense_cuda_host.h"
#include "dense_math.h"

namespace {

// Per-channel tensors are float64 for float64 x, float32 otherwise.
at::ScalarType param_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

bool half_type(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// Whether x's op runs the CUDA kernels: x is a CUDA tensor. The emulated test
// build (FASTRES_EMULATED_CUDA: tests/emulated_cuda.py) runs them on the host,
// on CPU tensors.
bool cuda_kernels_for(const at::Tensor& x) {
#ifdef FASTRES_EMULATED_CUDA
  return x.is_cpu();
#else
  return x.is_cuda();
#endif
}

// x first: its device, then its shape and dtype. Every other tensor must be on
// x's device, so the device check covers them all.
void check_x(const char* op, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.is_cpu() || x.is_cuda(), op,
                    ": fastres._C runs on CPU and CUDA tensors, got x on ", x.device());
  FASTRES_CHECK_DIM(op, "x", x, 4);
  const at::ScalarType dtype = x.scalar_type();
  if (!cuda_kernels_for(x)) {
    TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, op,
                     ": x must have dtype float32 or float64 on CPU, got ",
                     fastres::dtype_name(dtype));
  } else {
    TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || half_type(dtype), op,
                     ": x must have dtype float32, float64, float16 or bfloat16, got ",
                     fastres::dtype_name(dtype));
  }
  FASTRES_CHECK_MERGEABLE(op, "x", x);
  TORCH_CHECK(!cuda_kernels_for(x) || fastres::cuda::built(), op,
              ": x is on ", x.device(), " but this fastres._C was built without its CUDA kernels "
              "(no CUDA toolkit at install time, or FASTRES_CUDA=0); reinstall with nvcc on PATH "
              "or CUDA_HOME set, or let CUDA tensors take fastres's Triton kernels");
}

// grad_out, out, grad_in: x's shape, dtype and device, mergeable strides.
void check_like_x(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                  bool written) {
  FASTRES_CHECK_SAME_DEVICE(op, name, t, "x", x);
  FASTRES_CHECK_DTYPE(op, name, t, x.scalar_type());
  FASTRES_CHECK_SHAPE(op, name, t, x.sizes(), "like x");
  FASTRES_CHECK_MERGEABLE(op, name, t);
  if (written) FASTRES_CHECK_NO_OVERLAP(op, name, t);
}

// A per-channel [C] tensor, made contiguous (C elements: a copy costs nothing).
at::Tensor channel_vector(const char* op, const char* name, const at::Tensor& t,
                          const at::Tensor& x) {
  FASTRES_CHECK_SAME_DEVICE(op, name, t, "x", x);
  FASTRES_CHECK_DTYPE(op, name, t, param_dtype(x));
  const int64_t channels = x.size(1);
  FASTRES_CHECK_SHAPE(op, name, t, at::IntArrayRef(channels), "[C], C = x.size(1)");
  return t.contiguous();
}

// weight or bias: in the parameter dtype, or in x's for float16/bfloat16 x
// (a model converted with .half()), then converted.
at::Tensor optional_channel_vector(const char* op, const char* name,
                                   const std::optional<at::Tensor>& t, const at::Tensor& x) {
  if (!t.has_value()) return at::Tensor();
  if (half_type(x.scalar_type()) && t->scalar_type() == x.scalar_type())
    return channel_vector(op, name, t->to(param_dtype(x)), x);
  return channel_vector(op, name, *t, x);
}

struct BnParams {
  at::Tensor mean, rstd, weight, bias;  // contiguous [C]; weight, bias undefined for None
};

BnParams bn_params(const char* op, const at::Tensor& x, const at::Tensor& mean,
                   const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
                   const std::optional<at::Tensor>& bias) {
  return {channel_vector(op, "mean", mean, x), channel_vector(op, "rstd", rstd, x),
          optional_channel_vector(op, "weight", weight, x),
          optional_channel_vector(op, "bias", bias, x)};
}

// A running statistic, updated in place: `work` is what the CPU code updates
// (the buffer itself when it is contiguous in the parameter dtype, else a
// copy that finish() writes back).
class RunningBuffer {
 public:
  RunningBuffer(const char* op, const char* name, const std::optional<at::Tensor>& t,
                const at::Tensor& x) {
    if (!t.has_value()) return;
    target_ = *t;
    FASTRES_CHECK_SAME_DEVICE(op, name, target_, "x", x);
    TORCH_CHECK_TYPE(at::isFloatingType(target_.scalar_type()), op, ": ", name,
                     " must have a floating-point dtype, got ",
                     fastres::dtype_name(target_.scalar_type()));
    FASTRES_CHECK_SHAPE(op, name, target_, at::IntArrayRef(x.size(1)), "[C], C = x.size(1)");
    const bool direct = target_.scalar_type() == param_dtype(x) && target_.is_contiguous();
    work_ = direct ? target_ : target_.to(param_dtype(x)).contiguous();
  }
  bool defined() const { return work_.defined(); }
  const at::Tensor& work() const { return work_; }
  void finish() const {
    if (work_.defined() && !work_.is_same(target_)) target_.copy_(work_);
  }

 private:
  at::Tensor target_, work_;
};

// The running statistics a training op updates: both given (different
// tensors) or both None.
struct RunningPair {
  RunningBuffer mean, var;
  void finish() const {
    mean.finish();
    var.finish();
  }
};

RunningPair running_pair(const char* op, const std::optional<at::Tensor>& running_mean,
                         const std::optional<at::Tensor>& running_var, const at::Tensor& x) {
  TORCH_CHECK_VALUE(running_mean.has_value() == running_var.has_value(), op,
                    ": running_mean and running_var must both be given or both be None");
  RunningPair running{RunningBuffer(op, "running_mean", running_mean, x),
                      RunningBuffer(op, "running_var", running_var, x)};
  TORCH_CHECK_VALUE(!running.mean.defined() || !running.mean.work().is_same(running.var.work()),
                    op, ": running_mean and running_var must be different tensors");
  return running;
}

// ---- the ops ----

std::tuple<at::Tensor, at::Tensor> batch_stats(const at::Tensor& x,
                                               const std::optional<at::Tensor>& running_mean,
                                               const std::optional<at::Tensor>& running_var,
                                               double momentum, double eps) {
  constexpr const char* op = "batch_stats";
  check_x(op, x);
  const RunningPair running = running_pair(op, running_mean, running_var, x);
  auto [mean, rstd] =
      cuda_kernels_for(x)
          ? fastres::cuda::batch_stats(x, running.mean.work(), running.var.work(), momentum, eps,
                                       param_dtype(x))
          : fastres::cpu::batch_stats(x, running.mean.work(), running.var.work(), momentum, eps);
  running.finish();
  return {mean, rstd};
}

at::Tensor batch_moments(const at::Tensor& x) {
  constexpr const char* op = "batch_moments";
  check_x(op, x);
  return cuda_kernels_for(x) ? fastres::cuda::batch_moments(x) : fastres::cpu::batch_moments(x);
}

// x: this process's batch, which sets the channels, the device and the dtype
// of (mean, rstd); moments: every process's batch_moments, stacked.
std::tuple<at::Tensor, at::Tensor> merge_batch_stats(const at::Tensor& x, const at::Tensor& moments,
                                                     const std::optional<at::Tensor>& running_mean,
                                                     const std::optional<at::Tensor>& running_var,
                                                     double momentum, double eps) {
  constexpr const char* op = "merge_batch_stats";
  check_x(op, x);
  FASTRES_CHECK_SAME_DEVICE(op, "moments", moments, "x", x);
  FASTRES_CHECK_DTYPE(op, "moments", moments, at::kDouble);
  FASTRES_CHECK_DIM(op, "moments", moments, 3);
  TORCH_CHECK_VALUE(moments.size(0) > 0 && moments.size(1) == 3 && moments.size(2) == x.size(1),
                    op, ": moments must have shape [W, 3, C] with W > 0 and C = x.size(1) = ",
                    x.size(1), ", got ", moments.sizes());
  const RunningPair running = running_pair(op, running_mean, running_var, x);
  auto [mean, rstd] =
      cuda_kernels_for(x)
          ? fastres::cuda::merge_batch_stats(x, moments.contiguous(), running.mean.work(),
                                             running.var.work(), momentum, eps, param_dtype(x))
          : fastres::cpu::merge_batch_stats(moments.contiguous(), running.mean.work(),
                                            running.var.work(), momentum, eps, param_dtype(x));
  running.finish();
  return {mean, rstd};
}

std::tuple<at::Tensor, at::Tensor> running_stats(const at::Tensor& x,
                                                 const at::Tensor& running_mean,
                                                 const at::Tensor& running_var, double eps) {
  constexpr const char* op = "running_stats";
  check_x(op, x);
  const RunningBuffer rm(op, "running_mean", running_mean, x);
  const RunningBuffer rv(op, "running_var", running_var, x);
  return cuda_kernels_for(x) ? fastres::cuda::running_stats(x, rm.work(), rv.work(), eps)
                             : fastres::cpu::running_stats(rm.work(), rv.work(), eps);
}

void bn_relu_forward(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
                     const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias, const at::Tensor& out) {
  constexpr const char* op = "bn_relu_forward";
  check_x(op, x);
  const BnParams bn = bn_params(op, x, mean, rstd, weight, bias);
  check_like_x(op, "out", out, x, /*written=*/true);
  if (cuda_kernels_for(x))
    fastres::cuda::bn_relu_forward(x, bn.mean, bn.rstd, bn.weight, bn.bias, out);
  else
    fastres::cpu::bn_relu_forward(x, bn.mean, bn.rstd, bn.weight, bn.bias, out);
}

std::tuple<at::Tensor, at::Tensor> bn_relu_backward_reduce(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "bn_relu_backward_reduce";
  check_x(op, x);
  check_like_x(op, "grad_out", grad_out, x, /*written=*/false);
  const BnParams bn = bn_params(op, x, mean, rstd, weight, bias);
  if (cuda_kernels_for(x))
    return fastres::cuda::bn_relu_backward_reduce(grad_out, x, bn.mean, bn.rstd, bn.weight,
                                                  bn.bias);
  return fastres::cpu::bn_relu_backward_reduce(grad_out, x, bn.mean, bn.rstd, bn.weight,
                                               bn.bias);
}

void bn_relu_backward_input(const at::Tensor& grad_out, const at::Tensor& x,
                            const at::Tensor& mean, const at::Tensor& rstd,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& sum_g,
                            const at::Tensor& sum_gx, const at::Tensor& grad_in,
                            bool training) {
  constexpr const char* op = "bn_relu_backward_input";
  check_x(op, x);
  check_like_x(op, "grad_out", grad_out, x, /*written=*/false);
  const BnParams bn = bn_params(op, x, mean, rstd, weight, bias);
  const at::Tensor g_sums = channel_vector(op, "sum_g", sum_g, x);
  const at::Tensor gx_sums = channel_vector(op, "sum_gx", sum_gx, x);
  check_like_x(op, "grad_in", grad_in, x, /*written=*/true);
  if (cuda_kernels_for(x))
    fastres::cuda::bn_relu_backward_input(grad_out, x, bn.mean, bn.rstd, bn.weight, bn.bias,
                                          g_sums, gx_sums, grad_in, training);
  else
    fastres::cpu::bn_relu_backward_input(grad_out, x, bn.mean, bn.rstd, bn.weight, bn.bias,
                                         g_sums, gx_sums, grad_in, training);
}

// ---- the CUDA reductions' folding, run on the host (tests) ----

// x's moments as the CUDA statistics kernels fold them: x less its first
// element, `threads` threads, thread t taking every threads-th chunk of kChunk values into a Welford
// state (chunk_moments, welford_merge in the math type), then the threads
// merged pairwise as a warp's shuffles merge them. Returns (count, sum, M2).
template <typename T, int kChunk>
std::tuple<double, double, double> fold_moments_impl(const at::Tensor& x, int64_t threads) {
  using A = T;
  const T* p = x.const_data_ptr<T>();
  const int64_t n = x.numel();
  // The kernels fold x - (its first element, if finite).
  const A shift = n > 0 ? fastres::math::finite_or_zero(static_cast<A>(p[0])) : A(0);
  std::vector<fastres::math::Welford<A>> state(threads, fastres::math::Welford<A>{0, 0, 0});
  for (int64_t start = 0, chunk = 0; start < n; start += kChunk, ++chunk) {
    A values[kChunk] = {};
    const int valid = static_cast<int>(std::min<int64_t>(kChunk, n - start));
    for (int i = 0; i < valid; ++i) values[i] = static_cast<A>(p[start + i]) - shift;
    auto& w = state[chunk % threads];
    w = fastres::math::welford_merge(w, fastres::math::chunk_moments<A, kChunk>(values, valid));
  }
  for (int64_t offset = 1; offset < threads; offset *= 2)  // a shuffle tree: lane i takes lane i + offset
    for (int64_t i = 0; i + offset < threads; i += 2 * offset)
      state[i] = fastres::math::welford_merge(state[i], state[i + offset]);
  const fastres::math::Moments m = fastres::math::to_moments(state[0], static_cast<double>(shift));
  return {m.count, m.sum, m.m2};
}

std::tuple<double, double, double> fold_moments(const at::Tensor& x, int64_t chunk,
                                                int64_t threads) {
  constexpr const char* op = "_fold_moments";
  TORCH_CHECK_VALUE(x.is_cpu() && x.dim() == 1 && x.is_contiguous(), op,
                    ": x must be a contiguous 1-D CPU tensor");
  TORCH_CHECK_VALUE(threads > 0 && (threads & (threads - 1)) == 0, op,
                    ": threads must be a power of two");
  TORCH_CHECK_VALUE(chunk == 4 || chunk == 16, op, ": chunk must be 4 or 16");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                   ": x must be float32 or float64");
  if (x.scalar_type() == at::kFloat)
    return chunk == 4 ? fold_moments_impl<float, 4>(x, threads)
                      : fold_moments_impl<float, 16>(x, threads);
  return chunk == 4 ? fold_moments_impl<double, 4>(x, threads)
                    : fold_moments_impl<double, 16>(x, threads);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "fastres C++/CUDA ops for DenseNet's shared feature buffers (see fastres.ops.extension)";
  m.def("cuda_built", &fastres::cuda::built,
        "Whether this build holds the CUDA kernels (compiled with nvcc at install time).");
  m.def("_fold_moments", &fold_moments,
        "Test hook: (count, sum, M2) of a 1-D tensor folded as the CUDA statistics kernels fold "
        "(chunks of `chunk` values per Welford step, `threads` threads merged pairwise).",
        py::arg("x"), py::arg("chunk"), py::arg("threads"));
  m.def("cuda_devices", &fastres::cuda::devices,
        "(CUDA devices the kernels' runtime sees, '' or the CUDA runtime's reason for none).");
  // The ops release the GIL: CPU work runs on ATen's thread pool.
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("batch_stats", &batch_stats, no_gil,
        "(mean, rstd) per channel of x, rstd = 1 / sqrt(var + eps) of the biased variance; "
        "running_mean and running_var (or None) are updated in place with momentum and the "
        "unbiased variance.",
        py::arg("x"), py::arg("running_mean"), py::arg("running_var"), py::arg("momentum"),
        py::arg("eps"));
  m.def("batch_moments", &batch_moments, no_gil,
        "Per-channel moments of x, [3, C] float64: rows sum, M2 (sum of squared deviations "
        "from the mean) and count; what a synchronized batch norm gathers.",
        py::arg("x"));
  m.def("merge_batch_stats", &merge_batch_stats, no_gil,
        "batch_stats over several processes' batches from their gathered moments [W, 3, C] "
        "(Chan et al.'s merge; batches may differ in size): (mean, rstd) in x's parameter "
        "dtype; running_mean and running_var (or None) are updated in place with momentum and "
        "the variance unbiased over the total count, as torch.nn.SyncBatchNorm does.",
        py::arg("x"), py::arg("moments"), py::arg("running_mean"), py::arg("running_var"),
        py::arg("momentum"), py::arg("eps"));
  m.def("running_stats", &running_stats, no_gil,
        "Eval: (mean, rstd) = (running_mean, 1 / sqrt(running_var + eps)), new tensors in x's "
        "parameter dtype.",
        py::arg("x"), py::arg("running_mean"), py::arg("running_var"), py::arg("eps"));
  m.def("bn_relu_forward", &bn_relu_forward, no_gil,
        "out = relu((x - mean) * rstd * weight + bias).", py::arg("x"), py::arg("mean"),
        py::arg("rstd"), py::arg("weight"), py::arg("bias"), py::arg("out"));
  m.def("bn_relu_backward_reduce", &bn_relu_backward_reduce, no_gil,
        "(sum_g, sum_gx) per channel: sums of g and g * (x - mean), g = grad_out where not "
        "(y <= 0).",
        py::arg("grad_out"), py::arg("x"), py::arg("mean"), py::arg("rstd"),
        py::arg("weight"), py::arg("bias"));
  m.def("bn_relu_backward_input", &bn_relu_backward_input, no_gil,
        "grad_in += dx, through the batch statistics when training.", py::arg("grad_out"),
        py::arg("x"), py::arg("mean"), py::arg("rstd"), py::arg("weight"), py::arg("bias"),
        py::arg("sum_g"), py::arg("sum_gx"), py::arg("grad_in"), py::arg("training"));
}
