"""Residual blocks with torchvision's names, signatures and state_dict keys.

The modules are torchvision's; the forward fuses what follows each
convolution: ``relu(bn1(conv1(x)))`` is one fused BN-ReLU, and the tail
``relu(bn(conv(out)) + identity)`` one fused BN-add-ReLU, each saving a
1-bit ReLU mask for backward. With a ``norm_layer`` other than BatchNorm2d /
SyncBatchNorm the norm runs as written and only the merge is fused.

Under synchronized BN (``convert_sync_batchnorm``, fastres's or torch's) the
same calls run the fused synchronized op; the downsample's lone batch norm
runs ``torch.nn.SyncBatchNorm`` where torch synchronizes the input (CUDA) and
fastres's eager synchronized path on CPU tensors (gloo), which torch refuses.
"""

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .atomic import atomic
from .batch_norm import norm_relu, run_sequential
from .._checks import check_4d
from .module_state import FromModule

# torch.fx leaves: they branch on the tensor, and read the modules' state when the graph runs.
torch.fx.wrap("check_4d")
torch.fx.wrap("norm_relu")
torch.fx.wrap("run_sequential")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding."""
    return nn.Conv2d(
        in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
        groups=groups, bias=False, dilation=dilation,
    )


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class _FusedBlock(FromModule, nn.Module):
    """What the two blocks share: building one from an existing eager block."""

    # Submodules a torchvision-style block of this kind must have.
    _submodules: tuple[str, ...] = ()

    @classmethod
    def is_convertible(cls, module: nn.Module) -> bool:
        """True for a torchvision-style eager block of the same kind (not already fused)."""
        return (
            type(module).__name__ == cls.__name__
            and not isinstance(module, _FusedBlock)
            and all(hasattr(module, name) for name in (*cls._submodules, "relu", "downsample", "stride"))
        )

    @classmethod
    def convertible_from(cls) -> str:
        return f"a torchvision-style {cls.__name__}"

    def _check_input(self, x: Tensor) -> None:
        check_4d("x", x, type(self).__name__, self.conv1.in_channels, "inplanes")


class BasicBlock(_FusedBlock):
    """torchvision's ``BasicBlock`` (ResNet-18/34) with the fused residual merge."""

    expansion: int = 1
    _submodules = ("conv1", "bn1", "conv2", "bn2")

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    @atomic
    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        out = norm_relu(self.bn1, self.relu, self.conv1(x))
        identity = x if self.downsample is None else run_sequential(self.downsample, x)
        return _tail(self.bn2, self.relu, self.conv2(out), identity, type(self).__name__)


class Bottleneck(_FusedBlock):
    """torchvision's ``Bottleneck`` (ResNet-50 and up, v1.5: stride on the 3x3)."""

    expansion: int = 4
    _submodules = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    @atomic
    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        out = norm_relu(self.bn1, self.relu, self.conv1(x))
        out = norm_relu(self.bn2, self.relu, self.conv2(out))
        identity = x if self.downsample is None else run_sequential(self.downsample, x)
        return _tail(self.bn3, self.relu, self.conv3(out), identity, type(self).__name__)


def _tail(bn: nn.Module, relu: nn.Module, out: Tensor, identity: Tensor, owner: str) -> Tensor:
    """``relu(bn(out) + identity)``, fused; identity may differ in dtype (autocast)."""
    if out.shape != identity.shape:
        raise ValueError(
            f"{owner}: the residual branch gives {tuple(out.shape)} but the "
            f"identity gives {tuple(identity.shape)}; a block that changes stride or "
            "channels needs a matching downsample"
        )
    return norm_relu(bn, relu, out, identity)


torch.fx.wrap("_tail")  # the shape comparison too: a traced graph runs it
