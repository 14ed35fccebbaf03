"""Swap fused blocks into an existing model, keeping its weights."""

from torch import nn

from .nn.batch_norm import BatchNormReLU2d, SyncBatchNormReLU2d
from .nn.densenet import DenseBlock, DenseLayer, Transition
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
    - BatchNorm2d -> ReLU pairs become one ``BatchNormReLU2d`` (a
      ``SyncBatchNormReLU2d`` for SyncBatchNorm) followed by ``nn.Identity``:
      the stem of a torchvision ResNet (``bn1``, ``relu``), and consecutive
      pairs in any ``nn.Sequential``.

    Fused modules share the old ones' parameters, buffers and hooks, so
    optimizers and state_dict keys are unaffected. A pair where either module
    has forward hooks is left alone (fusing would change what the hooks see).
    Returns ``model`` (or the fused block, if ``model`` itself is a block).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    fused = _fused_version(model)
    if fused is not None:
        return fused
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            fused = _fused_version(child)
            if fused is not None:
                setattr(parent, name, fused)
    for parent in list(model.modules()):
        _fuse_bn_relu_pairs(parent)
    return model


def _fused_version(module: nn.Module) -> nn.Module | None:
    for cls in _FUSED_BLOCKS:
        if cls.is_convertible(module):
            return cls.from_module(module)
    return None


def _pairs(module: nn.Module) -> list[tuple[str, str]]:
    """(norm, relu) child names that ``module``'s forward runs back to back."""
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        return list(zip(names, names[1:]))
    if type(module).__name__ == "ResNet" and hasattr(module, "layer1"):
        return [("bn1", "relu")]  # torchvision's stem: conv1, bn1, relu, maxpool
    return []


def _fuse_bn_relu_pairs(module: nn.Module) -> None:
    for norm_name, relu_name in _pairs(module):
        norm, relu = module._modules.get(norm_name), module._modules.get(relu_name)
        if type(norm) not in _FUSED_NORMS or type(relu) is not nn.ReLU:
            continue
        if norm._forward_hooks or norm._forward_pre_hooks or relu._forward_hooks or relu._forward_pre_hooks:
            continue
        module._modules[norm_name] = _FUSED_NORMS[type(norm)].from_module(norm)
        module._modules[relu_name] = nn.Identity()
