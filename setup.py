"""Build and install fastres.

The Triton kernels in ``kernels/`` are installed as ``fastres.kernels``.
Install with ``pip install --no-build-isolation -e .`` after torch, so that the
build uses (and never re-resolves) the torch already installed.
"""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()

setup(
    name="fastres",
    version="0.1.0",
    description="Fused GPU kernels for residual and dense convolutional networks",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastres", "fastres._dispatch", "fastres.nn", "fastres.models", "fastres.kernels"],
    package_dir={"fastres": "fastres", "fastres.kernels": "kernels"},
    # Lower bounds only: an installed torch that satisfies them is never replaced.
    install_requires=["torch>=2.4"],
    # Exact pins for a CPU machine (torchvision included) are in .ci/requirements.txt.
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest>=8"],
        "demo": ["scikit-learn"],
        "bench": ["pytest-benchmark>=4", "matplotlib"],
    },
)
