"""DenseNet builders shaped like torchvision's, on fastres's shared-storage dense blocks.

``DenseNet`` has torchvision's constructor (plus ``small_inputs`` for the
CIFAR-style stem), submodule names and state_dict keys, so a torchvision
densenet state_dict loads unchanged; the old ``norm.1``-style keys of early
checkpoints are remapped as torchvision does.
"""

import re
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_4d, kept_in_fx_graphs
from ..nn.atomic import atomic
from ..nn.module_state import NotScriptable
from ..nn.batch_norm import norm_relu
from ..nn.densenet import DenseBlock, Transition, stem_bn_relu_pool
from ._weights import torchvision_weights

__all__ = [
    "DenseNet", "densenet121", "densenet161", "densenet169", "densenet201", "densenet264", "densenet_bc",
]

# Keys like "features.denseblock1.denselayer1.norm.1.weight" from checkpoints
# saved before "." was disallowed in module names.
_OLD_LAYER_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")

_RELU = nn.ReLU(inplace=True)  # the final ReLU, a function call in torchvision's forward


def _final_bn_relu(norm: nn.Module, x: Tensor) -> Tensor:
    # A torch.fx leaf of its own: _RELU belongs to no model, so a traced graph could not refer to it.
    return norm_relu(norm, _RELU, x)


@kept_in_fx_graphs
def _check_input(x: Tensor, in_channels: int) -> None:
    check_4d("x", x, "DenseNet")
    if x.shape[1] != in_channels:
        raise ValueError(f"DenseNet: x has {x.shape[1]} channels but conv0 expects {in_channels}")


# torch.fx leaves: they branch on the tensor, and read the modules' state when the graph runs.
torch.fx.wrap("_final_bn_relu")
torch.fx.wrap("_check_input")
torch.fx.wrap("stem_bn_relu_pool")


class DenseNet(NotScriptable, nn.Module):
    """Densely connected network (Huang et al., 2017), torchvision's ``DenseNet``.

    Args:
        growth_rate: channels each layer adds (``k``).
        block_config: layers in each dense block.
        num_init_features: channels out of the stem.
        bn_size: bottleneck width as a multiple of ``k``.
        drop_rate: dropout after each layer.
        num_classes: classifier outputs.
        memory_efficient: shared-storage dense blocks (activation memory linear
            in depth); ``False`` concatenates as eager torchvision does.
        small_inputs: a CIFAR-style stem (one 3x3 convolution, no pooling)
            instead of ImageNet's 7x7 convolution, BN-ReLU and max pool.
    """

    def __init__(
        self, growth_rate: int = 32, block_config: tuple[int, ...] = (6, 12, 24, 16),
        num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0.0, num_classes: int = 1000,
        memory_efficient: bool = True, small_inputs: bool = False,
    ) -> None:
        super().__init__()
        if small_inputs:
            stem = [("conv0", nn.Conv2d(3, num_init_features, kernel_size=3, stride=1, padding=1, bias=False))]
        else:
            stem = [
                ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                ("norm0", nn.BatchNorm2d(num_init_features)),
                ("relu0", nn.ReLU(inplace=True)),
                ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            ]
        self.features = nn.Sequential(OrderedDict(stem))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(
                num_layers=num_layers, num_input_features=num_features, bn_size=bn_size,
                growth_rate=growth_rate, drop_rate=drop_rate, memory_efficient=memory_efficient,
            )
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                trans = Transition(num_input_features=num_features, num_output_features=num_features // 2)
                self.features.add_module(f"transition{i + 1}", trans)
                num_features = num_features // 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def _features(self, x: Tensor) -> Tensor:
        """``relu(self.features(x))`` with the stem's and the final BN-ReLU fused."""
        modules = dict(self.features.named_children())
        if "norm0" in modules:  # the ImageNet stem
            x = stem_bn_relu_pool(modules["norm0"], modules["relu0"], modules["pool0"], modules["conv0"](x))
        else:
            x = modules["conv0"](x)
        for name, module in modules.items():
            if name.startswith(("denseblock", "transition")):
                x = module(x)
        return _final_bn_relu(modules["norm5"], x)

    @atomic
    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.features.conv0.in_channels)
        out = F.adaptive_avg_pool2d(self._features(x), (1, 1))
        return self.classifier(torch.flatten(out, 1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in [k for k in state_dict if k.startswith(prefix)]:
            match = _OLD_LAYER_KEY.match(key)
            if match:
                state_dict[match.group(1) + match.group(2)] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _densenet(growth_rate: int, block_config: tuple[int, ...], num_init_features: int, **kwargs: Any) -> DenseNet:
    return DenseNet(growth_rate, block_config, num_init_features, **kwargs)


@torchvision_weights("densenet121")
def densenet121(*, weights: Any | None = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-121 (k=32), torchvision's layout."""
    return _densenet(32, (6, 12, 24, 16), 64, **kwargs)


@torchvision_weights("densenet161")
def densenet161(*, weights: Any | None = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-161 (k=48), torchvision's layout."""
    return _densenet(48, (6, 12, 36, 24), 96, **kwargs)


@torchvision_weights("densenet169")
def densenet169(*, weights: Any | None = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-169 (k=32), torchvision's layout."""
    return _densenet(32, (6, 12, 32, 32), 64, **kwargs)


@torchvision_weights("densenet201")
def densenet201(*, weights: Any | None = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-201 (k=32), torchvision's layout."""
    return _densenet(32, (6, 12, 48, 32), 64, **kwargs)


def densenet264(**kwargs: Any) -> DenseNet:
    """DenseNet-264 (k=32) from the DenseNet paper."""
    return _densenet(32, (6, 12, 64, 48), 64, **kwargs)


def densenet_bc(depth: int = 100, growth_rate: int = 12, num_classes: int = 10, **kwargs: Any) -> DenseNet:
    """CIFAR-style DenseNet-BC: three blocks of ``(depth - 4) // 6`` layers, compression 0.5, 3x3 stem.

    ``densenet_bc(100, 12)`` is the paper's DenseNet-BC (L=100, k=12).
    """
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"depth must be 6n + 4 with n >= 1 (e.g. 40, 100, 190), got {depth}")
    n = (depth - 4) // 6
    kwargs.setdefault("small_inputs", True)
    return _densenet(growth_rate, (n, n, n), 2 * growth_rate, num_classes=num_classes, **kwargs)
