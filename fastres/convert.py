"""Swap fused blocks into an existing model, keeping its weights."""

from torch import nn

from .nn.resnet_blocks import BasicBlock, Bottleneck

_FUSED_BLOCKS = (BasicBlock, Bottleneck)


def convert(model: nn.Module) -> nn.Module:
    """Replace every torchvision-style ``BasicBlock``/``Bottleneck`` of ``model`` in place.

    The fused blocks share the old blocks' submodules, parameters, buffers and
    hooks, so optimizers and state_dict keys are unaffected. Returns ``model``
    (or the fused block, if ``model`` itself is a block).
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
    return model


def _fused_version(module: nn.Module) -> nn.Module | None:
    for cls in _FUSED_BLOCKS:
        if cls.is_convertible(module):
            return cls.from_module(module)
    return None
