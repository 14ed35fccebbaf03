// CPU implementation of the dense-block ops (float32 and float64).
//
// Callers (bindings.cpp) have checked the arguments: x, grad_out, out and
// grad_in are 4-D with mergeable H, W and x's shape and dtype; the per-channel
// tensors are contiguous [C] of x's parameter dtype; an undefined weight or
// bias stands for 1 or 0.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace fastres::cpu {

// (mean, rstd) of x per channel, rstd = 1 / sqrt(var + eps) of the biased
// variance; running_mean and running_var (both defined, or both undefined: no
// update) become (1 - momentum) * running + momentum * (mean, unbiased var).
std::tuple<at::Tensor, at::Tensor> batch_stats(const at::Tensor& x, const at::Tensor& running_mean,
                                               const at::Tensor& running_var, double momentum,
                                               double eps);

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

}  // namespace fastres::cpu
