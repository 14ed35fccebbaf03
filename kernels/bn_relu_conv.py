"""Fused BN-ReLU-Conv: an implicit-GEMM convolution whose input is ``relu(bn(x))``, forward and backward.

``a = relu(bn(x))`` never exists in memory. Three kernels, each an implicit
GEMM accumulating in fp32 with ``tl.dot`` (bf16/fp16 operands as the
weight's dtype; fp32 as TF32 or exactly, as the caller says; fp64 exactly):

- ``forward``: ``y = conv(a, weight) [+ bias]``. Rows are output positions
  (n, oh, ow), columns output channels, K runs tap by tap over blocks of input
  channels (channels innermost: contiguous in channels_last). The prologue
  applies BN and ReLU to each loaded x tile in fp32, then zeroes padded
  positions and tail lanes again (``relu(bn(0))`` is not 0).
- ``dgrad``: ``da = conv_transpose(dy, weight)``, decomposed by output phase
  (sub-pixel): the ``stride**2`` phases of input positions are each a dense
  problem over only the taps that reach them, so a stride-2 convolution does no
  masked-out work. The epilogue recomputes the ReLU decision from x and the
  saved statistics (the prologue's formula, bit for bit), writes
  ``g = da * [a > 0]`` and the BN backward's per-channel sums, ``sum(g)`` and
  ``sum(g * (x - mean))``, finished by the last program of each channel block.
  In eval mode without parameter gradients it writes dx itself.
- ``wgrad``: ``dweight[:, :, kh, kw] = dy^T @ a_shifted`` per tap, with
  ``a`` recomputed in the prologue; K (the output positions) is split over
  programs when the tiles alone would not fill the GPU, and the last program
  of each tile adds the partial results.

``stats`` is ``[mean (C) | rstd (C) | count]`` as the batch-norm kernels
write it. Tensors are 4-D with any strides: an input that is a channel slice
of a larger buffer is read in place and the output can be a channel slice.
"""

import os

import torch
import triton
import triton.language as tl

from .batch_norm_backward import finish_sums
from .launch import Kernel, aligned, cdiv, compiled, counters, next_power_of_2, scratch, sm_count, stream, tensor_key
from .utils import tl_dtype


@triton.jit
def channel_affine(stats_ptr, w_ptr, b_ptr, ch, ok, C, FOLDED: tl.constexpr, ACC: tl.constexpr):
    """(mean, scale, shift) of channels ``ch``: BN is ``(x - mean) * scale + shift``, or ``x * scale + shift`` FOLDED.

    The batch-norm kernels' formulas: training normalises then adds the bias,
    eval folds the running statistics into one scale and shift.
    """
    mean = tl.load(stats_ptr + ch, mask=ok, other=0.0).to(ACC)
    scale = tl.load(stats_ptr + C + ch, mask=ok, other=0.0).to(ACC)
    if w_ptr is not None:
        scale = scale * tl.load(w_ptr + ch, mask=ok, other=0.0).to(ACC)
    if FOLDED:
        shift = -mean * scale
        if b_ptr is not None:
            shift += tl.load(b_ptr + ch, mask=ok, other=0.0).to(ACC)
    else:
        shift = tl.zeros_like(scale)
        if b_ptr is not None:
            shift = tl.load(b_ptr + ch, mask=ok, other=0.0).to(ACC)
    return mean, scale, shift


@triton.jit
def pre_activation(x, mean, scale, shift, FOLDED: tl.constexpr):
    """BN of an fp32 tile ``x`` (channels along dim 1): the value whose sign the ReLU decides."""
    if FOLDED:
        y = x * scale[None, :] + shift[None, :]
    else:
        y = (x - mean[None, :]) * scale[None, :] + shift[None, :]
    return y


@triton.jit
def load_activation(x_ptr, offs, ok, mean, scale, shift, FOLDED: tl.constexpr, ACC: tl.constexpr):
    """``relu(bn(x))`` of a [positions, channels] tile, zero where ``ok`` is False (padding, tails)."""
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(ACC)
    y = pre_activation(x, mean, scale, shift, FOLDED)
    # `y < 0` keeps NaN as NaN, as torch.relu does; masked lanes are zero after the prologue.
    return tl.where(ok & ~(y < 0), y, 0.0)


@triton.jit
def _forward_kernel(
    x_ptr, stats_ptr, bnw_ptr, bnb_ptr,  # x [N, C, H, W] any strides; stats [2C + 1]; BN weight/bias [C] or None
    w_ptr, bias_ptr,  # conv weight [CO, C, KH, KW] any strides, its dtype the dot's; conv bias [CO] or None
    y_ptr,  # [N, CO, OH, OW] any strides
    N, C, H, W, CO, OH, OW,
    xs_n, xs_c, xs_h, xs_w,
    ws_o, ws_c, ws_h, ws_w,
    ys_n, ys_c, ys_h, ys_w,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    FOLDED: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
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
    # One flat K loop over (tap, channel block), channels innermost, which Triton pipelines as one loop.
    for kk in range(0, KH * KW * c_blocks):
        tap = kk // c_blocks
        kh = tap // KW
        kw = tap % KW
        ch = (kk % c_blocks) * BLOCK_K + kc
        ch_ok = ch < C
        ih = oh * SH - PH + kh
        iw = ow * SW - PW + kw
        pos_ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        mean, scale, shift = channel_affine(stats_ptr, bnw_ptr, bnb_ptr, ch, ch_ok, C, FOLDED, ACC)
        offs = (n * xs_n + ih * xs_h + iw * xs_w)[:, None] + ch[None, :] * xs_c
        a = load_activation(x_ptr, offs, pos_ok[:, None] & ch_ok[None, :], mean, scale, shift, FOLDED, ACC)
        wt = tl.load(w_ptr + ch[:, None] * ws_c + co[None, :] * ws_o + kh * ws_h + kw * ws_w,
                     mask=ch_ok[:, None] & co_ok[None, :], other=0.0)
        acc = tl.dot(a.to(wt.dtype), wt, acc, input_precision=PRECISION, out_dtype=ACC)
    if bias_ptr is not None:
        acc += tl.load(bias_ptr + co, mask=co_ok, other=0.0).to(acc.dtype)[None, :]
    y_offs = (n * ys_n + oh * ys_h + ow * ys_w)[:, None] + co[None, :] * ys_c
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & co_ok[None, :])


@triton.jit
def _dgrad_kernel(
    dy_ptr,  # [N, CO, OH, OW] any strides
    w_ptr,  # conv weight [CO, C, KH, KW], the dot's dtype
    x_ptr, stats_ptr, bnw_ptr, bnb_ptr,  # as in forward
    g_ptr,  # [N, C, H, W] output: g = da * [a > 0] (or dx, DX_DIRECT), any strides
    partial_ptr,  # scratch [2, P, C]: per-program sum(g), sum(g * (x - mean)) (None: no sums)
    ticket_ptr,  # int32 [c_blocks], zero on entry and on exit
    sums_ptr,  # [2C] output: sum(g), sum(g * (x - mean))
    dbnw_ptr, dbnb_ptr,  # [C] BN weight/bias gradients, or None
    N, C, H, W, CO, OH, OW, HP, WP,  # HP, WP: input rows and columns per phase, cdiv(H, SH), cdiv(W, SW)
    dys_n, dys_c, dys_h, dys_w,
    ws_o, ws_c, ws_h, ws_w,
    xs_n, xs_c, xs_h, xs_w,
    gs_n, gs_c, gs_h, gs_w,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    FOLDED: tl.constexpr, DX_DIRECT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
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
    mean, scale, shift = channel_affine(stats_ptr, bnw_ptr, bnb_ptr, ch, ch_ok, C, FOLDED, ACC)
    x = tl.load(x_ptr + (n * xs_n + ih * xs_h + iw * xs_w)[:, None] + ch[None, :] * xs_c, mask=ok, other=0.0).to(ACC)
    y = pre_activation(x, mean, scale, shift, FOLDED)
    # Eager's relu backward is where(a <= 0, 0, da): NaN activations pass da on. A select, not a product.
    g = tl.where(ok & ~(y <= 0), acc.to(ACC), 0.0)
    g_offs = (n * gs_n + ih * gs_h + iw * gs_w)[:, None] + ch[None, :] * gs_c
    if DX_DIRECT:  # eval: the statistics are constants, dx = weight * rstd * g
        tl.store(g_ptr + g_offs, (g * scale[None, :]).to(g_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(g_ptr + g_offs, g.to(g_ptr.dtype.element_ty), mask=ok)
    if partial_ptr is not None:
        P = tl.num_programs(0) * tl.num_programs(2)
        p = phase * tl.num_programs(0) + pid_m
        tl.store(partial_ptr + p * C + ch, tl.sum(g, axis=0), mask=ch_ok)
        tl.store(partial_ptr + (P + p) * C + ch, tl.sum(g * tl.where(ok, x - mean[None, :], 0.0), axis=0), mask=ch_ok)
        tl.debug_barrier()  # every thread's stores come before the ticket's release
        ticket = tl.atomic_add(ticket_ptr + pid_n, 1, sem="acq_rel")
        if ticket == P - 1:
            finish_sums(partial_ptr, P, C, ch, ch_ok, stats_ptr, sums_ptr, dbnw_ptr, dbnb_ptr, ACC, BLOCK_P, BLOCK_N)
            tl.atomic_xchg(ticket_ptr + pid_n, 0)


@triton.jit
def _wgrad_kernel(
    dy_ptr,  # [N, CO, OH, OW] any strides
    x_ptr, stats_ptr, bnw_ptr, bnb_ptr,  # as in forward
    dw_ptr,  # [CO, C, KH, KW] output, any strides
    partial_ptr,  # fp32 scratch [SPLITS, tiles, BLOCK_M, BLOCK_N] (None when SPLITS == 1)
    ticket_ptr,  # int32 [tiles], zero on entry and on exit
    N, C, H, W, CO, OH, OW, blocks_per_split,
    dys_n, dys_c, dys_h, dys_w,
    xs_n, xs_c, xs_h, xs_w,
    dws_o, dws_c, dws_h, dws_w,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    SPLITS: tl.constexpr, FOLDED: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
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
    mean, scale, shift = channel_affine(stats_ptr, bnw_ptr, bnb_ptr, ch, ch_ok, C, FOLDED, ACC)
    M = N * OH * OW
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    k0 = split * blocks_per_split
    for kb in range(k0, tl.minimum(k0 + blocks_per_split, tl.cdiv(M, BLOCK_K))):
        pos = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        pos_ok = pos < M
        ow = pos % OW
        oh = (pos // OW) % OH
        n = (pos // (OW * OH)).to(tl.int64)
        dy = tl.load(dy_ptr + co[:, None] * dys_c + (n * dys_n + oh * dys_h + ow * dys_w)[None, :],
                     mask=co_ok[:, None] & pos_ok[None, :], other=0.0)
        ih = oh * SH - PH + kh
        iw = ow * SW - PW + kw
        in_ok = pos_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        offs = (n * xs_n + ih * xs_h + iw * xs_w)[:, None] + ch[None, :] * xs_c
        a = load_activation(x_ptr, offs, in_ok[:, None] & ch_ok[None, :], mean, scale, shift, FOLDED, ACC)
        acc = tl.dot(dy, a.to(dy.dtype), acc, input_precision=PRECISION, out_dtype=ACC)
    ok = co_ok[:, None] & ch_ok[None, :]
    dw_offs = co[:, None] * dws_o + ch[None, :] * dws_c + kh * dws_h + kw * dws_w
    if SPLITS == 1:
        tl.store(dw_ptr + dw_offs, acc.to(dw_ptr.dtype.element_ty), mask=ok)
    else:
        tiles = tl.num_programs(0)
        local = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tl.store(partial_ptr + (split * tiles + tile) * (BLOCK_M * BLOCK_N) + local, acc)
        tl.debug_barrier()  # every thread's stores come before the ticket's release
        ticket = tl.atomic_add(ticket_ptr + tile, 1, sem="acq_rel")
        if ticket == SPLITS - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc.dtype)
            for s in range(0, SPLITS):
                total += tl.load(partial_ptr + (s * tiles + tile) * (BLOCK_M * BLOCK_N) + local, cache_modifier=".cg")
            tl.store(dw_ptr + dw_offs, total.to(dw_ptr.dtype.element_ty), mask=ok)
            tl.atomic_xchg(ticket_ptr + tile, 0)


forward_kernel = Kernel(_forward_kernel)
dgrad_kernel = Kernel(_dgrad_kernel)
wgrad_kernel = Kernel(_wgrad_kernel)


# --- launch settings --------------------------------------------------------
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). tl.dot needs every block
# >= 16. At most 4 warps where the K loop runs over taps: Triton has been seen
# to miscompile flattened tap loops with 8. Every config compiles for sm_90
# without spills (tests/test_kernels_compile_sm90.py).

INTERPRETER_CONFIG = (32, 32, 16, 1, 1)
# Channel-contiguous operands (channels_last) on tensor cores (bf16/fp16, TF32). At most 32 fp32
# accumulators a thread: the prologue's fp32 tile and the dgrad epilogue's need the rest of the registers.
GEMM_CONFIGS = ((128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (64, 64, 64, 4, 3))
TAP_CONFIGS = ((64, 64, 64, 4, 3), (128, 32, 64, 4, 3), (64, 32, 64, 4, 4))
WGRAD_CONFIGS = ((64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (32, 32, 128, 4, 3))
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
    return GEMM_CONFIGS if taps == 1 else TAP_CONFIGS


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


_chosen: dict = {}


def choose(kind: str, key: tuple, candidates: tuple, run) -> tuple:
    """The fastest of ``candidates`` for launches keyed by ``key``, timed on the GPU at the first call.

    ``run(config)`` launches with one config. On a GPU each candidate runs a
    few times under ``triton.testing.do_bench`` and the fastest is kept for
    every later launch with this key; with one candidate, or without a GPU to
    time on, the first is taken untimed; likewise with ``FASTRES_AUTOTUNE=0``
    (no tuning time at each new shape, for tests and quick runs).
    """
    full = (kind, key)
    best = _chosen.get(full)
    if best is not None:
        return best
    if len(candidates) == 1 or not torch.cuda.is_available() or os.environ.get("FASTRES_AUTOTUNE") == "0":
        best = candidates[0]
    else:
        timings = [(triton.testing.do_bench(lambda c=c: run(c), warmup=3, rep=10), c) for c in candidates]
        best = min(timings, key=lambda t: t[0])[1]
    _chosen[full] = best
    return best


def precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """tl.dot's input precision: TF32 for fp32 exactly when allowed (as cuDNN follows its flag), else exact."""
    return "tf32" if dtype == torch.float32 and allow_tf32 else "ieee"


def _acc(x: torch.Tensor):
    return tl_dtype(torch.float64 if x.dtype == torch.float64 else torch.float32)


def conv_forward(
    x: torch.Tensor, stats: torch.Tensor, bn_weight, bn_bias, weight: torch.Tensor, bias, y: torch.Tensor,
    stride: tuple[int, int], padding: tuple[int, int], folded: bool, allow_tf32: bool,
) -> None:
    """``y = conv2d(relu(bn(x)), weight, bias, stride, padding)``; ``y`` preallocated, any strides."""
    n, c, h, w = x.shape
    co, _, kh, kw = weight.shape
    _, _, oh, ow = y.shape
    acc, prec = _acc(x), precision(weight.dtype, allow_tf32)
    rows = n * oh * ow
    s = stream(x.device)
    key = (x.shape, x.stride(), y.shape, y.stride(), weight.shape, weight.stride(), x.dtype, weight.dtype, y.dtype,
           aligned(x), aligned(y), aligned(weight), tensor_key(bn_weight), tensor_key(bn_bias), tensor_key(bias),
           stride, padding, folded, prec, x.device)

    def launch(config):
        bm, bn, bk, warps, stages = _fit(config, rows, co, c, weight.dtype)
        forward_kernel(
            (key, config), (cdiv(rows, bm), cdiv(co, bn), 1), s, warps,
            x, stats, bn_weight, bn_bias, weight, bias, y, n, c, h, w, co, oh, ow,
            *x.stride(), *weight.stride(), *y.stride(), kh, kw, *stride, *padding, folded, acc, prec, bm, bn, bk,
            num_stages=stages,
        )

    launch(choose("forward", key, configs("forward", kh * kw, x.device, wide(x, weight.dtype, allow_tf32)), launch))


def conv_dgrad(
    dy: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, stats: torch.Tensor, bn_weight, bn_bias,
    g: torch.Tensor, sums: torch.Tensor | None, dbn_weight, dbn_bias,
    stride: tuple[int, int], padding: tuple[int, int], folded: bool, dx_direct: bool, allow_tf32: bool,
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
    key = (x.shape, x.stride(), dy.shape, dy.stride(), g.stride(), weight.shape, weight.stride(), x.dtype, dy.dtype,
           weight.dtype, g.dtype, aligned(x), aligned(dy), aligned(g), aligned(weight), tensor_key(bn_weight),
           tensor_key(bn_bias), tensor_key(dbn_weight), tensor_key(dbn_bias), sums is None, stride, padding, folded,
           dx_direct, prec, x.device)

    def launch(config):
        bm, bn, bk, warps, stages = _fit(config, rows, c, co, weight.dtype)
        grid = (cdiv(rows, bm), cdiv(c, bn), sh * sw)
        parts = grid[0] * grid[2]
        partial = scratch(x.device, s, 2 * parts * c, stats.dtype) if sums is not None else None
        tickets = counters(x.device, s, grid[1])
        dgrad_kernel(
            (key, config), grid, s, warps,
            dy, weight, x, stats, bn_weight, bn_bias, g, partial, tickets, sums, dbn_weight, dbn_bias,
            n, c, h, w, co, oh, ow, hp, wp,
            *dy.stride(), *weight.stride(), *x.stride(), *g.stride(),
            kh, kw, sh, sw, *padding, folded, dx_direct, acc, prec, bm, bn, bk,
            max(1, min(next_power_of_2(parts), 4096 // bn)),
            num_stages=stages,
        )

    launch(choose("dgrad", key, configs("dgrad", kh * kw, x.device, wide(x, weight.dtype, allow_tf32)), launch))


def _wgrad_splits(tiles: int, k_blocks: int, device: torch.device) -> int:
    """Programs per output tile along K: about two programs per SM, each with at least 8 K blocks."""
    if not compiled(device):
        return 1
    want = cdiv(2 * sm_count(device), tiles)
    return max(1, min(want, k_blocks // 8))


def conv_wgrad(
    dy: torch.Tensor, x: torch.Tensor, stats: torch.Tensor, bn_weight, bn_bias, dw: torch.Tensor,
    stride: tuple[int, int], padding: tuple[int, int], folded: bool, allow_tf32: bool,
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
    key = (x.shape, x.stride(), dy.shape, dy.stride(), dw.shape, dw.stride(), x.dtype, dy.dtype, dw.dtype,
           aligned(x), aligned(dy), aligned(dw), tensor_key(bn_weight), tensor_key(bn_bias), stride, padding,
           folded, prec, x.device)

    def launch(config):
        bm, bn, bk, warps, stages = _fit(config, co, c, m, dy.dtype)
        tiles = cdiv(co, bm) * cdiv(c, bn) * kh * kw
        k_blocks = cdiv(m, bk)
        splits = _wgrad_splits(tiles, k_blocks, x.device)
        per_split = cdiv(k_blocks, splits)
        splits = cdiv(k_blocks, per_split)
        partial = scratch(x.device, s, splits * tiles * bm * bn, torch.float32 if acc == tl.float32 else torch.float64) \
            if splits > 1 else None
        tickets = counters(x.device, s, tiles)
        wgrad_kernel(
            (key, config), (tiles, splits, 1), s, warps,
            dy, x, stats, bn_weight, bn_bias, dw, partial, tickets,
            n, c, h, w, co, oh, ow, per_split,
            *dy.stride(), *x.stride(), *dw.stride(),
            kh, kw, *stride, *padding, splits, folded, acc, prec, bm, bn, bk,
            num_stages=stages,
        )

    launch(choose("wgrad", key, configs("wgrad", kh * kw, x.device, wide(x, dy.dtype, allow_tf32)), launch))
