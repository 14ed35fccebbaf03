"""Synchronized fused BatchNorm (+ residual add) + ReLU across processes.

Statistics are computed per process, gathered with one ``all_gather`` of
(mean, M2, count) per channel and merged exactly as the partial results of
one process are (so batches of different sizes, even empty ones, are fine).
Backward all-reduces the two per-channel sums that dx depends on; the weight
and bias gradients stay local, as in ``torch.nn.SyncBatchNorm`` (DDP averages
them).

Tensors that do not run Triton take an eager reference built from
differentiable all-reduces.
"""

import torch
import torch.distributed as dist
from torch import Tensor

from . import kernels, require_triton, use_triton
from .batch_norm import (
    apply, backward_elementwise, backward_reduce, differentiable_backward, input_grads, new_bn_mask,
)
from .layout import acc_dtype, channels_last, empty_out, shape3, view3


@torch.library.custom_op("fastres::bn_local_stats", mutates_args=())
def bn_local_stats_op(x: Tensor) -> Tensor:
    """This process's [mean (C) | M2 (C) | count (1)] in one tensor, ready to gather."""
    require_triton(x, "fastres::bn_local_stats")
    c = x.shape[1]
    if x.numel() == 0:
        return x.new_zeros(2 * c + 1, dtype=acc_dtype(x))
    local = torch.empty(2 * c + 1, dtype=acc_dtype(x), device=x.device)
    x3, xs = view3(x)
    kernels("batch_norm").batch_norm_stats(x3, shape3(x), xs, local, None, None, 0.0, 0.0, local=True)
    return local


@bn_local_stats_op.register_fake
def _(x):
    return x.new_empty(2 * x.shape[1] + 1, dtype=acc_dtype(x))


@torch.library.custom_op("fastres::bn_gather_stats", mutates_args=("running_mean", "running_var"))
def bn_gather_stats_op(
    gathered: Tensor, running_mean: Tensor | None, running_var: Tensor | None, momentum: float, eps: float
) -> Tensor:
    """stats = [mean | rstd | count] over all processes from their [W, 2C+1] local stats."""
    stats = torch.empty(gathered.shape[1], dtype=gathered.dtype, device=gathered.device)
    kernels("batch_norm").batch_norm_combine(gathered.contiguous(), stats, running_mean, running_var, momentum, eps)
    return stats


@bn_gather_stats_op.register_fake
def _(gathered, running_mean, running_var, momentum, eps):
    return gathered.new_empty(gathered.shape[1])


@torch.library.custom_op("fastres::bn_relu_apply", mutates_args=())
def bn_relu_apply_op(
    x: Tensor, stats: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None, save_mask: bool,
) -> tuple[Tensor, Tensor]:
    """(out, mask) normalised with the given statistics."""
    require_triton(x, "fastres::bn_relu_apply")
    return apply(x, stats, weight, bias, residual, channels_last(x), save_mask)


@bn_relu_apply_op.register_fake
def _(x, stats, weight, bias, residual, save_mask):
    c_last = channels_last(x)
    return empty_out(x, c_last), new_bn_mask(shape3(x), c_last, x.device, save_mask)


@torch.library.custom_op("fastres::bn_relu_backward_reduce", mutates_args=())
def bn_relu_backward_reduce_op(
    grad: Tensor, x: Tensor, mask: Tensor, stats: Tensor,
    weight: Tensor | None, bias: Tensor | None, need_dw: bool, need_db: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """([sum(g) (C) | sum(g * (x - mean)) (C)], dweight, dbias) of this process."""
    require_triton(x, "fastres::bn_relu_backward_reduce")
    empty = x.new_empty(0)
    if x.numel() == 0:
        return (
            stats.new_zeros(2 * x.shape[1]),
            torch.zeros_like(weight) if need_dw else empty,
            torch.zeros_like(bias) if need_db else empty,
        )
    sums, dw, db = backward_reduce(grad, x, mask, stats, weight, bias, channels_last(x), need_dw, need_db)
    return sums, dw if need_dw else empty, db if need_db else empty


@bn_relu_backward_reduce_op.register_fake
def _(grad, x, mask, stats, weight, bias, need_dw, need_db):
    empty = x.new_empty(0)
    return (
        stats.new_empty(2 * x.shape[1]),
        torch.empty_like(weight) if need_dw else empty,
        torch.empty_like(bias) if need_db else empty,
    )


@torch.library.custom_op("fastres::bn_relu_backward_elemt", mutates_args=())
def bn_relu_backward_elemt_op(
    grad: Tensor, x: Tensor, mask: Tensor, stats: Tensor, weight: Tensor | None,
    sums: Tensor, need_dx: bool, dr_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor]:
    """(dx, dresidual) from the all-reduced sums; those not needed are empty."""
    require_triton(x, "fastres::bn_relu_backward_elemt")
    dx, dr = backward_elementwise(grad, x, mask, stats, weight, sums, channels_last(x), need_dx, dr_dtype)
    empty = x.new_empty(0)
    return dx if dx is not None else empty, dr if dr is not None else empty


@bn_relu_backward_elemt_op.register_fake
def _(grad, x, mask, stats, weight, sums, need_dx, dr_dtype):
    c_last = channels_last(x)
    empty = x.new_empty(0)
    return (
        empty_out(x, c_last) if need_dx else empty,
        empty_out(x, c_last, dr_dtype) if dr_dtype is not None else empty,
    )


def _all_gather(t: Tensor, group) -> Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    return torch.stack(parts)


class SyncBatchNormReLUFunction(torch.autograd.Function):
    """Autograd for the synchronized op; saves what ``BatchNormReLUFunction`` saves."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, residual, momentum, eps, group, save):
        gathered = _all_gather(torch.ops.fastres.bn_local_stats(x), group)
        stats = torch.ops.fastres.bn_gather_stats(gathered, running_mean, running_var, momentum, eps)
        out, mask = torch.ops.fastres.bn_relu_apply(x, stats, weight, bias, residual, save)
        ctx.save_for_backward(x, weight, bias, stats, mask)
        ctx.group, ctx.eps = group, eps
        ctx.residual_dtype = None if residual is None else residual.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, stats, mask = ctx.saved_tensors
        need_dx, need_dw, need_dr = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[5]
        need_db = ctx.needs_input_grad[2]
        if torch.is_grad_enabled():  # create_graph=True: the eager synchronized batch norm, differentiated
            group, eps = ctx.group, ctx.eps
            dx, dw, db, dr = differentiable_backward(
                grad, x, mask, weight, bias, ctx.residual_dtype if need_dr else None, (need_dx, need_dw, need_db),
                lambda x, w, b: _eager_sync_batch_norm(x, None, None, w, b, 0.0, eps, None, group, relu=False),
            )
            return input_grads(ctx, 10, dx, dw, db, dr)
        sums, dw, db = torch.ops.fastres.bn_relu_backward_reduce(grad, x, mask, stats, weight, bias, need_dw, need_db)
        if need_dx:
            dist.all_reduce(sums, group=ctx.group)
        dx, dr = torch.ops.fastres.bn_relu_backward_elemt(
            grad, x, mask, stats, weight, sums, need_dx, ctx.residual_dtype if need_dr else None
        )
        return input_grads(ctx, 10, dx, dw, db, dr)


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over the group: the gradient is the sum of every process's gradient."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _eager_sync_batch_norm(x, running_mean, running_var, weight, bias, momentum, eps, residual, group, relu=True):
    """Eager PyTorch: differentiable all-reduces of the per-channel sums; ``relu=False`` stops at the affine.

    torch has no synchronized batch norm for CPU tensors (``torch.batch_norm_stats``
    and the other collectives' kernels are CUDA's), so this composition is
    the CPU path, and, being differentiable, the formula every path
    differentiates for double backward.
    """
    c = x.shape[1]
    xf = x.to(acc_dtype(x))
    shape = (1, c, 1, 1)
    count = xf.new_full((1,), x.numel() // c if c else 0)
    totals = _AllReduceSum.apply(torch.cat([xf.sum((0, 2, 3)), count]), group)
    n = totals[c]
    mean = totals[:c] / n
    xmu = xf - mean.view(shape)
    m2 = _AllReduceSum.apply((xmu * xmu).sum((0, 2, 3)), group)
    y = xmu * torch.rsqrt(m2 / n + eps).view(shape)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    y = y.to(x.dtype)
    if residual is not None:
        y = y.add_(residual)
    if running_mean is not None:
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.detach() * momentum)
            running_var.mul_(1 - momentum).add_(m2.detach() / (n - 1) * momentum)
    if relu:
        y = torch.relu_(y)
    return y.contiguous(memory_format=torch.channels_last if channels_last(x) else torch.contiguous_format)


def sync_batch_norm_relu(x, running_mean, running_var, weight, bias, momentum, eps, residual, group):
    """Arguments already checked; ``group`` has more than one process."""
    if not use_triton(x):
        return _eager_sync_batch_norm(x, running_mean, running_var, weight, bias, momentum, eps, residual, group)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual))
    return SyncBatchNormReLUFunction.apply(x, weight, bias, running_mean, running_var, residual, momentum, eps, group, save)


def sync_batch_norm(x, running_mean, running_var, weight, bias, momentum, eps, group):
    """Synchronized BN without ReLU (eager PyTorch on every device); arguments checked, ``group`` of two or more.

    There is nothing to fuse in a lone batch norm: fastres's modules run
    ``torch.nn.SyncBatchNorm`` itself where it works (CUDA), and this where it
    refuses the tensors (CPU on gloo).
    """
    return _eager_sync_batch_norm(x, running_mean, running_var, weight, bias, momentum, eps, None, group, relu=False)
