"""``fastres train``'s checkpoints: written atomically, pruned to the last ``--keep``, found again on resume.

A checkpoint is one ``torch.save`` file of plain data (tensors, numbers,
strings, lists, dicts), readable with ``torch.load(weights_only=True)``: no
pickled code. ``OUTPUT/step-00001200.pt`` holds the state after that many
optimizer steps; ``OUTPUT/best.pt`` a copy of the one with the best held-out
accuracy; ``summary.csv`` and ``summary.json`` a row per evaluation.

Every file is written to a temporary name in the same folder, flushed to disk
(fsync) and renamed over its target, then the folder itself is synced: a
reader sees the old file or the new one, never a part. Older checkpoints are
deleted only after a newer one is complete.
"""

import csv
import io
import json
import os
import random
import re
from pathlib import Path

import torch

FORMAT = "fastres-train-checkpoint"
VERSION = 1
STEP_FILE = re.compile(r"^step-(\d+)\.pt$")
BEST = "best.pt"


class CheckpointError(Exception):
    """A checkpoint that cannot be read (missing, truncated, corrupt, or not fastres's); the message names it."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory descriptors
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """``write(file)`` to a temporary file beside ``path``, synced, then renamed to ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save(state: dict, path: Path) -> None:
    atomic_write(path, lambda f: torch.save({"format": FORMAT, "version": VERSION, **state}, f))


def load(path: Path) -> dict:
    """A checkpoint's contents on the CPU; ``CheckpointError`` naming ``path`` when it cannot be used."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder, not a checkpoint file (for its newest checkpoint: "
                              f"--output {path} --resume auto)")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, bad pickle, unsafe content
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {reason}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fastres train checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {state.get('version')}, this fastres reads {VERSION}")
    return state


def rng_state() -> dict:
    """Every random generator a training step may draw from: torch (CPU and CUDA), numpy, Python."""
    state = {"torch": torch.get_rng_state(), "python": _python_state(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return state
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)}
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))


def _python_state(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


class Folder:
    """``--output DIR``: its step checkpoints, the best one, and the summary of each evaluation."""

    def __init__(self, path: Path, keep: int):
        self.path, self.keep = Path(path), keep

    def prepare(self, resuming: bool) -> None:
        """Create the folder; refuse one holding another run's checkpoints unless the run resumes."""
        if self.path.exists() and not self.path.is_dir():
            raise SystemExit(f"--output {self.path}: not a directory")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SystemExit(f"--output {self.path}: cannot create it: {err.strerror or err}") from None
        found = self.steps()
        if found and not resuming:
            raise SystemExit(f"--output {self.path} already holds checkpoints ({found[0][1].name}, ...): continue that "
                             "run with --resume auto, or give another --output (nothing there was changed)")
        for stale in self.path.glob(".*.tmp"):  # a write that never completed (the process was killed)
            stale.unlink(missing_ok=True)

    def step_path(self, step: int) -> Path:
        return self.path / f"step-{step:08d}.pt"

    def steps(self) -> list[tuple[int, Path]]:
        """The step checkpoints here, newest first."""
        found = [(int(m.group(1)), p) for p in self.path.glob("step-*.pt") if (m := STEP_FILE.match(p.name))]
        return sorted(found, reverse=True)

    def save(self, state: dict, step: int, best: bool) -> Path:
        path = self.step_path(step)
        for target in (path, self.path / BEST) if best else (path,):
            try:
                save(state, target)
            except (OSError, RuntimeError) as err:  # disk full, quota, permissions (torch's writer: RuntimeError)
                reason = getattr(err, "strerror", None) or (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise SystemExit(f"cannot write checkpoint {target}: {reason}; the checkpoints already "
                                 f"in {self.path} are intact (resume from them with --resume auto)") from None
        for _, old in self.steps()[self.keep:]:  # only now that the new one is complete
            old.unlink(missing_ok=True)
        return path

    def latest_good(self, say) -> tuple[dict, Path] | None:
        """The newest step checkpoint that loads; each unreadable newer one is reported through ``say``."""
        candidates = self.steps()
        for i, (_, path) in enumerate(candidates):
            try:
                return load(path), path
            except CheckpointError as err:
                nxt = candidates[i + 1][1].name if i + 1 < len(candidates) else None
                say(f"--resume auto: {err}; " + (f"falling back to {nxt}" if nxt else "no older checkpoint"))
        if candidates:
            raise CheckpointError(f"{self.path}: no readable checkpoint among {', '.join(p.name for _, p in candidates)}")
        return None

    def write_summary(self, rows: list[dict]) -> None:
        if not rows:
            return
        atomic_write(self.path / "summary.json", lambda f: f.write((json.dumps(rows, indent=1) + "\n").encode()))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.path / "summary.csv", lambda f: f.write(text.getvalue().encode()))
