"""The kernel report's speed-of-light model (``benchmarks/speed_of_light.py``) on hand-computed launches.

Pure arithmetic on recorded launch arguments: nothing is compiled or run.
"""

import pytest
import torch

from fastres.benchmarks import speed_of_light as sol
from fastres.benchmarks.stub_gpu import TensorArg

BF16, FP32 = torch.bfloat16, torch.float32


def _cl(n, c, h, w, dtype=BF16):
    """A channels_last tensor argument as the launch recorder keeps it."""
    return TensorArg((n, c, h, w), (h * w * c, 1, w * c, c), dtype)


def _vector(n, dtype=FP32):
    return TensorArg((n,), (1,), dtype)


def _forward_args(n, c, hw, co, k, stride, bm, bn, bk):
    oh = (hw + 2 * (k // 2) - k) // stride + 1
    x, w, y = _cl(n, c, hw, hw), _cl(co, c, k, k), _cl(n, co, oh, oh)
    return {
        "x_ptr": x, "stats_ptr": _vector(2 * c + 1), "bnw_ptr": _vector(c), "bnb_ptr": _vector(c),
        "w_ptr": w, "bias_ptr": None, "y_ptr": y, "N": n, "C": c, "H": hw, "W": hw, "CO": co, "OH": oh, "OW": oh,
        **{f"xs_{d}": s for d, s in zip("nchw", x.stride)}, **{f"ws_{d}": s for d, s in zip("ochw", w.stride)},
        **{f"ys_{d}": s for d, s in zip("nchw", y.stride)},
        "KH": k, "KW": k, "SH": stride, "SW": stride, "PH": k // 2, "PW": k // 2, "ACC": "fp32",
        "PRECISION": "ieee", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
    }


def test_ctas_per_sm():
    # 180 registers: 5760 per warp, allocated as 5888 (23 units of 256); 2 warps per sub-partition = 8 a SM.
    assert sol.ctas_per_sm(180, 8, 98304) == (1, "regs")
    assert sol.ctas_per_sm(255, 4, 0) == (2, "regs")  # 8192 per warp: 2 per sub-partition
    assert sol.ctas_per_sm(128, 8, 131072) == (1, "smem")  # 132096 B with the reserve: 1 in 228 KB
    assert sol.ctas_per_sm(24, 4, 0) == (16, "warps")  # registers would allow 21
    assert sol.ctas_per_sm(16, 1, 0) == (32, "CTAs")


def test_1x1_forward_is_dram_bound_and_misses_the_target_on_a_partial_wave():
    """DenseNet-like 1x1, 64x256x14x14 -> 128 in bf16, tiles 128x128x64: 98 programs, one CTA per SM."""
    args = _forward_args(64, 256, 14, 128, 1, 1, 128, 128, 64)
    e = sol.estimate("bn_relu_conv_fwd_kernel", args, (98, 1, 1), regs=180, warps=8, smem=98304)
    m = 64 * 14 * 14
    dram = 64 * 256 * 196 * 2 + 128 * 256 * 2 + m * 128 * 2 + (513 + 2 * 256) * 4
    assert e["dram"] == dram == 9_703_428
    assert e["flops"] == e["mma_flops"] == 2 * m * 128 * 256 == 822_083_584
    # A and B tiles written and read once (2 x 32 KB), plus the prologue's A tile once more (32 KB); 4 K steps.
    assert e["smem_step"] == 98304 and e["smem"] == 98304 * 4 * 98
    assert (e["kind"], e["dot"], e["ctas_per_sm"], e["waves"]) == ("1x1", "bf16", 1, 1)
    fill = 98 / 132
    assert e["wave_fill"] == pytest.approx(fill)
    assert e["h100"]["estimate"] == pytest.approx(dram / 3.35e12 / fill)
    assert e["t_mma"] == pytest.approx(822_083_584 / 990e12 / fill)
    for chip in ("h100", "h200"):
        assert e[chip]["bound"] == "DRAM"
        assert e[chip]["share"] == pytest.approx(fill)  # 74%: under the 80% target
        assert e[chip]["met"] is False
    assert sol.estimate("bn_relu_conv_fwd_kernel", args, (98, 1, 1), 180, 8, 98304, round_trip=False)["smem_step"] == 65536


def test_3x3_forward_is_shared_memory_bound():
    """64x128x28x28 -> 128, 3x3 stride 1, bf16, tiles 128x128x64 with 8 warps and 128 KB of shared memory."""
    args = _forward_args(64, 128, 28, 128, 3, 1, 128, 128, 64)
    e = sol.estimate("bn_relu_conv_fwd_kernel", args, (392, 1, 1), regs=128, warps=8, smem=131072)
    flops = 2 * (64 * 28 * 28) * 128 * (128 * 9)
    assert e["flops"] == e["mma_flops"] == flops == 14_797_504_512
    assert e["dram"] == 2 * 64 * 128 * 784 * 2 + 128 * 1152 * 2 + (257 + 256) * 4
    steps = 9 * 2
    assert e["smem"] == 98304 * steps * 392
    assert (e["kind"], e["ctas_per_sm"], e["occupancy_limit"], e["waves"]) == ("3x3", 1, "smem", 3)
    fill = 392 / 396
    t_smem = 98304 * steps * 392 / (128 * 1.98e9 * 132) / fill
    assert e["t_smem"] == pytest.approx(t_smem)
    for chip in ("h100", "h200"):
        assert e[chip]["bound"] == "smem"
        assert e[chip]["estimate"] == pytest.approx(t_smem)
        assert e[chip]["share"] == pytest.approx(flops / 990e12 / t_smem)  # 71% of bf16 peak
        assert e[chip]["met"] is True
    assert e["target"] == 0.6


def test_a_densenet_3x3_forward_is_bound_by_its_prologue_instructions():
    """64x128x28x28 -> 32 (a DenseNet layer's 3x3), tiles 64x32x64, 4 warps: each K step issues the
    BN-ReLU of a 64x64 A tile for only 32 output channels. 490 instructions a warp and step (as the
    SASS of the fused forward has) outweigh the MMA and the shared-memory traffic."""
    args = _forward_args(64, 128, 28, 32, 3, 1, 64, 32, 64)
    programs = 64 * 28 * 28 // 64  # 784
    e = sol.estimate("bn_relu_conv_fwd_kernel", args, (programs, 1, 1), regs=255, warps=4, smem=40960, round_trip=False,
                     instructions=490)
    steps = 9 * 2
    assert e["iterations"] == steps * programs
    assert e["ctas_per_sm"] == 2
    fill = programs / (3 * 2 * 132)  # 3 waves of 264 CTAs
    t_issue = 490 * 4 * steps * programs / (4 * 1.98e9 * 132) / fill
    assert e["t_issue"] == pytest.approx(t_issue)
    assert e["t_issue"] > max(e["t_mma"], e["t_smem"], e["h100"]["t_dram"])
    flops = 2 * (64 * 784) * 32 * 1152
    for chip in ("h100", "h200"):
        assert e[chip]["bound"] == "issue"
        assert e[chip]["share"] == pytest.approx(flops / 990e12 / t_issue)
        assert e[chip]["met"] is False
    # Without the instruction count the same launch is bound by its shared-memory tiles (24 KB a step).
    assert e["smem_step"] == 2 * (64 * 64 * 2 + 64 * 32 * 2)
    assert sol.estimate("bn_relu_conv_fwd_kernel", args, (programs, 1, 1), 255, 4, 40960, round_trip=False)["h100"]["bound"] \
        == "smem"


def test_strided_dgrad_runs_only_the_taps_that_reach_each_phase():
    """3x3 stride 2: the four phases run 1, 2, 2 and 4 taps (9 in all); a 1x1 stride 2 runs one phase of four."""
    n, c, hw, co = 2, 64, 14, 64
    for k, taps in ((3, 9), (1, 1)):
        f = _forward_args(n, c, hw, co, k, 2, 64, 64, 64)
        args = {**f, "dy_ptr": f["y_ptr"], "da_ptr": None, "g_ptr": f["x_ptr"], "partial_ptr": None, "sums_ptr": None,
                "dbnw_ptr": None, "dbnb_ptr": None, "HP": 7, "WP": 7,
                **{f"dys_{d}": f[f"ys_{d}"] for d in "nchw"}, **{f"gs_{d}": f[f"xs_{d}"] for d in "nchw"}}
        e = sol.estimate("bn_relu_conv_dgrad_kernel", args, (2, 1, 4), regs=168, warps=4, smem=49152)
        assert e["flops"] == 2 * (n * 7 * 7) * co * c * k * k  # the forward's FLOPs
        assert e["mma_flops"] == 2 * 64 * 64 * 64 * taps * 2  # 2 row blocks, one K block per tap
        # dy and x read, weight read, g written: x and g whole even where no tap reaches (a 1x1's odd phases).
        assert e["dram"] == (n * co * 49 + co * c * k * k + 2 * n * c * 196) * 2 + (129 + 128) * 4
    # The unfused candidate's epilogue alone, on torch's da: da and x read, g written, no MMA.
    e = sol.estimate("bn_relu_conv_dgrad_kernel", {**args, "da_ptr": f["x_ptr"]}, (7, 1, 1), regs=96, warps=4, smem=0)
    assert (e["kind"], e["flops"], e["mma_flops"], e["dram"]) == ("memory", 0, 0, 3 * n * c * 196 * 2 + 257 * 4)


def test_strided_1x1_reads_only_the_pixels_it_uses():
    """channels_last x at stride 2: a 1x1 reads every other row and column, a 3x3 (padding 1) all of x."""
    for k, share in ((1, 4), (3, 1)):
        args = _forward_args(2, 64, 14, 64, k, 2, 64, 64, 64)
        e = sol.estimate("bn_relu_conv_fwd_kernel", args, (2, 1, 1), regs=128, warps=4, smem=49152)
        assert e["dram"] == (2 * 64 * 196 // share + 64 * 64 * k * k + 2 * 64 * 49) * 2 + (129 + 128) * 4


def test_memory_kernels_only_count_dram():
    e = sol.estimate("add_relu_fwd_kernel", {"x_ptr": _vector(1 << 20, BF16), "r_ptr": _vector(1 << 20, BF16),
                                             "z_ptr": _vector(1 << 20, BF16), "mask_ptr": _vector(1 << 17, torch.uint8),
                                             "n_elements": 1 << 20}, (512, 1, 1), regs=32, warps=8, smem=0)
    assert e["dram"] == 3 * 2 * (1 << 20) + (1 << 17)
    assert (e["kind"], e["flops"], e["smem"], e["ctas_per_sm"], e["waves"]) == ("memory", 0, 0, 8, 1)
    assert e["h200"]["share"] == pytest.approx(512 / (8 * 132)) and e["h200"]["met"] is False
    assert sol.estimate("batch_norm_combine_kernel", {}, (1, 1, 1), 32, 4, 0) is None  # not modelled
