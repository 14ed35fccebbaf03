"""``fastres train``'s optimizer, learning-rate schedule and loss, from its arguments.

``--sched`` runs over the whole run's optimizer steps after ``--warmup-steps``
of linear warm-up (step ``i`` of the warm-up at ``(i + 1) / (warmup + 1)`` of
``--lr``): ``cosine`` decays to 0, ``step`` multiplies by 0.1 at 50% and 75%
of the steps (the DenseNet papers' schedule), ``none`` keeps ``--lr``.
"""

import argparse
import math

import torch

from .argtypes import fraction, non_negative, non_negative_float, positive_float

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("none", "cosine", "step")
DEFAULTS = {"opt": "sgd", "nesterov": False, "weight_decay": 5e-4, "sched": "none"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Defaults left None here are DEFAULTS', filled in after a --recipe's (``resolve``).
    p.add_argument("--opt", choices=OPTIMIZERS, help=f"SGD (momentum 0.9) or AdamW (default: {DEFAULTS['opt']})")
    p.add_argument("--nesterov", action="store_true", default=None, help="SGD: Nesterov momentum (default: off)")
    p.add_argument("--weight-decay", type=non_negative_float,
                   help=f"weight decay of every parameter (default: {DEFAULTS['weight_decay']})")
    p.add_argument("--sched", choices=SCHEDULES,
                   help=f"learning-rate schedule over the run's steps (default: {DEFAULTS['sched']})")
    p.add_argument("--warmup-steps", type=non_negative, default=0,
                   help="steps of linear warm-up to --lr before the schedule (default: %(default)s)")
    p.add_argument("--label-smoothing", type=fraction, default=0.0,
                   help="cross-entropy label smoothing, in [0, 1) (default: %(default)s)")
    p.add_argument("--grad-clip", type=positive_float, default=None, metavar="NORM",
                   help="clip the gradients' total norm to NORM (default: no clipping)")


def make_optimizer(params, args: argparse.Namespace, capturable: bool = False) -> torch.optim.Optimizer:
    """``capturable``: for a step captured in a CUDA graph; the learning rate is then a tensor on the
    parameters' device, which the graph reads and the scheduler fills in place (AdamW with
    ``capturable=True``, SGD fused)."""
    params = list(params)
    lr = torch.tensor(args.lr, device=params[0].device) if capturable else args.lr
    if args.opt == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay, capturable=capturable)
    # SGD's foreach step reads a tensor learning rate on the host (alpha=-lr); its fused step takes the tensor.
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=args.nesterov, weight_decay=args.weight_decay,
                           fused=True if capturable else None)


def lr_factor(step: int, total: int, sched: str, warmup: int) -> float:
    """The multiple of ``--lr`` for optimizer step ``step`` (0-based) of ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if sched == "cosine":
        span = max(total - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / span))
    if sched == "step":
        return 0.1 ** ((step >= total // 2) + (step >= 3 * total // 4))
    return 1.0


def make_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace, total: int):
    """A ``LambdaLR`` stepped once after each optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, args.sched, args.warmup_steps))
