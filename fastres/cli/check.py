"""What a bug report needs: versions, devices, the C++ extension, and a self-test of every op against eager.

    fastres check                 # every available device, float64 and float32
    fastres check --interpreter   # also the Triton kernels on CPU, through Triton's interpreter
    fastres check --json check.json

The self-test runs each fused op and block (add_relu, batch_norm_relu with and
without residual, train and eval, bn_relu_conv2d; torchvision's BasicBlock,
Bottleneck and a DenseNet-BC; timm's pre-activation blocks where timm is
installed) with fastres and with the eager code it
replaces, on the same inputs, and compares outputs, gradients and running
statistics. On a CPU fastres runs eager PyTorch (and ``fastres._C`` for dense
blocks); on CUDA the Triton kernels; ``--interpreter`` runs those same
kernels on the CPU in a subprocess with ``TRITON_INTERPRET=1`` (slower: about
a minute). Exit status 1 when any case fails.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

RESULT_PREFIX = "RESULT "


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--interpreter", action="store_true",
                   help="also self-test the Triton kernels on CPU through Triton's interpreter")
    p.add_argument("--no-self-test", action="store_true", help="report the environment only")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the report here")
    p.add_argument("--worker", choices=["interpreter"], help=argparse.SUPPRESS)  # the --interpreter subprocess


def environment() -> dict:
    import fastres
    from fastres import _ext, ops

    from .measure import triton_version

    info = {
        "fastres": fastres.__version__, "python": sys.version.split()[0], "platform": platform.platform(),
        "torch": torch.__version__, "torch CUDA": torch.version.cuda, "triton": triton_version(),
        "CUDA available": torch.cuda.is_available(),
    }
    gpus = []
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        p = torch.cuda.get_device_properties(i)
        gpus.append(f"cuda:{i} {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                    f"{p.multi_processor_count} SMs")
    info["GPUs"] = gpus
    ext = fastres.functional.extension_available()
    info["fastres._C"] = "built (the shared-storage DenseNet engine)" if ext else \
        "not built: CPU shared-storage DenseNets raise; reinstall with pip install --no-build-isolation -e ."
    info["fastres._C CUDA kernels"] = _ext.cuda_status()
    info["CUDA path"] = ("Triton kernels" if ops.triton_available() else "eager PyTorch (triton not installed)") \
        if torch.cuda.is_available() else "no CUDA device"
    info["dense blocks on CUDA"] = _dense_route() if torch.cuda.is_available() else "no CUDA device"
    return info


def _dense_route() -> str:
    """Which path dense blocks take on cuda:0 (``fastres.dense_path`` / FASTRES_DENSE_PATH decide), or why none."""
    from fastres import ops

    names = {ops.TRITON: "fused Triton convolutions", ops.EXTENSION: "fastres._C CUDA kernels + cuDNN",
             ops.EAGER: "eager PyTorch (the layers as written)"}
    try:
        return names[ops.route("dense", torch.empty(1, device="cuda"))]
    except (RuntimeError, ValueError) as err:
        return f"error: {err}"


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _interpreter_results() -> list[dict]:
    """The self-test on CPU through Triton's interpreter, in a subprocess (the mode is fixed at import)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "fastres", "check", "--worker", "interpreter"],
                          env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        return [{"case": "Triton interpreter run", "device": "cpu (interpreter)", "dtype": "-", "ok": False,
                 "error": (proc.stderr.strip().splitlines() or ["no output"])[-1], "worst": None}]
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def _table(results: list[dict]) -> str:
    lines = ["| case | device | dtype | | largest difference | error |", "|---|---|---|---|---:|---|"]
    for r in results:
        lines.append(f"| {r['case']} | {r['device']} | {r['dtype']} | {'✓' if r['ok'] else '✗'} "
                     f"| {'-' if r['worst'] is None else format(r['worst'], '.1e')} | {r['error']} |")
    return "\n".join(lines)


def run(args, parser) -> int:
    import dataclasses

    from . import selftest

    if args.worker == "interpreter":
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--worker interpreter runs with TRITON_INTERPRET=1 (use --interpreter)")
        from ..testing import gpu_paths_on_cpu

        with gpu_paths_on_cpu():  # every op's CUDA path, dense blocks included
            results = [dataclasses.asdict(r) | {"device": "cpu (interpreter)"} for r in selftest.run_all("cpu")]
        print(RESULT_PREFIX + json.dumps(results), flush=True)
        return 0

    info = environment()
    width = max(map(len, info))
    for key, value in info.items():
        if isinstance(value, list):
            value = "; ".join(value) or "none"
        print(f"{key:<{width}}  {value}")
    results = []
    if not args.no_self_test:
        for device in _devices():
            results += [dataclasses.asdict(r) for r in selftest.run_all(device)]
        if args.interpreter:
            if info["triton"] is None:
                results.append({"case": "Triton interpreter run", "device": "cpu (interpreter)", "dtype": "-",
                                "ok": False, "error": "triton is not installed (pip install triton)", "worst": None})
            else:
                results += _interpreter_results()
        print()
        print(_table(results))
    failed = [r for r in results if not r["ok"]]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": info, "self_test": results, "ok": not failed}, indent=1) + "\n")
        print(f"wrote {args.json}")
    if results:
        print(f"\n{len(results) - len(failed)} of {len(results)} passed" + (": FAIL" if failed else ""))
    return 1 if failed else 0
