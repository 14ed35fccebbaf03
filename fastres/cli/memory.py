"""``fastres memory``: peak memory and step time of a DenseNet training step, fastres vs naive concatenation vs checkpointing.

    fastres memory compare [--model densenet121] [--json PATH]
    fastres memory depth [--depths 40 64 100] [--json PATH] [--plot PNG]
    fastres memory budget --budget-mb MB [--json PATH]
    fastres memory report PATH [--plot PNG]

Every measurement runs in its own process
(``python -m fastres memory worker ...``, which prints one
``RESULT {json}`` line), so one variant's allocations, caches and high-water
mark never reach another's. A step is what a training loop runs per batch:
``zero_grad(set_to_none=True)``, forward, cross-entropy on random labels,
backward, ``SGD(lr=0.1, momentum=0.9, weight_decay=1e-4).step()``.

Variants (same weights: fastres loads torchvision's state_dict):

- ``fastres``: ``fastres.models`` with ``memory_efficient=True`` (shared-storage
  dense blocks: the C++ extension on CPU, the fused Triton kernels on a GPU).
- ``naive``: torchvision's DenseNet with ``memory_efficient=False`` (every layer
  concatenates its inputs; autograd keeps each concatenation and BN output).
- ``checkpoint``: torchvision's DenseNet with ``memory_efficient=True``
  (``torch.utils.checkpoint`` around each layer's cat-BN-ReLU-conv1).

DenseNet-BC (``--model densenet_bc``, depth 6n+4, growth rate k) is torchvision's
``DenseNet(growth_rate=k, block_config=(n, n, n), num_init_features=2k)`` with
fastres's CIFAR stem (one 3x3 convolution; norm0/relu0/pool0 replaced by
``nn.Identity``), which is what ``fastres.models.densenet_bc`` builds.

What is measured (see ``measure``):

- memory ``growth``: on CUDA ``torch.cuda.max_memory_allocated()`` during the
  measured steps minus what was allocated before them; on CPU the process's
  peak resident set during the measured steps minus its resident set before
  them. Either way the model, the optimizer state and the input batch are in
  the baseline, and the growth is what one step adds: activations kept for
  backward, gradients, workspaces.
- ``step``: the median wall time of the measured steps (CUDA synchronised);
  ``step q1-q3``: its quartiles over every measured step (of every repeat).
  A step time that rests on one measured step, or whose q1-q3 spread (or the
  compared naive's) is larger than the difference of the two medians, is
  marked (?) in the table, with a line under it saying why and what to do,
  and ``timing_trusted: false`` and ``timing_doubts`` in the JSON
  (``measure.timing_doubts``).
- ``saved``: bytes autograd keeps for backward, seen through
  ``torch.autograd.graph.saved_tensors_hooks`` in one extra step, deduplicated
  by storage, parameters excluded. It cannot see what a checkpoint keeps
  inside itself (the inputs it recomputes from), so it undercounts
  ``checkpoint``; the growth is the figure to compare.
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from . import zoo
from ..testing import saved_bytes
from .argtypes import bc_depth, positive
from .measure import (
    DOUBT_MARK, MB, environment, memory_format, release_free_memory, reset_rss_peak, rss, rss_peak, step_spread,
    timing_doubts, timing_note, training_step,
)

VARIANTS = ("fastres", "naive", "checkpoint")
MODELS = ("densenet121", "densenet161", "densenet169", "densenet201", "densenet_bc")
RESULT_PREFIX = "RESULT "

# Per-device defaults of each mode: (CPU, CUDA). The CPU sizes finish in a few
# minutes on 2 cores; the CUDA ones are the ImageNet / CIFAR training sizes.
DEFAULTS = {
    "compare": {"batch": (32, 64), "size": (96, 224)},
    "depth": {"batch": (16, 64), "size": (32, 32), "depths": ([40, 64, 100], [40, 64, 100, 148, 190, 250])},
    "budget": {"batch": (16, 64), "size": (32, 32), "max_depth": (250, 1000)},
    "batch": {"batch": (1, 1), "size": (64, 224)},
}


# --------------------------------------------------------------------------- models


def bc_layers(depth: int) -> int:
    """Layers per dense block of DenseNet-BC of this depth (6n + 4)."""
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"DenseNet-BC depth must be 6n + 4 with n >= 1 (10, 40, 100, ...), got {depth}")
    return (depth - 4) // 6


def model_label(model: str, depth: int | None = None, growth_rate: int | None = None) -> str:
    return f"densenet_bc-{depth}-k{growth_rate}" if model == "densenet_bc" else model


def make_model(variant: str, model: str, *, depth: int = 100, growth_rate: int = 12) -> tuple[nn.Module, int]:
    """``(module, num_classes)`` for one variant; every variant gets the same weights."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    num_classes = 10 if model == "densenet_bc" else 1000
    torch.manual_seed(0)
    if variant == "fastres":
        return zoo.build_pair(model, "naive", num_classes, depth, growth_rate)[0], num_classes
    return zoo.build_reference(model, variant, num_classes, depth, growth_rate), num_classes


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


# --------------------------------------------------------------------------- CPU memory
#
# The worker reads the resident set's high-water mark (``measure.rss_peak``)
# and, right before the measured steps, resets it to the current resident set
# (``measure.reset_rss_peak``). The baseline is taken after a warm-up step at
# the full batch (thread pools, oneDNN primitives, lazily loaded code, the
# optimizer's momentum buffers and glibc's adapted mmap threshold are all in
# it), with the gradients dropped (as zero_grad does) and glibc's free memory
# handed back to the kernel, so it is what lives between two steps;
# growth = peak over the measured steps - baseline.
#
# If the mark cannot be reset, the warm-up runs on a 2-sample batch, whose
# peak stays below the measured step's, and the result says so
# (``peak_method``, ``peak_reached``).


# --------------------------------------------------------------------------- one measurement


def measure(
    variant: str, model: str, *, depth: int = 100, growth_rate: int = 12, batch: int, size: int,
    device: str = "cpu", dtype: str = "float32", layout: str = "nchw", warmup: int = 1, steps: int = 3,
    saved: bool = True,
) -> dict:
    """Build one variant, warm it up and measure ``steps`` training steps in this process."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    torch_dtype = getattr(torch, dtype)
    fmt = memory_format(layout)
    if cuda:
        torch.backends.cudnn.benchmark = True  # as training runs; the search happens in the warm-up
    net, num_classes = make_model(variant, model, depth=depth, growth_rate=growth_rate)
    net = net.to(device=dev, memory_format=fmt).train()
    optimizer = make_optimizer(net)
    torch.manual_seed(1)
    images = torch.randn(batch, 3, size, size, device=dev).contiguous(memory_format=fmt)
    labels = torch.randint(num_classes, (batch,), device=dev)
    step = training_step(net, optimizer, images, labels, dev, torch_dtype)

    can_reset = cuda or reset_rss_peak()
    warmup_batch = batch if can_reset else min(batch, 2)
    warm_step = step if warmup_batch == batch else training_step(
        net, optimizer, images[:warmup_batch], labels[:warmup_batch], dev, torch_dtype,
    )
    for _ in range(warmup):
        warm_step()
    optimizer.zero_grad(set_to_none=True)

    times = []

    def timed_steps():
        for _ in range(steps):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)

    result = {
        "variant": variant, "model": model_label(model, depth, growth_rate), "batch": batch, "size": size,
        "device": device, "dtype": dtype, "layout": layout, "threads": torch.get_num_threads(),
        "warmup": warmup, "warmup_batch": warmup_batch, "steps": steps,
        "params": sum(p.numel() for p in net.parameters()),
    }
    if model == "densenet_bc":
        result.update(depth=depth, growth_rate=growth_rate, layers_per_block=bc_layers(depth))
    if cuda:
        gc.collect()
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        timed_steps()
        peak = torch.cuda.max_memory_allocated()
        result.update(peak_method="cuda max_memory_allocated", peak_reached=True)
    else:
        release_free_memory()
        baseline = rss()
        if can_reset:
            reset_rss_peak()
        mark_before = rss_peak()
        timed_steps()
        peak = rss_peak()
        result.update(
            peak_method="VmHWM reset by clear_refs" if can_reset else "VmHWM (no reset; 2-sample warm-up)",
            peak_reached=can_reset or peak > mark_before,
        )
    result.update(
        baseline_mb=baseline / MB, peak_mb=peak / MB, growth_mb=(peak - baseline) / MB,
        step_s=statistics.median(times), step_times_s=times,
    )
    if saved:
        result["saved_mb"] = saved_bytes(step, net.parameters()) / MB
    return result


# --------------------------------------------------------------------------- running workers


def run_worker(opts: dict, *, threads: int | None, tolerate_oom: bool = False) -> dict:
    """Measure one configuration in a fresh ``python -m fastres memory worker`` process."""
    cmd = [sys.executable, "-m", "fastres", "memory", "worker"]
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            cmd.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            cmd += [flag, str(value)]
    env = dict(os.environ)
    if threads is not None:
        cmd += ["--threads", str(threads)]
        env["OMP_NUM_THREADS"] = str(threads)  # sizes the OpenMP pool before torch starts it
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_PREFIX)]
    if proc.returncode == 0 and lines:
        result = json.loads(lines[-1][len(RESULT_PREFIX):])
    elif tolerate_oom and proc.returncode < 0:  # killed, most likely by the kernel's OOM killer
        result = {"oom": True, "error": f"worker killed by signal {-proc.returncode}"}
    else:
        raise RuntimeError(
            f"worker failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}"
        )
    result["worker_wall_s"] = wall
    return result


def _describe(r: dict) -> str:
    if r.get("oom"):
        return f"{r['variant']} {r['model']}: out of memory ({r.get('error', '')})"
    text = (
        f"{r['variant']} {r['model']} N{r['batch']} {r['size']}x{r['size']}: growth {r['growth_mb']:.1f} MB, "
        f"step {r['step_s'] * 1e3:.1f} ms"
    )
    return text + ("" if r.get("peak_reached", True) else " (peak not above an earlier mark: an upper bound)")


def _measure_all(configs: list[dict], args, *, tolerate_oom: bool = False) -> list[dict]:
    from tqdm import tqdm

    out = []
    bar = tqdm(configs, desc="measuring", unit="run", file=sys.stderr, leave=False, disable=None)
    for opts in bar:
        label = model_label(opts["model"], opts.get("depth"), opts.get("growth_rate"))
        bar.set_postfix_str(f"{opts['variant']} {label}")
        r = run_worker(opts, threads=args.threads, tolerate_oom=tolerate_oom)
        r.setdefault("variant", opts["variant"])
        r.setdefault("model", label)
        bar.write(f"  {_describe(r)}  [{r['worker_wall_s']:.1f} s]", file=sys.stderr)
        out.append(r)
    return out


def _median_runs(runs: list[dict]) -> dict:
    """One row from the repeats of one configuration: medians of growth, saved and step time."""
    row = dict(runs[0])
    for key in ("growth_mb", "peak_mb", "baseline_mb", "saved_mb", "step_s"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            row[key] = statistics.median(values)
    row["step_times_s"] = [t for r in runs for t in r.get("step_times_s", [])]  # every run's steps
    row["repeats"] = len(runs)
    row["peak_reached"] = all(r.get("peak_reached", True) for r in runs)
    row["worker_wall_s"] = sum(r["worker_wall_s"] for r in runs)
    return row


def _ratios(rows: list[dict], key=lambda r: ()) -> None:
    """Add memory_ratio and time_ratio to naive, among rows with the same ``key``."""
    naive = {key(r): r for r in rows if r["variant"] == "naive" and not r.get("oom")}
    for r in rows:
        ref = naive.get(key(r))
        if ref and not r.get("oom"):
            r["memory_ratio"] = r["growth_mb"] / ref["growth_mb"] if ref["growth_mb"] > 0 else None
            r["time_ratio"] = r["step_s"] / ref["step_s"]


TIMING_ADVICE = ("Rerun with more --steps (e.g. --steps 10) or --repeats, --threads 1, "
                 "on an otherwise idle machine.")


def _timing_label(r: dict, mode: str) -> str:
    """How the table's note names a row: the variant, and in depth mode its depth."""
    return f"{r['variant']} at depth {r['depth']}" if mode == "depth" else r["variant"]


def _judge_timings(rows: list[dict], mode: str) -> None:
    """Add step_spread, timing_trusted and timing_doubts to rows with step times (``measure.timing_doubts``).

    compare and depth: the rows of one model (depth) are compared, with naive
    where it is among them. budget and batch: each row is a different size, so
    it is judged on its own steps only.
    """
    compared = mode in ("compare", "depth")
    groups = {}
    for i, r in enumerate(rows):
        if r.get("oom") or not r.get("step_times_s") or r.get("step_s") is None:
            continue
        r["step_spread"] = step_spread(r["step_times_s"])
        groups.setdefault(r.get("depth") if compared else i, []).append(r)
    for members in groups.values():
        spreads = {_timing_label(r, mode): {**r["step_spread"], "median_s": r["step_s"]} for r in members}
        naive = [_timing_label(r, mode) for r in members if r["variant"] == "naive"]
        doubts = timing_doubts(spreads, reference=naive[0] if naive else None)
        for r in members:
            r["timing_doubts"] = doubts[_timing_label(r, mode)]
            r["timing_trusted"] = not r["timing_doubts"]


# --------------------------------------------------------------------------- modes


def _common_opts(args, mode: str) -> dict:
    gpu = args.device == "cuda"
    defaults = DEFAULTS[mode]
    return {
        "device": args.device,
        "batch": args.batch or defaults["batch"][gpu],
        "size": args.size or defaults["size"][gpu],
        "dtype": args.dtype,
        "layout": args.layout or ("channels_last" if gpu else "nchw"),
        "warmup": args.warmup,
        "steps": args.steps,
    }


def _header(args, mode: str, opts: dict, **extra) -> dict:
    return {
        "mode": mode, "machine_info": args.machine_info,
        "config": {**opts, "threads": args.threads, "repeats": getattr(args, "repeats", 1), **extra},
    }


def run_compare(args) -> dict:
    opts = _common_opts(args, "compare")
    configs = [{"variant": v, "model": args.model, "depth": args.depth, "growth_rate": args.growth_rate, **opts}
               for v in args.variants]
    label = model_label(args.model, args.depth, args.growth_rate)
    print(f"compare: {label}, batch {opts['batch']}, {opts['size']}x{opts['size']}, {opts['device']}", file=sys.stderr)
    runs = _measure_all(configs * args.repeats, args)  # round-robin: a slow spell hits every variant
    rows = [_median_runs([r for r in runs if r["variant"] == v]) for v in args.variants]
    _ratios(rows)
    return {**_header(args, "compare", opts, model=label), "results": rows, "runs": runs}


def run_depth(args) -> dict:
    opts = _common_opts(args, "depth")
    depths = args.depths or DEFAULTS["depth"]["depths"][args.device == "cuda"]
    for d in depths:
        bc_layers(d)
    configs = [{"variant": v, "model": "densenet_bc", "depth": d, "growth_rate": args.growth_rate, **opts}
               for d in depths for v in args.variants]
    print(f"depth: DenseNet-BC k={args.growth_rate}, depths {depths}, batch {opts['batch']}, "
          f"{opts['size']}x{opts['size']}, {opts['device']}", file=sys.stderr)
    runs = _measure_all(configs * args.repeats, args)
    rows = [_median_runs([r for r in runs if r["variant"] == v and r["depth"] == d])
            for d in depths for v in args.variants]
    _ratios(rows, key=lambda r: r["depth"])
    return {**_header(args, "depth", opts, growth_rate=args.growth_rate, depths=depths), "results": rows, "runs": runs}


def largest_fit(fits, n_max: int) -> tuple[int, int | None]:
    """``(lo, hi)``: ``fits(lo)`` (0: nothing fits) and not ``fits(hi)`` (None: everything up to ``n_max`` fits).

    Doubles n from 1 until it does not fit, then bisects between the last fit
    and the first miss; assumes that what fits at n fits at every smaller n.
    """
    lo, hi = 0, None
    n = 1
    while hi is None and lo < n_max:
        if fits(n):
            lo, n = n, min(2 * n, n_max)
        else:
            hi = n
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, hi


def _budget_rows(args, n_max: int, config, what: str, best: str, value) -> list[dict]:
    """Per variant, the largest n up to ``n_max`` whose step grows memory by at most ``args.budget_mb``.

    ``config(variant, n)`` is the worker configuration of probe n (one worker
    each); ``value(n)`` is what the row reports for it: the depth or the batch,
    under ``f"{best}_{what}"`` and ``f"first_miss_{what}"``.
    """
    rows = []
    for variant in args.variants:
        probes = {}

        def fits(n):
            if n not in probes:
                probes[n] = _measure_all([config(variant, n)], args, tolerate_oom=True)[0]
            r = probes[n]
            return not r.get("oom") and r["growth_mb"] <= args.budget_mb

        lo, hi = largest_fit(fits, n_max)
        fit = probes.get(lo)
        miss = probes.get(hi) if hi is not None else None
        rows.append({
            "variant": variant,
            f"{best}_{what}": value(lo) if lo else None,
            "growth_mb": fit["growth_mb"] if fit else None,
            "step_s": fit["step_s"] if fit else None,
            "step_times_s": fit["step_times_s"] if fit else None,
            f"first_miss_{what}": value(hi) if hi is not None else None,
            "first_miss_growth_mb": None if miss is None or miss.get("oom") else miss["growth_mb"],
            "capped": hi is None,
            "probes": [{what: value(k), "growth_mb": p.get("growth_mb"), "oom": bool(p.get("oom")),
                        "worker_wall_s": p["worker_wall_s"]} for k, p in sorted(probes.items())],
        })
    return rows


def run_batch(args) -> dict:
    """Per variant, the largest batch of one model whose step grows memory by at most the budget."""
    opts = {**_common_opts(args, "batch"), "saved": False}
    label = model_label(args.model, args.depth, args.growth_rate)
    print(f"batch: {args.budget_mb} MB, {label} up to batch {args.max_batch}, {opts['size']}x{opts['size']}, "
          f"{opts['device']}", file=sys.stderr)

    def config(variant, batch):
        return {"variant": variant, "model": args.model, "depth": args.depth, "growth_rate": args.growth_rate,
                **opts, "batch": batch}

    rows = _budget_rows(args, args.max_batch, config, "batch", "largest", lambda batch: batch)
    header = _header(args, "batch", opts, model=label, budget_mb=args.budget_mb, max_batch=args.max_batch)
    return {**header, "results": rows}


def run_budget(args) -> dict:
    """Per variant, the largest n (depth 6n+4) whose step grows memory by at most the budget.

    One worker per probe (``largest_fit``'s doubling and bisection); assumes
    the growth rises with depth, as it does for every variant.
    """
    opts = {**_common_opts(args, "budget"), "saved": False}
    max_depth = args.max_depth or DEFAULTS["budget"]["max_depth"][args.device == "cuda"]
    n_max = bc_layers(max_depth - (max_depth - 4) % 6) if max_depth >= 10 else 1
    print(f"budget: {args.budget_mb} MB, DenseNet-BC k={args.growth_rate} up to depth {6 * n_max + 4}, "
          f"batch {opts['batch']}, {opts['size']}x{opts['size']}, {opts['device']}", file=sys.stderr)

    def config(variant, n):
        return {"variant": variant, "model": "densenet_bc", "depth": 6 * n + 4, "growth_rate": args.growth_rate,
                **opts}

    rows = _budget_rows(args, n_max, config, "depth", "deepest", lambda n: 6 * n + 4)
    header = _header(args, "budget", opts, growth_rate=args.growth_rate, budget_mb=args.budget_mb,
                     max_depth=6 * n_max + 4)
    return {**header, "results": rows}


# --------------------------------------------------------------------------- output


def _f(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def _doubt(r: dict) -> str:
    """The mark of a row whose step time ``_judge_timings`` doubts."""
    return " " + DOUBT_MARK if r.get("timing_trusted") is False else ""


def _search_table(rows: list[dict], what: str, best: str) -> list[str]:
    """The table of a budget search over ``what`` (depth or batch): per variant, the best fit and the first miss."""
    lines = [
        "",
        f"| variant | {best} {what} that fits | its growth MB | its step ms | first {what} over | its growth MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        fit = _f(r[f"{best}_{what}"], "d") + (" (cap)" if r["capped"] else "")
        miss = "-" if r[f"first_miss_{what}"] is None else str(r[f"first_miss_{what}"])
        lines.append(
            f"| {r['variant']} | {fit} | {_f(r['growth_mb'], '.1f')} "
            f"| {_f(r['step_s'] and r['step_s'] * 1e3, '.1f')}{_doubt(r)} | {miss} "
            f"| {_f(r['first_miss_growth_mb'], '.1f')} |"
        )
    return lines


def render(data: dict) -> str:
    """The markdown table (and machine lines) of a result JSON of any mode."""
    m, c = data["machine_info"], data["config"]
    lines = [
        f"# DenseNet training step, {data['mode']}: {m['device_name']}",
        "",
        f"- torch {m['torch']}, triton {m['triton']}, cuda {m['cuda']}, fastres {m['fastres']} "
        f"(commit {m.get('commit')}), {m['date']}",
        f"- batch {c['batch'] if data['mode'] != 'batch' else 'searched'}, {c['size']}x{c['size']}, {c['dtype']}, "
        f"{c['layout']}, threads "
        f"{c['threads'] or 'default'}, {c['warmup']} warm-up + {c['steps']} measured steps"
        + (f", median of {c['repeats']} runs" if c.get("repeats", 1) > 1 else ""),
    ]
    rows = data["results"]
    if data["mode"] == "budget":
        lines.append(f"- budget: {c['budget_mb']} MB of memory growth per step; DenseNet-BC k={c['growth_rate']}, "
                     f"depths 6n+4 up to {c['max_depth']}")
        lines += _search_table(rows, "depth", "deepest")
    elif data["mode"] == "batch":
        lines.append(f"- budget: {c['budget_mb']} MB of memory growth per step; {c['model']}, batches up to {c['max_batch']}")
        lines += _search_table(rows, "batch", "largest")
    else:
        depth_col = data["mode"] == "depth"
        lines += [
            f"- model: {c['model']}" if not depth_col else f"- DenseNet-BC k={c['growth_rate']}",
            "",
            ("| depth " if depth_col else "")
            + "| variant | growth MB | vs naive | saved MB | step ms | step q1-q3 ms | vs naive |",
            ("|---:" if depth_col else "") + "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            flag = "" if r.get("peak_reached", True) else " (<=)"
            spread = r.get("step_spread")
            quartiles = f"{spread['q1_s'] * 1e3:.1f}-{spread['q3_s'] * 1e3:.1f}" if spread and spread["n"] > 1 else "-"
            ratio_mark = _doubt(r) if r["variant"] != "naive" else ""  # naive's 1.00x is no measurement
            lines.append(
                (f"| {r['depth']} " if depth_col else "")
                + f"| {r['variant']} | {_f(r.get('growth_mb'), '.1f')}{flag} | {_f(r.get('memory_ratio'), '.2f', 'x')} "
                f"| {_f(r.get('saved_mb'), '.1f')} | {_f(r.get('step_s') and r['step_s'] * 1e3, '.1f')}{_doubt(r)} "
                f"| {quartiles} | {_f(r.get('time_ratio'), '.2f', 'x')}{ratio_mark} |"
            )
    note = timing_note({_timing_label(r, data["mode"]): r["timing_doubts"] for r in rows if "timing_doubts" in r},
                       TIMING_ADVICE)
    if note:
        lines += ["", note]
    lines += [
        "",
        "growth: peak memory during a step minus memory before it (model, optimizer state and inputs "
        "excluded); CPU: resident set (VmHWM), CUDA: max_memory_allocated.",
    ]
    if data["mode"] not in ("budget", "batch"):
        lines.append(
            "saved: what autograd keeps for backward (saved_tensors_hooks; blind to checkpoints' insides). "
            "step: median wall time; q1-q3: its quartiles over every measured step."
        )
    return "\n".join(lines) + "\n"


def plot_depth(data: dict, path: Path) -> Path | None:
    """Memory growth and step time against depth, one line per variant."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return None
    c = data["config"]
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    for variant in dict.fromkeys(r["variant"] for r in data["results"]):
        rows = sorted((r for r in data["results"] if r["variant"] == variant and not r.get("oom")),
                      key=lambda r: r["depth"])
        depths = [r["depth"] for r in rows]
        ax_mem.plot(depths, [r["growth_mb"] for r in rows], marker="o", label=variant)
        ax_time.plot(depths, [r["step_s"] * 1e3 for r in rows], marker="o", label=variant)
    for ax, ylabel in ((ax_mem, "peak memory growth per step (MB)"), (ax_time, "step time (ms)")):
        ax.set_xlabel("depth")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"DenseNet-BC k={c['growth_rate']} training step, batch {c['batch']}, {c['size']}x{c['size']}, "
        f"{c['dtype']}: {data['machine_info']['device_name']}", fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def finish(data: dict, args) -> None:
    print(render(data), end="")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if data["mode"] == "depth":
        default = args.json.with_suffix(".png") if args.json else Path(f"{args.device}-densenet-bc-depth.png")
        written = plot_depth(data, args.plot or default)
        if written:
            print(f"wrote {written}", file=sys.stderr)


# --------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``fastres memory``'s modes, on ``p``."""
    sub = p.add_subparsers(dest="mode", required=True, metavar="MODE")

    def measured(sp, *, variants=True):
        sp.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="default: cuda when available")
        sp.add_argument("--batch", type=positive, help="default: per mode and device (CPU 32/16, CUDA 64)")
        sp.add_argument("--size", type=positive, help="input height and width; default per mode and device")
        sp.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="float32, or mixed precision under torch.autocast (fp32 weights)")
        sp.add_argument("--layout", choices=["nchw", "channels_last"],
                        help="default: nchw on CPU, channels_last on CUDA")
        sp.add_argument("--warmup", type=positive, default=1, help="unmeasured steps first (default 1)")
        sp.add_argument("--steps", type=positive, default=3,
                        help="measured steps (default 3; budget, batch: 1); a step time that rests on one step, "
                             "or whose spread hides its difference from naive, is marked (?)")
        sp.add_argument("--threads", type=positive,
                        help="torch/OpenMP threads of each worker (default: torch's default)")
        sp.add_argument("--growth-rate", type=positive, default=12, help="DenseNet-BC's k (default 12)")
        if variants:
            sp.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
        sp.add_argument("--json", type=Path, help="write the results here")

    def one_model(sp):
        sp.add_argument("--model", choices=MODELS, default="densenet121")
        sp.add_argument("--depth", type=bc_depth, default=100, help="with --model densenet_bc (default 100)")

    sp = sub.add_parser("compare", help="one model, every variant: memory and time vs naive")
    measured(sp)
    one_model(sp)
    sp.add_argument("--repeats", type=positive, default=1,
                    help="run the variants round-robin this many times; report medians (default 1)")

    sp = sub.add_parser("depth", help="DenseNet-BC at several depths, every variant; table, JSON and plot")
    measured(sp)
    sp.add_argument("--depths", type=bc_depth, nargs="+", help="6n+4 each; default per device")
    sp.add_argument("--repeats", type=positive, default=1)
    sp.add_argument("--plot", type=Path, help="PNG path (default: the --json path with .png, "
                    "else DEVICE-densenet-bc-depth.png here)")

    sp = sub.add_parser("budget", help="deepest DenseNet-BC whose step fits a memory budget, per variant")
    measured(sp)
    sp.add_argument("--budget-mb", type=float, required=True, help="allowed memory growth of one step, MB")
    sp.add_argument("--max-depth", type=positive, help="deepest depth probed (default 250 CPU, 1000 CUDA)")
    sp.set_defaults(steps=1)  # memory is what counts here; one measured step per probe

    sp = sub.add_parser("batch", help="largest batch of one DenseNet whose step fits a memory budget, per variant")
    measured(sp)
    one_model(sp)
    sp.add_argument("--budget-mb", type=float, required=True, help="allowed memory growth of one step, MB")
    sp.add_argument("--max-batch", type=positive, default=1024, help="largest batch probed (default 1024)")
    sp.set_defaults(steps=1)

    sp = sub.add_parser("report", help="print the table of a saved JSON (and redraw a depth plot)")
    sp.add_argument("json", type=Path)
    sp.add_argument("--plot", type=Path, help="depth mode: write the plot here")

    sp = sub.add_parser("worker", help="measure one variant in this process (what the other modes spawn)")
    measured(sp, variants=False)
    sp.add_argument("--variant", choices=VARIANTS, required=True)
    one_model(sp)
    sp.add_argument("--saved", action=argparse.BooleanOptionalAction, default=True,
                    help="also count saved-for-backward bytes (one extra step)")


def run(args, parser: argparse.ArgumentParser) -> int:
    if args.mode == "worker" and (args.batch is None or args.size is None):
        parser.error("worker needs --batch and --size")
    if args.mode == "report":
        try:
            data = json.loads(args.json.read_text())
            if not any("timing_trusted" in r for r in data["results"]):  # written before timings were judged
                for r in data["results"] if data.get("runs") else ():  # rows kept only their first run's steps
                    r["step_times_s"] = [t for run in data["runs"] if run.get("variant") == r["variant"]
                                         and run.get("depth") == r.get("depth") for t in run.get("step_times_s", [])]
                _judge_timings(data["results"], data["mode"])
            text = render(data)
        except (OSError, ValueError) as err:
            parser.error(f"argument json: cannot read {args.json}: {err}")
        except (KeyError, TypeError):
            parser.error(f"argument json: {args.json} is not the JSON of a fastres memory run")
        print(text, end="")
        if data["mode"] == "depth" and args.plot:
            plot_depth(data, args.plot)
            print(f"wrote {args.plot}", file=sys.stderr)
        return 0
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    if args.mode == "worker":
        if args.threads:
            torch.set_num_threads(args.threads)
        try:
            result = measure(
                args.variant, args.model, depth=args.depth, growth_rate=args.growth_rate,
                batch=args.batch, size=args.size, device=args.device, dtype=args.dtype,
                layout=args.layout or "nchw", warmup=args.warmup, steps=args.steps, saved=args.saved,
            )
        except torch.cuda.OutOfMemoryError as err:
            result = {"variant": args.variant, "oom": True, "error": str(err).splitlines()[0]}
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    args.machine_info = environment(args.device)  # before measuring: the commit measured
    start = time.perf_counter()
    data = {"compare": run_compare, "depth": run_depth, "budget": run_budget, "batch": run_batch}[args.mode](args)
    _judge_timings(data["results"], args.mode)
    data["wall_s"] = time.perf_counter() - start
    finish(data, args)
    print(f"{args.mode} took {data['wall_s']:.0f} s", file=sys.stderr)
    return 0
