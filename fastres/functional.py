"""Public functional API of fastres."""

from torch import Tensor

from ._checks import check_float_tensor, check_same_tensor_meta
from ._dispatch import add_relu as _add_relu
from ._dispatch.layout import has_internal_overlap

__all__ = ["add_relu"]


def add_relu(x: Tensor, identity: Tensor, inplace: bool = False) -> Tensor:
    """Residual merge ``relu(x + identity)`` in one fused pass.

    Args:
        x: the block's output; written in place when ``inplace=True``.
        identity: the shortcut, with x's device and shape (it is never
            broadcast) and x's dtype. Any pair of layouts works; the output
            takes the layout eager PyTorch would give ``x + identity``.
        inplace: write the result into ``x`` and return it, like torchvision's
            ``out += identity; out = relu(out)``. As with ``+=``, identity may
            then have another floating dtype (a bf16 block output and an fp32
            block input under autocast): the sum is taken in float32 and
            stored in x's dtype.

    Backward saves a 1-bit-per-element ReLU mask instead of the output tensor.
    float32, float16, bfloat16 (computed in float32) and float64.
    """
    check_float_tensor("x", x)
    check_float_tensor("identity", identity)
    check_same_tensor_meta("x", x, "identity", identity, same_dtype=not inplace)
    if inplace and has_internal_overlap(x):
        raise ValueError(
            "x has elements that share memory (e.g. an expanded view) and cannot be "
            "written in place; pass inplace=False"
        )
    return _add_relu.add_relu(x, identity, inplace)
