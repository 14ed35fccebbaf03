"""Stopping ``fastres train`` cleanly: SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption) ends the run
after the current step, with a checkpoint; a second Ctrl-C stops it at once.

Under torchrun every process must stop after the same step (a process that
stops alone leaves the others waiting in a collective), so the processes agree
on it after each step: one all-reduce of a flag.
"""

import signal
import sys
import threading

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stop:
    """``with Stop() as stop:`` ... ``stop.requested(procs, device)`` after each step."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: at once
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False

    def requested(self, world: int, device: torch.device) -> bool:
        if world == 1:
            return self.signal is not None
        flag = torch.tensor([0 if self.signal is None else 1], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signal is None:
            self.signal = signal.SIGTERM  # another process was told to stop
        return bool(flag.item())

    @property
    def exit_status(self) -> int:
        return 128 + int(self.signal)
