"""A run saved by ``fastres train --output``: its model rebuilt and loaded, its data, and its portable forms.

``fastres eval`` and ``fastres export`` start here. A checkpoint's
``config`` says how the model was built and what it was trained on; the
model is rebuilt with ``fastres.models`` and loads the checkpoint's weights.
The portable forms are the same weights in torchvision's or timm's own
model, whose code to build is ``builder_code`` (it imports torch and
torchvision or timm only).
"""

from pathlib import Path

import torch

from . import checkpoint, zoo

FORMATS = ("torchvision", "timm", "torch-export")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def load(path: Path) -> dict:
    try:
        return checkpoint.load(path)
    except checkpoint.CheckpointError as err:
        raise SystemExit(f"--checkpoint: {err}") from None


def name(config: dict) -> str:
    if config["model"] == "densenet_bc":
        return f"densenet_bc-{config['depth']}-k{config['growth_rate']}"
    return config["model"]


def fastres_model(state: dict, device="cpu") -> torch.nn.Module:
    """The run's fastres model with the checkpoint's weights, in eval mode."""
    c = state["config"]
    model = zoo.build_fastres(c["model"], state["num_classes"], c["depth"], c["growth_rate"])
    model.load_state_dict(state["trainees"]["fastres"]["model"])
    fmt = torch.channels_last if c["channels_last"] else torch.contiguous_format
    return model.to(device, DTYPES[c["dtype"]], memory_format=fmt).eval()


def builder_code(config: dict, num_classes: int, fmt: str) -> str:
    """Python that builds ``model``, torchvision's or timm's model with the run's architecture and keys."""
    model = config["model"]
    if fmt == "timm":
        if model == "densenet_bc" or model == "densenet264":
            raise SystemExit(f"--format timm: timm has no {name(config)} with these keys; use --format torchvision")
        return f"import torch\nimport timm\nmodel = timm.create_model({model!r}, num_classes={num_classes})\n"
    if model in zoo.RESNETV2S:
        raise SystemExit(f"--format torchvision: {model} is timm's architecture; use --format timm")
    if model == "densenet_bc":
        k, n = config["growth_rate"], (config["depth"] - 4) // 6
        return ("import torch\nimport torchvision\n"
                f"model = torchvision.models.DenseNet(growth_rate={k}, block_config=({n}, {n}, {n}), "
                f"num_init_features={2 * k}, bn_size=4, num_classes={num_classes})\n"
                "# DenseNet-BC's CIFAR stem: one 3x3 convolution, no stem norm or pooling\n"
                f"model.features.conv0 = torch.nn.Conv2d(3, {2 * k}, kernel_size=3, padding=1, bias=False)\n"
                "for stem in ('norm0', 'relu0', 'pool0'):\n"
                "    setattr(model.features, stem, torch.nn.Identity())\n")
    if model == "densenet264":
        return ("import torch\nimport torchvision\n"
                f"model = torchvision.models.DenseNet(32, (6, 12, 64, 48), 64, num_classes={num_classes})\n")
    return f"import torch\nimport torchvision\nmodel = torchvision.models.{model}(num_classes={num_classes})\n"


def reference_model(state: dict) -> torch.nn.Module:
    """The run's model as torchvision's or timm's eager module, with the checkpoint's weights, in eval mode."""
    c = state["config"]
    model = c["model"]
    if model == "densenet264":
        from fastres._torchvision import import_torchvision

        reference = import_torchvision().models.DenseNet(32, (6, 12, 64, 48), 64, num_classes=state["num_classes"])
    else:
        compare = "naive" if zoo.is_densenet(model) else "eager"
        reference = zoo.build_reference(model, compare, state["num_classes"], c["depth"], c["growth_rate"])
    reference.load_state_dict(state["trainees"]["fastres"]["model"])
    return reference.to(DTYPES[c["dtype"]]).eval()
