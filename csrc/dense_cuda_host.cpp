// The dense-block ops on CUDA tensors: torch's side of dense_cuda.h.
//
// Compiled by the host compiler against torch's device-generic headers only
// (no CUDA headers: the same source builds against a CPU or a CUDA build of
// torch). Outputs and the reductions' workspaces come from torch's allocator
// on x's device; the kernels run on torch's current stream for that device,
// and nothing waits for them. Callers (bindings.cpp) have checked the
// arguments as for the CPU ops.
#include "dense_cuda_host.h"

#include <ATen/ops/empty.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include "checks.h"
#include "dense_cuda.h"

namespace fastres::cuda {
namespace {

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return FASTRES_FLOAT32;
    case at::kDouble: return FASTRES_FLOAT64;
    case at::kHalf: return FASTRES_FLOAT16;
    case at::kBFloat16: return FASTRES_BFLOAT16;
    default: TORCH_CHECK_TYPE(false, "fastres._C CUDA kernels: unsupported dtype ", dtype_name(t));
  }
}

fastres_problem problem_of(const at::Tensor& x) {
#ifdef FASTRES_EMULATED_CUDA  // the test build: CPU tensors, kernels run on the host (no stream)
  return {x.size(0), x.size(1), x.size(2) * x.size(3), dtype_code(x.scalar_type()), 0, nullptr};
#else
  const c10::Stream stream =
      c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(x.device());
  return {x.size(0), x.size(1), x.size(2) * x.size(3), dtype_code(x.scalar_type()),
          x.device().index(), stream.native_handle()};
#endif
}

fastres_view view_of(const at::Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.stride(1), merged_hw_stride(t)};
}

const void* ptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

void check(const char* op, int err) {
  TORCH_CHECK(err == 0, op, ": fastres._C CUDA kernel failed: ", fastres_cuda_error_string(err));
}

// [C] in the math type (x's parameter dtype).
at::Tensor channel_vector(const at::Tensor& x, at::ScalarType dtype) {
  return at::empty({x.size(1)}, x.options().dtype(dtype));
}

int64_t reduce_parts(const char* op, const fastres_problem& pr, const fastres_view& x,
                     const fastres_view* grad_out) {
  int64_t parts = 0;
  check(op, fastres_cuda_reduce_parts(&pr, &x, grad_out, &parts));
  return parts;
}

// Partial moments of x: [parts, 3, C] float64.
at::Tensor partial_moments(const char* op, const at::Tensor& x) {
  const fastres_problem pr = problem_of(x);
  const fastres_view xv = view_of(x);
  const int64_t parts = reduce_parts(op, pr, xv, nullptr);
  const at::Tensor partials = at::empty({parts, 3, x.size(1)}, x.options().dtype(at::kDouble));
  check(op, fastres_cuda_moments(&pr, &xv, partials.data_ptr<double>(), parts));
  return partials;
}

std::tuple<at::Tensor, at::Tensor> finish(const char* op, const at::Tensor& x,
                                          const at::Tensor& moments, const at::Tensor& running_mean,
                                          const at::Tensor& running_var, double momentum,
                                          double eps, at::ScalarType dtype) {
  const fastres_problem pr = problem_of(x);
  const at::Tensor mean = channel_vector(x, dtype), rstd = channel_vector(x, dtype);
  void* rm = running_mean.defined() ? running_mean.data_ptr() : nullptr;
  void* rv = running_var.defined() ? running_var.data_ptr() : nullptr;
  check(op, fastres_cuda_finish_moments(&pr, moments.const_data_ptr<double>(), moments.size(0),
                                        momentum, eps, rm, rv, mean.data_ptr(), rstd.data_ptr(),
                                        nullptr));
  return {mean, rstd};
}

fastres_channels channels_of(const at::Tensor& mean, const at::Tensor& rstd,
                             const at::Tensor& weight, const at::Tensor& bias,
                             const at::Tensor& sum_g = {}, const at::Tensor& sum_gx = {}) {
  return {ptr(mean), ptr(rstd), ptr(weight), ptr(bias), ptr(sum_g), ptr(sum_gx)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> batch_stats(const at::Tensor& x, const at::Tensor& running_mean,
                                               const at::Tensor& running_var, double momentum,
                                               double eps, at::ScalarType dtype) {
  constexpr const char* op = "batch_stats";
  return finish(op, x, partial_moments(op, x), running_mean, running_var, momentum, eps, dtype);
}

at::Tensor batch_moments(const at::Tensor& x) {
  constexpr const char* op = "batch_moments";
  const at::Tensor partials = partial_moments(op, x);
  const fastres_problem pr = problem_of(x);
  const at::Tensor out = at::empty({3, x.size(1)}, x.options().dtype(at::kDouble));
  check(op, fastres_cuda_finish_moments(&pr, partials.const_data_ptr<double>(), partials.size(0),
                                        0.0, 0.0, nullptr, nullptr, nullptr, nullptr,
                                        out.data_ptr<double>()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> merge_batch_stats(const at::Tensor& x, const at::Tensor& moments,
                                                     const at::Tensor& running_mean,
                                                     const at::Tensor& running_var,
                                                     double momentum, double eps,
                                                     at::ScalarType dtype) {
  return finish("merge_batch_stats", x, moments, running_mean, running_var, momentum, eps, dtype);
}

std::tuple<at::Tensor, at::Tensor> running_stats(const at::Tensor& x, const at::Tensor& running_mean,
                                                 const at::Tensor& running_var, double eps) {
  const fastres_problem pr = problem_of(x);
  const at::Tensor mean = channel_vector(x, running_mean.scalar_type());
  const at::Tensor rstd = channel_vector(x, running_var.scalar_type());
  check("running_stats", fastres_cuda_running_stats(&pr, running_mean.const_data_ptr(),
                                                    running_var.const_data_ptr(), eps,
                                                    mean.data_ptr(), rstd.data_ptr()));
  return {mean, rstd};
}

void bn_relu_forward(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
                     const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& out) {
  const fastres_problem pr = problem_of(x);
  const fastres_view xv = view_of(x), ov = view_of(out);
  const fastres_channels ch = channels_of(mean, rstd, weight, bias);
  check("bn_relu_forward", fastres_cuda_bn_relu_forward(&pr, &xv, &ch, &ov));
}

std::tuple<at::Tensor, at::Tensor> bn_relu_backward_reduce(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& weight, const at::Tensor& bias) {
  constexpr const char* op = "bn_relu_backward_reduce";
  const fastres_problem pr = problem_of(x);
  const fastres_view xv = view_of(x), gv = view_of(grad_out);
  const fastres_channels ch = channels_of(mean, rstd, weight, bias);
  const int64_t parts = reduce_parts(op, pr, xv, &gv);
  const at::Tensor partials = at::empty({parts, 2, x.size(1)}, x.options().dtype(at::kDouble));
  check(op, fastres_cuda_grad_sums(&pr, &gv, &xv, &ch, partials.data_ptr<double>(), parts));
  const at::Tensor sum_g = channel_vector(x, mean.scalar_type());
  const at::Tensor sum_gx = channel_vector(x, mean.scalar_type());
  check(op, fastres_cuda_finish_sums(&pr, partials.const_data_ptr<double>(), parts,
                                     sum_g.data_ptr(), sum_gx.data_ptr()));
  return {sum_g, sum_gx};
}

void bn_relu_backward_input(const at::Tensor& grad_out, const at::Tensor& x,
                            const at::Tensor& mean, const at::Tensor& rstd,
                            const at::Tensor& weight, const at::Tensor& bias,
                            const at::Tensor& sum_g, const at::Tensor& sum_gx,
                            const at::Tensor& grad_in, bool training) {
  const fastres_problem pr = problem_of(x);
  const fastres_view xv = view_of(x), gv = view_of(grad_out), iv = view_of(grad_in);
  const fastres_channels ch = channels_of(mean, rstd, weight, bias, sum_g, sum_gx);
  check("bn_relu_backward_input",
        fastres_cuda_bn_relu_backward_input(&pr, &gv, &xv, &ch, &iv, training ? 1 : 0));
}

bool built() {
  // A property of the build: asked once (the bindings ask on every CUDA call).
  static const bool kernels = [] {
    int count = 0;
    return fastres_cuda_device_count(&count) != FASTRES_NOT_BUILT;
  }();
  return kernels;
}

std::tuple<int, std::string> devices() {
  int count = 0;
  const int err = fastres_cuda_device_count(&count);
  return {count, err == 0 ? std::string() : std::string(fastres_cuda_error_string(err))};
}

}  // namespace fastres::cuda
