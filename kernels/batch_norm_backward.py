"""Fused batch norm + optional residual add + ReLU, backward.

With ``g = dz * [not z <= 0]`` (from the 1-bit mask), ``xmu = x - mean``:

    dbias   = sum(g)                 dweight = rstd * sum(g * xmu)
    dx      = weight * rstd * (g - sum(g) / m - xmu * rstd**2 * sum(g * xmu) / m)
    dr      = g

(in eval mode the statistics are constants: ``dx = weight * rstd * g``). Two
launches: ``reduce`` accumulates g and g * xmu per channel in registers over
its tiles and writes them as partial sums; the last program of each channel
block (an atomic ticket) adds that block's partials into
``sums = [sum(g) (C) | sum(g * xmu) (C)]`` and writes dweight and dbias.
``elementwise`` then writes dx and dr in one pass over the output's memory
order. Synchronized batch norm all-reduces ``sums`` between the two.

``stats`` is the forward's ``[mean (C) | rstd (C) | count (1)]``.
"""

import torch
import triton
import triton.language as tl

from .batch_norm import stats_plan
from .launch import Kernel, aligned, cdiv, counters, scratch, stream, tensor_key
from .utils import (
    elementwise_settings, mask_bits_at, nchw_split, tile_rows, tl_dtype,
    unpack_mask,
)


@triton.jit
def _reduce_kernel(
    dz_ptr, x_ptr,  # [N, C, HW] views, any strides
    mask_ptr,  # ReLU mask in z's memory order; z's strides locate each bit
    stats_ptr,  # [2C + 1]: mean, rstd, count
    partial_ptr,  # scratch [2, splits, C]: partial sum(g), sum(g * xmu)
    ticket_ptr,  # int32 [c_blocks], zero on entry and on exit
    sums_ptr,  # [2C] output: sum(g), sum(g * xmu)
    dw_ptr, db_ptr,  # [C] outputs in the parameters' dtypes, or None
    N, C, HW,
    dz_sn, dz_sc, dz_shw,
    x_sn, x_sc, x_shw,
    z_sn, z_sc, z_shw,
    tiles_per_split, n_tiles, splits,
    PER_N: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mean = tl.load(stats_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    acc_g = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    acc_gx = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    t0 = split * tiles_per_split
    for t in range(t0, tl.minimum(t0 + tiles_per_split, n_tiles)):
        dz_rows, row_ok, _ = tile_rows(t, N, HW, dz_sn, dz_shw, PER_N, BLOCK_R)
        x_rows, _, _ = tile_rows(t, N, HW, x_sn, x_shw, PER_N, BLOCK_R)
        z_rows, _, _ = tile_rows(t, N, HW, z_sn, z_shw, PER_N, BLOCK_R)
        ok = row_ok[:, None] & col_ok[None, :]
        keep = mask_bits_at(mask_ptr, z_rows[:, None] + cols[None, :] * z_sc, ok)
        dz = tl.load(dz_ptr + dz_rows[:, None] + cols[None, :] * dz_sc, mask=ok, other=0.0).to(ACC)
        x = tl.load(x_ptr + x_rows[:, None] + cols[None, :] * x_sc, mask=ok, other=0.0).to(ACC)
        # A select, not a product: NaN/Inf in dz where z <= 0 give 0, as in eager.
        g = tl.where(keep, dz, 0.0)
        acc_g += g
        acc_gx += g * tl.where(ok, x - mean[None, :], 0.0)
    tl.store(partial_ptr + split * C + cols, tl.sum(acc_g, axis=0), mask=col_ok)
    tl.store(partial_ptr + (splits + split) * C + cols, tl.sum(acc_gx, axis=0), mask=col_ok)

    tl.debug_barrier()  # every thread's stores come before the ticket's release
    ticket = tl.atomic_add(ticket_ptr + pid_c, 1, sem="acq_rel")
    if ticket == splits - 1:
        sum_g = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        sum_gx = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        for p0 in range(0, splits, BLOCK_P):
            rows = p0 + tl.arange(0, BLOCK_P)
            ok = (rows < splits)[:, None] & col_ok[None, :]
            offs = rows[:, None] * C + cols[None, :]
            sum_g += tl.load(partial_ptr + offs, mask=ok, other=0.0, cache_modifier=".cg")
            sum_gx += tl.load(partial_ptr + splits * C + offs, mask=ok, other=0.0, cache_modifier=".cg")
        total_g = tl.sum(sum_g, axis=0)
        total_gx = tl.sum(sum_gx, axis=0)
        tl.store(sums_ptr + cols, total_g, mask=col_ok)
        tl.store(sums_ptr + C + cols, total_gx, mask=col_ok)
        if dw_ptr is not None:
            rstd = tl.load(stats_ptr + C + cols, mask=col_ok, other=0.0).to(ACC)
            tl.store(dw_ptr + cols, (total_gx * rstd).to(dw_ptr.dtype.element_ty), mask=col_ok)
        if db_ptr is not None:
            tl.store(db_ptr + cols, total_g.to(db_ptr.dtype.element_ty), mask=col_ok)
        tl.atomic_xchg(ticket_ptr + pid_c, 0)


@triton.jit
def _elementwise_kernel(
    dz_ptr, x_ptr,  # [N, C, HW] views, any strides
    mask_ptr,  # ReLU mask, in the memory order of dx/dr (z's)
    stats_ptr,  # [2C + 1]: mean, rstd, count
    w_ptr,  # [C], or None
    sums_ptr,  # [2C]: sum(g), sum(g * xmu) (None in eval mode)
    dx_ptr, dr_ptr,  # outputs, dense in NCHW or channels_last order (C_LAST), or None
    n_elements, C, HW,
    dz_sn, dz_sc, dz_shw,
    x_sn, x_sc, x_shw,
    DZ_DENSE: tl.constexpr, X_DENSE: tl.constexpr, C_LAST: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    o = pid * BLOCK + tl.arange(0, BLOCK)
    in_range = o < n_elements
    n, c, hw = nchw_split(o, C, HW, C_LAST)
    keep = unpack_mask(mask_ptr, pid, n_elements, BLOCK)
    if DZ_DENSE:
        dz_off = o
    else:
        dz_off = n * dz_sn + c * dz_sc + hw * dz_shw
    dz = tl.load(dz_ptr + dz_off, mask=in_range, other=0.0).to(ACC)
    g = tl.where(keep, dz, 0.0)
    if dr_ptr is not None:
        tl.store(dr_ptr + o, g.to(dr_ptr.dtype.element_ty), mask=in_range)
    if dx_ptr is not None:
        rstd = tl.load(stats_ptr + C + c, mask=in_range, other=0.0).to(ACC)
        scale = rstd
        if w_ptr is not None:
            scale = scale * tl.load(w_ptr + c, mask=in_range, other=0.0).to(ACC)
        if sums_ptr is not None:
            inv_m = 1.0 / tl.load(stats_ptr + 2 * C).to(ACC)
            mean = tl.load(stats_ptr + c, mask=in_range, other=0.0).to(ACC)
            sum_g = tl.load(sums_ptr + c, mask=in_range, other=0.0).to(ACC)
            sum_gx = tl.load(sums_ptr + C + c, mask=in_range, other=0.0).to(ACC)
            if X_DENSE:
                x_off = o
            else:
                x_off = n * x_sn + c * x_sc + hw * x_shw
            x = tl.load(x_ptr + x_off, mask=in_range, other=0.0).to(ACC)
            dx = scale * (g - sum_g * inv_m - (x - mean) * (rstd * rstd * sum_gx * inv_m))
        else:
            dx = scale * g
        tl.store(dx_ptr + o, dx.to(dx_ptr.dtype.element_ty), mask=in_range)


reduce_kernel = Kernel(_reduce_kernel)
elementwise_kernel = Kernel(_elementwise_kernel)


def reduce(
    dz: torch.Tensor, dz_strides: tuple, x: torch.Tensor, x_strides: tuple, shape: tuple[int, int, int],
    z_strides: tuple, mask: torch.Tensor, stats: torch.Tensor, sums: torch.Tensor,
    dweight: torch.Tensor | None, dbias: torch.Tensor | None,
) -> None:
    """``sums = [sum(g) | sum(g * (x - mean))]`` per channel of [N, C, HW] views; fills dweight/dbias if given.

    ``z_strides`` are the forward output's, which locate each element's mask bit.
    """
    n, c, hw = shape
    per_n, block_r, block_c, splits, per_split, n_tiles, c_blocks, num_warps, block_p = stats_plan(
        shape, x_strides, x.device)
    partial = scratch(x.device, 2 * splits * c, stats.dtype)
    tickets = counters(x.device, c_blocks)
    key = (shape, x_strides, dz_strides, z_strides, x.dtype, dz.dtype, x.device, aligned(x), aligned(dz),
           stats.dtype, tensor_key(dweight), tensor_key(dbias))
    reduce_kernel(
        key, (c_blocks, splits, 1), stream(x.device), num_warps,
        dz, x, mask, stats, partial, tickets, sums, dweight, dbias,
        n, c, hw, *dz_strides, *x_strides, *z_strides, per_split, n_tiles, splits,
        per_n, tl_dtype(stats.dtype), block_r, block_c, block_p,
    )


def elementwise(
    dz: torch.Tensor, dz_strides: tuple, x: torch.Tensor, x_strides: tuple, shape: tuple[int, int, int],
    out_strides: tuple, mask: torch.Tensor, stats: torch.Tensor, weight: torch.Tensor | None,
    sums: torch.Tensor | None, dx: torch.Tensor | None, dr: torch.Tensor | None, c_last: bool,
) -> None:
    """dx (and dr = g), dense in the forward output's order (``out_strides`` as [N, C, HW]).

    ``sums`` is given in training mode, where the batch statistics depend on
    x; without it dx = weight * rstd * g.
    """
    n, c, hw = shape
    numel = n * c * hw
    device = x.device
    block, num_warps = elementwise_settings(numel, device)
    key = (shape, dz_strides, x_strides, out_strides, dz.dtype, x.dtype, device, aligned(dz), aligned(x),
           stats.dtype, tensor_key(weight), sums is None, tensor_key(dx), tensor_key(dr), c_last)
    elementwise_kernel(
        key, (cdiv(numel, block), 1, 1), stream(device), num_warps,
        dz, x, mask, stats, weight, sums, dx, dr,
        numel, c, hw, *dz_strides, *x_strides,
        dz_strides == out_strides, x_strides == out_strides, c_last,
        tl_dtype(stats.dtype), block,
    )
