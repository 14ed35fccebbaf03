"""``BNReLUConv2d``: BatchNorm2d -> ReLU -> Conv2d as one module, with the fused pre-activation op.

It holds a ``norm`` (``nn.BatchNorm2d``) and a ``conv`` (``nn.Conv2d``), so
its state_dict keys are ``norm.*`` and ``conv.*``. ``bn_relu_conv(norm, conv,
x)`` runs ``conv(relu(norm(x)))`` for any such pair: fused for a plain
BatchNorm2d and a zero-padded Conv2d without hooks, as written otherwise.
"""

import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_4d
from ..functional import bn_relu_conv2d
from .batch_norm import batch_norm
from .module_state import NotScriptable, has_hooks, running_stats_args, sync_world


def fusable(norm: nn.Module, conv: nn.Module) -> bool:
    """Whether ``conv(relu(norm(x)))`` can run as one fused op (per call, SyncBN may still synchronize)."""
    return (
        type(norm) in (nn.BatchNorm2d, nn.SyncBatchNorm) and type(conv) is nn.Conv2d
        and conv.padding_mode == "zeros" and not has_hooks(norm) and not has_hooks(conv)
    )


def bn_relu_conv(norm: nn.Module, conv: nn.Module, x: Tensor) -> Tensor:
    """``conv(relu(norm(x)))`` with the modules' parameters and buffers, fused where it can be.

    Exactly what calling the modules does, including the running-statistic
    update and ``num_batches_tracked``. A synchronizing SyncBatchNorm, another
    norm or convolution type, or modules with hooks run as written.
    """
    if not fusable(norm, conv) or (isinstance(norm, nn.SyncBatchNorm) and sync_world(norm, norm.training)):
        return conv(F.relu(batch_norm(norm, x)))
    check_4d("x", x, type(norm).__name__, norm.num_features, "num_features")
    running_mean, running_var, bn_training, factor = running_stats_args(norm)
    return bn_relu_conv2d(
        x, running_mean, running_var, norm.weight, norm.bias, conv.weight, conv.bias, conv.stride, conv.padding,
        conv.dilation, conv.groups, bn_training, factor, norm.eps,
    )


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

    def forward(self, x: Tensor) -> Tensor:
        return bn_relu_conv(self.norm, self.conv, x)
