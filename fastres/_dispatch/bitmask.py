"""The 1-bit-per-element mask that fused ops save instead of a full tensor.

Bit ``i`` of the mask is element ``i`` of a tensor read in a given logical
order: byte ``i // 8``, bit ``i % 8`` (least significant first). The Triton
kernels write and read exactly this format; these are the eager versions.
"""

import torch
import torch.nn.functional as F


def mask_bytes(numel: int) -> int:
    return (numel + 7) // 8


def new_mask(numel: int, device: torch.device, needed: bool = True) -> torch.Tensor:
    """An uninitialised mask for ``numel`` elements (empty when not ``needed``)."""
    return torch.empty(mask_bytes(numel) if needed else 0, dtype=torch.uint8, device=device)


def _shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)


def pack_bits(flags: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Pack the boolean ``flags`` (read in logical order) into ``out``."""
    bits = flags.reshape(-1).to(torch.uint8)
    bits = F.pad(bits, (0, (-bits.numel()) % 8)).view(-1, 8)
    return torch.sum(bits << _shifts(bits.device), dim=1, dtype=torch.uint8, out=out)


def unpack_bits(mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The boolean tensor of ``shape`` (logical order) that ``mask`` encodes."""
    numel = 1
    for s in shape:
        numel *= s
    bits = (mask[:, None] >> _shifts(mask.device)) & 1
    return bits.view(-1)[:numel].view(shape).bool()
