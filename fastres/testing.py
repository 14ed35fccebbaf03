"""Testing helpers: fastres's GPU code on a machine without a GPU, what autograd keeps, torchvision to compare with."""

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator

import torch

from . import _interpreter, ops
from ._torchvision import import_torchvision

__all__ = ["gpu_paths_on_cpu", "import_torchvision", "patch_triton_interpreter", "saved_bytes"]


@contextlib.contextmanager
def gpu_paths_on_cpu() -> Iterator[None]:
    """Inside this context, CPU tensors take every op's CUDA path, its Triton kernels run by Triton's interpreter.

    Every op means every op: add-ReLU, the batch norms (synchronized too),
    BN-ReLU-Conv, and dense blocks and transitions on the fused BN-ReLU-Conv
    kernels (outside, CPU dense blocks run ``fastres._C``). Slow (the
    interpreter runs each kernel program in numpy); how the kernel code is
    tested without a GPU.

    Triton chooses interpretation when a kernel is first compiled, so
    ``TRITON_INTERPRET=1`` must be set in the environment before fastres
    runs its first kernel; entering without it raises. The setting holds for
    the calling thread and nests. A graph that ``torch.compile`` traced
    inside keeps the routing it saw.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "gpu_paths_on_cpu() runs Triton kernels through Triton's interpreter: set TRITON_INTERPRET=1 "
            "in the environment before fastres runs its first kernel"
        )
    patch_triton_interpreter()
    with ops.cpu_runs_gpu_paths():
        yield


def patch_triton_interpreter() -> None:
    """Make Triton's interpreter compute what a GPU computes; ``gpu_paths_on_cpu()`` calls it.

    Triton 3.6's interpreter truncates float32 -> bfloat16 casts (GPUs round
    to nearest even), multiplies bfloat16 ``tl.dot`` operands as bit
    patterns, and converts a one-element block to an index in a way numpy
    2.5 refuses; this fixes the three in place, once per process, and turns
    off its int32 overflow check on every integer operation (about 40% of
    its time in the convolutions; compiled kernels do not check). A no-op
    without Triton.
    """
    _interpreter.patch()


def saved_bytes(fn: Callable[[], object], params: Iterable[torch.Tensor] = ()) -> int:
    """Bytes autograd keeps for backward while ``fn()`` runs: each storage once, parameters excluded.

    Parameters are ``nn.Parameter`` tensors and any tensor sharing storage
    with one of ``params``. Work inside a ``torch.utils.checkpoint`` region is
    saved through the checkpoint's own hooks, so it is not counted.
    """
    excluded = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if not isinstance(t, torch.nn.Parameter) and ptr not in excluded:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
