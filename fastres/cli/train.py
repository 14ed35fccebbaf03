"""Train a fastres model, optionally next to the model it replaces, on the same batches.

    fastres train --model resnet18 --compare eager --steps 30
    fastres train --model densenet_bc --depth 40 --compare naive --steps 20 --plot train.png
    fastres train --model resnet50 --data ~/imagenette --epochs 2 --device cuda --amp --channels-last

With ``--compare`` both models start from the same weights (fastres's loads
the reference's state_dict) and see the same batches in the same order with
the same optimizer and schedule (``--opt``: SGD with momentum 0.9 or AdamW;
``--sched``, ``--warmup-steps``, ``--weight-decay``, ``--label-smoothing``,
``--grad-clip``; see ``fastres.cli.optim``). A progress bar shows
each model's loss, batch accuracy, step time and step memory; the summary
table gives held-out accuracy, median step time and peak step memory, each as
a ratio to the compared model.

Step memory is the peak during a step minus what was in use before it
(weights, optimizer state and inputs excluded): the CUDA caching allocator's
``max_memory_allocated`` on a GPU, the process's resident set (VmHWM, reset
before each step) on a CPU. The first step (one-time allocations, autotuning)
is left out of the median time and the peak. A median step time that rests on
one step, or whose q1-q3 spread is larger than its difference from the other
model's, is marked (?) with a line under the table saying why and what to do
(``timing_trusted``, ``timing_doubts`` and ``step_spread`` in ``--json``).

``--check-agreement`` (with ``--compare``) also checks that the two models
compute the same thing. Both train in float64 then: in float32 a batch-norm
output a few ulps either side of zero flips a ReLU's gradient, and two
correct models drift apart within a few steps. Logits must agree within 1e-7
(relative to their magnitude) at every step and BatchNorm
``num_batches_tracked`` at the end; the largest parameter and running-statistic
differences are reported. Against ``--compare checkpoint`` the BatchNorm
buffers are not compared: torchvision's checkpointing runs each layer's first
batch norm again in backward, updating them twice per step. Exit status 1 when
the check fails or a loss is not finite.
"""

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from . import optim, zoo
from .argtypes import bc_depth, non_negative, positive, positive_float
from .measure import DOUBT_MARK, StepMemory, environment, step_spread, timed, timing_doubts, timing_note

LOGIT_TOL = 1e-7  # float64: max |logit difference| / max(1, max |logit|) allowed at each step
SKIP = 1  # first steps left out of the median step time and the peak memory
TIMING_ADVICE = "Train more --steps on an otherwise idle machine (fewer threads: OMP_NUM_THREADS=1)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=zoo.MODELS, default="resnet18", metavar="MODEL",
                   help=f"a fastres.models builder (default: resnet18): {', '.join(zoo.MODELS)}")
    p.add_argument("--depth", type=bc_depth, help="densenet_bc: depth 6n+4 (default: 100)")
    p.add_argument("--growth-rate", type=positive, help="densenet_bc: growth rate k (default: 12)")
    p.add_argument("--compare", choices=zoo.COMPARE,
                   help="also train the model that fastres's replaces: eager (torchvision's, timm's for resnetv2), "
                        "naive or checkpoint (DenseNets: torchvision's with memory_efficient=False / True) (default: none)")
    p.add_argument("--check-agreement", action="store_true",
                   help="train both in float64 and fail unless they compute the same logits and BatchNorm "
                        "counters (needs --compare)")
    p.add_argument("--data", type=Path, metavar="DIR",
                   help="an image folder (torchvision ImageFolder layout; train/ and val/ if present); "
                        "default: scikit-learn's digits, upscaled")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=positive, help="passes over the training set (default: 1)")
    length.add_argument("--steps", type=positive, help="optimizer steps, instead of --epochs (default: an epoch's)")
    p.add_argument("--batch-size", type=positive, default=64, help="images per step (default: %(default)s)")
    p.add_argument("--image-size", type=positive, help="image side in pixels (default: 32 for digits, 224 for --data)")
    p.add_argument("--lr", type=positive_float, default=0.05, help="peak learning rate (default: %(default)s)")
    optim.add_arguments(p)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--channels-last", action="store_true", help="models and inputs in channels_last")
    p.add_argument("--seed", type=int, default=0, help="weights, data order and augmentation (default: %(default)s)")
    p.add_argument("--log-every", type=non_negative, default=0, metavar="N",
                   help="print each model's loss, accuracy and learning rate every N steps (default: 0, never)")
    p.add_argument("--workers", type=int, default=2, help="--data: DataLoader worker processes (default: 2)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the configuration, every step and the summary (default: none)")
    p.add_argument("--plot", type=Path, metavar="PNG", help="loss, step time and memory per step, with matplotlib (default: none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _device(text: str, parser) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        parser.error(f"argument --device: not a device: {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"argument --device: fastres trains on cpu or cuda, got {text!r}")
    return device


def fastres_path(device: torch.device, model: str, amp: bool = False) -> str:
    """Which implementation fastres's ops dispatch to for ``model`` on ``device``."""
    from fastres import ops

    if ops.use_triton(torch.empty(0, device=device)):
        return "Triton kernels on CUDA" if device.type == "cuda" else "Triton interpreter on CPU"
    dense = ""
    if zoo.is_densenet(model):  # fastres._C's ops take float32/float64: CPU autocast runs the naive blocks
        dense = "; dense blocks run naive under CPU autocast" if amp else "; dense blocks share storage through fastres._C"
    return f"eager PyTorch reference ops on {device.type.upper()}{dense} (the fused Triton kernels run on CUDA)"


class Trainee:
    """One model being trained: its optimizer and what each step measured."""

    def __init__(self, label: str, model: torch.nn.Module, device, channels_last: bool, args: argparse.Namespace,
                 total_steps: int, dtype: torch.dtype = torch.float32):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.label = label
        self.model = model.to(device, dtype, memory_format=fmt).train()
        self.optimizer = optim.make_optimizer(model.parameters(), args)
        self.scheduler = optim.make_scheduler(self.optimizer, args, total_steps)
        self.label_smoothing, self.grad_clip = args.label_smoothing, args.grad_clip
        self.history = {"loss": [], "accuracy": [], "lr": [], "step_ms": [], "memory_mb": []}
        self.test_accuracy: float | None = None

    def step(self, x, y, amp: bool, device) -> torch.Tensor:
        def run():
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = self.model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
            loss.backward()
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            return loss.detach(), logits.detach().float()

        lr = self.optimizer.param_groups[0]["lr"]  # this step's

        with StepMemory(device, trim=True) as mem:  # CPU: free heap handed back, so the step's growth shows
            (loss, logits), seconds = timed(run, device)
        h = self.history
        h["loss"].append(loss.item())
        h["accuracy"].append((logits.argmax(1) == y).float().mean().item())
        h["lr"].append(lr)
        h["step_ms"].append(seconds * 1e3)
        h["memory_mb"].append(mem.peak_mb)
        return logits

    def summary(self) -> dict:
        h = self.history
        kept = slice(min(SKIP, len(h["step_ms"]) - 1), None)
        memory = [m for m in h["memory_mb"][kept] if m is not None]
        return {
            "label": self.label, "test_accuracy": self.test_accuracy,
            "median_step_ms": statistics.median(h["step_ms"][kept]),
            "step_spread": step_spread([ms / 1e3 for ms in h["step_ms"][kept]]),
            "peak_memory_mb": max(memory) if memory else None,
            "final_loss": h["loss"][-1],
        }

    @torch.no_grad()
    def evaluate(self, data, amp: bool, device, channels_last: bool, dtype: torch.dtype) -> None:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model.eval()
        correct = total = 0
        for x, y in data.test_batches(256):
            x, y = x.to(device, dtype).contiguous(memory_format=fmt), y.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                correct += (self.model(x).argmax(1) == y).sum().item()
            total += len(y)
        self.model.train()
        self.test_accuracy = correct / total if total else None


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


def _postfix(trainees) -> str:
    parts = []
    for t in trainees:
        h = t.history
        mem = h["memory_mb"][-1]
        parts.append(f"{t.label}: loss {h['loss'][-1]:.3f} acc {h['accuracy'][-1]:.2f} "
                     f"{h['step_ms'][-1]:.0f} ms" + (f" {mem:.0f} MB" if mem is not None else ""))
    return " | ".join(parts)


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def judge_timings(summaries: list[dict]) -> str | None:
    """Add timing_doubts and timing_trusted to each summary (``measure.timing_doubts``); the table's note, if any."""
    reference = summaries[1]["label"] if len(summaries) > 1 else None
    doubts = timing_doubts({s["label"]: {**s["step_spread"], "median_s": s["median_step_ms"] / 1e3} for s in summaries},
                           reference=reference)
    for s in summaries:
        s["timing_doubts"] = doubts[s["label"]]
        s["timing_trusted"] = not s["timing_doubts"]
    return timing_note(doubts, TIMING_ADVICE)


def _doubt(summary: dict) -> str:
    return " " + DOUBT_MARK if summary.get("timing_trusted") is False else ""


def _table(summaries: list[dict]) -> str:
    ref = summaries[1] if len(summaries) > 1 else None

    def cell(value, spec, key, mark="", ratio_mark=""):
        text = ("-" if value is None else format(value, spec)) + mark
        if ref is not None:
            r = _ratio(value, ref[key])
            text += f" | {r:.2f}x{ratio_mark}" if r is not None else " | -"
        return text

    vs = f" vs {ref['label']}" if ref else ""
    head = ["model", "test accuracy"] + ([vs.strip()] if ref else []) + ["median step ms"] + ([vs.strip()] if ref else []) \
        + ["peak step memory MB"] + ([vs.strip()] if ref else [])
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for s in summaries:
        step = cell(s["median_step_ms"], ".1f", key="median_step_ms", mark=_doubt(s),
                    ratio_mark=_doubt(s) if s is not ref else "")  # the reference's 1.00x is no measurement
        lines.append(
            f"| {s['label']} | {cell(s['test_accuracy'], '.4f', key='test_accuracy')} "
            f"| {step} "
            f"| {cell(s['peak_memory_mb'], '.1f', key='peak_memory_mb')} |"
        )
    return "\n".join(lines)


def plot(path: Path, trainees, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot draws with matplotlib: pip install matplotlib") from None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for t in trainees:
        h = t.history
        steps = range(1, len(h["loss"]) + 1)
        axes[0].plot(steps, h["loss"], label=t.label)
        axes[1].plot(steps, h["step_ms"], label=t.label)
        axes[2].plot(steps, [m if m is not None else float("nan") for m in h["memory_mb"]], label=t.label)
    from matplotlib.ticker import MaxNLocator

    for ax, ylabel in zip(axes, ("training loss", "step time (ms)", "step memory (MB)")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args, parser) -> int:
    from tqdm import tqdm

    from .data import digits, image_folder

    device = _device(args.device, parser)
    choices = zoo.compare_choices(args.model)
    if args.compare and args.compare not in choices:
        parser.error(f"argument --compare: {args.model} can be compared with {', '.join(choices) or 'nothing'}, "
                     f"not {args.compare}")
    if args.check_agreement and not args.compare:
        parser.error("argument --check-agreement: needs --compare (the model to agree with)")
    if args.check_agreement and args.amp:
        parser.error("argument --check-agreement: trains in float64; not with --amp")
    if args.model != "densenet_bc" and (args.depth is not None or args.growth_rate is not None):
        parser.error(f"argument --depth/--growth-rate: only for --model densenet_bc, not {args.model}")
    args.depth, args.growth_rate = args.depth or 100, args.growth_rate or 12
    if zoo.is_densenet(args.model) and args.compare == "eager":
        args.compare = "naive"  # torchvision's eager DenseNet is the naive one
    if args.workers < 0:
        parser.error("argument --workers: must be at least 0")
    if args.check_agreement:
        # TF32 rounding and cuDNN's atomics-based backward convolutions would make two
        # eager runs drift apart on their own: the check compares fastres alone.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.deterministic = True

    image_size = args.image_size or (224 if args.data else 32)
    data = image_folder(args.data, image_size, args.seed, args.workers) if args.data else digits(image_size, args.seed)
    if args.batch_size > data.train_size:
        parser.error(f"argument --batch-size: {args.batch_size} is more than the {data.train_size} training images")
    steps = args.steps or (args.epochs or 1) * math.ceil(data.train_size / args.batch_size)
    torch.manual_seed(args.seed)
    fused, reference = zoo.build_pair(args.model, args.compare, data.num_classes, args.depth, args.growth_rate)
    name = f"densenet_bc-{args.depth}-k{args.growth_rate}" if args.model == "densenet_bc" else args.model
    dtype = torch.float64 if args.check_agreement else torch.float32
    trainees = [Trainee("fastres", fused, device, args.channels_last, args, steps, dtype)]
    if reference is not None:
        trainees.append(Trainee(args.compare, reference, device, args.channels_last, args, steps, dtype))

    precision = "bf16 autocast" if args.amp else "float64 (agreement check)" if args.check_agreement else "float32"
    title = (f"fastres train: {name} on {data.name}, {data.train_size} train / {data.test_size} held out, "
             f"batch {args.batch_size}, {steps} step{'s' * (steps != 1)}, {device}, {precision}"
             + (", channels_last" if args.channels_last else ""))
    print(title)
    print(f"fastres path: {fastres_path(device, args.model, args.amp)}")
    if reference is not None:
        print(f"compared with: {zoo.reference_name(args.model, args.compare)}, same weights and batches")

    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    failures, worst_dlogit = [], 0.0
    bar = tqdm(total=steps, desc=name, unit="step", file=sys.stderr, disable=args.no_progress,
               mininterval=0.5, dynamic_ncols=True)
    for i, (x, y) in enumerate(data.batches(args.batch_size, steps, args.seed)):
        x, y = x.to(device, dtype).contiguous(memory_format=fmt), y.to(device)
        # Alternate which model goes first: neither always finds the caches warm.
        order = trainees if i % 2 == 0 else trainees[::-1]
        logits = {t.label: t.step(x, y, args.amp, device) for t in order}
        if args.check_agreement:
            ref_logits = logits[trainees[1].label]
            dlogit = ((logits["fastres"] - ref_logits).abs().max() / ref_logits.abs().max().clamp(min=1)).item()
            worst_dlogit = max(worst_dlogit, dlogit) if not math.isnan(dlogit) else math.nan
            if not dlogit <= LOGIT_TOL:  # `not <=` also catches NaN
                failures.append(f"step {i + 1}: max |logit difference| {dlogit:.3e} > {LOGIT_TOL:.0e}")
        bar.set_postfix_str(_postfix(trainees), refresh=False)
        bar.update()
        if args.log_every and (i + 1) % args.log_every == 0:
            bar.write(f"step {i + 1}/{steps} lr {trainees[0].history['lr'][-1]:.4g}: {_postfix(trainees)}",
                      file=sys.stdout)
    bar.close()

    for t in trainees:
        t.evaluate(data, args.amp, device, args.channels_last, dtype)
        if not all(math.isfinite(v) for v in t.history["loss"]):
            failures.append(f"{t.label}: a training loss is not finite")
    summaries = [t.summary() for t in trainees]
    note = judge_timings(summaries)
    print()
    print(_table(summaries))
    if note:
        print(note)
    measured = "step 1 (the only one)" if steps == 1 else f"step {steps}" if steps == SKIP + 1 else f"steps {SKIP + 1}-{steps}"
    print(f"median time and peak memory of {measured}; step memory: peak during a step minus memory in use before it "
          f"({'CUDA allocator' if device.type == 'cuda' else 'process resident set'}).")

    agreement = None
    if args.check_agreement:
        buffers = args.compare != "checkpoint"  # checkpointing updates norm1's buffers twice per step
        agreement = {"max_logit_difference": worst_dlogit, "tolerance": LOGIT_TOL, "buffers_compared": buffers,
                     **compare_state(trainees[1].model, fused)}
        if buffers and not agreement["num_batches_tracked_agree"]:
            failures.append("BatchNorm num_batches_tracked differ")
        stats = (f"BN running stats {agreement['running_stats']:.2e}, num_batches_tracked "
                 f"{'agree' if agreement['num_batches_tracked_agree'] else 'DIFFER'}" if buffers else
                 "BN buffers not compared (torchvision's checkpointing updates them twice per step)")
        print(f"agreement with {trainees[1].label}: max |logit difference| {worst_dlogit:.2e} (relative; "
              f"tolerance {LOGIT_TOL:.0e}), parameters {agreement['parameters']:.2e}, {stats}")

    if args.json:
        out = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")},
            "steps": steps, "data": data.name, "machine_info": environment(device), "fastres_path": fastres_path(device, args.model, args.amp),
            "models": [{**s, "history": t.history} for s, t in zip(summaries, trainees)],
            "ratios": None if len(summaries) < 2 else {
                k: _ratio(summaries[0][k], summaries[1][k]) for k in ("test_accuracy", "median_step_ms", "peak_memory_mb")
            },
            "agreement": agreement, "failures": failures, "ok": not failures,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(args.plot, trainees, title.removeprefix("fastres train: "))
        print(f"wrote {args.plot}")

    if failures:
        print("FAIL:\n  " + "\n  ".join(failures))
        return 1
    if args.check_agreement:
        print(f"OK: fastres and {trainees[1].label} agree")
    return 0
