"""Model builders shaped like torchvision's, using fastres's fused blocks."""

from . import densenet as _densenet
from . import resnet as _resnet
from .densenet import *  # noqa: F401,F403
from .resnet import *  # noqa: F401,F403

__all__ = _resnet.__all__ + _densenet.__all__
