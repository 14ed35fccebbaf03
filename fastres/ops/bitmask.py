"""The 1-bit-per-element mask that fused ops save instead of a full tensor.

Bit ``i`` of the mask is element ``i`` of a tensor read in a given logical
order: byte ``i // 8``, bit ``i % 8`` (least significant first). The Triton
kernels write and read this format.
"""

import torch


def new_mask(numel: int, device: torch.device, needed: bool = True) -> torch.Tensor:
    """An uninitialised mask for ``numel`` elements (empty when not ``needed``)."""
    return torch.empty((numel + 7) // 8 if needed else 0, dtype=torch.uint8, device=device)
