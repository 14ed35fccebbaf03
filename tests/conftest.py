"""Shared fixtures. Without a GPU, Triton kernels run through the interpreter.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` runs; fastres imports
its kernels lazily, so setting it here, first, is enough.
"""

import contextlib
import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A fresh Inductor cache per run: its FX graph cache does not key on a custom
# op's fake implementation, so graphs compiled against an older fastres could
# be replayed with stale output sizes.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fastres-inductor-"))

import pytest  # noqa: E402

from fastres._torchvision import import_torchvision  # noqa: E402
from fastres.testing import gpu_paths_on_cpu  # noqa: E402

def _round_bfloat16_to_nearest_in_interpreter() -> None:
    """Make Triton's interpreter round float32 -> bfloat16 to nearest even, as GPUs do.

    Triton 3.6's interpreter truncates that cast, a bias that errors of
    bf16 results then accumulate, which no GPU run has. Tests only.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    cast_impl = interpreter.InterpreterBuilder.cast_impl

    def rounding_cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = rounding_cast_impl


def _bfloat16_dot_in_interpreter() -> None:
    """Make Triton's interpreter multiply bfloat16 ``tl.dot`` operands as numbers.

    Triton 3.6's interpreter keeps bfloat16 as uint16 bit patterns and hands
    them to ``np.matmul`` as they are (it converts only fp8), which multiplies
    the bit patterns. Here they are widened to float32 first, exactly, as a
    GPU's tensor cores multiply them. Tests only.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    create_dot = interpreter.InterpreterBuilder.create_dot

    def widening_create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def widen(h):
            if h.dtype.scalar != tl.bfloat16:
                return h
            bits = np.ascontiguousarray(h.data).astype(np.uint32) << 16
            return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

        return create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = widening_create_dot


def _no_overflow_checks_in_interpreter() -> None:
    """Turn off the interpreter's int32 overflow check on every integer add and multiply.

    It costs about 40% of the interpreter's time in the convolution kernels'
    index arithmetic and can only fire on offsets past 2**31, which the tests'
    tensors never reach; compiled kernels do not check either. Tests only.
    """
    import dataclasses

    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)


def _index_one_element_arrays_in_interpreter() -> None:
    """Make Triton's interpreter take a one-element block as an index through ``.item()``.

    Triton 3.6's interpreter converts a scalar (held as a one-element numpy
    array) to an index with ``int(array)``, which numpy 2.5 refuses for
    arrays of ndim > 0 (older numpy warned). Tests only.
    """
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor_with_item_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patch_tensor_with_item_index


if os.environ.get("TRITON_INTERPRET") == "1":
    try:
        _index_one_element_arrays_in_interpreter()
        _round_bfloat16_to_nearest_in_interpreter()
        _bfloat16_dot_in_interpreter()
        _no_overflow_checks_in_interpreter()
    except ImportError:  # no Triton: only the eager paths run
        pass

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Where fastres's ops run. On CUDA always Triton; on CPU both the GPU paths
# (Triton's interpreter) and the CPU ones (eager PyTorch, fastres._C) are tested.
PATHS = ["triton"] if DEVICE.type == "cuda" else ["triton", "reference"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_tf32():
    # fp32 equality is checked to ~1e-6: TF32 convolutions would hide real errors.
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(params=PATHS)
def path(request):
    """Run the test with fastres's ops on the given path: "triton" is CUDA's, on CPU through the interpreter."""
    if DEVICE.type == "cpu" and request.param == "triton":
        with gpu_paths_on_cpu():
            yield request.param
    else:
        yield request.param


@pytest.fixture
def on_path():
    """For tests that pick their path per case: ``on_path("triton")`` takes the GPU paths until the test ends."""
    with contextlib.ExitStack() as stack:
        def enter(path: str) -> None:
            if DEVICE.type == "cpu" and path == "triton":
                stack.enter_context(gpu_paths_on_cpu())

        yield enter


@pytest.fixture
def gpu_paths(device):
    """The GPU paths on this device (CPU tensors through Triton's interpreter); skipped without Triton."""
    from fastres import ops

    if device.type == "cuda":
        if not ops.triton_available():
            pytest.skip("needs Triton")
        yield
    else:
        with gpu_paths_on_cpu():
            yield


@pytest.fixture(scope="session")
def tv():
    """torchvision, the eager reference for blocks and models."""
    return import_torchvision()


@pytest.fixture(scope="session")
def timm(tv):
    """timm (it imports torchvision, so after the same stub), the reference for pre-activation ResNets."""
    try:
        import timm
    except ImportError as err:  # a test-only dependency: .ci/requirements-nodeps.txt
        raise RuntimeError("the timm tests need timm: pip install --no-deps -r .ci/requirements-nodeps.txt") from err
    return timm
