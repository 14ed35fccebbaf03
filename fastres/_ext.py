"""Loads ``fastres._C``, the C++ extension (the CPU shared-storage DenseNet), on first use.

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
