"""fastres._C built with its CUDA kernels running on the host: the CUDA path tested without a GPU.

``csrc/dense_cuda.cu`` is compiled by the host compiler against the CUDA
emulator in ``tests/cuda_emulator`` (its kernels run on CPU memory, a block's
threads as fibers that meet at barriers and shuffles), together with the
extension's own ``bindings.cpp``, ``dense_cuda_host.cpp`` and ``dense_cpu.cpp``
and ``-DFASTRES_EMULATED_CUDA``: CPU tensors then take every step a CUDA
tensor takes (argument checks, launch plans, workspaces, kernels, finishing
kernels), in every dtype the CUDA kernels take. ``kernels()`` puts that build
in place of ``fastres._C``, so any test of the extension or of the DenseNets
on CPU runs the CUDA kernels.

What it cannot show: speed, and anything of the GPU's memory model beyond the
barriers and shuffles (a fault such as a misaligned vector access is a launch
error here too). Built once per machine into ``build/emulated_cuda``
(``torch.utils.cpp_extension``'s lock serialises concurrent builds).
"""

import contextlib
import functools
import os
import pathlib
from types import ModuleType

from fastres import _ext

ROOT = pathlib.Path(__file__).resolve().parents[1]
EMULATOR = ROOT / "tests" / "cuda_emulator"
SOURCES = [
    ROOT / "csrc" / "bindings.cpp",
    ROOT / "csrc" / "dense_cpu.cpp",
    ROOT / "csrc" / "dense_cuda_host.cpp",
    EMULATOR / "dense_cuda.cpp",
]


@functools.cache
def module() -> ModuleType:
    """The emulated build of ``fastres._C`` (compiled on first use: about a minute)."""
    from torch.utils import cpp_extension

    build = ROOT / "build" / "emulated_cuda"
    build.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name="fastres_emulated_C",
        sources=[str(s) for s in SOURCES],
        extra_cflags=["-O1", "-DFASTRES_EMULATED_CUDA"],
        extra_include_paths=[str(EMULATOR / "include")],
        build_directory=str(build),
        verbose=os.environ.get("FASTRES_EMULATOR_VERBOSE") == "1",
    )


def active() -> bool:
    """Whether ``kernels()`` is in effect: fastres._C's ops on CPU tensors run the CUDA kernels."""
    return module.cache_info().currsize > 0 and _ext._module is module()


@contextlib.contextmanager
def kernels():
    """``fastres._C``'s ops on CPU tensors run its CUDA kernels (emulated) inside this block."""
    previous = _ext._module
    _ext._module = module()
    try:
        yield
    finally:
        _ext._module = previous
