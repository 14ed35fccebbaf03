"""fastres: fused GPU kernels for residual and dense convolutional networks."""

from . import functional, models, nn, testing
from .convert import convert

__version__ = "0.1.0"

__all__ = ["convert", "functional", "models", "nn", "__version__"]
