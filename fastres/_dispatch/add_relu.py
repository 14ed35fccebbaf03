"""``relu(x + identity)`` as torch.library custom ops, and its autograd.Function.

Three ops, none differentiable by itself (so ``torch.compile`` sees opaque calls
with fake implementations): ``fastres::add_relu`` (new output),
``fastres::add_relu_`` (writes into x, like ``out += identity; relu_(out)``) and
``fastres::add_relu_backward``. ``AddReLU`` ties them together for autograd and
saves only the 1-bit ReLU mask: eager keeps the full output for relu's backward.

Tensors that do not run Triton (CPU without the interpreter) take plain eager
ops instead: there the mask would cost time and save nothing that matters.
"""

import torch
from torch import Tensor

from . import kernels, require_triton, use_triton
from .bitmask import new_mask
from .layout import elementwise_output, memory_order


def _forward(x: Tensor, identity: Tensor, out: Tensor, mask: Tensor | None) -> None:
    """relu(x + identity) into ``out`` (which may be x), mask in ``out``'s memory order."""
    require_triton(out, "fastres::add_relu")
    order = memory_order(out)
    xv, rv, ov = x.permute(order), identity.permute(order), out.permute(order)
    launch = kernels("add_relu").add_relu_forward
    if ov.dim() <= 4:
        launch(xv, rv, ov, mask)
        return
    # The kernel walks <= 4-D views: run >4-D ones flat.
    flat = ov if ov.is_contiguous() else torch.empty_like(ov, memory_format=torch.contiguous_format)
    launch(xv.reshape(-1), rv.reshape(-1), flat.view(-1), mask)
    if flat is not ov:
        ov.copy_(flat)


@torch.library.custom_op("fastres::add_relu", mutates_args=())
def add_relu_op(x: Tensor, identity: Tensor, save_mask: bool) -> tuple[Tensor, Tensor]:
    out = elementwise_output(x, identity)
    mask = new_mask(out.numel(), out.device, save_mask)
    _forward(x, identity, out, mask if save_mask else None)
    return out, mask


@add_relu_op.register_fake
def _(x: Tensor, identity: Tensor, save_mask: bool) -> tuple[Tensor, Tensor]:
    out = elementwise_output(x, identity)
    return out, new_mask(out.numel(), out.device, save_mask)


@torch.library.custom_op("fastres::add_relu_", mutates_args=("x",))
def add_relu_inplace_op(x: Tensor, identity: Tensor, save_mask: bool) -> Tensor:
    mask = new_mask(x.numel(), x.device, save_mask)
    _forward(x, identity, x, mask if save_mask else None)
    return mask


@add_relu_inplace_op.register_fake
def _(x: Tensor, identity: Tensor, save_mask: bool) -> Tensor:
    return new_mask(x.numel(), x.device, save_mask)


@torch.library.custom_op("fastres::add_relu_backward", mutates_args=())
def add_relu_backward_op(grad: Tensor, mask: Tensor, order: list[int]) -> Tensor:
    """``where(z <= 0, 0, grad)``, laid out densely in ``order`` (the forward output's)."""
    require_triton(grad, "fastres::add_relu_backward")
    dx = torch.empty_permuted(grad.shape, order, dtype=grad.dtype, device=grad.device)
    gv, dv = grad.permute(order), dx.permute(order)
    if dv.dim() > 4:
        gv, dv = gv.reshape(-1), dv.view(-1)
    kernels("add_relu").add_relu_backward(gv, mask, dv)
    return dx


@add_relu_backward_op.register_fake
def _(grad: Tensor, mask: Tensor, order: list[int]) -> Tensor:
    return torch.empty_permuted(grad.shape, order, dtype=grad.dtype, device=grad.device)


class AddReLU(torch.autograd.Function):
    """Autograd for the fused merge; saves the 1-bit mask and nothing else."""

    @staticmethod
    def forward(ctx, x: Tensor, identity: Tensor, inplace: bool) -> Tensor:
        if inplace:
            mask = torch.ops.fastres.add_relu_(x, identity, True)
            ctx.mark_dirty(x)
            out = x
        else:
            out, mask = torch.ops.fastres.add_relu(x, identity, True)
        ctx.order = memory_order(out)
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        (mask,) = ctx.saved_tensors
        g = torch.ops.fastres.add_relu_backward(grad, mask, ctx.order)
        # Both summands get the same gradient, as in eager's AddBackward.
        return (
            g if ctx.needs_input_grad[0] else None,
            g if ctx.needs_input_grad[1] else None,
            None,
        )


def add_relu(x: Tensor, identity: Tensor, inplace: bool) -> Tensor:
    """Arguments already checked; builds a graph only when a gradient can flow."""
    if not use_triton(x):
        return x.add_(identity).relu_() if inplace else torch.relu(x + identity)
    if torch.is_grad_enabled() and (x.requires_grad or identity.requires_grad):
        return AddReLU.apply(x, identity, inplace)
    if inplace:
        torch.ops.fastres.add_relu_(x, identity, False)
        return x
    return torch.ops.fastres.add_relu(x, identity, False)[0]
