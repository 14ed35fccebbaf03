"""Static report of every fused kernel as compiled for an H100 (sm_90), without a GPU.

    python -m benchmarks.kernel_report [--shapes resnet50|small] [--json PATH] [--md PATH]

The fused ops run at the given shapes through the stand-in device
(``benchmarks/stub_gpu.py``): Triton compiles each kernel variant they launch
with its real backend, and the launches (grids) are recorded. For every
distinct binary: registers, spills and shared memory (``cuobjdump -res-usage``),
the share of global loads and stores that move 128 bits, and the main loop's
bytes moved per warp-instruction, read off the SASS (``cuobjdump -sass``): the
first loop that loads from global memory, or the whole kernel where there is
no loop; in that loop, the global loads narrower than 128 bits (a scalar path)
and the cp.async copies (LDGSTS) by width.

A second table is the speed-of-light model (``benchmarks/speed_of_light.py``)
of every launch, a binary at one problem shape read off its recorded
arguments: compulsory DRAM bytes, MMA FLOPs, shared-memory tile traffic,
occupancy and waves, the time each implies on an H100 SXM and an H200, the
binding limit and the share of peak against the targets. An estimate, not a
measurement.

``--shapes resnet50``: ResNet-50's batch norms and residual merges at batch
64, float32 and bfloat16, NCHW and channels_last, and the fused convolutions
at ``CONV_SHAPES`` (the conv weight in both layouts). ``small``: the same
kernel variants at small shapes (what the unit test compiles).
"""

import argparse
import collections
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("benchmarks.kernel_report compiles kernels for sm_90: unset TRITON_INTERPRET")

from . import speed_of_light, stub_gpu  # noqa: E402
from .sass import sass_stats as _sass_stats  # noqa: E402

RESNET50 = [(64, 56), (256, 56), (128, 28), (512, 28), (256, 14), (1024, 14), (512, 7), (2048, 7)]
SMALL = [(64, 8), (48, 7)]


def _tools() -> tuple[str, str]:
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return os.path.join(bin_dir, "cuobjdump"), bin_dir


def _run_ops(shapes: list[tuple[int, int]], batch: int) -> None:
    """Every fused op's training forward + backward (and eval forward) at these shapes."""
    from fastres.functional import add_relu, batch_norm_relu

    for dtype in (torch.float32, torch.bfloat16):
        for fmt in (torch.contiguous_format, torch.channels_last):
            for c, hw in shapes:
                shape = (batch, c, hw, hw)
                x = torch.empty(shape, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
                r = torch.empty(shape, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
                grad = torch.empty(shape, dtype=dtype).contiguous(memory_format=fmt)
                w, b = torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)
                rm, rv = torch.zeros(c), torch.ones(c)
                for residual in (None, r):
                    batch_norm_relu(x, rm, rv, w, b, True, 0.1, 1e-5, residual).backward(grad)
                    with torch.no_grad():
                        batch_norm_relu(x, rm, rv, w, b, False, 0.1, 1e-5, residual)
                add_relu(x, r).backward(grad)
                del x, r, grad
    _run_conv_ops(batch, CONV_SHAPES if batch > 2 else CONV_SHAPES_SMALL)


# (C_in, C_out, kernel, stride, spatial): DenseNet layers and transitions, a pre-activation downsample.
CONV_SHAPES = [(128, 128, 1, 1, 14), (128, 32, 3, 1, 14), (256, 128, 1, 2, 14), (64, 64, 3, 2, 14)]
# The unit test's share: a 1x1 and a strided 3x3 (the latter has every code path of the kernels).
CONV_SHAPES_SMALL = [(128, 128, 1, 1, 14), (128, 128, 3, 2, 14)]  # 128 channels: every config at full size
# The conv weight's layouts: torchvision's default OIHW and channels_last (what a channels_last model holds).
WEIGHT_LAYOUTS = (torch.contiguous_format, torch.channels_last)
# (dtype, TF32, layout, every config, only the strided 3x3 of the small shapes), each in both weight layouts
CONV_VARIANTS = [
    (torch.bfloat16, False, torch.channels_last, True, False),  # the wide configs
    (torch.bfloat16, False, torch.contiguous_format, True, True),  # the narrow ones
    (torch.float32, True, torch.channels_last, False, True),
    (torch.float32, False, torch.contiguous_format, False, True),
    (torch.float64, False, torch.contiguous_format, False, True),
]


def _run_conv_ops(batch: int, shapes: list[tuple]) -> None:
    """The fused BN-ReLU-Conv's training forward + backward and eval forward, for each of ``CONV_VARIANTS``.

    Where a variant says so, each config the GPU autotuner may pick is
    compiled, not only the first.
    """
    from fastres.functional import bn_relu_conv2d
    from fastres.ops import kernels

    conv = kernels("bn_relu_conv")
    choose = conv.choose
    every = [False]

    def every_config(kind, key, candidates, run, *_, **__):
        if every[0]:
            for config in candidates[1:]:
                run(config)
        return candidates[0]

    conv.choose = every_config
    try:
        for dtype, tf32, fmt, all_configs, strided_only in CONV_VARIANTS:
            torch.backends.cudnn.allow_tf32 = tf32
            for (cin, cout, k, stride, hw), w_fmt in itertools.product(shapes, WEIGHT_LAYOUTS):
                if strided_only and shapes is CONV_SHAPES_SMALL and k == 1:
                    continue
                x = torch.empty(batch, cin, hw, hw, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
                cw = torch.empty(cout, cin, k, k, dtype=dtype).contiguous(memory_format=w_fmt).requires_grad_()
                w, b = torch.ones(cin, requires_grad=True), torch.zeros(cin, requires_grad=True)
                if dtype == torch.float64:
                    w, b = (t.detach().double().requires_grad_() for t in (w, b))
                rm, rv = torch.zeros(cin, dtype=w.dtype), torch.ones(cin, dtype=w.dtype)
                every[0] = all_configs
                y = bn_relu_conv2d(x, rm, rv, w, b, cw, None, stride, k // 2, training=True)
                y.backward(torch.empty_like(y))
                every[0] = False
                with torch.no_grad():
                    bn_relu_conv2d(x, rm, rv, w, b, cw, None, stride, k // 2, training=False)
    finally:
        conv.choose = choose
        torch.backends.cudnn.allow_tf32 = True
    _run_dense_block(batch)


def _run_dense_block(batch: int) -> None:
    """A dense block on the fused kernels (statistics finished from the per-channel cache, dx accumulated)."""
    import fastres

    block = fastres.nn.DenseBlock(2, 64, 4, 32).to(memory_format=torch.channels_last)
    x = torch.empty(batch, 64, 14, 14).contiguous(memory_format=torch.channels_last).requires_grad_()
    block(x).backward(torch.empty(batch, 128, 14, 14).contiguous(memory_format=torch.channels_last))


def _res_usage(cuobjdump: str, cubin_path: str) -> dict:
    out = subprocess.run([cuobjdump, "-res-usage", cubin_path], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return {"registers": int(m.group(1)), "stack": int(m.group(2)), "shared": int(m.group(3)),
            "spill_bytes": int(m.group(4))}


def triton_kernels(shapes: list[tuple[int, int]], batch: int) -> list[dict]:
    cuobjdump, _ = _tools()
    torch.manual_seed(0)
    with stub_gpu.install() as rec:
        rec.clear()
        rec.keep = True
        _run_ops(shapes, batch)
        launches = list(rec.launches)
    by_hash: dict = collections.OrderedDict()
    grids: dict = collections.defaultdict(list)
    problems: dict = collections.defaultdict(dict)  # hash -> {(grid, args): [grid, args, launches]}
    for launch in launches:
        k = launch.kernel
        if k is None:
            continue
        by_hash.setdefault(k.hash, k)
        grids[k.hash].append(launch.grid[0] * launch.grid[1] * launch.grid[2])
        problems[k.hash].setdefault((launch.grid, repr(launch.args)), [launch.grid, launch.args, 0])[2] += 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for h, k in by_hash.items():
            path = os.path.join(tmp, f"{h}.cubin")
            with open(path, "wb") as f:
                f.write(k.asm["cubin"])
            sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
            names = k.src.fn.arg_names
            constants = {
                (names[key[0]] if isinstance(key, tuple) else names[key] if isinstance(key, int) else str(key)): v
                for key, v in getattr(k.src, "constants", {}).items()
            }
            aligned_args = sorted(
                names[key[0]] for key, attrs in getattr(k.src, "attrs", {}).items()
                if any(a[0] == "tt.divisibility" and a[1] >= 16 for a in attrs) and not names[key[0]].endswith("_ptr")
            )
            signature = getattr(k.src, "signature", {}) or {}
            pointers = {a: str(t).lstrip("*") for a, t in signature.items() if str(t).startswith("*")}
            row = {"kernel": k.name, "hash": h[:12], "num_warps": k.metadata.num_warps,
                   "pointer_dtypes": pointers,
                   "divisible_by_16": aligned_args,
                   "constexprs": {a: (v if isinstance(v, (bool, int, float)) else str(v)) for a, v in constants.items()
                                  if v is not None and not a.endswith("_ptr")},
                   "programs": sorted(set(grids[h])), "num_stages": k.metadata.num_stages,
                   "dynamic_shared": k.metadata.shared, **_res_usage(cuobjdump, path), **_sass_stats(sass)}
            row["speed_of_light"] = [_speed_of_light(row, grid, args, n) for grid, args, n in problems[h].values()]
            rows.append(row)
    return rows


def _speed_of_light(row: dict, grid: tuple, args: dict, launches: int) -> dict:
    """The model's estimate for one launch of this binary (``speed_of_light.estimate``), or why there is none."""
    # cuobjdump's SHARED is the 1 KB the driver reserves per CTA (where shared memory is used): the model adds it.
    smem = row["dynamic_shared"] + max(0, row["shared"] - speed_of_light.SMEM_RESERVED)
    round_trip = row["main_lds"] > 0 and row["main_sts"] > 0
    out = {"grid": list(grid), "launches": launches, "round_trip": round_trip}
    try:
        out.update(speed_of_light.estimate(row["kernel"], args, grid, row["registers"], row["num_warps"], smem,
                                           round_trip, row["main_live_instructions"] if row["main"] == "loop" else 0)
                   or {"error": "no model for this kernel"})
    except (KeyError, AttributeError) as e:  # a parameter the model reads was renamed or removed
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def markdown(triton_rows: list[dict]) -> str:
    lines = [
        "| Triton kernel | key constexprs | warps | regs | spills | smem | 128-bit share | main | instr | B/warp-instr "
        "| narrow LDG (main) | LDGSTS (main) | HGMMA/HMMA | programs (132 SMs) |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|---|---:|---|",
    ]
    shown = ("BLOCK", "BLOCK_R", "BLOCK_C", "PER_N", "C_LAST", "X_DENSE", "Z_DENSE", "DZ_DENSE", "FROM_VAR", "LOCAL",
             "KH", "SH", "DX_DIRECT", "PRECISION", "BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLITS", "SPLIT")
    for r in triton_rows:
        cx = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items() if k in shown)
        share = "-" if r["share_128bit"] is None else f"{r['share_128bit']:.0%}"
        progs = r["programs"]
        progs_s = f"{progs[0]}" if len(progs) == 1 else f"{progs[0]}-{progs[-1]}"
        lines.append(
            f"| {r['kernel']} | {cx} | {r['num_warps']} | {r['registers']} | {r['spill_bytes']} | {r['shared']} | "
            f"{share} | {r['main']} | {r['main_instructions']} | {r['bytes_per_warp_instruction']:.1f} | "
            f"{_widths(r['main_ldg_narrow'])} | {_widths(r['main_ldgsts'])} | {r['hgmma']}/{r['hmma']} | {progs_s} |"
        )
    return "\n".join(lines)


def _widths(counts: dict) -> str:
    return ", ".join(f"{n}x{bits}b" for bits, n in counts.items()) or "0"


_ORDER = {"bn_relu_conv_fwd_kernel": 0, "bn_relu_conv_dgrad_kernel": 1, "bn_relu_conv_wgrad_kernel": 2}  # then the rest, as launched


def _both(s: dict, f) -> str:
    """``f`` of the H100 and the H200 columns of an estimate, once where they agree."""
    a, b = f(s["h100"]), f(s["h200"])
    return a if a == b else f"{a}/{b}"


def sol_markdown(triton_rows: list[dict]) -> str:
    """The speed-of-light table: one row per launch (a binary at a problem), convolutions first."""
    lines = [
        "## Speed of light (estimate)",
        "",
        "An ESTIMATE from a model (`benchmarks/speed_of_light.py`), not a measurement: compulsory DRAM bytes, the "
        "MMA FLOPs of whole tiles and the shared-memory tile traffic, each at H100 SXM / H200 peaks (HBM 3.35 / "
        "4.8 TB/s; bf16 990, TF32 495, fp32 67 TFLOP/s; shared memory 128 B/clk/SM at 1.98 GHz x 132 SMs) and "
        "and the main loop's SASS instructions at 4 warp-instructions per clock per SM (issue), "
        "stretched by wave quantization; the estimate is the largest (the bound). Share of peak: FLOP time / "
        "estimate for 3x3 convolutions, DRAM time / estimate for 1x1 convolutions and BN / merge kernels. Targets: "
        "bf16 3x3 >= 60%, bf16 1x1 and every BN / merge kernel >= 80%. rt: the prologue's tile goes shared -> "
        "registers -> shared (read off the SASS), counted in smem/step; dx: an eval dgrad writing dx itself.",
        "",
        "| kernel | problem | config | regs | CTAs/SM | programs (waves, fill) | DRAM MB | GFLOP | smem/step KB "
        "| DRAM us H100/H200 | MMA us | smem us | issue us | estimate us H100/H200 | bound | share of peak H100/H200 "
        "| target |",
        "|---|---|---|---:|---|---|---:|---:|---:|---|---:|---:|---:|---|---|---|---|",
    ]
    us = speed_of_light.fmt_us
    flat = [(r, s) for r in triton_rows for s in r["speed_of_light"]]
    flat.sort(key=lambda rs: (_ORDER.get(rs[0]["kernel"], 9), rs[1].get("problem", "") * (rs[0]["kernel"] in _ORDER)))
    for r, s in flat:
        if "error" in s:
            lines.append(f"| {r['kernel']} | model: {s['error']} |" + " |" * 15)
            continue
        blocks = "x".join(str(v) for k, v in r["constexprs"].items() if k.startswith("BLOCK") and k != "BLOCK_P")
        config = f"{blocks} w{r['num_warps']}"
        if s["dot"]:
            config += f" s{r['num_stages']} {s['dot']}" + (" rt" if s["round_trip"] else "")
            config += " dx" if r["constexprs"].get("DX_DIRECT") else ""
        share = _both(s, lambda c: "-" if c["share"] is None else f"{c['share']:.0%}")
        met = _both(s, lambda c: "met" if c["met"] else "MISSED")
        target = "-" if s["target"] is None else f"{s['target']:.0%}: {met}"
        lines.append(
            f"| {r['kernel']} | {s['problem']} | {config} | {r['registers']} | "
            f"{s['ctas_per_sm']} ({s['occupancy_limit']}) | {s['programs']} ({s['waves']}, {s['wave_fill']:.0%}) | "
            f"{s['dram'] / 1e6:.2f} | {s['flops'] / 1e9:.2f} | {s['smem_step'] / 1024:.0f} | "
            f"{_both(s, lambda c: us(c['t_dram']))} | {us(s['t_mma'])} | {us(s['t_smem'])} | {us(s['t_issue'])} | "
            f"{_both(s, lambda c: us(c['estimate']))} | {_both(s, lambda c: c['bound'])} | {share} | {target} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=("resnet50", "small"), default="resnet50")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--md", help="write the markdown table here")
    args = parser.parse_args(argv)
    shapes, batch = (RESNET50, 64) if args.shapes == "resnet50" else (SMALL, 2)
    triton_rows = triton_kernels(shapes, batch)
    table = markdown(triton_rows) + "\n\n" + sol_markdown(triton_rows)
    print(table)
    if args.json:
        import triton

        with open(args.json, "w") as f:
            json.dump({"target": "sm_90 (compiled by Triton's NVIDIA backend, nothing run)",
                       "triton": triton.__version__, "torch": torch.__version__, "shapes": args.shapes,
                       "triton_kernels": triton_rows}, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
