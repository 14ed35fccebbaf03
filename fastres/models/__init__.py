"""Model builders shaped like torchvision's, using fastres's fused blocks."""

from .resnet import *  # noqa: F401,F403
from .resnet import __all__
