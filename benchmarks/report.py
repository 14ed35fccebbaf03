"""Turn a pytest-benchmark JSON from these suites into a markdown table and bar plots.

    python -m benchmarks.report benchmarks/results/NAME.json [--out DIR]   (fastres bench calls it too)

Prints the table and writes DIR/report.md (DIR defaults to the JSON's folder),
plus one PNG per op (DIR/NAME-OP.png) with each provider's speedup over eager
(over naive for the DenseNet suite, whose reference is naive concatenation).
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

PROVIDERS = ["fastres", "compile", "checkpoint", "eager", "naive", "copy"]
REFERENCES = ["eager", "naive"]  # what a speedup is over
MODES = ["forward", "backward", "full", "copy"]
MACHINE_KEYS = [
    "device_name", "torch", "triton", "cuda", "python", "fastres", "date",
    "triton_interpret", "torch_threads",
]


def _order(seq, value):
    return seq.index(value) if value in seq else len(seq)


def rows(data: dict) -> list[dict]:
    """One row per benchmark, sorted by group, mode, provider, with speedup vs eager."""
    out = []
    for b in data.get("benchmarks", []):
        info, stats = b.get("extra_info", {}), b["stats"]
        quantiles = (info["q20_s"], info["q80_s"], False) if "q20_s" in info else (stats["q1"], stats["q3"], True)
        out.append({
            "group": b.get("group") or b["name"],
            "op": info.get("op", b.get("group") or "benchmark"),
            "provider": info.get("provider", b["name"]),
            "mode": info.get("mode", ""),
            "median": stats["median"],
            "low": quantiles[0],
            "high": quantiles[1],
            "iqr": quantiles[2],
            "gbps": info.get("gbps"),
            "tflops": info.get("tflops"),
            "peak_mb": info.get("peak_mb"),
            "saved_mb": info.get("saved_mb"),
        })
    reference = {}  # a group has one of REFERENCES: eager (the op suites) or naive (DenseNet)
    for r in sorted(out, key=lambda r: _order(REFERENCES, r["provider"])):
        if r["provider"] in REFERENCES:
            reference.setdefault((r["group"], r["mode"]), r)
    for r in out:
        ref = reference.get((r["group"], r["mode"]))
        r["reference"] = ref["provider"] if ref else None
        r["speedup"] = ref["median"] / r["median"] if ref else None
    first_seen = {g: i for i, g in reversed(list(enumerate(r["group"] for r in out)))}  # run order
    out.sort(key=lambda r: (first_seen[r["group"]], _order(MODES, r["mode"]), _order(PROVIDERS, r["provider"])))
    return out


def _fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def markdown(data: dict, table: list[dict], source: str) -> str:
    machine = data.get("machine_info", {})
    lines = [f"# Benchmark report: {source}", ""]
    for key in MACHINE_KEYS:
        if key in machine:
            lines.append(f"- {key}: {machine[key]}")
    commit = data.get("commit_info", {})
    if commit.get("id"):
        lines.append(f"- commit: {commit['id'][:12]}{' (dirty)' if commit.get('dirty') else ''}")
    if str(machine.get("device_name", "")).startswith("cpu"):
        lines.append("- no CUDA device: CPU paths (fastres ran its eager reference), GPU-only cases skipped")
    saved = any(r["saved_mb"] is not None for r in table)  # the DenseNet suite's column
    tflops = any(r["tflops"] is not None for r in table)  # the convolution suite's column
    naive = any(r["reference"] == "naive" for r in table)
    lines += [
        "",
        "| group | provider | mode | median ms | p20-p80 ms | GB/s |" + (" TFLOP/s |" if tflops else "")
        + " peak MB |" + (" saved MB |" if saved else "")
        + (" speedup vs eager (DenseNet: vs naive) |" if naive else " speedup vs eager |"),
        "|---|---|---|---:|---:|---:|" + ("---:|" if tflops else "") + "---:|" + ("---:|" if saved else "") + "---:|",
    ]
    for r in table:
        spread = f"{r['low'] * 1e3:.3f}-{r['high'] * 1e3:.3f}{'*' if r['iqr'] else ''}"
        speedup = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(
            f"| {r['group']} | {r['provider']} | {r['mode']} | {r['median'] * 1e3:.3f} | {spread} "
            f"| {_fmt(r['gbps'], '.1f')} |" + (f" {_fmt(r['tflops'], '.2f')} |" if tflops else "")
            + f" {_fmt(r['peak_mb'], '.1f')} |"
            + (f" {_fmt(r['saved_mb'], '.1f')} |" if saved else "") + f" {speedup} |"
        )
    if any(r["iqr"] for r in table):
        lines += ["", "\\* q1-q3 (the JSON has no p20/p80 for this row)."]
    lines += [
        "",
        "GB/s: algorithmic bytes over the median (the passes each suite counts: benchmarks/README.md).",
    ]
    if tflops:
        lines.append("TFLOP/s: the convolutions' FLOPs over the median (backward: dgrad and wgrad).")
    lines += [
        "Peak MB: CUDA memory allocated at the peak of one call, inputs included (absent on CPU).",
    ]
    if saved:
        lines.append("Saved MB: what autograd keeps for backward (blind to what checkpoints keep inside).")
    return "\n".join(lines) + "\n"


def plot(table: list[dict], out_dir: Path, stem: str) -> list[Path]:
    """One PNG per op: speedup over eager per group, one subplot per mode, one bar per provider."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []

    by_op = defaultdict(list)
    for r in table:
        if r["speedup"] is not None:
            by_op[r["op"]].append(r)
    written = []
    for op, op_rows in by_op.items():
        modes = sorted({r["mode"] for r in op_rows}, key=lambda m: _order(MODES, m))
        groups = list(dict.fromkeys(r["group"] for r in op_rows))
        providers = sorted({r["provider"] for r in op_rows}, key=lambda p: _order(PROVIDERS, p))
        fig, axes = plt.subplots(len(modes), 1, figsize=(max(6, 0.9 * len(groups) + 2), 3.2 * len(modes)), squeeze=False)
        width = 0.8 / len(providers)
        for ax, mode in zip(axes[:, 0], modes):
            speedup = {(r["group"], r["provider"]): r["speedup"] for r in op_rows if r["mode"] == mode}
            for i, provider in enumerate(providers):
                xs = [g + (i - (len(providers) - 1) / 2) * width for g in range(len(groups))]
                ax.bar(xs, [speedup.get((g, provider), 0) for g in groups], width, label=provider)
            ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
            ax.set_title(f"{op}: {mode}")
            ax.set_ylabel(f"speedup vs {op_rows[0]['reference']}")
            ax.set_xticks(range(len(groups)))
            ax.set_xticklabels([g.removeprefix(op).strip() for g in groups], rotation=30, ha="right", fontsize=7)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{stem}-{op.replace(' ', '_')}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="output of pytest --benchmark-json")
    parser.add_argument("--out", type=Path, help="folder for report.md and the plots (default: the JSON's folder)")
    args = parser.parse_args(argv)

    print(write_report(args.json, args.out or args.json.parent), end="")
    return 0


def write_report(json_path: Path, out_dir: Path, plots: bool = True) -> str:
    """Write OUT_DIR/report.md (and the plots) from a pytest-benchmark JSON; returns the table's text."""
    data = json.loads(json_path.read_text())
    table = rows(data)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(data, table, json_path.name)
    (out_dir / "report.md").write_text(text)
    for path in plot(table, out_dir, json_path.stem) if plots else ():
        print(f"wrote {path}", file=sys.stderr)
    if not table:
        print("no benchmarks in the JSON (all skipped, or run without --benchmark-only?)", file=sys.stderr)
    return text


if __name__ == "__main__":
    sys.exit(main())
