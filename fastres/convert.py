"""Swap fused blocks into an existing model, keeping its weights."""

import sys

from torch import nn

from .models.densenet import DenseNet
from .models.resnet import ResNet
from .nn.batch_norm import BatchNormReLU2d, SyncBatchNormReLU2d
from .nn.densenet import DenseBlock, DenseLayer, Transition
from .nn.module_state import has_hooks
from .nn.resnet_blocks import BasicBlock, Bottleneck

_FUSED_BLOCKS = (BasicBlock, Bottleneck, DenseBlock, DenseLayer, Transition)
_FUSED_NORMS = {nn.BatchNorm2d: BatchNormReLU2d, nn.SyncBatchNorm: SyncBatchNormReLU2d}


def convert(model: nn.Module) -> nn.Module:
    """Fuse what can be fused in ``model``, in place.

    - torchvision-style ``BasicBlock``/``Bottleneck`` become fastres's blocks
      (fused BN-ReLU and BN-add-ReLU).
    - torchvision's DenseNet ``_DenseBlock``/``_DenseLayer``/``_Transition``
      become ``DenseBlock``/``DenseLayer``/``Transition`` with
      ``memory_efficient=True`` (shared storage, in place of checkpointing).
    - A torchvision ``DenseNet`` (its own class, with torchvision's layout of
      ``features``) becomes a ``fastres.models.DenseNet`` and a torchvision
      ``ResNet`` (its own class) a ``fastres.models.ResNet``, in place: the
      same children and computation, with the stems' BN-ReLU (and DenseNet's
      final BN-ReLU) fused in forward as in fastres's builders, so the same
      activation memory, and BatchNorm modules that stay BatchNorms (which
      ``nn.SyncBatchNorm.convert_sync_batchnorm`` can convert).
    - BatchNorm2d -> ReLU pairs in any plain ``nn.Sequential`` (one whose
      forward is ``nn.Sequential.forward``; a subclass with its own forward
      may return or use the BN's output, so it is left alone) become one
      ``BatchNormReLU2d`` (a ``SyncBatchNormReLU2d`` for SyncBatchNorm)
      followed by ``nn.Identity``. For synchronized BN convert these with
      ``fastres.nn.convert_sync_batchnorm``: torch's converter would turn a
      ``BatchNormReLU2d`` into a plain SyncBatchNorm and drop its ReLU.

    fastres's own modules (built by fastres or already converted) are left as
    they are. Fused modules share the old ones' parameters, buffers and hooks,
    so optimizers and state_dict keys are unaffected. A pair where either
    module has forward hooks is left alone (fusing would change what the
    hooks see). Returns ``model`` (or the fused block, if ``model`` itself is
    a block).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    fused = _fused_version(model)
    root = model if fused is None else fused
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            fused = _fused_version(child)
            if fused is not None:
                setattr(parent, name, fused)
    for module in list(root.modules()):
        if _is_torchvision_densenet(module):
            module.__class__ = DenseNet
        elif _is_torchvision_resnet(module):
            module.__class__ = ResNet
    _fuse_pairs_outside_fastres(root)
    return root


def _fused_version(module: nn.Module) -> nn.Module | None:
    for cls in _FUSED_BLOCKS:
        if cls.is_convertible(module):
            return cls.from_module(module)
    return None


def _is_fastres(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "fastres"


def _torchvision_class(module_name: str, class_name: str) -> type | None:
    """torchvision's class, if torchvision is imported (a torchvision model implies it is)."""
    return getattr(sys.modules.get(module_name), class_name, None)


def _is_torchvision_densenet(module: nn.Module) -> bool:
    """torchvision's DenseNet itself, with the children ``fastres.models.DenseNet.forward`` runs, in its order.

    That forward runs the stem and the blocks/transitions of ``features``
    without calling ``features`` itself, so ``features`` must be a plain
    Sequential without hooks holding exactly torchvision's layout.
    """
    if type(module) is not _torchvision_class("torchvision.models.densenet", "DenseNet"):
        return False
    features, classifier = module._modules.get("features"), module._modules.get("classifier")
    if type(features) is not nn.Sequential or has_hooks(features) or type(classifier) is not nn.Linear:
        return False
    names = list(features._modules)
    if names[:4] != ["conv0", "norm0", "relu0", "pool0"] or names[-1:] != ["norm5"]:
        return False
    blocks = names[4:-1]
    expected = [f"{kind}{i // 2 + 1}" for i, kind in zip(range(len(blocks)), ["denseblock", "transition"] * len(blocks))]
    return bool(blocks) and blocks == expected and blocks[-1].startswith("denseblock")


def _is_torchvision_resnet(module: nn.Module) -> bool:
    """torchvision's ResNet itself: ``fastres.models.ResNet`` has its children and runs them alike, stem fused."""
    return type(module) is _torchvision_class("torchvision.models.resnet", "ResNet")


def _pairs(module: nn.Module) -> list[tuple[str, str]]:
    """(norm, relu) child names that ``module``'s forward runs back to back: a plain Sequential's."""
    if type(module).forward is nn.Sequential.forward:  # each child's output feeds the next
        names = list(module._modules)
        return list(zip(names, names[1:]))
    return []


def _fuse_pairs_outside_fastres(module: nn.Module) -> None:
    if _is_fastres(module):
        return  # fastres's modules run their BN-ReLUs fused already (or recompute them), as they are
    _fuse_bn_relu_pairs(module)
    for child in module.children():
        _fuse_pairs_outside_fastres(child)


def _fuse_bn_relu_pairs(module: nn.Module) -> None:
    for norm_name, relu_name in _pairs(module):
        norm, relu = module._modules.get(norm_name), module._modules.get(relu_name)
        if type(norm) not in _FUSED_NORMS or type(relu) is not nn.ReLU:
            continue
        if norm._forward_hooks or norm._forward_pre_hooks or relu._forward_hooks or relu._forward_pre_hooks:
            continue
        module._modules[norm_name] = _FUSED_NORMS[type(norm)].from_module(norm)
        module._modules[relu_name] = nn.Identity()
