"""fastres's ops under PyTorch's tools, as the eager computations they replace behave there.

add_relu, batch_norm_relu and a fused block under torch.compile (no graph
breaks, the running statistics' update kept); then bn_relu_conv2d and
BNReLUConv2d in depth:

torch.compile (aot_eager and inductor, fullgraph, no graph breaks), torch.export,
torch.jit.trace (and torch.jit.script's clear error), torch.func, double
backward, autocast (bfloat16 on CPU), and the observable properties of the
output and the gradients: dtype, memory format, requires_grad. Shapes are tiny
so that the Triton path, run through the interpreter on CPU, takes seconds;
both paths run every case (Inductor only where the fused op runs).
"""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

import fastres
from fastres.functional import add_relu, bn_relu_conv2d
from fastres.nn import BNReLUConv2d
from helpers import (
    assert_as_accurate_as_eager, assert_modules_match, assert_modules_normwise_close, assert_normwise_close,
    assert_steps_like, layout_strides, twin,
)

# --- add_relu, batch_norm_relu and a block under torch.compile


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


# --- bn_relu_conv2d and BNReLUConv2d


N, C, H, W, CO = 2, 4, 5, 5, 6
TRAIN_EVAL = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])


def _eager(x, rm, rv, w, b, cw, cb=None, stride=1, padding=0, dilation=1, groups=1, training=False, momentum=0.1,
           eps=1e-5):
    return F.conv2d(F.relu(F.batch_norm(x, rm, rv, w, b, training, momentum, eps)), cw, cb, stride, padding, dilation,
                    groups)


def _tensors(device, dtype=torch.float64, c=C, co=CO, k=3, layout="nchw", hw=(H, W)):
    """(x, running_mean, running_var, weight, bias, conv_weight, conv_bias); x and the parameters require grad."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, c, *hw, generator=g, dtype=dtype) * 2 + 0.3
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    rm = torch.randn(c, generator=g, dtype=dtype)
    rv = torch.rand(c, generator=g, dtype=dtype) + 0.5
    w = torch.rand(c, generator=g, dtype=dtype) + 0.5
    b = torch.randn(c, generator=g, dtype=dtype)
    cw = torch.randn(co, c, k, k, generator=g, dtype=dtype) / (c * k * k) ** 0.5
    cb = torch.randn(co, generator=g, dtype=dtype)
    x, rm, rv, w, b, cw, cb = (t.to(device) for t in (x, rm, rv, w, b, cw, cb))
    return (x.requires_grad_(), rm, rv, w.requires_grad_(), b.requires_grad_(), cw.requires_grad_(),
            cb.requires_grad_())


def _clone_stats(rm, rv):
    return rm.clone(), rv.clone()


class _Net(nn.Module):
    """A BNReLUConv2d between two plain layers, as a model uses it."""

    def __init__(self, pre_activation, dtype=torch.float64):
        super().__init__()
        # No bias: before a batch norm in training its gradient is zero, rounding error only.
        self.stem = nn.Conv2d(3, C, 3, padding=1, bias=False, dtype=dtype)
        self.block = pre_activation
        self.head = nn.Conv2d(CO, 2, 1, dtype=dtype)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).relu())


def _eager_block(m: BNReLUConv2d) -> nn.Sequential:
    """BatchNorm2d -> ReLU -> Conv2d with ``m``'s configuration and state, in ``m``'s mode."""
    c = m.conv
    seq = nn.Sequential()
    seq.norm = nn.BatchNorm2d(m.norm.num_features, m.norm.eps, m.norm.momentum, m.norm.affine,
                              m.norm.track_running_stats, dtype=c.weight.dtype)
    seq.relu = nn.ReLU()
    seq.conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, c.groups,
                         c.bias is not None, dtype=c.weight.dtype)
    seq.load_state_dict(m.state_dict())
    return seq.to(c.weight.device).train(m.training)


def _block(device, dtype=torch.float64, **kwargs):
    config = dict(kernel_size=3, padding=1, bias=True) | kwargs
    torch.manual_seed(0)
    m = BNReLUConv2d(C, CO, **config, device=device, dtype=dtype)
    with torch.no_grad():  # away from BatchNorm2d's identity initialisation
        m.norm.weight.uniform_(0.5, 1.5)
        m.norm.bias.uniform_(-0.5, 0.5)
        m.norm.running_mean.uniform_(-0.5, 0.5)
        m.norm.running_var.uniform_(0.5, 1.5)
    return m


def _nets(device, training, dtype=torch.float64, **kwargs):
    """(fastres's net, eager's twin with the same weights and buffers), in ``training`` mode."""
    block = _block(device, dtype, **kwargs)
    fused = _Net(block, dtype).to(device)
    eager = _Net(_eager_block(block), dtype).to(device)
    eager.load_state_dict(fused.state_dict())
    return fused.train(training), eager.train(training)


def _net_input(device, dtype=torch.float64):
    return torch.randn(N, 3, H, W, dtype=dtype, generator=torch.Generator().manual_seed(3)).to(device)


# --- torch.compile -----------------------------------------------------------


# Stride 2, "same"-style padding: a 3x3 (padded taps) where layout or output size matters, else a 1x1,
# whose launches the interpreter runs several times faster.


def _fn(x, rm, rv, w, b, cw, cb, training):
    return bn_relu_conv2d(x, rm, rv, w, b, cw, cb, stride=2, padding=cw.shape[-1] // 2, training=training)


def _fn_eager(x, rm, rv, w, b, cw, cb, training):
    return _eager(x, rm, rv, w, b, cw, cb, stride=2, padding=cw.shape[-1] // 2, training=training)


@TRAIN_EVAL
def test_function_has_no_graph_breaks(path, device, training):
    torch._dynamo.reset()
    x, rm, rv, *params = _tensors(device)
    explanation = torch._dynamo.explain(_fn)(x, rm, rv, *params, training)
    assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]
    assert explanation.graph_count == 1


@TRAIN_EVAL
def test_function_has_no_graph_breaks_without_gradients(path, device, training):
    x, rm, rv, *params = _tensors(device)
    torch._dynamo.reset()
    with torch.no_grad():
        assert torch._dynamo.explain(_fn)(x, rm, rv, *params, training).graph_break_count == 0
    torch._dynamo.reset()
    frozen = [p.detach() for p in params[:-2]] + params[-2:]  # only the convolution's parameters train
    assert torch._dynamo.explain(_fn)(x.detach(), rm, rv, *frozen, training).graph_break_count == 0


def _compiled_function_matches_eager(device, backend, training):
    """fullgraph=True, float64: output, the five gradients and the running statistics updated in place."""
    torch._dynamo.reset()
    x, rm, rv, *params = _tensors(device)
    compiled = torch.compile(_fn, backend=backend, fullgraph=True)
    stats, ref_stats = _clone_stats(rm, rv), _clone_stats(rm, rv)
    out = compiled(x, *stats, *params, training)
    ref = _fn_eager(x, *ref_stats, *params, training)
    assert_normwise_close(out, ref, "out")
    assert_normwise_close(stats[0], ref_stats[0], "running_mean")
    assert_normwise_close(stats[1], ref_stats[1], "running_var")
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (x, *params), g)
    ref_grads = torch.autograd.grad(ref, (x, *params), g)
    for name, a, e in zip(("x", "weight", "bias", "conv_weight", "conv_bias"), grads, ref_grads):
        assert_normwise_close(a, e, f"d{name}")


@TRAIN_EVAL
def test_compiled_function_matches_eager(path, device, training):
    _compiled_function_matches_eager(device, "aot_eager", training)


def test_inductor_compiled_function_matches_eager(device, gpu_paths):
    """Inductor around the fused op's custom ops: its generated code runs them, layouts as their fake impls say.

    The fused path only: on the eager one Inductor would compile PyTorch's own convolution.
    """
    _compiled_function_matches_eager(device, "inductor", training=True)


def test_compiled_channels_last_with_dynamic_batch(path, device):
    """channels_last x, a dynamic batch size: the fake implementations' shapes and strides are the real ones."""
    torch._dynamo.reset()
    compiled = torch.compile(_fn, backend="aot_eager", fullgraph=True, dynamic=True)
    for n in (2, 3):
        x, rm, rv, *params = _tensors(device, k=1, layout="channels_last")
        x = x.detach().repeat(2, 1, 1, 1)[:n].contiguous(memory_format=torch.channels_last).requires_grad_()
        stats, ref_stats = _clone_stats(rm, rv), _clone_stats(rm, rv)
        out = compiled(x, *stats, *params, True)
        ref = _fn_eager(x, *ref_stats, *params, True)
        assert_normwise_close(out, ref, "out")
        assert_normwise_close(stats[1], ref_stats[1], "running_var")
        g = torch.randn_like(ref)
        for name, a, e in zip(("x", "weight", "bias", "conv_weight", "conv_bias"),
                              torch.autograd.grad(out, (x, *params), g), torch.autograd.grad(ref, (x, *params), g)):
            assert_normwise_close(a, e, f"d{name}")


@TRAIN_EVAL
def test_compiled_function_without_gradients_matches_eager(path, device, training):
    """Under no_grad the op runs its forward alone: still the running-statistic update, fullgraph."""
    torch._dynamo.reset()
    x, rm, rv, *params = _tensors(device)
    compiled = torch.compile(_fn, backend="aot_eager", fullgraph=True)
    stats, ref_stats = _clone_stats(rm, rv), _clone_stats(rm, rv)
    with torch.no_grad():
        out = compiled(x, *stats, *params, training)
        ref = _fn_eager(x, *ref_stats, *params, training)
    assert not out.requires_grad
    assert_normwise_close(out, ref, "out")
    assert_normwise_close(stats[0], ref_stats[0], "running_mean")
    assert_normwise_close(stats[1], ref_stats[1], "running_var")


@TRAIN_EVAL
def test_module_has_no_graph_breaks(path, device, training):
    torch._dynamo.reset()
    fused, _ = _nets(device, training)
    explanation = torch._dynamo.explain(fused)(_net_input(device))
    assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]
    assert explanation.graph_count == 1


@TRAIN_EVAL
def test_compiled_module_trains_like_eager(path, device, training):
    """Two steps: outputs, every gradient, running statistics and num_batches_tracked as eager's, float64."""
    torch._dynamo.reset()
    fused, eager = _nets(device, training)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    assert_steps_like(compiled, fused, eager, [_net_input(device) + step for step in range(2)])
    assert int(fused.block.norm.num_batches_tracked) == (2 if training else 0)


def test_compiled_module_with_cumulative_momentum(path, device):
    """momentum=None: the factor 1 / num_batches_tracked, read under torch.compile as BatchNorm2d's is."""
    torch._dynamo.reset()
    fused, eager = _nets(device, True, momentum=None, kernel_size=1, padding=0)
    compiled = torch.compile(fused, backend="aot_eager")  # float(num_batches_tracked) breaks the graph, as eager's
    assert_steps_like(compiled, fused, eager, [_net_input(device) + step for step in range(2)])


def test_compiled_under_autocast(path, device):
    """Autocast's dtype is read while tracing: bfloat16 out, as the eager computation under autocast gives."""
    torch._dynamo.reset()
    x, rm, rv, *params = _tensors(device, torch.float32)
    compiled = torch.compile(_fn, backend="aot_eager", fullgraph=True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = compiled(x, *_clone_stats(rm, rv), *params, True)
        ref = _fn_eager(x, *_clone_stats(rm, rv), *params, True)
    reference = _fn_eager(*(t.detach().double() for t in (x, rm, rv, *params)), True)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert layout_strides(out) == layout_strides(ref)
    assert_as_accurate_as_eager(out, ref, reference, "out")
    grads = torch.autograd.grad(out.float().sum(), (x, *params))
    assert [g.dtype for g in grads] == [torch.float32] * 5


# --- torch.export ------------------------------------------------------------


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_export_in_eval(path, device, layout):
    fused, eager = _nets(device, training=False)
    x = _net_input(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    program = torch.export.export(fused, (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert ("fastres.bn_relu_conv2d.default" in targets) == (path == "triton"), targets  # one opaque call
    out, ref = program.module()(x), eager(x)
    assert_normwise_close(out, ref, "out")
    assert_normwise_close(program.module()(x + 1), eager(x + 1), "out")  # a new input, same shape


def test_export_of_the_function(path, device):
    """The functional op with its buffers as inputs; the exported program mutates them as eager does."""

    class Fn(nn.Module):
        def forward(self, x, rm, rv, w, b, cw, cb):
            return bn_relu_conv2d(x, rm, rv, w, b, cw, cb, stride=2, padding=1, training=True)

    x, rm, rv, *params = (t.detach() for t in _tensors(device))
    program = torch.export.export(Fn(), (x, *_clone_stats(rm, rv), *params))
    stats, ref_stats = _clone_stats(rm, rv), _clone_stats(rm, rv)
    out = program.module()(x, *stats, *params)
    ref = _fn_eager(x, *ref_stats, *params, True)
    assert_normwise_close(out, ref, "out")
    assert_normwise_close(stats[0], ref_stats[0], "running_mean")
    assert_normwise_close(stats[1], ref_stats[1], "running_var")


# --- TorchScript -----------------------------------------------------------------


@TRAIN_EVAL
def test_jit_trace_records_eager_ops(path, device, training):
    """ATen ops only: the trace runs, saves and loads like eager's modules, buffers included."""
    fused, eager = _nets(device, training)
    x = _net_input(device)
    traced = torch.jit.trace(fused, (x,), check_trace=False)  # one forward: buffers updated once in training
    eager(x)
    assert not [n for n in traced.inlined_graph.nodes() if n.kind() == "prim::PythonOp"]
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x2 = x.clone().requires_grad_()
    x2_ref = x.clone().requires_grad_()
    out, ref = loaded(x2), eager(x2_ref)
    assert_normwise_close(out, ref, "out")
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    assert_normwise_close(x2.grad, x2_ref.grad, "dx")
    for (name, a), (_, b) in zip(loaded.named_buffers(), eager.named_buffers()):
        if name.endswith("num_batches_tracked"):
            assert torch.equal(a, b), name
        else:
            assert_normwise_close(a, b, name)


def test_jit_trace_of_the_function(path, device):
    x, rm, rv, *params = (t.detach() for t in _tensors(device))

    def fn(*args):  # constant padding: a traced cw.shape[-1] // 2 would be a tensor
        return bn_relu_conv2d(*args, stride=2, padding=1)

    traced = torch.jit.trace(fn, (x, rm, rv, *params), check_trace=False)
    assert not [n for n in traced.inlined_graph.nodes() if n.kind() == "prim::PythonOp"]
    assert_normwise_close(traced(x + 1, rm, rv, *params), _fn_eager(x + 1, rm, rv, *params, False), "out")


@pytest.mark.parametrize("wrap", [lambda m: m, lambda m: nn.Sequential(m, nn.ReLU()), lambda m: _Net(m, torch.float32)],
                         ids=["BNReLUConv2d", "Sequential", "model"])
def test_jit_script_says_what_to_use(device, wrap):
    model = wrap(BNReLUConv2d(C, CO, 3, padding=1, device=device))
    with pytest.raises(RuntimeError, match="BNReLUConv2d is a fastres module, which torch.jit.script cannot compile"
                                           ".*torch.compile or torch.export"):
        torch.jit.script(model)


# --- torch.func --------------------------------------------------------------


@TRAIN_EVAL
def test_func_grad_with_functional_call(path, device, training):
    """Parameters and buffers as inputs: the gradients, and the buffers updated in place, as eager's."""
    fused, eager = _nets(device, training, kernel_size=1, padding=0)
    x = _net_input(device)

    def run(model):
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = {k: v.clone() for k, v in model.named_buffers()}

        def loss(p, x, b):
            return functional_call(model, {**p, **b}, (x,)).square().sum()

        grads = grad(loss, argnums=(0, 1))(params, x, buffers)
        return grads, buffers

    (grads, dx), buffers = run(fused)
    (ref_grads, ref_dx), ref_buffers = run(eager)
    assert grads.keys() == ref_grads.keys()
    for k in ref_grads:
        assert_normwise_close(grads[k], ref_grads[k], k)
    assert_normwise_close(dx, ref_dx, "dx")
    assert buffers.keys() == ref_buffers.keys()
    for k in ref_buffers:
        if k.endswith("num_batches_tracked"):
            assert torch.equal(buffers[k], ref_buffers[k]), k
        else:
            assert_normwise_close(buffers[k], ref_buffers[k], k)
    # The module's own state is untouched by functional_call.
    assert int(fused.block.norm.num_batches_tracked) == 0


@TRAIN_EVAL
def test_func_grad_of_the_function(path, device, training):
    x, rm, rv, *params = (t.detach() for t in _tensors(device, k=1))

    def loss(fn):
        return lambda x, w, b, cw, cb: fn(x, *_clone_stats(rm, rv), w, b, cw, cb, training).square().sum()

    grads = grad(loss(_fn), argnums=(0, 1, 2, 3, 4))(x, *params)
    ref_grads = grad(loss(_fn_eager), argnums=(0, 1, 2, 3, 4))(x, *params)
    for name, a, e in zip(("x", "weight", "bias", "conv_weight", "conv_bias"), grads, ref_grads):
        assert_normwise_close(a, e, f"d{name}")


# --- double backward -----------------------------------------------------------


def _gradient_penalty(model, x):
    """The gradient of ``|d out / d x|^2`` with respect to every parameter (double backward)."""
    x = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
    gx.square().sum().backward()


@TRAIN_EVAL
def test_gradient_penalty(path, device, training):
    fused, eager = _nets(device, training, kernel_size=1, padding=0)
    x = _net_input(device)
    _gradient_penalty(fused, x)
    _gradient_penalty(eager, x)
    assert_modules_normwise_close(fused, eager)


@TRAIN_EVAL
def test_gradient_penalty_of_the_function(path, device, training):
    """Every first-order gradient differentiated again: the penalty's gradient for x and the parameters."""
    x, rm, rv, *params = _tensors(device)
    inputs = (x, *params)

    def penalty_grads(fn):
        out = fn(x, *_clone_stats(rm, rv), *params, training)
        first = torch.autograd.grad(out.square().sum(), inputs, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in first), inputs)

    for name, a, e in zip(("x", "weight", "bias", "conv_weight", "conv_bias"), penalty_grads(_fn),
                          penalty_grads(_fn_eager)):
        assert_normwise_close(a, e, f"d{name}")


@TRAIN_EVAL
def test_gradgradcheck(path, device, training):
    x, rm, rv, *params = _tensors(device, c=3, co=4, k=1, hw=(4, 4))  # the penalty test above has the 3x3

    def fn(x, w, b, cw, cb):
        # Fresh running statistics each call: the update is not part of the function.
        return _fn(x, *_clone_stats(rm, rv), w, b, cw, cb, training)

    assert torch.autograd.gradgradcheck(fn, (x, *params), fast_mode=True)


# --- autocast ------------------------------------------------------------------


@TRAIN_EVAL
def test_autocast_bfloat16(path, device, training):
    """float32 x and parameters under autocast (CPU here): a bfloat16 convolution, as eager's, as accurate."""
    m = _block(device, torch.float32)
    eager = _eager_block(m)
    reference = _eager_block(m).double()
    m.train(training), eager.train(training), reference.train(training)
    x = torch.randn(N, C, H, W, generator=torch.Generator().manual_seed(3)).to(device)
    xf, xe, xr = x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out, ref = m(xf), eager(xe)
    expected = reference(xr)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert layout_strides(out) == layout_strides(ref)
    assert_as_accurate_as_eager(out, ref, expected, "out")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(device, torch.bfloat16)
    out.backward(g)
    ref.backward(g)
    expected.backward(g.double())
    assert xf.grad.dtype == torch.float32
    assert_as_accurate_as_eager(xf.grad, xe.grad, xr.grad, "dx")
    for (name, a), b, r in zip(m.named_parameters(), eager.parameters(), reference.parameters()):
        assert a.grad.dtype == a.dtype == torch.float32, name
        assert_as_accurate_as_eager(a.grad, b.grad, r.grad, f"{name}.grad")
    for (name, a), b in zip(m.named_buffers(), eager.buffers()):
        if a.is_floating_point():
            assert_normwise_close(a, b, name)
        else:
            assert torch.equal(a, b), name



# --- observable properties -------------------------------------------------------


@pytest.mark.parametrize("x_layout,w_layout", [("nchw", "nchw"), ("channels_last", "nchw"),
                                               ("nchw", "channels_last"), ("channels_last", "channels_last")])
@TRAIN_EVAL
def test_dtype_and_memory_format_as_eager(path, device, x_layout, w_layout, training):
    """The output's and every gradient's dtype and strides are eager's (float32 here, float64 everywhere else)."""
    dtype = torch.float32
    x, rm, rv, w, b, cw, cb = _tensors(device, dtype, layout=x_layout)
    if w_layout == "channels_last":
        cw = cw.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    out = _fn(x, *_clone_stats(rm, rv), w, b, cw, cb, training)
    ref = _fn_eager(x, *_clone_stats(rm, rv), w, b, cw, cb, training)
    assert out.dtype == ref.dtype == dtype
    assert layout_strides(out) == layout_strides(ref), (out.stride(), ref.stride())
    if x_layout == "channels_last" or w_layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (x, w, b, cw, cb), g)
    ref_grads = torch.autograd.grad(ref, (x, w, b, cw, cb), g)
    for name, a, e in zip(("x", "weight", "bias", "conv_weight", "conv_bias"), grads, ref_grads):
        assert a.dtype == e.dtype, name
        assert layout_strides(a) == layout_strides(e), (name, a.stride(), e.stride())
        assert_normwise_close(a, e, f"d{name}")


def test_module_output_layout_as_eager(path, device):
    m = _block(device, torch.float32)
    eager = _eager_block(m)
    for x in (torch.randn(N, C, H, W, device=device),
              torch.randn(N, C, H, W, device=device).contiguous(memory_format=torch.channels_last)):
        out, ref = m(x), eager(x)
        assert out.dtype == ref.dtype and layout_strides(out) == layout_strides(ref)
    m.to(memory_format=torch.channels_last), eager.to(memory_format=torch.channels_last)
    x = torch.randn(N, C, H, W, device=device)
    out, ref = m(x), eager(x)
    assert layout_strides(out) == layout_strides(ref) and out.is_contiguous(memory_format=torch.channels_last)


@TRAIN_EVAL
def test_nothing_requires_grad(path, device, training):
    x, rm, rv, *params = (t.detach() for t in _tensors(device, k=1))
    stats, ref_stats = _clone_stats(rm, rv), _clone_stats(rm, rv)
    out = _fn(x, *stats, *params, training)
    ref = _fn_eager(x, *ref_stats, *params, training)
    assert out.requires_grad == ref.requires_grad is False and out.grad_fn is None
    assert_normwise_close(out, ref, "out")
    assert_normwise_close(stats[0], ref_stats[0], "running_mean")
    assert_normwise_close(stats[1], ref_stats[1], "running_var")


@TRAIN_EVAL
def test_only_conv_weight_requires_grad(path, device, training):
    x, rm, rv, w, b, cw, cb = (t.detach() for t in _tensors(device, k=1))
    cw.requires_grad_()
    out = _fn(x, *_clone_stats(rm, rv), w, b, cw, cb, training)
    ref = _fn_eager(x, *_clone_stats(rm, rv), w, b, cw, cb, training)
    assert out.requires_grad == ref.requires_grad is True
    g = torch.randn_like(ref)
    out.backward(g)
    (ref_grad,) = torch.autograd.grad(ref, cw, g)
    assert_normwise_close(cw.grad, ref_grad, "dconv_weight")
    assert x.grad is None and w.grad is None and b.grad is None and cb.grad is None


@TRAIN_EVAL
def test_no_grad_and_inference_mode(path, device, training):
    x, rm, rv, *params = _tensors(device, k=1)
    for context in (torch.no_grad, torch.inference_mode):
        stats, ref_stats = _clone_stats(rm, rv), _clone_stats(rm, rv)
        with context():
            out = _fn(x, *stats, *params, training)
            ref = _fn_eager(x, *ref_stats, *params, training)
        assert out.requires_grad == ref.requires_grad is False and out.grad_fn is None
        assert out.is_inference() == ref.is_inference()
        assert_normwise_close(out, ref, "out")
        assert_normwise_close(stats[0], ref_stats[0], "running_mean")
        assert_normwise_close(stats[1], ref_stats[1], "running_var")


def test_vmap_and_jvp_match_eager(path, device):
    """Under functorch transforms the fused ops run eager PyTorch (its ops have every transform's rules)."""
    from fastres.functional import add_relu

    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 3, 4, 4, generator=g, dtype=torch.float64).to(device)
    cw = torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64).to(device)
    rm = torch.zeros(3, dtype=torch.float64, device=device)
    rv = torch.ones(3, dtype=torch.float64, device=device)

    def fused(t):
        return add_relu(bn_relu_conv2d(t, rm, rv, None, None, cw, padding=1), torch.ones(2, 5, 4, 4, dtype=t.dtype, device=device))

    def eager(t):
        return torch.relu(F.conv2d(F.relu(F.batch_norm(t, rm, rv)), cw, padding=1) + 1)

    torch.testing.assert_close(torch.func.vmap(fused)(x), torch.func.vmap(eager)(x))
    tangent = torch.randn(x[0].shape, generator=g, dtype=torch.float64).to(device)
    got = torch.func.jvp(fused, (x[0],), (tangent,))
    want = torch.func.jvp(eager, (x[0],), (tangent,))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_trace_with_padding_from_a_shape(path, device):
    """Under jit.trace a shape-derived padding is a 0-d tensor: it is taken as the int it holds."""
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, device=device)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, device=device)
    rm, rv = torch.zeros(3, dtype=torch.float64, device=device), torch.ones(3, dtype=torch.float64, device=device)

    def fn(x, w):
        return bn_relu_conv2d(x, rm, rv, None, None, w, padding=w.shape[-1] // 2)

    traced = torch.jit.trace(fn, (x, w))
    torch.testing.assert_close(traced(x, w), F.conv2d(F.relu(F.batch_norm(x, rm, rv)), w, padding=1))
