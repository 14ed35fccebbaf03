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

std::tuple<at::Tensor, at::Tensor> batch_stats(const at::Tensor& x);

void bn_relu_forward(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                     const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& out);

std::tuple<at::Tensor, at::Tensor> bn_relu_backward_reduce(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& bias);

void bn_relu_backward_input(const at::Tensor& grad_out, const at::Tensor& x,
                            const at::Tensor& mean, const at::Tensor& invstd,
                            const at::Tensor& weight, const at::Tensor& bias,
                            const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu,
                            const at::Tensor& grad_in, bool training);

}  // namespace fastres::cpu
