"""BatchNorm2d + ReLU (and + residual add) as one module, single-process and synchronized.

``BatchNormReLU2d`` is a ``torch.nn.BatchNorm2d`` and ``SyncBatchNormReLU2d`` a
``torch.nn.SyncBatchNorm``: same constructor, parameters, buffers and
state_dict, so checkpoints load unchanged. Only ``forward`` differs: it
returns ``relu(bn(x) [+ residual])`` through the fused kernels.

``bn_relu(bn, x, residual)`` runs that computation for any plain BatchNorm2d or
SyncBatchNorm instance; the residual blocks call it on their ``bn1``/``bn2``.

Synchronized BN keeps the fusion without new module types: the residual
blocks and the ResNet stem hold plain batch norms, which
``convert_sync_batchnorm`` (fastres's or torch's) turns into
``torch.nn.SyncBatchNorm``, and ``bn_relu`` runs every such BN-ReLU and
BN-add-ReLU through the fused synchronized op whenever torch's SyncBatchNorm
would synchronize (training, a process group of more than one). A lone
SyncBatchNorm (a downsample's) runs ``batch_norm``: torch's module where it
works, fastres's eager synchronized path on CPU tensors (gloo), which torch's
refuses.
"""

import torch
from torch import Tensor, nn

from ..functional import add_relu, batch_norm_relu, sync_batch_norm, sync_batch_norm_relu
from .._checks import check_4d
from .atomic import atomic
from .module_state import PLAIN_BATCH_NORMS, FromModule, is_plain, running_stats_args, sync_world


def bn_relu(bn: nn.modules.batchnorm._BatchNorm, x: Tensor, residual: Tensor | None = None) -> Tensor:
    """``relu(bn(x) [+ residual])`` with ``bn``'s parameters and buffers, fused.

    Exactly what calling the module, adding and applying ReLU does, including
    the running-statistic update and ``num_batches_tracked``; a SyncBatchNorm
    synchronizes its statistics when a process group of more than one is up.
    """
    check_4d("x", x, type(bn).__name__, bn.num_features, "num_features")
    running_mean, running_var, bn_training, factor = running_stats_args(bn)
    if isinstance(bn, nn.SyncBatchNorm):
        sync = sync_world(bn, bn_training)
        if sync is not None:
            return sync_batch_norm_relu(
                x, running_mean, running_var, bn.weight, bias=bn.bias, momentum=factor,
                eps=bn.eps, residual=residual, process_group=sync[0],
            )
    return batch_norm_relu(
        x, running_mean, running_var, bn.weight, bn.bias, bn_training, factor, bn.eps, residual
    )


torch.fx.wrap("bn_relu")  # a torch.fx leaf: BatchNormReLU2d's forward, with the module's state read when run


def _torch_synchronizes(device: torch.device) -> bool:
    """Whether ``torch.nn.SyncBatchNorm`` synchronizes tensors on ``device`` (else it raises: CPU)."""
    return device.type in ("cuda", "hpu", "xpu", torch._C._get_privateuse1_backend_name())


def batch_norm(bn: nn.Module, x: Tensor) -> Tensor:
    """``bn(x)``, except that a synchronizing ``torch.nn.SyncBatchNorm`` also works on CPU tensors.

    torch's SyncBatchNorm raises "expected input tensor to be on GPU" for a
    CPU input when it would synchronize; there, for a 4-D input and a module
    without hooks, this runs ``fastres.functional.sync_batch_norm`` with the
    module's parameters and buffers (``num_batches_tracked`` and
    ``momentum=None`` handled as the module does). Everything else is a plain
    module call.
    """
    if (
        is_plain(bn, nn.SyncBatchNorm) and isinstance(x, Tensor) and x.dim() == 4
        and not _torch_synchronizes(x.device)
    ):
        sync = sync_world(bn, bn.training)
        if sync is not None:
            check_4d("x", x, type(bn).__name__, bn.num_features, "num_features")
            running_mean, running_var, _, factor = running_stats_args(bn)
            return sync_batch_norm(
                x, running_mean, running_var, bn.weight, bn.bias, factor, bn.eps, process_group=sync[0]
            )
    return bn(x)


def run_sequential(seq: nn.Module, x: Tensor) -> Tensor:
    """``seq(x)`` for a block's ``downsample``, its batch norms through ``batch_norm``.

    Only a plain ``nn.Sequential`` without hooks is walked child by child
    (its forward is known); any other module is called as it is.
    """
    if not is_plain(seq, nn.Sequential):
        return seq(x)
    for module in seq:
        x = batch_norm(module, x)
    return x


def norm_relu(norm: nn.Module, relu: nn.Module, x: Tensor, residual: Tensor | None = None) -> Tensor:
    """``relu(norm(x) [+ residual])``: fused when ``norm`` is a plain BatchNorm2d/SyncBatchNorm.

    Any other norm layer (a ``norm_layer`` of the user's, a frozen BN), or
    modules with forward hooks (which a fused call would skip), run as
    written: the module, then the add, then ``relu``.
    """
    if isinstance(norm, (BatchNormReLU2d, SyncBatchNormReLU2d)):
        return norm(x, residual)  # a module call, so its hooks run
    if is_plain(norm, *PLAIN_BATCH_NORMS) and is_plain(relu, nn.ReLU):
        return bn_relu(norm, x, residual)
    out = batch_norm(norm, x)
    if residual is None:
        return relu(out)
    if is_plain(relu, nn.ReLU):
        return add_relu(out, residual, inplace=True)
    out += residual
    return relu(out)


class _FromBatchNorm(FromModule):
    """Built from exactly ``_base``, sharing its parameters, buffers and hooks."""

    _base: type = nn.Module

    @classmethod
    def is_convertible(cls, module: nn.Module) -> bool:
        return type(module) is cls._base

    @classmethod
    def convertible_from(cls) -> str:
        return f"a {cls._base.__name__}"


class BatchNormReLU2d(_FromBatchNorm, nn.BatchNorm2d):
    """``relu(BatchNorm2d(x) [+ residual])`` in one fused pass (two when training).

    A ``torch.nn.BatchNorm2d`` in every other respect: constructor, ``momentum=None``
    (cumulative average), ``affine``, ``track_running_stats``, unbiased running
    variance, ``num_batches_tracked``, state_dict.
    """

    _base = nn.BatchNorm2d

    @atomic
    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return bn_relu(self, x, residual)


class SyncBatchNormReLU2d(_FromBatchNorm, nn.SyncBatchNorm):
    """``relu(SyncBatchNorm(x) [+ residual])``: statistics reduced across ``process_group``.

    Matches ``torch.nn.SyncBatchNorm`` followed by ReLU: per-channel statistics
    over the batches of all processes (which may differ in size), the backward
    reductions all-reduced likewise, weight and bias gradients local (DDP
    averages them). Works on CPU tensors (gloo) as well as CUDA ones. Without
    an initialised process group of more than one, or in eval mode, it is
    ``BatchNormReLU2d``.
    """

    _base = nn.SyncBatchNorm

    @atomic
    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return bn_relu(self, x, residual)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` that keeps the fused ReLU.

    ``BatchNormReLU2d`` becomes ``SyncBatchNormReLU2d``; any other batch norm
    becomes ``torch.nn.SyncBatchNorm``, as torch's helper does (which would
    turn a ``BatchNormReLU2d`` into a plain SyncBatchNorm and drop its ReLU).
    Parameters and buffers are shared with the old modules, so state_dict
    keys are unchanged.

    fastres's ResNet blocks and ResNet stem keep plain batch norms, so they
    come out as ``torch.nn.SyncBatchNorm``: their forward still runs each
    BN-ReLU and BN-add-ReLU through the fused synchronized op (CPU tensors on
    gloo included) whenever the module would synchronize (training, a process
    group of more than one), and each downsample's batch norm through
    ``batch_norm``. In eval mode, or without such a group, they are plain
    fused BN, as ``torch.nn.SyncBatchNorm`` is plain BN then. torch's own
    converter gives fastres's models the same modules and the same fused path.

    torch's ``DistributedDataParallel`` refuses any SyncBatchNorm in a CPU
    module ("SyncBatchNorm layers only work with GPU modules"), whoever
    implements it; on CPU, all-reduce and average the gradients yourself.
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
        cls = SyncBatchNormReLU2d if isinstance(module, BatchNormReLU2d) else nn.SyncBatchNorm
        out = cls(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats, process_group,
        )
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
        return out
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, process_group))
    return module
