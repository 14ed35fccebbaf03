"""Launching Triton kernels with as little host work as a launch can take.

``JITFunction.run`` binds and specialises every argument on every call (about
16 us per launch in Triton 3.6). Here each kernel keeps the binaries it has
compiled under a key that the caller builds from what decides Triton's
specialisation (shapes, strides, dtypes, pointer alignment, constexprs), and a
later launch with the same key goes straight to the binary's launcher. The
first launch of a key goes through ``JITFunction.run``, which compiles (or
loads from Triton's cache) and launches as usual; under the interpreter every
launch does.

``DEVICE`` holds the three device queries the launch path needs; a stand-in
device (``benchmarks/stub_gpu.py``) replaces them to run the GPU host path on
a machine without one.
"""

from typing import Callable, NamedTuple

import torch
from triton import knobs


class Device(NamedTuple):
    compiled: Callable[[torch.device], bool]  # kernels on this device are compiled (else interpreted)
    sm_count: Callable[[torch.device], int]
    stream: Callable[[torch.device], int]  # the raw current stream


_sm_counts: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = _sm_counts.get(index)
    if count is None:
        count = _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return count


def _stream(device: torch.device) -> int:
    return torch._C._cuda_getCurrentRawStream(device.index if device.index is not None else torch.cuda.current_device())


DEVICE = Device(compiled=lambda device: device.type == "cuda", sm_count=_sm_count, stream=_stream)


def compiled(device: torch.device) -> bool:
    """Kernels on ``device`` run compiled for a GPU (False: Triton's interpreter on CPU tensors)."""
    return DEVICE.compiled(device)


def sm_count(device: torch.device) -> int:
    return DEVICE.sm_count(device)


def stream(device: torch.device) -> int:
    """The stream launches on ``device`` go to (unused under the interpreter)."""
    return DEVICE.stream(device) if DEVICE.compiled(device) else 0


def aligned(t: torch.Tensor | None) -> bool:
    """Whether Triton will specialise ``t``'s pointer as 16-byte aligned (part of a launch key)."""
    return t is None or t.data_ptr() % 16 == 0


def tensor_key(t: torch.Tensor | None):
    """What of an optional tensor argument decides Triton's specialisation: None, or (dtype, aligned)."""
    return None if t is None else (t.dtype, t.data_ptr() % 16 == 0)


class Kernel:
    """A ``@triton.jit`` function and the binaries it was compiled to, by launch key.

    ``kernel(key, grid, stream, num_warps, *args)``: ``args`` are all of the
    function's parameters in order, constexprs included; ``key`` must tell
    apart every two calls that Triton would compile differently.
    """

    __slots__ = ("fn", "binaries")

    def __init__(self, fn):
        self.fn = fn
        self.binaries: dict = {}

    def __call__(self, key, grid: tuple[int, int, int], stream: int, num_warps: int, *args, num_stages=None) -> None:
        binary = self.binaries.get(key)
        if binary is None:
            options = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
            binary = self.fn[grid](*args, **options)  # compiles (or interprets) and launches
            if binary is not None and hasattr(binary, "run"):  # the interpreter returns nothing to keep
                self.binaries[key] = binary
            return
        enter = knobs.runtime.launch_enter_hook
        if enter is None or not getattr(enter, "calls", True):  # Triton 3.6: an empty HookChain
            binary.run(grid[0], grid[1], grid[2], stream, binary.function, binary.packed_metadata, None, None, None,
                       *args)
            return
        metadata = binary.launch_metadata(grid, stream, *args)
        binary.run(
            grid[0], grid[1], grid[2], stream, binary.function, binary.packed_metadata, metadata,
            enter, knobs.runtime.launch_exit_hook, *args,
        )


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` in plain integers (``triton.cdiv`` is a constexpr wrapper: microseconds a call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


_counters: dict = {}
_scratch: dict = {}
_retired: list = []  # grown-out buffers stay allocated: a captured CUDA graph may point at them


def scratch(device: torch.device, stream_: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """At least ``numel`` uninitialised elements for partial results that die within one op's launches.

    ``stream_`` is ``stream(device)``, which the caller has at hand for its
    launches. One buffer per (device, stream, dtype): launches on a stream run in its
    order, so the next op's kernels only touch it after this op's are done.
    """
    key = (device, stream_, dtype)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < numel:
        if buf is not None:
            _retired.append(buf)
        buf = _scratch[key] = torch.empty(max(numel, 1 << 16), dtype=dtype, device=device)
    return buf


def counters(device: torch.device, stream_: int, n: int) -> torch.Tensor:
    """``n`` int32 zeros that kernels on ``stream_`` (``stream(device)``) may count in.

    Kernels that finish with their last program (an atomic ticket per block)
    leave every counter at zero again, so one buffer per stream serves every
    launch in that stream's order, with no memset per launch.
    """
    key = (device, stream_)
    buf = _counters.get(key)
    if buf is None or buf.numel() < n:
        if buf is not None:
            _retired.append(buf)
        buf = _counters[key] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return buf
