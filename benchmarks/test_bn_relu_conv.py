"""BN-ReLU-Conv2d in training mode: fastres vs eager (cuDNN) vs torch.compile.

``fastres.functional.bn_relu_conv2d`` is ``conv2d(relu(batch_norm(x)))``, the
pre-activation of DenseNet layers and pre-activation ResNets, with BN and ReLU
applied while the convolution loads x: ``relu(batch_norm(x))`` is never
written, forward or backward. Training mode: batch statistics, running
statistics updated in place. As ``BatchNorm2d`` under autocast, the BN weight,
bias and running statistics stay float32 whatever x's dtype; the convolution's
weight has x's dtype (outside autocast ``F.conv2d`` takes no other) and x's
layout (a model moved to channels_last moves its weights too), and no bias
(none of these networks' convolutions has one). float32 convolutions use TF32
in every provider exactly when ``torch.backends.cudnn.allow_tf32`` is set (on
by default), the flag fastres's kernels follow as cuDNN does.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from fastres.functional import bn_relu_conv2d

from .common import DTYPES, LAYOUTS, memory_format
from .common import cudnn_benchmark  # noqa: F401 - an autouse fixture, active in this module


def conv(model, batch, c_in, hw, c_out, kernel, stride=1, mark=pytest.mark.cuda_only):
    """One convolution: x is (batch, c_in, hw, hw), ``padding = kernel // 2`` (1x1: 0, 3x3: 1)."""
    case = (batch, c_in, hw, c_out, kernel, stride)
    s = f"s{stride}" if stride != 1 else ""
    return pytest.param(case, marks=mark, id=f"N{batch}-{model}-{kernel}x{kernel}{s}-{c_in}x{hw}x{hw}-{c_out}")


SHAPES = [
    # CPU smoke size: both kernel sizes.
    conv("smoke", 2, 8, 7, 8, 1, mark=pytest.mark.cpu_only),
    conv("smoke", 2, 8, 7, 8, 3, mark=pytest.mark.cpu_only),
    # DenseNet-121 (growth 32, bottleneck 4 * 32 = 128): each layer's 1x1 C_in -> 128 over the
    # concatenated features (block 1 at 56x56: C_in 64..256; block 2 at 28x28: 128..512;
    # block 3 at 14x14: 256..1024; block 4 at 7x7: 512..1024), and its 3x3 128 -> 32 at each
    # block's size.
    *(conv("densenet121", 64, c, hw, 128, 1) for c, hw in
      [(128, 56), (256, 56), (256, 28), (512, 28), (512, 14), (1024, 14), (1024, 7)]),
    *(conv("densenet121", 64, 128, hw, 32, 3) for hw in (56, 28, 14, 7)),
    # Pre-activation ResNet-50 bottlenecks: stage 1's 1x1 256 -> 64 and 3x3 64 -> 64 at 56x56;
    # stage 2's strided 3x3 128 -> 128 (56x56 -> 28x28) and its downsample, a strided 1x1
    # 256 -> 512 on the pre-activated block input; stage 3's 1x1 1024 -> 256 and 3x3 256 -> 256
    # at 14x14.
    conv("resnet50", 64, 256, 56, 64, 1),
    conv("resnet50", 64, 64, 56, 64, 3),
    conv("resnet50", 64, 128, 56, 128, 3, stride=2),
    conv("resnet50", 64, 256, 56, 512, 1, stride=2),
    conv("resnet50", 64, 1024, 14, 256, 1),
    conv("resnet50", 64, 256, 14, 256, 3),
]
CASES = [(p, m) for p in ("fastres", "eager", "compile") for m in ("forward", "backward", "full")]

# Algorithmic bytes, as the fused kernels move them (X, Y, W: the bytes of x, of y (= dy)
# and of the convolution's weight). Forward: read x (statistics), read x and the weight,
# write y: 2X + W + Y. Backward: dgrad reads dy, the weight and x (ReLU mask, BN sums) and
# writes g (X); the elementwise BN backward reads g and x and writes dx; wgrad reads dy and
# x and writes the weight's gradient: 6X + 2W + 2Y. Full: both. Left out: the per-channel
# vectors and scratch (split-K partial sums); the re-reads of x tiles an implicit GEMM does
# (once per output-channel tile, and per tap for 3x3) and that caches serve; and what eager
# moves besides: relu(batch_norm(x)) written and read back (forward, and again in backward
# for wgrad and the ReLU and BN backward), da and the BN output's gradient. Every provider
# is counted alike.
X_PASSES = {"forward": 2, "backward": 6, "full": 8}
W_PASSES = {"forward": 1, "backward": 2, "full": 3}
Y_PASSES = {"forward": 1, "backward": 2, "full": 3}
# Convolution FLOPs, in forwards (2 * N * OH * OW * C_out * C_in * KH * KW each): backward
# is dgrad and wgrad, each a forward's worth. BN and ReLU are not counted.
FLOP_PASSES = {"forward": 1, "backward": 2, "full": 3}


def eager_bn_relu_conv(x, running_mean, running_var, weight, bias, conv_weight, stride, padding):
    a = F.relu(F.batch_norm(x, running_mean, running_var, weight, bias, training=True))
    return F.conv2d(a, conv_weight, None, stride, padding)


def fastres_bn_relu_conv(x, running_mean, running_var, weight, bias, conv_weight, stride, padding):
    return bn_relu_conv2d(x, running_mean, running_var, weight, bias, conv_weight, None, stride, padding,
                          training=True)


# The top decorator varies fastest: the cases of one shape group run together
# and share one torch.compile cache.
@pytest.mark.parametrize("provider, mode", CASES, ids=[f"{p}-{m}" for p, m in CASES])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SHAPES)
def test_bn_relu_conv(bench, benchmark, compile_once, device, case, dtype, layout, provider, mode):
    batch, c_in, hw, c_out, kernel, stride = case
    padding = kernel // 2
    shape = (batch, c_in, hw, hw)
    out_hw = (hw + 2 * padding - kernel) // stride + 1
    out_shape = (batch, c_out, out_hw, out_hw)
    fmt = memory_format(layout)
    torch_dtype = getattr(torch, dtype)

    def new(size, scale=1.0):
        t = torch.randn(size, dtype=torch_dtype, device=device) * scale
        return t.contiguous(memory_format=fmt)

    x = new(shape)
    weight = torch.rand(c_in, device=device) + 0.5
    bias = torch.randn(c_in, device=device)
    running_mean = torch.zeros(c_in, device=device)
    running_var = torch.ones(c_in, device=device)
    conv_weight = new((c_out, c_in, kernel, kernel), scale=1 / math.sqrt(c_in * kernel * kernel))

    op = f"bn_relu_conv{kernel}x{kernel}" + (f"s{stride}" if stride != 1 else "")
    if provider == "compile":
        fn_op = compile_once(eager_bn_relu_conv, key=(case, dtype, layout))
    else:
        fn_op = fastres_bn_relu_conv if provider == "fastres" else eager_bn_relu_conv
    call = lambda: fn_op(x, running_mean, running_var, weight, bias, conv_weight, stride, padding)  # noqa: E731

    setup = None
    if mode == "forward":
        fn = call
    else:
        inputs = [t.requires_grad_() for t in (x, weight, bias, conv_weight)]
        dy = new(out_shape)
        grads = lambda y: torch.autograd.grad(y, inputs, dy)  # noqa: E731
        if mode == "backward":
            setup = lambda: (call(),)  # noqa: E731 - a fresh graph each round
            fn = grads
        else:
            fn = lambda: grads(call())  # noqa: E731

    x_bytes = x.numel() * x.element_size()
    y_bytes = math.prod(out_shape) * x.element_size()
    w_bytes = conv_weight.numel() * conv_weight.element_size()
    nbytes = X_PASSES[mode] * x_bytes + W_PASSES[mode] * w_bytes + Y_PASSES[mode] * y_bytes
    flops = FLOP_PASSES[mode] * 2 * batch * out_hw * out_hw * c_out * c_in * kernel * kernel
    from fastres.kernels import tuning

    tuning.LAST.clear()
    bench(
        fn, setup, op=op, provider=provider, mode=mode,
        # bench joins the shape's items with "x": one label, x's shape -> C_out.
        shape=(f"{batch}x{c_in}x{hw}x{hw}->{c_out}",), dtype=x.dtype, layout=layout, nbytes=nbytes,
    )
    benchmark.extra_info["flops"] = flops
    if torch_dtype == torch.float32:
        benchmark.extra_info["tf32"] = device.type == "cuda" and torch.backends.cudnn.allow_tf32
    if not benchmark.disabled:
        benchmark.extra_info["tflops"] = flops / benchmark.stats.stats.median / 1e12
    if provider == "fastres":  # which candidate the tuner took for each launch: a tile config, or "unfused"
        kinds = ("forward",) if mode == "forward" else ("forward", "dgrad", "wgrad")
        benchmark.extra_info["chosen"] = {k: list(tuning.LAST[k]) for k in kinds if k in tuning.LAST}
