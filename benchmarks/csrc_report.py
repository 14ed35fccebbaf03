"""Static report of ``fastres._C``'s CUDA kernels (``csrc/dense_cuda.cu``) as nvcc compiles them, without a GPU.

    python -m benchmarks.csrc_report [--arch sm_90] [--json PATH] [--md PATH]

For every kernel: registers, stack frame and spills (``ptxas -v``), and from
the SASS (``cuobjdump -sass``, with Triton's copies of cuobjdump and
nvdisasm): its global loads and stores by width, its local-memory
instructions (LDL/STL: spills or stack arrays) and its reciprocals (MUFU.RCP,
how a division compiles). ``vec`` is the kernel's elements per access: the
16-byte instantiations (4 float, 2 double, 8 half) take the contiguous
paths, 1 the strided fallback.

``sm_70``, which CUDA 13's nvcc no longer targets, is checked by assembling
the ``compute_75`` PTX, retargeted to ``sm_70``, with CUDA 11.8's ptxas
(the ``nvidia-cuda-nvcc-cu11`` wheel): ``ptxas_sm70``.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    from .sass import sass_stats
except ImportError:  # imported as a top-level module (tests put benchmarks/ on sys.path)
    from sass import sass_stats

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "dense_cuda.cu"
ARCHS = ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90"]  # what CUDA 13's nvcc compiles; sm_70: ptxas_sm70
WIDE = {"float": 4, "double": 2, "__half": 8, "__nv_bfloat16": 8}


def nvcc() -> str | None:
    """nvcc where setup.py looks for it: $CUDA_HOME, $CUDA_PATH, PATH, /usr/local/cuda (FASTRES_CUDA=0: none)."""
    if os.environ.get("FASTRES_CUDA", "").strip() == "0":
        return None
    homes = [os.path.join(h, "bin", "nvcc") for h in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")) if h]
    return next((p for p in [*homes, shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
                 if p and os.path.isfile(p) and os.access(p, os.X_OK)), None)


def triton_tools() -> tuple[str, str] | None:
    """(cuobjdump, the folder holding nvdisasm) from Triton's wheel, or None without triton."""
    try:
        import triton
    except ImportError:
        return None
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    tool = os.path.join(bin_dir, "cuobjdump")
    return (tool, bin_dir) if os.path.isfile(tool) else None


def ptxas11() -> str | None:
    """CUDA 11.8's ptxas (the last that targets sm_70) from the nvidia-cuda-nvcc-cu11 wheel, if installed."""
    try:
        import nvidia.cuda_nvcc
    except ImportError:
        return None
    path = os.path.join(list(nvidia.cuda_nvcc.__path__)[0], "bin", "ptxas")
    return path if os.path.isfile(path) else None


def _short(mangled: str) -> str:
    """``rows_map<float, 4, Forward>`` from a mangled kernel name."""
    name = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip() or mangled
    name = name.replace("(anonymous namespace)::", "")
    depth, out = 0, []
    for ch in name.removeprefix("void "):
        if ch == "(" and depth == 0:
            break
        depth += ch == "<"
        depth -= ch == ">"
        out.append(ch)
    return "".join(out)


def _type_and_vec(short: str) -> tuple[str, int] | None:
    """(element type, elements per access) of a map or reduction kernel, None for the others."""
    m = re.match(r"\w+<([\w:]+), (\d+),", short)
    return (m.group(1), int(m.group(2))) if m else None


def _vec(short: str) -> int | None:
    found = _type_and_vec(short)
    return found[1] if found else None


def _wide(short: str) -> bool:
    found = _type_and_vec(short)
    return bool(found) and WIDE.get(found[0]) == found[1]


def parse_ptxas(log: str) -> dict[str, dict]:
    """Per kernel: registers, stack frame, spill stores and loads, from ``ptxas -v``'s report."""
    usage = {}
    for m in re.finditer(
        r"Compiling entry function '(\w+)'.*?(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
        r".*?Used (\d+) registers", log, re.S):
        usage[_short(m.group(1))] = {"stack": int(m.group(2)), "spill_stores": int(m.group(3)),
                                     "spill_loads": int(m.group(4)), "registers": int(m.group(5))}
    return usage


def ptxas_report(arch: str, work: str) -> tuple[dict[str, dict], str]:
    """(per-kernel usage, object file) of nvcc -c -arch=arch -Xptxas -v."""
    obj = os.path.join(work, f"dense_cuda_{arch}.o")
    done = subprocess.run([nvcc(), "-c", "-std=c++17", f"-I{ROOT / 'csrc'}", f"-arch={arch}", "-Xptxas", "-v",
                           "-Xcompiler", "-fPIC", str(SOURCE), "-o", obj], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"nvcc failed for {arch}:\n{done.stderr[-3000:]}")
    return parse_ptxas(done.stderr), obj


def ptxas_sm70(work: str) -> dict[str, dict]:
    """Per-kernel usage on sm_70: nvcc 13's compute_75 PTX, retargeted, assembled by CUDA 11.8's ptxas."""
    ptx = os.path.join(work, "dense_cuda_75.ptx")
    done = subprocess.run([nvcc(), "-ptx", "-std=c++17", f"-I{ROOT / 'csrc'}", "-arch=compute_75", str(SOURCE),
                           "-o", ptx], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    text = Path(ptx).read_text()
    text = re.sub(r"^\.version .*$", ".version 7.8", text, count=1, flags=re.M)  # the PTX ISA of CUDA 11.8
    text = re.sub(r"^\.target sm_75$", ".target sm_70", text, count=1, flags=re.M)
    Path(ptx).write_text(text)
    done = subprocess.run([ptxas11(), "-arch=sm_70", "-v", ptx, "-o", os.path.join(work, "dense_cuda_sm70.cubin")],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return parse_ptxas(done.stdout + done.stderr)


def sass_report(obj: str) -> dict[str, dict]:
    """Per kernel, from its SASS: ``sass.sass_stats`` (accesses by width, the main loop) plus its
    local-memory instructions (LDL/STL: spills or stack arrays) and reciprocals (MUFU.RCP: divisions)."""
    tool, bin_dir = triton_tools()
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    sass = subprocess.run([tool, "-sass", obj], capture_output=True, text=True, env=env, timeout=300)
    if sass.returncode != 0:
        raise RuntimeError(sass.stderr[-2000:])
    kernels = {}
    for block in re.split(r"\n\s*Function : ", sass.stdout)[1:]:
        name, body = block.split("\n", 1)
        stats = sass_stats(body)
        stats["local"] = len(re.findall(r"\b(?:LDL|STL)\b", body))
        stats["rcp"] = len(re.findall(r"\bMUFU\.RCP", body))
        kernels[_short(name.strip())] = stats
    return kernels


def report(arch: str = "sm_90") -> dict:
    with tempfile.TemporaryDirectory() as work:
        usage, obj = ptxas_report(arch, work)
        sass = sass_report(obj) if triton_tools() else {}
    rows = []
    for name in sorted(usage):
        rows.append({"kernel": name, "vec": _vec(name), "contiguous": _wide(name), **usage[name],
                     "sass": sass.get(name, {})})
    return {"arch": arch, "source": str(SOURCE.relative_to(ROOT)), "kernels": rows}


def markdown(rep: dict) -> str:
    lines = [f"# fastres._C CUDA kernels, {rep['arch']} (static: ptxas -v and cuobjdump -sass)", "",
             "`main`: the first loop that loads from global memory (the element loop), or the whole kernel. "
             "`narrow LDG (main)`: loads under 128 bits in it, by width (a vec-1 kernel's whole traffic; in a "
             "vectorized one there should be none: per-channel constants load before the loop).", "",
             "| kernel | vec | regs | stack | spills | LDG.128 | STG.128 | 128-bit share | main | narrow LDG (main) "
             "| LDL/STL | MUFU.RCP |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|"]
    for r in rep["kernels"]:
        s = r["sass"]
        if not s:
            continue
        narrow = ", ".join(f"{n}x{b}b" for b, n in s["main_ldg_narrow"].items()) or "0"
        share = "-" if s["share_128bit"] is None else f"{s['share_128bit']:.0%}"
        lines.append(f"| {r['kernel']} | {r['vec'] or '-'} | {r['registers']} | {r['stack']} | "
                     f"{r['spill_stores'] + r['spill_loads']} | {s['ldg128']} | {s['stg128']} | {share} | {s['main']} | "
                     f"{narrow} | {s['local']} | {s['rcp']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sm_90")
    p.add_argument("--json", type=Path)
    p.add_argument("--md", type=Path)
    args = p.parse_args(argv)
    if nvcc() is None:
        sys.exit("needs nvcc (a CUDA toolkit)")
    rep = report(args.arch)
    if args.json:
        args.json.write_text(json.dumps(rep, indent=1) + "\n")
    text = markdown(rep)
    if args.md:
        args.md.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
