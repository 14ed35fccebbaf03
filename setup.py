"""Build and install fastres.

The Triton kernels in ``kernels/`` are installed as ``fastres.kernels``, the
benchmark suites in ``benchmarks/`` as ``fastres.benchmarks`` (what ``fastres bench`` runs).
``fastres._C`` (``csrc/``) is the C++ engine of shared-storage dense blocks on
CPU; on CUDA, dense blocks, transitions and the stem run on the Triton kernels
and need no compiled code. The extension builds against the torch already
installed, so install with ``pip install --no-build-isolation -e .`` after
torch: build isolation would fetch (and build against) another torch.

The extension is a plain CppExtension (pybind11 + torch headers, OpenMP),
built by ninja with ``MAX_JOBS`` respected. It needs a host C++ compiler, no
CUDA toolkit, and builds the same against a CPU or a CUDA build of torch.

Environment:
    FASTRES_NO_EXT=1   skip fastres._C (pure-Python install: ``import fastres``
                       works, CUDA tensors are unaffected, the CPU
                       shared-storage DenseNet ops raise)
    MAX_JOBS           parallel compile jobs for ninja
"""

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"


def extension_build():
    """(ext_modules, cmdclass) for fastres._C, or nothing with FASTRES_NO_EXT=1."""
    if os.environ.get("FASTRES_NO_EXT", "").strip() == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        sys.exit(
            "fastres._C builds against the installed torch: install torch first, then "
            "pip install --no-build-isolation -e . (or set FASTRES_NO_EXT=1)"
        )

    ext = CppExtension(
        "fastres._C",
        ["csrc/bindings.cpp", "csrc/dense_cpu.cpp"],
        include_dirs=[str(CSRC)],
        extra_compile_args=["-O3", "-g0", "-fopenmp"],
        extra_link_args=[
            "-fopenmp",  # at::parallel_for's OpenMP pragmas live in the headers
            "-s",  # no symbols or debug info: ~11 MB otherwise
        ],
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_build()

setup(
    name="fastres",
    version="0.1.0",
    description="Fused GPU kernels for residual and dense convolutional networks",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The benchmark suites ship as fastres.benchmarks, so that `fastres bench` runs them from an install.
    packages=["fastres", "fastres.ops", "fastres.nn", "fastres.models", "fastres.cli", "fastres.kernels",
              "fastres.benchmarks"],
    package_dir={"fastres": "fastres", "fastres.kernels": "kernels", "fastres.benchmarks": "benchmarks"},
    entry_points={"console_scripts": ["fastres = fastres.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # Lower bounds only: an installed torch that satisfies them is never replaced.
    install_requires=["torch>=2.4", "tqdm"],  # tqdm: the commands' progress bars
    # Exact pins for a CPU machine (torchvision included) are in .ci/requirements.txt.
    extras_require={
        "triton": ["triton>=3.6"],  # kernels/launch.py binds arguments with Triton 3.6's launcher internals
        "test": ["pytest>=8"],
        "demo": ["scikit-learn"],  # fastres train's built-in data
        "plot": ["matplotlib"],  # fastres train --plot, fastres memory depth
        "bench": ["pytest-benchmark>=4", "matplotlib"],
    },
)
