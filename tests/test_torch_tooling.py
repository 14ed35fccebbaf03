"""Wherever torchvision's model works, fastres's works: torch.compile, torch.export, torch.jit.trace,
torch.func, double backward, half precision on CPU; and torch.jit.script fails with one clear error.

Models are small (torchvision's own classes at small sizes) so that each tool's
whole path runs in seconds; both fastres paths (Triton kernels through the
interpreter, and the CPU reference) run every case.
"""

import io

import pytest
import torch
from torch.func import functional_call, grad

import fastres
from fastres.functional import BatchNormArgs, bn_relu_conv1x1, bn_relu_max_pool2d
from helpers import (
    assert_as_accurate_as_eager, assert_modules_normwise_close, assert_normwise_close, assert_steps_like, twin,
)


def _tv_densenet(tv, **kwargs):
    return tv.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, **kwargs)


def _fr_densenet(**kwargs):
    return fastres.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, **kwargs)


def _tv_resnet(tv):
    return tv.models.ResNet(tv.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)


def _timm_resnetv2(tv):
    """timm's pre-activation ResNetV2, BatchNorm variant, small (timm imports torchvision: after ``tv``)."""
    from timm.layers import BatchNormAct2d, create_conv2d
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2([1, 1], channels=(8, 16), stem_chs=8, basic=True, bottle_ratio=1.0, num_classes=10,
                    norm_layer=BatchNormAct2d, conv_layer=create_conv2d)


def _fr_resnetv2():
    return fastres.models.ResNetV2([1, 1], channels=(8, 16), stem_chs=8, basic=True, bottle_ratio=1.0, num_classes=10)


# name -> (the eager reference model, the fastres model to compare with it: a builder or convert() of the same)
MODELS = {
    "densenet": lambda tv: (_tv_densenet(tv), _fr_densenet()),
    "convert(densenet)": lambda tv: (_tv_densenet(tv), fastres.convert(_tv_densenet(tv))),
    "resnet": lambda tv: (_tv_resnet(tv), fastres.models.ResNet(fastres.nn.BasicBlock, [1, 1, 1, 1], num_classes=10)),
    "convert(resnet)": lambda tv: (_tv_resnet(tv), fastres.convert(_tv_resnet(tv))),
    "resnetv2": lambda tv: (_timm_resnetv2(tv), _fr_resnetv2()),
    "convert(resnetv2)": lambda tv: (_timm_resnetv2(tv), fastres.convert(_timm_resnetv2(tv))),
}


def _pair(tv, name, training=True, dtype=torch.float32):
    """(torchvision's, fastres's) with the same weights, in ``training`` mode and ``dtype``."""
    torch.manual_seed(0)
    eager, fused = MODELS[name](tv)
    eager = eager.train(training).to(dtype)
    return eager, twin(eager, fused.to(dtype))


def _input(dtype=torch.float32, batch=2):
    return torch.randn(batch, 3, 16, 16, dtype=dtype, generator=torch.Generator().manual_seed(1))


def _fastres_ops(explanation) -> set[str]:
    """The fastres custom ops in the traced graphs (autograd Functions' bodies included)."""
    return {str(node.target) for graph in explanation.graphs for module in graph.modules()
            if isinstance(module, torch.fx.GraphModule) for node in module.graph.nodes
            if node.op == "call_function" and str(node.target).startswith("fastres.")}


# The custom op each model's graph must hold, per path: the dense block's own op (fused kernels on the GPU
# paths, fastres._C's shared-storage ops on CPU), the BN-ReLU-Conv's, the residual merge's.
GRAPH_OPS = {"densenet": {"triton": "fastres.fused_dense_block_forward", "reference": "fastres.dense_bn_relu_forward"},
             "resnet": {"triton": "fastres.batch_norm_relu", "reference": None},
             "resnetv2": {"triton": "fastres.bn_relu_conv2d", "reference": None}}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(MODELS))
def test_no_graph_breaks(path, tv, name, training):
    torch._dynamo.reset()
    _, fused = _pair(tv, name, training)
    explanation = torch._dynamo.explain(fused)(_input())
    assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]
    assert explanation.graph_count == 1
    expected = GRAPH_OPS.get(name.removeprefix("convert(").removesuffix(")"), {}).get(path)
    if expected:
        assert expected in _fastres_ops(explanation)


@pytest.mark.parametrize("name", ["densenet", "resnet"])
def test_no_graph_breaks_without_gradients(path, tv, name):
    """Inference: under no_grad, and with every parameter frozen."""
    _, fused = _pair(tv, name, training=False)
    torch._dynamo.reset()
    with torch.no_grad():
        assert torch._dynamo.explain(fused)(_input()).graph_break_count == 0
    fused.train().requires_grad_(False)
    torch._dynamo.reset()
    assert torch._dynamo.explain(fused)(_input()).graph_break_count == 0


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["densenet", "convert(resnet)", "resnetv2"])
def test_compiled_model_trains_like_eager(path, tv, name, training):
    """fullgraph=True; outputs, every gradient and BatchNorm buffer as eager torchvision's, float64."""
    torch._dynamo.reset()
    eager, fused = _pair(tv, name, training, dtype=torch.float64)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    assert_steps_like(compiled, fused, eager, [_input(torch.float64)])


@pytest.mark.parametrize("name", list(MODELS))
def test_export_in_eval(path, tv, name):
    eager, fused = _pair(tv, name, training=False)
    x = _input()
    program = torch.export.export(fused, (x,))
    torch.testing.assert_close(program.module()(x), eager(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["densenet", "resnet"])
def test_jit_trace_records_eager_ops(path, tv, name, training):
    """The trace holds ATen ops only: it runs, saves and loads like torchvision's."""
    eager, fused = _pair(tv, name, training, torch.float64)
    x = _input(torch.float64)
    traced = torch.jit.trace(fused, (x,), check_trace=False)  # one training forward: buffers updated once
    eager(x)
    assert not [n for n in traced.inlined_graph.nodes() if n.kind() == "prim::PythonOp"]
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)  # its own copy of the buffers
    assert_normwise_close(loaded(x), eager(x), "out")
    for (name, a), (_, b) in zip(loaded.named_buffers(), eager.named_buffers()):
        if name.endswith("num_batches_tracked"):
            assert torch.equal(a, b), name
        else:
            assert_normwise_close(a, b, name)


@pytest.mark.parametrize("name", ["densenet", "resnet", "convert(resnet)"])
def test_jit_script_says_what_to_use(tv, name):
    _, fused = _pair(tv, name)
    with pytest.raises(RuntimeError, match="torch.jit.script cannot compile.*torch.compile or torch.export"):
        torch.jit.script(fused)


@pytest.mark.parametrize("name", ["densenet", "resnet"])
def test_func_grad(path, tv, name):
    """torch.func.grad over parameters and buffers, as users of functional_call write it."""
    eager, fused = _pair(tv, name, dtype=torch.float64)
    x = _input(torch.float64)

    def grads(model):
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = {k: v.clone() for k, v in model.named_buffers()}
        return grad(lambda p, b: functional_call(model, {**p, **b}, (x,)).square().sum())(params, buffers)

    expected, actual = grads(eager), grads(fused)
    assert actual.keys() == expected.keys()
    for k in expected:
        assert_normwise_close(actual[k], expected[k], k)


def _gradient_penalty(model, x):
    """The gradient of ``|d out / d x|^2`` with respect to every parameter (double backward)."""
    x = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    gx.square().sum().backward()


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda tv: (tv.models.resnet.BasicBlock(6, 6), fastres.nn.BasicBlock(6, 6)), (2, 6, 5, 5)),
        (lambda tv: (tv.models.resnet.Bottleneck(8, 2), fastres.nn.Bottleneck(8, 2)), (2, 8, 5, 5)),
        (lambda tv: (_tv_densenet(tv, num_classes=3), _fr_densenet(num_classes=3, memory_efficient=False)),
         (2, 3, 32, 32)),
    ],
    ids=["BasicBlock", "Bottleneck", "DenseNet(memory_efficient=False)"],
)
def test_double_backward(path, tv, make, shape):
    torch.manual_seed(0)
    eager, fused = make(tv)
    eager = eager.double()
    fused = twin(eager, fused.double())
    x = torch.randn(shape, dtype=torch.float64)
    _gradient_penalty(fused, x)
    _gradient_penalty(eager, x)
    assert_modules_normwise_close(fused, eager)


def test_shared_storage_refuses_double_backward(path):
    """The same clear error on every device: shared storage keeps nothing to differentiate through."""
    model = _fr_densenet(num_classes=3).double()
    with pytest.raises(RuntimeError, match="memory_efficient=False"):
        _gradient_penalty(model, _input(torch.float64))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_recomputing_ops_double_backward(training):
    """The transition's and the stem's BN-ReLU-recomputing ops: float64 gradgradcheck."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    conv = torch.randn(2, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    stats = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5

    def norm(w, b):
        return BatchNormArgs(stats[0].clone(), stats[1].clone(), w, b, training, 0.1, 1e-5)

    assert torch.autograd.gradgradcheck(lambda x, w, b, c: bn_relu_conv1x1(x, norm(w, b), c), (x, w, b, conv))
    assert torch.autograd.gradgradcheck(lambda x, w, b: bn_relu_max_pool2d(x, norm(w, b), 3, 2, 1), (x, w, b))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["densenet", "resnet"])
def test_half_precision_on_cpu(path, tv, name, dtype):
    """``.half()`` / ``.bfloat16()`` models run where torchvision's do, as accurately."""
    eager, fused = _pair(tv, name, training=True, dtype=dtype)
    reference = _pair(tv, name, training=True, dtype=torch.float64)[0]
    x = _input()
    with torch.no_grad():
        out = fused(x.to(dtype))
        assert out.dtype == dtype
        assert_as_accurate_as_eager(out, eager(x.to(dtype)), reference(x.double()))
