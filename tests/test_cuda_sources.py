"""The C++ sources meant for CUDA compile with nvcc, without a GPU: no spills, no local memory.

``csrc/dense_math.h`` is the dense-block ops' arithmetic, shared by the CPU
engine and CUDA kernels. ``tests/cuda/dense_math_probe.cu`` calls every one of
its functions in a kernel, for float and double; nvcc compiles it here for the
oldest and newest architectures this toolkit targets, and ptxas must report no
spill and no stack frame.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="needs nvcc (a CUDA toolkit); none on this machine")
@pytest.mark.parametrize("arch", ["sm_75", "sm_90"])
def test_shared_arithmetic_compiles_for_the_gpu_without_spills(tmp_path, arch):
    done = subprocess.run(
        [NVCC, "-c", "-std=c++17", f"-I{ROOT / 'csrc'}", f"-arch={arch}", "-Xptxas", "-v",
         str(ROOT / "tests" / "cuda" / "dense_math_probe.cu"), "-o", str(tmp_path / "probe.o")],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    entries = re.findall(r"Compiling entry function '(\w+)'", done.stderr)
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", done.stderr)
    assert len(entries) == 2 and len(frames) == 2, done.stderr  # probe<float>, probe<double>
    assert all(f == ("0", "0", "0") for f in frames), done.stderr
