"""BatchNorm + ReLU ops for DenseNet's shared feature buffers (``fastres._C``).

A dense block keeps every layer's features in one buffer [N, C_total, H, W]
(NCHW or channels_last); a layer reads the channel slice ``buf[:, :C]`` as
``x``, a strided view, never a copy. These wrappers pass torch's current CUDA
stream on x's device to the kernels (CUDA tensors), or run the C++ CPU
implementation (CPU tensors).

x, grad_out, out and grad_in: [N, C, H, W], float32 or float64 (CUDA: float16
and bfloat16 too), any strides under which H and W merge. Per-channel tensors:
[C], float64 for float64 x, float32 otherwise; weight and bias may be None
(affine=False: 1 and 0). m = N * H * W.
"""

import torch
from torch import Tensor

from .. import _ext


def _stream(x: Tensor) -> int:
    """torch's current stream on x's device as the launchers take it (0: CPU, unused)."""
    return torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else 0


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``(mean, var)`` of x over N, H, W; var is biased (divides by m)."""
    return _ext.load().batch_stats(x, _stream(x))


def bn_relu_forward(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None, out: Tensor
) -> None:
    """``out = relu((x - mean) * invstd * weight + bias)``, written into ``out`` (x's shape)."""
    _ext.load().bn_relu_forward(x, mean, invstd, weight, bias, out, _stream(x))


def bn_relu_backward_reduce(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Per-channel ``(sum_dy, sum_dy_xmu)``: sums of dy and of dy * (x - mean).

    y is recomputed from x; ``dy = grad_out`` where not ``y <= 0``, else 0
    (torch's threshold_backward: a NaN y passes the gradient).
    """
    return _ext.load().bn_relu_backward_reduce(grad_out, x, mean, invstd, weight, bias, _stream(x))


def bn_relu_backward_input(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xmu: Tensor,
    grad_in: Tensor,
    training: bool,
) -> None:
    """``grad_in += dx``, in place (grad_in is typically a slice of a shared gradient buffer).

    Training (mean, invstd are the batch statistics)::

        dx = weight * invstd * (dy - sum_dy / m - (x - mean) * invstd**2 * sum_dy_xmu / m)

    Eval (running statistics, constants): ``dx = dy * weight * invstd``.
    """
    _ext.load().bn_relu_backward_input(
        grad_out, x, mean, invstd, weight, bias, sum_dy, sum_dy_xmu, grad_in, training, _stream(x)
    )
