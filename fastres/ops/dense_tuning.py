"""Which engine runs a dense block on CUDA when both can: the fused Triton convolutions or ``fastres._C``'s kernels.

With ``fastres.dense_path("auto")`` (the default) on a GPU where both paths
run, the tuner (``fastres.kernels.tuning``: timed once per device and block
shape, remembered on disk, fixed when timing is off) times one training step
of the block, forward and backward, on each path and keeps the faster. The
timed runs work on copies of the running statistics and detached parameters,
so they change nothing a user can see; both paths are checked against eager
PyTorch by the test suite, so the runs are not compared here. Timing that
runs out of memory keeps the default (Triton) for that shape; a Triton path
that cannot be built on this machine (a compile, ptxas or resource error) is
dropped by the tuner, and the shape takes fastres._C's kernels.
"""

from typing import Sequence

import torch
from torch import Tensor

from . import EXTENSION, TRITON, kernels
from .dense_ext import BatchNormArgs, DenseLayerArgs

CANDIDATES = ((0,), (1,))  # (0,): the fused Triton convolutions, (1,): fastres._C's kernels + cuDNN
PATHS = {0: TRITON, 1: EXTENSION}


def _bucket(x: Tensor, layers: Sequence[DenseLayerArgs]) -> tuple:
    n, c0, h, w = x.shape
    first = layers[0]
    autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
    return (str(x.dtype), str(autocast), x.is_contiguous(), n, c0, h, w, len(layers), first.conv2_weight.shape[0],
            first.conv1_weight.shape[0], first.norm1.training, torch.is_grad_enabled())


def _private(bn: BatchNormArgs) -> BatchNormArgs:
    """The batch norm with copies of its running statistics: a timed run must not update the user's."""
    clone = lambda t: None if t is None else t.detach().clone()  # noqa: E731
    return bn._replace(running_mean=clone(bn.running_mean), running_var=clone(bn.running_var),
                       weight=None if bn.weight is None else bn.weight.detach().requires_grad_(),
                       bias=None if bn.bias is None else bn.bias.detach().requires_grad_())


def _private_layer(layer: DenseLayerArgs) -> DenseLayerArgs:
    return layer._replace(norm1=_private(layer.norm1), norm2=_private(layer.norm2),
                          conv1_weight=layer.conv1_weight.detach().requires_grad_(),
                          conv2_weight=layer.conv2_weight.detach().requires_grad_())


def choose_path(x: Tensor, layers: Sequence[DenseLayerArgs], run_block) -> str:
    """``TRITON`` or ``EXTENSION`` for this block; ``run_block(path, x, layers)`` runs one."""
    tuning = kernels("tuning")
    trains = torch.is_grad_enabled()

    def run(config):
        private = [_private_layer(layer) for layer in layers]
        inp = x.detach().requires_grad_(trains and x.requires_grad)
        out = run_block(PATHS[config[0]], inp, private)
        if trains and out.requires_grad:
            out.backward(torch.ones_like(out))

    bucket = _bucket(x, layers)
    if bucket in _NO_ROOM:
        return TRITON
    try:
        config = tuning.choose("dense_block", bucket, CANDIDATES, run, x.device)
    except torch.OutOfMemoryError:
        # Timing needs room for a second training step of the block; where there is none (the
        # memory-constrained runs this engine is for), keep the default and never time this shape again.
        _NO_ROOM.add(bucket)
        if x.device.type == "cuda":
            torch.cuda.empty_cache()
        return TRITON
    return PATHS[config[0]]


_NO_ROOM: set = set()  # block shapes whose timing ran out of memory (this process)
