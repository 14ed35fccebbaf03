"""Launch settings and index helpers shared by the elementwise kernels."""

import torch
import triton
import triton.language as tl  # noqa: F401  (Triton requires it in scope of @triton.jit code)


def elementwise_settings(numel: int, device: torch.device) -> tuple[int, int]:
    """Block size and warp count for a memory-bound elementwise kernel.

    On a GPU each program moves 2048 elements with 8 warps (8 elements, i.e. one
    or two 16-byte vectors, per thread and tensor). Under the interpreter the
    cost is per program, so one program takes as much as it can. (Kernels only
    ever see CPU tensors under the interpreter.)
    """
    if device.type == "cpu":
        return max(8, min(triton.next_power_of_2(numel), 1 << 16)), 1
    return 2048, 8


def as_4d(t: torch.Tensor) -> torch.Tensor:
    """View ``t`` as 4-D by prepending size-1 dims (rank <= 4 only)."""
    if t.dim() > 4:
        raise ValueError(f"expected at most 4 dims, got {t.dim()}")
    return t[(None,) * (4 - t.dim())]  # indexing with None is always a view


@triton.jit
def strided_offsets(idx, size1, size2, size3, stride0, stride1, stride2, stride3):
    """Memory offsets of the logical linear indices ``idx`` of a 4-D view."""
    i3 = idx % size3
    rest = idx // size3
    i2 = rest % size2
    rest = rest // size2
    i1 = rest % size1
    i0 = rest // size1
    return i0 * stride0 + i1 * stride1 + i2 * stride2 + i3 * stride3
