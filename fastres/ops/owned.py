"""Marking gradients that their creator never touches again, so that a consumer may accumulate into them.

A dense block's backward adds every layer's input gradient into one buffer
shaped like its output; when the gradient it receives (a transition's input
gradient, as large as the block's whole output) is marked, it accumulates into
that tensor instead of copying it first.
"""

from torch import Tensor

_OWNED = "_fastres_owned_grad"


def mark_owned(t: Tensor) -> Tensor:
    setattr(t, _OWNED, True)
    return t


def owned(t: Tensor) -> bool:
    return getattr(t, _OWNED, False) and t._base is None
