"""Loads ``fastres._C``, the compiled extension (the shared-storage DenseNet engine: C++, and CUDA kernels), on first use.

``import fastres`` never needs it: only the DenseNet ops do, and they call
``load()``, which says what failed and how to rebuild.
"""

import importlib
from types import ModuleType

import torch  # (_C links against torch's libraries: load them first)

_module: ModuleType | None = None


def load() -> ModuleType:
    """The ``fastres._C`` module; RuntimeError with the cause when it cannot be imported."""
    global _module
    if _module is None:
        try:
            _module = importlib.import_module("fastres._C")
        except ImportError as err:
            raise RuntimeError(
                f"fastres._C (the C++ extension) could not be imported: {err}. "
                "It is built at install time; rebuild it after installing torch with "
                "`pip install --no-build-isolation -e .` in the fastres checkout "
                "(it is skipped when FASTRES_NO_EXT=1 is set)"
            ) from err
    return _module


@torch.compiler.assume_constant_result  # an import: traced once, as a constant
def available() -> bool:
    """Whether ``fastres._C`` imports."""
    try:
        load()
    except RuntimeError:
        return False
    return True


@torch.compiler.assume_constant_result
def cuda_kernels() -> bool:
    """Whether ``fastres._C`` is built with its CUDA kernels (nvcc found at install time)."""
    return available() and load().cuda_built()


def cuda_status() -> str:
    """One line for reports: whether ``_C`` has CUDA kernels and whether a device can run them."""
    if not available():
        return "not built (fastres._C did not import)"
    if not load().cuda_built():
        return "not built: no CUDA toolkit when fastres was installed (or FASTRES_CUDA=0)"
    count, why = load().cuda_devices()
    if count == 0:
        return f"built; no device can run them ({why or 'no CUDA device'})"
    return f"built; {count} device(s) can run them"
