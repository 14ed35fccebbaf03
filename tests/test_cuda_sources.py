"""fastres._C's CUDA kernels compile for every GPU fastres targets, without a GPU: no spills, no local memory, 128-bit accesses.

``csrc/dense_cuda.cu`` (which calls every function of ``csrc/dense_math.h``,
the arithmetic the CPU engine shares) is compiled here with the toolkit's
nvcc for each architecture it targets, and ptxas must report no spill and no
stack frame for any kernel. sm_70, which CUDA 13's nvcc dropped, is checked
with CUDA 11.8's ptxas on the retargeted PTX. The SASS (``benchmarks.csrc_report``)
must show the contiguous kernels moving x 128 bits at a time.
"""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import csrc_report  # noqa: E402

NVCC = csrc_report.nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="needs nvcc (a CUDA toolkit); none on this machine")


def _clean(usage: dict) -> None:
    assert len(usage) == 86, sorted(usage)  # every kernel instantiation was reported
    bad = {k: u for k, u in usage.items() if u["stack"] or u["spill_stores"] or u["spill_loads"]}
    assert not bad, bad


@needs_nvcc
@pytest.mark.parametrize("arch", csrc_report.ARCHS)
def test_every_kernel_compiles_without_spills_or_stack(tmp_path, arch):
    usage, _ = csrc_report.ptxas_report(arch, str(tmp_path))
    _clean(usage)


@needs_nvcc
@pytest.mark.skipif(csrc_report.ptxas11() is None, reason="needs CUDA 11.8's ptxas (pip install nvidia-cuda-nvcc-cu11)")
def test_every_kernel_assembles_for_sm70_without_spills(tmp_path):
    _clean(csrc_report.ptxas_sm70(str(tmp_path)))


@needs_nvcc
@pytest.mark.skipif(csrc_report.triton_tools() is None, reason="reads the SASS with Triton's cuobjdump: needs triton")
def test_contiguous_kernels_move_128_bits_and_nothing_touches_local_memory():
    rep = csrc_report.report("sm_90")
    rows = {r["kernel"]: r for r in rep["kernels"]}
    assert all(r["sass"]["local"] == 0 for r in rows.values()), {k: r["sass"]["local"] for k, r in rows.items()}
    wide = [r for r in rows.values() if r["contiguous"]]
    assert len(wide) == 40  # 4 dtypes x 2 layouts x (3 maps + 2 reductions)
    for r in wide:
        s = r["sass"]
        assert s["ldg128"] > 0 and s["main"] == "loop", r
        assert not s["main_ldg_narrow"], r  # per-channel constants load before the element loop
        if "_map<" in r["kernel"]:
            assert s["stg128"] > 0, r
    # No division per element: reciprocals only where Welford merges or statistics finish.
    assert all(r["sass"]["rcp"] == 0 for k, r in rows.items() if "_map<" in k or "GradSums" in k)


def test_the_report_runs_without_a_toolkit_only_as_a_clear_exit(monkeypatch):
    monkeypatch.setattr(csrc_report, "nvcc", lambda: None)
    with pytest.raises(SystemExit, match="needs nvcc"):
        csrc_report.main([])


def test_the_report_finds_the_toolkit_the_build_used():
    """The report looks for nvcc where setup.py does: it finds one exactly when _C was built with its kernels."""
    from fastres import _ext

    if not _ext.available():
        pytest.skip("fastres._C is not built (FASTRES_NO_EXT=1)")
    assert bool(NVCC) == _ext.cuda_kernels()
