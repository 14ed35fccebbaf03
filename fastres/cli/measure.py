"""What the commands measure with: a training step, memory during it, and the machine it ran on.

CPU memory is the process's resident set from ``/proc/self/status``. Why not
``resource.getrusage(RUSAGE_SELF).ru_maxrss``: on Linux it is the larger of
this address space's high-water mark and one inherited at exec from the
parent's (``signal->maxrss``), which no call can reset. ``VmHWM`` is this
address space's alone, and writing 5 to ``/proc/self/clear_refs`` (Linux >=
4.0) resets it to the current resident set, so the peak of one step can be
read on its own. CUDA memory is the caching allocator's
``max_memory_allocated``.
"""

import contextlib
import ctypes
import datetime
import gc
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

MB = 2**20
REPO = Path(__file__).resolve().parents[2]  # the source checkout, when fastres runs from one


def memory_format(layout: str) -> torch.memory_format:
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed-precision training's context: fp32 parameters, ``dtype`` compute; nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def training_step(model, optimizer, images, labels, device, dtype):
    """One step of a training loop: zero_grad, forward (autocast for low precision), cross-entropy, backward, SGD."""

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()

    return step


# --------------------------------------------------------------------------- CPU resident set


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}: CPU memory needs Linux")
    return int(match.group(1))


def rss() -> int:
    """Bytes resident now."""
    return _status_kb("VmRSS") * 1024


def rss_peak() -> int:
    """The resident set's high-water mark (bytes) since start or the last ``reset_rss_peak``."""
    return _status_kb("VmHWM") * 1024


def reset_rss_peak() -> bool:
    """Reset the high-water mark to the current resident set; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Collect garbage and hand glibc's free heap back, so the resident set is what is alive."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc only; elsewhere the baseline keeps free heap


def cpu_memory_available() -> bool:
    try:
        rss()
    except (OSError, RuntimeError):
        return False
    return True


class StepMemory:
    """Peak memory one call adds above what was in use before it, per device.

    ``with StepMemory(device) as m: step()`` then ``m.peak_mb`` (None where it
    cannot be measured: a non-Linux CPU).
    """

    def __init__(self, device: torch.device, trim: bool = False):
        self.device = device
        self.trim = trim  # CPU: release free heap first (slower; steadier baselines)
        self.peak_mb: float | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif cpu_memory_available():
            if self.trim:
                release_free_memory()
            self._before = rss()
            self._reset = reset_rss_peak()
            self._mark = rss_peak()
        else:
            self._before = None
        return self

    def __exit__(self, *exc):
        if self._before is None:
            return False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = rss_peak()
            if not self._reset and peak <= self._mark:  # an older, higher mark hides this call's peak
                return False
        self.peak_mb = max(peak - self._before, 0) / MB
        return False


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[object, float]:
    """``(fn(), seconds)``, the device synchronised on both sides."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


# --------------------------------------------------------------------------- how far step times can be trusted
#
# A median step time says which of two entries is faster only when it rests on
# more than one step and the steps agree with each other more closely than the
# two medians differ. Every command that prints compared times judges them here
# (``timing_doubts``), marks the doubted cells with DOUBT_MARK and prints
# ``timing_note`` under its table.

DOUBT_MARK = "(?)"
ONE_STEP = "1 measured step (no spread to judge it by)"


def step_spread(times_s) -> dict:
    """Per-step times (seconds) summarised: ``n``, ``min_s``, ``q1_s``, ``median_s``, ``q3_s``, ``max_s``.

    Quartiles by ``statistics.quantiles(method="inclusive")``; one time is its own quartiles.
    """
    times = sorted(times_s)
    if not times:
        raise ValueError("step_spread needs at least one time")
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else times * 3
    return {"n": len(times), "min_s": times[0], "q1_s": q1, "median_s": median, "q3_s": q3, "max_s": times[-1]}


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.3g} ms"


def timing_doubts(spreads: dict, reference: str | None = None) -> dict[str, list[str]]:
    """Why each entry's time cannot be trusted: ``{label: [reason, ...]}``, an empty list where it can.

    ``spreads`` maps a label to a ``step_spread``-like dict (``n``, ``median_s``,
    ``q1_s``, ``q3_s``; ``median_s`` is the time the table prints). An entry is
    doubted when it rests on one measured step (``ONE_STEP``), or when the
    larger q1-q3 spread of it and an entry it is compared with exceeds the
    difference of their medians: which of the two is faster is then within
    step-to-step noise. Entries are compared with ``reference`` (and it with
    each of them), or each with each when ``reference`` is None. A reason about
    a pair names both entries and is the same string for both.
    """
    doubts = {label: [ONE_STEP] if s["n"] < 2 else [] for label, s in spreads.items()}
    labels = list(spreads)
    if reference is not None and reference in spreads:
        pairs = [(reference, label) for label in labels if label != reference]
    else:
        pairs = [(a, b) for i, a in enumerate(labels) for b in labels[i + 1:]]
    for a, b in pairs:
        sa, sb = spreads[a], spreads[b]
        if sa["n"] < 2 or sb["n"] < 2:
            for label, other in ((a, b), (b, a)):
                if spreads[label]["n"] >= 2 and spreads[other]["n"] < 2:
                    doubts[label].append(f"compared with {other}, which rests on 1 measured step")
            continue
        spread = max(sa["q3_s"] - sa["q1_s"], sb["q3_s"] - sb["q1_s"])
        difference = abs(sa["median_s"] - sb["median_s"])
        if spread > difference:
            reason = f"q1-q3 spread {_ms(spread)} is larger than the {_ms(difference)} difference between {a} and {b}"
            doubts[a].append(reason)
            doubts[b].append(reason)
    return doubts


def timing_note(doubts: dict[str, list[str]], advice: str,
                lead: str = f"{DOUBT_MARK} step times not to be trusted") -> str | None:
    """One line for under a table: ``lead``, what the doubted entries have against them, ``advice``.

    None when nothing is doubted.
    """
    one_step = [label for label, reasons in doubts.items() if ONE_STEP in reasons]
    others = list(dict.fromkeys(r for reasons in doubts.values() for r in reasons if r != ONE_STEP))
    if not one_step and not others:
        return None
    parts = []
    if one_step:
        who = "every entry" if len(one_step) == len(doubts) > 1 else ", ".join(one_step)
        parts.append(f"{who}: {ONE_STEP}")
    parts += others
    return f"{lead}: {'; '.join(parts)}. {advice}"


# --------------------------------------------------------------------------- the machine


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        if match:
            name = match.group(1).strip()
    return f"cpu {name} ({os.cpu_count()} cores)"


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def environment(device: str | torch.device) -> dict:
    """Versions, the device's name, the checkout's commit and the date: what a result needs beside it."""
    import fastres

    return {
        "device_name": device_name(device), "torch": torch.__version__, "triton": triton_version(),
        "cuda": torch.version.cuda, "python": sys.version.split()[0], "fastres": fastres.__version__, **commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def commit() -> dict:
    """The checkout's commit (``+dirty`` when tracked files differ) and the tracked files that do; None outside one."""
    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=True).stdout

    if not (REPO / ".git").exists():
        return {"commit": None, "dirty_files": None}
    try:
        head = git("rev-parse", "--short=12", "HEAD").strip()
        dirty = [line[3:] for line in git("status", "--porcelain", "-uno").splitlines()]
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty_files": None}
    return {"commit": head + ("+dirty" if dirty else ""), "dirty_files": dirty}
