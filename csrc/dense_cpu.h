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

// Per-channel moments of x for a synchronized batch norm: [3, C] float64, rows
// sum, M2 (sum of squared deviations from the mean) and count.
at::Tensor batch_moments(const at::Tensor& x);

// batch_stats over the union of W batches from their moments [W, 3, C]
// (float64, contiguous; batches may differ in size, empty ones are skipped):
// (mean, rstd) in dtype, running statistics updated as batch_stats does with
// the total count (torch.nn.SyncBatchNorm's update).
std::tuple<at::Tensor, at::Tensor> merge_batch_stats(const at::Tensor& moments,
                                                     const at::Tensor& running_mean,
                                                     const at::Tensor& running_var,
                                                     double momentum, double eps,
                                                     at::ScalarType dtype);

// Eval: (running_mean, 1 / sqrt(running_var + eps)), copies in the buffers'
// dtype (both contiguous [C] of one dtype).
std::tuple<at::Tensor, at::Tensor> running_stats(const at::Tensor& running_mean,
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

}  // namespace fastres::cpu
