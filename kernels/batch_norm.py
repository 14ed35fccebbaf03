"""Fused batch norm + optional residual add + ReLU, forward.

Training mode is three launches:

1. ``partial_stats``: each program reduces a range of rows of a block of
   channels to (count, mean, M2), tile by tile: the tile's own mean first, then
   the squared deviations from it, merged into the running result with Chan's
   formula. Values are shifted by the channel's first element before any sum,
   so the means being merged are small numbers: with a large mean (1e3 with
   unit variance, say) the fp32 rounding of ~1e3 would otherwise swamp the
   differences between tile means. Nothing is summed as raw ``x`` and ``x**2``.
2. ``combine_stats``: merges the partials of each channel (the weighted mean,
   then ``sum(M2_i + n_i * (mean_i - mean)**2)``), writes mean, M2, count and
   rstd, and updates the running statistics (unbiased variance) in place. The
   same kernel merges the per-process results of synchronized batch norm.
3. ``apply``: ``z = relu((x - mean) * rstd * weight + bias [+ r])`` over the
   output's memory order, with the ReLU sign as a 1-bit mask for backward.

Eval mode is the apply pass alone, with BN folded to a per-channel scale and
shift from the running statistics (``scale = weight / sqrt(running_var + eps)``).

All arithmetic is float32 (float64 for float64 inputs) whatever the storage.
"""

import torch
import triton
import triton.language as tl

from .utils import (
    acc_dtype, elementwise_settings, nchw_split, pack_mask, reduction_settings, rsqrt_rn, tile_rows, tl_dtype,
)


@triton.jit
def _partial_stats_kernel(
    x_ptr,  # [N, C, HW] view, any strides
    p_mean_ptr, p_m2_ptr,  # [splits, C] outputs; the means are relative to the shift
    p_count_ptr,  # [splits] output: elements per channel this split reduced
    shift_ptr,  # [C] output: the shift, x[0, c, 0] (0 if that is not finite)
    N, C, HW,
    s_n, s_c, s_hw,  # strides of x
    tiles_per_split, n_tiles,
    PER_N: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    shift = tl.load(x_ptr + cols * s_c, mask=col_ok, other=0.0).to(ACC)
    shift = tl.where(tl.abs(shift) < float("inf"), shift, 0.0)  # NaN/Inf: no shift
    count = tl.zeros([], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    t0 = split * tiles_per_split
    for t in range(t0, tl.minimum(t0 + tiles_per_split, n_tiles)):
        rows, row_ok, n_rows = tile_rows(t, N, HW, s_n, s_hw, PER_N, BLOCK_R)
        ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] + cols[None, :] * s_c, mask=ok, other=0.0).to(ACC)
        x = tl.where(ok, x - shift[None, :], 0.0)
        n_t = n_rows.to(ACC)
        mean_t = tl.sum(x, axis=0) / n_t
        d = tl.where(ok, x - mean_t[None, :], 0.0)
        m2_t = tl.sum(d * d, axis=0)
        # Chan et al.: merge (count, mean, m2) with the tile's (n_t, mean_t, m2_t).
        total = count + n_t
        delta = mean_t - mean
        mean += delta * (n_t / total)
        m2 += m2_t + delta * delta * (count * n_t / total)
        count = total
    tl.store(p_mean_ptr + split * C + cols, mean, mask=col_ok)
    tl.store(p_m2_ptr + split * C + cols, m2, mask=col_ok)
    tl.store(p_count_ptr + split, count, mask=pid_c == 0)
    tl.store(shift_ptr + cols, shift, mask=col_ok & (split == 0))


@triton.jit
def _partial_rows(p_count_ptr, p_mean_ptr, p0, P, C, cols, col_ok, BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    """Partials p0 .. p0 + BLOCK_P: (counts, means, valid, [P, C] offsets)."""
    rows = p0 + tl.arange(0, BLOCK_P)
    row_ok = rows < P
    n_p = tl.load(p_count_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    ok = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * C + cols[None, :]
    return n_p, tl.load(p_mean_ptr + offs, mask=ok, other=0.0).to(ACC), ok, offs


@triton.jit
def _combine_stats_kernel(
    p_mean_ptr, p_m2_ptr, p_count_ptr,  # [P, C], [P, C], [P] partial results
    shift_ptr,  # [C] what the partial means are relative to (HAS_SHIFT)
    mean_ptr, m2_ptr, rstd_ptr,  # [C] outputs
    count_ptr,  # [1] output: elements per channel in all
    running_mean_ptr, running_var_ptr,  # [C], updated in place when UPDATE_RUNNING
    P, C, momentum, eps,
    HAS_SHIFT: tl.constexpr, UPDATE_RUNNING: tl.constexpr, ACC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    # Pass 1: total count and count-weighted mean.
    count = tl.zeros([], dtype=ACC)
    acc = tl.zeros([BLOCK_C], dtype=ACC)
    for p0 in range(0, P, BLOCK_P):
        n_p, mean_p, ok, offs = _partial_rows(p_count_ptr, p_mean_ptr, p0, P, C, cols, col_ok, BLOCK_P, ACC)
        count += tl.sum(n_p, axis=0)
        acc += tl.sum(n_p[:, None] * mean_p, axis=0)
    mean = acc / count
    # Pass 2: M2 = sum of the partial M2 plus each partial's offset from the mean.
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    for p0 in range(0, P, BLOCK_P):
        n_p, mean_p, ok, offs = _partial_rows(p_count_ptr, p_mean_ptr, p0, P, C, cols, col_ok, BLOCK_P, ACC)
        m2_p = tl.load(p_m2_ptr + offs, mask=ok, other=0.0).to(ACC)
        d = mean_p - mean[None, :]
        m2 += tl.sum(tl.where(ok, m2_p + n_p[:, None] * d * d, 0.0), axis=0)
    rstd = rsqrt_rn(m2 / count + eps)
    if HAS_SHIFT:
        mean += tl.load(shift_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    tl.store(mean_ptr + cols, mean, mask=col_ok)
    tl.store(m2_ptr + cols, m2, mask=col_ok)
    tl.store(rstd_ptr + cols, rstd, mask=col_ok)
    tl.store(count_ptr, count, mask=pid == 0)
    if UPDATE_RUNNING:
        # BatchNorm's update: the running variance is the unbiased one.
        rm = tl.load(running_mean_ptr + cols, mask=col_ok, other=0.0).to(ACC)
        rv = tl.load(running_var_ptr + cols, mask=col_ok, other=0.0).to(ACC)
        rm = momentum * mean + (1 - momentum) * rm
        rv = momentum * (m2 / (count - 1)) + (1 - momentum) * rv
        tl.store(running_mean_ptr + cols, rm.to(running_mean_ptr.dtype.element_ty), mask=col_ok)
        tl.store(running_var_ptr + cols, rv.to(running_var_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _apply_kernel(
    x_ptr, r_ptr,  # [N, C, HW] views, any strides
    z_ptr,  # output, dense in NCHW or channels_last order (C_LAST)
    mask_ptr,  # uint8 ReLU mask in z's memory order (WRITE_MASK)
    mean_ptr,  # [C] batch mean, or running mean (FROM_VAR)
    rstd_ptr,  # [C] batch 1/std, or the running variance (FROM_VAR)
    w_ptr, b_ptr,  # [C] affine parameters (HAS_WEIGHT / HAS_BIAS)
    n_elements, C, HW, eps,
    x_sn, x_sc, x_shw,
    r_sn, r_sc, r_shw,
    X_DENSE: tl.constexpr, R_DENSE: tl.constexpr,  # laid out exactly as z
    C_LAST: tl.constexpr, FROM_VAR: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    WRITE_MASK: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    o = pid * BLOCK + tl.arange(0, BLOCK)
    in_range = o < n_elements
    n, c, hw = nchw_split(o, C, HW, C_LAST)

    # Per-channel values: gathers that hit in cache.
    mean = tl.load(mean_ptr + c, mask=in_range, other=0.0).to(ACC)
    if FROM_VAR:
        rstd = rsqrt_rn(tl.load(rstd_ptr + c, mask=in_range, other=1.0).to(ACC) + eps)
    else:
        rstd = tl.load(rstd_ptr + c, mask=in_range, other=0.0).to(ACC)
    scale = rstd
    if HAS_WEIGHT:
        scale = scale * tl.load(w_ptr + c, mask=in_range, other=0.0).to(ACC)

    if X_DENSE:
        x_off = o
    else:
        x_off = n * x_sn + c * x_sc + hw * x_shw
    x = tl.load(x_ptr + x_off, mask=in_range, other=0.0).to(ACC)
    if FROM_VAR:
        # Eval: BN folded to one scale and shift per channel, as eager folds it.
        shift = -mean * scale
        if HAS_BIAS:
            shift += tl.load(b_ptr + c, mask=in_range, other=0.0).to(ACC)
        y = x * scale + shift
    else:
        y = (x - mean) * scale
        if HAS_BIAS:
            y += tl.load(b_ptr + c, mask=in_range, other=0.0).to(ACC)
    if HAS_RESIDUAL:
        if R_DENSE:
            r_off = o
        else:
            r_off = n * r_sn + c * r_sc + hw * r_shw
        y += tl.load(r_ptr + r_off, mask=in_range, other=0.0).to(ACC)
    # `y < 0` rather than `y > 0` keeps NaN as NaN, as torch.relu does.
    z = tl.where(y < 0, 0.0, y)
    tl.store(z_ptr + o, z.to(z_ptr.dtype.element_ty), mask=in_range)
    if WRITE_MASK:
        # Eager's relu backward is where(z <= 0, 0, dz): NaN outputs pass dz on.
        pack_mask(mask_ptr, tl.where(y <= 0, 0, 1), pid, n_elements, BLOCK)


def per_n_tiles(x: torch.Tensor) -> bool:
    """Reduce NCHW-like views along hw inside each sample; others over n * hw."""
    return x.shape[2] > 1 and x.stride(2) <= x.stride(1)


def partial_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-split (mean - shift, M2, count) of each channel of the [N, C, HW] view ``x``, and the shift.

    ``x`` must have at least one element.
    """
    n, c, hw = x.shape
    per_n = per_n_tiles(x)
    block_r, block_c, splits, per_split, num_warps = reduction_settings(n, c, hw, per_n, x.device)
    acc = acc_dtype(x.dtype)
    p_mean = torch.empty(splits, c, dtype=acc, device=x.device)
    p_m2 = torch.empty(splits, c, dtype=acc, device=x.device)
    p_count = torch.empty(splits, dtype=acc, device=x.device)
    shift = torch.empty(c, dtype=acc, device=x.device)
    n_tiles = n * triton.cdiv(hw, block_r) if per_n else triton.cdiv(n * hw, block_r)
    _partial_stats_kernel[(triton.cdiv(c, block_c), splits)](
        x, p_mean, p_m2, p_count, shift, n, c, hw, *x.stride(), per_split, n_tiles,
        PER_N=per_n, ACC=tl_dtype(acc), BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
    )
    return p_mean, p_m2, p_count, shift


def combine_stats(
    p_mean: torch.Tensor, p_m2: torch.Tensor, p_count: torch.Tensor, shift: torch.Tensor | None,
    running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
    momentum: float, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, M2, count[1], rstd) from partials; updates the running stats if given.

    ``shift`` is what the partial means are relative to (None: they are not).
    """
    n_parts, c = p_mean.shape
    acc = p_mean.dtype
    mean, m2, rstd = (torch.empty(c, dtype=acc, device=p_mean.device) for _ in range(3))
    count = torch.empty(1, dtype=acc, device=p_mean.device)
    update = running_mean is not None
    block_c = min(triton.next_power_of_2(c), 128)
    block_p = min(triton.next_power_of_2(n_parts), 32)
    _combine_stats_kernel[(triton.cdiv(c, block_c),)](
        p_mean, p_m2, p_count, mean if shift is None else shift, mean, m2, rstd, count,
        running_mean if update else mean, running_var if update else mean,
        n_parts, c, momentum, eps,
        HAS_SHIFT=shift is not None, UPDATE_RUNNING=update, ACC=tl_dtype(acc), BLOCK_P=block_p, BLOCK_C=block_c,
    )
    return mean, m2, count, rstd


def apply(
    x: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None,
    mean: torch.Tensor, rstd_or_var: torch.Tensor,
    weight: torch.Tensor | None, bias: torch.Tensor | None, residual: torch.Tensor | None,
    eps: float, from_var: bool, c_last: bool,
) -> None:
    """``z = relu(bn(x) [+ residual])``: [N, C, HW] views, ``z`` dense in its order.

    ``from_var``: ``mean``/``rstd_or_var`` are the running mean and variance (eval).
    """
    numel = z.numel()
    n, c, hw = z.shape
    block, num_warps = elementwise_settings(numel, z.device)
    r = residual if residual is not None else x
    _apply_kernel[(triton.cdiv(numel, block),)](
        x, r, z, z if mask is None else mask, mean, rstd_or_var,
        mean if weight is None else weight, mean if bias is None else bias,
        numel, c, hw, eps, *x.stride(), *r.stride(),
        X_DENSE=x.stride() == z.stride(), R_DENSE=r.stride() == z.stride(),
        C_LAST=c_last, FROM_VAR=from_var,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None, WRITE_MASK=mask is not None,
        ACC=tl_dtype(acc_dtype(x.dtype)), BLOCK=block, num_warps=num_warps,
    )
