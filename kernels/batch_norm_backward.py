"""Fused batch norm + optional residual add + ReLU, backward.

With ``g = dz * [not z <= 0]`` (from the 1-bit mask), ``xmu = x - mean``:

    dbias   = sum(g)                 dweight = rstd * sum(g * xmu)
    dx      = weight * rstd * (g - sum(g) / m - xmu * rstd**2 * sum(g * xmu) / m)
    dr      = g

(in eval mode the statistics are constants: ``dx = weight * rstd * g``). Three
launches: ``reduce`` writes per-split partial sums of g and g * xmu for each
channel, ``finish_reduce`` adds them up and writes dweight and dbias, and
``elementwise`` writes dx and dr in one pass over the output's memory order.
Synchronized batch norm all-reduces the two sums between the last two.
"""

import torch
import triton
import triton.language as tl

from .batch_norm import per_n_tiles
from .utils import (
    elementwise_settings, mask_bits_at, nchw_split, reduction_settings, tile_rows, tl_dtype, unpack_mask,
)


@triton.jit
def _reduce_kernel(
    dz_ptr, x_ptr,  # [N, C, HW] views, any strides
    mask_ptr,  # ReLU mask in z's memory order; z's strides locate each bit
    mean_ptr,  # [C]
    p_g_ptr, p_gx_ptr,  # [splits, C] outputs: partial sum(g), sum(g * (x - mean))
    N, C, HW,
    dz_sn, dz_sc, dz_shw,
    x_sn, x_sc, x_shw,
    z_sn, z_sc, z_shw,
    tiles_per_split, n_tiles,
    PER_N: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    sum_g = tl.zeros([BLOCK_C], dtype=ACC)
    sum_gx = tl.zeros([BLOCK_C], dtype=ACC)
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
        sum_g += tl.sum(g, axis=0)
        sum_gx += tl.sum(g * tl.where(ok, x - mean[None, :], 0.0), axis=0)
    tl.store(p_g_ptr + split * C + cols, sum_g, mask=col_ok)
    tl.store(p_gx_ptr + split * C + cols, sum_gx, mask=col_ok)


@triton.jit
def _finish_reduce_kernel(
    p_g_ptr, p_gx_ptr,  # [P, C] partial sums
    rstd_ptr,  # [C]
    sum_g_ptr, sum_gx_ptr,  # [C] outputs
    dw_ptr, db_ptr,  # [C] outputs in the parameters' dtypes (WRITE_DW / WRITE_DB)
    P, C,
    WRITE_DW: tl.constexpr, WRITE_DB: tl.constexpr, ACC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    sum_g = tl.zeros([BLOCK_C], dtype=ACC)
    sum_gx = tl.zeros([BLOCK_C], dtype=ACC)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        ok = (rows < P)[:, None] & col_ok[None, :]
        offs = rows[:, None] * C + cols[None, :]
        sum_g += tl.sum(tl.load(p_g_ptr + offs, mask=ok, other=0.0).to(ACC), axis=0)
        sum_gx += tl.sum(tl.load(p_gx_ptr + offs, mask=ok, other=0.0).to(ACC), axis=0)
    tl.store(sum_g_ptr + cols, sum_g, mask=col_ok)
    tl.store(sum_gx_ptr + cols, sum_gx, mask=col_ok)
    if WRITE_DW:
        rstd = tl.load(rstd_ptr + cols, mask=col_ok, other=0.0).to(ACC)
        tl.store(dw_ptr + cols, (sum_gx * rstd).to(dw_ptr.dtype.element_ty), mask=col_ok)
    if WRITE_DB:
        tl.store(db_ptr + cols, sum_g.to(db_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _elementwise_kernel(
    dz_ptr, x_ptr,  # [N, C, HW] views, any strides
    mask_ptr,  # ReLU mask, in the memory order of dx/dr (z's)
    mean_ptr, rstd_ptr, w_ptr,  # [C]
    sum_g_ptr, sum_gx_ptr,  # [C] (TRAINING)
    count_ptr,  # [1] elements per channel (TRAINING)
    dx_ptr, dr_ptr,  # outputs, dense in NCHW or channels_last order (C_LAST)
    n_elements, C, HW,
    dz_sn, dz_sc, dz_shw,
    x_sn, x_sc, x_shw,
    DZ_DENSE: tl.constexpr, X_DENSE: tl.constexpr, C_LAST: tl.constexpr,
    TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    WRITE_DX: tl.constexpr, WRITE_DR: tl.constexpr,
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
    if WRITE_DR:
        tl.store(dr_ptr + o, g.to(dr_ptr.dtype.element_ty), mask=in_range)
    if WRITE_DX:
        rstd = tl.load(rstd_ptr + c, mask=in_range, other=0.0).to(ACC)
        scale = rstd
        if HAS_WEIGHT:
            scale = scale * tl.load(w_ptr + c, mask=in_range, other=0.0).to(ACC)
        if TRAINING:
            inv_m = 1.0 / tl.load(count_ptr).to(ACC)
            mean = tl.load(mean_ptr + c, mask=in_range, other=0.0).to(ACC)
            sum_g = tl.load(sum_g_ptr + c, mask=in_range, other=0.0).to(ACC)
            sum_gx = tl.load(sum_gx_ptr + c, mask=in_range, other=0.0).to(ACC)
            if X_DENSE:
                x_off = o
            else:
                x_off = n * x_sn + c * x_sc + hw * x_shw
            x = tl.load(x_ptr + x_off, mask=in_range, other=0.0).to(ACC)
            dx = scale * (g - sum_g * inv_m - (x - mean) * (rstd * rstd * sum_gx * inv_m))
        else:
            dx = scale * g
        tl.store(dx_ptr + o, dx.to(dx_ptr.dtype.element_ty), mask=in_range)


def reduce(
    dz: torch.Tensor, x: torch.Tensor, z_strides: tuple[int, int, int], mask: torch.Tensor,
    mean: torch.Tensor, rstd: torch.Tensor,
    dweight: torch.Tensor | None, dbias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(sum(g), sum(g * (x - mean)))`` of [N, C, HW] views; fills dweight/dbias if given.

    ``z_strides`` are the forward output's, which locate each element's mask bit.
    """
    n, c, hw = x.shape
    per_n = per_n_tiles(x)
    block_r, block_c, splits, per_split, num_warps = reduction_settings(n, c, hw, per_n, x.device)
    acc = mean.dtype
    p_g = torch.empty(splits, c, dtype=acc, device=x.device)
    p_gx = torch.empty(splits, c, dtype=acc, device=x.device)
    n_tiles = n * triton.cdiv(hw, block_r) if per_n else triton.cdiv(n * hw, block_r)
    _reduce_kernel[(triton.cdiv(c, block_c), splits)](
        dz, x, mask, mean, p_g, p_gx, n, c, hw,
        *dz.stride(), *x.stride(), *z_strides, per_split, n_tiles,
        PER_N=per_n, ACC=tl_dtype(acc), BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
    )
    sum_g = torch.empty(c, dtype=acc, device=x.device)
    sum_gx = torch.empty(c, dtype=acc, device=x.device)
    block_c = min(triton.next_power_of_2(c), 128)
    _finish_reduce_kernel[(triton.cdiv(c, block_c),)](
        p_g, p_gx, rstd, sum_g, sum_gx,
        sum_g if dweight is None else dweight, sum_g if dbias is None else dbias,
        splits, c, WRITE_DW=dweight is not None, WRITE_DB=dbias is not None, ACC=tl_dtype(acc),
        BLOCK_P=min(triton.next_power_of_2(splits), 32), BLOCK_C=block_c,
    )
    return sum_g, sum_gx


def elementwise(
    dz: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
    mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor | None,
    sum_g: torch.Tensor | None, sum_gx: torch.Tensor | None, count: torch.Tensor | None,
    dx: torch.Tensor | None, dr: torch.Tensor | None, c_last: bool,
) -> None:
    """dx (and dr = g) as [N, C, HW] views dense in the forward output's order.

    ``sum_g``/``sum_gx``/``count`` are given in training mode, where the batch
    statistics depend on x; without them dx = weight * rstd * g.
    """
    out = dx if dx is not None else dr
    numel = out.numel()
    n, c, hw = out.shape
    block, num_warps = elementwise_settings(numel, out.device)
    training = sum_g is not None
    _elementwise_kernel[(triton.cdiv(numel, block),)](
        dz, x, mask, mean, rstd, rstd if weight is None else weight,
        sum_g if training else rstd, sum_gx if training else rstd, count if training else rstd,
        out if dx is None else dx, out if dr is None else dr,
        numel, c, hw, *dz.stride(), *x.stride(),
        DZ_DENSE=dz.stride() == out.stride(), X_DENSE=x.stride() == out.stride(),
        C_LAST=c_last, TRAINING=training, HAS_WEIGHT=weight is not None,
        WRITE_DX=dx is not None, WRITE_DR=dr is not None,
        ACC=tl_dtype(mean.dtype), BLOCK=block, num_warps=num_warps,
    )
