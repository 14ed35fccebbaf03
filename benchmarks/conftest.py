"""Fixtures shared by the benchmark suites, and the one timing helper they use.

Run explicitly (the unit-test run only collects ``tests/``):

    pytest benchmarks/ --benchmark-only --benchmark-json benchmarks/results/NAME.json

Suites get everything through fixtures (``device``, ``bench``, ``compile_once``)
and the ``cuda_only`` / ``cpu_only`` marks, never by importing this file: every
conftest.py outside a package is the module ``conftest``, so such an import
could pick up ``tests/conftest.py`` instead.
"""

import datetime
import os
import platform
import sys

import pytest
import torch

import fastres

CUDA = torch.cuda.is_available()

# CUDA timings are medians of many short calls; CPU rounds are few so that the
# whole suite stays a smoke-sized run on a small machine.
ROUNDS, WARMUP_ROUNDS = (50, 5) if CUDA else (5, 1)

# Larger than the L2 cache of any current GPU (H100/H200: 50 MB): writing it
# before each timed call means no input is timed while still cached.
L2_FLUSH_BYTES = 256 * 2**20
_l2_flush_buffer = None
_compiled_key = None


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda_only: a GPU-sized case; skipped without a CUDA device")
    config.addinivalue_line("markers", "cpu_only: a CPU smoke-sized case; skipped on a CUDA device")


def pytest_runtest_setup(item):
    if not CUDA and item.get_closest_marker("cuda_only"):
        pytest.skip("needs a CUDA device")
    if CUDA and item.get_closest_marker("cpu_only"):
        pytest.skip("CPU smoke size; the GPU-sized cases cover this device")


def pytest_report_header(config):
    if CUDA:
        return f"fastres benchmarks on {torch.cuda.get_device_name()}"
    lines = [
        "fastres benchmarks: no CUDA device, timing the CPU paths "
        "(fastres runs eager PyTorch there); GPU-only cases skip"
    ]
    if os.environ.get("TRITON_INTERPRET") == "1":
        lines.append("TRITON_INTERPRET=1: fastres runs Triton's interpreter; its timings mean nothing")
    return lines


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if CUDA else "cpu")


@pytest.fixture
def compile_once():
    """``compile_once(fn, key)``: ``torch.compile(fn)``, with a fresh dynamo cache per new ``key``.

    Dynamo caches per code object: a function or module class compiled for many
    shapes would hit the recompile limit and silently fall back to eager.
    Resetting when the shape group changes keeps every case compiled, while the
    cases of one group (forward/backward/full) share the compiled graphs.
    """

    def compile_once(fn, key):
        global _compiled_key
        if key != _compiled_key:
            torch._dynamo.reset()
            _compiled_key = key
        return torch.compile(fn, dynamic=False)

    return compile_once


@pytest.fixture
def bench(benchmark, device):
    """``bench(fn, setup=None, *, op, provider, mode, shape, dtype, layout, nbytes=None)``.

    Times ``fn(*setup())``. ``setup`` (untimed, before every round) returns the
    arguments of ``fn``; on CUDA it also flushes L2 and synchronises, and the
    timed call synchronises inside itself, so each sample is one call's device
    time plus its launch overhead. Fills ``benchmark.group`` and ``extra_info``.
    """

    def bench(fn, setup=None, *, op, provider, mode, shape, dtype, layout, nbytes=None):
        shape_str = "x".join(map(str, shape))
        dtype_str = str(dtype).removeprefix("torch.")
        benchmark.group = f"{op} {shape_str} {dtype_str} {layout}"
        benchmark.extra_info.update(
            op=op, provider=provider, mode=mode, shape=shape_str, dtype=dtype_str,
            layout=layout, device=str(device), bytes=nbytes,
        )

        def prepare():
            args = setup() if setup is not None else ()
            if CUDA:
                _flush_l2()
                torch.cuda.synchronize()
            return args, {}

        def timed(*args):
            fn(*args)
            if CUDA:
                torch.cuda.synchronize()

        if benchmark.disabled:  # --benchmark-disable: one call, as a smoke test
            benchmark.pedantic(timed, setup=prepare)
            return
        # One untimed call first: Triton JIT and autotuning, torch.compile and
        # cuDNN's algorithm search happen here, never in a timed round.
        timed(*prepare()[0])

        if CUDA:
            args = prepare()[0]
            torch.cuda.reset_peak_memory_stats()  # the peak starts at what is allocated now
            timed(*args)
            del args
            peak = torch.cuda.max_memory_allocated() - L2_FLUSH_BYTES  # same in every case
            benchmark.extra_info["peak_mb"] = peak / 2**20

        benchmark.pedantic(timed, setup=prepare, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)

        stats = benchmark.stats.stats
        data = sorted(stats.data)
        benchmark.extra_info["q20_s"] = data[round(0.2 * (len(data) - 1))]
        benchmark.extra_info["q80_s"] = data[round(0.8 * (len(data) - 1))]
        if nbytes:
            benchmark.extra_info["gbps"] = nbytes / stats.median / 1e9

    return bench


def _flush_l2() -> None:
    global _l2_flush_buffer
    if _l2_flush_buffer is None:
        _l2_flush_buffer = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    _l2_flush_buffer.zero_()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    info = output_json.setdefault("machine_info", {})
    info.update(
        device_name=torch.cuda.get_device_name() if CUDA else f"cpu {platform.processor() or platform.machine()}",
        torch=torch.__version__,
        cuda=torch.version.cuda,
        python=sys.version.split()[0],
        fastres=fastres.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        triton_interpret=os.environ.get("TRITON_INTERPRET") == "1",
        torch_threads=torch.get_num_threads(),
    )
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
