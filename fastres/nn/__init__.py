"""Drop-in modules with torchvision's names, signatures and state_dict keys."""

from .resnet_blocks import BasicBlock, Bottleneck, conv1x1, conv3x3

__all__ = ["BasicBlock", "Bottleneck", "conv1x1", "conv3x3"]
