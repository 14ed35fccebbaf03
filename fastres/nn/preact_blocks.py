"""Pre-activation residual blocks with timm's names, arguments and forward (``timm.models.resnetv2``).

``PreActBasicBlock`` (timm's ``PreActBasic``) and ``PreActBottleneck``: every
convolution is preceded by BatchNorm-ReLU, so each ``conv(norm(x))`` runs as
one ``bn_relu_conv2d`` whose BN-ReLU output never exists in memory. As in
timm, ``norm1``'s output feeds both ``conv1`` and the projection shortcut when
there is one (the raw input is the shortcut otherwise), and the block ends in
a plain ``x + shortcut`` (no ReLU: the next block's norm1 applies it).

The norms are plain ``nn.BatchNorm2d`` (timm's ``BatchNormAct2d`` has the
same state), with the ReLU applied by the block, so that ``torch``'s, timm's
and fastres's SyncBatchNorm converters and timm's ``freeze_batch_norm_2d``
keep the computation. A ``norm_layer`` that builds norm-act modules (timm's
``BatchNormAct2d``, as in timm's blocks) applies its own activation instead,
and a timm block converted by ``fastres.convert`` keeps its norms.
"""

from collections.abc import Callable

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_4d
from .atomic import atomic
from .bn_relu_conv import bn_relu_conv, bn_relu_conv_pair, fusable, pre_activation
from .module_state import FromModule, is_plain

# torch.fx leaves: they branch on the tensor, and read the modules' state when the graph runs.
torch.fx.wrap("check_4d")
torch.fx.wrap("bn_relu_conv")
torch.fx.wrap("bn_relu_conv_pair")
torch.fx.wrap("pre_activation")


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """timm's channel rounding: ``v`` to a multiple of ``divisor``, never below 90% of ``v``."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def conv2d(
    in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, dilation: int = 1, groups: int = 1,
    bias: bool = False, device=None, dtype=None,
) -> nn.Conv2d:
    """timm's ``create_conv2d`` for the BatchNorm ResNetV2s: symmetric padding, no bias."""
    padding = ((stride - 1) + dilation * (kernel_size - 1)) // 2
    return nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=padding, dilation=dilation, groups=groups,
                     bias=bias, device=device, dtype=dtype)


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True) -> Tensor:
    """Stochastic depth: each sample's branch is zeroed with probability ``drop_prob`` (timm's, RNG draw for draw)."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        keep.div_(keep_prob)
    return x * keep


class DropPath(nn.Module):
    """``drop_path`` as a module (timm's ``DropPath``)."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"drop_prob must be in [0, 1], got {drop_prob}")
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


class DownsampleConv(nn.Module):
    """The projection shortcut: a 1x1 convolution (stride ``stride``) of the pre-activation (timm's)."""

    def __init__(
        self, in_chs: int, out_chs: int, stride: int = 1, dilation: int = 1, first_dilation: int | None = None,
        preact: bool = True, conv_layer: Callable[..., nn.Module] | None = None,
        norm_layer: Callable[..., nn.Module] | None = None, device=None, dtype=None,
    ):
        super().__init__()
        _check_preact(preact)
        self.conv = (conv_layer or conv2d)(in_chs, out_chs, 1, stride=stride, device=device, dtype=dtype)
        self.norm = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


torch.fx.wrap("_same_padding")  # max() of a traced size is control flow: computed when the graph runs


class AvgPool2dSame(nn.AvgPool2d):
    """Average pooling with TensorFlow's 'SAME' zero padding, computed per input size (timm's)."""

    def forward(self, x: Tensor) -> Tensor:
        kh, kw = (self.kernel_size,) * 2 if isinstance(self.kernel_size, int) else self.kernel_size
        sh, sw = (self.stride,) * 2 if isinstance(self.stride, int) else self.stride
        top, bottom = _same_padding(x.shape[-2], kh, sh)
        left, right = _same_padding(x.shape[-1], kw, sw)
        x = F.pad(x, (left, right, top, bottom))
        return F.avg_pool2d(x, self.kernel_size, self.stride, 0, self.ceil_mode, self.count_include_pad)


class DownsampleAvg(nn.Module):
    """The 'D' variants' shortcut: 2x2 average pooling (ceil mode), then a 1x1 convolution (timm's)."""

    def __init__(
        self, in_chs: int, out_chs: int, stride: int = 1, dilation: int = 1, first_dilation: int | None = None,
        preact: bool = True, conv_layer: Callable[..., nn.Module] | None = None,
        norm_layer: Callable[..., nn.Module] | None = None, device=None, dtype=None,
    ):
        super().__init__()
        _check_preact(preact)
        avg_stride = stride if dilation == 1 else 1
        if stride > 1 or dilation > 1:
            pool = AvgPool2dSame if avg_stride == 1 and dilation > 1 else nn.AvgPool2d
            self.pool = pool(2, avg_stride, ceil_mode=True, count_include_pad=False)
        else:
            self.pool = nn.Identity()
        self.conv = (conv_layer or conv2d)(in_chs, out_chs, 1, stride=1, device=device, dtype=dtype)
        self.norm = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(self.pool(x)))


def _check_preact(preact: bool) -> None:
    if not preact:
        raise ValueError("preact=False (a normalised projection, timm's ViT-hybrid backbones) is not supported")


def _projection_conv(downsample: nn.Module) -> nn.Module | None:
    """The convolution of a ``DownsampleConv`` (fastres's or timm's) without hooks, else None.

    Such a shortcut is ``conv(x_preact)``, so it can load x through the same
    fused BN-ReLU as conv1; any other shortcut runs on a stored ``x_preact``.
    """
    timm_cls = getattr(sys.modules.get("timm.models.resnetv2"), "DownsampleConv", None)
    if not is_plain(downsample, DownsampleConv, timm_cls):
        return None
    norm = downsample._modules.get("norm")
    return downsample._modules.get("conv") if is_plain(norm, nn.Identity) else None


class _PreActBlock(FromModule, nn.Module):
    """What the two blocks share: the pre-activation feeding conv1 and the shortcut, the drop path, the sum."""

    _timm_name = ""
    _convs: tuple[str, ...] = ()

    def _stem(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(conv1(norm1(x)), shortcut)``."""
        check_4d("x", x, type(self).__name__, self.conv1.in_channels, "in_chs")
        if self.downsample is None:
            return bn_relu_conv(self.norm1, self.conv1, x), x
        projection = _projection_conv(self.downsample)
        if projection is not None:
            return bn_relu_conv_pair(self.norm1, self.conv1, projection, x)
        x_preact = pre_activation(self.norm1, x)  # the shortcut pools it first: it must exist
        return self.conv1(x_preact), self.downsample(x_preact)

    def zero_init_last(self) -> None:
        nn.init.zeros_(getattr(self, self._convs[-1]).weight)

    def fusion(self) -> tuple[list[str], list[str]]:
        """(what runs fused, what runs as written and why), from the modules as they are now."""
        fused, left = [], []
        for norm_name, conv_name in zip(self._norms, self._convs):
            norm, conv = getattr(self, norm_name), getattr(self, conv_name)
            convs = [conv_name]
            if norm_name == "norm1" and self.downsample is not None and _projection_conv(self.downsample) is not None:
                convs.append("downsample.conv")
            if not fusable(norm, conv):
                left.append(f"{norm_name} -> {conv_name}: as written, {norm_name} ({type(norm).__name__}) is not a "
                            "batch norm with a plain ReLU, or a module has hooks")
            else:
                fused.append(f"{norm_name} -> {' and '.join(convs)} (BN-ReLU-conv)")
        if self.downsample is not None and _projection_conv(self.downsample) is None:
            left.append(f"downsample ({type(self.downsample).__name__}): as written, on the stored norm1 output")
        return fused, left

    @classmethod
    def is_convertible(cls, module: nn.Module) -> bool:
        """timm's block of this kind (``timm.models.resnetv2``), with the attributes this forward runs."""
        return (
            type(module).__name__ == cls._timm_name and type(module).__module__ == "timm.models.resnetv2"
            and all(hasattr(module, n) for n in ("downsample", "drop_path", *cls._norms, *cls._convs))
        )

    @classmethod
    def convertible_from(cls) -> str:
        return f"timm's {cls._timm_name}"


def _build(norm_layer, conv_layer, act_layer, drop_path_rate: float, owner: str):
    if not 0.0 <= drop_path_rate <= 1.0:
        raise ValueError(f"{owner}: drop_path_rate must be in [0, 1], got {drop_path_rate}")
    if act_layer not in (None, nn.ReLU):
        raise ValueError(
            f"{owner}: act_layer must be None or nn.ReLU (the activation lives in norm_layer, as in timm), "
            f"got {act_layer!r}"
        )
    drop = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
    return norm_layer or nn.BatchNorm2d, conv_layer or conv2d, drop


class PreActBasicBlock(_PreActBlock):
    """timm's ``PreActBasic``: ``norm1 -> conv1 (3x3, stride) -> norm2 -> conv2 (3x3)`` plus the shortcut."""

    _timm_name = "PreActBasic"
    _norms = ("norm1", "norm2")
    _convs = ("conv1", "conv2")

    def __init__(
        self, in_chs: int, out_chs: int | None = None, bottle_ratio: float = 1.0, stride: int = 1, dilation: int = 1,
        first_dilation: int | None = None, groups: int = 1, act_layer: Callable[..., nn.Module] | None = None,
        conv_layer: Callable[..., nn.Module] | None = None, norm_layer: Callable[..., nn.Module] | None = None,
        proj_layer: Callable[..., nn.Module] | None = None, drop_path_rate: float = 0.0, device=None, dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        norm_layer, conv_layer, drop = _build(norm_layer, conv_layer, act_layer, drop_path_rate, "PreActBasicBlock")
        first_dilation = first_dilation or dilation
        out_chs = out_chs or in_chs
        mid_chs = make_divisible(out_chs * bottle_ratio)
        if proj_layer is not None and (stride != 1 or first_dilation != dilation or in_chs != out_chs):
            self.downsample = proj_layer(
                in_chs, out_chs, stride=stride, dilation=dilation, first_dilation=first_dilation, preact=True,
                conv_layer=conv_layer, norm_layer=norm_layer, **dd,
            )
        else:
            self.downsample = None
        self.norm1 = norm_layer(in_chs, **dd)
        self.conv1 = conv_layer(in_chs, mid_chs, 3, stride=stride, dilation=first_dilation, groups=groups, **dd)
        self.norm2 = norm_layer(mid_chs, **dd)
        self.conv2 = conv_layer(mid_chs, out_chs, 3, dilation=dilation, groups=groups, **dd)
        self.drop_path = drop

    @atomic
    def forward(self, x: Tensor) -> Tensor:
        out, shortcut = self._stem(x)
        return _merge(self.drop_path, bn_relu_conv(self.norm2, self.conv2, out), shortcut, type(self).__name__)


class PreActBottleneck(_PreActBlock):
    """timm's ``PreActBottleneck``: ``norm1 -> conv1 (1x1) -> norm2 -> conv2 (3x3, stride) -> norm3 -> conv3 (1x1)``."""

    _timm_name = "PreActBottleneck"
    _norms = ("norm1", "norm2", "norm3")
    _convs = ("conv1", "conv2", "conv3")

    def __init__(
        self, in_chs: int, out_chs: int | None = None, bottle_ratio: float = 0.25, stride: int = 1, dilation: int = 1,
        first_dilation: int | None = None, groups: int = 1, act_layer: Callable[..., nn.Module] | None = None,
        conv_layer: Callable[..., nn.Module] | None = None, norm_layer: Callable[..., nn.Module] | None = None,
        proj_layer: Callable[..., nn.Module] | None = None, drop_path_rate: float = 0.0, device=None, dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        norm_layer, conv_layer, drop = _build(norm_layer, conv_layer, act_layer, drop_path_rate, "PreActBottleneck")
        first_dilation = first_dilation or dilation
        out_chs = out_chs or in_chs
        mid_chs = make_divisible(out_chs * bottle_ratio)
        if proj_layer is not None:
            self.downsample = proj_layer(
                in_chs, out_chs, stride=stride, dilation=dilation, first_dilation=first_dilation, preact=True,
                conv_layer=conv_layer, norm_layer=norm_layer, **dd,
            )
        else:
            self.downsample = None
        self.norm1 = norm_layer(in_chs, **dd)
        self.conv1 = conv_layer(in_chs, mid_chs, 1, **dd)
        self.norm2 = norm_layer(mid_chs, **dd)
        self.conv2 = conv_layer(mid_chs, mid_chs, 3, stride=stride, dilation=first_dilation, groups=groups, **dd)
        self.norm3 = norm_layer(mid_chs, **dd)
        self.conv3 = conv_layer(mid_chs, out_chs, 1, **dd)
        self.drop_path = drop

    @atomic
    def forward(self, x: Tensor) -> Tensor:
        out, shortcut = self._stem(x)
        out = bn_relu_conv(self.norm3, self.conv3, bn_relu_conv(self.norm2, self.conv2, out))
        return _merge(self.drop_path, out, shortcut, type(self).__name__)


def _merge(drop_path: nn.Module, x: Tensor, shortcut: Tensor, owner: str) -> Tensor:
    """``drop_path(x) + shortcut``, same shapes only."""
    x = drop_path(x)
    if x.shape != shortcut.shape:
        raise ValueError(
            f"{owner}: the residual branch gives {tuple(x.shape)} but the shortcut gives "
            f"{tuple(shortcut.shape)}; a block that changes stride or channels needs a proj_layer"
        )
    return x + shortcut


# The shape comparison runs in a traced graph too, and the drop path there reads its module's training flag.
torch.fx.wrap("_merge")


PreActBasic = PreActBasicBlock  # timm's name
