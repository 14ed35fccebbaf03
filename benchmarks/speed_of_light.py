"""Speed-of-light model of each fused kernel launch on an H100 SXM and an H200: an ESTIMATE, not a measurement.

A launch is a compiled binary at one problem shape, its arguments by name as
the stand-in device records them (``stub_gpu.Launch.args``: tensors as
shape/stride/dtype). Per launch the model counts the work nothing can avoid:

- DRAM: compulsory bytes, each tensor read or written once (the BN partial
  sums written and read back once; not wgrad's split-K partial tiles, which
  the last programs of each group of splits, then of the groups, read back from L2
  within the launch);
- tensor cores: the implicit GEMM's MMA FLOPs, executed as whole tiles;
- shared memory: per K step and CTA the A and B tiles, written once (cp.async)
  and read once (the MMA), plus one more write and read of the operand the
  BN-ReLU prologue computes where it goes shared -> registers -> shared (the
  report reads that off the SASS: ``round_trip``);
- instruction issue: the main loop's SASS instructions per iteration (the
  report counts them), for every warp and iteration of the launch, at one
  warp-instruction per clock on each of an SM's 4 schedulers. This is where
  a BN-ReLU prologue costs: about 8 instructions per A element, which an
  output-channel block of 32 (a DenseNet 3x3) amortises over only 32 MACs;

and turns each into a time at the chip's peak rate. Every resident CTA is taken
to get an equal share of each resource, so a last wave that is partly empty
stretches every limit: wave quantization, ``programs / (CTAs per SM * SMs)``
rounded up. The estimate is the largest time (the binding limit). Its share of
peak is the kernel class's resource time over the estimate: FLOP time at the
dot's peak for 3x3 convolutions, DRAM byte time for 1x1 convolutions and the
batch-norm / merge kernels (and the unfused conv candidate's BN-ReLU and dgrad
epilogue). Latency, dependency stalls, L2 and uneven programs are left out: a
real kernel takes longer than its estimate.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm: float  # DRAM bytes/s
    sms: int = 132
    clock: float = 1.98e9  # boost clock, Hz
    smem_per_clock: int = 128  # shared-memory bytes per clock per SM
    regs: int = 65536  # per SM
    smem: int = 228 * 1024  # per SM
    max_ctas: int = 32
    max_warps: int = 64


H100 = Chip("H100 SXM", 3.35e12)
H200 = Chip("H200", 4.8e12)  # the same GH100 compute, faster HBM
CHIPS = (H100, H200)
# Dense peaks (the same on both): bf16/fp16 and TF32 wgmma, fp32 and fp64 without tensor cores' help.
PEAK_FLOPS = {"bf16": 990e12, "tf32": 495e12, "fp32": 67e12, "fp64": 67e12}
TARGETS = {"3x3": 0.6, "1x1": 0.8, "memory": 0.8}  # share of peak: bf16 convolutions, every BN / merge kernel
SMEM_RESERVED = 1024  # the driver keeps 1 KB of shared memory per CTA on sm_90
ISSUE_PER_CLOCK = 4  # warp-instructions per clock per SM: one per scheduler


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def smem_rate(chip: Chip = H100) -> float:
    return chip.smem_per_clock * chip.clock * chip.sms


def ctas_per_sm(regs: int, warps: int, smem: int, chip: Chip = H100) -> tuple[int, str]:
    """(CTAs resident per SM, the limit that decides it), as the CUDA occupancy calculator counts.

    Registers go to warps in units of 256, and each of the 4 sub-partitions holds whole warps;
    ``smem`` is the CTA's shared memory (dynamic and static) before the driver's reserve.
    """
    per_warp = cdiv(max(regs, 1) * 32, 256) * 256
    limits = {
        "regs": (chip.regs // 4 // per_warp) * 4 // warps,
        "smem": chip.smem // (cdiv(smem + SMEM_RESERVED, 128) * 128),
        "CTAs": chip.max_ctas,
        "warps": chip.max_warps // warps,
    }
    limit = min(limits, key=limits.get)
    return limits[limit], limit


@dataclasses.dataclass
class Work:
    """What a launch must move and compute."""
    problem: str
    kind: str  # "3x3" (a convolution with taps), "1x1", "memory" (BN and merge kernels)
    dram: int  # bytes
    flops: int = 0  # the problem's 2*M*N*K
    mma_flops: int = 0  # as executed: whole tiles
    dot: str | None = None  # key of PEAK_FLOPS
    smem_step: int = 0  # shared-memory bytes per K step per CTA
    smem: int = 0  # over the launch
    iterations: int = 0  # main-loop iterations (K steps) over the launch, every program's


def _bytes(a: dict, name: str, numel: int) -> int:
    """Bytes of ``numel`` elements of tensor argument ``name``; 0 when it is None (not read or written)."""
    t = a.get(name)
    return 0 if t is None else numel * t.dtype.itemsize


def _itemsize(a: dict, name: str) -> int:
    return a[name].dtype.itemsize


def _dot(a: dict, operand: str) -> str:
    dtype = a[operand].dtype
    if dtype.itemsize == 2:
        return "bf16"
    if dtype.itemsize == 8:
        return "fp64"
    return "tf32" if a.get("PRECISION") == "tf32" else "fp32"


def _name(a: dict, name: str) -> str:
    dtype = str(a[name].dtype).removeprefix("torch.")
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}.get(dtype, dtype)


def _layout(strides) -> str:
    return "cl" if strides[1] == 1 else "nchw"


def _touched(h: int, oh: int, kh: int, sh: int, ph: int) -> int:
    """Input rows (or columns) a convolution reads: a strided 1x1 skips some."""
    return len({o * sh - ph + k for o in range(oh) for k in range(kh)} & set(range(h)))


def _x_elements(a: dict) -> int:
    """Elements of x read: only the pixels a tap reaches where channels are contiguous (whole pixels skipped)."""
    n, c, h, w = a["N"], a["C"], a["H"], a["W"]
    if a["xs_c"] != 1:
        return n * c * h * w  # NCHW: a skipped column shares its sectors with the columns read
    return n * c * _touched(h, a["OH"], a["KH"], a["SH"], a["PH"]) * _touched(w, a["OW"], a["KW"], a["SW"], a["PW"])


def _bn_vectors(a: dict, c: int) -> int:
    """The per-channel statistics and BN parameters the conv kernels read."""
    return _bytes(a, "stats_ptr", 2 * c + 1) + _bytes(a, "bnw_ptr", c) + _bytes(a, "bnb_ptr", c)


def _conv_problem(a, x_name, w_strides) -> str:
    n, c, h, w, co = a["N"], a["C"], a["H"], a["W"], a["CO"]
    return (f"{n}x{c}x{h}x{w}->{co} {a['KH']}x{a['KW']}/{a['SH']} {_name(a, x_name)} "
            f"x:{_layout(a[x_name].stride)} w:{_layout(w_strides)}")


def conv_forward(a: dict, grid, round_trip: bool) -> Work:
    n, c, co, oh, ow, kh, kw = (a[k] for k in ("N", "C", "CO", "OH", "OW", "KH", "KW"))
    bm, bn, bk = a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_K"]
    m, k = n * oh * ow, c * kh * kw
    dram = (_bytes(a, "x_ptr", _x_elements(a)) + _bytes(a, "w_ptr", co * k) + _bytes(a, "y_ptr", m * co)
            + _bytes(a, "bias_ptr", co) + _bn_vectors(a, c))
    steps = kh * kw * cdiv(c, bk)  # per program
    programs = grid[0] * grid[1] * grid[2]
    xs, ws = _itemsize(a, "x_ptr"), _itemsize(a, "w_ptr")
    step = 2 * (bm * bk * xs + bk * bn * ws) + (2 * bm * bk * ws if round_trip else 0)
    return Work(_conv_problem(a, "x_ptr", (a["ws_o"], a["ws_c"], a["ws_h"], a["ws_w"])),
                "3x3" if kh * kw > 1 else "1x1", dram, 2 * m * co * k, 2 * bm * bn * bk * steps * programs,
                _dot(a, "w_ptr"), step, step * steps * programs, steps * programs)


def conv_dgrad(a: dict, grid, round_trip: bool) -> Work:
    """Sub-pixel phases: each runs only the taps that reach it (no round trip: no prologue)."""
    n, c, h, w, co, oh, ow, kh, kw = (a[k] for k in ("N", "C", "H", "W", "CO", "OH", "OW", "KH", "KW"))
    sh, sw, ph, pw = a["SH"], a["SW"], a["PH"], a["PW"]
    bm, bn, bk = a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_K"]
    taps_h = [cdiv(kh - (p + ph) % sh, sh) for p in range(sh)]  # taps per row phase
    taps_w = [cdiv(kw - (p + pw) % sw, sw) for p in range(sw)]
    rows_h = [cdiv(h - p, sh) for p in range(sh)]  # input rows per phase
    rows_w = [cdiv(w - p, sw) for p in range(sw)]
    tap_rows = sum(r * t for r, t in zip(rows_h, taps_h)) * sum(r * t for r, t in zip(rows_w, taps_w))
    steps = sum(th * tw for th in taps_h for tw in taps_w) * cdiv(co, bk)  # per (row block, channel block)
    tiles = grid[0] * grid[1]
    parts = grid[0] * grid[2]  # partial-sum rows, written then read back (and group sums, where grouped)
    parts += cdiv(parts, a["GROUP_ROWS"]) if a.get("GROUP_ROWS") else 0
    sums = 2 * _bytes(a, "partial_ptr", 2 * parts * c)
    epilogue = (_bytes(a, "x_ptr", n * c * h * w) + _bytes(a, "g_ptr", n * c * h * w) + sums + _bn_vectors(a, c)
                + _bytes(a, "sums_ptr", 2 * c) + _bytes(a, "dbnw_ptr", c) + _bytes(a, "dbnb_ptr", c))
    if a.get("da_ptr") is not None:  # the unfused candidate: the epilogue alone on torch's da, no GEMM
        return Work(f"{n}x{c}x{h}x{w} {_name(a, 'x_ptr')} epilogue", "memory",
                    _bytes(a, "da_ptr", n * c * h * w) + epilogue)
    dram = _bytes(a, "dy_ptr", n * co * oh * ow) + _bytes(a, "w_ptr", co * c * kh * kw) + epilogue
    ws = _itemsize(a, "w_ptr")
    step = 2 * (bm * bk * _itemsize(a, "dy_ptr") + bk * bn * ws)
    return Work(_conv_problem(a, "x_ptr", (a["ws_o"], a["ws_c"], a["ws_h"], a["ws_w"])),
                "3x3" if kh * kw > 1 else "1x1", dram, 2 * n * tap_rows * c * co,
                2 * bm * bn * bk * steps * tiles, _dot(a, "w_ptr"), step, step * steps * tiles, steps * tiles)


def conv_wgrad(a: dict, grid, round_trip: bool) -> Work:
    """dw^T = a^T @ dy per tap: M = input channels (BLOCK_N), N = output channels (BLOCK_M), K = output positions
    (split over grid[1])."""
    n, c, co, oh, ow, kh, kw = (a[k] for k in ("N", "C", "CO", "OH", "OW", "KH", "KW"))
    bm, bn, bk = a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_K"]
    m = n * oh * ow
    tiles = grid[0]  # grid[1] splits K
    dram = (_bytes(a, "dy_ptr", m * co) + _bytes(a, "x_ptr", _x_elements(a)) + _bytes(a, "dw_ptr", co * c * kh * kw)
            + _bn_vectors(a, c))
    steps = tiles * cdiv(m, bk)  # over the launch, whatever the split
    ys, xs = _itemsize(a, "dy_ptr"), _itemsize(a, "x_ptr")
    step = 2 * (bm * bk * ys + bk * bn * xs) + (2 * bk * bn * ys if round_trip else 0)
    return Work(_conv_problem(a, "x_ptr", (a["dws_o"], a["dws_c"], a["dws_h"], a["dws_w"])),
                "3x3" if kh * kw > 1 else "1x1", dram, 2 * m * co * c * kh * kw, 2 * bm * bn * bk * steps,
                _dot(a, "dy_ptr"), step, step * steps, steps)


def bn_relu(a: dict, grid, round_trip: bool) -> Work:
    """The unfused candidate's activation a = relu(bn(x)), written out for torch's convolution."""
    e = a["N"] * a["C"] * a["H"] * a["W"]
    dram = _bytes(a, "x_ptr", e) + _bytes(a, "a_ptr", e) + _bn_vectors(a, a["C"])
    return Work(f"{a['N']}x{a['C']}x{a['H']}x{a['W']} {_name(a, 'x_ptr')}", "memory", dram)


def _running(a: dict, c: int) -> int:
    return 2 * (_bytes(a, "running_mean_ptr", c) + _bytes(a, "running_var_ptr", c))  # read and written


def bn_stats(a: dict, grid, round_trip: bool) -> Work:
    n, c, hw = a["N"], a["C"], a["HW"]
    splits = a.get("splits", grid[1])
    partial = 2 * _bytes(a, "partial_ptr", splits * (2 * c + grid[0]))
    dram = _bytes(a, "x_ptr", n * c * hw) + partial + _bytes(a, "stats_ptr", 2 * c + 1) + _running(a, c)
    return Work(f"{n}x{c}x{hw} {_name(a, 'x_ptr')}", "memory", dram)


def _mask(rows: int, cols: int) -> int:
    return rows * cdiv(cols, 8)  # 1 bit per element, whole bytes per row


def bn_apply(a: dict, grid, round_trip: bool) -> Work:
    rows, cols, c = a["ROWS"], a["COLS"], a["C"]
    e = rows * cols
    dram = (_bytes(a, "x_ptr", e) + _bytes(a, "r_ptr", e) + _bytes(a, "z_ptr", e)
            + (_mask(rows, cols) if a.get("mask_ptr") is not None else 0)
            + sum(_bytes(a, p, c) for p in ("mean_ptr", "rstd_ptr", "w_ptr", "b_ptr")) + _bytes(a, "stats_ptr", 2 * c))
    return Work(f"{rows}x{cols} {_name(a, 'x_ptr')}", "memory", dram)


def bn_reduce(a: dict, grid, round_trip: bool) -> Work:
    n, c, hw = a["N"], a["C"], a["HW"]
    splits = a.get("splits", grid[1])
    dram = (_bytes(a, "dz_ptr", n * c * hw) + _bytes(a, "x_ptr", n * c * hw)
            + n * a["z_sn"] // 8  # the mask: its strides count bits
            + 2 * _bytes(a, "partial_ptr", 2 * splits * c) + _bytes(a, "sums_ptr", 2 * c)
            + _bytes(a, "stats_ptr", 2 * c + 1) + _bytes(a, "dw_ptr", c) + _bytes(a, "db_ptr", c))
    return Work(f"{n}x{c}x{hw} {_name(a, 'x_ptr')}", "memory", dram)


def bn_elementwise(a: dict, grid, round_trip: bool) -> Work:
    rows, cols, c = a["ROWS"], a["COLS"], a["C"]
    e = rows * cols
    train = a.get("sums_ptr") is not None and a.get("dx_ptr") is not None  # x is read for the batch terms
    dram = (_bytes(a, "dz_ptr", e) + (_mask(rows, cols) if a.get("mask_ptr") is not None else 0)
            + (_bytes(a, "x_ptr", e) if train else 0) + _bytes(a, "dr_ptr", e)
            + _bytes(a, "dx_ptr", e) * (2 if a.get("ACCUMULATE") else 1)
            + _bytes(a, "stats_ptr", 2 * c + 1) + _bytes(a, "w_ptr", c) + _bytes(a, "sums_ptr", 2 * c))
    return Work(f"{rows}x{cols} {_name(a, 'dz_ptr')}", "memory", dram)


def bn_finish(a: dict, grid, round_trip: bool) -> Work:
    c = a["C"]
    dram = (_bytes(a, "mean_ptr", c) + _bytes(a, "m2_ptr", c) + _bytes(a, "count_ptr", 1)
            + _bytes(a, "stats_ptr", 2 * c + 1) + _running(a, c))
    return Work(f"C={c}", "memory", dram)


def bn_eval_stats(a: dict, grid, round_trip: bool) -> Work:
    c = a["C"]
    dram = _bytes(a, "running_mean_ptr", c) + _bytes(a, "running_var_ptr", c) + _bytes(a, "stats_ptr", 2 * c + 1)
    return Work(f"C={c}", "memory", dram)


def add_relu_fwd(a: dict, grid, round_trip: bool) -> Work:
    e = a["n_elements"]
    dram = (_bytes(a, "x_ptr", e) + _bytes(a, "r_ptr", e) + _bytes(a, "z_ptr", e)
            + (cdiv(e, 8) if a.get("mask_ptr") is not None else 0))
    return Work(f"{e} {_name(a, 'x_ptr')}", "memory", dram)


def add_relu_bwd(a: dict, grid, round_trip: bool) -> Work:
    e = a["n_elements"]
    dram = _bytes(a, "dz_ptr", e) + cdiv(e, 8) + _bytes(a, "dx_ptr", e)
    return Work(f"{e} {_name(a, 'dz_ptr')}", "memory", dram)


WORK = {
    "bn_relu_conv_fwd_kernel": conv_forward, "bn_relu_conv_dgrad_kernel": conv_dgrad, "bn_relu_conv_wgrad_kernel": conv_wgrad,
    "bn_relu_kernel": bn_relu,
    "batch_norm_stats_kernel": bn_stats, "batch_norm_relu_fwd_kernel": bn_apply, "batch_norm_relu_bwd_sums_kernel": bn_reduce,
    "batch_norm_relu_bwd_dx_kernel": bn_elementwise, "batch_norm_finish_kernel": bn_finish,
    "batch_norm_eval_stats_kernel": bn_eval_stats,
    "add_relu_fwd_kernel": add_relu_fwd, "add_relu_bwd_kernel": add_relu_bwd,
}
PROLOGUE = {"bn_relu_conv_fwd_kernel", "bn_relu_conv_wgrad_kernel"}  # BN-ReLU computed on an MMA operand in the main loop


def estimate(kernel: str, args: dict, grid, regs: int, warps: int, smem: int, round_trip: bool = True,
             instructions: int = 0) -> dict | None:
    """The model's numbers for one launch (times in seconds); None for a kernel it does not know.

    ``smem``: the CTA's shared memory in bytes; ``round_trip``: the prologue's operand goes
    shared -> registers -> shared (only counted for the kernels with a prologue);
    ``instructions``: SASS instructions per main-loop iteration and warp (0: issue not counted).
    """
    if kernel not in WORK:
        return None
    work = WORK[kernel](args, grid, round_trip and kernel in PROLOGUE)
    programs = grid[0] * grid[1] * grid[2]
    ctas, occupancy = ctas_per_sm(regs, warps, smem)
    waves = cdiv(programs, ctas * H100.sms)
    fill = programs / (waves * ctas * H100.sms)  # the busy share of the CTA slots over all waves
    t_mma = work.mma_flops / PEAK_FLOPS[work.dot] / fill if work.dot else 0.0
    t_smem = work.smem / smem_rate() / fill
    t_issue = instructions * warps * work.iterations / (ISSUE_PER_CLOCK * H100.clock * H100.sms) / fill
    out = {**dataclasses.asdict(work), "programs": programs, "ctas_per_sm": ctas, "occupancy_limit": occupancy,
           "waves": waves, "wave_fill": fill, "t_mma": t_mma, "t_smem": t_smem, "t_issue": t_issue}
    target = TARGETS[work.kind] if work.kind == "memory" or work.dot == "bf16" else None
    out["target"] = target
    for chip in CHIPS:
        key = chip.name.split()[0].lower()
        times = {"DRAM": work.dram / chip.hbm / fill, "MMA": t_mma, "smem": t_smem, "issue": t_issue}
        bound = max(times, key=times.get)
        t = times[bound]
        ideal = work.flops / PEAK_FLOPS[work.dot] if work.kind == "3x3" else work.dram / chip.hbm
        share = ideal / t if t > 0 else None
        out[key] = {"t_dram": times["DRAM"], "estimate": t, "bound": bound, "share": share,
                    "met": None if target is None or share is None else share >= target}
    return out


def fmt_us(t: float) -> str:
    return f"{t * 1e6:.1f}" if t >= 1e-5 else f"{t * 1e6:.2f}"
