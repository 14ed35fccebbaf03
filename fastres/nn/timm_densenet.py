"""timm's DenseNet modules (``timm.models.densenet``) on shared storage, as ``fastres.convert`` makes them.

timm's ``DenseLayer``, ``DenseBlock`` and ``DenseTransition`` are
torchvision's with each BatchNorm-ReLU pair as one norm-act module
(``BatchNormAct2d``: ``norm1`` instead of ``norm1`` + ``relu1``). The classes
here run them as ``DenseLayer``/``DenseBlock``/``Transition`` do (one shared
feature buffer per block, BN-ReLU recomputed or fused into the convolution),
keeping timm's children: the norms stay timm's modules, so state_dict keys,
timm's SyncBatchNorm converter and its frozen-BN helpers are unaffected.
``TimmDenseFeatures`` is a timm DenseNet's ``features`` with its stem's and
final BN-ReLU fused as ``fastres.models.DenseNet`` fuses them.

They are made by ``fastres.convert`` from timm's modules, not built: build
timm's model (``timm.create_model("densenet121")``) and convert it.
"""

import torch
from torch import Tensor, nn

from .atomic import atomic
from .batch_norm import bn_relu
from .bn_relu_conv import bn_relu_conv, is_timm_bn_relu
from .densenet import DenseBlock, DenseLayer, Transition, stem_bn_relu_pool
from .module_state import FromModule, has_hooks, is_plain

# torch.fx leaves: they branch on the tensor, and read the modules' state when the graph runs.
torch.fx.wrap("bn_relu")
torch.fx.wrap("bn_relu_conv")
torch.fx.wrap("stem_bn_relu_pool")

_TIMM_MODULE = "timm.models.densenet"


class _FromTimm(FromModule):
    _timm_name = ""
    _children: tuple[str, ...] = ()

    def __init__(self, *args, **kwargs) -> None:
        raise TypeError(
            f"{type(self).__name__} is made by fastres.convert from timm's {self._timm_name}: build timm's model "
            "(timm.create_model) and convert it"
        )

    @classmethod
    def is_convertible(cls, module: nn.Module) -> bool:
        return (
            type(module).__name__ == cls._timm_name and type(module).__module__ == _TIMM_MODULE
            and all(hasattr(module, n) for n in cls._children)
        )

    @classmethod
    def convertible_from(cls) -> str:
        return f"timm's {cls._timm_name}"


class TimmDenseLayer(_FromTimm, DenseLayer):
    """timm's ``DenseLayer``: norm1 (BN-ReLU) -> conv1 (1x1) -> norm2 (BN-ReLU) -> conv2 (3x3), then dropout.

    Its ``grad_checkpointing`` flag applies where it runs as written (not on
    shared storage, which needs no checkpointing).
    """

    _timm_name = "DenseLayer"
    _children = ("norm1", "conv1", "norm2", "conv2", "drop_rate")

    def bn_relus(self) -> tuple[tuple[nn.Module, None], ...]:
        return (self.norm1, None), (self.norm2, None)


class TimmDenseBlock(_FromTimm, DenseBlock):
    """timm's ``DenseBlock``: its layers on one shared feature buffer; returns the concatenation of all features."""

    _timm_name = "DenseBlock"
    _children = ("denselayer1",)
    _layer_class = TimmDenseLayer


class TimmTransition(_FromTimm, Transition):
    """timm's ``DenseTransition``: norm (BN-ReLU, fused into the 1x1 convolution), conv, pool (average or blur)."""

    _timm_name = "DenseTransition"
    _children = ("norm", "conv", "pool")

    def bn_relus(self) -> tuple[tuple[nn.Module, None], ...]:
        return ((self.norm, None),)


class TimmDenseFeatures(FromModule, nn.Sequential):
    """A timm DenseNet's ``features``: its children in order, each BN-ReLU norm-act fused with what follows.

    A plain-ReLU ``BatchNormAct2d`` followed by a max pool (the stem) runs as
    ``fastres.models.DenseNet``'s stem does, one followed by a convolution (a
    deep stem's) as one BN-ReLU-convolution, any other (the final ``norm5``)
    as the fused BN-ReLU. Slicing (timm's ``forward_intermediates`` and
    ``prune_intermediate_layers``) gives the same kind of module.
    """

    @classmethod
    def is_convertible(cls, module: nn.Module) -> bool:
        """A plain Sequential holding a timm DenseNet's features: its stem, a dense block, ... ``norm5``."""
        block = module._modules.get("denseblock1")
        return (
            is_plain(module, nn.Sequential) and list(module._modules)[-1:] == ["norm5"]
            and (TimmDenseBlock.is_convertible(block) or type(block) is TimmDenseBlock)
        )

    @classmethod
    def convertible_from(cls) -> str:
        return "a timm DenseNet's features (a plain nn.Sequential)"

    def _pairs(self) -> list[tuple[str, str | None]]:
        """(norm-act child, the child it is fused with or None) for each plain BN-ReLU norm-act."""
        names = list(self._modules)
        pairs = []
        for name, following in zip(names, names[1:] + [None]):
            if is_timm_bn_relu(self._modules[name]):
                nxt = self._modules[following] if following is not None else None
                pairs.append((name, following if is_plain(nxt, nn.MaxPool2d, nn.Conv2d) else None))
        return pairs

    def fusion(self) -> tuple[list[str], list[str]]:
        """(what runs fused, what runs as written and why), from the modules as they are now."""
        if has_hooks(self):
            return [], ["as written: it has forward hooks"]
        fused, left = [], []
        pairs = dict(self._pairs())
        for name, module in self._modules.items():
            if name in pairs:
                with_next = pairs[name]
                kind = type(self._modules[with_next]).__name__ if with_next else ""
                fused.append(f"{name} -> {with_next} (BN-ReLU-{'max-pool' if kind == 'MaxPool2d' else 'conv'})"
                             if with_next else f"{name} (BN-ReLU)")
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                act = module._modules.get("act")
                left.append(f"{name}: as written, {type(module).__name__} with {type(act).__name__} is not a batch "
                            "norm with a plain ReLU, or it has hooks")
        return fused, left

    @atomic
    def forward(self, x: Tensor) -> Tensor:
        if has_hooks(self):
            return super().forward(x)
        pairs = dict(self._pairs())
        skip = set(pairs.values())
        for name, module in self._modules.items():
            if name in skip:
                continue  # ran with the norm before it
            if name not in pairs:
                x = module(x)
            elif pairs[name] is None:
                x = bn_relu(module, x)
            elif type(self._modules[pairs[name]]) is nn.MaxPool2d:
                x = stem_bn_relu_pool(module, None, self._modules[pairs[name]], x)
            else:
                x = bn_relu_conv(module, self._modules[pairs[name]], x)
        return x
