"""Fused BN-ReLU-Conv2d: implementations, custom ops and autograd.

``y = conv2d(relu(batch_norm(x)), weight, bias, stride, padding)`` with the
BN-ReLU applied while the convolution loads its input (``fastres.kernels.
bn_relu_conv``): the activation is never written, forward or backward.
Backward keeps x, ``stats = [mean | rstd | count]`` and the parameters, and
runs three launches in training (dgrad with the ReLU mask and the BN sums in
its epilogue, the elementwise dx, wgrad; two in eval, where dgrad writes dx).

``fastres::bn_relu_conv2d`` and ``fastres::bn_relu_conv2d_backward`` are what
``torch.compile`` sees (opaque calls with fake implementations); in eager mode
the autograd Function calls their implementations directly, as the batch-norm
op does. Where the fused kernels do not apply (CPU without the interpreter,
groups or dilation > 1, empty tensors, ``torch.jit.trace``) the op is eager
PyTorch: batch norm, ReLU, then ``F.conv2d``.
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._prims_common import suggest_memory_format

from . import apply_function, kernels, require_triton, use_triton
from .owned import mark_owned
from .batch_norm import differentiable_batch_norm
from .layout import acc_dtype, channels_last, conv_dtype, empty_out, out_strides, shape3, view3


def output_shape(x: Tensor, weight: Tensor, stride, padding) -> tuple[int, int, int, int]:
    n, _, h, w = x.shape
    co, _, kh, kw = weight.shape
    return n, co, (h + 2 * padding[0] - kh) // stride[0] + 1, (w + 2 * padding[1] - kw) // stride[1] + 1


def output_channels_last(x: Tensor, weight: Tensor) -> bool:
    """The layout eager's convolution gives ``conv2d(relu(bn(x)), weight)``: channels_last if either operand is."""
    return channels_last(x) or (weight.dim() == 4 and not weight.is_contiguous()
                                and suggest_memory_format(weight) == torch.channels_last)


def empty_output(x: Tensor, weight: Tensor, stride, padding, dtype: torch.dtype) -> Tensor:
    fmt = torch.channels_last if output_channels_last(x, weight) else torch.contiguous_format
    return torch.empty(output_shape(x, weight, stride, padding), dtype=dtype, device=x.device, memory_format=fmt)


def empty_weight_grad(x: Tensor, weight: Tensor) -> Tensor:
    """conv_weight's gradient, in the layout eager's convolution backward gives it: the output's."""
    fmt = torch.channels_last if output_channels_last(x, weight) else torch.contiguous_format
    return torch.empty(weight.shape, dtype=weight.dtype, device=x.device, memory_format=fmt)


def statistics(x, running_mean, running_var, training, momentum, eps, out: Tensor | None = None) -> Tensor:
    """``[mean | rstd | count]``: the batch's (running statistics updated in place) or, in eval, the running ones."""
    c = x.shape[1]
    stats = torch.empty(2 * c + 1, dtype=acc_dtype(x), device=x.device) if out is None else out
    k = kernels("batch_norm")
    if training:
        x3, xs = view3(x)
        k.batch_norm_stats(x3, shape3(x), xs, stats, running_mean, running_var, momentum, eps)
    else:  # fixed now, for backward, even if the buffers change later
        k.batch_norm_eval_stats(running_mean, running_var, stats, x.numel() // max(c, 1), eps)
    return stats


def forward(x, bn_weight, bn_bias, running_mean, running_var, conv_weight, conv_bias, stride, padding,
            training, momentum, eps, dtype, allow_tf32, out=None):
    """(y, stats). ``dtype``: what the convolution runs in (and y's dtype); ``out``: y's storage, any strides."""
    stats = statistics(x, running_mean, running_var, training, momentum, eps)
    k = kernels("bn_relu_conv")
    weight = k.mma_weight(conv_weight, dtype)
    bias = None if conv_bias is None else conv_bias.to(dtype)
    y = empty_output(x, conv_weight, stride, padding, dtype) if out is None else out
    k.conv_forward(
        x, stats, bn_weight, bn_bias, weight, bias, y, tuple(stride), tuple(padding), allow_tf32,
    )
    return y, stats


def backward(grad, x, stats, bn_weight, bn_bias, conv_weight, stride, padding, training, need, allow_tf32):
    """(dx, dbn_weight, dbn_bias, dconv_weight, dconv_bias); ``need`` says which, the rest are None.

    ``grad`` has the forward's convolution dtype; the weight's gradient gets
    ``conv_weight``'s own dtype, as autocast's cast gives it.
    """
    need_dx, need_dw, need_db, need_dcw, need_dcb = need
    k = kernels("bn_relu_conv")
    stride, padding = tuple(stride), tuple(padding)
    dx = dw = db = dcw = dcb = None
    weight = k.mma_weight(conv_weight, grad.dtype)
    if need_dx or need_dw or need_db:
        c_last = channels_last(x)
        g = empty_out(x, c_last)
        sums = torch.empty(2 * x.shape[1], dtype=stats.dtype, device=x.device) \
            if (training and need_dx) or need_dw or need_db else None
        dw = torch.empty_like(bn_weight) if need_dw else None
        db = torch.empty_like(bn_bias) if need_db else None
        k.conv_dgrad(grad, weight, x, stats, bn_weight, bn_bias, g, sums, dw, db, stride, padding,
                     not training, allow_tf32)
        if need_dx:
            if training:  # dx over g, in place
                shape = shape3(x)
                x3, xs = view3(x)
                kernels("batch_norm_backward").batch_norm_relu_backward_elementwise(
                    g, out_strides(shape, c_last), x3, xs, shape, out_strides(shape, c_last), None, stats,
                    bn_weight, sums, g, None, c_last,
                )
            dx = mark_owned(g)  # fresh: a dense block's backward may accumulate into it
    if need_dcw:
        dcw = empty_weight_grad(x, conv_weight)
        k.conv_wgrad(grad, x, stats, bn_weight, bn_bias, dcw, stride, padding, allow_tf32)
    if need_dcb:
        dcb = grad.sum((0, 2, 3), dtype=acc_dtype(grad))
    return dx, dw, db, dcw, dcb


# --- custom ops: what torch.compile sees -----------------------------------


@torch.library.custom_op("fastres::bn_relu_conv2d", mutates_args=("running_mean", "running_var"))
def bn_relu_conv2d_op(
    x: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None, running_mean: Tensor | None,
    running_var: Tensor | None, conv_weight: Tensor, conv_bias: Tensor | None, stride: list[int], padding: list[int],
    training: bool, momentum: float, eps: float, dtype: torch.dtype, allow_tf32: bool,
) -> tuple[Tensor, Tensor]:
    """(y, stats)."""
    require_triton(x, "fastres::bn_relu_conv2d")
    return forward(x, bn_weight, bn_bias, running_mean, running_var, conv_weight, conv_bias, stride, padding,
                   training, momentum, eps, dtype, allow_tf32)


@bn_relu_conv2d_op.register_fake
def _(x, bn_weight, bn_bias, running_mean, running_var, conv_weight, conv_bias, stride, padding, training,
      momentum, eps, dtype, allow_tf32):
    return empty_output(x, conv_weight, stride, padding, dtype), x.new_empty(2 * x.shape[1] + 1, dtype=acc_dtype(x))


@torch.library.custom_op("fastres::bn_relu_conv2d_backward", mutates_args=())
def bn_relu_conv2d_backward_op(
    grad: Tensor, x: Tensor, stats: Tensor, bn_weight: Tensor | None, bn_bias: Tensor | None, conv_weight: Tensor,
    stride: list[int], padding: list[int], training: bool, need: list[bool], allow_tf32: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dbn_weight, dbn_bias, dconv_weight, dconv_bias); those not needed are empty."""
    require_triton(x, "fastres::bn_relu_conv2d_backward")
    grads = backward(grad, x, stats, bn_weight, bn_bias, conv_weight, stride, padding, training, need, allow_tf32)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@bn_relu_conv2d_backward_op.register_fake
def _(grad, x, stats, bn_weight, bn_bias, conv_weight, stride, padding, training, need, allow_tf32):
    empty = x.new_empty(0)
    return (
        empty_out(x, channels_last(x)) if need[0] else empty,
        torch.empty_like(bn_weight) if need[1] else empty,
        torch.empty_like(bn_bias) if need[2] else empty,
        empty_weight_grad(x, conv_weight) if need[3] else empty,
        grad.new_empty(grad.shape[1], dtype=acc_dtype(grad)) if need[4] else empty,
    )


# --- autograd ---------------------------------------------------------------

_GRAD_INPUTS = (0, 1, 2, 5, 6)  # x, bn_weight, bn_bias, conv_weight, conv_bias


class BNReLUConv2dFunction(torch.autograd.Function):
    """Autograd for the fused op: saves x, stats and the parameters, nothing of a's size.

    ``forward`` returns ``(y, stats)`` (stats non-differentiable) so that
    ``setup_context`` can save it: the form functorch transforms require.
    """

    @staticmethod
    def forward(x, bn_weight, bn_bias, running_mean, running_var, conv_weight, conv_bias, stride, padding,
                training, momentum, eps, dtype, allow_tf32):
        args = (x, bn_weight, bn_bias, running_mean, running_var, conv_weight, conv_bias, list(stride),
                list(padding), training, momentum, eps, dtype, allow_tf32)
        if torch.compiler.is_compiling():
            return torch.ops.fastres.bn_relu_conv2d(*args)
        require_triton(x, "fastres::bn_relu_conv2d")
        return forward(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, bn_weight, bn_bias, _, _, conv_weight, conv_bias, stride, padding, training, _, eps, dtype, allow_tf32 = inputs
        _, stats = output
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, bn_weight, bn_bias, conv_weight, conv_bias, stats)
        ctx.stride, ctx.padding, ctx.training, ctx.eps = list(stride), list(padding), training, eps
        ctx.dtype, ctx.allow_tf32 = dtype, allow_tf32

    @staticmethod
    def backward(ctx, grad, _stats):
        if grad is None:
            return (None,) * 14
        x, bn_weight, bn_bias, conv_weight, conv_bias, stats = ctx.saved_tensors
        need = [ctx.needs_input_grad[i] for i in _GRAD_INPUTS]
        if torch.is_grad_enabled():  # create_graph=True: the backward as a graph of torch ops
            grads = _differentiable_backward(ctx, grad, x, bn_weight, bn_bias, conv_weight, conv_bias, stats, need)
        else:
            args = (grad.to(ctx.dtype), x, stats, bn_weight, bn_bias, conv_weight, ctx.stride, ctx.padding,
                    ctx.training, need, ctx.allow_tf32)
            if torch.compiler.is_compiling():
                grads = torch.ops.fastres.bn_relu_conv2d_backward(*args)
            else:
                grads = backward(*args)
        result = [None] * 14
        for i, n, g, like in zip(_GRAD_INPUTS, need, grads, (x, bn_weight, bn_bias, conv_weight, conv_bias)):
            if n:
                result[i] = g.to(like.dtype)
        return tuple(result)


def _differentiable_backward(ctx, grad, x, bn_weight, bn_bias, conv_weight, conv_bias, stats, need):
    """The five gradients recomputed with torch ops, differentiably (the backward of a backward)."""
    c = x.shape[1]
    inputs = [(t, n) for t, n in zip((x, bn_weight, bn_bias, conv_weight, conv_bias), need)]
    wanted = [t for t, n in inputs if n]
    with torch.enable_grad():
        a = F.relu(differentiable_batch_norm(x, bn_weight, bn_bias, stats[:c], stats[c : 2 * c], ctx.training, ctx.eps))
        y = F.conv2d(a.to(ctx.dtype), conv_weight.to(ctx.dtype), None if conv_bias is None else conv_bias.to(ctx.dtype),
                     ctx.stride, ctx.padding)
        grads = iter(torch.autograd.grad(y, wanted, grad, create_graph=True) if wanted else ())
    return tuple(next(grads) if n else None for _, n in inputs)


# --- entry point ------------------------------------------------------------


def eager(x, running_mean, running_var, bn_weight, bn_bias, conv_weight, conv_bias, stride, padding, dilation,
          groups, training, momentum, eps):
    """The computation the fused op replaces, in eager PyTorch."""
    a = F.relu(F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps))
    return F.conv2d(a, conv_weight, conv_bias, stride, padding, dilation, groups)


def fused_applies(x: Tensor, conv_weight: Tensor, padding, dilation, groups) -> bool:
    """Whether the Triton kernels run this call (else eager PyTorch)."""
    return (use_triton(x) and groups == 1 and tuple(dilation) == (1, 1) and not isinstance(padding, str)
            and x.numel() > 0 and conv_weight.shape[0] > 0)


def bn_relu_conv2d(x, running_mean, running_var, bn_weight, bn_bias, conv_weight, conv_bias, stride, padding,
                   dilation, groups, training, momentum, eps):
    """Arguments already checked (stride, padding, dilation as pairs); builds a graph only when a gradient can flow."""
    if not fused_applies(x, conv_weight, padding, dilation, groups):
        return eager(x, running_mean, running_var, bn_weight, bn_bias, conv_weight, conv_bias, stride, padding,
                     dilation, groups, training, momentum, eps)
    dtype = conv_dtype(x)
    allow_tf32 = torch.backends.cudnn.allow_tf32
    args = (x, bn_weight, bn_bias, running_mean, running_var, conv_weight, conv_bias, stride, padding, training,
            momentum, eps, dtype, allow_tf32)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, bn_weight, bn_bias, conv_weight, conv_bias)):
        if not torch.compiler.is_compiling() and x.is_inference():  # (dynamo breaks its graph on is_inference)
            # Autograd cannot save an inference-mode x, which the fused backward needs; eager keeps
            # its own activations instead (and fails alike when the BN parameters need gradients).
            return eager(x, running_mean, running_var, bn_weight, bn_bias, conv_weight, conv_bias, stride, padding,
                         (1, 1), 1, training, momentum, eps)
        return apply_function(BNReLUConv2dFunction, *args)[0]
    if torch.compiler.is_compiling():
        return torch.ops.fastres.bn_relu_conv2d(*args[:7], list(stride), list(padding), *args[9:])[0]
    return forward(*args)[0]
