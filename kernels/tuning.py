"""Which launch config a kernel takes at a shape: tuned once per device, remembered on disk, checked.

``choose(kind, bucket, candidates, run, ...)`` returns one of ``candidates``
for launches whose problem falls in ``bucket`` (the caller's shape bucket:
dtypes, kernel size, stride, each dimension as the tile block it fits, and
the output positions' size class; see ``bn_relu_conv._bucket``).

- **Fixed** (no timing at all): the first candidate, a known-good heuristic
  config, whenever there is nothing to time on (the interpreter, a stand-in
  device), with ``FASTRES_AUTOTUNE=0``, under
  ``torch.use_deterministic_algorithms(True)`` (results then depend on
  nothing but the inputs and the device: bitwise equal across processes),
  and while the current CUDA stream is capturing a graph (timing would
  break the capture; the fixed config is used and not remembered).
- **Tuned**: otherwise each candidate runs under ``BENCH`` (Triton's
  ``do_bench``) and the fastest wins. Before timing, every candidate's
  output is compared with the first candidate's on the same inputs; one
  that disagrees (a miscompile) is dropped with a warning, so it can never
  reach a user; so is one that Triton cannot build here (a compile, ptxas or
  resource error), the first candidate included. Where none builds, the first
  one's error is raised.
- **Remembered**: choices live in one JSON file per device name and
  fastres/Triton/torch versions, under ``FASTRES_CACHE_DIR`` (default
  ``$XDG_CACHE_HOME/fastres`` or ``~/.cache/fastres``), written atomically;
  a second process reads them and tunes nothing. A corrupt file is ignored
  with a warning.

``SESSIONS`` records each choice that tuning had to make (or would have had
to, on a GPU): what ``benchmarks.cold_start`` counts.
"""

import functools
import json
import os
import tempfile
import warnings
from typing import Callable, Sequence

import torch

from .launch import capturing

SESSIONS: list[dict] = []  # {"kind", "bucket", "candidates", "tuned"} per choice not found in a cache
LAST: dict = {}  # kind -> the config its latest launch took (what benchmarks report as the winner)
BENCH: Callable | None = None  # times a callable in ms; None: triton.testing.do_bench on the GPU

_chosen: dict[str, dict] = {}  # cache file path -> {bucket string: config}


def autotune_enabled() -> bool:
    """False when configs must be fixed: ``FASTRES_AUTOTUNE=0`` or deterministic algorithms requested."""
    return os.environ.get("FASTRES_AUTOTUNE", "1") != "0" and not torch.are_deterministic_algorithms_enabled()


def cache_dir() -> str:
    base = os.environ.get("FASTRES_CACHE_DIR")
    if base:
        return base
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "fastres")


@functools.cache  # reading package metadata costs a millisecond: once per process
def _versions() -> str:
    import triton

    try:
        from importlib.metadata import version

        own = version("fastres")
    except Exception:  # running from a source tree
        own = "src"
    return f"fastres{own}-triton{triton.__version__}-torch{torch.__version__}"


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _can_time(device: torch.device) -> bool:
    """Whether launches on ``device`` run on a GPU that candidates can be timed on."""
    return device.type == "cuda"


def cache_path(device: torch.device) -> str:
    """The tuning file for ``device``: one per device name and versions."""
    return _file_name(cache_dir(), _device_name(device))


@functools.cache
def _file_name(directory: str, name: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{name}-{_versions()}")
    return os.path.join(directory, f"tuning-{safe}.json")


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            raise ValueError("not a mapping of buckets to configs")
        return data
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        warnings.warn(f"fastres: ignoring the unreadable tuning cache {path} ({e}); configs will be tuned again")
        return {}


def _write(path: str, entries: dict) -> None:
    """Merge ``entries`` into the file at ``path`` (what other processes wrote is kept); atomic replace."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        merged = {**_read(path), **entries}
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tuning-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(merged, f, indent=0, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a read-only home must not stop training: the choice stays in memory
        warnings.warn(f"fastres: could not write the tuning cache {path} ({e})")


def _table(device: torch.device) -> tuple[str, dict]:
    path = cache_path(device)
    table = _chosen.get(path)
    if table is None:
        table = _chosen[path] = _read(path)
    return path, table


def _capturing(device: torch.device) -> bool:
    return _can_time(device) and capturing(device)


def _as_config(stored, candidates: Sequence):
    """The candidate equal to a stored (JSON) config, or None if it is no longer one of them."""
    for c in candidates:
        if list(c) == stored:
            return c
    return None


def agree(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    """Whether two configs' outputs are the same computation: NaN/Inf at the same places, finite values
    within a normwise bound that rounding in another summation order stays far below, a miscompile far above."""
    for x, y in zip(a, b):
        if not torch.equal(x.isnan(), y.isnan()) or not torch.equal(x.isinf(), y.isinf()):
            return False
        if x.isinf().any() and not torch.equal(x[x.isinf()], y[y.isinf()]):
            return False
        finite = x.isfinite()
        xf, yf = x[finite].double(), y[finite].double()
        bound = {torch.float16: 2e-2, torch.bfloat16: 2e-2}.get(x.dtype, 1e-3 if x.dtype == torch.float32 else 1e-9)
        if (xf - yf).norm() > bound * max(yf.norm().item(), 1e-30):
            return False
    return True


def choose(kind: str, bucket: tuple, candidates: Sequence, run: Callable, device: torch.device,
           outputs: Callable[[], Sequence[torch.Tensor]] | None = None):
    """The config for launches of ``kind`` in ``bucket`` (see the module's docstring).

    ``run(config)`` launches once with ``config``; ``outputs()`` returns the
    tensors a launch writes (compared between candidates before timing).
    """
    config = _choose(kind, bucket, candidates, run, device, outputs)
    LAST[kind] = config
    return config


def _choose(kind, bucket, candidates, run, device, outputs):
    if len(candidates) == 1 or not autotune_enabled():  # fixed: nothing but the inputs decides the result
        return candidates[0]
    key = repr((kind, bucket))
    path, table = _table(device)
    stored = table.get(key)
    if stored is not None:
        config = _as_config(stored, candidates)
        if config is not None:
            return config
    in_capture = _capturing(device)
    timed = _can_time(device) and not in_capture
    SESSIONS.append({"kind": kind, "bucket": bucket, "candidates": len(candidates), "tuned": timed})
    if not timed:
        if not in_capture:
            table[key] = list(candidates[0])  # fixed: remembered in this process only
        return candidates[0]
    best = tune(kind, candidates, run, outputs)
    table[key] = list(best)
    _write(path, {key: table[key]})
    return best


def _build_errors() -> tuple:
    """What Triton raises for a kernel it cannot build on this machine: compile, ptxas and resource errors."""
    try:
        from triton.errors import TritonError
    except ImportError:
        return ()
    return (TritonError,)


def tune(kind: str, candidates: Sequence, run: Callable, outputs: Callable | None):
    """The fastest candidate that builds and whose outputs agree with the first such candidate's."""
    bench = BENCH
    if bench is None:
        import triton.testing

        bench = lambda fn: triton.testing.do_bench(fn, warmup=3, rep=10)  # noqa: E731
    reference, reference_config, failures, timings = None, None, [], []
    for config in candidates:
        try:
            if outputs is not None:
                run(config)
                if reference is None:
                    reference, reference_config = [t.clone() for t in outputs()], config
                elif not agree(outputs(), reference):
                    warnings.warn(f"fastres: {kind} config {tuple(config)} disagrees with the reference config "
                                  f"{tuple(reference_config)} on the same inputs (a miscompile?); it is not used")
                    continue
            timings.append((bench(lambda c=config: run(c)), config))
        except _build_errors() as err:
            first_line = next(iter(str(err).strip().splitlines()), "")
            warnings.warn(f"fastres: {kind} config {tuple(config)} cannot be built here "
                          f"({type(err).__name__}: {first_line}); it is not used")
            failures.append(err)
    if not timings:  # (the first candidate that builds is always timed)
        raise failures[0]
    return min(timings, key=lambda t: t[0])[1]


def forget() -> None:
    """Drop every in-memory choice (tests; the files stay)."""
    _chosen.clear()
