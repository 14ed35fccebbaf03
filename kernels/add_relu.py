"""Fused residual merge: ``z = relu(x + r)``, with a 1-bit ReLU mask for backward.

Forward reads x and r once and writes z once (3 passes; eager needs 2 kernels
and 5 passes). When gradients are needed it also writes the sign of z as a
bit-packed mask, 1 bit per element (1/32 of an fp32 pass), which is all that
backward needs:

    g = dz * [not z <= 0]   dx = dr = g     (NaN outputs pass dz, as in eager)

Every tensor is handled as a 4-D view in one shared logical order (the caller
orders dims as the output is laid out in memory). A view that is contiguous in
that order is addressed by its linear index; any other (channels_last next to
NCHW, slices, expanded gradients) goes through its own strides. Bit i of the
mask belongs to logical element i: byte i // 8, bit i % 8.
"""

import torch
import triton
import triton.language as tl

from .launch import Kernel, cdiv, stream
from .utils import as_4d, elementwise_settings, pack_mask, strided_offsets, unpack_mask


@triton.jit
def add_relu_fwd_kernel(
    x_ptr,  # first summand (the block's output), any strides
    r_ptr,  # second summand (the identity), any strides
    z_ptr,  # output relu(x + r); may alias x_ptr for the in-place merge
    mask_ptr,  # uint8[ceil(n / 8)]: bit i set unless z_i <= 0 (None unless WRITE_MASK)
    n_elements,  # number of elements of the 4-D logical view
    size1, size2, size3,  # logical sizes of dims 1..3 (dim 0 is implied)
    x_s0, x_s1, x_s2, x_s3,  # strides of x, in elements
    r_s0, r_s1, r_s2, r_s3,  # strides of r
    z_s0, z_s1, z_s2, z_s3,  # strides of z
    X_DENSE: tl.constexpr,  # x is contiguous in the logical order
    R_DENSE: tl.constexpr,  # r is contiguous in the logical order
    Z_DENSE: tl.constexpr,  # z is contiguous in the logical order
    WRITE_MASK: tl.constexpr,  # store the ReLU mask for backward
    FP64: tl.constexpr,  # compute in float64 (a float64 input); else in float32
    BLOCK: tl.constexpr,  # elements per program, a multiple of 8
):
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    in_range = idx < n_elements

    if X_DENSE:
        x_off = idx
    else:
        x_off = strided_offsets(idx, size1, size2, size3, x_s0, x_s1, x_s2, x_s3)
    if R_DENSE:
        r_off = idx
    else:
        r_off = strided_offsets(idx, size1, size2, size3, r_s0, r_s1, r_s2, r_s3)
    if Z_DENSE:
        z_off = idx
    else:
        z_off = strided_offsets(idx, size1, size2, size3, z_s0, z_s1, z_s2, z_s3)

    x = tl.load(x_ptr + x_off, mask=in_range, other=0.0)
    r = tl.load(r_ptr + r_off, mask=in_range, other=0.0)
    if FP64:
        y = x.to(tl.float64) + r.to(tl.float64)
    else:
        y = x.to(tl.float32) + r.to(tl.float32)
    # `y < 0` rather than `y > 0` keeps NaN as NaN, as torch.relu does.
    z = tl.where(y < 0, 0.0, y)
    tl.store(z_ptr + z_off, z.to(z_ptr.dtype.element_ty), mask=in_range)

    if WRITE_MASK:
        # Eager's relu backward is where(z <= 0, 0, dz): NaN outputs pass dz on.
        # Rounding to the storage dtype never flips the sign of a sum of two
        # values of that dtype, so the fp32 sign is the stored sign.
        pack_mask(mask_ptr, tl.where(y <= 0, 0, 1), pid, n_elements, BLOCK)


@triton.jit
def add_relu_bwd_kernel(
    dz_ptr,  # upstream gradient, any strides (e.g. stride 0 after .sum())
    mask_ptr,  # uint8 ReLU mask written by the forward kernel
    dx_ptr,  # output gradient, contiguous in the logical order
    n_elements,  # number of elements of the 4-D logical view
    size1, size2, size3,  # logical sizes of dims 1..3
    dz_s0, dz_s1, dz_s2, dz_s3,  # strides of dz, in elements
    DZ_DENSE: tl.constexpr,  # dz is contiguous in the logical order
    BLOCK: tl.constexpr,  # elements per program, a multiple of 8
):
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    in_range = idx < n_elements
    if DZ_DENSE:
        dz_off = idx
    else:
        dz_off = strided_offsets(idx, size1, size2, size3, dz_s0, dz_s1, dz_s2, dz_s3)

    keep = unpack_mask(mask_ptr, pid, n_elements, BLOCK)

    dz = tl.load(dz_ptr + dz_off, mask=in_range, other=0.0)
    # A select, not a product: NaN/Inf in dz where z <= 0 give 0, as in eager.
    dx = tl.where(keep, dz, tl.zeros_like(dz))
    tl.store(dx_ptr + idx, dx, mask=in_range)


add_relu_fwd_kernel = Kernel(add_relu_fwd_kernel)
add_relu_bwd_kernel = Kernel(add_relu_bwd_kernel)


def add_relu_forward(
    x: torch.Tensor, r: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None
) -> None:
    """Launch ``z = relu(x + r)`` (and the mask, if given) over same-shape views.

    ``x``, ``r`` and ``z`` share one logical dim order of rank <= 4; ``z`` may be
    ``x`` itself. ``r`` may have another floating dtype (the sum is stored in
    z's). ``mask`` is uint8 with ``ceil(numel / 8)`` elements.
    """
    n = z.numel()
    if n == 0:
        return
    x, r, z = as_4d(x), as_4d(r), as_4d(z)
    xs, rs, zs = x.stride(), r.stride(), z.stride()
    block, num_warps = elementwise_settings(n, z.device)
    fp64 = x.dtype == torch.float64 or r.dtype == torch.float64
    add_relu_fwd_kernel(
        (cdiv(n, block), 1, 1), stream(z.device), num_warps,
        x, r, z, mask, n, z.shape[1], z.shape[2], z.shape[3], *xs, *rs, *zs,
        x.is_contiguous(), r.is_contiguous(), z.is_contiguous(), mask is not None, fp64, block,
    )


def add_relu_backward(dz: torch.Tensor, mask: torch.Tensor, dx: torch.Tensor) -> None:
    """Launch ``dx = where(z <= 0, 0, dz)``; ``dx`` is contiguous in the logical order of ``dz``."""
    n = dx.numel()
    if n == 0:
        return
    dz, dx = as_4d(dz), as_4d(dx)
    ds = dz.stride()
    block, num_warps = elementwise_settings(n, dx.device)
    add_relu_bwd_kernel(
        (cdiv(n, block), 1, 1), stream(dx.device), num_warps,
        dz, mask, dx, n, dx.shape[1], dx.shape[2], dx.shape[3], *ds, dz.is_contiguous(), block,
    )


def add_relu_forward_dense(x: torch.Tensor, r: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None) -> None:
    """``add_relu_forward`` for three tensors laid out alike and densely: one flat launch, no views."""
    n = z.numel()
    if n == 0:
        return
    block, num_warps = elementwise_settings(n, z.device)
    add_relu_fwd_kernel(
        (cdiv(n, block), 1, 1), stream(z.device), num_warps,
        x, r, z, mask, n, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        True, True, True, mask is not None, x.dtype == torch.float64 or r.dtype == torch.float64, block,
    )


def add_relu_backward_dense(dz: torch.Tensor, mask: torch.Tensor, dx: torch.Tensor) -> None:
    """``add_relu_backward`` for ``dz`` and ``dx`` laid out as the forward output: one flat launch."""
    n = dx.numel()
    if n == 0:
        return
    block, num_warps = elementwise_settings(n, dx.device)
    add_relu_bwd_kernel(
        (cdiv(n, block), 1, 1), stream(dx.device), num_warps,
        dz, mask, dx, n, 1, 1, 1, 0, 0, 0, 0, True, block,
    )
