"""One model being trained by ``fastres train``: its optimizer, schedule, step, evaluation and saved state.

``model`` is the module itself (its state_dict has the builder's keys);
``net`` is what runs a step: the model, or the model wrapped in
DistributedDataParallel and/or ``torch.compile``. With ``cuda_graphs`` the
whole step (forward, loss, backward, clipping, optimizer) is captured into a
CUDA graph after ``GRAPH_WARMUP`` eager steps and replayed from then on; the
learning rate is a tensor the graph reads, so the schedule still applies.
"""

import argparse
import statistics

import torch
import torch.nn.functional as F

from . import optim
from .measure import StepMemory, step_spread, timed

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SKIP = 1  # first steps left out of the median step time and the peak memory
GRAPH_WARMUP = 3  # eager steps (on a side stream) before the step is captured


class Trainee:
    def __init__(self, label: str, model: torch.nn.Module, device, args: argparse.Namespace, total_steps: int,
                 dtype: torch.dtype = torch.float32, wrap=None):
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        self.label, self.device, self.fmt, self.dtype = label, device, fmt, dtype
        self.amp = autocast_dtype(args.amp)
        # fp16's narrow range needs the loss scaled (bf16 has float32's)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp == torch.float16 else None
        self.model = model.to(device, dtype, memory_format=fmt).train()
        self.net = wrap(self.model) if wrap else self.model
        if args.compile:
            self.net = torch.compile(self.net)
        self.cuda_graphs = args.cuda_graphs
        self.optimizer = optim.make_optimizer(self.model.parameters(), args, capturable=self.cuda_graphs)
        self.scheduler = optim.make_scheduler(self.optimizer, args, total_steps)
        self.label_smoothing, self.grad_clip = args.label_smoothing, args.grad_clip
        self.history = {"loss": [], "accuracy": [], "lr": [], "step_ms": [], "memory_mb": []}
        self.starts = [0]  # where each process's steps begin in the history (a resumed run has several)
        self.test_accuracy: float | None = None
        self.test_loss: float | None = None
        self._graph = None
        self._eager_steps = 0

    # ------------------------------------------------------------------ the step

    def _compute(self, x, y):
        with torch.autocast(self.device.type, dtype=self.amp or torch.bfloat16, enabled=self.amp is not None):
            logits = self.net(x)
            loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # clipping sees the true gradients
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)  # skipped when a gradient is not finite; the scale then shrinks
            self.scaler.update()
        return loss.detach(), logits.detach()

    def _eager(self, x, y):
        self.optimizer.zero_grad(set_to_none=True)
        return self._compute(x, y)

    def _graphed(self, x, y):
        if self._graph is None and self._eager_steps < GRAPH_WARMUP:
            self._eager_steps += 1
            side = torch.cuda.Stream(self.device)  # warm-up off the default stream, as capture needs
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                out = self._eager(x, y)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return out
        if self._graph is None:  # capture this step's computation; it runs by the replay below
            self._static = (x.clone(), y.clone())
            self.optimizer.zero_grad(set_to_none=True)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._static_out = self._compute(*self._static)
        self._static[0].copy_(x)
        self._static[1].copy_(y)
        self._graph.replay()
        return tuple(t.clone() for t in self._static_out)

    def step(self, x, y, reduce=None) -> torch.Tensor:
        """One optimizer step on ``(x, y)``; records loss, batch accuracy, learning rate, time, memory.

        ``reduce(tensor)`` averages a statistic over processes (DDP), so the recorded
        loss and accuracy are the whole global batch's.
        """
        lr = float(self.optimizer.param_groups[0]["lr"])  # this step's (a tensor under --cuda-graphs)

        def run():
            loss, logits = (self._graphed if self.cuda_graphs else self._eager)(x, y)
            self.scheduler.step()
            return loss, logits.float()

        with StepMemory(self.device, trim=True) as mem:  # CPU: free heap handed back, so the step's growth shows
            (loss, logits), seconds = timed(run, self.device)
        stats = torch.stack([loss.double(), (logits.argmax(1) == y).double().mean()])
        if reduce is not None:
            stats = reduce(stats)
        h = self.history
        h["loss"].append(stats[0].item())
        h["accuracy"].append(stats[1].item())
        h["lr"].append(lr)
        h["step_ms"].append(seconds * 1e3)
        h["memory_mb"].append(mem.peak_mb)
        return logits

    # ------------------------------------------------------------------ evaluation and summary

    def evaluate(self, batches) -> tuple[float | None, float | None]:
        """Held-out accuracy and mean loss over ``batches``; kept as ``test_accuracy`` / ``test_loss``."""
        self.test_accuracy, self.test_loss = evaluate(self.model, batches, self.device, self.dtype, self.fmt, self.amp)
        return self.test_accuracy, self.test_loss

    def summary(self) -> dict:
        h = self.history
        # A process's first steps (one-time allocations, autotuning) are left out: the run's, and a resumed one's.
        cold = {start + i for start in self.starts for i in range(SKIP)}
        kept = [i for i in range(len(h["step_ms"])) if i not in cold] or [len(h["step_ms"]) - 1]
        memory = [h["memory_mb"][i] for i in kept if h["memory_mb"][i] is not None]
        return {
            "label": self.label, "test_accuracy": self.test_accuracy, "test_loss": self.test_loss,
            "median_step_ms": statistics.median(h["step_ms"][i] for i in kept),
            "step_spread": step_spread([h["step_ms"][i] / 1e3 for i in kept]), "measured_steps": len(kept),
            "peak_memory_mb": max(memory) if memory else None,
            "final_loss": h["loss"][-1],
        }

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "history": self.history, "starts": self.starts,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.cuda_graphs:  # the captured step reads the learning rate from a tensor on the device
            for group in self.optimizer.param_groups:
                group["lr"] = torch.as_tensor(group["lr"], device=self.device)
        self.scheduler.load_state_dict(state["scheduler"])
        self.history = {k: list(v) for k, v in state["history"].items()}
        self.starts = [*state["starts"], len(self.history["loss"])]
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])


@torch.no_grad()
def autocast_dtype(amp) -> torch.dtype | None:
    """``--amp``'s autocast dtype (None: off); True is an older checkpoint's bf16."""
    return AMP_DTYPES["bf16" if amp is True else amp] if amp else None


def evaluate(model, batches, device, dtype, fmt=torch.contiguous_format, amp=None) -> tuple[float | None, float | None]:
    """``model``'s accuracy and mean cross-entropy over ``batches`` in eval mode (train mode restored after)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    loss = 0.0
    for x, y in batches:
        x, y = x.to(device, dtype).contiguous(memory_format=fmt), y.to(device)
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            logits = model(x).to(dtype)  # bf16 under autocast: the loss in the parameters' precision
        correct += (logits.argmax(1) == y).sum().item()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        total += len(y)
    model.train(was_training)
    return (correct / total, loss / total) if total else (None, None)


def compare_state(reference: torch.nn.Module, fused: torch.nn.Module) -> dict:
    """Largest |difference| of parameters and BN running statistics; whether the BN counters agree."""
    fs = fused.state_dict()
    params = {n for n, _ in reference.named_parameters()}
    out = {"parameters": 0.0, "running_stats": 0.0, "num_batches_tracked_agree": True}
    for name, r in reference.state_dict().items():
        f = fs[name]
        if name.endswith("num_batches_tracked"):
            out["num_batches_tracked_agree"] &= bool(torch.equal(r, f))
            continue
        diff = (r.double() - f.double()).abs().max().item() if r.numel() else 0.0
        key = "parameters" if name in params else "running_stats" if name.endswith(("running_mean", "running_var")) else None
        if key:
            out[key] = max(out[key], diff)
    return out
