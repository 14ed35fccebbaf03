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
    assert_modules_match(fused, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_batch_norm_relu_compiles_without_graph_breaks(path, device, backend):
    """Running statistics are mutated inside the op: functionalization must keep the update."""
    torch._dynamo.reset()
    from fastres.functional import batch_norm_relu

    def fn(x, rm, rv, w, b, r):
        return batch_norm_relu(x, rm, rv, w, b, True, 0.1, 1e-5, r)

    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    x = torch.randn(2, 3, 5, 5, device=device, requires_grad=True)
    r = torch.randn(2, 3, 5, 5, device=device)
    w = torch.rand(3, device=device, requires_grad=True)
    b = torch.randn(3, device=device, requires_grad=True)
    stats = [(torch.zeros(3, device=device), torch.ones(3, device=device)) for _ in range(2)]
    out = compiled(x, *stats[0], w, b, r)
    ref = fn(x, *stats[1], w, b, r)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(stats[0], stats[1])
    grads = torch.autograd.grad(out.sum(), (x, w, b))
    ref_grads = torch.autograd.grad(ref.sum(), (x, w, b))
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg)
