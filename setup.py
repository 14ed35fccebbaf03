"""Build and install fastres.

The Triton kernels in ``kernels/`` are installed as ``fastres.kernels``. The
C++/CUDA extension ``fastres._C`` (``csrc/``) builds against the torch already
installed, so install with ``pip install --no-build-isolation -e .`` after
torch: build isolation would fetch (and build against) another torch.

The extension is a CppExtension (pybind11 + CPU torch headers, built by ninja,
``MAX_JOBS`` respected). The CUDA kernels in ``csrc/*.cu`` include no torch
headers: nvcc compiles them into the build temp dir and they are linked in with
the toolkit's static CUDA runtime (``cudart_static``), so the same build works
with a CPU or a CUDA torch, and imports on machines without a GPU or driver.

Environment:
    FASTRES_NO_EXT=1   skip fastres._C (pure-Python install)
    FASTRES_CUDA=1     compile the CUDA kernels; fail if nvcc is missing
    FASTRES_CUDA=0     skip them (CUDA tensors then raise a clear error)
    (unset)            compile them when nvcc is found (CUDA_HOME, then PATH)
    MAX_JOBS           parallel jobs for ninja and for nvcc's per-arch threads
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"

# sm_80 (A100) and sm_90 (H100/H200) machine code, plus sm_90 PTX that newer
# GPUs compile at load time.
NVCC_ARCH_FLAGS = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=[sm_90,compute_90]",
]


def _flag(name: str) -> str:
    return os.environ.get(name, "").strip()


def _toolkit_root(nvcc: str) -> Path:
    """The toolkit of an nvcc, which may be a wrapper script outside it."""
    probe = subprocess.run(  # --dryrun prints nvcc's environment, TOP included, runs nothing
        [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
        capture_output=True,
        text=True,
    )
    top = re.search(r"^#\$ TOP=(.+)$", probe.stdout + probe.stderr, re.MULTILINE)
    return Path(top.group(1)).resolve() if top else Path(nvcc).resolve().parent.parent


def find_cuda() -> tuple[str, Path] | None:
    """(nvcc, toolkit root) from CUDA_HOME, else from PATH; None when absent."""
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").is_file():
        return str(Path(cuda_home) / "bin" / "nvcc"), Path(cuda_home).resolve()
    nvcc = shutil.which("nvcc")
    return (nvcc, _toolkit_root(nvcc)) if nvcc else None


def cuda_for_build() -> tuple[str, Path] | None:
    """The nvcc and toolkit to compile the CUDA kernels with, as FASTRES_CUDA says."""
    wanted = _flag("FASTRES_CUDA")
    if wanted == "0":
        return None
    cuda = find_cuda()
    if cuda is None and wanted == "1":
        sys.exit("FASTRES_CUDA=1 but nvcc was not found: put it on PATH or set CUDA_HOME")
    if cuda is None:
        print("fastres: nvcc not found, building fastres._C without CUDA kernels", file=sys.stderr)
    return cuda


def cudart_dir(root: Path) -> Path:
    for lib in (root / "lib64", root / "targets" / "x86_64-linux" / "lib", root / "lib"):
        if (lib / "libcudart_static.a").is_file():
            return lib
    sys.exit(f"fastres: libcudart_static.a not found under {root}")


def extension_build():
    """(ext_modules, cmdclass) for fastres._C, or nothing with FASTRES_NO_EXT=1."""
    if _flag("FASTRES_NO_EXT") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        sys.exit(
            "fastres._C builds against the installed torch: install torch first, then "
            "pip install --no-build-isolation -e . (or set FASTRES_NO_EXT=1)"
        )

    class BuildExtensionWithNvcc(BuildExtension):
        """BuildExtension that first compiles each extension's ``nvcc_sources``
        into the build temp dir and links the objects in."""

        def build_extensions(self):
            for ext in self.extensions:
                for source in getattr(ext, "nvcc_sources", []):
                    ext.extra_objects.append(self._nvcc(ext.nvcc, Path(source)))
            super().build_extensions()

        def _nvcc(self, nvcc: str, source: Path) -> str:
            obj = Path(self.build_temp).resolve() / "nvcc" / (source.stem + ".o")
            inputs = [source, *source.parent.glob("*.h")]
            if obj.exists() and obj.stat().st_mtime > max(p.stat().st_mtime for p in inputs):
                return str(obj)
            obj.parent.mkdir(parents=True, exist_ok=True)
            cmd = [
                nvcc, "-c", str(source), "-o", str(obj), "-std=c++17", "-O3",
                "-Xcompiler", "-fPIC", f"-I{CSRC}", "--threads", _flag("MAX_JOBS") or "0",
                *NVCC_ARCH_FLAGS,
            ]  # fmt: skip
            print(" ".join(cmd), file=sys.stderr)
            subprocess.run(cmd, check=True)
            return str(obj)

    sources = ["csrc/bindings.cpp", "csrc/dense_cpu.cpp"]
    link_args = [
        "-fopenmp",  # at::parallel_for's OpenMP pragmas live in the headers
        "-s",  # no symbols or debug info: ~11 MB otherwise
        "-Wl,--exclude-libs,ALL",  # keep the static CUDA runtime private to this module
    ]
    ext = CppExtension(
        "fastres._C",
        sources,
        include_dirs=[str(CSRC)],
        extra_compile_args=["-O3", "-g0", "-fopenmp"],
        extra_link_args=link_args,
    )
    cuda = cuda_for_build()
    if cuda is None:
        ext.sources.append("csrc/dense_cuda_stub.cpp")
    else:
        nvcc, root = cuda
        ext.nvcc, ext.nvcc_sources = nvcc, [str(CSRC / "dense_cuda.cu")]
        ext.library_dirs.append(str(cudart_dir(root)))
        ext.libraries += ["cudart_static", "rt", "dl", "pthread"]
    return [ext], {"build_ext": BuildExtensionWithNvcc}


ext_modules, cmdclass = extension_build()

setup(
    name="fastres",
    version="0.1.0",
    description="Fused GPU kernels for residual and dense convolutional networks",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastres", "fastres.ops", "fastres.nn", "fastres.models", "fastres.kernels"],
    package_dir={"fastres": "fastres", "fastres.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
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
