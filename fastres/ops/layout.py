"""Memory layouts: the logical order kernels walk and where outputs go."""

import torch
from torch._prims_common import compute_elementwise_output_strides


def memory_order(t: torch.Tensor) -> list[int]:
    """Dims of ``t`` from outermost to innermost in memory.

    ``t.permute(memory_order(t))`` is contiguous whenever ``t`` is dense in any
    dim order (NCHW, channels_last, transposes). Size-1 dims may land anywhere:
    their strides never matter.
    """
    return sorted(range(t.dim()), key=lambda d: -t.stride(d))  # sorted() is stable


def elementwise_output(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor laid out as eager's TensorIterator lays out ``a op b``."""
    if a.stride() == b.stride() and (
        a.is_contiguous() or a.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.empty_like(a)  # the common case: one layout, no stride search
    strides = compute_elementwise_output_strides(a, b)
    return torch.empty_strided(a.shape, strides, dtype=a.dtype, device=a.device)


def has_internal_overlap(t: torch.Tensor) -> bool:
    """True when two elements of ``t`` surely share memory (an ``expand``ed dim).

    The same test eager applies before an in-place write; pure metadata, so
    ``torch.compile`` traces it.
    """
    return any(size > 1 and stride == 0 for size, stride in zip(t.shape, t.stride()))
