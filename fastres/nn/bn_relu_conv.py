"""``BNReLUConv2d``: BatchNorm2d -> ReLU -> Conv2d as one module, with the fused pre-activation op.

It holds a ``norm`` (``nn.BatchNorm2d``) and a ``conv`` (``nn.Conv2d``), so
its state_dict keys are ``norm.*`` and ``conv.*``. ``bn_relu_conv(norm, conv,
x)`` runs ``conv(relu(norm(x)))`` for any such pair, and
``bn_relu_conv_pair`` two convolutions on one pre-activation (a
pre-activation block's conv1 and projection shortcut): fused for a plain
BatchNorm2d and a zero-padded Conv2d without hooks, as written otherwise.

A norm-act module (``BatchNormReLU2d``, timm's ``BatchNormAct2d`` and its
kin: anything with an ``act`` child) applies its own activation, so for it
the pre-activation is ``norm(x)``; fused when that activation is a plain ReLU.
"""

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_4d
from ..functional import bn_relu_conv2d
from .atomic import atomic
from .batch_norm import BatchNormReLU2d, SyncBatchNormReLU2d, batch_norm, bn_relu
from .module_state import PLAIN_BATCH_NORMS, NotScriptable, is_plain, running_stats_args, sync_world


_NORM_RELUS = (BatchNormReLU2d, SyncBatchNormReLU2d)  # the ReLU is the module's own


def is_norm_act(norm: nn.Module) -> bool:
    """Whether ``norm``'s forward applies an activation itself (fastres's BN-ReLU modules, timm's norm-act layers)."""
    return type(norm) in _NORM_RELUS or isinstance(norm._modules.get("act"), nn.Module)


def is_timm_bn_relu(norm: nn.Module) -> bool:
    """timm's ``BatchNormAct2d`` (or ``SyncBatchNormAct``) with a plain ReLU and no dropout: ``relu(batch_norm(x))``."""
    norm_act = sys.modules.get("timm.layers.norm_act")
    if not is_plain(norm, getattr(norm_act, "BatchNormAct2d", None), getattr(norm_act, "SyncBatchNormAct", None)):
        return False
    act, drop = norm._modules.get("act"), norm._modules.get("drop")
    return is_plain(act, nn.ReLU) and is_plain(drop, nn.Identity)


def fusable_norm(norm: nn.Module) -> bool:
    """Whether ``relu(norm(x))`` (or a norm-act ``norm(x)``) is a batch norm and ReLU that a fused op can run."""
    return is_plain(norm, *PLAIN_BATCH_NORMS, *_NORM_RELUS) or is_timm_bn_relu(norm)


def fusable(norm: nn.Module, conv: nn.Module) -> bool:
    """Whether ``conv(relu(norm(x)))`` can run as one fused op (per call, SyncBN may still synchronize)."""
    return (
        fusable_norm(norm) and is_plain(conv, nn.Conv2d) and conv.padding_mode == "zeros"
    )


def _fused(norm: nn.Module, *convs: nn.Module) -> bool:
    return all(fusable(norm, conv) for conv in convs) and not (
        isinstance(norm, nn.SyncBatchNorm) and sync_world(norm, norm.training)
    )


def pre_activation(norm: nn.Module, x: Tensor) -> Tensor:
    """``relu(norm(x))`` (``norm(x)`` for a norm-act module), stored: fused BN-ReLU for a plain batch norm.

    timm's BN-ReLU norm-acts too: a synchronizing ``SyncBatchNormAct`` would
    otherwise call torch's SyncBatchNorm, which refuses CPU tensors.
    """
    if is_timm_bn_relu(norm):
        return bn_relu(norm, x)
    if is_norm_act(norm):
        return norm(x)
    if is_plain(norm, *PLAIN_BATCH_NORMS):
        return bn_relu(norm, x)
    return F.relu(batch_norm(norm, x))


def _conv(conv: nn.Conv2d, x: Tensor, running_mean, running_var, norm, bn_training: bool, factor: float) -> Tensor:
    return bn_relu_conv2d(
        x, running_mean, running_var, norm.weight, norm.bias, conv.weight, conv.bias, conv.stride, conv.padding,
        conv.dilation, conv.groups, bn_training, factor, norm.eps,
    )


def bn_relu_conv(norm: nn.Module, conv: nn.Module, x: Tensor) -> Tensor:
    """``conv(relu(norm(x)))`` with the modules' parameters and buffers, fused where it can be.

    Exactly what calling the modules does, including the running-statistic
    update and ``num_batches_tracked``. A synchronizing SyncBatchNorm, another
    norm or convolution type, or modules with hooks run as written.
    """
    if not _fused(norm, conv):
        return conv(pre_activation(norm, x))
    check_4d("x", x, type(norm).__name__, norm.num_features, "num_features")
    running_mean, running_var, bn_training, factor = running_stats_args(norm)
    return _conv(conv, x, running_mean, running_var, norm, bn_training, factor)


def bn_relu_conv_pair(norm: nn.Module, conv_a: nn.Module, conv_b: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(conv_a(a), conv_b(a))`` with ``a = relu(norm(x))``: one batch norm (one statistics update), two convolutions.

    Fused, each convolution applies the BN-ReLU as it loads x, so ``a`` is
    never stored; the second normalises with the same batch statistics
    without updating the running ones again, and autograd sums the two
    paths' gradients as it sums the two uses of ``a`` in eager.
    """
    if not _fused(norm, conv_a, conv_b):
        a = pre_activation(norm, x)
        return conv_a(a), conv_b(a)
    check_4d("x", x, type(norm).__name__, norm.num_features, "num_features")
    running_mean, running_var, bn_training, factor = running_stats_args(norm)
    first = _conv(conv_a, x, running_mean, running_var, norm, bn_training, factor)
    if bn_training:  # batch statistics again, the running ones already updated
        running_mean = running_var = None
    return first, _conv(conv_b, x, running_mean, running_var, norm, bn_training, factor)


torch.fx.wrap("bn_relu_conv")  # a torch.fx leaf: BNReLUConv2d's forward, with the modules' state read when run


class BNReLUConv2d(NotScriptable, nn.Module):
    """``conv(relu(norm(x)))``: a pre-activation convolution whose BN-ReLU output is never stored.

    The arguments are ``nn.Conv2d``'s and ``nn.BatchNorm2d``'s (``bias`` is
    the convolution's; ``eps``, ``momentum``, ``affine`` and
    ``track_running_stats`` the batch norm's). Forward and backward go through
    ``fastres.functional.bn_relu_conv2d``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1, groups: int = 1,
        bias: bool = False, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
        track_running_stats: bool = True, device=None, dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm = nn.BatchNorm2d(in_channels, eps, momentum, affine, track_running_stats, **factory)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, **factory)

    @atomic
    def forward(self, x: Tensor) -> Tensor:
        return bn_relu_conv(self.norm, self.conv, x)

