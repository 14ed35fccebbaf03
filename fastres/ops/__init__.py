"""The one place that decides where an op runs: ``route``.

- CUDA tensors run the Triton kernels in ``fastres.kernels`` (the "GPU paths").
- CPU tensors run eager PyTorch, and DenseNet work runs ``fastres._C``'s
  shared-storage engine. Inside ``cpu_runs_gpu_paths()`` (public as
  ``fastres.testing.gpu_paths_on_cpu()``) CPU tensors take the GPU paths
  instead, their kernels run by Triton's interpreter or compiled for a
  stand-in device: how the kernel code is exercised without a GPU.
- ``torch.jit.trace`` and functorch transforms get eager PyTorch everywhere.
- Dense blocks (and the BN-ReLUs that DenseNet transitions and stems
  recompute) on CUDA take the fused Triton convolutions on GPUs with
  Triton's tensor-core paths (compute capability 8.0 and later), else
  ``fastres._C``'s CUDA kernels (shared storage, cuDNN convolutions), else
  eager PyTorch. ``dense_path()`` (public as ``fastres.dense_path``) or the
  environment variable ``FASTRES_DENSE_PATH`` selects one explicitly.

Triton is imported lazily, so ``import fastres`` works where it is absent.
"""

import contextlib
import functools
import importlib
import os
import threading
import warnings
from collections.abc import Iterator
from types import ModuleType

import torch

from .. import _ext

__all__ = ["AUTO", "DENSE_PATHS", "EAGER", "EXTENSION", "TRITON", "dense_choice", "dense_path", "route"]

EAGER, TRITON, EXTENSION = "eager", "triton", "extension"
AUTO = "auto"
DENSE_PATHS = (AUTO, TRITON, EXTENSION, EAGER)
DENSE_PATH_ENV = "FASTRES_DENSE_PATH"

_routing = threading.local()  # per thread, as torch.no_grad is (a CPU backward runs on the caller's thread)


@torch.compiler.assume_constant_result  # read once when a graph is traced, like triton_available
def _cpu_on_gpu_paths() -> bool:
    return getattr(_routing, "cpu_on_gpu_paths", 0) > 0


@contextlib.contextmanager
def cpu_runs_gpu_paths() -> Iterator[None]:
    """CPU tensors take every op's GPU path while this is active (this thread; nests)."""
    if not triton_available():
        raise RuntimeError("the GPU paths run Triton kernels: install triton (pip install triton)")
    _routing.cpu_on_gpu_paths = getattr(_routing, "cpu_on_gpu_paths", 0) + 1
    try:
        yield
    finally:
        _routing.cpu_on_gpu_paths -= 1


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
    """Whether an op on ``t`` runs its Triton kernels (else eager PyTorch): ``route``'s first question.

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
    return t.device.type == "cpu" and _cpu_on_gpu_paths()


def _checked_dense_path(path: str, source: str) -> str:
    if path not in DENSE_PATHS:
        raise ValueError(f"{source} must be one of {', '.join(map(repr, DENSE_PATHS))}, got {path!r}")
    return path


@torch.compiler.assume_constant_result  # read once when a graph is traced
def dense_choice() -> str:
    """The dense path selected for this thread: ``dense_path``'s, else ``FASTRES_DENSE_PATH``'s, else "auto"."""
    forced = getattr(_routing, "dense_path", None)
    if forced is not None:
        return forced
    return _checked_dense_path(os.environ.get(DENSE_PATH_ENV, AUTO).strip().lower() or AUTO, DENSE_PATH_ENV)


@contextlib.contextmanager
def dense_path(path: str) -> Iterator[None]:
    """Dense blocks run on ``path`` while this is active (this thread; nests); ``"auto"`` restores the default.

    ``"triton"``: the fused BN-ReLU-Conv kernels (CUDA). ``"extension"``:
    ``fastres._C``'s shared-storage engine (its C++ code on CPU, its CUDA
    kernels with cuDNN's convolutions on CUDA). ``"eager"``: the layers as
    written, like torchvision's model (``memory_efficient=True`` then
    checkpoints as torchvision does). A path that cannot run here raises
    when a block runs, saying why. The environment variable
    ``FASTRES_DENSE_PATH`` sets the default for the whole process.
    """
    _checked_dense_path(path, "path")
    previous = getattr(_routing, "dense_path", None)
    _routing.dense_path = path
    try:
        yield
    finally:
        _routing.dense_path = previous


@functools.cache
def _tensor_core_triton(index: int) -> bool:
    """Whether Triton's tensor-core paths (what the fused convolutions need) exist on this GPU: sm_80 and later."""
    return torch.cuda.get_device_capability(index) >= (8, 0)


def _cuda_dense_route(x: torch.Tensor) -> str:
    path = dense_choice()
    if path == AUTO:
        if triton_available() and _tensor_core_triton(x.device.index):
            return TRITON
        if _ext.cuda_kernels():
            return EXTENSION
        return TRITON if triton_available() else EAGER
    if path == TRITON and not triton_available():
        raise RuntimeError("the dense path 'triton' was selected, but triton is not installed (pip install triton)")
    if path == EXTENSION and not _ext.cuda_kernels():
        raise RuntimeError(f"the dense path 'extension' was selected for CUDA tensors, but fastres._C's CUDA kernels "
                           f"are {_ext.cuda_status()}")
    return path


def route(op: str, x: torch.Tensor) -> str:
    """Which path the op ``op`` takes on ``x``: ``TRITON``, ``EXTENSION`` (``fastres._C``) or ``EAGER``.

    ``op`` is ``"elementwise"`` (add-ReLU, batch norms, BN-ReLU, BN-ReLU-Conv:
    each its Triton kernels or eager PyTorch; on the Triton path the tuner
    then times fused against unfused candidates per shape), or ``"dense"``
    (dense blocks, and the BN-ReLUs of transitions and stems that DenseNets
    recompute in backward): on CUDA the path ``dense_path`` selects (by
    default the fused BN-ReLU-Conv kernels where Triton's tensor-core paths
    exist, else ``fastres._C``'s CUDA kernels), on CPU ``fastres._C`` for
    float32/float64 outside CPU autocast (it makes the bottleneck bfloat16),
    else eager. Empty tensors take eager PyTorch, which handles them.
    """
    if op == "dense" and x.numel() == 0:
        return EAGER
    if op == "dense" and not (torch.jit.is_tracing() or torch._C._are_functorch_transforms_active()):
        if x.device.type == "cuda":
            return _cuda_dense_route(x)
        if dense_choice() == EAGER:
            return EAGER
    if use_triton(x):
        return TRITON
    if op == "dense" and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not (
        torch.jit.is_tracing() or torch._C._are_functorch_transforms_active() or torch.is_autocast_enabled("cpu")
    ):
        return EXTENSION
    return EAGER


def require_triton(t: torch.Tensor, op: str) -> None:
    """Raise unless ``t`` runs Triton kernels (what fastres's custom ops run)."""
    if not use_triton(t):
        raise RuntimeError(
            f"{op} runs Triton kernels: it takes CUDA tensors, or CPU tensors inside "
            f"fastres.testing.gpu_paths_on_cpu(), got a {t.device.type} tensor; "
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
