"""Drop-in modules with torchvision's names, signatures and state_dict keys."""

from .batch_norm import BatchNormReLU2d, SyncBatchNormReLU2d, bn_relu, convert_sync_batchnorm
from .densenet import DenseBlock, DenseLayer, Transition
from .resnet_blocks import BasicBlock, Bottleneck, conv1x1, conv3x3

__all__ = [
    "BasicBlock",
    "BatchNormReLU2d",
    "Bottleneck",
    "DenseBlock",
    "DenseLayer",
    "SyncBatchNormReLU2d",
    "Transition",
    "bn_relu",
    "conv1x1",
    "conv3x3",
    "convert_sync_batchnorm",
]
