"""Where DenseNet work on a tensor runs: through shared storage (``fastres._C``) or as written.

The module-level conditions (plain BatchNorm2d/ReLU/Conv2d, no hooks) are the
modules' own business; these are the ones that depend on the tensor and the
build.
"""

import torch
from torch import Tensor

from .. import _ext
from . import use_triton

# CPU tensors on the Triton path (Triton's interpreter, or the stand-in GPU of benchmarks/stub_gpu.py) keep
# the C++ dense path unless this is set: interpreted convolutions are slow, so only the tests of the fused
# path, the sm_90 compile report and the host-overhead benchmark set it.
FUSED_ON_CPU = False


def shared_storage_applies(x: Tensor) -> bool:
    """Whether ``dense_block`` and the BN-ReLU-recomputing ops take ``x``.

    Not under CPU autocast: the C++ CPU ops take float32/float64, and autocast
    makes the bottleneck bfloat16 there, and not for half-precision CPU
    tensors (the CUDA path, Triton's kernels, takes every float dtype). Not under
    ``torch.jit.trace``, which records only ATen ops, nor under functorch
    transforms (``torch.func.grad``, ``vmap``...), which may differentiate the
    backward itself: shared storage keeps nothing to differentiate it through.
    """
    if torch.jit.is_tracing() or torch._C._are_functorch_transforms_active():
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled("cpu")
    # Elsewhere (CUDA) dense blocks run on the fused BN-ReLU-Conv kernels, which need Triton and a batch.
    return use_triton(x) and x.numel() > 0


def recompute_bn_relu_applies(x: Tensor) -> bool:
    """Whether a transition's or stem's BN-ReLU on ``x`` should be recomputed in backward instead of kept.

    On CPU, where the alternative (eager BatchNorm2d and ReLU) keeps the full
    BN-ReLU output, when ``fastres._C`` is built. On CUDA the fused Triton
    BN-ReLU keeps a 1-bit mask, about as small, and recomputes nothing.
    """
    return x.device.type == "cpu" and shared_storage_applies(x) and _ext.available()


def fused_kernels_apply(x: Tensor) -> bool:
    """Whether dense blocks and transitions on ``x`` run the fused BN-ReLU-Conv kernels (CUDA tensors)."""
    if not use_triton(x) or not shared_storage_applies(x):
        return False
    return x.device.type != "cpu" or FUSED_ON_CPU
