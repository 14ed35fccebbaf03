"""Fused BatchNorm (+ residual add) + ReLU as torch.library custom ops, and their autograd.

The ops mirror eager's own batch-norm building blocks, so that the single-
process and the synchronized module share them:

- ``fastres::batch_norm_relu``: the whole forward (statistics, running-stat
  update, apply) in one call; ``fastres::batch_norm_relu_backward``: the whole
  backward.
- For synchronized statistics, the same work in pieces with collectives in
  between: ``bn_local_stats`` -> all_gather -> ``bn_gather_stats`` ->
  ``bn_relu_apply`` forward, ``bn_relu_backward_reduce`` -> all_reduce ->
  ``bn_relu_backward_elemt`` backward.

Every op takes 4-D tensors. The kernels see [N, C, H*W] views; an input whose
H and W cannot merge into one stride is copied once (only odd views do that).
Backward saves x, the per-channel mean and 1/std, and the 1-bit ReLU mask:
eager saves x and the whole output.
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._prims_common import suggest_memory_format

from . import kernels, require_triton, use_triton
from .bitmask import new_mask


def channels_last(x: Tensor) -> bool:
    """Whether eager's batch norm would give a channels_last output for ``x``."""
    return suggest_memory_format(x) == torch.channels_last


def _empty_out(x: Tensor, c_last: bool, dtype: torch.dtype | None = None) -> Tensor:
    fmt = torch.channels_last if c_last else torch.contiguous_format
    return torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device, memory_format=fmt)


def _nchw(t: Tensor) -> Tensor:
    """``t`` (N, C, H, W) as an [N, C, H*W] view, after a copy if H and W do not merge."""
    n, c, h, w = t.shape
    if h > 1 and w > 1 and t.stride(2) != w * t.stride(3):
        t = t.contiguous(memory_format=suggest_memory_format(t))
    s_hw = t.stride(3) if w > 1 else t.stride(2) if h > 1 else 1
    return t.as_strided((n, c, h * w), (t.stride(0), t.stride(1), s_hw))


def _stats(x3: Tensor, running_mean: Tensor | None, running_var: Tensor | None, momentum: float, eps: float):
    k = kernels("batch_norm")
    return k.combine_stats(*k.partial_stats(x3), running_mean, running_var, momentum, eps)


def _apply(x, x3, mean, rstd_or_var, weight, bias, residual, eps, from_var, c_last, save_mask):
    """(out, mask): out laid out as eager's batch norm lays it out."""
    out = _empty_out(x, c_last)
    mask = new_mask(out.numel(), out.device, save_mask)
    if out.numel():
        kernels("batch_norm").apply(
            x3, _nchw(out), mask if save_mask else None, mean, rstd_or_var, weight, bias,
            None if residual is None else _nchw(residual), eps, from_var, c_last,
        )
    return out, mask


def _check_device(x: Tensor, op: str) -> None:
    require_triton(x, f"fastres::{op}")


# --- single process ---------------------------------------------------------


@torch.library.custom_op("fastres::batch_norm_relu", mutates_args=("running_mean", "running_var"))
def batch_norm_relu_op(
    x: Tensor, weight: Tensor | None, bias: Tensor | None,
    running_mean: Tensor | None, running_var: Tensor | None, residual: Tensor | None,
    training: bool, momentum: float, eps: float, save_mask: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, mean, rstd, count, mask). In eval, mean/rstd come from the running stats."""
    _check_device(x, "batch_norm_relu")
    c_last = channels_last(x)
    x3 = _nchw(x)
    if training:
        mean, _, count, rstd = _stats(x3, running_mean, running_var, momentum, eps)
        out, mask = _apply(x, x3, mean, rstd, weight, bias, residual, eps, False, c_last, save_mask)
        return out, mean, rstd, count, mask
    out, mask = _apply(x, x3, running_mean, running_var, weight, bias, residual, eps, True, c_last, save_mask)
    acc = kernels("utils").acc_dtype(x.dtype)
    if save_mask:  # what backward needs, fixed now even if the buffers change later
        mean, rstd = running_mean.to(acc, copy=True), (running_var.to(acc) + eps).rsqrt()
    else:
        mean, rstd = x.new_empty(0, dtype=acc), x.new_empty(0, dtype=acc)  # outputs may not alias
    return out, mean, rstd, x.new_empty(0, dtype=acc), mask


@batch_norm_relu_op.register_fake
def _(x, weight, bias, running_mean, running_var, residual, training, momentum, eps, save_mask):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = x.shape[1]
    out = _empty_out(x, channels_last(x))
    stat = x.new_empty(c if training or save_mask else 0, dtype=acc)
    count = x.new_empty(1 if training else 0, dtype=acc)
    return out, stat, torch.empty_like(stat), count, new_mask(x.numel(), x.device, save_mask)


def _backward(grad, x, mask, mean, rstd, weight, sums, count, c_last, need_dx, dr_dtype):
    """dx, dweight, dbias, dr; ``sums`` are (sum_g, sum_gx) already reduced, or None (eval)."""
    g3, x3 = _nchw(grad), _nchw(x)
    dx = _empty_out(x, c_last) if need_dx else None
    dr = _empty_out(x, c_last, dr_dtype) if dr_dtype is not None else None
    if (dx is not None or dr is not None) and x.numel():
        kernels("batch_norm_backward").elementwise(
            g3, x3, mask, mean, rstd, weight, *(sums or (None, None)), count,
            None if dx is None else _nchw(dx), None if dr is None else _nchw(dr), c_last,
        )
    return dx, dr


def _z_strides(x: Tensor, c_last: bool) -> tuple[int, int, int]:
    """[N, C, HW] strides of the dense forward output (they locate the mask bits)."""
    n, c, h, w = x.shape
    return (c * h * w, 1, c) if c_last else (c * h * w, h * w, 1)


def _reduce(grad, x, mask, mean, rstd, weight, bias, c_last, need_dw, need_db):
    dw = torch.empty_like(weight) if need_dw else None
    db = torch.empty_like(bias) if need_db else None
    sums = kernels("batch_norm_backward").reduce(
        _nchw(grad), _nchw(x), _z_strides(x, c_last), mask, mean, rstd, dw, db
    )
    return sums, dw, db


def _none_to_empty(*ts: Tensor | None) -> tuple[Tensor, ...]:
    return tuple(t if t is not None else torch.empty(0) for t in ts)


@torch.library.custom_op("fastres::batch_norm_relu_backward", mutates_args=())
def batch_norm_relu_backward_op(
    grad: Tensor, x: Tensor, mask: Tensor, mean: Tensor, rstd: Tensor, count: Tensor,
    weight: Tensor | None, bias: Tensor | None, training: bool,
    need_dx: bool, need_dw: bool, need_db: bool, dr_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dresidual); those not needed are empty."""
    _check_device(x, "batch_norm_relu_backward")
    c_last = channels_last(x)
    sums, dw, db = None, None, None
    if training and need_dx or need_dw or need_db:
        sums, dw, db = _reduce(grad, x, mask, mean, rstd, weight, bias, c_last, need_dw, need_db)
    dx, dr = _backward(
        grad, x, mask, mean, rstd, weight, sums if training else None, count, c_last, need_dx, dr_dtype,
    )
    return _none_to_empty(dx, dw, db, dr)


@batch_norm_relu_backward_op.register_fake
def _(grad, x, mask, mean, rstd, count, weight, bias, training, need_dx, need_dw, need_db, dr_dtype):
    c_last = channels_last(x)
    empty = x.new_empty(0)
    return (
        _empty_out(x, c_last) if need_dx else empty,
        torch.empty_like(weight) if need_dw else empty,
        torch.empty_like(bias) if need_db else empty,
        _empty_out(x, c_last, dr_dtype) if dr_dtype is not None else empty,
    )


def input_grads(ctx, n_inputs: int, dx, dw, db, dr) -> tuple:
    """Backward's return value: the gradients of x, weight, bias (inputs 0-2) and the
    residual (input 5) where they are needed, None for every other input."""
    grads = [None] * n_inputs
    for i, g in zip((0, 1, 2, 5), (dx, dw, db, dr)):
        if ctx.needs_input_grad[i]:
            grads[i] = g
    return tuple(grads)


class BatchNormReLU(torch.autograd.Function):
    """Autograd for the fused op: saves x, mean, 1/std and the 1-bit ReLU mask."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, residual, training, momentum, eps):
        out, mean, rstd, count, mask = torch.ops.fastres.batch_norm_relu(
            x, weight, bias, running_mean, running_var, residual, training, momentum, eps, True
        )
        ctx.save_for_backward(x, weight, bias, mean, rstd, count, mask)
        ctx.training = training
        ctx.residual_dtype = None if residual is None else residual.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mean, rstd, count, mask = ctx.saved_tensors
        need_dx, need_dw, need_db, need_dr = (ctx.needs_input_grad[i] for i in (0, 1, 2, 5))
        dx, dw, db, dr = torch.ops.fastres.batch_norm_relu_backward(
            grad, x, mask, mean, rstd, count, weight, bias, ctx.training,
            need_dx, need_dw, need_db, ctx.residual_dtype if need_dr else None,
        )
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
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual)):
        return BatchNormReLU.apply(*args)
    return torch.ops.fastres.batch_norm_relu(*args, False)[0]
