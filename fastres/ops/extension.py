"""``fastres._C``'s ops, the shared-storage engine of dense blocks: BatchNorm + ReLU on shared feature buffers.

A dense block keeps every layer's features in one buffer [N, C_total, H, W]
(NCHW or channels_last); a layer reads the channel slice ``buf[:, :C]`` as
``x``, a strided view, never a copy. These wrappers run the C++ code on CPU
tensors and the CUDA kernels (``csrc/dense_cuda.cu``, when ``fastres._C``
was built with them) on CUDA tensors, on the current stream; both share
their arithmetic (``csrc/dense_math.h``).

Each is also a ``torch.library`` custom op (``fastres::dense_*``) with a fake
implementation: under ``torch.compile`` and ``torch.export`` the graph holds
those ops; in eager mode the extension is called directly (the dispatcher's
custom-op handling costs more host time than the call).

x, grad_out, out and grad_in: [N, C, H, W], float32 or float64 (on CUDA also
float16 and bfloat16), any strides under which H and W merge. Per-channel tensors
(mean, rstd, weight, bias, sum_g, sum_gx): [C], float64 for float64 x, float32
otherwise (weight and bias may also be in x's float16/bfloat16 dtype); weight
and bias may be None (affine=False: 1 and 0). m = N * H * W.
``rstd`` is ``1 / sqrt(var + eps)``; ``g`` is the gradient through the ReLU.

All the batch-norm statistics of the engine are computed here, in C++ or
CUDA: batch statistics with the running statistics' update
(``batch_stats``), a synchronized batch norm's (each process's
``batch_moments``, gathered, then ``merge_batch_stats``) and eval's
(``running_stats``).
"""

import torch
from torch import Tensor

from .. import _ext


def _traced() -> bool:
    """Whether the call is being recorded into a graph (compile, export): then the custom op is called."""
    return torch.compiler.is_compiling()


def _channel_vector(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[1], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


@torch.library.custom_op("fastres::dense_batch_stats", mutates_args=("running_mean", "running_var"))
def _batch_stats_op(
    x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, momentum: float, eps: float
) -> tuple[Tensor, Tensor]:
    return _ext.load().batch_stats(x, running_mean, running_var, momentum, eps)


@_batch_stats_op.register_fake
def _(x, running_mean, running_var, momentum, eps):
    return _channel_vector(x), _channel_vector(x)


@torch.library.custom_op("fastres::dense_batch_moments", mutates_args=())
def _batch_moments_op(x: Tensor) -> Tensor:
    return _ext.load().batch_moments(x)


@_batch_moments_op.register_fake
def _(x):
    return x.new_empty((3, x.shape[1]), dtype=torch.float64)


@torch.library.custom_op("fastres::dense_merge_batch_stats", mutates_args=("running_mean", "running_var"))
def _merge_batch_stats_op(
    x: Tensor, moments: Tensor, running_mean: Tensor | None, running_var: Tensor | None, momentum: float, eps: float
) -> tuple[Tensor, Tensor]:
    return _ext.load().merge_batch_stats(x, moments, running_mean, running_var, momentum, eps)


@_merge_batch_stats_op.register_fake
def _(x, moments, running_mean, running_var, momentum, eps):
    return _channel_vector(x), _channel_vector(x)


@torch.library.custom_op("fastres::dense_running_stats", mutates_args=())
def _running_stats_op(x: Tensor, running_mean: Tensor, running_var: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return _ext.load().running_stats(x, running_mean, running_var, eps)


@_running_stats_op.register_fake
def _(x, running_mean, running_var, eps):
    return _channel_vector(x), _channel_vector(x)


@torch.library.custom_op("fastres::dense_bn_relu_forward", mutates_args=("out",))
def _bn_relu_forward_op(
    x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None, out: Tensor
) -> None:
    _ext.load().bn_relu_forward(x, mean, rstd, weight, bias, out)


@_bn_relu_forward_op.register_fake
def _(x, mean, rstd, weight, bias, out):
    return None


@torch.library.custom_op("fastres::dense_bn_relu_backward_reduce", mutates_args=())
def _bn_relu_backward_reduce_op(
    grad_out: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    return _ext.load().bn_relu_backward_reduce(grad_out, x, mean, rstd, weight, bias)


@_bn_relu_backward_reduce_op.register_fake
def _(grad_out, x, mean, rstd, weight, bias):
    return _channel_vector(x), _channel_vector(x)


@torch.library.custom_op("fastres::dense_bn_relu_backward_input", mutates_args=("grad_in",))
def _bn_relu_backward_input_op(
    grad_out: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None,
    sum_g: Tensor, sum_gx: Tensor, grad_in: Tensor, training: bool,
) -> None:
    _ext.load().bn_relu_backward_input(
        grad_out, x, mean, rstd, weight, bias, sum_g, sum_gx, grad_in, training
    )


@_bn_relu_backward_input_op.register_fake
def _(grad_out, x, mean, rstd, weight, bias, sum_g, sum_gx, grad_in, training):
    return None


def batch_stats(
    x: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """Per-channel ``(mean, rstd)`` of x over N, H, W, ``rstd = 1 / sqrt(var + eps)`` (var biased).

    When ``running_mean`` and ``running_var`` are given (both, or neither:
    [C] tensors of a floating dtype on x's device) they are updated in place
    as ``F.batch_norm`` does in training:
    ``running = (1 - momentum) * running + momentum * batch``, with the
    unbiased variance ``var * m / (m - 1)``.
    """
    if _traced():
        return torch.ops.fastres.dense_batch_stats(x, running_mean, running_var, float(momentum), float(eps))
    return _ext.load().batch_stats(x, running_mean, running_var, float(momentum), float(eps))


def batch_moments(x: Tensor) -> Tensor:
    """x's per-channel moments, what a synchronized batch norm gathers from each process.

    A [3, C] float64 tensor: rows ``sum``, ``M2`` (the sum of squared
    deviations from the mean) and ``count`` (m). The running statistics are
    not touched.
    """
    if _traced():
        return torch.ops.fastres.dense_batch_moments(x)
    return _ext.load().batch_moments(x)


def merge_batch_stats(
    x: Tensor,
    moments: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """``batch_stats`` over every process's batch, from their ``batch_moments`` stacked as ``moments`` [W, 3, C].

    The moments merge exactly (Chan et al.; batches may differ in size,
    empty ones are skipped); ``(mean, rstd)`` come in x's parameter dtype (x
    is this process's batch). The running statistics are updated as
    ``batch_stats`` updates them, the variance unbiased over the total count:
    ``torch.nn.SyncBatchNorm``'s update. Every process gets the same results.
    """
    if _traced():
        return torch.ops.fastres.dense_merge_batch_stats(
            x, moments, running_mean, running_var, float(momentum), float(eps)
        )
    return _ext.load().merge_batch_stats(x, moments, running_mean, running_var, float(momentum), float(eps))


def running_stats(x: Tensor, running_mean: Tensor, running_var: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Eval: ``(mean, rstd) = (running_mean, 1 / sqrt(running_var + eps))``, new tensors in x's parameter dtype."""
    if _traced():
        return torch.ops.fastres.dense_running_stats(x, running_mean, running_var, float(eps))
    return _ext.load().running_stats(x, running_mean, running_var, float(eps))


def bn_relu_forward(
    x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None, out: Tensor
) -> None:
    """``out = relu((x - mean) * rstd * weight + bias)``, written into ``out`` (x's shape)."""
    if _traced():
        torch.ops.fastres.dense_bn_relu_forward(x, mean, rstd, weight, bias, out)
    else:
        _ext.load().bn_relu_forward(x, mean, rstd, weight, bias, out)


def bn_relu_backward_reduce(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Per-channel ``(sum_g, sum_gx)``: sums of g and of g * (x - mean).

    y is recomputed from x; ``g = grad_out`` where not ``y <= 0``, else 0
    (torch's threshold_backward: a NaN y passes the gradient). BatchNorm's
    parameter gradients are ``dbias = sum_g`` and ``dweight = sum_gx * rstd``.
    """
    if _traced():
        return torch.ops.fastres.dense_bn_relu_backward_reduce(grad_out, x, mean, rstd, weight, bias)
    return _ext.load().bn_relu_backward_reduce(grad_out, x, mean, rstd, weight, bias)


def bn_relu_backward_input(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    sum_g: Tensor,
    sum_gx: Tensor,
    grad_in: Tensor,
    training: bool,
) -> None:
    """``grad_in += dx``, in place (grad_in is typically a slice of a shared gradient buffer).

    Training (mean, rstd are the batch statistics)::

        dx = weight * rstd * (g - sum_g / m - (x - mean) * rstd**2 * sum_gx / m)

    Eval (running statistics, constants): ``dx = g * weight * rstd``.
    """
    if _traced():
        torch.ops.fastres.dense_bn_relu_backward_input(
            grad_out, x, mean, rstd, weight, bias, sum_g, sum_gx, grad_in, training
        )
    else:
        _ext.load().bn_relu_backward_input(
            grad_out, x, mean, rstd, weight, bias, sum_g, sum_gx, grad_in, training
        )
