"""The cold-start report (``benchmarks/cold_start.py``) runs a training step through the stand-in sm_90 device.

A one-block DenseNet at 16x16, two fresh processes sharing the tuning and
Triton caches (about 40 s here): binaries are compiled and counted, the fused
convolutions open tuning sessions, and the second process finds the first
one's tuning choices on disk (where ``fastres.kernels.tuning`` exists) and
its binaries in Triton's cache. In a subprocess because this process has
TRITON_INTERPRET=1.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"growth_rate": 16, "block_config": [2], "num_init_features": 32, "small_inputs": True, "num_classes": 10}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("cold") / "cold.json"
    # Kernels must be compiled (no interpreter) and tuned as on a GPU (gpu_check.sh runs tests with FASTRES_AUTOTUNE=0).
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTRES_AUTOTUNE")}
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.cold_start", "--model", "DenseNet", "--model-args", json.dumps(TINY),
         "--batch", "2", "--size", "16", "--processes", "2", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


def test_report_structure(report):
    assert {k: report[k] for k in ("model", "batch", "size", "dtype")} == {
        "model": "DenseNet", "batch": 2, "size": 16, "dtype": "bfloat16"}
    assert report["model_args"] == TINY and report["triton"] and report["torch"]
    assert len(report["processes"]) == 2
    for p in report["processes"]:
        assert p["step_seconds"] > 0 and p["process_seconds"] >= p["step_seconds"]
        assert sum(p["binaries_by_kernel"].values()) == p["binaries"] <= p["triton_compile_calls"]
        assert sum(p["sessions_by_kind"].values()) == p["sessions"]
        assert sum(p["candidates_by_kind"].values()) == p["candidates"]


def test_first_process_compiles_and_tunes(report):
    first = report["processes"][0]
    assert first["binaries"] > 0 and first["launches"] >= first["binaries"]
    assert first["new_cubins_in_triton_cache"] == first["binaries"]  # a cold Triton cache
    # The dense block's convolutions on the fused kernels, each tuning session with several candidates.
    assert {"bn_relu_conv_fwd_kernel", "bn_relu_conv_dgrad_kernel", "bn_relu_conv_wgrad_kernel"} <= set(first["binaries_by_kernel"])
    assert set(first["sessions_by_kind"]) == {"forward", "dgrad", "wgrad"}
    assert first["candidates"] >= 2 * first["sessions"] > 0
    assert first["binaries"] > first["binaries_outside_tuning"]  # the candidates were compiled


def test_second_process_reuses_the_caches(report):
    first, second = report["processes"]
    assert second["new_cubins_in_triton_cache"] == 0
    if first["tuning_api"] == "fastres.kernels.tuning":  # choices remembered on disk: nothing tuned again
        assert second["sessions"] == 0 and second["tuning_launches"] == 0
        assert second["binaries"] == first["binaries_outside_tuning"]
