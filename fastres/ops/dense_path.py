"""Where DenseNet work on a tensor runs: through shared storage (``fastres._C``) or as written.

The module-level conditions (plain BatchNorm2d/ReLU/Conv2d, no hooks) are the
modules' own business; these are the ones that depend on the tensor and the
build.
"""

import torch
from torch import Tensor

from .. import _ext


def shared_storage_applies(x: Tensor) -> bool:
    """Whether ``dense_block`` and the BN-ReLU-recomputing ops take ``x``.

    Not under CPU autocast: the C++ CPU ops take float32/float64, and autocast
    makes the bottleneck bfloat16 there, and not for half-precision CPU
    tensors (CUDA kernels take every float dtype). Not under
    ``torch.jit.trace``, which records only ATen ops, nor under functorch
    transforms (``torch.func.grad``, ``vmap``...), which may differentiate the
    backward itself: shared storage keeps nothing to differentiate it through.
    """
    if torch.jit.is_tracing() or torch._C._are_functorch_transforms_active():
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled("cpu")
    return True


def recompute_bn_relu_applies(x: Tensor) -> bool:
    """Whether a transition's or stem's BN-ReLU on ``x`` should be recomputed in backward instead of kept.

    On CPU, where the alternative (eager BatchNorm2d and ReLU) keeps the full
    BN-ReLU output, when ``fastres._C`` is built. On CUDA the fused Triton
    BN-ReLU keeps a 1-bit mask, about as small, and recomputes nothing.
    """
    return x.device.type == "cpu" and shared_storage_applies(x) and _ext.available()
