"""``relu(x + identity)`` as torch.library custom ops, and its autograd.Function.

Three ops, none differentiable by itself (so ``torch.compile`` sees opaque calls
with fake implementations): ``fastres::add_relu`` (new output),
``fastres::add_relu_`` (writes into x, like ``out += identity; relu_(out)``) and
``fastres::add_relu_backward``. ``AddReLUFunction`` ties them together for autograd and
saves only the 1-bit ReLU mask: eager keeps the full output for relu's backward.

In eager mode the Python implementations are called directly, not through
the dispatcher (whose custom-op handling costs more host time than the
launch); under ``torch.compile`` the custom ops are what the graph holds.

Tensors that do not run Triton (CPU without the interpreter) take plain eager
ops instead: there the mask would cost time and save nothing that matters.
"""

import torch
from torch import Tensor

from . import apply_function, kernels, require_triton, use_triton
from .bitmask import new_mask, unpack_mask
from .layout import elementwise_output, memory_order


def _dense(t: Tensor) -> bool:
    """Contiguous in NCHW or channels_last order: elements in memory order are a flat range."""
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def _order(shape, strides) -> list[int]:
    """``memory_order`` of a tensor with these sizes and strides."""
    return sorted(range(len(shape)), key=lambda d: -strides[d])


def _forward(x: Tensor, identity: Tensor, out: Tensor, mask: Tensor | None) -> None:
    """relu(x + identity) into ``out`` (which may be x), mask in ``out``'s memory order."""
    require_triton(out, "fastres::add_relu")
    k = kernels("add_relu")
    strides = out.stride()
    if x.stride() == strides and identity.stride() == strides and _dense(out):
        k.add_relu_forward_dense(x, identity, out, mask)  # the common case: one layout, walked flat
        return
    order = memory_order(out)
    xv, rv, ov = x.permute(order), identity.permute(order), out.permute(order)
    launch = k.add_relu_forward
    if ov.dim() <= 4:
        launch(xv, rv, ov, mask)
        return
    # The kernel walks <= 4-D views: run >4-D ones flat.
    flat = ov if ov.is_contiguous() else torch.empty_like(ov, memory_format=torch.contiguous_format)
    launch(xv.reshape(-1), rv.reshape(-1), flat.view(-1), mask)
    if flat is not ov:
        ov.copy_(flat)


def _add_relu(x: Tensor, identity: Tensor, save_mask: bool) -> tuple[Tensor, Tensor]:
    out = elementwise_output(x, identity)
    mask = new_mask(out.numel(), out.device, save_mask)
    _forward(x, identity, out, mask if save_mask else None)
    return out, mask


def _add_relu_inplace(x: Tensor, identity: Tensor, save_mask: bool) -> Tensor:
    mask = new_mask(x.numel(), x.device, save_mask)
    _forward(x, identity, x, mask if save_mask else None)
    return mask


def _add_relu_backward(grad: Tensor, mask: Tensor, order: list[int]) -> Tensor:
    require_triton(grad, "fastres::add_relu_backward")
    dx = torch.empty_permuted(grad.shape, order, dtype=grad.dtype, device=grad.device)
    gv, dv = grad.permute(order), dx.permute(order)
    if dv.dim() > 4:
        gv, dv = gv.reshape(-1), dv.view(-1)
    kernels("add_relu").add_relu_backward(gv, mask, dv)
    return dx


@torch.library.custom_op("fastres::add_relu", mutates_args=())
def add_relu_op(x: Tensor, identity: Tensor, save_mask: bool) -> tuple[Tensor, Tensor]:
    return _add_relu(x, identity, save_mask)


@add_relu_op.register_fake
def _(x: Tensor, identity: Tensor, save_mask: bool) -> tuple[Tensor, Tensor]:
    out = elementwise_output(x, identity)
    return out, new_mask(out.numel(), out.device, save_mask)


@torch.library.custom_op("fastres::add_relu_", mutates_args=("x",))
def add_relu_inplace_op(x: Tensor, identity: Tensor, save_mask: bool) -> Tensor:
    return _add_relu_inplace(x, identity, save_mask)


@add_relu_inplace_op.register_fake
def _(x: Tensor, identity: Tensor, save_mask: bool) -> Tensor:
    return new_mask(x.numel(), x.device, save_mask)


@torch.library.custom_op("fastres::add_relu_backward", mutates_args=())
def add_relu_backward_op(grad: Tensor, mask: Tensor, order: list[int]) -> Tensor:
    """``where(z <= 0, 0, grad)``, laid out densely in ``order`` (the forward output's)."""
    return _add_relu_backward(grad, mask, order)


@add_relu_backward_op.register_fake
def _(grad: Tensor, mask: Tensor, order: list[int]) -> Tensor:
    return torch.empty_permuted(grad.shape, order, dtype=grad.dtype, device=grad.device)


class AddReLUFunction(torch.autograd.Function):
    """Autograd for the fused merge; saves the 1-bit mask and nothing else.

    ``forward`` returns ``(out, mask)`` (the mask non-differentiable) so that
    ``setup_context`` can save it: the form functorch transforms require.
    """

    @staticmethod
    def forward(x: Tensor, identity: Tensor, inplace: bool) -> tuple[Tensor, Tensor]:
        compiling = torch.compiler.is_compiling()
        if inplace:
            return x, (torch.ops.fastres.add_relu_ if compiling else _add_relu_inplace)(x, identity, True)
        return (torch.ops.fastres.add_relu if compiling else _add_relu)(x, identity, True)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        out, mask = output
        if inputs[2]:
            ctx.mark_dirty(inputs[0])
        ctx.mark_non_differentiable(mask)
        ctx.set_materialize_grads(False)
        ctx.out = (out.shape, out.stride(), _dense(out))
        ctx.save_for_backward(mask)

    @staticmethod
    def backward(ctx, grad: Tensor | None, _: None) -> tuple[Tensor | None, Tensor | None, None]:
        if grad is None:
            return None, None, None
        (mask,) = ctx.saved_tensors
        shape, strides, dense = ctx.out
        if torch.is_grad_enabled():  # create_graph=True: a backward that is itself differentiable
            g = torch.where(unpack_mask(mask, shape, _order(shape, strides)), grad, 0)
        elif torch.compiler.is_compiling():
            g = torch.ops.fastres.add_relu_backward(grad, mask, _order(shape, strides))
        elif dense and grad.stride() == strides:  # laid out as the forward output: walked flat
            g = torch.empty_like(grad)
            kernels("add_relu").add_relu_backward_dense(grad, mask, g)
        else:
            g = _add_relu_backward(grad, mask, _order(shape, strides))
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
        return apply_function(AddReLUFunction, x, identity, inplace)[0]
    compiling = torch.compiler.is_compiling()
    if inplace:
        (torch.ops.fastres.add_relu_ if compiling else _add_relu_inplace)(x, identity, False)
        return x
    return (torch.ops.fastres.add_relu if compiling else _add_relu)(x, identity, False)[0]
