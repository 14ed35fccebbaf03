// The dense-block ops on CUDA tensors (dense_cuda_host.cpp): the same ops as
// dense_cpu.h, for x of float32, float64, float16 or bfloat16 on a CUDA
// device. Per-channel tensors are in the math type `dtype` (float64 for
// float64 x, float32 otherwise), contiguous [C] on x's device; running
// buffers, when defined, contiguous in that dtype.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>

namespace fastres::cuda {

std::tuple<at::Tensor, at::Tensor> batch_stats(const at::Tensor& x, const at::Tensor& running_mean,
                                               const at::Tensor& running_var, double momentum,
                                               double eps, at::ScalarType dtype);

at::Tensor batch_moments(const at::Tensor& x);

std::tuple<at::Tensor, at::Tensor> merge_batch_stats(const at::Tensor& x, const at::Tensor& moments,
                                                     const at::Tensor& running_mean,
                                                     const at::Tensor& running_var,
                                                     double momentum, double eps,
                                                     at::ScalarType dtype);

std::tuple<at::Tensor, at::Tensor> running_stats(const at::Tensor& x, const at::Tensor& running_mean,
                                                 const at::Tensor& running_var, double eps);

void bn_relu_forward(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
                     const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& out);

std::tuple<at::Tensor, at::Tensor> bn_relu_backward_reduce(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& rstd, const at::Tensor& weight, const at::Tensor& bias);

void bn_relu_backward_input(const at::Tensor& grad_out, const at::Tensor& x,
                            const at::Tensor& mean, const at::Tensor& rstd,
                            const at::Tensor& weight, const at::Tensor& bias,
                            const at::Tensor& sum_g, const at::Tensor& sum_gx,
                            const at::Tensor& grad_in, bool training);

// Whether the CUDA kernels were compiled into fastres._C.
bool built();

// (devices the CUDA runtime sees, "" or why none).
std::tuple<int, std::string> devices();

}  // namespace fastres::cuda
