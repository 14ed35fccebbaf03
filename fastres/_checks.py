"""Argument checks shared by the public functions and modules.

Each raises before any kernel launch, with a message that names the argument.
"""

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float_tensor(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        supported = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
        raise TypeError(f"{name} must have a floating dtype ({supported}), got {t.dtype}")


def check_same_tensor_meta(
    name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, same_dtype: bool = True
) -> None:
    """Same dtype (unless ``same_dtype=False``), device and shape: no moves or broadcasting."""
    if same_dtype and a.dtype != b.dtype:
        raise TypeError(
            f"{name_a} and {name_b} must have the same dtype, got {a.dtype} and {b.dtype}"
        )
    if a.device != b.device:
        raise ValueError(
            f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}"
        )
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape (no broadcasting), "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
