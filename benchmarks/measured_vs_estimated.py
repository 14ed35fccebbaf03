"""Measured times of a pytest-benchmark JSON against the speed-of-light bound of each case.

    python -m benchmarks.measured_vs_estimated RESULTS.json [--device "NVIDIA H200"] [--json OUT]

For every case that records its algorithmic bytes (``nbytes``) and, for the
convolutions, FLOPs: the bound is the larger of bytes at the chip's HBM
bandwidth and FLOPs at the dot's dense peak (``benchmarks/speed_of_light.py``'s
constants); the table gives the measured median, the bound, and the bound's
share of the measured time (100% would be the speed of light), with the
candidate the tuner took per launch where the case recorded it. The bound is
a model, the time a measurement: `gpu_check.sh` prints both side by side.
"""

import argparse
import json
import sys

from .speed_of_light import CHIPS, H100, PEAK_FLOPS


def chip_for(device: str):
    """H200 when the device name says so, else H100 (the same compute; HBM differs)."""
    return next((c for c in CHIPS if c.name.split()[0] in device and c is not H100), H100)


def _dot(params: dict, info: dict) -> str:
    dtype = str(params.get("dtype", ""))
    if "bfloat16" in dtype or "float16" in dtype:
        return "bf16"
    if "float64" in dtype:
        return "fp64"
    return "tf32" if info.get("tf32") else "fp32"


def rows(results: dict, device: str | None = None) -> list[dict]:
    device = device or results.get("machine_info", {}).get("device_name", "")
    chip = chip_for(str(device))
    out = []
    for b in results.get("benchmarks", []):
        info, params = b.get("extra_info", {}), b.get("params", {}) or {}
        nbytes = info.get("nbytes")
        if not nbytes:
            continue
        flops = info.get("flops", 0)
        dram = nbytes / chip.hbm
        mma = flops / PEAK_FLOPS[_dot(params, info)] if flops else 0.0
        bound = max(dram, mma)
        median = b["stats"]["median"]
        out.append({
            "name": b["name"], "chip": chip.name, "median_us": median * 1e6, "bound_us": bound * 1e6,
            "limit": "DRAM" if dram >= mma else "MMA", "share_of_light": bound / median,
            "chosen": info.get("chosen"),
        })
    return out


def markdown(table: list[dict]) -> str:
    lines = ["| case | measured us | speed-of-light bound us (estimate) | bound | bound / measured | tuner's choice |",
             "|---|---:|---:|---|---:|---|"]
    for r in table:
        chosen = "" if not r["chosen"] else ", ".join(f"{k}: {v}" for k, v in r["chosen"].items())
        lines.append(f"| {r['name']} | {r['median_us']:.1f} | {r['bound_us']:.1f} | {r['limit']} | "
                     f"{r['share_of_light']:.0%} | {chosen} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="a pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--device", help="the GPU's name (default: from the JSON)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    with open(args.results) as f:
        table = rows(json.load(f), args.device)
    print(markdown(table))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
