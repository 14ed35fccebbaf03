"""Fused BatchNorm (+ add) + ReLU against eager ``BatchNorm2d`` (+ add) + ReLU."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastres
from fastres.functional import batch_norm_relu
from helpers import layout_strides, saved_bytes

SHAPES = [(1, 3, 7, 7), (2, 3, 7, 7), (3, 5, 1, 1), (1, 17, 3, 5), (2, 8, 1, 9), (4, 40, 10, 10)]


def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # H and W do not merge: a strided slice of a wider tensor
        wide = torch.cat([t, t], dim=3)
        return wide[..., ::2]
    return t


def _eager(x, rm, rv, w, b, training, momentum, eps, residual):
    y = F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    return torch.relu(y if residual is None else y + residual)


def _run(fn, x, w, b, rm, rv, residual, training, momentum=0.1, eps=1e-5, grad=None):
    """Output, gradients (x, weight, bias, residual) and the updated running stats."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, residual)]
    xl, wl, bl, rl = leaves
    rm = rm.clone() if rm is not None else None
    rv = rv.clone() if rv is not None else None
    out = fn(xl, rm, rv, wl, bl, training, momentum, eps, rl)
    out.backward(grad if grad is not None else torch.ones_like(out))
    return [out] + [t.grad if t is not None else None for t in leaves] + [rm, rv]


def _inputs(shape, device, layout, dtype=torch.float32, residual=True):
    c = shape[1]
    x = _layout(torch.randn(shape, device=device), layout).to(dtype)
    r = _layout(torch.randn(shape, device=device), layout).to(dtype) if residual else None
    w, b = torch.randn(c, device=device), torch.randn(c, device=device)
    rm, rv = torch.randn(c, device=device), torch.rand(c, device=device) + 0.5
    return x, w, b, rm, rv, r


def _assert_all_close(got, want, rtol=1e-5, atol=1e-5):
    for i, (a, e) in enumerate(zip(got, want)):
        if e is None:
            assert a is None, i
            continue
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"result {i}: {m}")
        assert layout_strides(a) == layout_strides(e), (i, a.stride(), e.stride())


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("residual", [False, True], ids=["bn_relu", "bn_add_relu"])
def test_matches_eager_fp32(path, device, shape, layout, training, residual):
    x, w, b, rm, rv, r = _inputs(shape, device, layout, residual=residual)
    grad = torch.randn(shape, device=device)
    got = _run(batch_norm_relu, x, w, b, rm, rv, r, training, grad=grad)
    want = _run(_eager, x, w, b, rm, rv, r, training, grad=grad)
    _assert_all_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_low_precision_as_close_as_eager(path, device, dtype, layout, training):
    """fp16/bf16 activations, fp32 parameters and buffers: no worse than eager against fp32."""
    shape = (2, 6, 5, 7)
    x, w, b, rm, rv, r = _inputs(shape, device, layout, dtype=dtype)
    grad = torch.randn(shape, device=device).to(dtype)
    ref = _run(_eager, x.float(), w, b, rm, rv, r.float(), training, grad=grad.float())
    got = _run(batch_norm_relu, x, w, b, rm, rv, r, training, grad=grad)
    want = _run(_eager, x, w, b, rm, rv, r, training, grad=grad)
    eps = torch.finfo(dtype).eps
    for i, (a, e, f) in enumerate(zip(got, want, ref)):
        assert a.dtype == e.dtype, i
        scale = f.abs().max().item()
        fused_err = (a.float() - f).abs().max().item()
        eager_err = (e.float() - f).abs().max().item()
        # The fused op rounds once where eager rounds after BN and again after
        # the add; the interpreter truncates instead of rounding.
        assert fused_err <= 2 * eager_err + 2 * eps * scale, (i, fused_err, eager_err, scale)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(path, device, layout, training):
    shape = (2, 3, 3, 3)
    x, w, b, rm, rv, r = (t.double() for t in _inputs(shape, device, layout))
    x, r = _layout(x, layout), _layout(r, layout)
    # Keep values away from the ReLU kink, where finite differences are meaningless.
    r = r + torch.where(r >= 0, 0.5, -0.5)
    args = [t.requires_grad_() for t in (x, w, b, r)]

    def fn(x, w, b, r):
        return batch_norm_relu(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, r)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)


def test_large_mean_tiny_variance(path, device):
    """Values 1e3 + 1e-2 * noise: shifted statistics keep fp32 as accurate as eager's."""
    shape = (4, 6, 9, 9)
    x = 1e3 + 1e-2 * torch.randn(shape, device=device)
    w, b = torch.rand(6, device=device) + 0.5, torch.randn(6, device=device)
    rm, rv = torch.zeros(6, device=device), torch.ones(6, device=device)
    grad = torch.randn(shape, device=device)
    ref = _run(_eager, x.double(), w.double(), b.double(), rm.double(), rv.double(), None, True, grad=grad.double())
    got = _run(batch_norm_relu, x, w, b, rm, rv, None, True, grad=grad)
    want = _run(_eager, x, w, b, rm, rv, None, True, grad=grad)
    for i, (a, e, f) in enumerate(zip(got, want, ref)):
        if f is None:
            continue
        fused_err = (a.double() - f).abs().max().item()
        eager_err = (e.double() - f).abs().max().item()
        scale = f.abs().max().item()
        assert fused_err <= 2 * eager_err + 4 * torch.finfo(torch.float32).eps * scale, (i, fused_err, eager_err)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nan_and_inf_propagate_as_in_eager(path, device, value, training):
    shape = (2, 4, 5, 5)
    x, w, b, rm, rv, r = _inputs(shape, device, "nchw")
    x = x.clone()
    x[1, 2, 3, 4] = value
    grad = torch.randn(shape, device=device)
    got = _run(batch_norm_relu, x, w, b, rm, rv, r, training, grad=grad)
    want = _run(_eager, x, w, b, rm, rv, r, training, grad=grad)
    names = ["out", "dx", "dweight", "dbias", "dresidual", "running_mean", "running_var"]
    for name, a, e in zip(names, got, want):
        # Same positions of NaN and of each infinity; finite values as in eager.
        assert torch.equal(a.isnan(), e.isnan()), name
        assert torch.equal(a.isinf(), e.isinf()) and torch.equal(a[a.isinf()], e[e.isinf()]), name
        finite = a.isfinite()
        torch.testing.assert_close(a[finite], e[finite], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


# --- the module -------------------------------------------------------------

MODULE_CONFIGS = {
    "default": {},
    "momentum_none": {"momentum": None},
    "no_affine": {"affine": False},
    "no_running_stats": {"track_running_stats": False},
    "eps_momentum": {"eps": 1e-3, "momentum": 0.3},
}


@pytest.mark.parametrize("config", MODULE_CONFIGS, ids=list(MODULE_CONFIGS))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("residual", [False, True], ids=["bn_relu", "bn_add_relu"])
def test_module_matches_batchnorm2d_relu(path, device, config, layout, residual):
    kwargs = MODULE_CONFIGS[config]
    eager = nn.BatchNorm2d(5, **kwargs).to(device)
    fused = fastres.nn.BatchNormReLU2d(5, **kwargs).to(device)
    if eager.affine:
        with torch.no_grad():
            eager.weight.uniform_(0.5, 1.5), eager.bias.uniform_(-0.5, 0.5)
    fused.load_state_dict(eager.state_dict())  # strict: the same keys
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.1) if eager.affine else None
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1) if eager.affine else None
    for step in range(3):  # training steps, then eval
        x = _layout(torch.randn(3, 5, 4, 6, device=device) * 2 + 1, layout)
        r = _layout(torch.randn(3, 5, 4, 6, device=device), layout) if residual else None
        grad = torch.randn(3, 5, 4, 6, device=device)
        outs = []
        for module, opt in ((fused, opt_f), (eager, opt_e)):
            xl = x.clone().requires_grad_()
            out = module(xl, r) if module is fused else torch.relu(module(xl) if r is None else module(xl) + r)
            out.backward(grad)
            outs.append((out, xl.grad))
            if opt is not None:
                opt.step(), opt.zero_grad()
        _assert_all_close(outs[0], outs[1])
    for (name, a), e in zip(fused.named_buffers(), eager.buffers()):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    for (name, a), e in zip(fused.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    fused.eval(), eager.eval()
    x = _layout(torch.randn(2, 5, 3, 3, device=device), layout)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), torch.relu(eager(x)), rtol=1e-5, atol=1e-5)


def test_module_is_a_batchnorm2d_and_loads_its_checkpoints():
    bn = nn.BatchNorm2d(4)
    bn.running_mean.fill_(0.5)
    fused = fastres.nn.BatchNormReLU2d(4)
    assert isinstance(fused, nn.BatchNorm2d)
    fused.load_state_dict(bn.state_dict())
    assert list(fused.state_dict()) == list(bn.state_dict())
    assert torch.equal(fused.running_mean, bn.running_mean)
    shared = fastres.nn.BatchNormReLU2d.from_module(bn)
    assert shared.weight is bn.weight and shared.running_var is bn.running_var


def test_no_mask_and_no_graph_without_grad(path, device):
    x, w, b, rm, rv, r = _inputs((2, 3, 4, 4), device, "nchw")
    with torch.no_grad():
        out = batch_norm_relu(x, rm, rv, w.requires_grad_(), b, True, 0.1, 1e-5, r)
    assert out.grad_fn is None and not out.requires_grad


# --- memory -----------------------------------------------------------------


@pytest.mark.parametrize("residual", [False, True], ids=["bn_relu", "bn_add_relu"])
def test_backward_saves_a_bit_mask_instead_of_the_output(device, residual, gpu_paths):
    """On the kernels' path (the eager one saves what eager saves)."""
    n, c, h, w = shape = (4, 16, 8, 8)
    x = torch.randn(shape, device=device).requires_grad_()
    r = torch.randn(shape, device=device) if residual else None
    bn = nn.BatchNorm2d(c).to(device)
    numel = n * c * h * w

    fused = saved_bytes(lambda: batch_norm_relu(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, 0.1, 1e-5, r))
    eager = saved_bytes(lambda: _eager(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, 0.1, 1e-5, r))
    # Fused: x, the 1-bit mask, mean, rstd and the element count. Eager: x,
    # the whole fp32 ReLU output, and per-channel vectors.
    assert fused == numel * 4 + (numel + 7) // 8 + 2 * c * 4 + 4
    assert eager >= 2 * numel * 4
    assert eager - fused >= numel * 4 - (numel + 7) // 8 - 4
