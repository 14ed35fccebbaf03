"""fastres: fused GPU kernels for residual and dense convolutional networks."""

from . import functional, models, nn, testing
from .convert import convert
from .ops import dense_path

__version__ = "0.1.0"

__all__ = ["convert", "dense_path", "functional", "models", "nn", "__version__"]
