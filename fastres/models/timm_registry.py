"""fastres's ResNetV2 builders in timm's model registry: ``timm.create_model("fastres_resnetv2_50", ...)``.

``register_with_timm()`` (once per process, after which code built on timm's
factories takes the names) registers ``fastres_<name>`` for each of
fastres's ``resnetv2_*`` builders. timm's ``build_model_with_cfg`` builds
them, so ``create_model``'s arguments behave as for timm's own models:
``features_only``/``out_indices`` (timm's feature wrapper over
``feature_info``), ``pretrained=True`` (timm's weights for the same
architecture, ``resnetv2_50``'s for ``fastres_resnetv2_50``, from timm's
local caches or hub, with timm's error where they are absent),
``pretrained_cfg``, ``num_classes``, ``global_pool``, ``drop_rate``...
"""

from collections.abc import Callable
from typing import Any

from torch import nn

from .._torchvision import import_torchvision
from . import resnetv2


def register_with_timm() -> list[str]:
    """Registers ``fastres_resnetv2_*`` with timm (an ImportError without timm); returns the names."""
    import_torchvision()  # timm imports torchvision: through the CPU-torch workaround first
    from timm.models import is_model, register_model

    names = []
    for base in resnetv2.__all__:
        if not base.startswith("resnetv2_"):
            continue
        name = f"fastres_{base}"
        if not is_model(name):
            register_model(_entrypoint(name, base, getattr(resnetv2, base)))
        names.append(name)
    return names


def _entrypoint(name: str, base: str, builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    from timm.models import get_pretrained_cfg
    from timm.models._builder import build_model_with_cfg

    def create(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        if kwargs.get("pretrained_cfg") is None:
            kwargs["pretrained_cfg"] = get_pretrained_cfg(base)  # timm's weights for the same architecture
        return build_model_with_cfg(builder, name, pretrained, feature_cfg={"flatten_sequential": True}, **kwargs)

    create.__name__ = create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = f"fastres's {base}: timm's architecture, state_dict and model API on fastres's fused kernels."
    return create
