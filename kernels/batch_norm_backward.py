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
``elementwise`` then writes dx and dr in one pass of 2-D tiles over the
output's memory order, the per-channel coefficients loaded once per tile. Synchronized batch norm all-reduces ``sums`` between the two.

``stats`` is the forward's ``[mean (C) | rstd (C) | count (1)]``.
"""

import torch
import triton
import triton.language as tl

from .batch_norm import channel_vector, mask_strides, stats_plan
from .launch import Kernel, cdiv, counters, scratch, stream
from .utils import tile_2d, tile_index, tile_mask_bits, tile_offsets, tile_settings, tl_dtype, unpack_mask_2d


@triton.jit
def sum_partial_rows(
    partial_ptr,  # [2, P, C]: partial sum(g), then partial sum(g * xmu)
    P, r0, r1, C, cols, col_ok,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """(sum(g), sum(g * xmu)) of channels ``cols`` over partial rows ``r0 .. r1 - 1``, in a fixed order."""
    sum_g = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    sum_gx = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    for p0 in range(r0, r1, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        ok = (rows < r1)[:, None] & col_ok[None, :]
        offs = rows[:, None] * C + cols[None, :]
        # .cg: written by other programs of this launch, read past L1.
        sum_g += tl.load(partial_ptr + offs, mask=ok, other=0.0, cache_modifier=".cg")
        sum_gx += tl.load(partial_ptr + P * C + offs, mask=ok, other=0.0, cache_modifier=".cg")
    return tl.sum(sum_g, axis=0), tl.sum(sum_gx, axis=0)


@triton.jit
def store_sums(
    total_g, total_gx, C, cols, col_ok,
    stats_ptr,  # [2C + 1]: mean, rstd, count
    sums_ptr,  # [2C] output: sum(g), sum(g * xmu)
    dw_ptr, db_ptr,  # [C] outputs in the parameters' dtypes, or None
    ACC: tl.constexpr,
):
    """Store a channel block's finished sums, and dweight = rstd * sum(g * xmu), dbias = sum(g)."""
    tl.store(sums_ptr + cols, total_g, mask=col_ok)
    tl.store(sums_ptr + C + cols, total_gx, mask=col_ok)
    if dw_ptr is not None:
        rstd = tl.load(stats_ptr + C + cols, mask=col_ok, other=0.0).to(ACC)
        tl.store(dw_ptr + cols, (total_gx * rstd).to(dw_ptr.dtype.element_ty), mask=col_ok)
    if db_ptr is not None:
        tl.store(db_ptr + cols, total_g.to(db_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def finish_sums(
    partial_ptr,  # [2, P, C]: partial sum(g), sum(g * xmu), written by other programs of this launch
    P, C, cols, col_ok, stats_ptr, sums_ptr, dw_ptr, db_ptr,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The last program of a channel block: add the P partial sums, store them and dweight, dbias."""
    total_g, total_gx = sum_partial_rows(partial_ptr, P, 0, P, C, cols, col_ok, ACC, BLOCK_P, BLOCK_C)
    store_sums(total_g, total_gx, C, cols, col_ok, stats_ptr, sums_ptr, dw_ptr, db_ptr, ACC)


# Sizes and counters that no load's alignment depends on: one binary for all their values.
@triton.jit(do_not_specialize=["tiles_per_split", "n_tiles", "splits"])
def batch_norm_relu_bwd_sums_kernel(
    dz_ptr, x_ptr,  # [N, C, HW] views, any strides
    mask_ptr,  # ReLU mask; (z_sn, z_sc, z_shw) locate each element's bit
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
    PER_N: tl.constexpr, FLAT: tl.constexpr, MASK_TILE: tl.constexpr, ACC: tl.constexpr,
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
        n, hw, row_ok, start, _ = tile_index(t, N, HW, PER_N, FLAT, BLOCK_R)
        ok = row_ok[:, None] & col_ok[None, :]
        keep = tile_mask_bits(mask_ptr, n, hw, start, cols, pid_c * BLOCK_C, C, HW, row_ok, ok, z_sn, z_sc, z_shw,
                              MASK_TILE, BLOCK_R, BLOCK_C)
        dz = tl.load(dz_ptr + (n * dz_sn + hw * dz_shw)[:, None] + cols[None, :] * dz_sc, mask=ok, other=0.0).to(ACC)
        x = tl.load(x_ptr + (n * x_sn + hw * x_shw)[:, None] + cols[None, :] * x_sc, mask=ok, other=0.0).to(ACC)
        # A select, not a product: NaN/Inf in dz where z <= 0 give 0, as in eager.
        g = tl.where(keep, dz, 0.0)
        acc_g += g
        acc_gx += g * tl.where(ok, x - mean[None, :], 0.0)
    tl.store(partial_ptr + split * C + cols, tl.sum(acc_g, axis=0), mask=col_ok)
    tl.store(partial_ptr + (splits + split) * C + cols, tl.sum(acc_gx, axis=0), mask=col_ok)

    tl.debug_barrier()  # every thread's stores come before the ticket's release
    ticket = tl.atomic_add(ticket_ptr + pid_c, 1, sem="acq_rel")
    if ticket == splits - 1:
        finish_sums(partial_ptr, splits, C, cols, col_ok, stats_ptr, sums_ptr, dw_ptr, db_ptr, ACC, BLOCK_P, BLOCK_C)
        tl.atomic_xchg(ticket_ptr + pid_c, 0)


# Sizes and counters that no load's alignment depends on: one binary for all their values.
@triton.jit(do_not_specialize=["ROWS", "HW"])
def batch_norm_relu_bwd_dx_kernel(
    dz_ptr, x_ptr,  # [N, C, HW] views, any strides
    mask_ptr,  # ReLU mask, ceil(COLS / 8) bytes per row of the output's [ROWS, COLS] layout (None: dz is g)
    stats_ptr,  # [2C + 1]: mean, rstd, count
    w_ptr,  # [C], or None
    sums_ptr,  # [2C]: sum(g), sum(g * xmu) (None in eval mode)
    dx_ptr, dr_ptr,  # outputs, dense [ROWS, COLS] as the forward output, or None
    ROWS, COLS, C, HW,
    dz_sn, dz_sc, dz_shw,
    x_sn, x_sc, x_shw,
    dx_sn, dx_sc, dx_shw,  # dx's strides when not DX_DENSE (a channel slice of a gradient buffer)
    DZ_DENSE: tl.constexpr, X_DENSE: tl.constexpr, C_LAST: tl.constexpr, DX_DENSE: tl.constexpr,
    ACCUMULATE: tl.constexpr,  # dx += (the dense block's gradient buffer), else dx =
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, pid_k, cols, row_ok, col_ok, ok = tile_2d(ROWS, COLS, BLOCK_M, BLOCK_K)
    out_off = rows[:, None] * COLS + cols[None, :]
    if DZ_DENSE:
        dz_off = out_off
    else:
        dz_off = tile_offsets(rows, cols, C, HW, dz_sn, dz_sc, dz_shw, C_LAST)
    dz = tl.load(dz_ptr + dz_off, mask=ok, other=0.0).to(ACC)
    if mask_ptr is not None:
        keep = unpack_mask_2d(mask_ptr, rows, pid_k * (BLOCK_K // 8), (COLS + 7) // 8, row_ok, BLOCK_M, BLOCK_K)
        # A select, not a product: NaN/Inf in dz where z <= 0 give 0, as in eager.
        g = tl.where(keep, dz, 0.0)
    else:  # dz is g already (the BN-ReLU-Conv dgrad applied the mask)
        g = dz
    if dr_ptr is not None:
        tl.store(dr_ptr + out_off, g.to(dr_ptr.dtype.element_ty), mask=ok)
    if dx_ptr is not None:
        # Per-channel coefficients, once per tile.
        rstd = channel_vector(stats_ptr + C, rows, cols, C, row_ok, col_ok, C_LAST, ACC, 0.0)
        scale = rstd
        if w_ptr is not None:
            scale = scale * channel_vector(w_ptr, rows, cols, C, row_ok, col_ok, C_LAST, ACC, 0.0)
        if sums_ptr is not None:
            inv_m = 1.0 / tl.load(stats_ptr + 2 * C).to(ACC)
            mean = channel_vector(stats_ptr, rows, cols, C, row_ok, col_ok, C_LAST, ACC, 0.0)
            mean_g = channel_vector(sums_ptr, rows, cols, C, row_ok, col_ok, C_LAST, ACC, 0.0) * inv_m
            k = rstd * rstd * channel_vector(sums_ptr + C, rows, cols, C, row_ok, col_ok, C_LAST, ACC, 0.0) * inv_m
            if X_DENSE:
                x_off = out_off
            else:
                x_off = tile_offsets(rows, cols, C, HW, x_sn, x_sc, x_shw, C_LAST)
            x = tl.load(x_ptr + x_off, mask=ok, other=0.0).to(ACC)
            dx = scale * (g - mean_g - (x - mean) * k)
        else:
            dx = scale * g
        if DX_DENSE:
            dx_off = out_off
        else:
            dx_off = tile_offsets(rows, cols, C, HW, dx_sn, dx_sc, dx_shw, C_LAST)
        if ACCUMULATE:
            dx += tl.load(dx_ptr + dx_off, mask=ok, other=0.0).to(ACC)
        tl.store(dx_ptr + dx_off, dx.to(dx_ptr.dtype.element_ty), mask=ok)


reduce_kernel = Kernel(batch_norm_relu_bwd_sums_kernel)
elementwise_kernel = Kernel(batch_norm_relu_bwd_dx_kernel)


def batch_norm_relu_backward_reduce(
    dz: torch.Tensor, dz_strides: tuple, x: torch.Tensor, x_strides: tuple, shape: tuple[int, int, int],
    mask: torch.Tensor, c_last: bool, stats: torch.Tensor, sums: torch.Tensor,
    dweight: torch.Tensor | None, dbias: torch.Tensor | None,
) -> None:
    """``sums = [sum(g) | sum(g * (x - mean))]`` per channel of [N, C, HW] views; fills dweight/dbias if given.

    ``mask`` is the forward's, laid out for a channels_last output or not (``c_last``).
    """
    n, c, hw = shape
    per_n, block_r, block_c, splits, per_split, n_tiles, c_blocks, num_warps, block_p = stats_plan(
        shape, x_strides, x.device, torch.promote_types(x.dtype, dz.dtype))
    z_strides = mask_strides(shape, c_last)
    # Whole mask bytes per 8 tile elements when the tile runs along the mask's rows.
    mask_tile = 1 if c_last and not per_n else 2 if not c_last and per_n and block_r % 8 == 0 else 0
    s = stream(x.device)
    partial = scratch(x.device, 2 * splits * c, stats.dtype)
    tickets = counters(x.device, s, c_blocks)
    reduce_kernel(
        (c_blocks, splits, 1), s, num_warps,
        dz, x, mask, stats, partial, tickets, sums, dweight, dbias,
        n, c, hw, *dz_strides, *x_strides, *z_strides, per_split, n_tiles, splits,
        per_n, all(s[0] == hw * s[2] for s in (dz_strides, x_strides, z_strides)), mask_tile,
        tl_dtype(stats.dtype), block_r, block_c, block_p,
    )


def batch_norm_relu_backward_elementwise(
    dz: torch.Tensor, dz_strides: tuple, x: torch.Tensor, x_strides: tuple, shape: tuple[int, int, int],
    out_strides: tuple, mask: torch.Tensor, stats: torch.Tensor, weight: torch.Tensor | None,
    sums: torch.Tensor | None, dx: torch.Tensor | None, dr: torch.Tensor | None, c_last: bool,
    dx_strides: tuple | None = None, accumulate: bool = False,
) -> None:
    """dx (and dr = g), dense in the forward output's order (``out_strides`` as [N, C, HW]).

    ``sums`` is given in training mode, where the batch statistics depend on
    x; without it dx = weight * rstd * g. ``mask`` None: ``dz`` is g already
    (then ``dx`` may be ``dz`` itself: each element is read before it is written).
    ``dx_strides``: dx is a strided [N, C, HW] view instead (a slice of a
    larger gradient buffer); ``accumulate``: add dx to what it holds.
    """
    dx_strides = out_strides if dx_strides is None else dx_strides
    n, c, hw = shape
    rows, cols = (n * hw, c) if c_last else (n * c, hw)
    device = x.device
    block_m, block_k, num_warps = tile_settings(rows, cols, device)
    elementwise_kernel(
        (cdiv(rows, block_m), cdiv(cols, block_k), 1), stream(device), num_warps,
        dz, x, mask, stats, weight, sums, dx, dr,
        rows, cols, c, hw, *dz_strides, *x_strides, *dx_strides,
        dz_strides == out_strides, x_strides == out_strides, c_last, dx_strides == out_strides, accumulate,
        tl_dtype(stats.dtype), block_m, block_k,
    )
