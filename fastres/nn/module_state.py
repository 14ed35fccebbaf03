"""What fastres's modules read off the modules they stand in for: hooks, batch-norm state, and conversion."""

import torch
from torch import nn
from torch.nn.modules import module as _module


def has_hooks(m: nn.Module) -> bool:
    """Whether calling ``m`` runs forward (pre-)hooks, its own or global ones: a fused call would skip them."""
    return bool(
        m._forward_hooks or m._forward_pre_hooks
        or _module._global_forward_hooks or _module._global_forward_pre_hooks
    )


def is_plain(m: nn.Module | None, *types: type) -> bool:
    """Whether a fused op may stand in for calling ``m``: exactly one of ``types`` and without forward hooks.

    Exactly, not a subclass, whose forward may differ; hooks (the module's or
    global ones) would be skipped by a fused call. The one test every fastres
    module and model makes before fusing a module's computation.
    """
    return type(m) in types and not has_hooks(m)


PLAIN_BATCH_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)


def running_stats_args(bn: nn.modules.batchnorm._BatchNorm) -> tuple:
    """(running_mean, running_var, bn_training, momentum factor): ``_BatchNorm.forward``'s logic.

    Counts the batch in ``num_batches_tracked`` when training with running stats.
    """
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    bn_training = bn.training or (bn.running_mean is None and bn.running_var is None)
    use_buffers = not bn.training or bn.track_running_stats
    return (
        bn.running_mean if use_buffers else None,
        bn.running_var if use_buffers else None,
        bn_training,
        factor,
    )


def sync_world(bn: nn.SyncBatchNorm, bn_training: bool):
    """(process group, world size) when ``bn``'s statistics must be synchronized, else None.

    torch's SyncBatchNorm rule: in training, with a process group of more than one.
    """
    dist = torch.distributed
    if not (bn_training and bn.training and dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group or dist.group.WORLD
    world = dist.get_world_size(group)
    return (group, world) if world > 1 else None


class NotScriptable:
    """Makes ``torch.jit.script`` of a fastres module (or a model holding one) fail with one clear error.

    The forward passes pick fused kernels at run time, which TorchScript
    cannot compile; ``torch.compile`` and ``torch.export`` take them, and
    ``torch.jit.trace`` records eager PyTorch's ops.
    """

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"{type(self).__name__} is a fastres module, which torch.jit.script cannot compile (its forward "
            "chooses fused kernels at run time). Use torch.compile or torch.export instead, or torch.jit.trace, "
            "which records eager PyTorch's ops"
        )


class FromModule(NotScriptable):
    """Building a fused module over an existing module's state: children, parameters, buffers and hooks shared.

    Subclasses say which modules they take (``is_convertible``) and what they
    take them as (``convertible_from``, for the error message); ``_adopt`` sets
    what the fused module has beyond the original's attributes.
    """

    @classmethod
    def is_convertible(cls, module: nn.Module) -> bool:
        raise NotImplementedError

    @classmethod
    def convertible_from(cls) -> str:
        raise NotImplementedError

    @classmethod
    def from_module(cls, module: nn.Module):
        """A ``cls`` sharing ``module``'s state (the same dicts of children, parameters, buffers and hooks)."""
        if not cls.is_convertible(module):
            raise TypeError(f"module must be {cls.convertible_from()}, got {type(module).__name__}")
        fused = cls.__new__(cls)
        fused.__dict__.update(module.__dict__)
        fused._adopt()
        return fused

    def _adopt(self) -> None:
        """Attributes the original module lacks."""
