"""Fused batch norm + optional residual add + ReLU, forward.

Training mode is two launches:

1. ``stats``: each program reduces a range of rows of a block of channels,
   accumulating its tiles in registers and reducing once: the sums of
   ``x - shift`` and of its square, where the shift is the mean of the
   channel's first tile, so that a large mean (1e3 with unit variance, say)
   costs no precision, nor does a mean that is small next to the values. It writes (count, mean, M2) per channel as a partial result;
   the last program to finish for a block of channels (an atomic ticket per
   block) merges that block's partials with Chan's formula (the weighted
   mean, then ``sum(M2_i + n_i * (mean_i - mean)**2)``), writes
   ``stats = [mean (C) | rstd (C) | count (1)]``, updates the running
   statistics (unbiased variance) and resets its ticket.
2. ``apply``: ``z = relu((x - mean) * rstd * weight + bias [+ r])`` over the
   output's memory order, with the ReLU sign as a 1-bit mask for backward.

Eval mode is the apply pass alone, from the running statistics; it also
writes ``stats`` (the running mean and ``1 / sqrt(running_var + eps)``) for
backward when asked. Synchronized batch norm runs ``stats`` in its local form
(``[mean | M2 | count]``, no running update), gathers those, and merges them
with ``combine``, the same merge as the last program's.

All arithmetic is float32 (float64 for float64 inputs) whatever the storage.
"""

import torch
import triton
import triton.language as tl

from .launch import Kernel, cdiv, counters, next_power_of_2, scratch, stream
from .utils import (
    acc_dtype, pack_mask_2d, partial_block, reduction_settings, row_bytes, rsqrt_rn, tile_index, tile_offsets,
    tile_2d, tile_settings, tl_dtype,
)


@triton.jit
def merge_partials(
    mean_ptr, m2_ptr, count_ptr,  # partial p: mean_ptr + p * row_stride + col, likewise M2; count_ptr + p * count_stride
    P, row_stride, count_stride, cols, col_ok,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """(mean, M2, count) of P partial (mean, M2, count) results, per channel ``cols``.

    Two passes, each accumulating in registers and reducing once. The loads
    bypass L1 (``.cg``): other programs may have written the partials during
    this launch.
    """
    acc_n = tl.zeros([BLOCK_P], dtype=ACC)
    acc_nm = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        row_ok = rows < P
        ok = row_ok[:, None] & col_ok[None, :]
        n_p = tl.load(count_ptr + rows * count_stride, mask=row_ok, other=0.0, cache_modifier=".cg").to(ACC)
        mean_p = tl.load(mean_ptr + rows[:, None] * row_stride + cols[None, :], mask=ok, other=0.0,
                         cache_modifier=".cg")
        acc_n += n_p
        acc_nm += n_p[:, None] * mean_p.to(ACC)
    count = tl.sum(acc_n, axis=0)
    mean = tl.sum(acc_nm, axis=0) / count
    acc_m2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        row_ok = rows < P
        ok = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * row_stride + cols[None, :]
        n_p = tl.load(count_ptr + rows * count_stride, mask=row_ok, other=0.0, cache_modifier=".cg").to(ACC)
        mean_p = tl.load(mean_ptr + offs, mask=ok, other=0.0, cache_modifier=".cg").to(ACC)
        m2_p = tl.load(m2_ptr + offs, mask=ok, other=0.0, cache_modifier=".cg").to(ACC)
        d = mean_p - mean[None, :]
        acc_m2 += tl.where(ok, m2_p + n_p[:, None] * d * d, 0.0)
    return mean, tl.sum(acc_m2, axis=0), count


@triton.jit
def finish_stats(
    mean, m2, count, cols, col_ok,
    stats_ptr,  # [2C + 1] output: mean, rstd (LOCAL: M2), count
    running_mean_ptr, running_var_ptr,  # [C], updated in place (None: no running statistics)
    C, momentum, eps,
    LOCAL: tl.constexpr, ACC: tl.constexpr,
):
    """Store the merged statistics of channels ``cols`` and update the running ones."""
    tl.store(stats_ptr + cols, mean, mask=col_ok)
    tl.store(stats_ptr + 2 * C, count)
    if LOCAL:
        tl.store(stats_ptr + C + cols, m2, mask=col_ok)
    else:
        tl.store(stats_ptr + C + cols, rsqrt_rn(m2 / count + eps), mask=col_ok)
        if running_mean_ptr is not None:
            # BatchNorm's update: the running variance is the unbiased one.
            rm = tl.load(running_mean_ptr + cols, mask=col_ok, other=0.0).to(ACC)
            rv = tl.load(running_var_ptr + cols, mask=col_ok, other=0.0).to(ACC)
            rm = momentum * mean + (1 - momentum) * rm
            rv = momentum * (m2 / (count - 1)) + (1 - momentum) * rv
            tl.store(running_mean_ptr + cols, rm.to(running_mean_ptr.dtype.element_ty), mask=col_ok)
            tl.store(running_var_ptr + cols, rv.to(running_var_ptr.dtype.element_ty), mask=col_ok)


# Sizes and counters that no load's alignment depends on: one binary for all their values.
@triton.jit(do_not_specialize=["tiles_per_split", "n_tiles", "splits"])
def batch_norm_stats_kernel(
    x_ptr,  # [N, C, HW] view, any strides
    partial_ptr,  # scratch: mean [splits, C], M2 [splits, C], count [splits, c_blocks]; means relative to the shift
    ticket_ptr,  # int32 [c_blocks], zero on entry and on exit: programs done per channel block
    stats_ptr,  # [2C + 1] output (see finish_stats)
    running_mean_ptr, running_var_ptr,  # [C] or None
    N, C, HW,
    s_n, s_c, s_hw,  # strides of x
    tiles_per_split, n_tiles, splits, momentum, eps,
    PER_N: tl.constexpr, FLAT: tl.constexpr, LOCAL: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    c_blocks = tl.num_programs(0)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    # The shift: the mean of the channel's first tile (the same in every program).
    n, hw, row_ok, _, n_rows = tile_index(0, N, HW, PER_N, FLAT, BLOCK_R)
    rows = n * s_n + hw * s_hw
    ok = row_ok[:, None] & col_ok[None, :]
    shift = tl.sum(tl.load(x_ptr + rows[:, None] + cols[None, :] * s_c, mask=ok, other=0.0).to(ACC), axis=0)
    shift = shift / n_rows.to(ACC)
    shift = tl.where(tl.abs(shift) < float("inf"), shift, 0.0)  # NaN/Inf: no shift
    acc_1 = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    acc_2 = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    count = tl.zeros([], dtype=ACC)
    t0 = split * tiles_per_split
    for t in range(t0, tl.minimum(t0 + tiles_per_split, n_tiles)):
        n, hw, row_ok, _, n_rows = tile_index(t, N, HW, PER_N, FLAT, BLOCK_R)
        rows = n * s_n + hw * s_hw
        ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] + cols[None, :] * s_c, mask=ok, other=0.0).to(ACC)
        x = tl.where(ok, x - shift[None, :], 0.0)
        acc_1 += x
        acc_2 += x * x
        count += n_rows.to(ACC)
    # The shifted values are of the order of the spread, so sum - sum**2 / n loses little.
    mean = tl.sum(acc_1, axis=0) / tl.maximum(count, 1.0)
    m2 = tl.maximum(tl.sum(acc_2, axis=0) - mean * mean * count, 0.0)
    tl.store(partial_ptr + split * C + cols, mean, mask=col_ok)
    tl.store(partial_ptr + (splits + split) * C + cols, m2, mask=col_ok)
    tl.store(partial_ptr + 2 * splits * C + split * c_blocks + pid_c, count)

    # The last program of this channel block merges the block's partials.
    tl.debug_barrier()  # every thread's stores come before the ticket's release
    ticket = tl.atomic_add(ticket_ptr + pid_c, 1, sem="acq_rel")
    if ticket == splits - 1:
        mean, m2, count = merge_partials(
            partial_ptr, partial_ptr + splits * C, partial_ptr + 2 * splits * C + pid_c,
            splits, C, c_blocks, cols, col_ok, ACC, BLOCK_P, BLOCK_C,
        )
        finish_stats(mean + shift, m2, count, cols, col_ok, stats_ptr, running_mean_ptr, running_var_ptr,
                     C, momentum, eps, LOCAL, ACC)
        tl.atomic_xchg(ticket_ptr + pid_c, 0)


@triton.jit
def batch_norm_combine_kernel(
    gathered_ptr,  # [W, 2C + 1]: each process's [mean | M2 | count]
    stats_ptr,  # [2C + 1] output: mean, rstd, count
    running_mean_ptr, running_var_ptr,  # [C] or None
    W, C, momentum, eps,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    # Rows of the gathered stats are [mean (C) | M2 (C) | count (1)].
    row = 2 * C + 1
    mean, m2, count = merge_partials(
        gathered_ptr, gathered_ptr + C, gathered_ptr + 2 * C, W, row, row, cols, col_ok, ACC, BLOCK_P, BLOCK_C,
    )
    finish_stats(mean, m2, count, cols, col_ok, stats_ptr, running_mean_ptr, running_var_ptr,
                 C, momentum, eps, False, ACC)


@triton.jit
def channel_vector(ptr, rows, cols, C, row_ok, col_ok, C_LAST: tl.constexpr, ACC: tl.constexpr, other: tl.constexpr):
    """A per-channel value for a [rows, cols] tile, broadcastable to it (channels along cols or rows)."""
    if C_LAST:
        v = tl.load(ptr + cols, mask=col_ok, other=other).to(ACC)[None, :]
    else:
        v = tl.load(ptr + rows % C, mask=row_ok, other=other).to(ACC)[:, None]
    return v


# Sizes and counters that no load's alignment depends on: one binary for all their values.
@triton.jit(do_not_specialize=["ROWS", "HW"])
def batch_norm_relu_fwd_kernel(
    x_ptr, r_ptr,  # [N, C, HW] views, any strides (r: None without a residual)
    z_ptr,  # output, dense: [ROWS, COLS] = [N*HW, C] (C_LAST) or [N*C, HW]
    mask_ptr,  # uint8 ReLU mask, ceil(COLS / 8) bytes per row (None: not needed)
    mean_ptr,  # [C] batch mean (stats), or the running mean (FROM_VAR)
    rstd_ptr,  # [C] 1/std (stats + C), or the running variance (FROM_VAR)
    w_ptr, b_ptr,  # [C] affine parameters, or None
    stats_ptr,  # [2C + 1] output in eval mode: the running mean and rstd for backward (None: not needed)
    ROWS, COLS, C, HW, rstd_offset, eps,
    x_sn, x_sc, x_shw,
    r_sn, r_sc, r_shw,
    X_DENSE: tl.constexpr, R_DENSE: tl.constexpr,  # laid out exactly as z
    C_LAST: tl.constexpr, FROM_VAR: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, pid_k, cols, row_ok, col_ok, ok = tile_2d(ROWS, COLS, BLOCK_M, BLOCK_K)
    rstd_ptr += rstd_offset

    # BN as one scale and shift per channel, computed once per tile.
    mean = channel_vector(mean_ptr, rows, cols, C, row_ok, col_ok, C_LAST, ACC, 0.0)
    if FROM_VAR:
        rstd = rsqrt_rn(channel_vector(rstd_ptr, rows, cols, C, row_ok, col_ok, C_LAST, ACC, 1.0) + eps)
    else:
        rstd = channel_vector(rstd_ptr, rows, cols, C, row_ok, col_ok, C_LAST, ACC, 0.0)
    scale = rstd
    if w_ptr is not None:
        scale = scale * channel_vector(w_ptr, rows, cols, C, row_ok, col_ok, C_LAST, ACC, 0.0)

    z_off = rows[:, None] * COLS + cols[None, :]
    if X_DENSE:
        x_off = z_off
    else:
        x_off = tile_offsets(rows, cols, C, HW, x_sn, x_sc, x_shw, C_LAST)
    x = tl.load(x_ptr + x_off, mask=ok, other=0.0).to(ACC)
    if FROM_VAR:
        # Eval: folded to x * scale + shift, as eager folds it.
        shift = -mean * scale
        if b_ptr is not None:
            shift += channel_vector(b_ptr, rows, cols, C, row_ok, col_ok, C_LAST, ACC, 0.0)
        y = x * scale + shift
    else:
        y = (x - mean) * scale
        if b_ptr is not None:
            y += channel_vector(b_ptr, rows, cols, C, row_ok, col_ok, C_LAST, ACC, 0.0)
    if r_ptr is not None:
        if R_DENSE:
            r_off = z_off
        else:
            r_off = tile_offsets(rows, cols, C, HW, r_sn, r_sc, r_shw, C_LAST)
        y += tl.load(r_ptr + r_off, mask=ok, other=0.0).to(ACC)
    # `y < 0` rather than `y > 0` keeps NaN as NaN, as torch.relu does.
    z = tl.where(y < 0, 0.0, y)
    tl.store(z_ptr + z_off, z.to(z_ptr.dtype.element_ty), mask=ok)
    if mask_ptr is not None:
        # Eager's relu backward is where(z <= 0, 0, dz): NaN outputs pass dz on.
        keep = tl.where(ok & ~(y <= 0), 1, 0)
        pack_mask_2d(mask_ptr, keep, rows, pid_k * (BLOCK_K // 8), (COLS + 7) // 8, row_ok, BLOCK_M, BLOCK_K)
    if stats_ptr is not None:
        # Eval: the statistics backward uses, fixed now even if the buffers change later.
        if C_LAST:
            first = tl.program_id(0) == 0
            ch = cols
            ch_ok = col_ok & first
        else:
            first = pid_k == 0
            ch = rows
            ch_ok = (rows < C) & first
        store_eval_stats(mean_ptr, rstd_ptr, stats_ptr, ch, ch_ok, C, eps, ACC)


@triton.jit
def store_eval_stats(running_mean_ptr, running_var_ptr, stats_ptr, ch, ch_ok, C, eps, ACC: tl.constexpr):
    """Eval's statistics for channels ``ch``: stats = [running mean | 1 / sqrt(running var + eps)]."""
    tl.store(stats_ptr + ch, tl.load(running_mean_ptr + ch, mask=ch_ok, other=0.0).to(ACC), mask=ch_ok)
    var = tl.load(running_var_ptr + ch, mask=ch_ok, other=1.0).to(ACC)
    tl.store(stats_ptr + C + ch, rsqrt_rn(var + eps), mask=ch_ok)


@triton.jit
def batch_norm_eval_stats_kernel(
    running_mean_ptr, running_var_ptr,  # [C]
    stats_ptr,  # [2C + 1] output: mean, rstd, count
    C, count, eps,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    store_eval_stats(running_mean_ptr, running_var_ptr, stats_ptr, cols, cols < C, C, eps, ACC)
    if tl.program_id(0) == 0:
        tl.store(stats_ptr + 2 * C, count.to(ACC))


@triton.jit
def batch_norm_finish_kernel(
    mean_ptr, m2_ptr, count_ptr,  # one set of local statistics (batch_norm_stats' local form), views of a cache
    stats_ptr,  # [2C + 1] output: mean, rstd, count
    running_mean_ptr, running_var_ptr,  # [C] or None
    C, momentum, eps,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    m2 = tl.load(m2_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    count = tl.load(count_ptr).to(ACC)
    finish_stats(mean, m2, count, cols, col_ok, stats_ptr, running_mean_ptr, running_var_ptr,
                 C, momentum, eps, False, ACC)


stats_kernel = Kernel(batch_norm_stats_kernel)
finish_kernel = Kernel(batch_norm_finish_kernel)
eval_stats_kernel = Kernel(batch_norm_eval_stats_kernel)
combine_kernel = Kernel(batch_norm_combine_kernel)
apply_kernel = Kernel(batch_norm_relu_fwd_kernel)


def per_n_tiles(shape: tuple[int, int, int], strides: tuple[int, int, int]) -> bool:
    """Reduce NCHW-like views along hw inside each sample; others over n * hw."""
    return shape[2] > 1 and strides[2] <= strides[1]


_stats_settings: dict = {}


def stats_plan(shape: tuple[int, int, int], strides: tuple[int, int, int], device: torch.device,
               dtype: torch.dtype) -> tuple:
    """Launch settings of a per-channel reduction over an [N, C, HW] view, cached per shape, strides and dtype."""
    key = (shape, strides, device, dtype)
    plan = _stats_settings.get(key)
    if plan is None:
        n, c, hw = shape
        per_n = per_n_tiles(shape, strides)
        block_r, block_c, splits, per_split, num_warps = reduction_settings(n, c, hw, per_n, device, dtype)
        n_tiles = n * cdiv(hw, block_r) if per_n else cdiv(n * hw, block_r)
        c_blocks = cdiv(c, block_c)
        plan = _stats_settings[key] = (
            per_n, block_r, block_c, splits, per_split, n_tiles, c_blocks, num_warps, partial_block(splits, block_c),
        )
    return plan


def batch_norm_stats(
    x: torch.Tensor, shape: tuple[int, int, int], x_strides: tuple[int, int, int], stats: torch.Tensor,
    running_mean: torch.Tensor | None, running_var: torch.Tensor | None, momentum: float, eps: float,
    local: bool = False,
) -> None:
    """``stats = [mean | rstd | count]`` of x, an [N, C, HW] view (with elements); running stats updated.

    ``local``: ``[mean | M2 | count]`` instead, without the running update
    (one process's share of synchronized statistics).
    """
    n, c, hw = shape
    per_n, block_r, block_c, splits, per_split, n_tiles, c_blocks, num_warps, block_p = stats_plan(
        shape, x_strides, x.device, x.dtype)
    acc = stats.dtype
    s = stream(x.device)
    partial = scratch(x.device, splits * (2 * c + c_blocks), acc)
    tickets = counters(x.device, s, c_blocks)
    stats_kernel(
        (c_blocks, splits, 1), s, num_warps,
        x, partial, tickets, stats, running_mean, running_var,
        n, c, hw, *x_strides, per_split, n_tiles, splits, float(momentum), float(eps),
        per_n, x_strides[0] == hw * x_strides[2], local, tl_dtype(acc), block_r, block_c, block_p,
    )


def batch_norm_combine(
    gathered: torch.Tensor, stats: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
    momentum: float, eps: float,
) -> None:
    """``stats = [mean | rstd | count]`` over the processes' contiguous ``[W, 2C + 1]`` local statistics."""
    w, row = gathered.shape
    c = (row - 1) // 2
    block_c = min(next_power_of_2(c), 128)
    combine_kernel(
        (cdiv(c, block_c), 1, 1), stream(gathered.device), 4,
        gathered, stats, running_mean, running_var, w, c, float(momentum), float(eps),
        tl_dtype(gathered.dtype), partial_block(w, block_c), block_c,
    )


def batch_norm_eval_stats(
    running_mean: torch.Tensor, running_var: torch.Tensor, stats: torch.Tensor, count: int, eps: float,
) -> None:
    """``stats = [mean | rstd | count]`` of eval: the running statistics, fixed now for backward."""
    c = running_mean.shape[0]
    block_c = 256  # one binary for every channel count
    eval_stats_kernel(
        (cdiv(c, block_c), 1, 1), stream(stats.device), 4,
        running_mean, running_var, stats, c, count, float(eps), tl_dtype(stats.dtype), block_c,
    )


def batch_norm_finish(
    mean: torch.Tensor, m2: torch.Tensor, count: torch.Tensor, stats: torch.Tensor,
    running_mean: torch.Tensor | None, running_var: torch.Tensor | None, momentum: float, eps: float,
) -> None:
    """``stats = [mean | rstd | count]`` from local statistics (``mean``, ``m2`` [C], ``count`` [1]); running stats updated.

    A dense block's layers normalise the same feature channels: their
    statistics are reduced once and finished here for each layer's own eps
    and running buffers.
    """
    c = mean.shape[0]
    block_c = 256  # one binary for every channel count
    finish_kernel(
        (cdiv(c, block_c), 1, 1), stream(mean.device), 4,
        mean, m2, count, stats, running_mean, running_var, c, float(momentum), float(eps),
        tl_dtype(mean.dtype), block_c,
    )


def mask_bytes(shape: tuple[int, int, int], c_last: bool) -> int:
    """Bytes of the ReLU mask of an [N, C, HW] output: whole bytes per row of its [ROWS, COLS] layout."""
    n, c, hw = shape
    return n * hw * row_bytes(c) if c_last else n * c * row_bytes(hw)


def mask_strides(shape: tuple[int, int, int], c_last: bool) -> tuple[int, int, int]:
    """[N, C, HW] strides, in bits, of the mask (what locates element (n, c, hw)'s bit)."""
    n, c, hw = shape
    if c_last:
        cols8 = 8 * row_bytes(c)
        return hw * cols8, 1, cols8
    cols8 = 8 * row_bytes(hw)
    return c * cols8, cols8, 1


def batch_norm_relu_apply(
    x: torch.Tensor, x_strides: tuple, z: torch.Tensor, z_strides: tuple, shape: tuple[int, int, int],
    mask: torch.Tensor | None, mean: torch.Tensor, rstd_or_var: torch.Tensor, rstd_offset: int,
    weight: torch.Tensor | None, bias: torch.Tensor | None, residual: torch.Tensor | None, r_strides: tuple | None,
    eps: float, from_var: bool, c_last: bool, stats_out: torch.Tensor | None = None,
) -> None:
    """``z = relu(bn(x) [+ residual])`` over [N, C, HW] views (``*_strides``), ``z`` dense in its order.

    Training: ``mean`` and ``rstd_or_var`` are the stats tensor, rstd at
    ``rstd_offset`` (C). ``from_var`` (eval): they are the running mean and
    variance (offset 0), and ``stats_out`` receives ``[mean | rstd]`` for backward.
    ``mask`` has ``mask_bytes(shape, c_last)`` bytes.
    """
    n, c, hw = shape
    rows, cols = (n * hw, c) if c_last else (n * c, hw)
    block_m, block_k, num_warps = tile_settings(rows, cols, z.device)
    r = residual
    apply_kernel(
        (cdiv(rows, block_m), cdiv(cols, block_k), 1), stream(x.device), num_warps,
        x, r, z, mask, mean, rstd_or_var, weight, bias, stats_out,
        rows, cols, c, hw, rstd_offset, float(eps), *x_strides, *(x_strides if r is None else r_strides),
        x_strides == z_strides, r is not None and r_strides == z_strides,
        c_last, from_var, tl_dtype(acc_dtype(x.dtype)), block_m, block_k,
    )
