"""The ``fastres`` command (also ``python -m fastres``): one subcommand per job.

- ``fastres train``: train a fastres model on built-in data or an image folder,
  optionally next to the model it replaces on the same batches.
- ``fastres eval`` / ``fastres export``: a checkpoint of ``fastres train``
  evaluated, or its weights for torchvision's or timm's own model (or a
  ``torch.export`` program) that run without fastres.
- ``fastres memory``: DenseNet memory jobs (variants compared, memory against
  depth, the deepest model or largest batch within a budget).
- ``fastres bench``: the pytest-benchmark suites, their JSON, table and plots.
- ``fastres check``: versions, devices, the extension, and a self-test of
  every op against eager PyTorch.

Each subcommand's module holds ``add_arguments(parser)`` and ``run(args,
parser) -> exit status``. Optional dependencies (tqdm, matplotlib,
scikit-learn, pytest) are imported only when a subcommand needs them, so
``fastres check`` and ``--help`` work without them.
"""

import argparse
import importlib
import sys

COMMANDS = {
    "train": ("train", "train a fastres model, optionally next to the model it replaces"),
    "eval": ("evaluate", "held-out accuracy and loss of a checkpoint of fastres train"),
    "export": ("export", "a trained model for torchvision, timm or torch.export, without fastres"),
    "memory": ("memory", "DenseNet memory: compare variants, memory vs depth, what fits a budget"),
    "bench": ("bench", "run the benchmark suites: fused vs eager vs torch.compile; JSON, table, plots"),
    "check": ("check", "versions, devices, the C++ extension, and a self-test of every op against eager"),
}


def parser() -> argparse.ArgumentParser:
    import fastres

    p = argparse.ArgumentParser(
        prog="fastres", description="Fused kernels for residual and dense networks: train, measure, check.",
    )
    p.add_argument("--version", action="version", version=f"fastres {fastres.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, summary) in COMMANDS.items():
        mod = importlib.import_module(f"fastres.cli.{module}")
        sp = sub.add_parser(name, help=summary, description=(mod.__doc__ or summary).split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog=mod.__doc__.split("\n\n", 1)[1] if mod.__doc__ and "\n\n" in mod.__doc__ else None)
        mod.add_arguments(sp)
        sp.set_defaults(_run=mod.run, _parser=sp)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    return args._run(args, args._parser)


if __name__ == "__main__":
    sys.exit(main())
