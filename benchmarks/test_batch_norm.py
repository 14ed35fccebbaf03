"""Batch norm + ReLU in training mode: fastres vs eager vs torch.compile.

``bn_relu`` is ``relu(batch_norm(x))``, after a block's inner convolutions;
``bn_add_relu`` is ``relu(batch_norm(x) + residual)``, the end of a block.
Training mode: batch statistics, running statistics updated in place. As
``BatchNorm2d`` under autocast, the weight, bias and running statistics stay
float32 whatever the activations' dtype.
"""

import pytest
import torch
import torch.nn.functional as F

from fastres.functional import batch_norm_relu

from .common import DTYPES, LAYOUTS, memory_format

# (C, H=W) of ResNet-50's batch norms: each stage's inner width and its output width.
RESNET50 = [(64, 56), (256, 56), (128, 28), (512, 28), (256, 14), (1024, 14), (512, 7), (2048, 7)]
# Batch 256 keeps the stage outputs (and the narrowest layer): C 64 to 2048, 56x56 to 7x7.
RESNET50_N256 = [(64, 56), (256, 56), (512, 28), (1024, 14), (2048, 7)]
SHAPES = [
    pytest.param((2, 8, 7, 7), marks=pytest.mark.cpu_only),  # CPU smoke size
    *(pytest.param((64, c, hw, hw), marks=pytest.mark.cuda_only) for c, hw in RESNET50),
    *(pytest.param((256, c, hw, hw), marks=pytest.mark.cuda_only) for c, hw in RESNET50_N256),
]
CASES = [(p, m) for p in ("fastres", "eager", "compile") for m in ("forward", "backward", "full")]

# Algorithmic bytes, in passes over a tensor of x's size, as the fused kernels
# move them. Forward: read x (statistics), then read x (+ residual) and write
# the output (apply). Backward: read dz and x (per-channel sums), then read dz
# and x again and write dx (+ dresidual). Left out: the per-channel vectors and
# fastres's 1-bit ReLU mask (numel/8 bytes). Every provider is counted alike.
PASSES = {"forward": 3, "backward": 5, "full": 8}
RESIDUAL_PASSES = {"forward": 1, "backward": 1, "full": 2}


def eager_bn_relu(x, running_mean, running_var, weight, bias, residual):
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training=True)
    return torch.relu(y if residual is None else y + residual)


def fastres_bn_relu(x, running_mean, running_var, weight, bias, residual):
    return batch_norm_relu(x, running_mean, running_var, weight, bias, training=True, residual=residual)


# The top decorator varies fastest: the cases of one shape group run together
# and share one torch.compile cache.
@pytest.mark.parametrize("provider, mode", CASES, ids=[f"{p}-{m}" for p, m in CASES])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["bn_relu", "bn_add_relu"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-{'x'.join(map(str, s[1:]))}")
def test_batch_norm(bench, compile_once, device, shape, op, dtype, layout, provider, mode):
    fmt = memory_format(layout)

    def new():
        t = torch.randn(shape, dtype=getattr(torch, dtype), device=device)
        return t.contiguous(memory_format=fmt)

    channels = shape[1]
    x = new()
    residual = new() if op == "bn_add_relu" else None
    weight = torch.rand(channels, device=device) + 0.5
    bias = torch.randn(channels, device=device)
    running_mean = torch.zeros(channels, device=device)
    running_var = torch.ones(channels, device=device)

    if provider == "compile":
        fn_op = compile_once(eager_bn_relu, key=(op, shape, dtype, layout))
    else:
        fn_op = fastres_bn_relu if provider == "fastres" else eager_bn_relu
    call = lambda: fn_op(x, running_mean, running_var, weight, bias, residual)  # noqa: E731

    setup = None
    if mode == "forward":
        fn = call
    else:
        inputs = [t.requires_grad_() for t in (x, weight, bias, residual) if t is not None]
        dz = new()
        grads = lambda z: torch.autograd.grad(z, inputs, dz)  # noqa: E731
        if mode == "backward":
            setup = lambda: (call(),)  # noqa: E731 - a fresh graph each round
            fn = grads
        else:
            fn = lambda: grads(call())  # noqa: E731

    passes = PASSES[mode] + (RESIDUAL_PASSES[mode] if residual is not None else 0)
    bench(
        fn, setup, op=op, provider=provider, mode=mode, shape=shape, dtype=x.dtype, layout=layout,
        nbytes=passes * x.numel() * x.element_size(),
    )
