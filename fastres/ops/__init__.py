"""The one place that decides where an op runs.

- CUDA tensors run the Triton kernels in ``fastres.kernels``.
- CPU tensors run the eager PyTorch reference, except when ``TRITON_INTERPRET=1``
  is set: then they run the same Triton kernels through Triton's interpreter,
  which is how the kernel code is exercised without a GPU.
- ``torch.jit.trace`` records the eager reference on every device.

Triton is imported lazily, so ``import fastres`` works where it is absent.
"""

import functools
import importlib
import os
import warnings
from types import ModuleType

import torch


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1`` (read at each call, like Triton does)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@torch.compiler.assume_constant_result  # under torch.compile: a constant, not a traced cache lookup
def triton_available() -> bool:
    return _triton_importable()


def use_triton(t: torch.Tensor) -> bool:
    """Whether the op on ``t`` runs the Triton kernel (else the eager reference).

    Never under ``torch.jit.trace``: the tracer records only ATen ops, so a
    traced graph holds eager PyTorch's computation (which it can also save).
    Nor under functorch transforms (``vmap``, ``jvp``, ``grad``): their
    wrapped tensors have no storage for a kernel to read; eager PyTorch's ops
    have rules for every transform.
    """
    if torch.jit.is_tracing() or torch._C._are_functorch_transforms_active():
        return False
    if t.device.type == "cuda":
        if triton_available():
            return True
        _warn_no_triton()
        return False
    if t.device.type == "cpu" and interpreting():
        if not triton_available():
            raise RuntimeError(
                "TRITON_INTERPRET=1 is set but triton is not installed; "
                "install it (pip install triton) or unset TRITON_INTERPRET"
            )
        return True
    return False


def require_triton(t: torch.Tensor, op: str) -> None:
    """Raise unless ``t`` runs Triton kernels (what fastres's custom ops run)."""
    if not use_triton(t):
        raise RuntimeError(
            f"{op} runs Triton kernels: it takes CUDA tensors, or CPU tensors with "
            f"TRITON_INTERPRET=1, got a {t.device.type} tensor; "
            "the functions in fastres.functional run eager PyTorch there"
        )


_kernel_modules: dict[str, ModuleType] = {}


def kernels(name: str) -> ModuleType:
    """The Triton kernel module ``fastres.kernels.<name>``, imported on first use."""
    module = _kernel_modules.get(name)
    if module is None:
        module = _kernel_modules[name] = importlib.import_module(f"fastres.kernels.{name}")
    return module


def apply_function(cls: type[torch.autograd.Function], *args):
    """``cls.apply(*args)`` without ``Function.apply``'s Python preamble, where that preamble does nothing.

    Outside ``torch.compile`` and functorch transforms, ``Function.apply`` only
    unwraps dead functorch wrappers (none exist then) before calling the C++
    implementation; calling it directly saves a few microseconds per op.
    """
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return cls.apply(*args)
    return super(torch.autograd.Function, cls).apply(*args)


@functools.cache
def _warn_no_triton() -> None:
    warnings.warn(
        "triton is not installed: fastres runs its eager reference on CUDA tensors",
        RuntimeWarning,
        stacklevel=3,
    )
