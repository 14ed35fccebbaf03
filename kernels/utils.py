"""Launch settings, index helpers and the ReLU-mask bit format shared by the kernels."""

import torch
import triton
import triton.language as tl  # noqa: F401  (Triton requires it in scope of @triton.jit code)

from .launch import cdiv, compiled, next_power_of_2, sm_count


def elementwise_settings(numel: int, device: torch.device) -> tuple[int, int]:
    """Block size and warp count for a memory-bound elementwise kernel.

    On a GPU each program moves 2048 elements with 8 warps (8 elements, i.e. one
    or two 16-byte vectors, per thread and tensor). Under the interpreter the
    cost is per program, so one program takes as much as it can.
    """
    if not compiled(device):
        return max(8, min(next_power_of_2(numel), 1 << 16)), 1
    return 2048, 8


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """What a kernel computes in: float64 for float64 data, float32 for the rest."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_dtype(dtype: torch.dtype):
    """The ``tl`` dtype of a torch float32/float64 (for constexpr accumulator types)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def as_4d(t: torch.Tensor) -> torch.Tensor:
    """View ``t`` as 4-D by prepending size-1 dims (rank <= 4 only)."""
    if t.dim() > 4:
        raise ValueError(f"expected at most 4 dims, got {t.dim()}")
    return t[(None,) * (4 - t.dim())]  # indexing with None is always a view


def divisor(d: int) -> tuple[int, int]:
    """``(m, s)`` with ``p // d == umulhi(p, m) >> s`` for every ``0 <= p < 2**31`` and ``d > 1`` (``m < 2**32``).

    A division by a run-time divisor as one 32-bit high multiply and a shift
    (``divide``): the GPU has no integer divide, and the compiler's emulation
    of ``p // d`` with ``d`` unknown at compile time costs about ten
    instructions per element. ``m = floor(2**(31 + l) / d) + 1`` with
    ``l = ceil(log2(d))`` overshoots ``2**(31 + l) / d`` by at most ``2**l / d``.
    ``d = 1`` (which ``divide`` passes ``p`` through for) gets ``d = 2``'s numbers,
    so that ``m`` is always above ``2**31``: one argument type, one binary.
    """
    if d < 1:
        raise ValueError(f"divisor must be positive, got {d}")
    d = max(d, 2)
    shift = 31 + (d - 1).bit_length()
    return (1 << shift) // d + 1, shift - 32


@triton.jit
def divide(p, d, m, s):
    """``p // d`` for ``0 <= p < 2**31``, with ``(m, s) = divisor(d)``."""
    q = (tl.umulhi(p.to(tl.uint32), m.to(tl.uint32)) >> s.to(tl.uint32)).to(p.dtype)
    return tl.where(d == 1, p, q)


@triton.jit
def strided_offsets(idx, size1, size2, size3, stride0, stride1, stride2, stride3):
    """Memory offsets of the logical linear indices ``idx`` of a 4-D view."""
    i3 = idx % size3
    rest = idx // size3
    i2 = rest % size2
    rest = rest // size2
    i1 = rest % size1
    i0 = rest // size1
    return i0 * stride0 + i1 * stride1 + i2 * stride2 + i3 * stride3


@triton.jit
def pack_mask(mask_ptr, keep, pid, n_elements, BLOCK: tl.constexpr):
    """Store ``keep`` (BLOCK int32 0/1, block ``pid`` of the logical order) as BLOCK // 8 bytes.

    Bit i of the mask is logical element i: byte i // 8, bit i % 8.
    """
    bits = tl.reshape(keep, [BLOCK // 8, 8])
    packed = tl.sum(bits << tl.arange(0, 8)[None, :], axis=1)
    byte = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    tl.store(mask_ptr + byte, packed.to(tl.uint8), mask=byte < (n_elements + 7) // 8)


@triton.jit
def unpack_mask(mask_ptr, pid, n_elements, BLOCK: tl.constexpr):
    """The BLOCK bits of block ``pid`` as booleans: one byte load per 8 elements."""
    byte = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    packed = tl.load(mask_ptr + byte, mask=byte < (n_elements + 7) // 8, other=0)
    bits = (packed.to(tl.int32)[:, None] >> tl.arange(0, 8)[None, :]) & 1
    return tl.reshape(bits, [BLOCK]) != 0


@triton.jit
def mask_bits_at(mask_ptr, offsets, valid):
    """The mask bits of arbitrary logical elements ``offsets`` (a gather, for 2-D tiles)."""
    packed = tl.load(mask_ptr + (offsets >> 3), mask=valid, other=0)
    return ((packed.to(tl.int32) >> (offsets & 7).to(tl.int32)) & 1) != 0


# --- N x C x HW views (batch norm) ------------------------------------------
# Batch-norm kernels see every tensor as a 3-D view [N, C, HW] with its own
# strides (H and W merged; the ops layer makes sure that is possible). Outputs
# are dense in NCHW or in channels_last ("C_LAST") order.


@triton.jit
def tile_index(t, N, HW, PER_N: tl.constexpr, FLAT: tl.constexpr, BLOCK_R: tl.constexpr):
    """Rows of reduction tile ``t``: (n, hw, row valid, first row, row count).

    PER_N tiles stay inside one sample (n a scalar), so consecutive rows are
    consecutive hw (NCHW-like layouts, where hw is the fast dim). Otherwise
    rows run over the flattened m = n * HW + hw (channels_last-like layouts,
    where c is the fast dim and a tile should not waste rows at sample
    boundaries); with FLAT (every tensor's n stride is HW times its hw
    stride) that is n = 0, hw = m, with no division. A row's offset in a
    tensor is then ``n * s_n + hw * s_hw``.
    """
    r = tl.arange(0, BLOCK_R)
    if PER_N:
        per_n = tl.cdiv(HW, BLOCK_R)
        n = (t // per_n).to(tl.int64)
        start = (t % per_n) * BLOCK_R
        hw = start + r
        valid = hw < HW
        count = tl.minimum(HW - start, BLOCK_R)
    else:
        start = t * tl.full([], BLOCK_R, tl.int64)  # int64: n * HW may pass 2**31
        m = start + r
        valid = m < N * HW
        count = tl.minimum(N * HW - start, BLOCK_R)
        if FLAT:
            n = tl.zeros([], tl.int64)
            hw = m
        else:
            n = m // HW
            hw = m % HW
    return n, hw, valid, start, count


@triton.jit
def tile_mask_bits(mask_ptr, n, hw, start, cols, col0, C, HW, row_ok, ok, z_sn, z_sc, z_shw,
                   MASK_TILE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The ReLU-mask bits of a reduction tile (rows from ``tile_index``, channels ``cols`` from ``col0``).

    MASK_TILE 1: channels_last mask and flat rows (row m's bits are bytes
    m * ceil(C/8) on, channels along them); 2: NCHW mask and PER_N rows of a
    multiple of 8 (row (n, c)'s bits run along hw); both read a byte per 8
    elements. 0: a byte per element, at the bit strides (z_sn, z_sc, z_shw).
    """
    if MASK_TILE == 1:
        row_bytes = (C + 7) // 8
        rows = start + tl.arange(0, BLOCK_R)
        if BLOCK_C % 8 == 0:  # the tile's channels start at a byte boundary
            bits = unpack_mask_2d(mask_ptr, rows, col0 // 8, row_bytes, row_ok, BLOCK_R, BLOCK_C)
        else:
            byte = rows[:, None] * row_bytes + (cols[None, :] >> 3)
            packed = tl.load(mask_ptr + byte, mask=ok, other=0).to(tl.int32)
            bits = ((packed >> (cols[None, :] & 7)) & 1) != 0
    elif MASK_TILE == 2:
        row_bytes = (HW + 7) // 8
        j = tl.arange(0, BLOCK_R // 8)
        byte = (n * C + cols[None, :]) * row_bytes + (start // 8 + j)[:, None]
        ok8 = ((start // 8 + j) < row_bytes)[:, None] & (cols < C)[None, :]
        packed = tl.load(mask_ptr + byte, mask=ok8, other=0).to(tl.int32)
        expanded = (packed[:, None, :] >> tl.arange(0, 8)[None, :, None]) & 1
        bits = tl.reshape(expanded, [BLOCK_R, BLOCK_C]) != 0
    else:
        bits = mask_bits_at(mask_ptr, (n * z_sn + hw * z_shw)[:, None] + cols[None, :] * z_sc, ok)
    return bits & ok


def reduction_settings(n: int, c: int, hw: int, per_n: bool, device: torch.device,
                       dtype: torch.dtype = torch.float32) -> tuple[int, int, int, int, int]:
    """(BLOCK_R, BLOCK_C, splits, tiles per split, num_warps) of a per-channel reduction.

    Tiles hold about 4096 elements, longest along the dim that is contiguous
    in memory. The rows are cut into ``splits`` ranges so that about 4
    programs of 8 warps run per SM on a GPU: 4 x 4096 x 2 bytes = 32 KB of
    bf16 loads in flight per SM, past what HBM3e's latency-bandwidth product
    asks of each of 132 SMs (about 4.8 TB/s x 0.6 us / 132 = 22 KB); float64
    data, with twice the registers per element, takes half the tile. Each
    program accumulates its tiles in registers, reduces once and writes a
    partial result per channel, which the last program of each channel block
    combines.
    """
    on_gpu = compiled(device)
    tile = 2048 if on_gpu and dtype.itemsize == 8 else 4096
    if per_n:
        block_r = min(next_power_of_2(hw), 512)
        block_c = min(next_power_of_2(c), max(1, tile // block_r))
        n_tiles = n * cdiv(hw, block_r)
    else:  # channels contiguous: 64 of them (128 bytes of bf16) per row on a GPU, one binary for every C > 32
        block_c = min(next_power_of_2(c), 64 if on_gpu else 256)
        block_r = min(next_power_of_2(n * hw), max(1, tile // block_c))
        n_tiles = cdiv(n * hw, block_r)
    c_blocks = cdiv(c, block_c)
    target = 4 * sm_count(device) if on_gpu else 2
    splits = max(1, min(cdiv(target, c_blocks), n_tiles))
    per_split = cdiv(n_tiles, splits)
    splits = cdiv(n_tiles, per_split)
    return block_r, block_c, splits, per_split, 8 if on_gpu else 1


def partial_block(parts: int, block_c: int) -> int:
    """Rows of partial results a finishing program reads at once (tiles of <= 4096 values)."""
    return max(1, min(next_power_of_2(parts), 4096 // block_c))


@triton.jit
def rsqrt_rn(x):
    """1 / sqrt(x), the square root correctly rounded (as eager's) in fp32 and fp64."""
    # Both branches in if/else: Triton compiles statements after an early return too (sqrt_rn takes fp32 only).
    if x.dtype == tl.float64:
        r = 1.0 / tl.sqrt(x)
    else:
        r = 1.0 / tl.sqrt_rn(x)
    return r


# --- 2-D tiles over a dense output (batch norm's elementwise passes) --------
# The output is [ROWS, COLS] in memory: channels_last is [N*HW, C], NCHW is
# [N*C, HW]. Per-channel values are then one vector per tile (along the
# columns, or one per row), and the 1-bit mask has whole bytes per row: bit
# (row, col) is byte row * ceil(COLS / 8) + col // 8, bit col % 8.


def tile_settings(rows: int, cols: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps) of a 2-D elementwise tile: about 2048 elements on a GPU."""
    if not compiled(device):
        block_k = max(8, min(next_power_of_2(cols), 4096))
        return max(1, min(next_power_of_2(rows), (1 << 16) // block_k)), block_k, 1
    block_k = max(8, min(next_power_of_2(cols), 128))  # 256 bytes of bf16 per row; one binary for every COLS > 64
    return max(1, 2048 // block_k), block_k, 8


def row_bytes(cols: int) -> int:
    """Bytes of mask per row of COLS elements."""
    return (cols + 7) // 8


@triton.jit
def tile_2d(ROWS, COLS, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's tile: (rows, column block, cols, row valid, col valid, both)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    pid_k = tl.program_id(1)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < ROWS
    col_ok = cols < COLS
    return rows, pid_k, cols, row_ok, col_ok, row_ok[:, None] & col_ok[None, :]


@triton.jit
def pack_mask_2d(mask_ptr, keep, rows, col_byte0, ROW_BYTES, row_ok, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Store ``keep`` ([BLOCK_M, BLOCK_K] int32 0/1) as bits of rows ``rows`` from byte ``col_byte0`` on."""
    bits = tl.reshape(keep, [BLOCK_M, BLOCK_K // 8, 8])
    packed = tl.sum(bits << tl.arange(0, 8)[None, None, :], axis=2)
    byte = col_byte0 + tl.arange(0, BLOCK_K // 8)
    ok = row_ok[:, None] & (byte < ROW_BYTES)[None, :]
    tl.store(mask_ptr + rows[:, None] * ROW_BYTES + byte[None, :], packed.to(tl.uint8), mask=ok)


@triton.jit
def unpack_mask_2d(mask_ptr, rows, col_byte0, ROW_BYTES, row_ok, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [BLOCK_M, BLOCK_K] bits written by ``pack_mask_2d``, as booleans (one byte load per 8)."""
    byte = col_byte0 + tl.arange(0, BLOCK_K // 8)
    ok = row_ok[:, None] & (byte < ROW_BYTES)[None, :]
    packed = tl.load(mask_ptr + rows[:, None] * ROW_BYTES + byte[None, :], mask=ok, other=0)
    bits = (packed.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    return tl.reshape(bits, [BLOCK_M, BLOCK_K]) != 0


@triton.jit
def tile_offsets(rows, cols, C, HW, s_n, s_c, s_hw, C_LAST: tl.constexpr):
    """Memory offsets of tile (rows, cols) in a strided [N, C, HW] tensor (rows/cols as in the output)."""
    if C_LAST:  # rows are n * HW + hw, cols are channels
        off = ((rows // HW) * s_n + (rows % HW) * s_hw)[:, None] + cols[None, :] * s_c
    else:  # rows are n * C + c, cols are hw
        off = ((rows // C) * s_n + (rows % C) * s_c)[:, None] + cols[None, :] * s_hw
    return off
