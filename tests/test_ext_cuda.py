"""fastres._C's CUDA side where no GPU is needed: the build, the C entry points' checks and errors, the statistics' folding, routing.

The kernels' results on a GPU are tests/test_ext.py's (every op, dtype and
layout against float64 eager, on "cuda" where there is one) and
tests/test_densenet.py's dense-path tests; here, what CI checks on every run:

- the extension holds the CUDA kernels whenever a toolkit was found at build
  time, and loads and reports "no device" cleanly on a machine without one;
- the C interface (``csrc/dense_cuda.h``), called as the bindings call it:
  launch plans, sizes it refuses, launches that fail cleanly without a device;
- the statistics kernels' Welford/Chan folding (``csrc/dense_math.h``'s
  ``chunk_moments`` and ``welford_merge``, run on the host through a test
  hook) against float64 eager moments;
- which path dense blocks take on CUDA, and the switch that selects one.
"""

import ctypes
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fastres
from cuda_abi import BFLOAT16, FLOAT16, FLOAT32, FLOAT64, NOT_BUILT, TOO_LARGE, Problem, View, library, plan, view_of
from fastres import _ext, ops

if os.environ.get("FASTRES_NO_EXT") == "1":
    pytest.skip("fastres._C is not built (FASTRES_NO_EXT=1)", allow_module_level=True)

C = _ext.load()
GPU = torch.cuda.is_available()
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from csrc_report import nvcc  # noqa: E402  (where setup.py looks for a toolkit)

TOOLKIT = nvcc() is not None



# ---- the build ----


def test_the_cuda_kernels_are_built_whenever_a_toolkit_is_found():
    assert C.cuda_built() == TOOLKIT
    assert _ext.cuda_kernels() == TOOLKIT


@pytest.mark.skipif(GPU, reason="checks the report on a machine without a GPU")
def test_no_device_is_reported_in_a_sentence():
    count, why = C.cuda_devices()
    assert count == 0
    if C.cuda_built():
        assert why and why[0].isupper(), why  # the CUDA runtime's own reason
        assert _ext.cuda_status().startswith("built; no device can run them (")
    else:
        assert "without its CUDA kernels" in why


def test_fastres_check_reports_the_cuda_kernels(capsys):
    from fastres.cli import check

    info = check.environment()
    assert info["fastres._C CUDA kernels"] == _ext.cuda_status()
    assert "dense blocks on CUDA" in info


# ---- the C interface ----


@pytest.fixture(scope="module")
def lib():
    return library(C)


def _nchw(n, c, p, data=0):
    return View(data, c * p, p, 1)


def _channels_last(n, c, p, data=0):
    return View(data, c * p, 1, c)


def _parts(lib, problem, x):
    parts = ctypes.c_int64(-1)
    err = lib.fastres_cuda_reduce_parts(ctypes.byref(problem), ctypes.byref(x), None, ctypes.byref(parts))
    return err, parts.value


needs_kernels = pytest.mark.skipif(not C.cuda_built(), reason="fastres._C was built without its CUDA kernels (no toolkit)")


@needs_kernels
@pytest.mark.parametrize("layout", [_nchw, _channels_last])
@pytest.mark.parametrize("dtype", [FLOAT32, FLOAT64, FLOAT16, BFLOAT16])
def test_a_reduction_plans_at_least_one_part_per_channel(lib, layout, dtype):
    problem = Problem(64, 256, 56 * 56, dtype, 0, None)
    err, parts = _parts(lib, problem, layout(64, 256, 56 * 56, data=4096))
    assert err == 0 and 1 <= parts <= 65535


def _slice(buf: torch.Tensor, offset: int, c: int) -> View:
    """The view fastres._C's bindings pass for buf[:, offset:offset + c]."""
    return view_of(buf[:, offset: offset + c])


@needs_kernels
@pytest.mark.parametrize("dtype, code, wide", [(torch.float32, FLOAT32, 4), (torch.float64, FLOAT64, 2),
                                                (torch.float16, FLOAT16, 8), (torch.bfloat16, BFLOAT16, 8)])
def test_plans_take_16_byte_accesses_where_every_tensor_allows(lib, dtype, code, wide):
    """Contiguous, aligned slices of either layout take V elements per access; anything else one (still right)."""
    nchw = torch.zeros(4, 40, 8, 8, dtype=dtype)
    last = nchw.contiguous(memory_format=torch.channels_last)
    odd = torch.zeros(4, 40, 7, 7, dtype=dtype)
    problem = lambda c, p=64: Problem(4, c, p, code, 0, None)  # noqa: E731
    assert plan(lib, problem(16), _slice(nchw, 8, 16)) == ("rows", wide)
    assert plan(lib, problem(16), _slice(last, 8, 16)) == ("channels", wide)
    assert plan(lib, problem(16), _slice(last, 8, 16), _slice(last, 16, 16)) == ("channels", wide)
    assert plan(lib, problem(16), _slice(last, 1, 16)) == ("channels", 1)  # misaligned offset
    assert plan(lib, problem(13), _slice(last, 8, 13)) == ("channels", 1)  # V does not divide C
    assert plan(lib, problem(16, 49), _slice(odd, 8, 16)) == ("rows", 1)  # V does not divide H*W
    assert plan(lib, problem(16), _slice(nchw, 8, 16), _slice(last, 8, 16)) == ("rows", 1)  # mixed layouts


@needs_kernels
def test_parts_keep_float_counts_exact(lib):
    """A part folds at most about 2^23 elements of a channel, whose count a float holds exactly."""
    n, p = 4096, 112 * 112
    err, parts = _parts(lib, Problem(n, 1, p, FLOAT32, 0, None), _nchw(n, 1, p))
    assert err == 0 and n * p / parts <= 2**23 + 4096


@needs_kernels
def test_too_many_channels_or_positions_are_refused_with_a_reason(lib):
    for problem, x in [(Problem(2, 70000, 4, FLOAT32, 0, None), _nchw(2, 70000, 4)),
                       (Problem(2**16, 2, 2**16, FLOAT32, 0, None), _nchw(2**16, 2, 2**16))]:
        err, _ = _parts(lib, problem, x)
        assert err == TOO_LARGE
    assert b"at most 65535 channels" in lib.fastres_cuda_error_string(TOO_LARGE)


@needs_kernels
@pytest.mark.skipif(GPU, reason="launches with null pointers: only where no device can run them")
def test_a_launch_without_a_device_returns_the_runtimes_error(lib):
    problem = Problem(2, 3, 16, FLOAT32, 0, None)
    x = _nchw(2, 3, 16)
    err, parts = _parts(lib, problem, x)
    assert err == 0
    code = lib.fastres_cuda_moments(ctypes.byref(problem), ctypes.byref(x), None, ctypes.c_int64(parts))
    assert code > 0
    assert lib.fastres_cuda_error_string(code).decode() == C.cuda_devices()[1]


@needs_kernels
def test_no_channels_launch_nothing(lib):
    problem = Problem(2, 0, 16, FLOAT32, 0, None)
    x = _nchw(2, 0, 16)
    assert lib.fastres_cuda_bn_relu_forward(ctypes.byref(problem), ctypes.byref(x), None, ctypes.byref(x)) == 0


@pytest.mark.skipif(C.cuda_built(), reason="checks the stand-in of a build without a toolkit")
def test_a_build_without_kernels_says_so(lib):
    assert lib.fastres_cuda_reduce_parts(None, None, None, None) == NOT_BUILT
    assert b"without its CUDA kernels" in lib.fastres_cuda_error_string(NOT_BUILT)


# ---- the statistics kernels' folding, on the host ----


def _moments(x: torch.Tensor) -> tuple[float, float, float]:
    d = x.double()
    return d.numel(), d.sum().item(), ((d - d.mean()) ** 2).sum().item()


@pytest.mark.parametrize("chunk", [4, 16])
@pytest.mark.parametrize("threads", [1, 32, 256])
@pytest.mark.parametrize("n", [1, 3, 16, 1000, 4099])
def test_folding_matches_float64_moments(chunk, threads, n):
    x = torch.randn(n, dtype=torch.float64) * 2 + 5
    count, total, m2 = C._fold_moments(x, chunk, threads)
    ref = _moments(x)
    assert count == ref[0]
    assert total == pytest.approx(ref[1], rel=1e-13, abs=1e-12)
    assert m2 == pytest.approx(ref[2], rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("chunk", [4, 16])
def test_float32_folding_is_as_accurate_as_eager(chunk):
    """A large mean and a small spread: E[x^2] - E[x]^2 would lose every digit; the fold keeps eager's accuracy."""
    x = (1e3 + 1e-2 * torch.randn(50000, dtype=torch.float64)).float()
    count, _, m2 = C._fold_moments(x, chunk, 256)
    truth = _moments(x)[2] / count
    eager = torch.var(x, unbiased=False).item()  # float32 eager, on these float32 values
    assert abs(m2 / count - truth) <= max(4 * abs(eager - truth), 1e-6 * truth)


@pytest.mark.parametrize("where", [0, 37], ids=["first", "inside"])  # the first element is the fold's shift
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=str)
def test_folding_propagates_nan_and_inf_like_eager(where, bad):
    x = torch.randn(100, dtype=torch.float64)
    x[where] = bad
    _, total, m2 = C._fold_moments(x, 4, 32)
    # Not finite, as eager's statistics: the sum (mean) inf or NaN (a Welford mean, as eager CUDA batch
    # norm's, turns an infinite mean into NaN at the next merge), M2 (variance) NaN, wherever the value is.
    assert not math.isfinite(total) and m2 != m2
    assert torch.var(x, unbiased=False).isnan()


def test_folding_hook_checks_its_arguments():
    with pytest.raises(ValueError, match="threads must be a power of two"):
        C._fold_moments(torch.ones(4), 4, 3)
    with pytest.raises(ValueError, match="chunk must be 4 or 16"):
        C._fold_moments(torch.ones(4), 8, 4)


# ---- routing ----


def _cuda_tensor(dtype=torch.float32, numel=8):
    """What ``route`` reads of a tensor, on a CUDA device (none here)."""
    return SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype, numel=lambda: numel)


@pytest.fixture
def gpu(monkeypatch):
    """A stand-in GPU of a given compute capability, with or without _C's CUDA kernels and triton."""
    def make(capability=(9, 0), kernels=True, triton=True):
        monkeypatch.setattr(ops, "_tensor_core_triton", lambda index: capability >= (8, 0))
        monkeypatch.setattr(ops._ext, "cuda_kernels", lambda: kernels)
        monkeypatch.setattr(ops, "triton_available", lambda: triton)
    monkeypatch.delenv(ops.DENSE_PATH_ENV, raising=False)
    return make


@pytest.mark.parametrize("capability, kernels, triton, expected", [
    ((9, 0), True, True, "triton"),  # Hopper: the fused convolutions
    ((8, 0), False, True, "triton"),
    ((7, 5), True, True, "extension"),  # Turing: no Triton tensor-core path for the fused convolutions
    ((7, 0), True, False, "extension"),  # no triton at all
    ((9, 0), True, False, "extension"),
    ((7, 5), False, True, "triton"),  # nothing better built
    ((9, 0), False, False, "eager"),
])
def test_auto_routes_dense_blocks_to_the_best_path_that_runs(gpu, capability, kernels, triton, expected):
    gpu(capability, kernels, triton)
    assert ops.route("dense", _cuda_tensor()) == expected
    assert ops.route("dense", _cuda_tensor(numel=0)) == "eager"  # empty: eager handles it


@pytest.mark.parametrize("path", ["triton", "extension", "eager"])
def test_the_switch_selects_a_path(gpu, path):
    gpu((9, 0), True, True)
    with fastres.dense_path(path):
        assert ops.route("dense", _cuda_tensor(torch.bfloat16)) == path
        with fastres.dense_path("auto"):
            assert ops.route("dense", _cuda_tensor()) == "triton"
        assert ops.route("dense", _cuda_tensor()) == path
    assert ops.route("dense", _cuda_tensor()) == "triton"


def test_the_environment_variable_sets_the_default(gpu, monkeypatch):
    gpu((9, 0), True, True)
    monkeypatch.setenv(ops.DENSE_PATH_ENV, "extension")
    assert ops.route("dense", _cuda_tensor()) == "extension"
    with fastres.dense_path("triton"):  # the context wins
        assert ops.route("dense", _cuda_tensor()) == "triton"
    monkeypatch.setenv(ops.DENSE_PATH_ENV, "fast")
    with pytest.raises(ValueError, match="^FASTRES_DENSE_PATH must be one of 'auto', 'triton', 'extension', 'eager', got 'fast'$"):
        ops.route("dense", _cuda_tensor())


def test_a_path_that_cannot_run_says_why(gpu):
    gpu((9, 0), kernels=False, triton=False)
    with fastres.dense_path("extension"), pytest.raises(RuntimeError, match="dense path 'extension'.*CUDA kernels are"):
        ops.route("dense", _cuda_tensor())
    with fastres.dense_path("triton"), pytest.raises(RuntimeError, match="triton is not installed"):
        ops.route("dense", _cuda_tensor())
    with pytest.raises(ValueError, match="^path must be one of"):
        with fastres.dense_path("cudnn"):
            pass


def test_eager_is_selectable_on_cpu_too():
    x = torch.randn(2, 3, 4, 4)
    assert ops.route("dense", x) == "extension"
    with fastres.dense_path("eager"):
        assert ops.route("dense", x) == "eager"
    assert ops.route("dense", x) == "extension"


# ---- the tuner's choice between the two CUDA paths ----


def test_the_tuner_times_both_paths_without_touching_the_users_state(monkeypatch, tmp_path):
    """Each candidate runs a training step on copies; the faster path is kept and remembered."""
    from fastres.kernels import tuning
    from fastres.ops import dense_tuning
    from fastres.ops.dense_ext import dense_block

    monkeypatch.setenv("FASTRES_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FASTRES_AUTOTUNE", "1")
    monkeypatch.setattr(tuning, "_can_time", lambda device: True)
    monkeypatch.setattr(tuning, "capturing", lambda device: False)
    tuning.forget()
    ran = []

    def run_block(path, x, layers):  # both "paths" run the CPU engine here; the timer says which is faster
        ran.append(path)
        return dense_block(x, layers)

    monkeypatch.setattr(tuning, "BENCH", lambda fn: (fn(), {"triton": 2.0, "extension": 1.0}[ran[-1]])[1])
    net = fastres.models.densenet121(num_classes=10).features.denseblock1
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    layers = [layer.dense_args(tuple(x[:, : 64 + 32 * i].shape)) for i, layer in enumerate(net.values())][:2]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert dense_tuning.choose_path(x, layers, run_block) == "extension"
    assert set(ran) == {"triton", "extension"}
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # running statistics untouched
    assert x.grad is None and all(p.grad is None for p in net.parameters())
    ran.clear()
    assert dense_tuning.choose_path(x, layers, run_block) == "extension"  # remembered: nothing timed again
    assert ran == []
    tuning.forget()


def test_a_densenet_on_the_eager_path_trains_like_the_shared_storage_one():
    """The switch changes the engine, never the numbers (float64, CPU: the C++ engine against the layers as written)."""
    torch.manual_seed(0)
    model = fastres.models.densenet_bc(depth=16, growth_rate=4, num_classes=3).double()
    twin = fastres.models.densenet_bc(depth=16, growth_rate=4, num_classes=3).double()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    out = model(x)
    out.square().sum().backward()
    with fastres.dense_path("eager"):
        ref = twin(x)
        ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
    for (name, b), c in zip(model.named_buffers(), twin.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-12, atol=1e-12, msg=name)


def test_fastres_check_self_tests_the_cuda_kernels_where_they_can_run(monkeypatch):
    """On CUDA with the kernels built, `fastres check` adds the DenseNet on them (run here on CPU's engine)."""
    from fastres.cli import selftest

    assert not any("_C CUDA" in name for name in selftest.cases_for("cpu"))
    monkeypatch.setattr(selftest._ext, "cuda_kernels", lambda: True)
    extra = {k: v for k, v in selftest.cases_for("cuda").items() if "_C CUDA" in k}
    assert list(extra) == ["DenseNet-BC depth 10, fastres._C CUDA kernels (vs torchvision)"]
    (name, case), = extra.items()
    result = selftest.run_case(name, case, "cpu", torch.float64)
    assert result.ok, result


def test_timing_that_runs_out_of_memory_keeps_the_default(monkeypatch, tmp_path):
    from fastres.kernels import tuning
    from fastres.ops import dense_tuning
    from fastres.ops.dense_ext import dense_block

    monkeypatch.setenv("FASTRES_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FASTRES_AUTOTUNE", "1")
    monkeypatch.setattr(tuning, "_can_time", lambda device: True)
    monkeypatch.setattr(tuning, "capturing", lambda device: False)
    monkeypatch.setattr(tuning, "BENCH", lambda fn: (fn(), 1.0)[1])
    monkeypatch.setattr(dense_tuning, "_NO_ROOM", set())
    tuning.forget()
    calls = []

    def run_block(path, x, layers):
        calls.append(path)
        if path == "extension":
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        return dense_block(x, layers)

    net = fastres.models.densenet121(num_classes=10).features.denseblock1
    x = torch.randn(2, 64, 8, 8)
    layers = [net.denselayer1.dense_args(tuple(x.shape))]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert dense_tuning.choose_path(x, layers, run_block) == "triton"
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    calls.clear()
    assert dense_tuning.choose_path(x, layers, run_block) == "triton"  # not timed again
    assert calls == []
    tuning.forget()


def test_a_triton_path_that_cannot_be_built_leaves_the_block_to_the_extension(monkeypatch, tmp_path):
    """A compile or ptxas failure of the fused convolutions while timing: the block shape takes _C's kernels."""
    pytest.importorskip("triton")
    from triton.compiler.errors import CompilationError

    from fastres.kernels import tuning
    from fastres.ops import dense_tuning
    from fastres.ops.dense_ext import dense_block

    monkeypatch.setenv("FASTRES_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FASTRES_AUTOTUNE", "1")
    monkeypatch.setattr(tuning, "_can_time", lambda device: True)
    monkeypatch.setattr(tuning, "capturing", lambda device: False)
    monkeypatch.setattr(tuning, "BENCH", lambda fn: (fn(), 1.0)[1])
    tuning.forget()

    def run_block(path, x, layers):
        if path == "triton":
            raise CompilationError("bn_relu_conv.py", None, "ptxas fatal (stand-in)")
        return dense_block(x, layers)

    net = fastres.models.densenet121(num_classes=10).features.denseblock1
    x = torch.randn(2, 64, 8, 8)
    layers = [net.denselayer1.dense_args(tuple(x.shape))]
    with pytest.warns(UserWarning, match=r"dense_block config \(0,\) cannot be built here"):
        assert dense_tuning.choose_path(x, layers, run_block) == "extension"
    assert dense_tuning.choose_path(x, layers, run_block) == "extension"  # remembered
    tuning.forget()
