"""Train a fastres model, optionally next to the model it replaces, on the same batches.

    fastres train --model resnet18 --compare eager --steps 30
    fastres train --model densenet_bc --depth 40 --compare naive --steps 20 --plot train.png
    fastres train --model resnet50 --data ~/imagenette --epochs 2 --device cuda --amp --channels-last
    fastres train --recipe densenet-bc-cifar --data ~/cifar --output runs/bc100 --resume auto
    torchrun --nproc_per_node=8 -m fastres train --recipe densenet-bc-cifar --data ~/cifar --sync-bn --output runs/bc100

``--output DIR`` keeps checkpoints (every epoch, every ``--save-every``
steps, at the end; the last ``--keep`` plus ``best.pt``, the best held-out
accuracy) and ``summary.csv``/``summary.json`` (a row per evaluation). A
checkpoint holds the models, optimizers, schedules, step, every random
generator's state and the configuration; ``--resume auto`` continues from the
newest good one (``fastres.cli.checkpoint``), and a run resumed after a crash
ends with the same weights, bit for bit, as one never interrupted: the data
order and augmentation are functions of the seed and the step
(``fastres.cli.stream``). Under torchrun ``--batch-size`` is the global batch,
split over the processes; rank 0 alone prints and writes.

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
import signal
import sys
from pathlib import Path

import torch

from . import checkpoint, distributed, interrupt, optim, stream, zoo
from .argtypes import bc_depth, non_negative, positive, positive_float
from .data import DATASETS, load as load_data
from .measure import environment
from .saved_run import DTYPES
from .train_report import judge_timings, plot, postfix, ratio, table
from .trainee import AMP_DTYPES, GRAPH_WARMUP, SKIP, Trainee, compare_state

LOGIT_TOL = 1e-7  # float64: max |logit difference| / max(1, max |logit|) allowed at each step
KEEP = 3  # step checkpoints kept by default
RECIPES = {
    # Huang et al., "Densely Connected Convolutional Networks" (CVPR 2017), CIFAR with augmentation:
    # DenseNet-BC L=100 k=12, 300 epochs, batch 64, SGD (Nesterov 0.9) at 0.1, x0.1 at 50% and 75%,
    # weight decay 1e-4: 4.51% error on CIFAR-10+, 22.27% on CIFAR-100+.
    "densenet-bc-cifar": {"model": "densenet_bc", "depth": 100, "growth_rate": 12, "dataset": "cifar10",
                          "epochs": 300, "batch_size": 64, "lr": 0.1, "opt": "sgd", "nesterov": True,
                          "sched": "step", "weight_decay": 1e-4},
}
DEFAULTS = {"model": "resnet18", "depth": 100, "growth_rate": 12, "batch_size": 64, "lr": 0.05, **optim.DEFAULTS}
# What defines a run's arithmetic: a resumed run must be given the same.
RUN_KEYS = ("model", "depth", "growth_rate", "compare", "check_agreement", "dataset", "image_size", "no_augment",
            "batch_size", "lr", "opt", "nesterov", "weight_decay", "sched", "warmup_steps", "label_smoothing",
            "grad_clip", "amp", "dtype", "channels_last", "seed", "sync_bn")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", choices=RECIPES,
                   help="a published training recipe's settings, for the options not given "
                        "(densenet-bc-cifar: DenseNet-BC-100 k=12 on CIFAR-10, 300 epochs, which the paper reports at 4.51%% "
                        "test error; default: none)")
    # Options a recipe sets default to None here; ``resolve_defaults`` fills in DEFAULTS after the recipe.
    p.add_argument("--model", choices=zoo.MODELS, metavar="MODEL",
                   help=f"a fastres.models builder (default: resnet18): {', '.join(zoo.MODELS)}")
    p.add_argument("--depth", type=bc_depth, help="densenet_bc: depth 6n+4 (default: 100)")
    p.add_argument("--growth-rate", type=positive, help="densenet_bc: growth rate k (default: 12)")
    p.add_argument("--compare", choices=zoo.COMPARE,
                   help="also train the model that fastres's replaces: eager (torchvision's, timm's for resnetv2), "
                        "naive or checkpoint (DenseNets: torchvision's with memory_efficient=False / True) (default: none)")
    p.add_argument("--check-agreement", action="store_true",
                   help="train both in float64 and fail unless they compute the same logits and BatchNorm "
                        "counters (needs --compare)")
    p.add_argument("--dataset", choices=DATASETS,
                   help="digits (scikit-learn's, built in), cifar10/cifar100 (the python batches in --data DIR), "
                        "folder (an image folder, --data DIR) (default: folder with --data, else digits)")
    p.add_argument("--data", type=Path, metavar="DIR",
                   help="CIFAR's folder, or an image folder (torchvision ImageFolder layout; train/ and val/ "
                        "if present) (default: none)")
    p.add_argument("--no-augment", action="store_true",
                   help="CIFAR: no random crop (padding 4) and horizontal flip (default: augmented)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=positive, help="passes over the training set (default: 1)")
    length.add_argument("--steps", type=positive, help="optimizer steps, instead of --epochs (default: an epoch's)")
    p.add_argument("--batch-size", type=positive,
                   help=f"images per step, over all processes under torchrun (default: {DEFAULTS['batch_size']})")
    p.add_argument("--image-size", type=positive,
                   help="image side in pixels (default: 32 for digits and CIFAR, 224 for a folder)")
    p.add_argument("--lr", type=positive_float, help=f"peak learning rate (default: {DEFAULTS['lr']})")
    optim.add_arguments(p)
    p.add_argument("--device", default="auto",
                   help="auto (cuda when available), cpu, cuda, cuda:1, ...; under torchrun cuda:LOCAL_RANK (default: auto)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="parameters and activations (default: %(default)s; float64 with --check-agreement)")
    p.add_argument("--amp", nargs="?", const="bf16", choices=tuple(AMP_DTYPES),
                   help="mixed precision: bf16 autocast (--amp alone), or fp16 autocast with a gradient scaler "
                        "(--amp fp16) (default: off)")
    p.add_argument("--channels-last", action="store_true", help="models and inputs in channels_last")
    p.add_argument("--compile", action="store_true", help="torch.compile the trained models")
    p.add_argument("--cuda-graphs", action="store_true",
                   help=f"CUDA: capture the whole step in a CUDA graph after {GRAPH_WARMUP} warm-up steps and replay it (default: off)")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: batch norms reduce their statistics over all processes; on one process it changes "
                        "nothing, so one command serves any number (default: per process)")
    p.add_argument("--seed", type=int, default=0, help="weights, data order and augmentation (default: %(default)s)")
    p.add_argument("--output", type=Path, metavar="DIR",
                   help="write checkpoints and summary.csv/json here (default: none)")
    p.add_argument("--save-every", type=non_negative, default=0, metavar="N",
                   help="--output: also checkpoint every N steps (default: 0, at epoch ends and the end only)")
    p.add_argument("--keep", type=positive, metavar="K",
                   help=f"--output: keep the last K step checkpoints, plus best.pt (default: {KEEP})")
    p.add_argument("--resume", metavar="PATH|auto",
                   help="continue from a checkpoint, or from the newest good one in --output (auto: a fresh "
                        "start when there is none) (default: none)")
    p.add_argument("--log-every", type=non_negative, default=0, metavar="N",
                   help="print each model's loss, accuracy and learning rate every N steps (default: 0, never)")
    p.add_argument("--workers", type=non_negative,
                   help="DataLoader worker processes (default: 0 for digits, 2 otherwise)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the configuration, every step and the summary (default: none)")
    p.add_argument("--plot", type=Path, metavar="PNG", help="loss, step time and memory per step, with matplotlib (default: none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _device(text: str, parser, procs: distributed.Processes) -> torch.device:
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cuda" and procs.world > 1:
        text = f"cuda:{procs.local_rank}"
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


def resolve_defaults(args: argparse.Namespace) -> None:
    """Every option not given: ``--recipe``'s setting if it has one, else DEFAULTS'."""
    recipe = RECIPES.get(args.recipe, {})
    if args.recipe and args.model not in (None, recipe["model"]):
        recipe = {k: v for k, v in recipe.items() if k not in ("depth", "growth_rate")}
    for key, value in {**DEFAULTS, **recipe}.items():
        if key == "epochs" and args.steps is not None:
            continue
        if getattr(args, key) is None:
            setattr(args, key, value)


def _check_arguments(args, parser, procs: distributed.Processes, device: torch.device) -> None:
    choices = zoo.compare_choices(args.model)
    if args.compare and args.compare not in choices:
        parser.error(f"argument --compare: {args.model} can be compared with {', '.join(choices) or 'nothing'}, "
                     f"not {args.compare}")
    if args.check_agreement and not args.compare:
        parser.error("argument --check-agreement: needs --compare (the model to agree with)")
    if args.check_agreement and args.amp:
        parser.error("argument --check-agreement: trains in float64; not with --amp")
    if args.amp and args.dtype == "float64":
        parser.error(f"argument --amp: autocast runs float32 models in {args.amp}; not with --dtype float64")
    if args.nesterov and args.opt != "sgd":
        parser.error(f"argument --nesterov: SGD's momentum; not with --opt {args.opt}")
    if args.keep is not None and not args.output:
        parser.error("argument --keep: needs --output DIR")
    if args.cuda_graphs and device.type != "cuda":
        parser.error(f"argument --cuda-graphs: CUDA graphs need a CUDA device; this run is on {device}")
    if args.cuda_graphs and args.amp == "fp16":
        parser.error("argument --cuda-graphs: not with --amp fp16 (the gradient scaler reads the device each step)")
    if args.cuda_graphs and args.compile:
        parser.error("argument --cuda-graphs: not with --compile (torch.compile(mode='reduce-overhead') captures its own)")
    if procs.world > 1 and args.cuda_graphs:
        parser.error("argument --cuda-graphs: one process only (DistributedDataParallel's communication is not captured)")
    if procs.world > 1 and args.compare:
        parser.error("argument --compare: compares on one process; not under torchrun")
    if procs.world > 1 and args.batch_size % procs.world:
        parser.error(f"argument --batch-size: {args.batch_size} does not split over the {procs.world} processes")
    if (args.save_every or args.resume == "auto") and not args.output:
        parser.error(f"argument {'--save-every' if args.save_every else '--resume auto'}: needs --output DIR")


def _config(args) -> dict:
    """The arguments as plain data (checkpoints and --json)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
            if not k.startswith("_") and not callable(v)}


def _resume(args, folder, say):
    """``(state, path)`` of the checkpoint to continue from, or None for a fresh start."""
    try:
        if args.resume == "auto":
            found = folder.latest_good(say)
            if found is None:
                say(f"--resume auto: no checkpoint in {folder.path}: starting from step 0")
            return found
        return checkpoint.load(Path(args.resume)), Path(args.resume)
    except checkpoint.CheckpointError as err:
        raise SystemExit(f"--resume: {err}") from None


def _check_same_run(state: dict, path: Path, args, total: int) -> None:
    saved = state["config"]
    differ = [f"--{k.replace('_', '-')} {saved.get(k)!r} there, {getattr(args, k)!r} here"
              for k in RUN_KEYS if saved.get(k) != getattr(args, k)]
    if state["total_steps"] != total and (args.sched != "none" or state["step"] > total):
        # A run on a constant learning rate can be extended (more --epochs); a schedule spans the run's steps.
        differ.append(f"{state['total_steps']} steps there, {total} here" + (
            f" (--sched {args.sched} spans the run's steps)" if args.sched != "none" else ""))
    if differ:
        raise SystemExit(f"--resume: {path} is from a different run ({'; '.join(differ)}); "
                         "resume with the command that started it")


def run(args, parser) -> int:
    procs = distributed.from_environment()
    device = _device(args.device, parser, procs)
    distributed.start(procs, device)
    try:
        return _train(args, parser, procs, device)
    finally:
        distributed.stop(procs)


def _train(args, parser, procs: distributed.Processes, device: torch.device) -> int:
    from tqdm import tqdm

    say = print if procs.main else (lambda *a, **k: None)
    shaped = args.depth is not None or args.growth_rate is not None
    resolve_defaults(args)
    if shaped and args.model != "densenet_bc":
        parser.error(f"argument --depth/--growth-rate: only for --model densenet_bc, not {args.model}")
    _check_arguments(args, parser, procs, device)
    if zoo.is_densenet(args.model) and args.compare == "eager":
        args.compare = "naive"  # torchvision's eager DenseNet is the naive one
    if args.check_agreement:
        args.dtype = "float64"
        # TF32 rounding and cuDNN's atomics-based backward convolutions would make two
        # eager runs drift apart on their own: the check compares fastres alone.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.deterministic = True
    dtype = DTYPES[args.dtype]

    data = load_data(args.dataset, args.data, args.image_size, args.seed, augment=not args.no_augment)
    if args.batch_size > data.train_size:
        parser.error(f"argument --batch-size: {args.batch_size} is more than the {data.train_size} training images")
    per_epoch = stream.steps_per_epoch(data.train_size, args.batch_size)
    total = args.steps or (args.epochs or 1) * per_epoch
    workers = args.workers if args.workers is not None else 0 if data.name.startswith("digits") else 2

    torch.manual_seed(args.seed)
    fused, reference = zoo.build_pair(args.model, args.compare, data.num_classes, args.depth, args.growth_rate)
    if args.sync_bn:
        import fastres

        fused = fastres.nn.convert_sync_batchnorm(fused)
    name = f"densenet_bc-{args.depth}-k{args.growth_rate}" if args.model == "densenet_bc" else args.model
    wrap = distributed.data_parallel(procs, device)
    trainees = [Trainee("fastres", fused, device, args, total, dtype, wrap)]
    if reference is not None:
        trainees.append(Trainee(args.compare, reference, device, args, total, dtype))

    folder = checkpoint.Folder(args.output, args.keep or KEEP) if args.output else None
    if folder and procs.main:
        folder.prepare(resuming=bool(args.resume))
    distributed.barrier(procs)
    start, rows, best, failures, worst_dlogit = 0, [], None, [], 0.0
    resumed = _resume(args, folder, say) if args.resume else None
    if resumed:
        state, path = resumed
        _check_same_run(state, path, args, total)
        for t in trainees:
            t.load_state_dict(state["trainees"][t.label])
        checkpoint.set_rng_state(state["rng"])
        start, rows, best = state["step"], list(state["epochs"]), state["best"]
        failures, worst_dlogit = list(state["agreement"]["failures"]), state["agreement"]["worst_dlogit"]

    precision = f"{args.amp} autocast" if args.amp else "float64 (agreement check)" if args.check_agreement else args.dtype
    title = (f"fastres train: {name} on {data.name}, {data.train_size} train / {data.test_size} held out, "
             f"batch {args.batch_size}, {total} step{'s' * (total != 1)}, {device}, {precision}"
             + (", channels_last" if args.channels_last else "")
             + (f", {procs.world} processes" if procs.world > 1 else ""))
    say(title)
    say(f"fastres path: {fastres_path(device, args.model, args.amp)}")
    if reference is not None:
        say(f"compared with: {zoo.reference_name(args.model, args.compare)}, same weights and batches")
    if resumed:
        extended = f", the run extended from {state['total_steps']} steps" if state["total_steps"] != total else ""
        done_already = ": the run is complete, nothing to train" if start >= total else ""
        say(f"resumed from {resumed[1]} at step {start}/{total}{extended}{done_already}")

    def evaluate(done: int) -> None:
        """Every model's held-out accuracy and loss; a summary row."""
        row = {"epoch": round(done / per_epoch, 4), "step": done,
               "lr": trainees[0].history["lr"][-1] if trainees[0].history["lr"] else args.lr}
        since = rows[-1]["step"] if rows else 0
        for t in trainees:
            t.evaluate(stream.test_batches(data, 256, workers))
            losses = t.history["loss"][since:done]
            row |= {f"{t.label}_train_loss": sum(losses) / len(losses) if losses else None,
                    f"{t.label}_test_accuracy": t.test_accuracy, f"{t.label}_test_loss": t.test_loss}
        rows.append(row)
        bar.write(f"held-out after step {done}/{total} (epoch {row['epoch']:g}): " + " | ".join(
            f"{t.label}: accuracy {t.test_accuracy:.4f} loss {t.test_loss:.4f}" for t in trainees), file=sys.stdout)

    def save(done: int) -> None:
        nonlocal best
        accuracy = rows[-1]["fastres_test_accuracy"] if rows and rows[-1]["step"] == done else None
        is_best = accuracy is not None and (best is None or accuracy > best["test_accuracy"])
        if is_best:
            best = {"step": done, "test_accuracy": accuracy}
        state = {"config": _config(args), "num_classes": data.num_classes, "step": done, "total_steps": total,
                 "steps_per_epoch": per_epoch, "world_size": procs.world, "epochs": rows, "best": best,
                 "trainees": {t.label: t.state_dict() for t in trainees},
                 "agreement": {"failures": failures, "worst_dlogit": worst_dlogit},
                 "rng": checkpoint.rng_state()}
        folder.save(state, done, is_best)
        folder.write_summary(rows)

    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    reduce = distributed.mean(procs)
    bar = tqdm(total=total, initial=start, desc=name, unit="step", file=sys.stderr,
               disable=args.no_progress or not procs.main, mininterval=0.5, dynamic_ncols=True)
    batches = stream.train_batches(data, args.batch_size, args.seed, start, total, workers, procs.rank, procs.world)
    saved_at = stopped_at = None
    with interrupt.Stop() as stop:  # SIGINT/SIGTERM: stop after the step in progress, with a checkpoint
        for i, (x, y) in enumerate(batches, start):
            x, y = x.to(device, dtype).contiguous(memory_format=fmt), y.to(device)
            # Alternate which model goes first: neither always finds the caches warm.
            order = trainees if i % 2 == 0 else trainees[::-1]
            logits = {t.label: t.step(x, y, reduce) for t in order}
            if args.check_agreement:
                ref_logits = logits[trainees[1].label]
                dlogit = ((logits["fastres"] - ref_logits).abs().max() / ref_logits.abs().max().clamp(min=1)).item()
                worst_dlogit = max(worst_dlogit, dlogit) if not math.isnan(dlogit) else math.nan
                if not dlogit <= LOGIT_TOL:  # `not <=` also catches NaN
                    failures.append(f"step {i + 1}: max |logit difference| {dlogit:.3e} > {LOGIT_TOL:.0e}")
            bar.set_postfix_str(postfix(trainees), refresh=False)
            bar.update()
            done = i + 1
            if args.log_every and done % args.log_every == 0:
                msg = f"step {done}/{total} lr {trainees[0].history['lr'][-1]:.4g}: {postfix(trainees)}"
                bar.write(msg, file=sys.stdout) if procs.main else None
            evaluating = done % per_epoch == 0 or done == total
            if evaluating and procs.main:
                evaluate(done)
            if folder and procs.main and (evaluating or (args.save_every and done % args.save_every == 0)):
                save(done)
                saved_at = done
            if stop.requested(procs.world, device):
                stopped_at = done
                break
    bar.close()
    if stopped_at is not None:
        if folder and procs.main and saved_at != stopped_at:
            save(stopped_at)
        where = (f"checkpoint {folder.step_path(stopped_at)}; continue with the same command and --resume auto"
                 if folder else "no --output, so nothing was saved")
        say(f"stopped by {signal.Signals(stop.signal).name} after step {stopped_at}/{total}: {where}")
        return stop.exit_status
    if not procs.main:
        return 0

    for t in trainees:
        if t.test_accuracy is None:  # no step ran here: the run was complete already
            t.evaluate(stream.test_batches(data, 256, workers))
        if not all(math.isfinite(v) for v in t.history["loss"]):
            failures.append(f"{t.label}: a training loss is not finite")
    summaries = [t.summary() for t in trainees]
    note = judge_timings(summaries)
    print()
    print(table(summaries))
    if note:
        print(note)
    measured = "step 1 (the only one)" if total == 1 else f"step {total}" if total == SKIP + 1 else f"steps {SKIP + 1}-{total}"
    if resumed and start < total:
        measured += f" (and not step {start + 1}, the first after resuming)"
    print(f"median time and peak memory of {measured}; step memory: peak during a step minus memory in use before it "
          f"({'CUDA allocator' if device.type == 'cuda' else 'process resident set'}).")
    if folder:
        print(f"checkpoints in {folder.path}" + (f"; best: step {best['step']}, held-out accuracy "
                                                 f"{best['test_accuracy']:.4f}" if best else ""))

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
            "config": _config(args), "steps": total, "data": data.name, "machine_info": environment(device),
            "fastres_path": fastres_path(device, args.model, args.amp), "world_size": procs.world,
            "resumed_from": {"path": str(resumed[1]), "step": start} if resumed else None,
            "models": [{**s, "history": t.history} for s, t in zip(summaries, trainees)],
            "ratios": None if len(summaries) < 2 else {
                k: ratio(summaries[0][k], summaries[1][k]) for k in ("test_accuracy", "median_step_ms", "peak_memory_mb")
            },
            "epochs": rows, "best": best, "agreement": agreement, "failures": failures, "ok": not failures,
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
