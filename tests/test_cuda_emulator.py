"""The host CUDA emulator (tests/cuda_emulator) that runs fastres._C's CUDA kernels in tests: it must fail where a GPU would.

tests/test_ext.py and tests/test_densenet.py run the CUDA kernels through it
("emulated" cases); a defect it could not report would pass there unseen. Here
small kernels (tests/cuda_emulator/faults.cpp) with such defects: a misaligned
16-byte access, a barrier or a full-warp shuffle that a thread skips, a launch
with an empty grid, and a missing barrier, whose result then depends on the
order the threads run in (FASTRES_EMULATOR_ORDER). The emulated build of
fastres._C runs under both orders with bitwise-equal results.
"""

import ctypes
import os
import shutil
import subprocess

import pytest
import torch

import emulated_cuda

MISALIGNED, LAUNCH_FAILURE, INVALID_CONFIGURATION = 716, 719, 9
THREADS = 64


@pytest.fixture(scope="module")
def faults():
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        pytest.fail("no C++ compiler: fastres._C's build needs one too")
    build = emulated_cuda.ROOT / "build" / "emulated_cuda"
    build.mkdir(parents=True, exist_ok=True)
    target = build / f"faults-{os.getpid()}.so"
    source = emulated_cuda.EMULATOR / "faults.cpp"
    subprocess.run([compiler, "-std=c++17", "-O1", "-shared", "-fPIC", f"-I{emulated_cuda.EMULATOR / 'include'}",
                    str(source), "-o", str(target)], check=True)
    lib = ctypes.CDLL(str(target))
    target.unlink()  # loaded: the mapping stays
    lib.emulated_error_string.restype = ctypes.c_char_p
    return lib


def ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


BLOCKS = 3


def test_aligned_16_byte_accesses_run(faults):
    src = torch.arange(4 * THREADS * BLOCKS, dtype=torch.int32)
    dst = torch.zeros_like(src)
    assert faults.emulated_copy(ptr(src), ptr(dst), BLOCKS, 0, 0) == 0
    assert torch.equal(src, dst)


# The first block (fibers) or a later one (plain calls: see cuda_runtime.h).
@pytest.mark.parametrize("blocks", [1, BLOCKS], ids=["first_block", "later_block"])
@pytest.mark.parametrize("where", ["load", "store"])
def test_a_misaligned_16_byte_access_faults(faults, where, blocks):
    src = torch.zeros(4 * THREADS * BLOCKS + 4, dtype=torch.int32)
    dst = torch.zeros_like(src)
    skews = (4, 0) if where == "load" else (0, 4)  # bytes: the last block's accesses misaligned
    code = faults.emulated_copy(ptr(src), ptr(dst), blocks, *skews)
    assert code == MISALIGNED
    assert b"misaligned address: a 16-byte access" in faults.emulated_error_string(code)
    assert faults.emulated_copy(ptr(src), ptr(dst), blocks, 0, 0) == 0  # the error was taken: the next launch runs


@pytest.mark.parametrize("kernel, blocks, message", [
    ("early_exit_before_barrier", 1, b"__syncthreads: a thread of the block exited before it"),
    ("barrier_after_the_first_block", BLOCKS, b"a thread of a later block reached __syncthreads"),
    ("early_exit_before_shuffle", 1, b"shuffle (full mask): a lane of the warp exited before it"),
])
def test_a_barrier_or_shuffle_that_a_thread_skips_fails_the_launch(faults, kernel, blocks, message):
    out = torch.zeros(THREADS * blocks, dtype=torch.int32)  # (the shuffle kernel's floats: 4 bytes too)
    code = getattr(faults, f"emulated_{kernel}")(ptr(out), blocks)
    assert code == LAUNCH_FAILURE
    assert message in faults.emulated_error_string(code)


def test_an_empty_grid_is_an_invalid_configuration(faults):
    assert faults.emulated_launch_empty_grid() == INVALID_CONFIGURATION


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_warp_shuffles_sum_like_torch(faults, monkeypatch, order):
    monkeypatch.setenv("FASTRES_EMULATOR_ORDER", order)
    x = torch.randint(-100, 100, (3 * THREADS,)).float()  # integers: sums exact in any order
    out = torch.zeros(6)
    assert faults.emulated_warp_sums(ptr(x), ptr(out), 3) == 0
    assert torch.equal(out, x.view(6, 32).sum(1))


def _neighbour(faults, barrier: bool, seed: int) -> torch.Tensor:
    out = torch.zeros(THREADS, dtype=torch.int32)
    assert faults.emulated_neighbour(int(barrier), seed, ptr(out)) == 0
    return out


def test_a_missing_barrier_shows_as_a_result_that_depends_on_the_order(faults, monkeypatch):
    expected = 100 + torch.arange(THREADS - 1, -1, -1, dtype=torch.int32)
    results = {}
    for seed, order in [(100, "forward"), (100, "reverse")]:
        monkeypatch.setenv("FASTRES_EMULATOR_ORDER", order)
        assert torch.equal(_neighbour(faults, True, seed), expected)
        _neighbour(faults, True, 0)  # the shared cells now hold another launch's values
        results[order] = _neighbour(faults, False, seed)
    assert not torch.equal(results["forward"], expected) or not torch.equal(results["reverse"], expected)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_dense_ops_do_not_depend_on_the_thread_order(monkeypatch, layout, dtype):
    """Every reduction's and map's result, bitwise, whether a block's threads run first to last or last to first."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    buf = torch.randn(3, 40, 20, 24).to(dtype).contiguous(memory_format=fmt)
    x, grad_out = buf[:, 8:40], torch.randn_like(buf)[:, 8:40]
    C = emulated_cuda.module()
    results = {}
    for order in ["forward", "reverse"]:
        monkeypatch.setenv("FASTRES_EMULATOR_ORDER", order)
        mean, rstd = C.batch_stats(x, None, None, 0.1, 1e-5)
        out = torch.empty_like(x)
        C.bn_relu_forward(x, mean, rstd, None, None, out)
        sums = C.bn_relu_backward_reduce(grad_out, x, mean, rstd, None, None)
        grad_in = torch.zeros_like(x)
        C.bn_relu_backward_input(grad_out, x, mean, rstd, None, None, *sums, grad_in, True)
        results[order] = (mean, rstd, C.batch_moments(x), out, *sums, grad_in)
    assert all(torch.equal(a, b) for a, b in zip(results["forward"], results["reverse"]))
