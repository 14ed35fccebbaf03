"""Run the benchmark suites: fused vs eager vs torch.compile, speed and memory.

    fastres bench                          # every suite
    fastres bench -k "add_relu and N64"    # pytest's -k selection
    fastres bench --suite batch_norm --out results/
    fastres bench --smoke                  # each case once, nothing timed

Runs the pytest-benchmark suites that ship with fastres in a pytest
subprocess with the environment they need: ``TRITON_INTERPRET`` unset (the
interpreter's timings mean nothing). Writes OUT/bench.json
(pytest-benchmark's JSON with the machine), OUT/report.md (the table) and one
PNG per op (each provider's speedup over eager) to OUT. A case whose
q1-q3 spread is larger than its difference from the reference (eager; naive
for DenseNets) is named on a line under the table (and in report.md), and
each case's ``extra_info`` in bench.json says ``timing_trusted`` and
``timing_doubts``. On a CPU the suites time fastres's CPU paths on smoke
sizes and skip the GPU-sized cases. ``--smoke`` writes nothing (no OUT).
Exit status: pytest's (1 when a case failed).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from .measure import ONE_STEP, timing_doubts, timing_note

SUITES = ("add_relu", "batch_norm", "blocks", "bn_relu_conv", "training_step", "densenet")
TIMING_ADVICE = "Rerun on an otherwise idle machine, with fewer threads (OMP_NUM_THREADS=1)."


def suites_dir() -> Path:
    import fastres.benchmarks

    return Path(fastres.benchmarks.__file__).parent


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-k", metavar="EXPR", help="only cases matching this pytest -k expression")
    p.add_argument("--suite", choices=SUITES, action="append", help="only this suite (repeatable; default all)")
    p.add_argument("--out", type=Path, default=Path("fastres-bench"), help="output folder (default ./fastres-bench)")
    p.add_argument("--smoke", action="store_true",
                   help="run each case once, untimed (--benchmark-disable): a check that the suites run; writes nothing")
    p.add_argument("--no-plots", action="store_true", help="table only")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER,
                   help="after --: more pytest arguments (e.g. -- -x --benchmark-min-rounds 20)")


def judge_timings(json_path: Path) -> str | None:
    """Judge each case's time against its group's reference (``measure.timing_doubts``); the note, if any.

    Each benchmark's ``extra_info`` in the JSON gets ``timing_trusted`` and
    ``timing_doubts``; its rounds are the steps and pytest-benchmark's q1 and q3
    the spread.
    """
    from fastres.benchmarks.report import REFERENCES

    data = json.loads(json_path.read_text())
    groups = {}
    for b in data.get("benchmarks", []):
        info = b.setdefault("extra_info", {})
        groups.setdefault((b.get("group") or b["name"], info.get("mode", "")), []).append(b)
    every = {}
    for (group, mode), members in groups.items():
        by_provider = {b["extra_info"].get("provider", b["name"]): b for b in members}
        spreads = {p: {"n": b["stats"]["rounds"], "median_s": b["stats"]["median"], "q1_s": b["stats"]["q1"],
                       "q3_s": b["stats"]["q3"]} for p, b in by_provider.items()}
        doubts = timing_doubts(spreads, reference=next((p for p in REFERENCES if p in spreads), None))
        where = f"{group}{f' ({mode})' if mode else ''}"
        for provider, reasons in doubts.items():
            by_provider[provider]["extra_info"].update(timing_trusted=not reasons, timing_doubts=reasons)
            every[f"{where} {provider}"] = [r if r == ONE_STEP else f"{where}: {r}" for r in reasons]
    json_path.write_text(json.dumps(data, indent=4) + "\n")
    return timing_note(every, TIMING_ADVICE, lead="Times not to be trusted")


def run(args, parser) -> int:
    here = suites_dir()
    paths = [str(here / f"test_{s}.py") for s in args.suite] if args.suite else [str(here)]
    json_path = args.out / "bench.json"
    if not args.smoke:  # --smoke writes nothing, not even the folder
        args.out.mkdir(parents=True, exist_ok=True)
        json_path.unlink(missing_ok=True)  # a report is only ever of this run
    extra = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    cmd = [sys.executable, "-m", "pytest", *paths, "-p", "no:cacheprovider", "-p", "no:xdist", "--rootdir", str(here),
           "-c", os.devnull, "-q"]
    cmd += ["--benchmark-disable"] if args.smoke else ["--benchmark-only", "--benchmark-json", str(json_path)]
    if args.k:
        cmd += ["-k", args.k]
    # Never the interpreter; and no pytest-xdist worker variables from a calling test run, which would
    # make pytest-benchmark disable itself.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("PYTEST_XDIST")}
    print("running: " + " ".join(cmd), file=sys.stderr, flush=True)
    status = subprocess.run(cmd + extra, env=env).returncode
    if status == 5:
        print("no benchmark matched the selection", file=sys.stderr)
        return status
    if args.smoke or not json_path.exists():
        return status
    from fastres.benchmarks import report

    note = judge_timings(json_path)
    print(report.write_report(json_path, args.out, plots=not args.no_plots), end="")
    if note:
        print("\n" + note)
        with open(args.out / "report.md", "a") as f:
            f.write("\n" + note + "\n")
    return status
