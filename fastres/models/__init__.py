"""Model builders shaped like torchvision's (and, for pre-activation ResNets, timm's), using fastres's fused blocks."""

from . import densenet as _densenet
from . import resnet as _resnet
from . import resnetv2 as _resnetv2
from .densenet import *  # noqa: F401,F403
from .resnet import *  # noqa: F401,F403
from .resnetv2 import *  # noqa: F401,F403
from .timm_registry import register_with_timm

__all__ = _resnet.__all__ + _resnetv2.__all__ + _densenet.__all__ + ["register_with_timm"]
