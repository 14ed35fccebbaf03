"""Launching Triton kernels with as little host work as a launch can take.

``JITFunction.run`` binds and specialises every argument on every call (about
16 us per launch in Triton 3.6). Here each kernel keeps the binaries it has
compiled under a key derived with Triton's own binder from the arguments
(what decides Triton's specialisation), and a later launch with the same key
goes straight to the binary's launcher. The first launch of a key goes
through ``JITFunction.run``, which compiles (or loads from Triton's cache)
and launches as usual; under the interpreter every launch does.

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


def _cuda_backend():
    """Triton's NVIDIA backend for sm_90, whatever driver is active (keys are derived with its rules)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    return make_backend(GPUTarget("cuda", 90, 32))


def _jit_function(fn):
    """The JITFunction behind ``fn`` (under the interpreter ``triton.jit`` gives an InterpretedFunction)."""
    from triton.runtime.jit import JITFunction

    return fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)


class Kernel:
    """A ``@triton.jit`` function and the binaries it was compiled to, by launch key.

    ``kernel(grid, stream, num_warps, *args, num_stages=None)``: ``args`` are
    all of the function's parameters in order, constexprs included. The launch
    key is derived, never written by hand: Triton's own binder for this
    function (the code ``JITFunction.run`` specialises with) maps the
    arguments to their specialisation (each tensor's dtype and 16-byte
    alignment, each integer's ``== 1`` / divisibility by 16 / width, every
    constexpr's value), and the key is that plus the stream (which names the
    device), warps and stages. Two launches share a binary exactly when
    Triton would compile them alike. The first launch of a key goes through
    ``JITFunction.run`` (compile or load, then launch); later ones call the
    binary's launcher directly. Under the interpreter every launch goes
    through the interpreter.
    """

    __slots__ = ("fn", "binaries", "_binder")

    def __init__(self, fn):
        self.fn = fn
        self.binaries: dict = {}
        self._binder = None

    def binder(self, backend=None):
        """Triton's argument binder for this function (``backend`` defaults to sm_90's)."""
        if backend is not None:
            from triton.runtime.jit import create_function_from_signature

            jit = _jit_function(self.fn)
            return create_function_from_signature(jit.signature, jit.params, backend)
        if self._binder is None:
            self._binder = self.binder(_cuda_backend())
        return self._binder

    def key(self, stream: int, num_warps: int, num_stages, *args) -> tuple:
        """What decides the binary a launch runs: see the class docstring."""
        _, specialization, _ = self.binder()(*args)
        return (stream, num_warps, num_stages, *specialization)

    def __call__(self, grid: tuple[int, int, int], stream: int, num_warps: int, *args, num_stages=None) -> None:
        if not hasattr(self.fn, "device_caches"):  # the interpreter
            self.fn[grid](*args, num_warps=num_warps)
            return
        key = self.key(stream, num_warps, num_stages, *args)
        binary = self.binaries.get(key)
        if binary is None:
            options = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
            self.binaries[key] = self.fn[grid](*args, **options)  # compiles (or loads) and launches
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


def capturing(device: torch.device) -> bool:
    """Whether the current stream of ``device`` is capturing a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def scratch(device: torch.device, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """``numel`` uninitialised elements for partial results that die within one op's launches.

    From PyTorch's caching allocator at each call (no device work, and inside
    a CUDA graph's capture from the graph's own pool, valid at every replay).
    """
    return torch.empty(max(numel, 1), dtype=dtype, device=device)


_ones: dict = {}
ONES = 256  # the widest row block a kernel loads a keep factor for


def ones(device: torch.device) -> torch.Tensor:
    """``ONES`` fp32 ones on ``device``, never written: a row-keep factor is a masked load of them.

    Cached per device; while a CUDA graph is being captured (and none is cached)
    a fresh one from the graph's pool, filled as part of the graph.
    """
    buf = _ones.get(device)
    if buf is None:
        buf = torch.ones(ONES, dtype=torch.float32, device=device)
        if not capturing(device):
            _ones[device] = buf
    return buf


def counters(device: torch.device, stream_: int, n: int) -> torch.Tensor:
    """``n`` int32 zeros that kernels on ``stream_`` (``stream(device)``) may count in.

    Kernels that finish with their last program (an atomic ticket per block)
    leave every counter at zero again, so one buffer per stream serves every
    launch in that stream's order, with no memset per launch. A buffer that
    grows is replaced; the caching allocator reuses the old one only after the
    stream's earlier work. While a CUDA graph is being captured a fresh zeroed
    buffer is taken from the graph's pool instead (its memset is part of the
    graph), so a graph never depends on a buffer outside it.
    """
    if capturing(device):
        return torch.zeros(n, dtype=torch.int32, device=device)
    key = (device, stream_)
    buf = _counters.get(key)
    if buf is None or buf.numel() < n:
        buf = _counters[key] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return buf
