"""Every Triton kernel compiles for an H100 (sm_90) with the real backend, no GPU needed.

The interpreter runs kernel semantics but not Triton's compiler. Here the fused
ops run through the stand-in device of ``benchmarks/stub_gpu.py`` (kernels
compiled for sm_90, launches recorded, nothing run), every variant they launch
is compiled, and the static report (``benchmarks/kernel_report.py``) is read:
no kernel spills registers, and the dense paths move 128 bits per access once
a launch has specialised on 16-byte-aligned pointers and sizes divisible by 16
(what Triton does for such arguments). The host-overhead benchmark's launch
counts are checked the same way. Both run in a subprocess because this process
has TRITON_INTERPRET=1.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module: str, *args: str, tmp_path) -> dict:
    out = tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", module, *args, "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return _run("benchmarks.kernel_report", "--shapes", "small", tmp_path=tmp_path_factory.mktemp("r"))


def test_every_kernel_compiles(report):
    names = {r["kernel"] for r in report["triton_kernels"]}
    assert names == {
        "add_relu_fwd_kernel", "add_relu_bwd_kernel", "batch_norm_stats_kernel", "batch_norm_relu_fwd_kernel",
        "batch_norm_relu_bwd_sums_kernel", "batch_norm_relu_bwd_dx_kernel",
        "bn_relu_conv_fwd_kernel", "bn_relu_conv_dgrad_kernel", "bn_relu_conv_wgrad_kernel", "batch_norm_finish_kernel",  # BN-ReLU-Conv, dense blocks
        "bn_relu_kernel",  # the unfused conv candidate's activation
        "batch_norm_eval_stats_kernel",  # BN-ReLU-Conv in eval
    }


def test_no_kernel_spills(report):
    spilling = [(r["kernel"], r["constexprs"]) for r in report["triton_kernels"] if r["spill_bytes"] or r["stack"]]
    assert not spilling


_CONV = ("bn_relu_conv_fwd_kernel", "bn_relu_conv_dgrad_kernel", "bn_relu_conv_wgrad_kernel")


def test_convolutions_run_on_tensor_cores(report):
    """bf16 and TF32 dots compile to wgmma (HGMMA) or mma (HMMA); exact fp32/fp64 ones must not use TF32."""
    # A dgrad given da (the unfused candidate's epilogue alone) has no dot.
    conv = [r for r in report["triton_kernels"] if r["kernel"] in _CONV and "da_ptr" not in r["pointer_dtypes"]]

    def dot_dtype(r):  # the weight's dtype (forward, dgrad), dy's (wgrad): what tl.dot multiplies
        return r["pointer_dtypes"]["dy_ptr" if r["kernel"] == "bn_relu_conv_wgrad_kernel" else "w_ptr"]

    tensor_core = [r for r in conv if r["constexprs"]["PRECISION"] == "tf32" or dot_dtype(r) == "bf16"]
    assert {(r["kernel"], dot_dtype(r)) for r in tensor_core} == {(k, d) for k in _CONV for d in ("bf16", "fp32")}
    for r in tensor_core:
        assert r["hgmma"] + r["hmma"] > 0, (r["kernel"], r["constexprs"])
    exact = [r for r in conv if r["constexprs"]["PRECISION"] == "ieee" and dot_dtype(r) in ("fp32", "fp64")]
    assert {dot_dtype(r) for r in exact} == {"fp32", "fp64"}
    assert all(r["hgmma"] == 0 and r["hmma"] == 0 for r in exact)


# The extent each kernel's dense accesses run along: 16-byte vectors need it divisible by 16.
_EXTENT = {"add_relu_fwd_kernel": "n_elements", "add_relu_bwd_kernel": "n_elements",
           "batch_norm_relu_fwd_kernel": "COLS", "batch_norm_relu_bwd_dx_kernel": "COLS"}


def _dense(row: dict) -> bool:
    """Every tensor laid out as the output, along an extent Triton knows to be a multiple of 16."""
    flags = [v for k, v in row["constexprs"].items() if k.endswith("_DENSE")]
    return bool(flags) and all(flags) and _EXTENT[row["kernel"]] in row["divisible_by_16"]


@pytest.mark.parametrize("kernel", ["add_relu_fwd_kernel", "add_relu_bwd_kernel", "batch_norm_relu_fwd_kernel", "batch_norm_relu_bwd_dx_kernel"])
def test_dense_paths_move_128_bits_per_access(report, kernel):
    rows = [r for r in report["triton_kernels"] if r["kernel"] == kernel and _dense(r)]
    assert rows
    for r in rows:
        assert r["ldg128"] > 0 and r["stg128"] > 0, (r["constexprs"], r["ldg128"], r["stg128"])


def test_host_path_launch_counts(tmp_path):
    """Kernel launches per call of each fused op on the GPU path (recorded, not run)."""
    results = _run("benchmarks.host_overhead", "--repeat", "2", tmp_path=tmp_path)["results"]
    launches = {(r["op"], r["mode"]): r["fastres"]["launches"] for r in results}
    assert launches[("add_relu", "full")] == 2
    assert launches[("bn_add_relu train", "forward")] == 2  # statistics (finished by the last program), apply
    assert launches[("bn_add_relu train", "backward")] == 2  # reduction (finished likewise), dx and dr
    assert launches[("bn_relu eval", "forward")] == 1
    assert launches[("bn_relu_conv3x3 eval", "forward")] == 2  # the running statistics' rstd, the convolution


def test_speed_of_light_covers_every_launch(report):
    """Every launch of a kernel the model knows gets its estimate (``benchmarks/speed_of_light.py``):
    no parameter it reads was renamed or removed."""
    from fastres.benchmarks.speed_of_light import WORK

    for r in report["triton_kernels"]:
        assert r["speed_of_light"], r["kernel"]
        if r["kernel"] not in WORK:
            continue
        for s in r["speed_of_light"]:
            assert "error" not in s, (r["kernel"], s["error"])
            assert s["dram"] > 0 and s["h100"]["estimate"] > 0 and s["ctas_per_sm"] >= 1, (r["kernel"], s)


def _wide_conv_loops(report) -> list[dict]:
    """The bf16 convolutions on tensor cores with channels contiguous (x channels_last: ``xs_c`` specialised to 1)."""
    rows = [r for r in report["triton_kernels"] if r["kernel"] in _CONV and "da_ptr" not in r["pointer_dtypes"]
            and r["main"] == "loop" and r["pointer_dtypes"].get("x_ptr") == "bf16" and r["constexprs"].get("xs_c") == 1
            and r["constexprs"].get("PRECISION") == "ieee" and r["hgmma"] > 0]
    assert {r["kernel"] for r in rows} == set(_CONV)
    return rows


_KEEP = {"bn_relu_conv_fwd_kernel", "bn_relu_conv_wgrad_kernel"}  # load a row keep factor: one fp32 per row, masked per row


def test_no_scalar_loads_in_conv_main_loops(report):
    """With channels contiguous every convolution's main loop loads its tiles through 128-bit cp.async, for
    torchvision's default OIHW weights as for channels_last ones (the report compiles both): no global load
    narrower than 128 bits, and no narrower cp.async than the keep factor's 32-bit ones (at most 4 a thread)."""
    for r in _wide_conv_loops(report):
        assert not r["main_ldg_narrow"], (r["kernel"], r["constexprs"], r["main_ldg_narrow"])
        widths = dict(r["main_ldgsts"])
        if r["kernel"] in _KEEP:
            assert widths.pop("32", 0) <= 4, (r["kernel"], r["constexprs"], r["main_ldgsts"])
        assert set(widths) == {"128"}, (r["kernel"], r["constexprs"], r["main_ldgsts"])


def test_the_prologue_operand_takes_one_shared_memory_round_trip(report):
    """The BN-ReLU'd x tile goes cp.async -> shared -> registers (ldmatrix, the dot operand's layout) -> wgmma:
    no shared-memory store in the main loop of forward or wgrad, whose activation is the A operand."""
    for r in _wide_conv_loops(report):
        if r["kernel"] in _KEEP:
            assert r["main_sts"] == 0, (r["kernel"], r["constexprs"], r["main_lds"], r["main_sts"])
