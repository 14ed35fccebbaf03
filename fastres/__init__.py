"""fastres: fused GPU kernels for residual and dense convolutional networks."""

from . import functional

__version__ = "0.1.0"

__all__ = ["functional", "__version__"]
