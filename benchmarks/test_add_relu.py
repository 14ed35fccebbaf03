"""Residual merge ``relu(x + identity)``: fastres vs eager vs torch.compile.

Shapes are ResNet-50's residual merges (the output of each stage). A ``copy``
of one tensor of the same size gives the device's copy bandwidth, the reference
for the GB/s column: a memory-bound op cannot beat it per byte moved.
"""

import pytest
import torch

import fastres.functional as F

from .common import DTYPES, LAYOUTS, memory_format

STAGES = [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
# Batch 2 is the CPU smoke size; 64 and 256 are training sizes for a GPU.
BATCHES = [
    pytest.param(2, marks=pytest.mark.cpu_only),
    pytest.param(64, marks=pytest.mark.cuda_only),
    pytest.param(256, marks=pytest.mark.cuda_only),
]
CASES = [(p, m) for p in ("fastres", "eager", "compile") for m in ("forward", "backward", "full")]
CASES.append(("copy", "copy"))

# Algorithmic bytes, in tensor passes. Forward: read x, read identity, write
# out. Backward: read dz, write one gradient (the same tensor serves x and
# identity). fastres also writes (forward) and reads (backward) its 1-bit mask,
# numel/8 bytes; it is left out so that every provider is counted alike.
PASSES = {"forward": 3, "backward": 2, "full": 5, "copy": 2}


def eager_add_relu(x, identity):
    return torch.relu(x + identity)


def fastres_add_relu(x, identity):
    return F.add_relu(x, identity, inplace=False)


# The top decorator varies fastest: the cases of one shape group run together
# and share one torch.compile cache.
@pytest.mark.parametrize("provider, mode", CASES, ids=[f"{p}-{m}" if p != m else p for p, m in CASES])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chw", STAGES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("batch", BATCHES, ids=lambda n: f"N{n}")
def test_add_relu(bench, compile_once, device, batch, chw, dtype, layout, provider, mode):
    shape = (batch, *chw)
    fmt = memory_format(layout)

    def new():
        t = torch.randn(shape, dtype=getattr(torch, dtype), device=device)
        return t.contiguous(memory_format=fmt)

    x, identity = new(), new()
    setup = None
    if provider == "copy":
        dst = torch.empty_like(x)
        fn = lambda: dst.copy_(x)  # noqa: E731
    else:
        if provider == "compile":
            op = compile_once(eager_add_relu, key=(shape, dtype, layout))
        else:
            op = fastres_add_relu if provider == "fastres" else eager_add_relu
        if mode == "forward":
            fn = lambda: op(x, identity)  # noqa: E731
        else:
            x.requires_grad_()
            identity.requires_grad_()
            dz = new()
            grads = lambda z: torch.autograd.grad(z, (x, identity), dz)  # noqa: E731
            if mode == "backward":
                setup = lambda: (op(x, identity),)  # noqa: E731 - a fresh graph each round
                fn = grads
            else:
                fn = lambda: grads(op(x, identity))  # noqa: E731

    bench(
        fn, setup, op="add_relu", provider=provider, mode=mode, shape=shape, dtype=x.dtype,
        layout=layout, nbytes=PASSES[mode] * x.numel() * x.element_size(),
    )
