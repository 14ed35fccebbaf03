"""torchvision's builder arguments on fastres's builders: ``weights``, the deprecated ``pretrained``, ``progress``.

torchvision resolves them in its own code, which fastres calls rather than
copies, so the behaviour (names accepted, deprecation warnings, errors) is
torchvision's: ``weights`` as a weights enum member, its name (``"DEFAULT"``,
``"IMAGENET1K_V1"``) or its full name (``"ResNet50_Weights.IMAGENET1K_V1"``);
``pretrained=True`` as the legacy ``IMAGENET1K_V1`` with torchvision's
warning; the weights' class count overwriting ``num_classes`` (an error if
another was asked for). The state_dict loads through
``torch.hub.load_state_dict_from_url`` as torchvision's does: from the local
cache (``$TORCH_HOME``), downloaded where the network allows, else its error.
torchvision is needed only when weights are asked for.
"""

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from .._torchvision import import_torchvision


def torchvision_weights(name: str) -> Callable:
    """Gives a fastres builder torchvision's ``name`` builder's arguments.

    The decorated ``build(*, weights=None, progress=True, **kwargs)`` (torchvision's
    signature) receives ``weights`` resolved (the enum member, or None) and
    ``num_classes`` overwritten from it; it builds the model, and the
    state_dict is loaded here.
    """

    def decorate(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        @functools.wraps(build)
        def builder(*args: Any, **kwargs: Any) -> nn.Module:
            # kwargs as the caller gave them: torchvision's handling tells pretrained= from weights= by presence
            if not args and kwargs.get("weights") is None and "pretrained" not in kwargs:
                return build(**kwargs)  # no torchvision needed
            tv = import_torchvision()
            utils = tv.models._utils
            enum = tv.models.get_model_weights(name)

            def resolved(*, weights: Any = None, progress: bool = True, **kw: Any) -> nn.Module:
                weights = enum.verify(weights)
                if weights is None:
                    return build(weights=None, progress=progress, **kw)
                utils._ovewrite_named_param(kw, "num_classes", len(weights.meta["categories"]))
                model = build(weights=weights, progress=progress, **kw)
                model.load_state_dict(weights.get_state_dict(progress=progress, check_hash=True))
                return model

            legacy = utils.handle_legacy_interface(weights=("pretrained", enum.IMAGENET1K_V1))
            return legacy(resolved)(*args, **kwargs)

        return builder

    return decorate
