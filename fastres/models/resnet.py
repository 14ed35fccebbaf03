"""ResNet builders shaped like torchvision's, built from fastres's fused blocks.

Module names, constructor arguments and initialisation follow
``torchvision.models.resnet``, so a torchvision state_dict loads unchanged and
the same seed gives the same weights. ``weights``, ``pretrained`` and
``progress`` are torchvision's, resolved by torchvision's code (``_weights.py``).
"""

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_4d, kept_in_fx_graphs
from ..nn.atomic import atomic
from ..nn.batch_norm import norm_relu
from ..nn.module_state import NotScriptable
from ..nn.resnet_blocks import BasicBlock, Bottleneck, conv1x1
from ._weights import torchvision_weights

# torch.fx leaves: they branch on the tensor, and read the modules' state when the graph runs.
torch.fx.wrap("norm_relu")

__all__ = [
    "ResNet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
    "wide_resnet50_2", "wide_resnet101_2",
]


class ResNet(NotScriptable, nn.Module):
    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation: list[bool] | None = None,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self._norm_layer = norm_layer

        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            # Each entry says whether a stage's 2x2 stride becomes a dilation.
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                "replace_stride_with_dilation should be None "
                f"or a 3-element tuple, got {replace_stride_with_dilation}"
            )
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

        # Zero-init the last BN of each residual branch: every block starts as an
        # identity (https://arxiv.org/abs/1706.02677).
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(
        self,
        block: type[BasicBlock | Bottleneck],
        planes: int,
        blocks: int,
        stride: int = 1,
        dilate: bool = False,
    ) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )
        layers = [
            block(self.inplanes, planes, stride, downsample, self.groups, self.base_width,
                  previous_dilation, norm_layer)
        ]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(
                block(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                      dilation=self.dilation, norm_layer=norm_layer)
            )
        return nn.Sequential(*layers)

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self.maxpool(norm_relu(self.bn1, self.relu, self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)

    @atomic
    def forward(self, x: Tensor) -> Tensor:
        # Here, not in the stem's BN: its error would name the convolution's output, not x.
        _check_input(x, getattr(self.conv1, "in_channels", None))
        return self._forward_impl(x)


@kept_in_fx_graphs
def _check_input(x: Tensor, in_channels: int | None) -> None:
    check_4d("x", x, "ResNet")
    if in_channels is not None and x.shape[1] != in_channels:
        raise ValueError(f"ResNet: x has {x.shape[1]} channels but conv1 expects {in_channels}")


torch.fx.wrap("_check_input")


def _resnet(block: type[BasicBlock | Bottleneck], layers: list[int], **kwargs: Any) -> ResNet:
    return ResNet(block, layers, **kwargs)


@torchvision_weights("resnet18")
def resnet18(*, weights: Any | None = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-18 (https://arxiv.org/abs/1512.03385)."""
    return _resnet(BasicBlock, [2, 2, 2, 2], **kwargs)


@torchvision_weights("resnet34")
def resnet34(*, weights: Any | None = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-34 (https://arxiv.org/abs/1512.03385)."""
    return _resnet(BasicBlock, [3, 4, 6, 3], **kwargs)


@torchvision_weights("resnet50")
def resnet50(*, weights: Any | None = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-50 v1.5: stride on the 3x3 convolution, as torchvision."""
    return _resnet(Bottleneck, [3, 4, 6, 3], **kwargs)


@torchvision_weights("resnet101")
def resnet101(*, weights: Any | None = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-101 v1.5."""
    return _resnet(Bottleneck, [3, 4, 23, 3], **kwargs)


@torchvision_weights("resnet152")
def resnet152(*, weights: Any | None = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-152 v1.5."""
    return _resnet(Bottleneck, [3, 8, 36, 3], **kwargs)


def _with_width(kwargs: dict[str, Any], groups: int, width_per_group: int) -> dict[str, Any]:
    # torchvision's ResNeXt/wide builders fix these two: another value is its error, worded as there.
    for name, value in (("groups", groups), ("width_per_group", width_per_group)):
        if kwargs.get(name, value) != value:
            raise ValueError(f"The parameter '{name}' expected value {value} but got {kwargs[name]} instead.")
    return {**kwargs, "groups": groups, "width_per_group": width_per_group}


@torchvision_weights("resnext50_32x4d")
def resnext50_32x4d(*, weights: Any | None = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt-50 32x4d (https://arxiv.org/abs/1611.05431)."""
    return _resnet(Bottleneck, [3, 4, 6, 3], **_with_width(kwargs, 32, 4))


@torchvision_weights("resnext101_32x8d")
def resnext101_32x8d(*, weights: Any | None = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt-101 32x8d."""
    return _resnet(Bottleneck, [3, 4, 23, 3], **_with_width(kwargs, 32, 8))


@torchvision_weights("resnext101_64x4d")
def resnext101_64x4d(*, weights: Any | None = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt-101 64x4d."""
    return _resnet(Bottleneck, [3, 4, 23, 3], **_with_width(kwargs, 64, 4))


@torchvision_weights("wide_resnet50_2")
def wide_resnet50_2(*, weights: Any | None = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """Wide ResNet-50-2 (https://arxiv.org/abs/1605.07146): bottlenecks twice as wide."""
    return _resnet(Bottleneck, [3, 4, 6, 3], **_with_width(kwargs, 1, 128))


@torchvision_weights("wide_resnet101_2")
def wide_resnet101_2(*, weights: Any | None = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """Wide ResNet-101-2."""
    return _resnet(Bottleneck, [3, 4, 23, 3], **_with_width(kwargs, 1, 128))
