"""What a fresh process pays in its first training step: Triton compiles and autotuning, counted without a GPU.

    python -m benchmarks.cold_start --model densenet121 [--batch 64] [--size 224] [--dtype bfloat16]
        [--model-args JSON] [--processes 2] [--json PATH]

Each process is a fresh subprocess that builds ``fastres.models.<model>(**model_args)``
(e.g. ``--model densenet_bc --model-args '{"depth": 10}'``), moves it to
``dtype`` and channels_last, and runs ONE training step (forward,
cross-entropy on random labels, backward) through the stand-in device
(``benchmarks/stub_gpu.py``): every kernel the step launches is compiled for
sm_90 by Triton's real backend, nothing runs on a device. The step takes the
path a GPU would: dense blocks and transitions on the fused kernels (also in
bfloat16, which the CPU path would leave to eager code), and every autotuning
session launches each of its candidates once, as timing them on a GPU would
(so their binaries are compiled), with a stand-in timer for which all
candidates tie (the first wins, as without a GPU). ``fastres.kernels.tuning``
tunes only for CUDA devices: the stand-in's CPU tensors are presented to it
as on one (named "stand-in sm_90"), so it remembers its choices on disk.

Per process:

- binaries: distinct compiled kernels (``CompiledKernel.hash``) over the
  recorded launches, total and per kernel function; launches (those made
  while tuning apart); calls of Triton's ``compile`` (disk-cache loads
  included), the seconds spent in them, and the cubins newly written to
  Triton's cache (real compiles);
- tuning sessions (per-shape config choices that time candidates on a GPU)
  and their candidates, total and per kind: ``fastres.kernels.tuning.SESSIONS``
  where that module exists; before it (36c6485) every first call of
  ``bn_relu_conv.choose`` for a (kind, key) with several candidates;
- the step's wall seconds (eager CPU work of the non-fused parts included)
  and the whole process's.

The processes share a fresh ``FASTRES_CACHE_DIR`` (fastres's tuning cache)
and ``TRITON_CACHE_DIR``: the first is cold, a later one sees what the first
left on disk, as a second training run on the same machine would.

Another commit (the "before" reports of ``benchmarks/results``): a git
worktree of it, with ``fastres/kernels`` linked to its ``kernels/`` (and
fastres._C copied in), run from there with ``PYTHONPATH`` set to it, and
without the editable install's import finder, which would supply
``fastres.kernels`` modules the commit lacks from this checkout (a
``sitecustomize.py`` on ``PYTHONPATH`` that drops it from ``sys.meta_path``).
Each process reports the fastres it imported.

Must run without ``TRITON_INTERPRET=1``.
"""

import argparse
import collections
import contextlib
import glob
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("benchmarks.cold_start compiles kernels for sm_90: unset TRITON_INTERPRET")

from . import stub_gpu  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def _tuning_as_on_gpu(rec, sessions: list, tuning_spans: list, clock: dict):
    """Tune as on a GPU; sessions go to ``sessions`` ({kind, candidates}), each choice's launches to ``tuning_spans``.

    ``clock["seconds"]``: time spent choosing (the candidates' compiles, and on this CPU what a GPU does
    there: ``fastres.kernels.tuning``'s comparisons of the candidates' outputs). Yields which API was
    found: ``fastres.kernels.tuning``, or ``bn_relu_conv.choose`` (36c6485).
    """
    try:
        from fastres.kernels import tuning
    except ImportError:
        tuning = None

    def spanned(choose):
        def wrapper(*args, **kwargs):
            start, t0 = len(rec.launches), time.perf_counter()
            try:
                return choose(*args, **kwargs)
            finally:
                tuning_spans.append((start, len(rec.launches)))
                clock["seconds"] += time.perf_counter() - t0
        return wrapper

    if tuning is None:  # 36c6485: bn_relu_conv.choose(kind, key, candidates, run), called by its module-level name
        from fastres.kernels import bn_relu_conv as conv

        seen = set()

        def choose(kind, key, candidates, run):
            if (kind, key) not in seen:
                seen.add((kind, key))
                if len(candidates) > 1:
                    sessions.append({"kind": kind, "candidates": len(candidates)})
                    if os.environ.get("FASTRES_AUTOTUNE") != "0":
                        for config in candidates:  # do_bench on a GPU: each candidate compiled and launched
                            run(config)
            return original(kind, key, candidates, run)  # without a GPU: the first candidate, untimed

        original = conv.choose
        with _patched(conv, "choose", spanned(choose)):
            yield "fastres.kernels.bn_relu_conv.choose (before fastres.kernels.tuning)"
        return

    # fastres.kernels.tuning: it tunes only for CUDA devices, so the stand-in's CPU tensors are presented as on a
    # CUDA device, and BENCH runs each candidate once (compiled, recorded) and gives all the same time.
    cuda = torch.device("cuda")
    original = tuning.choose
    signature = inspect.signature(original)

    def choose(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        if "device" in bound.arguments:
            bound.arguments["device"] = cuda
        return original(*bound.args, **bound.kwargs)

    first = len(tuning.SESSIONS)
    wrapped, saved = spanned(choose), []
    for mod in [m for n, m in sys.modules.items() if n.startswith("fastres") and m is not None]:
        if getattr(mod, "choose", None) is original:  # the module's name and any imported-by-name copy
            saved.append((mod, "choose", original))
            setattr(mod, "choose", wrapped)
    try:
        # Nothing runs on the stand-in device, so candidates' outputs cannot be compared (all agree), and
        # the unfused candidate's torch convolutions return empty tensors of their shapes (cuDNN's work).
        with (_patched(tuning, "BENCH", lambda fn: (fn(), 1.0)[1]),
              _patched(tuning, "agree", lambda a, b: True),
              _unfused_convolutions_skipped(),
              _patched(torch.cuda, "get_device_name", lambda device=None: "stand-in sm_90"),
              _patched(torch.cuda, "is_current_stream_capturing", lambda: False)):
            yield "fastres.kernels.tuning"
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)
        for r in tuning.SESSIONS[first:]:
            if isinstance(r, dict):
                n = r["candidates"] if isinstance(r["candidates"], int) else len(r["candidates"])
                sessions.append({"kind": r["kind"], "candidates": n})
            else:  # a tuple (kind, key, candidates, ...)
                sessions.append({"kind": r[0], "candidates": r[2] if isinstance(r[2], int) else len(r[2])})


@contextlib.contextmanager
def _unfused_convolutions_skipped():
    """torch's convolutions inside fastres's unfused candidate give empty outputs of the right shape."""
    import types

    from fastres.kernels import bn_relu_conv as conv

    def conv2d(a, weight, bias=None, stride=1, padding=0):
        n, _, h, w = a.shape
        co, _, kh, kw = weight.shape
        (sh, sw), (ph, pw) = stride, padding  # pairs, as the launchers pass them
        return a.new_empty((n, co, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1))

    shim = types.SimpleNamespace(conv2d=conv2d)
    grad = types.SimpleNamespace(conv2d_input=lambda size, weight, dy, *a, **k: dy.new_empty(size),
                                 conv2d_weight=lambda a, size, dy, *args, **k: dy.new_empty(size))
    with _patched(conv, "F", shim), _patched(torch.nn, "grad", grad):
        yield


@contextlib.contextmanager
def _compile_timer(stats: dict):
    """Calls of triton.compile (compiles and disk-cache loads) and their seconds; JITFunction binds it on first use."""
    import triton.compiler

    compile_ = triton.compiler.compile

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return compile_(*args, **kwargs)
        finally:
            stats["calls"] += 1
            stats["seconds"] += time.perf_counter() - start

    with _patched(triton.compiler, "compile", timed):
        yield


def _cubins() -> int:
    cache = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    return len(glob.glob(os.path.join(cache, "*", "*.cubin")))


def step(model_name: str, model_args: dict, batch: int, size: int, dtype: torch.dtype) -> dict:
    """One training step of the model through the stand-in device, in this process."""
    import fastres

    torch.manual_seed(0)
    model = getattr(fastres.models, model_name)(**model_args).to(dtype, memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last)
    sessions, spans, compiles, choosing = [], [], {"calls": 0, "seconds": 0.0}, {"seconds": 0.0}
    cubins = _cubins()
    with (stub_gpu.install() as rec, _compile_timer(compiles),
          _tuning_as_on_gpu(rec, sessions, spans, choosing) as tuning_api):
        rec.clear()
        rec.keep = True
        start = time.perf_counter()
        logits = model(x)
        labels = torch.randint(0, logits.shape[1], (batch,))
        F.cross_entropy(logits.float(), labels).backward()
        seconds = time.perf_counter() - start
        launches = list(rec.launches)
    tuning = set()
    for lo, hi in spans:
        tuning.update(range(lo, hi))
    by_kernel, outside = collections.defaultdict(set), set()
    for i, launch in enumerate(launches):
        h = launch.kernel.hash if launch.kernel is not None else f"{launch.name}?"
        by_kernel[launch.name].add(h)
        if i not in tuning:
            outside.add(h)
    kinds = collections.Counter(s["kind"] for s in sessions)
    candidates = collections.Counter()
    for s in sessions:
        candidates[s["kind"]] += s["candidates"]
    return {
        "step_seconds": round(seconds, 2),
        "binaries": sum(len(v) for v in by_kernel.values()),
        "binaries_by_kernel": {k: len(v) for k, v in sorted(by_kernel.items())},
        "binaries_outside_tuning": len(outside),
        "launches": len(launches),
        "tuning_launches": len(tuning),
        "triton_compile_calls": compiles["calls"],
        "triton_compile_seconds": round(compiles["seconds"], 2),
        "new_cubins_in_triton_cache": _cubins() - cubins,
        "tuning_api": tuning_api,
        "sessions": len(sessions),
        "tuning_seconds": round(choosing["seconds"], 2),
        "candidates": sum(s["candidates"] for s in sessions),
        "sessions_by_kind": dict(sorted(kinds.items())),
        "candidates_by_kind": dict(sorted(candidates.items())),
        "fastres": os.path.dirname(fastres.__file__),
    }


def _commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")  # uncommitted changes to tracked files


def _table(report: dict) -> str:
    procs = report["processes"]
    rows = [("step seconds", "step_seconds"), ("process seconds", "process_seconds"), ("binaries", "binaries"),
            ("  outside tuning", "binaries_outside_tuning"), ("launches", "launches"),
            ("  while tuning", "tuning_launches"), ("triton compile calls", "triton_compile_calls"),
            ("  seconds in them", "triton_compile_seconds"), ("new cubins on disk", "new_cubins_in_triton_cache"),
            ("tuning sessions", "sessions"), ("  candidates", "candidates"), ("  seconds choosing", "tuning_seconds")]
    lines = [f"{report['model']} batch {report['batch']} {report['size']}x{report['size']} {report['dtype']} "
             f"@ {report['commit']} (triton {report['triton']}, torch {report['torch']}; "
             f"tuning: {procs[0]['tuning_api']})",
             f"{'':34}" + "".join(f"{'process ' + str(i + 1):>12}" for i in range(len(procs)))]
    for label, key in rows:
        lines.append(f"{label:34}" + "".join(f"{p[key]:>12}" for p in procs))
    for title, key in (("binaries", "binaries_by_kernel"), ("sessions", "sessions_by_kind"),
                       ("candidates", "candidates_by_kind")):
        for name in sorted({k for p in procs for k in p[key]}):
            lines.append(f"{'  ' + title + ' ' + name:34}" + "".join(f"{p[key].get(name, 0):>12}" for p in procs))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="densenet121", help="a builder of fastres.models (densenet121, resnet50...)")
    parser.add_argument("--model-args", type=json.loads, default={}, help="the builder's keyword arguments, as JSON")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--processes", type=int, default=2, help="fresh processes run one after the other")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run the step here, write its JSON there
    args = parser.parse_args(argv)
    if args.child:
        with open(args.child, "w") as f:
            json.dump(step(args.model, args.model_args, args.batch, args.size, DTYPES[args.dtype]), f)
        return 0

    import triton

    tmp = tempfile.mkdtemp(prefix="fastres-cold-start-")
    env = {**os.environ, "FASTRES_CACHE_DIR": os.path.join(tmp, "fastres"),
           "TRITON_CACHE_DIR": os.path.join(tmp, "triton")}
    processes = []
    try:
        for i in range(args.processes):
            out = os.path.join(tmp, f"process{i + 1}.json")
            start = time.perf_counter()
            run = subprocess.run([sys.executable, "-m", "benchmarks.cold_start", "--model", args.model,
                                  "--model-args", json.dumps(args.model_args), "--batch", str(args.batch),
                                  "--size", str(args.size), "--dtype", args.dtype, "--child", out], cwd=ROOT, env=env)
            if run.returncode != 0:
                sys.exit(f"benchmarks.cold_start: process {i + 1} failed (exit status {run.returncode})")
            with open(out) as f:
                processes.append({"process_seconds": round(time.perf_counter() - start, 2), **json.load(f)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = {"model": args.model, "model_args": args.model_args, "batch": args.batch, "size": args.size,
              "dtype": args.dtype, "commit": _commit(), "triton": triton.__version__, "torch": torch.__version__,
              "target": "sm_90 (compiled by Triton's NVIDIA backend through benchmarks/stub_gpu.py, nothing run)",
              "processes": processes}
    print(_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
