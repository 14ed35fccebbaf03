"""torch.compile runs over the fused ops and blocks without graph breaks."""

import pytest
import torch

import fastres
from fastres.functional import add_relu
from helpers import assert_modules_match, twin


def _merge_twice(x, r, w):
    y = add_relu(x * w, r, inplace=True)
    return add_relu(y, r)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_add_relu_compiles_without_graph_breaks(path, device, backend):
    torch._dynamo.reset()
    x = torch.randn(2, 3, 6, 6, device=device, requires_grad=True)
    r = torch.randn(2, 3, 6, 6, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(1, device=device, requires_grad=True)
    explanation = torch._dynamo.explain(_merge_twice)(x, r, w)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1

    compiled = torch.compile(_merge_twice, backend=backend, fullgraph=True)
    out = compiled(x, r, w)
    grads = torch.autograd.grad(out, (x, r, w), torch.ones_like(out))
    ref = _merge_twice(x, r, w)
    ref_grads = torch.autograd.grad(ref, (x, r, w), torch.ones_like(ref))
    torch.testing.assert_close(out, ref)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg)


def test_compiled_block_matches_eager_block(path, device, tv):
    torch._dynamo.reset()
    eager = tv.models.resnet.Bottleneck(16, 4).to(device)
    fused = twin(eager, fastres.nn.Bottleneck(16, 4)).to(device)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 16, 5, 5, device=device)
    grad = torch.randn(2, 16, 5, 5, device=device)
    compiled(x).backward(grad)
    eager(x).backward(grad)
    assert_modules_match(fused, eager)
