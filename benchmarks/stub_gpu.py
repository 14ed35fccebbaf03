"""A stand-in H100 for Triton: kernels compile for sm_90, launches are recorded, nothing runs.

With ``install()`` active in a process where ``TRITON_INTERPRET`` is unset,
``JITFunction.run`` compiles every kernel with Triton's real NVIDIA backend
(PTX and cubin through the ptxas that ships with Triton) and hands the launch
to a recorder instead of the CUDA driver: the grid, the binary and every
argument by name (tensors as shape, strides and dtype). fastres's host path,
which takes the Triton path for CPU tensors here, runs exactly as on a GPU: launch
settings, allocations, argument binding, Triton's launcher front end. Only the
driver call itself (``cuLaunchKernel``, a few microseconds) and the kernels'
device work are missing.

Used by the host-overhead benchmark and the static kernel report.
"""

import contextlib
import dataclasses
import os
from typing import NamedTuple

import torch

SM90_SMS = 132  # H100 SXM


class TensorArg(NamedTuple):
    """What the launch recorder keeps of a tensor argument: no data, no reference to it."""
    shape: tuple
    stride: tuple
    dtype: torch.dtype


@dataclasses.dataclass
class Launch:
    name: str  # the kernel's function name
    grid: tuple[int, int, int]
    kernel: object  # triton's CompiledKernel (asm: ptx, cubin; metadata)
    args: dict  # every parameter by name (constexprs included), tensors as TensorArg


def _summarise(value):
    return TensorArg(tuple(value.shape), value.stride(), value.dtype) if isinstance(value, torch.Tensor) else value


class _Recorder:
    """Every launch since ``clear()``; ``enabled=False`` drops them (timed loops)."""

    def __init__(self):
        self.launches: list[Launch] = []
        self.count = 0
        self.keep = True

    def clear(self):
        self.launches.clear()
        self.count = 0


RECORDER = _Recorder()


def _make_driver():
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    compiled_by_function: dict[int, object] = {}

    class _Launcher:
        """Stands in for Triton's CudaLauncher: records instead of calling cuLaunchKernel."""

        def __init__(self, src, metadata):
            self.name = metadata.name
            self.arg_names = src.fn.arg_names

        def __call__(self, grid_x, grid_y, grid_z, stream, function, *args):
            # args: packed metadata, launch metadata, enter and exit hooks, then every parameter in order
            # (JITFunction.run passes its bound arguments, fastres's Kernel its own: the same list).
            RECORDER.count += 1
            if RECORDER.keep:
                named = {k: _summarise(v) for k, v in zip(self.arg_names, args[4:])}
                RECORDER.launches.append(
                    Launch(self.name, (grid_x, grid_y, grid_z), compiled_by_function.get(function), named))

    class _Utils:
        def load_binary(self, name, kernel, shared, device):
            handle = len(compiled_by_function) + 1
            compiled_by_function[handle] = None
            return handle, handle, 0, 0, 1024  # module, function, n_regs, n_spills, max threads

        def get_device_properties(self, device):
            return {"max_shared_mem": 232448, "multiprocessor_count": SM90_SMS, "max_num_regs": 65536, "warpSize": 32}

    class StubDriver(DriverBase):
        def __init__(self):
            self.utils = _Utils()
            self.launcher_cls = _Launcher

        @classmethod
        def is_active(cls):
            return True

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_device_interface(self):
            return torch.cuda

        def get_device_capability(self, device=0):
            return (9, 0)

        def get_benchmarker(self):
            raise NotImplementedError("nothing runs on the stand-in device")

    return StubDriver(), compiled_by_function


def _attach_compiled_kernels(compiled_by_function):
    """Map each loaded function handle back to its CompiledKernel (for the report)."""
    from triton.compiler.compiler import CompiledKernel

    original = CompiledKernel._init_handles

    def _init_handles(self):
        original(self)
        if self.function in compiled_by_function:
            compiled_by_function[self.function] = self

    CompiledKernel._init_handles = _init_handles
    return lambda: setattr(CompiledKernel, "_init_handles", original)


def _gpu_device_hooks(saved):
    """Make fastres launch as for a CUDA tensor: GPU launch settings, 132 SMs, stream 0."""
    from fastres.kernels import launch

    saved.append((launch, "DEVICE", launch.DEVICE))
    launch.DEVICE = launch.Device(compiled=lambda device: True, sm_count=lambda device: SM90_SMS,
                                  stream=lambda device: 0)


@contextlib.contextmanager
def install():
    """Compile for sm_90 and record launches; fastres takes its GPU host path on CPU tensors."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the stand-in device needs TRITON_INTERPRET unset (kernels must be compiled)")
    import triton

    import importlib
    import pkgutil

    import fastres.kernels
    import fastres.ops

    # Every fastres module must be loaded before names are patched in it.
    for info in pkgutil.iter_modules(fastres.kernels.__path__):
        importlib.import_module(f"fastres.kernels.{info.name}")

    driver, compiled_by_function = _make_driver()
    restore_init = _attach_compiled_kernels(compiled_by_function)
    previous_driver = triton.runtime.driver._active
    triton.runtime.driver.set_active(driver)
    saved = []
    _gpu_device_hooks(saved)
    try:
        with fastres.ops.cpu_runs_gpu_paths():
            yield RECORDER
    finally:
        for mod, name, value in reversed(saved):
            setattr(mod, name, value)
        triton.runtime.driver._active = previous_driver
        restore_init()
