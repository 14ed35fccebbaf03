"""Drop-in modules with torchvision's (pre-activation blocks: timm's) names, signatures and state_dict keys."""

from .bn_relu_conv import BNReLUConv2d, bn_relu_conv
from .batch_norm import BatchNormReLU2d, SyncBatchNormReLU2d, bn_relu, convert_sync_batchnorm
from .densenet import DenseBlock, DenseLayer, Transition
from .preact_blocks import DownsampleAvg, DownsampleConv, DropPath, PreActBasic, PreActBasicBlock, PreActBottleneck
from .resnet_blocks import BasicBlock, Bottleneck, conv1x1, conv3x3
from .timm_blocks import TimmBasicBlock, TimmBottleneck
from .timm_densenet import TimmDenseBlock, TimmDenseFeatures, TimmDenseLayer, TimmTransition

__all__ = [
    "BasicBlock",
    "BNReLUConv2d",
    "BatchNormReLU2d",
    "Bottleneck",
    "DenseBlock",
    "DenseLayer",
    "DownsampleAvg",
    "DownsampleConv",
    "DropPath",
    "PreActBasic",
    "PreActBasicBlock",
    "PreActBottleneck",
    "SyncBatchNormReLU2d",
    "TimmBasicBlock",
    "TimmBottleneck",
    "TimmDenseBlock",
    "TimmDenseFeatures",
    "TimmDenseLayer",
    "TimmTransition",
    "Transition",
    "bn_relu",
    "bn_relu_conv",
    "conv1x1",
    "conv3x3",
    "convert_sync_batchnorm",
]
