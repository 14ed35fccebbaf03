"""Residual blocks in train mode: fastres.nn vs torchvision (eager) vs torch.compile.

All three run the same weights (the fused block loads the eager block's
state_dict). bfloat16 is run the way training runs it: fp32 parameters under
``torch.autocast``, with bf16 activations coming in from the previous block.
"""

import pytest
import torch

import fastres.nn
from fastres._torchvision import import_torchvision

from .common import DTYPES, LAYOUTS, autocast, memory_format
from .common import cudnn_benchmark  # noqa: F401 - an autouse fixture, active in this module

tv = import_torchvision()

# (block class, inplanes, planes, input H=W): ResNet-50 stage 1 and stage 4
# identity blocks, and a ResNet-18 stage-1 block.
BLOCKS = [("Bottleneck", 256, 64, 56), ("Bottleneck", 2048, 512, 7), ("BasicBlock", 64, 64, 56)]
BATCHES = [pytest.param(2, marks=pytest.mark.cpu_only), pytest.param(64, marks=pytest.mark.cuda_only)]
CASES = [(p, m) for p in ("fastres", "eager", "compile") for m in ("forward", "full")]


def make_block(provider, name, inplanes, planes, device, fmt, compile_once, key):
    torch.manual_seed(0)
    eager = getattr(tv.models.resnet, name)(inplanes, planes)
    if provider == "fastres":
        block = getattr(fastres.nn, name)(inplanes, planes)
        block.load_state_dict(eager.state_dict())
    else:
        block = eager
    block = block.to(device=device, memory_format=fmt).train()
    return compile_once(block, key) if provider == "compile" else block


# The top decorator varies fastest: the cases of one shape group run together
# and share one torch.compile cache.
@pytest.mark.parametrize("provider, mode", CASES, ids=[f"{p}-{m}" for p, m in CASES])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}-{b[1]}-{b[2]}-{b[3]}x{b[3]}")
@pytest.mark.parametrize("batch", BATCHES, ids=lambda n: f"N{n}")
def test_block(bench, compile_once, device, batch, block, dtype, layout, provider, mode):
    name, inplanes, planes, hw = block
    shape = (batch, inplanes, hw, hw)
    fmt = memory_format(layout)
    torch_dtype = getattr(torch, dtype)
    module = make_block(
        provider, name, inplanes, planes, device, fmt, compile_once,
        key=(name, shape, dtype, layout),
    )

    # The block sits inside a network: its input needs a gradient too.
    x = torch.randn(shape, dtype=torch_dtype, device=device).contiguous(memory_format=fmt)
    x.requires_grad_()
    dy = torch.randn_like(x)  # these blocks keep the input's shape

    # forward: one training forward (the graph is built, then dropped), so its
    # peak memory includes the activations saved for backward.
    def forward():
        with autocast(device, torch_dtype):
            return module(x)

    def full():
        forward().backward(dy)

    def zero_grad():
        module.zero_grad(set_to_none=True)
        x.grad = None
        return ()

    bench(
        forward if mode == "forward" else full, None if mode == "forward" else zero_grad,
        op=name, provider=provider, mode=mode, shape=shape, dtype=torch_dtype, layout=layout,
    )
