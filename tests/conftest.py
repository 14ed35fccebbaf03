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
# Each pytest-xdist worker gets its share of the cores: workers each running torch's default
# (every core) oversubscribe them, and OpenMP's waiting threads then slow CPU convolutions ~8x.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))
# A fresh Inductor cache per run: its FX graph cache does not key on a custom
# op's fake implementation, so graphs compiled against an older fastres could
# be replayed with stale output sizes.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fastres-inductor-"))

import pytest  # noqa: E402

from fastres import _ext  # noqa: E402
from fastres._torchvision import import_torchvision  # noqa: E402
from fastres.testing import gpu_paths_on_cpu, patch_triton_interpreter  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    patch_triton_interpreter()  # kernels the tests call directly, outside gpu_paths_on_cpu() too

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Where fastres's ops run. On CUDA always Triton; on CPU both the GPU paths
# (Triton's interpreter) and the CPU ones (eager PyTorch, fastres._C) are tested.
PATHS = ["triton"] if DEVICE.type == "cuda" else ["triton", "reference"]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "emulated_cuda: fastres._C's ops run its CUDA kernels on CPU tensors (tests/emulated_cuda.py)"
    )
    config.addinivalue_line(
        "markers", "full_size: a full-size model, run on the emulated CUDA kernels only with FASTRES_EMULATOR_FULL=1"
    )


def pytest_collection_modifyitems(config, items):
    """Cases on fastres._C's emulated CUDA kernels that are left out: on the Triton path they would repeat
    the Triton cases; full-size models (a minute each there: the smaller models run the same kernel
    variants) unless FASTRES_EMULATOR_FULL=1."""
    full = os.environ.get("FASTRES_EMULATOR_FULL") == "1"

    def redundant(item) -> bool:
        params = getattr(item, "callspec", None) and item.callspec.params
        if not params or item.get_closest_marker("emulated_cuda") is None:
            return False
        return params.get("path") == "triton" or (not full and item.get_closest_marker("full_size") is not None)

    drop = {item for item in items if redundant(item)}
    if drop:
        config.hook.pytest_deselected(items=list(drop))
        items[:] = [item for item in items if item not in drop]


@pytest.fixture(autouse=True)
def _emulated_cuda(request):
    """Tests marked ``emulated_cuda`` run with the emulated build in place of fastres._C."""
    if request.node.get_closest_marker("emulated_cuda") is None:
        yield
        return
    import emulated_cuda

    with emulated_cuda.kernels():
        yield


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


@pytest.fixture
def needs_ext():
    """The shared-storage path runs in fastres._C, which every install builds: a missing one fails."""
    _ext.load()
