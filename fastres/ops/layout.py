"""Memory layouts: the logical order kernels walk and where outputs go."""

import torch
from torch import Tensor
from torch._prims_common import compute_elementwise_output_strides, suggest_memory_format


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


def channels_last(x: Tensor) -> bool:
    """Whether eager's batch norm would give a channels_last output for ``x``."""
    if x.is_contiguous():
        return False  # the common NCHW case, without the stride analysis
    return suggest_memory_format(x) == torch.channels_last


def empty_out(x: Tensor, c_last: bool, dtype: torch.dtype | None = None) -> Tensor:
    """An output shaped like x, dense in NCHW or channels_last order."""
    fmt = torch.channels_last if c_last else torch.contiguous_format
    return torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device, memory_format=fmt)


def acc_dtype(x: Tensor) -> torch.dtype:
    """What statistics are computed and kept in: float64 for float64 x, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def view3(t: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """``t`` (N, C, H, W) and its strides as an [N, C, H*W] view (copied first if H and W do not merge).

    The kernels take the tensor's pointer and these strides: no view is built.
    """
    n, c, h, w = t.shape
    s = t.stride()
    if h > 1 and w > 1 and s[2] != w * s[3]:
        t = t.contiguous(memory_format=suggest_memory_format(t))
        s = t.stride()
    return t, (s[0], s[1], s[3] if w > 1 else s[2] if h > 1 else 1)


def out_strides(shape: tuple[int, int, int], c_last: bool) -> tuple[int, int, int]:
    """[N, C, HW] strides of a dense output."""
    n, c, hw = shape
    return (c * hw, 1, c) if c_last else (c * hw, hw, 1)


def shape3(x: Tensor) -> tuple[int, int, int]:
    n, c, h, w = x.shape
    return n, c, h * w


def conv_dtype(x: Tensor) -> torch.dtype:
    """What the convolution of x runs in: autocast's dtype when it is on for x's device, else x's."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
