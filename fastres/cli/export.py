"""Hand a model trained by ``fastres train`` to code without fastres.

    fastres export --checkpoint runs/r18/best.pt --format torchvision r18.pt
    fastres export --checkpoint runs/v2/best.pt --format timm v2.pt
    fastres export --checkpoint runs/bc100/best.pt --format torch-export bc100.pt2

``torchvision`` and ``timm``: the weights as a plain state_dict (tensors
only; ``torch.load(weights_only=True)``) that torchvision's or timm's own
model loads strictly; the command prints the code that builds that model.
``torch-export``: a ``torch.export`` program of the model in eval mode,
traced through torchvision's or timm's eager modules, so that
``torch.export.load`` runs it with torch alone.
"""

from pathlib import Path

import torch

from . import checkpoint, saved_run
from .saved_run import FORMATS


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, metavar="PATH", help="a checkpoint file of fastres train")
    p.add_argument("--format", choices=FORMATS, required=True,
                   help="torchvision or timm (a state_dict their model loads), torch-export (a torch.export program)")
    p.add_argument("--image-size", type=int, help="torch-export: the example input's side (default: the run's)")
    p.add_argument("out", type=Path, metavar="OUT", help="the file to write")


def run(args, parser) -> int:
    state = saved_run.load(args.checkpoint)
    c = state["config"]
    weights = state["trainees"]["fastres"]["model"]
    if args.format == "torch-export":
        model = saved_run.reference_model(state)
        side = args.image_size or c["image_size"] or (224 if c.get("dataset") == "folder" else 32)
        example = torch.randn(2, 3, side, side, dtype=saved_run.DTYPES[c["dtype"]])
        with torch.no_grad():  # any batch size
            program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write(args.out, lambda f: torch.export.save(program, f))
        print(f"wrote {args.out}: torch.export program of {saved_run.name(c)} (eval mode, input N x 3 x {side} x {side}, "
              f"{c['dtype']})\nrun it with:\n    import torch\n    program = torch.export.load({str(args.out)!r})\n"
              "    logits = program.module()(images)")
        return 0
    code = saved_run.builder_code(c, state["num_classes"], args.format)
    if c["dtype"] == "float64":  # load_state_dict would round the weights into a float32 model
        code += "model = model.double()  # the run trained in float64\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write(args.out, lambda f: torch.save({k: v.clone() for k, v in weights.items()}, f))
    print(f"wrote {args.out}: {saved_run.name(c)}'s state_dict for {args.format}'s model, after {state['step']} steps\n"
          f"load it with:\n" + "".join(f"    {line}\n" for line in code.splitlines())
          + f"    model.load_state_dict(torch.load({str(args.out)!r}, weights_only=True))")
    return 0
