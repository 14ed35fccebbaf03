"""fastres's models in timm's model registry: ``timm.create_model("fastres_resnetv2_50", ...)``.

``register_with_timm()`` (once per process, after which code built on timm's
factories takes the names) registers

- ``fastres_<name>`` for each of fastres's ``resnetv2_*`` builders, built by
  timm's ``build_model_with_cfg``;
- ``fastres_<name>`` for timm's DenseNets (``densenet121`` ...,
  ``densenetblur121d``) and for timm's ResNets of the torchvision family
  (``resnet18`` ... ``wide_resnet101_2``): timm's own model, built by timm's
  entry point, then ``fastres.convert``-ed (shared-storage dense blocks,
  fused residual blocks), so timm's class and model API.

Either way ``create_model``'s arguments behave as for timm's own models:
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
from . import resnet, resnetv2

# timm's ResNets with a fastres builder of the same name (torchvision's family), and timm's DenseNets.
_CONVERTED = [n for n in resnet.__all__ if n != "ResNet"] + [
    "densenet121", "densenet161", "densenet169", "densenet201", "densenet264d", "densenetblur121d",
]


def register_with_timm() -> list[str]:
    """Registers the ``fastres_*`` names with timm (an ImportError without timm); returns them."""
    import_torchvision()  # timm imports torchvision: through the CPU-torch workaround first
    from timm.models import is_model, register_model

    entrypoints = [(f"fastres_{base}", _builder_entrypoint, base) for base in resnetv2.__all__
                   if base.startswith("resnetv2_")]
    entrypoints += [(f"fastres_{base}", _converted_entrypoint, base) for base in _CONVERTED if is_model(base)]
    for name, make, base in entrypoints:
        if not is_model(name):
            register_model(_named(make(base), name, base))
    return [name for name, _, _ in entrypoints]


def _pretrained_cfg(base: str, kwargs: dict) -> dict:
    from timm.models import get_pretrained_cfg

    if kwargs.get("pretrained_cfg") is None:
        kwargs["pretrained_cfg"] = get_pretrained_cfg(base)  # timm's weights for the same architecture
    return kwargs


def _builder_entrypoint(base: str) -> Callable[..., nn.Module]:
    from timm.models._builder import build_model_with_cfg

    builder = getattr(resnetv2, base)

    def create(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return build_model_with_cfg(builder, f"fastres_{base}", pretrained, feature_cfg={"flatten_sequential": True},
                                    **_pretrained_cfg(base, kwargs))

    create.__doc__ = f"fastres's {base}: timm's architecture, state_dict and model API on fastres's fused kernels."
    return create


def _converted_entrypoint(base: str) -> Callable[..., nn.Module]:
    from timm.models import model_entrypoint

    from ..convert import convert

    timm_create = model_entrypoint(base)

    def create(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return convert(timm_create(pretrained=pretrained, **_pretrained_cfg(base, kwargs)))

    create.__doc__ = f"timm's {base} (its class, state_dict and model API), converted by fastres.convert."
    return create


def _named(create: Callable[..., nn.Module], name: str, base: str) -> Callable[..., nn.Module]:
    create.__name__ = create.__qualname__ = name
    create.__module__ = __name__
    return create
