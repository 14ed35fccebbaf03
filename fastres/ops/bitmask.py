"""The 1-bit-per-element mask that fused ops save instead of a full tensor.

Bit ``i`` of the mask is element ``i`` of a tensor read in a given logical
order: byte ``i // 8``, bit ``i % 8`` (least significant first). The Triton
kernels write and read this format.
"""

import torch


def new_mask(numel: int, device: torch.device, needed: bool = True) -> torch.Tensor:
    """An uninitialised mask for ``numel`` elements (empty when not ``needed``)."""
    return torch.empty((numel + 7) // 8 if needed else 0, dtype=torch.uint8, device=device)


def unpack_mask(mask: torch.Tensor, shape, order, rows: int = 1, cols: int | None = None) -> torch.Tensor:
    """The bool tensor of ``shape`` whose elements, read in dimension order ``order``, are ``mask``'s bits.

    ``mask`` holds ``rows`` rows of ``cols`` bits, each row padded to whole
    bytes (the default, one row, is the flat format above). Built from torch
    ops, so it serves the differentiable (double-backward) paths.
    """
    bits = (mask.unsqueeze(-1) >> torch.arange(8, device=mask.device, dtype=torch.uint8)) & 1
    permuted = [shape[d] for d in order]
    numel = 1
    for s in permuted:
        numel *= s
    cols = numel // rows if cols is None else cols
    flat = bits.view(rows, -1)[:, :cols].reshape(permuted).bool()
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return flat.permute(inverse)
