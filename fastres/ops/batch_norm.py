"""Fused BatchNorm (+ residual add) + ReLU: implementations, custom ops and autograd.

Two ops, ``fastres::batch_norm_relu`` (the whole forward: statistics,
running-stat update, apply) and ``fastres::batch_norm_relu_backward``, are
registered with ``torch.library`` so that ``torch.compile`` sees opaque calls
with fake implementations. In eager mode ``BatchNormReLUFunction`` calls their Python
implementations directly: the dispatcher's handling of a custom op with
mutated arguments costs more host time (70-95 us) than the kernels' launches.

Every function takes 4-D tensors. The kernels see [N, C, H*W] views; an input
whose H and W cannot merge into one stride is copied once (only odd views do
that). Backward saves x, ``stats = [mean | rstd | count]`` and the 1-bit ReLU
mask: eager saves x and the whole output. The synchronized op
(``sync_batch_norm``) is built from the same pieces.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from . import apply_function, kernels, require_triton, use_triton
from .bitmask import unpack_mask
from .layout import acc_dtype, channels_last, empty_out, out_strides, shape3, view3


def new_bn_mask(shape: tuple[int, int, int], c_last: bool, device: torch.device, needed: bool) -> Tensor:
    """An uninitialised ReLU mask for an [N, C, HW] output (empty when not ``needed``)."""
    size = kernels("batch_norm").mask_bytes(shape, c_last) if needed else 0
    return torch.empty(size, dtype=torch.uint8, device=device)


def apply(x, stats, weight, bias, residual, c_last, save_mask):
    """(out, mask) normalised with ``stats`` (training statistics), out laid out as eager's."""
    out = empty_out(x, c_last)
    shape = shape3(x)
    mask = new_bn_mask(shape, c_last, x.device, save_mask)
    if out.numel():
        x, xs = view3(x)
        r, rs = view3(residual) if residual is not None else (None, None)
        kernels("batch_norm").batch_norm_relu_apply(
            x, xs, out, out_strides(shape, c_last), shape, mask if save_mask else None, stats, stats, shape[1],
            weight, bias, r, rs, 0.0, False, c_last,
        )
    return out, mask


def forward(x, weight, bias, running_mean, running_var, residual, training, momentum, eps, save_mask):
    """(out, stats, mask). In eval, stats come from the running statistics (empty unless ``save_mask``)."""
    c_last = channels_last(x)
    shape = shape3(x)
    c = shape[1]
    acc = acc_dtype(x)
    k = kernels("batch_norm")
    x3, xs = view3(x)
    r, rs = view3(residual) if residual is not None else (None, None)
    out = empty_out(x, c_last)
    mask = new_bn_mask(shape, c_last, x.device, save_mask)
    # Eval: backward's statistics are fixed now, even if the buffers change later.
    stats = torch.empty(2 * c + 1 if training or save_mask else 0, dtype=acc, device=x.device)
    if training:
        k.batch_norm_stats(x3, shape, xs, stats, running_mean, running_var, momentum, eps)
        mean, rstd_or_var, offset = stats, stats, c
    else:
        mean, rstd_or_var, offset = running_mean, running_var, 0
    k.batch_norm_relu_apply(
        x3, xs, out, out_strides(shape, c_last), shape, mask if save_mask else None, mean, rstd_or_var, offset,
        weight, bias, r, rs, eps, not training, c_last, stats if save_mask and not training else None,
    )
    return out, stats, mask


def backward_reduce(grad, x, mask, stats, weight, bias, c_last, need_dw, need_db):
    """(sums [2C], dweight, dbias): the per-channel sums of g and g * (x - mean); dw/db None unless needed."""
    dw = torch.empty_like(weight) if need_dw else None
    db = torch.empty_like(bias) if need_db else None
    shape = shape3(x)
    sums = torch.empty(2 * shape[1], dtype=stats.dtype, device=x.device)
    g, gs = view3(grad)
    x, xs = view3(x)
    kernels("batch_norm_backward").batch_norm_relu_backward_reduce(
        g, gs, x, xs, shape, mask, c_last, stats, sums, dw, db,
    )
    return sums, dw, db


def backward_elementwise(grad, x, mask, stats, weight, sums, c_last, need_dx, dr_dtype):
    """(dx, dresidual), each None unless needed; ``sums`` None in eval mode."""
    dx = empty_out(x, c_last) if need_dx else None
    dr = empty_out(x, c_last, dr_dtype) if dr_dtype is not None else None
    if (dx is not None or dr is not None) and x.numel():
        shape = shape3(x)
        g, gs = view3(grad)
        x, xs = view3(x)
        kernels("batch_norm_backward").batch_norm_relu_backward_elementwise(
            g, gs, x, xs, shape, out_strides(shape, c_last), mask, stats, weight, sums, dx, dr, c_last,
        )
    return dx, dr


def backward(grad, x, mask, stats, weight, bias, training, need_dx, need_dw, need_db, dr_dtype):
    """(dx, dweight, dbias, dresidual); those not needed are None."""
    c_last = channels_last(x)
    sums, dw, db = None, None, None
    if training and need_dx or need_dw or need_db:
        sums, dw, db = backward_reduce(grad, x, mask, stats, weight, bias, c_last, need_dw, need_db)
    dx, dr = backward_elementwise(grad, x, mask, stats, weight, sums if training else None, c_last, need_dx, dr_dtype)
    return dx, dw, db, dr


# --- custom ops: what torch.compile sees -----------------------------------


@torch.library.custom_op("fastres::batch_norm_relu", mutates_args=("running_mean", "running_var"))
def batch_norm_relu_op(
    x: Tensor, weight: Tensor | None, bias: Tensor | None,
    running_mean: Tensor | None, running_var: Tensor | None, residual: Tensor | None,
    training: bool, momentum: float, eps: float, save_mask: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out, stats, mask); ``stats = [mean | rstd | count]`` (eval: from the running statistics)."""
    require_triton(x, "fastres::batch_norm_relu")
    return forward(x, weight, bias, running_mean, running_var, residual, training, momentum, eps, save_mask)


@batch_norm_relu_op.register_fake
def _(x, weight, bias, running_mean, running_var, residual, training, momentum, eps, save_mask):
    stats = x.new_empty(2 * x.shape[1] + 1 if training or save_mask else 0, dtype=acc_dtype(x))
    c_last = channels_last(x)
    return empty_out(x, c_last), stats, new_bn_mask(shape3(x), c_last, x.device, save_mask)


def _none_to_empty(*ts: Tensor | None) -> tuple[Tensor, ...]:
    return tuple(t if t is not None else torch.empty(0) for t in ts)


@torch.library.custom_op("fastres::batch_norm_relu_backward", mutates_args=())
def batch_norm_relu_backward_op(
    grad: Tensor, x: Tensor, mask: Tensor, stats: Tensor, weight: Tensor | None, bias: Tensor | None,
    training: bool, need_dx: bool, need_dw: bool, need_db: bool, dr_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dresidual); those not needed are empty."""
    require_triton(x, "fastres::batch_norm_relu_backward")
    return _none_to_empty(*backward(grad, x, mask, stats, weight, bias, training, need_dx, need_dw, need_db, dr_dtype))


@batch_norm_relu_backward_op.register_fake
def _(grad, x, mask, stats, weight, bias, training, need_dx, need_dw, need_db, dr_dtype):
    c_last = channels_last(x)
    empty = x.new_empty(0)
    return (
        empty_out(x, c_last) if need_dx else empty,
        torch.empty_like(weight) if need_dw else empty,
        torch.empty_like(bias) if need_db else empty,
        empty_out(x, c_last, dr_dtype) if dr_dtype is not None else empty,
    )


def input_grads(ctx, n_inputs: int, dx, dw, db, dr) -> tuple:
    """Backward's return value: the gradients of x, weight, bias (inputs 0-2) and the
    residual (input 5) where they are needed, None for every other input."""
    grads = [None] * n_inputs
    for i, g in zip((0, 1, 2, 5), (dx, dw, db, dr)):
        if ctx.needs_input_grad[i]:
            grads[i] = g
    return tuple(grads)


def unpack_bn_mask(mask: Tensor, x: Tensor, c_last: bool) -> Tensor:
    """The ReLU mask as a bool tensor shaped like x (True: the gradient passes)."""
    n, c, hw = shape3(x)
    rows, cols, order = (n * hw, c, [0, 2, 3, 1]) if c_last else (n * c, hw, [0, 1, 2, 3])
    return unpack_mask(mask, x.shape, order, rows, cols)


def differentiable_backward(grad, x, mask, weight, bias, dr_dtype, need, normalize):
    """(dx, dweight, dbias, dresidual) as a graph of torch ops: the backward of a backward.

    ``normalize(x, weight, bias)`` recomputes the batch norm's output with
    differentiable ops; the ReLU is piecewise linear, so its saved mask is all
    of it that the second derivative needs.
    """
    y = normalize(x, weight, bias)
    # Eager's ReLU backward, threshold_backward(grad, out), is a function of the output with a zero
    # derivative: a stand-in output, positive where the mask passes, ties the result to x, weight and
    # bias as eager's does (their second-order gradients are zeros, not None).
    magnitude = y.abs() + 1
    g = torch.ops.aten.threshold_backward(grad, torch.where(unpack_bn_mask(mask, x, channels_last(x)), magnitude, -magnitude), 0)
    inputs = [t for t, n in zip((x, weight, bias), need) if n]
    grads = iter(torch.autograd.grad(y, inputs, g, create_graph=True) if inputs else ())
    dx, dw, db = (next(grads) if n else None for n in need[:3])
    return dx, dw, db, g.to(dr_dtype) if dr_dtype is not None else None


def differentiable_batch_norm(x, weight, bias, mean, rstd, training, eps):
    """``F.batch_norm``'s output as a graph of torch ops (no running-statistic update).

    Training: eager's batch norm on x's batch statistics (a function of x);
    eval: ``mean`` and ``rstd``, the statistics saved in forward, as constants.
    """
    if training:
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    c = (1, -1, 1, 1)
    scale = rstd if weight is None else rstd * weight
    y = (x - mean.view(c)) * scale.view(c)
    return y if bias is None else y + bias.view(c)


class BatchNormReLUFunction(torch.autograd.Function):
    """Autograd for the fused op: saves x, stats and the 1-bit ReLU mask.

    ``forward`` returns ``(out, stats, mask)`` (the last two
    non-differentiable) so that ``setup_context`` can save them: the form
    functorch transforms require.
    """

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, residual, training, momentum, eps):
        args = (x, weight, bias, running_mean, running_var, residual, training, momentum, eps, True)
        if torch.compiler.is_compiling():
            return torch.ops.fastres.batch_norm_relu(*args)
        require_triton(x, "fastres::batch_norm_relu")
        return forward(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, _, _, residual, training, _, eps = inputs
        _, stats, mask = output
        ctx.mark_non_differentiable(stats, mask)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, bias, stats, mask)
        ctx.training, ctx.eps = training, eps
        ctx.residual_dtype = None if residual is None else residual.dtype

    @staticmethod
    def backward(ctx, grad, _stats, _mask):
        if grad is None:
            return (None,) * 9
        x, weight, bias, stats, mask = ctx.saved_tensors
        need, c = ctx.needs_input_grad, x.shape[1]
        dr_dtype = ctx.residual_dtype if need[5] else None
        if torch.is_grad_enabled():  # create_graph=True
            dx, dw, db, dr = differentiable_backward(
                grad, x, mask, weight, bias, dr_dtype, need[:3],
                lambda x, w, b: differentiable_batch_norm(x, w, b, stats[:c], stats[c : 2 * c], ctx.training, ctx.eps),
            )
            return input_grads(ctx, 9, dx, dw, db, dr)
        args = (grad, x, mask, stats, weight, bias, ctx.training, need[0], need[1], need[2], dr_dtype)
        if torch.compiler.is_compiling():
            dx, dw, db, dr = torch.ops.fastres.batch_norm_relu_backward(*args)
        else:
            dx, dw, db, dr = backward(*args)
        return input_grads(ctx, 9, dx, dw, db, dr)


# --- entry point ------------------------------------------------------------


def batch_norm_relu(x, running_mean, running_var, weight, bias, training, momentum, eps, residual):
    """Arguments already checked; builds a graph only when a gradient can flow."""
    if not use_triton(x) or x.numel() == 0:
        # Eager PyTorch: CPU without the interpreter, and empty batches (which
        # eager handles without touching the statistics).
        y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
        if residual is not None:
            y = y.add_(residual)  # like torchvision's `out += identity`
        return torch.relu_(y)
    args = (x, weight, bias, running_mean, running_var, residual, training, momentum, eps)
    if torch.is_grad_enabled() and (
        x.requires_grad or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad) or (residual is not None and residual.requires_grad)
    ):
        return apply_function(BatchNormReLUFunction, *args)[0]
    if torch.compiler.is_compiling():
        return torch.ops.fastres.batch_norm_relu(*args, False)[0]
    return forward(*args, False)[0]
