"""The models ``fastres train`` builds, and the model each one replaces.

Every fastres model has a reference that computes the same function with
eager PyTorch modules: torchvision's ResNets and DenseNets, timm's ResNetV2.
For DenseNets there are two, as in ``fastres memory``: ``naive`` (every layer
concatenates its inputs; torchvision's ``memory_efficient=False``, also what
``eager`` means for them) and ``checkpoint`` (torchvision's
``memory_efficient=True``). The reference is built first and fastres's model
loads its state_dict, so both start from the same weights.
"""

from torch import nn

import fastres.models
from fastres._torchvision import import_torchvision

RESNETS = tuple(n for n in fastres.models.__all__ if n.startswith(("resnet", "resnext", "wide_resnet"))
                and not n.startswith("resnetv2"))
RESNETV2S = tuple(n for n in fastres.models.__all__ if n.startswith("resnetv2_"))
DENSENETS = ("densenet121", "densenet161", "densenet169", "densenet201", "densenet264", "densenet_bc")
MODELS = RESNETS + RESNETV2S + DENSENETS
COMPARE = ("eager", "naive", "checkpoint")


def is_densenet(model: str) -> bool:
    return model in DENSENETS


def compare_choices(model: str) -> tuple[str, ...]:
    """What ``--compare`` can take for ``model`` (empty: nothing to compare against)."""
    if model == "densenet264":
        return ()  # torchvision has no DenseNet-264
    return COMPARE if is_densenet(model) else ("eager",)


def reference_name(model: str, compare: str) -> str:
    """How the table names the compared model."""
    if model in RESNETV2S:
        return f"timm {model}"
    if is_densenet(model):
        return f"torchvision {model} ({'checkpointed' if compare == 'checkpoint' else 'naive'})"
    return f"torchvision {model}"


def _torchvision_densenet_bc(depth: int, growth_rate: int, num_classes: int, checkpointed: bool) -> nn.Module:
    """torchvision's DenseNet shaped like ``fastres.models.densenet_bc``: three blocks, the 3x3 CIFAR stem."""
    tv = import_torchvision()
    n, k = (depth - 4) // 6, growth_rate
    ref = tv.models.DenseNet(growth_rate=k, block_config=(n, n, n), num_init_features=2 * k, bn_size=4,
                             num_classes=num_classes, memory_efficient=checkpointed)
    ref.features.conv0 = nn.Conv2d(3, 2 * k, kernel_size=3, padding=1, bias=False)
    nn.init.kaiming_normal_(ref.features.conv0.weight)
    for name in ("norm0", "relu0", "pool0"):
        setattr(ref.features, name, nn.Identity())
    return ref


def build_fastres(model: str, num_classes: int, depth: int = 100, growth_rate: int = 12) -> nn.Module:
    if model == "densenet_bc":
        return fastres.models.densenet_bc(depth, growth_rate, num_classes, memory_efficient=True)
    if is_densenet(model):
        return getattr(fastres.models, model)(num_classes=num_classes, memory_efficient=True)
    return getattr(fastres.models, model)(num_classes=num_classes)


def build_reference(model: str, compare: str, num_classes: int, depth: int = 100, growth_rate: int = 12) -> nn.Module:
    """The eager model that ``model`` replaces (``compare`` one of ``compare_choices(model)``)."""
    if compare not in compare_choices(model):
        raise ValueError(f"--compare {compare} is not available for {model}: choose from {compare_choices(model)}")
    if model in RESNETV2S:
        import_torchvision()  # timm imports torchvision: through the CPU-torch workaround first
        try:
            import timm
        except ImportError:
            raise SystemExit(f"--compare eager for {model} trains timm's {model} beside it: pip install timm") from None
        return timm.create_model(model, num_classes=num_classes)
    checkpointed = compare == "checkpoint"
    if model == "densenet_bc":
        return _torchvision_densenet_bc(depth, growth_rate, num_classes, checkpointed)
    tv = import_torchvision()
    if is_densenet(model):
        return getattr(tv.models, model)(num_classes=num_classes, memory_efficient=checkpointed)
    return getattr(tv.models, model)(num_classes=num_classes)


def build_pair(model: str, compare: str | None, num_classes: int, depth: int = 100, growth_rate: int = 12):
    """``(fastres model, reference or None)`` with the same weights."""
    if compare is None:
        return build_fastres(model, num_classes, depth, growth_rate), None
    reference = build_reference(model, compare, num_classes, depth, growth_rate)
    fused = build_fastres(model, num_classes, depth, growth_rate)
    fused.load_state_dict(reference.state_dict())
    return fused, reference
