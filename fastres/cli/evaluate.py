"""Held-out accuracy and loss of a model saved by ``fastres train --output``.

    fastres eval --checkpoint runs/bc100/best.pt
    fastres eval --checkpoint runs/bc100/step-00012000.pt --data ~/cifar --device cuda --json eval.json

The model is rebuilt from the checkpoint's configuration and evaluated on the
held-out set of the data it was trained on (``--data`` where that folder has
moved), as ``fastres train`` evaluates it at each epoch's end.
"""

import json
from pathlib import Path

import torch

from . import saved_run, stream
from .argtypes import non_negative, positive
from .data import load as load_data


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, metavar="PATH", help="a checkpoint file of fastres train")
    p.add_argument("--data", type=Path, metavar="DIR", help="where the run's data is now (default: the run's --data)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: %(default)s)")
    p.add_argument("--batch-size", type=positive, default=256, help="images per forward (default: %(default)s)")
    p.add_argument("--workers", type=non_negative, default=0, help="DataLoader worker processes (default: %(default)s)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the result (default: none)")


def run(args, parser) -> int:
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"argument --device: not a device: {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: no CUDA device is available")
    state = saved_run.load(args.checkpoint)
    c = state["config"]
    root = args.data or (Path(c["data"]) if c.get("data") else None)
    data = load_data(c["dataset"], root, c["image_size"], c["seed"], augment=False)
    if data.num_classes != state["num_classes"]:
        raise SystemExit(f"--data {root}: {data.num_classes} classes, the model was trained on {state['num_classes']}")
    model = saved_run.fastres_model(state, device)
    fmt = torch.channels_last if c["channels_last"] else torch.contiguous_format
    from .trainee import autocast_dtype, evaluate

    accuracy, loss = evaluate(model, stream.test_batches(data, args.batch_size, args.workers), device,
                              saved_run.DTYPES[c["dtype"]], fmt, autocast_dtype(c["amp"]))
    if accuracy is None:
        raise SystemExit(f"{data.name}: no held-out images to evaluate on")
    print(f"{saved_run.name(c)} after {state['step']} of {state['total_steps']} steps ({args.checkpoint}) "
          f"on {data.name}, {data.test_size} held-out images: accuracy {accuracy:.4f}, mean loss {loss:.4f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint), "step": state["step"],
                                         "model": saved_run.name(c), "data": data.name, "test_size": data.test_size,
                                         "test_accuracy": accuracy, "test_loss": loss}, indent=1) + "\n")
    return 0
