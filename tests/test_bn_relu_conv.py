"""fastres.functional.bn_relu_conv2d and nn.BNReLUConv2d against eager batch norm -> ReLU -> conv2d.

On CPU the fused kernels run through Triton's interpreter (the ``triton`` path);
the ``reference`` path is the eager fallback.
"""

import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastres.functional import bn_relu_conv2d
from fastres.nn import BNReLUConv2d
from fastres.ops import bn_relu_conv as ops

from helpers import layout_strides


def _normwise(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def _inputs(device, dtype, n, c, h, w, co, k, layout, bias, affine=True):
    g = torch.Generator().manual_seed(1)
    if layout == "slice":  # a channel slice of a larger channels_last buffer, as in a dense block
        base = torch.randn(n, c + 7, h, w, generator=g, dtype=dtype).to(device).contiguous(memory_format=torch.channels_last)
        x = base[:, 2 : 2 + c]
    else:
        x = torch.randn(n, c, h, w, generator=g, dtype=dtype).to(device)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    x = (x * 2 + 0.3).detach().requires_grad_() if layout != "slice" else x.requires_grad_()
    p = {
        "running_mean": torch.randn(c, generator=g, dtype=dtype).to(device),
        "running_var": (torch.rand(c, generator=g, dtype=dtype) + 0.5).to(device),
        "weight": torch.randn(c, generator=g, dtype=dtype).to(device).requires_grad_() if affine else None,
        "bias": torch.randn(c, generator=g, dtype=dtype).to(device).requires_grad_() if affine else None,
        "conv_weight": (torch.randn(co, c, k, k, generator=g, dtype=dtype) / (c * k * k) ** 0.5).to(device).requires_grad_(),
        "conv_bias": torch.randn(co, generator=g, dtype=dtype).to(device).requires_grad_() if bias else None,
    }
    return x, p


def _run(fn, x, p, grad_seed=2, **kw):
    rm, rv = p["running_mean"].clone(), p["running_var"].clone()
    y = fn(x, rm, rv, p["weight"], p["bias"], p["conv_weight"], p["conv_bias"], **kw)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=y.dtype).to(y.device)
    leaves = [t for t in (x, p["weight"], p["bias"], p["conv_weight"], p["conv_bias"]) if t is not None]
    grads = torch.autograd.grad(y, leaves, gy)
    return y, grads, rm, rv


def _eager(x, rm, rv, w, b, cw, cb, stride=1, padding=0, dilation=1, groups=1, training=False, momentum=0.1, eps=1e-5):
    return F.conv2d(F.relu(F.batch_norm(x, rm, rv, w, b, training, momentum, eps)), cw, cb, stride, padding, dilation, groups)


CASES = [
    # (n, c, h, w, co, k, stride, padding, layout)
    (2, 3, 7, 7, 16, 3, 1, 1, "nchw"),  # C_in 3, as a stem
    (2, 5, 7, 5, 6, 3, 2, 1, "nchw"),  # odd channels, stride 2, H != W
    (1, 24, 5, 5, 12, 1, 1, 0, "channels_last"),  # N 1, DenseNet-BC widths
    (2, 36, 5, 5, 12, 3, 1, 1, "channels_last"),
    (2, 36, 7, 7, 20, 1, 2, 0, "channels_last"),  # a strided 1x1 (a pre-activation downsample)
    (2, 24, 1, 1, 8, 3, 1, 1, "nchw"),  # 1x1 spatial, all of a 3x3's taps but the centre in padding
    (2, 5, 7, 7, 40, 3, 2, 0, "channels_last"),  # stride 2 without padding
    (2, 24, 5, 5, 12, 3, 1, 1, "slice"),  # a channel slice of a larger buffer, read in place
    (2, 36, 5, 7, 12, 1, 1, 0, "slice"),
]


@pytest.fixture(params=["fused", "unfused"])
def conv_path(request, monkeypatch) -> str:
    """The convolution path the Triton op takes: fused kernels, or fastres's BN-ReLU then torch's convolution
    (the tuner's unfused candidate; ``FASTRES_CONV_PATH`` forces either)."""
    monkeypatch.setenv("FASTRES_CONV_PATH", request.param)
    return request.param


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_matches_eager(path, device, case, training, dtype):
    _check_matches_eager(device, case, training, dtype)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_unfused_candidate_matches_eager(device, gpu_paths, monkeypatch, case, training, dtype):
    """The tuner's other candidate: fastres's BN-ReLU written out, then torch's convolution."""
    monkeypatch.setenv("FASTRES_CONV_PATH", "unfused")
    _check_matches_eager(device, case, training, dtype)


def _check_matches_eager(device, case, training, dtype):
    n, c, h, w, co, k, stride, padding, layout = case
    x, p = _inputs(device, dtype, n, c, h, w, co, k, layout, bias=k == 3)
    kw = dict(stride=stride, padding=padding, training=training)
    y, grads, rm, rv = _run(bn_relu_conv2d, x, p, **kw)
    y_e, grads_e, rm_e, rv_e = _run(_eager, x, p, **kw)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    # fp32 is also held to eager's own error against float64: with m = 2 values per channel the
    # batch norm's input gradient is a near-total cancellation, in eager as in the fused op.
    x64 = x.detach().double()
    if dtype == torch.float64:
        # No wider type to compare with: eager's own error is then its change when x moves by a few ulps, the
        # rounding an ill-conditioned case (m = 2 again) amplifies; eager's 1- and 2-thread results differ as much.
        noise = torch.rand(x64.shape, generator=torch.Generator().manual_seed(5), dtype=x64.dtype).to(x64.device)
        x64 = x64 * (1 + 2.0 ** -50 * (2 * noise - 1))
    x64 = x64.requires_grad_()
    p64 = {k: (v.detach().double().requires_grad_(v.requires_grad) if v is not None else None) for k, v in p.items()}
    y_r, grads_r, _, _ = _run(_eager, x64, p64, **kw)
    assert y.dtype == y_e.dtype and y.shape == y_e.shape
    assert layout_strides(y) == layout_strides(y_e)
    names = ("y", "dx", "dweight", "dbias", "dconv_weight", "dconv_bias")
    for name, a, e, r in zip(names, (y, *grads), (y_e, *grads_e), (y_r, *grads_r)):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        err, eager_err = _normwise(a, r), _normwise(e, r)
        assert err < max(tol, 2 * eager_err), (name, err, eager_err)
    assert layout_strides(grads[0]) == layout_strides(grads_e[0])
    torch.testing.assert_close(rm, rm_e, rtol=tol, atol=tol)
    torch.testing.assert_close(rv, rv_e, rtol=tol, atol=tol)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("k,stride,padding", [(3, 2, 1), (1, 1, 0), (3, 1, 0)])
def test_gradcheck_float64(path, device, training, k, stride, padding):
    x, p = _inputs(device, torch.float64, 2, 3, 4, 4, 4, k, "nchw", bias=True)
    rm, rv = p["running_mean"], p["running_var"]

    def fn(x, w, b, cw, cb):
        # Fresh running statistics each call: the update is not part of the function.
        return bn_relu_conv2d(x, rm.clone(), rv.clone(), w, b, cw, cb, stride, padding, training=training)

    inputs = (x, p["weight"], p["bias"], p["conv_weight"], p["conv_bias"])
    # fast_mode: random projections of the Jacobian, a few calls instead of two per input element
    # (each an interpreted kernel launch on CPU).
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.parametrize("weight_layout", ["oihw", "channels_last"])
def test_every_launch_config_matches_eager(device, gpu_paths, monkeypatch, weight_layout):
    """Each block config the GPU autotuner may choose computes the same thing (on the GPU, or interpreted),
    with torchvision's default OIHW weights (packed for the MMA) and with channels_last ones (used as they are)."""
    k = ops.kernels("bn_relu_conv")
    x, p = _inputs(device, torch.float32, 2, 40, 9, 9, 72, 3, "channels_last", bias=True)
    if weight_layout == "channels_last":
        p["conv_weight"] = p["conv_weight"].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    y_e, grads_e, _, _ = _run(_eager, x, p, stride=2, padding=1, training=True)
    every = sorted(set(k.GEMM_CONFIGS + k.GEMM_DGRAD_CONFIGS + k.TAP_CONFIGS + k.TAP_DGRAD_CONFIGS + k.WGRAD_CONFIGS
                        + k.NARROW_CONFIGS))
    for config in every:
        monkeypatch.setattr(k, "configs", lambda kind, taps, device, wide=True, config=config: (config,))
        y, grads, _, _ = _run(bn_relu_conv2d, x, p, stride=2, padding=1, training=True)
        for a, e in zip((y, *grads), (y_e, *grads_e)):
            assert _normwise(a, e) < 1e-5, config


def test_every_config_fits_the_keep_factor():
    """forward loads BLOCK_M keep factors, wgrad BLOCK_K (its rows are positions): both from ``launch.ones``."""
    from fastres.kernels.launch import ONES

    k = ops.kernels("bn_relu_conv")
    rows = {c[0] for c in k.GEMM_CONFIGS + k.TAP_CONFIGS + k.NARROW_CONFIGS + (k.INTERPRETER_CONFIG,)}
    rows |= {c[2] for c in k.WGRAD_CONFIGS + k.NARROW_CONFIGS}
    rows |= {k._interpreter_blocks(1 << 20, 1 << 20, 1 << 20)[i] for i in (0, 2)}
    assert max(rows) <= ONES


def test_division_by_multiply_and_shift_is_exact():
    """wgrad splits positions into (n, oh, ow) with ``utils.divisor``'s high multiply and shift: exact for every
    numerator below 2**31 (checked at the edges of every quotient step and at random) and every divisor."""
    from fastres.kernels.utils import divisor

    rng = random.Random(0)
    divisors = [*range(2, 600), *(1 << k for k in range(1, 31)), *((1 << k) + 1 for k in range(31)),
                *((1 << k) - 1 for k in range(2, 32)), *(rng.randrange(2, 1 << 31) for _ in range(300))]
    top = (1 << 31) - 1
    for d in divisors:
        m, s = divisor(d)
        assert (1 << 31) < m < (1 << 32) and 0 <= s < 32  # a uint32 multiplier, always the same argument type
        for p in {0, 1, d - 1, d, d + 1, top, top - 1, top // d * d, top // d * d - 1,
                  *(q * d - 1 for q in range(1, 40)), *(rng.randrange(0, 1 << 31) for _ in range(50))}:
            if 0 <= p <= top:
                assert ((p * m) >> 32) >> s == p // d, (d, p)
    assert divisor(1) == divisor(2)  # d = 1: the kernel passes p through; the same argument types as any d
    with pytest.raises(ValueError, match="divisor"):
        divisor(0)


@pytest.mark.parametrize("splits", [2, 3, 5, 8])
def test_split_k_weight_gradient_matches_eager(device, gpu_paths, monkeypatch, splits):
    """The wgrad split over K (on a GPU, to fill its SMs): partial tiles added in two rounds, by the last
    program of each group of about sqrt(splits) splits (5: groups of 2, 2 and 1) and then of the groups."""
    k = ops.kernels("bn_relu_conv")
    monkeypatch.setattr(k, "_wgrad_splits", lambda tiles, k_blocks, device: min(splits, k_blocks))
    x, p = _inputs(device, torch.float32, 2, 24, 16, 16, 12, 3, "channels_last", bias=False)  # 512 positions: 8 K blocks
    y, grads, _, _ = _run(bn_relu_conv2d, x, p, stride=1, padding=1, training=True)
    y_e, grads_e, _, _ = _run(_eager, x, p, stride=1, padding=1, training=True)
    assert _normwise(grads[3], grads_e[3]) < 1e-5  # the convolution's weight


def test_tuner_may_choose_the_unfused_candidate(device, gpu_paths, monkeypatch, tmp_path):
    """Where the unfused composition is fastest it is chosen per launch kind, after its outputs were checked
    against the fused reference config's on the same inputs, and the op still matches eager."""
    from fastres.kernels import tuning

    k = ops.kernels("bn_relu_conv")
    monkeypatch.setenv("FASTRES_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FASTRES_AUTOTUNE", raising=False)
    monkeypatch.delenv("FASTRES_CONV_PATH", raising=False)
    monkeypatch.setattr(k, "_offers_unfused", lambda device: True)
    monkeypatch.setattr(tuning, "_can_time", lambda device: True)
    monkeypatch.setattr(tuning, "_capturing", lambda device: False)
    monkeypatch.setattr(tuning, "_device_name", lambda device: "Stand-in GPU")
    last = []
    original = k.choose

    def spy(kind, bucket, candidates, run, device, outputs=None):
        def run_and_note(config):
            last[:] = [config]
            run(config)
        return original(kind, bucket, candidates, run_and_note, device, outputs)

    monkeypatch.setattr(k, "choose", spy)
    monkeypatch.setattr(tuning, "BENCH", lambda fn: (fn(), 1.0 if last[0] == k.UNFUSED else 2.0)[1])
    tuning.forget()
    try:
        x, p = _inputs(device, torch.float32, 2, 24, 7, 7, 12, 3, "channels_last", bias=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # the unfused candidate agrees with the fused reference
            y, grads, _, _ = _run(bn_relu_conv2d, x, p, padding=1, training=True)
        y_e, grads_e, _, _ = _run(_eager, x, p, padding=1, training=True)
        for a, e in zip((y, *grads), (y_e, *grads_e)):
            assert _normwise(a, e) < 1e-5
        _, table = tuning._table(device)
        assert sorted(eval(key)[0] for key in table) == ["dgrad", "forward", "wgrad"]
        assert all(config == list(k.UNFUSED) for config in table.values())
    finally:
        tuning.forget()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_and_inf_propagate_as_in_eager(path, device, value):
    x, p = _inputs(device, torch.float32, 2, 5, 5, 5, 6, 3, "nchw", bias=False)
    with torch.no_grad():
        x[0, 1, 2, 3] = value
    y, grads, _, _ = _run(bn_relu_conv2d, x, p, padding=1, training=False)
    y_e, grads_e, _, _ = _run(_eager, x, p, padding=1, training=False)
    for a, e in zip((y, *grads), (y_e, *grads_e)):
        assert torch.equal(a.isnan(), e.isnan()) and torch.equal(a.isinf(), e.isinf())
        finite = a.isfinite() & e.isfinite()
        torch.testing.assert_close(a[finite], e[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_as_close_as_eager(path, device, dtype):
    """bf16/fp16 storage and dot operands, fp32 accumulation: no further from float64 than eager."""
    x, p = _inputs(device, torch.float32, 2, 24, 5, 5, 16, 3, "channels_last", bias=False)
    x_lo = x.detach().to(dtype).requires_grad_()
    p_lo = {k: (v.detach().to(dtype).requires_grad_(v.requires_grad) if v is not None else None) for k, v in p.items()}
    p_64 = {k: (v.detach().double().requires_grad_(v.requires_grad) if v is not None else None) for k, v in p.items()}
    x_64 = x_lo.detach().double().requires_grad_()
    kw = dict(padding=1, training=True)
    ref = _run(_eager, x_64, p_64, **kw)
    fused = _run(bn_relu_conv2d, x_lo, p_lo, **kw)
    eager = _run(_eager, x_lo, p_lo, **kw)
    for a, e, r in zip((fused[0], *fused[1]), (eager[0], *eager[1]), (ref[0], *ref[1])):
        assert a.dtype == dtype
        assert _normwise(a, r) <= 2 * _normwise(e, r) + 2 * torch.finfo(dtype).eps


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_saves_x_and_per_channel_vectors_only(device, gpu_paths, conv_path, training):
    """Nothing of the activation's size is kept: x itself, the parameters, and a [2C + 1] stats vector
    (on either conv path: the unfused one recomputes its BN-ReLU in backward)."""
    x, p = _inputs(device, torch.float32, 2, 24, 7, 7, 12, 3, "channels_last", bias=False)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = bn_relu_conv2d(x, p["running_mean"], p["running_var"], p["weight"], p["bias"], p["conv_weight"],
                           padding=1, training=training)
    params = {t.data_ptr() for t in (x, p["weight"], p["bias"], p["conv_weight"])}
    extra = [t for t in saved if t.data_ptr() not in params]
    assert sum(t.numel() for t in extra) == 2 * 24 + 1
    eager_saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: eager_saved.append(t) or t, lambda t: t):
        _eager(x, p["running_mean"].clone(), p["running_var"].clone(), p["weight"], p["bias"], p["conv_weight"],
               None, 1, 1, training=training)
    # Eager keeps at least the batch norm's output and the ReLU's (x's size each) besides x.
    assert sum(t.numel() for t in eager_saved if t.data_ptr() not in params) >= 2 * x.numel()
    y.sum().backward()


def test_no_graph_without_grad(path, device):
    x, p = _inputs(device, torch.float32, 2, 5, 5, 5, 6, 3, "nchw", bias=False)
    with torch.no_grad():
        y = bn_relu_conv2d(x, p["running_mean"], p["running_var"], p["weight"], p["bias"], p["conv_weight"],
                           padding=1, training=True)
    assert y.grad_fn is None and not y.requires_grad


def test_frozen_parameters_get_no_gradient(path, device):
    x, p = _inputs(device, torch.float32, 2, 5, 5, 5, 6, 3, "nchw", bias=True)
    p["weight"].requires_grad_(False)
    p["conv_weight"].requires_grad_(False)
    y = bn_relu_conv2d(x, p["running_mean"], p["running_var"], p["weight"], p["bias"], p["conv_weight"],
                       p["conv_bias"], padding=1, training=True)
    y.sum().backward()
    assert p["weight"].grad is None and p["conv_weight"].grad is None
    assert x.grad is not None and p["bias"].grad is not None and p["conv_bias"].grad is not None


@pytest.mark.parametrize("groups,dilation", [(2, 1), (1, 2)])
def test_groups_and_dilation_run_eager(path, device, groups, dilation):
    x, p = _inputs(device, torch.float32, 2, 6, 7, 7, 4, 3, "nchw", bias=True)
    p["conv_weight"] = torch.randn(4, 6 // groups, 3, 3, device=device, requires_grad=True)
    kw = dict(padding=2, dilation=dilation, groups=groups, training=True)
    y, grads, rm, rv = _run(bn_relu_conv2d, x, p, **kw)
    y_e, grads_e, rm_e, rv_e = _run(_eager, x, p, **kw)
    for a, e in zip((y, *grads, rm, rv), (y_e, *grads_e, rm_e, rv_e)):
        torch.testing.assert_close(a, e)


def test_padding_strings(path, device):
    x, p = _inputs(device, torch.float32, 2, 5, 6, 6, 4, 3, "nchw", bias=False)
    for padding in ("same", "valid"):
        y, grads, _, _ = _run(bn_relu_conv2d, x, p, padding=padding, training=True)
        y_e, grads_e, _, _ = _run(_eager, x, p, padding=padding, training=True)
        for a, e in zip((y, *grads), (y_e, *grads_e)):
            torch.testing.assert_close(a, e)


# --- the module ---------------------------------------------------------------


def _eager_twin(m: BNReLUConv2d) -> nn.Sequential:
    seq = nn.Sequential()
    seq.norm = nn.BatchNorm2d(m.norm.num_features, m.norm.eps, m.norm.momentum, m.norm.affine,
                              m.norm.track_running_stats, dtype=m.conv.weight.dtype)
    seq.relu = nn.ReLU()
    c = m.conv
    seq.conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, c.groups,
                         c.bias is not None, dtype=c.weight.dtype)
    seq.load_state_dict(m.state_dict())
    return seq.to(c.weight.device).train(m.training)


@pytest.mark.parametrize("config", [
    dict(kernel_size=3, padding=1, bias=True),
    dict(kernel_size=1, stride=2),
    dict(kernel_size=3, stride=2, padding=1, momentum=None),
    dict(kernel_size=3, padding=1, affine=False),
    dict(kernel_size=1, track_running_stats=False),
])
def test_module_matches_batchnorm_relu_conv(path, device, config):
    m = BNReLUConv2d(5, 8, **config, device=device, dtype=torch.float64)
    with torch.no_grad():
        if m.norm.affine:
            m.norm.weight.uniform_(0.5, 1.5)
            m.norm.bias.uniform_(-0.5, 0.5)
    e = _eager_twin(m)
    for step in range(2):
        x = torch.randn(2, 5, 7, 7, device=device, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        xf, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        yf, ye = m(xf), e(xe)
        g = torch.randn_like(ye)
        yf.backward(g)
        ye.backward(g)
        torch.testing.assert_close(yf, ye, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(xf.grad, xe.grad, rtol=1e-10, atol=1e-10)
    for (name, a), b in zip(m.named_parameters(), e.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10, msg=name)
    for (name, a), b in zip(m.named_buffers(), e.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
    m.eval()
    e.eval()
    x = torch.randn(2, 5, 7, 7, device=device, dtype=torch.float64)
    torch.testing.assert_close(m(x), e(x), rtol=1e-10, atol=1e-10)


def test_module_state_dict_keys_and_hooks(path, device):
    m = BNReLUConv2d(4, 6, 3, padding=1, bias=True, device=device)
    assert list(m.state_dict()) == [
        "norm.weight", "norm.bias", "norm.running_mean", "norm.running_var", "norm.num_batches_tracked",
        "conv.weight", "conv.bias",
    ]
    assert isinstance(m.norm, nn.BatchNorm2d) and isinstance(m.conv, nn.Conv2d)
    seen = []
    m.conv.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    x = torch.randn(2, 4, 5, 5, device=device)
    y = m(x)  # a hook on a part: runs as written, so the hook sees the convolution's output
    assert seen == [y.shape]
    torch.testing.assert_close(y, _eager_twin(m)(x))


def test_inference_mode_input_trains_the_convolution_as_eager(path, device):
    """An x made under inference_mode cannot be saved for backward: the op then runs as eager does."""
    with torch.inference_mode():
        x = torch.randn(2, 3, 5, 5, dtype=torch.float64, device=device)
    cw = torch.randn(4, 3, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    rm, rv = torch.zeros(3, dtype=torch.float64, device=device), torch.ones(3, dtype=torch.float64, device=device)
    (got,) = torch.autograd.grad(bn_relu_conv2d(x, rm, rv, None, None, cw, padding=1).sum(), cw)
    (want,) = torch.autograd.grad(_eager(x, rm, rv, None, None, cw, None, 1, 1).sum(), cw)
    torch.testing.assert_close(got, want)
