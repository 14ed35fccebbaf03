"""Build and install fastres.

The Triton kernels in ``kernels/`` are installed as ``fastres.kernels``, the
benchmark suites in ``benchmarks/`` as ``fastres.benchmarks`` (what ``fastres bench`` runs).
``fastres._C`` (``csrc/``) is the engine of shared-storage dense blocks: C++
on CPU, and CUDA kernels for GPUs where the Triton path cannot run (or is
chosen against). The extension builds against the torch already installed,
so install with ``pip install --no-build-isolation -e .`` after torch: build
isolation would fetch (and build against) another torch.

The extension is a CppExtension (pybind11 + torch headers, OpenMP) built by
ninja with ``MAX_JOBS`` respected. Its CUDA kernels (``csrc/dense_cuda.cu``)
include no torch headers: nvcc compiles them into an object that the
extension links with the toolkit's static CUDA runtime, so they build the same
against a CPU or a CUDA build of torch, on a machine with or without a GPU.
Without a CUDA toolkit the extension is built without them (``no_cuda.cpp``
stands in; CUDA tensors then take the Triton kernels or eager PyTorch).

Environment:
    FASTRES_NO_EXT=1     skip fastres._C (pure-Python install: ``import fastres``
                         works, the shared-storage DenseNet ops raise)
    FASTRES_CUDA=0|1     build the CUDA kernels never, or always (an error when
                         no nvcc is found); unset: whenever nvcc is found
    CUDA_HOME            the CUDA toolkit (else nvcc on PATH, else /usr/local/cuda)
    FASTRES_CUDA_ARCHS   e.g. "80;90": the GPUs to compile for (default: every
                         one of 70, 75, 80, 86, 89, 90 that this nvcc supports,
                         plus PTX of the newest, for later GPUs)
    MAX_JOBS             parallel compile jobs for ninja
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
CUDA_SOURCES = ["csrc/dense_cuda.cu"]
CUDA_HEADERS = ["csrc/dense_cuda.h", "csrc/dense_math.h"]
DEFAULT_ARCHS = (70, 75, 80, 86, 89, 90)


def find_nvcc() -> str | None:
    """nvcc to build the CUDA kernels with, or None (FASTRES_CUDA decides whether that is an error)."""
    flag = os.environ.get("FASTRES_CUDA", "").strip()
    if flag == "0":
        return None
    homes = [os.environ.get(k) for k in ("CUDA_HOME", "CUDA_PATH")]
    candidates = [os.path.join(h, "bin", "nvcc") for h in homes if h]
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for nvcc in candidates:
        if nvcc and os.path.isfile(nvcc) and os.access(nvcc, os.X_OK):
            return os.path.realpath(nvcc)
    if flag == "1":
        sys.exit("FASTRES_CUDA=1 but no nvcc was found: set CUDA_HOME or put nvcc on PATH")
    return None


def cudart_dir(nvcc: str) -> str:
    """The toolkit folder holding libcudart_static.a (nvcc may be a wrapper script outside the toolkit)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), str(Path(nvcc).parent.parent), "/usr/local/cuda"]
    nvcc_dir = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                              capture_output=True, text=True)
    homes += re.findall(r"TOP=(\S+)", nvcc_dir.stdout + nvcc_dir.stderr)  # where the real nvcc lives
    for home in filter(None, homes):
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            if (Path(home) / sub / "libcudart_static.a").is_file():
                return str(Path(home) / sub)
    sys.exit(f"no libcudart_static.a found for {nvcc}: set CUDA_HOME to the CUDA toolkit (or FASTRES_CUDA=0)")


def cuda_archs(nvcc: str) -> list[int]:
    """Compute capabilities to compile for: FASTRES_CUDA_ARCHS, else the defaults this nvcc supports."""
    wanted = os.environ.get("FASTRES_CUDA_ARCHS", "").strip()
    if wanted:
        return sorted({int(a.strip().replace(".", "")) for a in re.split(r"[;, ]+", wanted) if a.strip()})
    listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True).stdout
    supported = {int(m) for m in re.findall(r"compute_(\d+)", listed)}
    return [a for a in DEFAULT_ARCHS if a in supported]


def nvcc_flags(archs: list[int]) -> list[str]:
    """SASS for each arch and PTX for the newest; ptxas's per-kernel report (-v) goes to the build log."""
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return ["-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-Xptxas", "-v", f"-I{CSRC}", *gencode]


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

    nvcc = find_nvcc()
    sources = ["csrc/bindings.cpp", "csrc/dense_cpu.cpp", "csrc/dense_cuda_host.cpp"]
    ext = CppExtension(
        "fastres._C",
        sources + ([] if nvcc else ["csrc/no_cuda.cpp"]),
        include_dirs=[str(CSRC)],
        extra_compile_args=["-O3", "-g0", "-fopenmp"],
        extra_link_args=[
            "-fopenmp",  # at::parallel_for's OpenMP pragmas live in the headers
            "-s",  # no symbols or debug info: ~11 MB otherwise
        ],
    )

    class Build(BuildExtension):
        """BuildExtension, with csrc/*.cu compiled by nvcc first and linked as objects."""

        def build_extensions(self):
            if nvcc:
                self._compile_cuda()
            super().build_extensions()

        def _compile_cuda(self):
            archs = cuda_archs(nvcc)
            if not archs:
                sys.exit(f"{nvcc} supports none of the GPUs fastres targets ({DEFAULT_ARCHS}); set FASTRES_CUDA_ARCHS")
            out_dir = Path(self.build_temp) / "cuda"
            out_dir.mkdir(parents=True, exist_ok=True)
            flags = nvcc_flags(archs)
            for source in CUDA_SOURCES:
                obj = out_dir / (Path(source).stem + ".o")
                inputs = [ROOT / source, *(ROOT / h for h in CUDA_HEADERS)]
                stamp = out_dir / (Path(source).stem + ".flags")
                fresh = (obj.exists() and stamp.exists() and stamp.read_text() == " ".join(flags)
                         and all(obj.stat().st_mtime >= p.stat().st_mtime for p in inputs))
                if not fresh:
                    print(f"nvcc: {source} for sm_{', sm_'.join(map(str, archs))} (+PTX)", flush=True)
                    done = subprocess.run([nvcc, "-c", str(ROOT / source), "-o", str(obj), *flags],
                                          capture_output=True, text=True)
                    (out_dir / (Path(source).stem + ".ptxas.txt")).write_text(done.stdout + done.stderr)
                    if done.returncode != 0:
                        sys.exit(f"nvcc failed on {source}:\n{done.stderr[-4000:]}")
                    stamp.write_text(" ".join(flags))
                ext.extra_objects.append(str(obj))
            ext.library_dirs.append(cudart_dir(nvcc))
            # The static CUDA runtime: _C needs no libcudart at run time, and loads without a GPU.
            ext.libraries.extend(["cudart_static", "rt", "dl", "pthread"])

    return [ext], {"build_ext": Build}


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
