"""Fused BN-ReLU-Conv: an implicit-GEMM convolution whose input is ``relu(bn(x))``, forward and backward.

``a = relu(bn(x))`` never exists in memory. Three kernels, each an implicit
GEMM accumulating in fp32 with ``tl.dot`` (bf16/fp16 operands as the
weight's dtype; fp32 as TF32 or exactly, as the caller says; fp64 exactly):

- ``forward``: ``y = conv(a, weight) [+ bias]``. Rows are output positions
  (n, oh, ow), columns output channels, K runs over blocks of input channels
  (contiguous in channels_last) and, inside each, the taps: a block's BN
  parameters are loaded once for all its taps. The prologue applies BN and
  ReLU to each x tile in the registers of the MMA operand (``load_operand``),
  zeroing padded positions (``relu(bn(0))`` is not 0) and tail lanes.
- ``dgrad``: ``da = conv_transpose(dy, weight)``, decomposed by output phase
  (sub-pixel): the ``stride**2`` phases of input positions are each a dense
  problem over only the taps that reach them, so a stride-2 convolution does no
  masked-out work. The epilogue recomputes the ReLU decision from x and the
  saved statistics (the prologue's formula, bit for bit), writes
  ``g = da * [a > 0]`` and the BN backward's per-channel sums, ``sum(g)`` and
  ``sum(g * (x - mean))``, finished by the last programs of each channel block.
  In eval mode without parameter gradients it writes dx itself.
- ``wgrad``: ``dweight[:, :, kh, kw]^T = a_shifted^T @ dy`` per tap, with
  ``a`` recomputed in the prologue of the A operand; K (the output positions)
  is split over programs when the tiles alone would not fill the GPU, and the
  partial tiles are added in two parallel rounds (groups of splits, then the groups).

BN is ``x * scale + shift`` per channel (``channel_affine``), in training as
in eval. ``stats`` is ``[mean (C) | rstd (C) | count]`` as the batch-norm kernels
write it. Tensors are 4-D with any strides: an input that is a channel slice
of a larger buffer is read in place and the output can be a channel slice.
"""

import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .batch_norm_backward import store_sums, sum_partial_rows
from .launch import Kernel, cdiv, compiled, counters, next_power_of_2, ones, scratch, sm_count, stream
from .tuning import choose
from .utils import divide, divisor, tl_dtype


@triton.jit
def channel_affine(stats_ptr, w_ptr, b_ptr, ch, ok, C, ACC: tl.constexpr):
    """(mean, scale, shift) of channels ``ch``: BN is ``x * scale + shift`` (``scale = weight * rstd``,
    ``shift = bias - mean * scale``), in training as in eval, from the batch's or the running statistics.

    One formula folded per channel block: one multiply-add per element of an MMA operand's
    prologue (its error stays within eager's own at means of 100 standard deviations). Masked
    channels get 0 for all three, so ``bn(0) = 0`` there.
    """
    mean = tl.load(stats_ptr + ch, mask=ok, other=0.0).to(ACC)
    scale = tl.load(stats_ptr + C + ch, mask=ok, other=0.0).to(ACC)
    if w_ptr is not None:
        scale = scale * tl.load(w_ptr + ch, mask=ok, other=0.0).to(ACC)
    shift = -mean * scale
    if b_ptr is not None:
        shift += tl.load(b_ptr + ch, mask=ok, other=0.0).to(ACC)
    return mean, scale, shift


@triton.jit
def along(v, AXIS: tl.constexpr):
    """A per-channel vector broadcast along a 2-D tile whose channels run along ``AXIS``."""
    if AXIS == 1:
        return v[None, :]
    else:
        return v[:, None]


@triton.jit
def pre_activation(x, scale, shift, AXIS: tl.constexpr = 1):
    """BN of an fp32 tile ``x`` (channels along dim ``AXIS``): the value whose sign the ReLU decides."""
    return x * along(scale, AXIS) + along(shift, AXIS)


@triton.jit
def load_activation(x_ptr, offs, ok, scale, shift, ACC: tl.constexpr):
    """``relu(bn(x))`` of a [positions, channels] tile, zero where ``ok`` is False (padding, tails)."""
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(ACC)
    y = pre_activation(x, scale, shift)
    # `y < 0` keeps NaN as NaN, as torch.relu does; masked lanes are zero after the prologue.
    return tl.where(ok & ~(y < 0), y, 0.0)


@triton.jit
def load_operand(x_ptr, offs, row_ok, ch_ok, keep_ptr, scale, shift, ACC: tl.constexpr,
                 ROWS: tl.constexpr, AXIS: tl.constexpr):
    """``load_activation`` of a dot's A operand (channels along ``AXIS``), in a form Triton applies in its registers.

    Triton moves the conversion to the MMA operand layout above elementwise ops
    (x then takes one shared-memory round trip: cp.async in, ldmatrix out)
    only when every leaf of them is a load or a constant; a mask computed from
    indices keeps the BN-ReLU in a blocked layout and adds a second round trip.
    So tail channels are zeroed by their BN parameters (masked to 0: bn(0) = 0
    there) and padded rows by a keep factor, a masked load of ones
    (``launch.ones``). Values are ``load_activation``'s, bit for bit. (fp64 dots,
    which run without tensor cores, keep the mask: the keep factor there only
    adds registers.)
    """
    ok = along(ch_ok, AXIS) & along(row_ok, 1 - AXIS)
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(ACC)
    y = pre_activation(x, scale, shift, AXIS)
    if ACC == tl.float64:  # no tensor cores, no operand registers to gain: the mask, as load_activation
        return tl.where(ok & ~(y < 0), y, 0.0)
    else:
        keep = tl.load(keep_ptr + tl.arange(0, ROWS), mask=row_ok, other=0.0)
        return tl.where((along(keep, 1 - AXIS) != 0) & ~(y < 0), y, 0.0)


# Sizes and counters that no load's alignment depends on: one binary for all their values.
@triton.jit(do_not_specialize=["N", "H", "W", "OH", "OW"])
def bn_relu_conv_fwd_kernel(
    x_ptr, stats_ptr, bnw_ptr, bnb_ptr,  # x [N, C, H, W] any strides; stats [2C + 1]; BN weight/bias [C] or None
    w_ptr, bias_ptr,  # conv weight [CO, C, KH, KW] any strides, its dtype the dot's; conv bias [CO] or None
    keep_ptr,  # fp32 ones, at least BLOCK_M (launch.ones)
    y_ptr,  # [N, CO, OH, OW] any strides
    N, C, H, W, CO, OH, OW,
    xs_n, xs_c, xs_h, xs_w,
    ws_o, ws_c, ws_h, ws_w,
    ys_n, ys_c, ys_h, ys_w,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N * OH * OW
    ow = rows % OW
    oh = (rows // OW) % OH
    n = (rows // (OW * OH)).to(tl.int64)
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < CO
    kc = tl.arange(0, BLOCK_K)
    c_blocks = tl.cdiv(C, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    if KH * KW == 1:
        # A GEMM: no tap arithmetic, so the tiles' alignment stays provable (vector loads, cp.async).
        ih = oh * SH - PH
        iw = ow * SW - PW
        pos_ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_row = n * xs_n + ih * xs_h + iw * xs_w
        for kb in range(0, c_blocks):
            ch = kb * BLOCK_K + kc
            ch_ok = ch < C
            _, scale, shift = channel_affine(stats_ptr, bnw_ptr, bnb_ptr, ch, ch_ok, C, ACC)
            a = load_operand(x_ptr, x_row[:, None] + ch[None, :] * xs_c, pos_ok, ch_ok, keep_ptr,
                             scale, shift, ACC, BLOCK_M, 1)
            wt = tl.load(w_ptr + ch[:, None] * ws_c + co[None, :] * ws_o, mask=ch_ok[:, None] & co_ok[None, :],
                         other=0.0)
            acc = tl.dot(a.to(wt.dtype), wt, acc, input_precision=PRECISION, out_dtype=ACC)
    else:
        # Channel blocks outside, taps inside: a block's BN parameters are loaded once, into the
        # registers of the dot operand's layout, for all its KH * KW taps (Triton pipelines the
        # inner loop; other CTAs on the SM cover its refill at each channel block).
        for cb in range(0, c_blocks):
            ch = cb * BLOCK_K + kc
            ch_ok = ch < C
            _, scale, shift = channel_affine(stats_ptr, bnw_ptr, bnb_ptr, ch, ch_ok, C, ACC)
            for tap in range(0, KH * KW):
                kh = tap // KW
                kw = tap % KW
                ih = oh * SH - PH + kh
                iw = ow * SW - PW + kw
                pos_ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                offs = (n * xs_n + ih * xs_h + iw * xs_w)[:, None] + ch[None, :] * xs_c
                a = load_operand(x_ptr, offs, pos_ok, ch_ok, keep_ptr, scale, shift, ACC, BLOCK_M, 1)
                wt = tl.load(w_ptr + ch[:, None] * ws_c + co[None, :] * ws_o + kh * ws_h + kw * ws_w,
                             mask=ch_ok[:, None] & co_ok[None, :], other=0.0)
                acc = tl.dot(a.to(wt.dtype), wt, acc, input_precision=PRECISION, out_dtype=ACC)
    if bias_ptr is not None:
        acc += tl.load(bias_ptr + co, mask=co_ok, other=0.0).to(acc.dtype)[None, :]
    y_offs = (n * ys_n + oh * ys_h + ow * ys_w)[:, None] + co[None, :] * ys_c
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & co_ok[None, :])


# Sizes and counters that no load's alignment depends on: one binary for all their values.
@triton.jit(do_not_specialize=["N", "H", "W", "OH", "OW", "HP", "WP", "GROUP_ROWS"])
def bn_relu_conv_dgrad_kernel(
    dy_ptr,  # [N, CO, OH, OW] any strides
    w_ptr,  # conv weight [CO, C, KH, KW], the dot's dtype
    da_ptr,  # [N, C, H, W] da computed elsewhere (torch's convolution), any strides; None: computed here
    x_ptr, stats_ptr, bnw_ptr, bnb_ptr,  # as in forward
    g_ptr,  # [N, C, H, W] output: g = da * [a > 0] (or dx, DX_DIRECT), any strides
    partial_ptr,  # scratch [2, P, C] per-program sum(g), sum(g * (x - mean)), then [2, groups, C] (None: no sums)
    ticket_ptr,  # int32 [c_blocks, groups + 1], zero on entry and on exit
    sums_ptr,  # [2C] output: sum(g), sum(g * (x - mean))
    dbnw_ptr, dbnb_ptr,  # [C] BN weight/bias gradients, or None
    N, C, H, W, CO, OH, OW, HP, WP,  # HP, WP: input rows and columns per phase, cdiv(H, SH), cdiv(W, SW)
    dys_n, dys_c, dys_h, dys_w,
    ws_o, ws_c, ws_h, ws_w,
    xs_n, xs_c, xs_h, xs_w,
    gs_n, gs_c, gs_h, gs_w,
    das_n, das_c, das_h, das_w,
    GROUP_ROWS,  # partial rows per group of the sums' first round
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DX_DIRECT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    phase = tl.program_id(2)
    ph = phase // SW
    pw = phase % SW
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    j = rows % WP
    i = (rows // WP) % HP
    n = (rows // (WP * HP)).to(tl.int64)
    ih = i * SH + ph
    iw = j * SW + pw
    row_ok = (rows < N * HP * WP) & (ih < H) & (iw < W)
    ch = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ch_ok = ch < C
    kc = tl.arange(0, BLOCK_K)
    # The taps that reach this phase: kh = kh0 (mod SH), then oh = (ih + PH - kh) / SH exactly.
    kh0 = (ph + PH) % SH
    kw0 = (pw + PW) % SW
    n_kh = tl.cdiv(KH - kh0, SH)
    n_kw = tl.cdiv(KW - kw0, SW)
    co_blocks = tl.cdiv(CO, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    if da_ptr is not None:  # the epilogue alone, on a given da (stride 1: one phase, ih = i, iw = j)
        da_offs = (n * das_n + ih * das_h + iw * das_w)[:, None] + ch[None, :] * das_c
        acc = tl.load(da_ptr + da_offs, mask=row_ok[:, None] & ch_ok[None, :], other=0.0).to(ACC)
    elif KH * KW == 1:  # one tap, kh = kw = 0: no tap arithmetic in the loop (alignment stays provable)
        oh = (ih + PH) // SH
        ow = (iw + PW) // SW
        pos_ok = row_ok & (oh < OH) & (ow < OW)
        dy_row = n * dys_n + oh * dys_h + ow * dys_w
        for kb in range(0, co_blocks * n_kh * n_kw):  # no steps in a phase that no tap reaches
            co = kb * BLOCK_K + kc
            co_ok = co < CO
            dy = tl.load(dy_ptr + dy_row[:, None] + co[None, :] * dys_c, mask=pos_ok[:, None] & co_ok[None, :],
                         other=0.0)
            wt = tl.load(w_ptr + co[:, None] * ws_o + ch[None, :] * ws_c, mask=co_ok[:, None] & ch_ok[None, :],
                         other=0.0)
            acc = tl.dot(dy.to(wt.dtype), wt, acc, input_precision=PRECISION, out_dtype=ACC)
    else:
        for kk in range(0, n_kh * n_kw * co_blocks):
            tap = kk // co_blocks
            kh = kh0 + (tap // n_kw) * SH
            kw = kw0 + (tap % n_kw) * SW
            co = (kk % co_blocks) * BLOCK_K + kc
            co_ok = co < CO
            oh = (ih + PH - kh) // SH
            ow = (iw + PW - kw) // SW
            pos_ok = row_ok & (ih + PH - kh >= 0) & (oh < OH) & (iw + PW - kw >= 0) & (ow < OW)
            dy = tl.load(dy_ptr + (n * dys_n + oh * dys_h + ow * dys_w)[:, None] + co[None, :] * dys_c,
                         mask=pos_ok[:, None] & co_ok[None, :], other=0.0)
            wt = tl.load(w_ptr + co[:, None] * ws_o + ch[None, :] * ws_c + kh * ws_h + kw * ws_w,
                         mask=co_ok[:, None] & ch_ok[None, :], other=0.0)
            acc = tl.dot(dy.to(wt.dtype), wt, acc, input_precision=PRECISION, out_dtype=ACC)

    # Epilogue: the ReLU decision of forward, recomputed; g, and the BN backward's sums.
    ok = row_ok[:, None] & ch_ok[None, :]
    mean, scale, shift = channel_affine(stats_ptr, bnw_ptr, bnb_ptr, ch, ch_ok, C, ACC)
    x = tl.load(x_ptr + (n * xs_n + ih * xs_h + iw * xs_w)[:, None] + ch[None, :] * xs_c, mask=ok, other=0.0).to(ACC)
    y = pre_activation(x, scale, shift)
    # Eager's relu backward is where(a <= 0, 0, da): NaN activations pass da on. A select, not a product.
    g = tl.where(ok & ~(y <= 0), acc.to(ACC), 0.0)
    g_offs = (n * gs_n + ih * gs_h + iw * gs_w)[:, None] + ch[None, :] * gs_c
    if DX_DIRECT:  # eval: the statistics are constants, dx = weight * rstd * g
        tl.store(g_ptr + g_offs, (g * scale[None, :]).to(g_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(g_ptr + g_offs, g.to(g_ptr.dtype.element_ty), mask=ok)
    if partial_ptr is not None:
        # The BN sums in two parallel rounds, each in a fixed order (deterministic): the last program of
        # each group of GROUP_ROWS partial rows adds its group, the last group adds the group sums.
        P = tl.num_programs(0) * tl.num_programs(2)
        p = phase * tl.num_programs(0) + pid_m
        tl.store(partial_ptr + p * C + ch, tl.sum(g, axis=0), mask=ch_ok)
        tl.store(partial_ptr + (P + p) * C + ch, tl.sum(g * tl.where(ok, x - mean[None, :], 0.0), axis=0), mask=ch_ok)
        groups = tl.cdiv(P, GROUP_ROWS)
        group = p // GROUP_ROWS
        r0 = group * GROUP_ROWS
        r1 = tl.minimum(r0 + GROUP_ROWS, P)
        tickets = ticket_ptr + pid_n * (groups + 1)
        tl.debug_barrier()  # every thread's stores come before the ticket's release
        ticket = tl.atomic_add(tickets + group, 1, sem="acq_rel")
        if ticket == r1 - r0 - 1:
            group_g, group_gx = sum_partial_rows(partial_ptr, P, r0, r1, C, ch, ch_ok, ACC, BLOCK_P, BLOCK_N)
            sums2_ptr = partial_ptr + 2 * P * C  # [2, groups, C]
            tl.store(sums2_ptr + group * C + ch, group_g, mask=ch_ok)
            tl.store(sums2_ptr + (groups + group) * C + ch, group_gx, mask=ch_ok)
            tl.atomic_xchg(tickets + group, 0)
            tl.debug_barrier()
            last = tl.atomic_add(tickets + groups, 1, sem="acq_rel")
            if last == groups - 1:
                total_g, total_gx = sum_partial_rows(sums2_ptr, groups, 0, groups, C, ch, ch_ok, ACC, BLOCK_P, BLOCK_N)
                store_sums(total_g, total_gx, C, ch, ch_ok, stats_ptr, sums_ptr, dbnw_ptr, dbnb_ptr, ACC)
                tl.atomic_xchg(tickets + groups, 0)


# Sizes and counters that no load's alignment depends on: one binary for all their values.
@triton.jit(do_not_specialize=["N", "H", "W", "OH", "OW", "blocks_per_split", "splits", "GROUP", "ow_m", "ow_s",
                                "oh_m", "oh_s"])
def bn_relu_conv_wgrad_kernel(
    dy_ptr,  # [N, CO, OH, OW] any strides
    x_ptr, stats_ptr, bnw_ptr, bnb_ptr,  # as in forward
    keep_ptr,  # fp32 ones, at least BLOCK_K (launch.ones)
    dw_ptr,  # [CO, C, KH, KW] output, any strides
    partial_ptr,  # scratch [splits + groups, tiles, BLOCK_N, BLOCK_M] in ACC (None when not SPLIT)
    ticket_ptr,  # int32 [tiles, groups + 1], zero on entry and on exit
    N, C, H, W, CO, OH, OW, blocks_per_split,
    splits,  # programs along K per tile: a run-time value, so every split count shares one binary
    GROUP,  # splits per group of the partial tiles' first round
    ow_m, ow_s, oh_m, oh_s,  # utils.divisor(OW), utils.divisor(OH): a position's (n, oh, ow) by multiplies
    dys_n, dys_c, dys_h, dys_w,
    xs_n, xs_c, xs_h, xs_w,
    dws_o, dws_c, dws_h, dws_w,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    SPLIT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Computed transposed, dweight^T [C, CO] = a^T @ dy: the recomputed activation is the A operand,
    # which wgmma takes from registers (its BN-ReLU applied there, one shared-memory round trip),
    # and the input channels (128 in a DenseNet 3x3, where CO is 32) fill wgmma's 64-row M.
    tile = tl.program_id(0)  # (co block, c block, tap)
    split = tl.program_id(1)
    c_blocks = tl.cdiv(C, BLOCK_N)
    tap = tile % (KH * KW)
    pid_c = (tile // (KH * KW)) % c_blocks
    pid_o = tile // (KH * KW * c_blocks)
    kh = tap // KW
    kw = tap % KW
    co = pid_o * BLOCK_M + tl.arange(0, BLOCK_M)
    co_ok = co < CO
    ch = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    ch_ok = ch < C
    _, scale, shift = channel_affine(stats_ptr, bnw_ptr, bnb_ptr, ch, ch_ok, C, ACC)
    M = N * OH * OW
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC)
    k0 = split * blocks_per_split
    for kb in range(k0, tl.minimum(k0 + blocks_per_split, tl.cdiv(M, BLOCK_K))):
        pos = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        pos_ok = pos < M
        if ACC == tl.float64:  # the exact path, no tensor cores: the compiler's division (fewer registers)
            row = pos // OW
            n = row // OH
        else:  # a new (n, oh, ow) each K step: by high multiplies, not ~10 instructions a division
            row = divide(pos, OW, ow_m, ow_s)
            n = divide(row, OH, oh_m, oh_s)
        ow = pos - row * OW
        oh = row - n * OH
        n = n.to(tl.int64)
        dy = tl.load(dy_ptr + (n * dys_n + oh * dys_h + ow * dys_w)[:, None] + co[None, :] * dys_c,
                     mask=pos_ok[:, None] & co_ok[None, :], other=0.0)
        ih = oh * SH - PH + kh
        iw = ow * SW - PW + kw
        in_ok = pos_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        offs = ch[:, None] * xs_c + (n * xs_n + ih * xs_h + iw * xs_w)[None, :]
        a_t = load_operand(x_ptr, offs, in_ok, ch_ok, keep_ptr, scale, shift, ACC, BLOCK_K, 0)
        acc = tl.dot(a_t.to(dy.dtype), dy, acc, input_precision=PRECISION, out_dtype=ACC)
    ok = ch_ok[:, None] & co_ok[None, :]
    dw_offs = ch[:, None] * dws_c + co[None, :] * dws_o + kh * dws_h + kw * dws_w
    if not SPLIT:
        tl.store(dw_ptr + dw_offs, acc.to(dw_ptr.dtype.element_ty), mask=ok)
    else:
        # The partial tiles added in two rounds, each in a fixed order (deterministic) and neither a serial
        # tail: the last program of each group of GROUP splits adds its group, the last group the group sums.
        tiles = tl.num_programs(0)
        size = BLOCK_M * BLOCK_N
        local = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        tl.store(partial_ptr + (split * tiles + tile) * size + local, acc)
        groups = tl.cdiv(splits, GROUP)
        group = split // GROUP
        s0 = group * GROUP
        s1 = tl.minimum(s0 + GROUP, splits)
        tickets = ticket_ptr + tile * (groups + 1)
        tl.debug_barrier()  # every thread's stores come before the ticket's release
        ticket = tl.atomic_add(tickets + group, 1, sem="acq_rel")
        if ticket == s1 - s0 - 1:
            total = tl.zeros([BLOCK_N, BLOCK_M], dtype=acc.dtype)
            for s in range(s0, s1):
                total += tl.load(partial_ptr + (s * tiles + tile) * size + local, cache_modifier=".cg")
            sums_ptr = partial_ptr + splits * tiles * size  # [groups, tiles, BLOCK_N, BLOCK_M]
            tl.store(sums_ptr + (group * tiles + tile) * size + local, total)
            tl.atomic_xchg(tickets + group, 0)
            tl.debug_barrier()
            last = tl.atomic_add(tickets + groups, 1, sem="acq_rel")
            if last == groups - 1:
                total = tl.zeros([BLOCK_N, BLOCK_M], dtype=acc.dtype)
                for g in range(0, groups):
                    total += tl.load(sums_ptr + (g * tiles + tile) * size + local, cache_modifier=".cg")
                tl.store(dw_ptr + dw_offs, total.to(dw_ptr.dtype.element_ty), mask=ok)
                tl.atomic_xchg(tickets + groups, 0)


# Sizes and counters that no load's alignment depends on: one binary for all their values.
@triton.jit(do_not_specialize=["N", "H", "W"])
def bn_relu_kernel(
    x_ptr, stats_ptr, bnw_ptr, bnb_ptr,  # as in forward
    a_ptr,  # [N, C, H, W] output relu(bn(x)) in the convolution's dtype, any strides
    N, C, H, W,
    xs_n, xs_c, xs_h, xs_w,
    as_n, as_c, as_h, as_w,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The unfused candidate's activation: the fused prologue's own formula (so that any dgrad's
    recomputed ReLU decision matches it bit for bit), written out for torch's convolution."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N * H * W
    iw = rows % W
    ih = (rows // W) % H
    n = (rows // (W * H)).to(tl.int64)
    ch = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ch_ok = ch < C
    ok = row_ok[:, None] & ch_ok[None, :]
    _, scale, shift = channel_affine(stats_ptr, bnw_ptr, bnb_ptr, ch, ch_ok, C, ACC)
    a = load_activation(x_ptr, (n * xs_n + ih * xs_h + iw * xs_w)[:, None] + ch[None, :] * xs_c, ok,
                        scale, shift, ACC)
    tl.store(a_ptr + (n * as_n + ih * as_h + iw * as_w)[:, None] + ch[None, :] * as_c,
             a.to(a_ptr.dtype.element_ty), mask=ok)


forward_kernel = Kernel(bn_relu_conv_fwd_kernel)
bn_relu_kernel = Kernel(bn_relu_kernel)
dgrad_kernel = Kernel(bn_relu_conv_dgrad_kernel)
wgrad_kernel = Kernel(bn_relu_conv_wgrad_kernel)


# --- launch settings --------------------------------------------------------
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). tl.dot needs every block >= 16.
# The first config of each list is the fixed choice (no tuning, deterministic runs, graph
# capture) and the reference every other candidate's output is checked against before it may
# be timed: 4 warps where the K loop runs over taps, where Triton has been reported to
# miscompile with 8 (../shared/CONV.md); 8-warp configs are candidates behind that check.
# Every config compiles for sm_90 without spills (tests/test_kernels_compile_sm90.py).

INTERPRETER_CONFIG = (32, 32, 16, 1, 1)
# Channel-contiguous operands (channels_last) on tensor cores (bf16/fp16, TF32): wgmma N up to 256
# where the output channels allow (a block larger than the problem is shrunk, duplicates dropped).
GEMM_CONFIGS = ((128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 64, 64, 4, 4))
# dgrad keeps an fp32 tile of x beside the accumulator in its epilogue: at most 64 x 128 per 4 warps
# (128 x 128 with 8 warps needs a stack frame).
GEMM_DGRAD_CONFIGS = ((128, 64, 64, 8, 3), (64, 64, 64, 4, 4))
TAP_CONFIGS = ((64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (64, 128, 64, 8, 3))
TAP_DGRAD_CONFIGS = ((64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (64, 128, 64, 8, 3))
# (No 32-row tiles: wgmma needs 64 rows per warpgroup, and a 32-row tile falls back to mma.sync.)
WGRAD_CONFIGS = ((64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (128, 128, 64, 8, 3))
# Strided channels (NCHW: one address per element) or exact fp32/fp64 dots (no tensor cores):
# smaller tiles, fewer stages.
NARROW_CONFIGS = ((64, 32, 32, 4, 2), (32, 32, 32, 4, 2))


def configs(kind: str, taps: int, device: torch.device, wide: bool = True) -> tuple:
    """The configs a launch of ``kind`` ("forward", "dgrad", "wgrad") may take; one under the interpreter.

    ``wide``: channels are contiguous and the dot runs on tensor cores.
    """
    if not compiled(device):
        return (INTERPRETER_CONFIG,)
    if not wide:
        return NARROW_CONFIGS
    if kind == "wgrad":
        return WGRAD_CONFIGS
    if kind == "dgrad":
        return TAP_DGRAD_CONFIGS if taps > 1 else GEMM_DGRAD_CONFIGS
    return TAP_CONFIGS if taps > 1 else GEMM_CONFIGS


def wide(x: torch.Tensor, dot_dtype: torch.dtype, allow_tf32: bool) -> bool:
    """Whether the wide configs fit: x's channels contiguous, and a tensor-core dot."""
    return x.stride(1) == 1 and (dot_dtype in (torch.float16, torch.bfloat16) or
                                 (dot_dtype == torch.float32 and allow_tf32))


def _interpreter_blocks(rows: int, cols: int, k: int) -> tuple:
    """The interpreter runs programs one after another, each tile op a numpy call: on large problems
    (a ResNet's 512 channels) fewer, larger tiles; small ones keep small tiles, so tests cover tails."""
    return (32 if rows <= 128 else 64, 32 if cols <= 64 else 128, 16 if k <= 64 else 64, 1, 1)


def _fit(config: tuple, rows: int, cols: int, k: int, dtype: torch.dtype) -> tuple:
    """A config shrunk to the problem (blocks no larger than needed, >= 16) and to fp32/fp64 operands."""
    interpreted = config == INTERPRETER_CONFIG
    if interpreted:
        config = _interpreter_blocks(rows, cols, k)
    bm, bn, bk, warps, stages = config
    bm = max(16, min(bm, next_power_of_2(rows)))
    bn = max(16, min(bn, next_power_of_2(cols)))
    bk = max(16, min(bk, next_power_of_2(k)))
    if dtype.itemsize >= 4 and not (interpreted and k > 64):  # twice the bytes per operand: half the K block, as much shared memory
        bk = max(16, bk // (dtype.itemsize // 2))
    return bm, bn, bk, warps, stages


UNFUSED = ("unfused",)  # fastres's BN-ReLU kernel, then torch's convolution (cuDNN on a GPU)


def conv_path() -> str:
    """``FASTRES_CONV_PATH``: ``auto`` (default: the tuner may take either), ``fused`` or ``unfused`` (forced)."""
    path = os.environ.get("FASTRES_CONV_PATH", "auto")
    if path not in ("auto", "fused", "unfused"):
        raise ValueError(f"FASTRES_CONV_PATH must be auto, fused or unfused, not {path!r}")
    return path


def _offers_unfused(device: torch.device) -> bool:
    """Whether the tuner times the unfused candidate too: on a GPU (it would never win an interpreted race)."""
    return compiled(device)


def candidates(kind: str, taps: int, device: torch.device, wide_: bool, rows: int, cols: int, k: int,
               dtype: torch.dtype) -> tuple:
    """The distinct configs, fitted to the problem, that a launch may take (the fixed one first).

    Compiled, the unfused composition is always a candidate too, so that the
    tuner can never pick something slower than BN-ReLU followed by torch's
    convolution; ``FASTRES_CONV_PATH`` forces one path.
    """
    path = conv_path()
    if path == "unfused":
        return (UNFUSED,)
    fitted = []
    for config in configs(kind, taps, device, wide_):
        config = _fit(config, rows, cols, k, dtype)
        if config not in fitted:
            fitted.append(config)
    if path == "auto" and _offers_unfused(device):
        fitted.append(UNFUSED)
    return tuple(fitted)


def _bucket(kind: str, x: torch.Tensor, dot_dtype: torch.dtype, fit: tuple[int, int, int], positions: int,
            taps: int, stride, padding, wide_: bool, prec: str, *flags) -> tuple:
    """The tuning bucket of a launch: what decides which candidate is fastest, sizes in classes.

    ``fit`` is ``_fit``'s (rows, cols, k): each as the block it fits (blocks are clamped to
    next_power_of_2, at most 256), so every problem in a bucket has the same fitted candidates.
    The output-position dimension (``fit[positions]``) also by its size on a scale of powers
    of 4 up to 65536: it sets the number of tiles and waves. The channel dimensions only
    lengthen the K loop or add tiles past 256, which leaves the best tile where it is.
    """
    blocks = tuple(min(next_power_of_2(d), 256) for d in fit)
    waves = min(1 << (2 * math.ceil(math.log(max(fit[positions], 1), 4))), 1 << 16)
    return (kind, str(x.dtype), str(dot_dtype), *blocks, waves, taps, tuple(stride), tuple(padding), wide_, prec,
            *flags)


def precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """tl.dot's input precision: TF32 for fp32 exactly when allowed (as cuDNN follows its flag), else exact."""
    return "tf32" if dtype == torch.float32 and allow_tf32 else "ieee"


def _acc(x: torch.Tensor):
    return tl_dtype(torch.float64 if x.dtype == torch.float64 else torch.float32)


def mma_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` in ``dtype``, laid out as the kernels' MMA loads it: [CO, KH, KW, C] in memory (channels_last).

    The tiles of both convolutions then run along contiguous channels (vector
    loads and cp.async), whatever layout the module's weight has: torchvision's
    default OIHW included. The weight itself when it is laid out so already;
    else a copy per call, as autocast's cast to ``dtype`` makes anyway: its
    memory is one weight, freed with the op. (Not kept across calls: a
    weight changed through ``.data`` keeps its version counter and storage,
    so no cache key could tell that the copy is stale.)
    """
    return weight.detach().to(dtype, memory_format=torch.channels_last)


def conv_forward(
    x: torch.Tensor, stats: torch.Tensor, bn_weight, bn_bias, weight: torch.Tensor, bias, y: torch.Tensor,
    stride: tuple[int, int], padding: tuple[int, int], allow_tf32: bool,
) -> None:
    """``y = conv2d(relu(bn(x)), weight, bias, stride, padding)``; ``y`` preallocated, any strides.

    ``weight`` is in the dot's dtype, best from ``mma_weight`` (any layout works).
    """
    n, c, h, w = x.shape
    co, _, kh, kw = weight.shape
    _, _, oh, ow = y.shape
    acc, prec = _acc(x), precision(weight.dtype, allow_tf32)
    rows = n * oh * ow
    s = stream(x.device)
    wide_ = wide(x, weight.dtype, allow_tf32)

    def launch(config):
        if config == UNFUSED:
            _with_tf32(allow_tf32, lambda: y.copy_(F.conv2d(bn_relu(x, stats, bn_weight, bn_bias, weight.dtype),
                                                            weight, bias, stride, padding)))
            return
        bm, bn, bk, warps, stages = config
        forward_kernel(
            (cdiv(rows, bm), cdiv(co, bn), 1), s, warps,
            x, stats, bn_weight, bn_bias, weight, bias, ones(x.device), y, n, c, h, w, co, oh, ow,
            *x.stride(), *weight.stride(), *y.stride(), kh, kw, *stride, *padding, acc, prec, bm, bn, bk,
            num_stages=stages,
        )

    options = candidates("forward", kh * kw, x.device, wide_, rows, co, c, weight.dtype)
    bucket = _bucket("forward", x, weight.dtype, (rows, co, c), 0, kh * kw, stride, padding, wide_, prec)
    launch(choose("forward", bucket, options, launch, x.device, lambda: (y,)))


def _with_tf32(allow_tf32: bool, fn):
    """Run ``fn`` with cuDNN's TF32 flag as the op was called with (the fused dots follow the same flag)."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    try:
        return fn()
    finally:
        torch.backends.cudnn.allow_tf32 = before


def bn_relu(x: torch.Tensor, stats: torch.Tensor, bn_weight, bn_bias, dtype: torch.dtype) -> torch.Tensor:
    """``relu(bn(x))`` in ``dtype`` and x's memory format, by the fused prologue's formula (unfused candidate)."""
    n, c, h, w = x.shape
    fmt = torch.channels_last if x.stride(1) == 1 and c > 1 else torch.contiguous_format
    a = torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=fmt)
    if compiled(x.device):
        bm, bn, warps = (32, 64, 4) if fmt == torch.channels_last else (128, 16, 4)
    else:
        bm, bn, warps = min(256, next_power_of_2(n * h * w)), min(64, next_power_of_2(c)), 1
    bn_relu_kernel(
        (cdiv(n * h * w, bm), cdiv(c, bn), 1), stream(x.device), warps,
        x, stats, bn_weight, bn_bias, a, n, c, h, w, *x.stride(), *a.stride(), _acc(x), bm, bn,
    )
    return a


_SUM_ROWS = 16  # partial rows each finishing round loads at once: one constant, one binary


def _group_rows(parts: int) -> int:
    """Partial rows per group of a two-round sum (the dgrad's BN sums, wgrad's split tiles): about sqrt(parts),
    so both rounds are short."""
    return next_power_of_2(max(1, math.isqrt(parts)))


def conv_dgrad(
    dy: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, stats: torch.Tensor, bn_weight, bn_bias,
    g: torch.Tensor, sums: torch.Tensor | None, dbn_weight, dbn_bias,
    stride: tuple[int, int], padding: tuple[int, int], dx_direct: bool, allow_tf32: bool,
) -> None:
    """``g = dgrad(dy) * [a > 0]`` into ``g`` (x's shape, any strides), or dx when ``dx_direct`` (eval).

    ``sums`` ([2C], the stats' dtype): ``[sum(g) | sum(g * (x - mean))]``,
    with the BN parameter gradients written from them when given; None when
    neither dx (training) nor the parameter gradients need them.
    """
    n, c, h, w = x.shape
    co, _, kh, kw = weight.shape
    _, _, oh, ow = dy.shape
    sh, sw = stride
    hp, wp = cdiv(h, sh), cdiv(w, sw)
    rows = n * hp * wp
    acc, prec = _acc(x), precision(weight.dtype, allow_tf32)
    s = stream(x.device)
    wide_ = wide(x, weight.dtype, allow_tf32)

    def epilogue(config, da, grid):
        bm, bn, bk, warps, stages = config
        parts = grid[0] * grid[2]
        group_rows = _group_rows(parts)
        groups = cdiv(parts, group_rows)
        partial = scratch(x.device, 2 * (parts + groups) * c, stats.dtype) if sums is not None else None
        tickets = counters(x.device, s, grid[1] * (groups + 1))
        # With da given the kernel is its epilogue alone, over one stride-1 "phase" of every position.
        geometry = (kh, kw, sh, sw, *padding) if da is None else (1, 1, 1, 1, 0, 0)
        dgrad_kernel(
            grid, s, warps,
            dy, weight, da, x, stats, bn_weight, bn_bias, g, partial, tickets, sums, dbn_weight, dbn_bias,
            n, c, h, w, co, oh, ow, *((hp, wp) if da is None else (h, w)),
            *dy.stride(), *weight.stride(), *x.stride(), *g.stride(), *(da.stride() if da is not None else (0,) * 4),
            group_rows, *geometry, dx_direct, acc, prec, bm, bn, bk,
            _SUM_ROWS, num_stages=stages,
        )

    def launch(config):
        if config == UNFUSED:
            da = _with_tf32(allow_tf32, lambda: torch.nn.grad.conv2d_input(x.shape, weight, dy, stride, padding))
            config = (64, 64, 16, 4, 1) if compiled(x.device) else _interpreter_blocks(n * h * w, c, 16)
            epilogue(config, da, (cdiv(n * h * w, config[0]), cdiv(c, config[1]), 1))
            return
        epilogue(config, None, (cdiv(rows, config[0]), cdiv(c, config[1]), sh * sw))

    def outputs():
        return tuple(t for t in (g, sums, dbn_weight, dbn_bias) if t is not None)

    options = candidates("dgrad", kh * kw, x.device, wide_, rows, c, co, weight.dtype)
    bucket = _bucket("dgrad", x, weight.dtype, (rows, c, co), 0, kh * kw, stride, padding, wide_, prec, dx_direct,
                     sums is None)
    launch(choose("dgrad", bucket, options, launch, x.device, outputs))


def _wgrad_splits(tiles: int, k_blocks: int, device: torch.device) -> int:
    """Programs per output tile along K: at most two waves of the GPU, each with at least 8 K blocks."""
    if not compiled(device):
        return 1
    want = cdiv(2 * sm_count(device), tiles)
    return max(1, min(want, k_blocks // 8))


def conv_wgrad(
    dy: torch.Tensor, x: torch.Tensor, stats: torch.Tensor, bn_weight, bn_bias, dw: torch.Tensor,
    stride: tuple[int, int], padding: tuple[int, int], allow_tf32: bool,
) -> None:
    """``dw = sum over positions of dy (x) relu(bn(x))`` per tap, into ``dw`` ([CO, C, KH, KW], any strides).

    ``dy`` has the dtype the forward's dot ran in (the recomputed activation is cast to it).
    """
    n, c, h, w = x.shape
    co, _, kh, kw = dw.shape
    _, _, oh, ow = dy.shape
    m = n * oh * ow
    acc, prec = _acc(x), precision(dy.dtype, allow_tf32)
    s = stream(x.device)
    wide_ = wide(x, dy.dtype, allow_tf32)

    def launch(config):
        if config == UNFUSED:
            a = bn_relu(x, stats, bn_weight, bn_bias, dy.dtype)
            dw.copy_(_with_tf32(allow_tf32, lambda: torch.nn.grad.conv2d_weight(a, dw.shape, dy, stride, padding)))
            return
        bm, bn, bk, warps, stages = config
        tiles = cdiv(co, bm) * cdiv(c, bn) * kh * kw
        k_blocks = cdiv(m, bk)
        splits = _wgrad_splits(tiles, k_blocks, x.device)
        per_split = cdiv(k_blocks, splits)
        splits = cdiv(k_blocks, per_split)
        group = _group_rows(splits)
        groups = cdiv(splits, group)
        partial = scratch(x.device, (splits + groups) * tiles * bm * bn,
                          torch.float32 if acc == tl.float32 else torch.float64) if splits > 1 else None
        tickets = counters(x.device, s, tiles * (groups + 1))
        wgrad_kernel(
            (tiles, splits, 1), s, warps,
            dy, x, stats, bn_weight, bn_bias, ones(x.device), dw, partial, tickets,
            n, c, h, w, co, oh, ow, per_split, splits, group, *divisor(ow), *divisor(oh),
            *dy.stride(), *x.stride(), *dw.stride(),
            kh, kw, *stride, *padding, splits > 1, acc, prec, bm, bn, bk,
            num_stages=stages,
        )

    options = candidates("wgrad", kh * kw, x.device, wide_, co, c, m, dy.dtype)
    bucket = _bucket("wgrad", x, dy.dtype, (co, c, m), 2, kh * kw, stride, padding, wide_, prec)
    launch(choose("wgrad", bucket, options, launch, x.device, lambda: (dw,)))
