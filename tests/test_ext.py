"""fastres._C, the dense-block ops, against a float64 eager reference.

x is a channel slice of a shared feature buffer (NCHW or channels_last), as a
memory-efficient DenseNet layer reads it. Every op runs through the CPU
implementation, and through the CUDA kernels when a GPU is present.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastres import _ext

if os.environ.get("FASTRES_NO_EXT") == "1":
    pytest.skip("fastres._C is not built (FASTRES_NO_EXT=1)", allow_module_level=True)

from fastres.ops import dense_ops as ops  # noqa: E402

_C = _ext.load()
CUDA = torch.cuda.is_available() and _C.cuda_kernels_compiled()
DEVICES = ["cpu", "cuda"] if CUDA else ["cpu"]
LAYOUTS = ["nchw", "channels_last"]
# Odd channel counts, 7x7, N=1, 1x1, H=1 or W=1 (merged H*W strides), and more
# than 16 channels (the CPU's channel tiles when channels are innermost).
SHAPES = [(2, 3, 7, 7), (1, 3, 7, 7), (3, 5, 1, 1), (1, 1, 1, 1), (2, 4, 1, 6), (2, 4, 6, 1), (4, 40, 5, 3)]
# (rtol, atol) against float64 math on the same inputs: a few ulps of the dtype.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-6, 1e-6),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
EPS = 1e-5
BUFFER_EXTRA = 5  # channels of the shared buffer outside x
OFFSET = 2  # x = buf[:, OFFSET:OFFSET + C]


def cases():
    """(device, dtype): float32/float64 everywhere, float16/bfloat16 on CUDA only."""
    out = []
    for device in DEVICES:
        dtypes = [torch.float32, torch.float64]
        if device == "cuda":
            dtypes += [torch.float16, torch.bfloat16]
        out += [pytest.param(device, dtype, id=f"{device}-{str(dtype)[6:]}") for dtype in dtypes]
    return out


def memory_format(layout: str) -> torch.memory_format:
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def shared_buffer(shape, layout, dtype, device, fill=None) -> torch.Tensor:
    n, c, h, w = shape
    buf = torch.randn(n, c + BUFFER_EXTRA, h, w, dtype=torch.float64) if fill is None else fill
    return buf.to(device=device, dtype=dtype).contiguous(memory_format=memory_format(layout))


def channel_slice(buf: torch.Tensor, c: int) -> torch.Tensor:
    """buf[:, OFFSET:OFFSET + c]: a strided view, like a dense layer's input."""
    return buf[:, OFFSET : OFFSET + c]


def features(shape, layout, dtype, device) -> torch.Tensor:
    return channel_slice(shared_buffer(shape, layout, dtype, device), shape[1])


def scratch(x: torch.Tensor, layout: str) -> torch.Tensor:
    return torch.full(x.shape, 7.0, dtype=x.dtype, device=x.device).contiguous(
        memory_format=memory_format(layout)
    )


def param_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def bn_params(c, dtype, device, affine=True):
    """(mean, rstd, weight, bias) of a BatchNorm over c channels; weight, bias None without affine."""
    p = dict(dtype=param_dtype(dtype), device=device)
    mean = torch.randn(c, **p) * 0.5
    rstd = torch.rand(c, **p) + 0.5
    if not affine:
        return mean, rstd, None, None
    return mean, rstd, torch.randn(c, **p), torch.randn(c, **p)


def per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.double()[:, None, None]


def ref_y(x, mean, rstd, weight, bias) -> torch.Tensor:
    y = (x.double() - per_channel(mean)) * per_channel(rstd)
    if weight is not None:
        y = y * per_channel(weight)
    if bias is not None:
        y = y + per_channel(bias)
    return y


def ref_dy(grad_out, y) -> torch.Tensor:
    return torch.ops.aten.threshold_backward(grad_out.double(), y, 0)


def ref_sums(grad_out, x, mean, rstd, weight, bias):
    dy = ref_dy(grad_out, ref_y(x, mean, rstd, weight, bias))
    xmu = x.double() - per_channel(mean)
    return dy.sum((0, 2, 3)), (dy * xmu).sum((0, 2, 3))


def ref_dx(grad_out, x, mean, rstd, weight, bias, sum_g, sum_gx, training):
    m = x.shape[0] * x.shape[2] * x.shape[3]
    dy = ref_dy(grad_out, ref_y(x, mean, rstd, weight, bias))
    scale = per_channel(rstd) * (per_channel(weight) if weight is not None else 1.0)
    if not training:
        return dy * scale
    xmu = x.double() - per_channel(mean)
    proj = per_channel(rstd) ** 2 * per_channel(sum_gx) / m
    return scale * (dy - per_channel(sum_g) / m - xmu * proj)


def assert_close(got, expected, dtype, scale=1.0, **kw):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.double(), expected.double(), rtol=rtol, atol=atol * scale, **kw)


# ---- batch_stats ----


@pytest.mark.parametrize("device, dtype", cases())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_batch_stats(device, dtype, layout, shape):
    x = features(shape, layout, dtype, device)
    mean, rstd = ops.batch_stats(x, eps=EPS)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    assert mean.dtype == rstd.dtype == param_dtype(dtype)
    assert mean.shape == rstd.shape == (shape[1],)
    assert_close(mean, ref_mean, param_dtype(dtype))
    assert_close(rstd, torch.rsqrt(ref_var + EPS), param_dtype(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_stats_large_mean_small_std(device, layout):
    # E[x^2] - E[x]^2 in float32 would lose every digit of this variance.
    shape = (8, 40, 33, 33) if device == "cuda" else (4, 6, 9, 9)
    n, c, h, w = shape
    fill = 1e3 + 1e-2 * torch.randn(n, c + BUFFER_EXTRA, h, w, dtype=torch.float64)
    x = channel_slice(shared_buffer(shape, layout, torch.float32, device, fill=fill), c)
    mean, rstd = ops.batch_stats(x, eps=0.0)  # eps = 0: var = 1 / rstd**2
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=0)
    var = rstd.double() ** -2
    torch.testing.assert_close(var, ref_var, rtol=1e-5 if device == "cpu" else 1e-4, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_reductions_are_deterministic(device):
    x = features((4, 40, 17, 17), "channels_last", torch.float32, device)
    g = torch.randn_like(x)
    mean, rstd, weight, bias = bn_params(40, torch.float32, device)
    for first, second in [
        (ops.batch_stats(x), ops.batch_stats(x)),
        (
            ops.bn_relu_backward_reduce(g, x, mean, rstd, weight, bias),
            ops.bn_relu_backward_reduce(g, x, mean, rstd, weight, bias),
        ),
    ]:
        assert all(torch.equal(a, b) for a, b in zip(first, second))


# ---- batch_stats: the running statistics ----


def _eager_batch_norm_update(x, running_mean, running_var, momentum):
    """F.batch_norm's training-mode update of the running buffers (in place), in float64 math."""
    rm, rv = running_mean.double(), running_var.double()
    F.batch_norm(x.double(), rm, rv, None, None, True, momentum, EPS)
    running_mean.copy_(rm)
    running_var.copy_(rv)


@pytest.mark.parametrize("device, dtype", cases())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 3, 7, 7), (3, 5, 1, 1), (2, 4, 1, 6), (4, 40, 5, 3)], ids=str)
def test_batch_stats_updates_running_statistics_like_batch_norm(device, dtype, layout, shape):
    """momentum, and momentum=None's cumulative factors 1, 1/2, 1/3, over three batches."""
    c = shape[1]
    p = dict(dtype=param_dtype(dtype), device=device)
    for factors in ([0.1, 0.1, 0.1], [1.0, 1 / 2, 1 / 3], [0.0, 0.7, 0.25]):
        running_mean, running_var = torch.randn(c, **p), torch.rand(c, **p) + 0.5
        eager_mean, eager_var = running_mean.clone(), running_var.clone()
        for momentum in factors:
            x = features(shape, layout, dtype, device)
            mean, rstd = ops.batch_stats(x, running_mean, running_var, momentum, EPS)
            _eager_batch_norm_update(x, eager_mean, eager_var, momentum)
            ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
            assert_close(mean, ref_mean, param_dtype(dtype))
            assert_close(rstd, torch.rsqrt(ref_var + EPS), param_dtype(dtype))
            assert_close(running_mean, eager_mean, param_dtype(dtype))
            assert_close(running_var, eager_var, param_dtype(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_batch_stats_without_running_buffers_matches_with_them(device):
    x = features((2, 6, 5, 5), "nchw", torch.float32, device)
    running_mean, running_var = torch.zeros(6, device=device), torch.ones(6, device=device)
    with_buffers = ops.batch_stats(x, running_mean, running_var, 0.1, EPS)
    without = ops.batch_stats(x, None, None, 0.1, EPS)
    assert all(torch.equal(a, b) for a, b in zip(with_buffers, without))
    assert not torch.equal(running_mean, torch.zeros(6, device=device))  # updated in place


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "kind", ["float64_buffers_float32_x", "float32_buffers_float64_x", "strided_buffers"]
)
def test_batch_stats_updates_running_buffers_of_another_dtype_or_strided(device, kind):
    """Buffers the kernels cannot update directly go through a copy that is written back."""
    c = 5
    x_dtype = torch.float64 if kind == "float32_buffers_float64_x" else torch.float32
    buffer_dtype = {"float64_buffers_float32_x": torch.float64, "float32_buffers_float64_x": torch.float32}.get(
        kind, x_dtype
    )
    x = features((3, c, 4, 4), "channels_last", x_dtype, device)
    storage = torch.randn(2, 2 * c, dtype=buffer_dtype, device=device)
    if kind == "strided_buffers":
        running_mean, running_var = storage[0, ::2], storage[1, ::2].abs()
    else:
        running_mean, running_var = storage[0, :c], storage[1, :c].abs()
    storage_before = storage.clone()
    eager_mean, eager_var = running_mean.double(), running_var.double()
    _eager_batch_norm_update(x, eager_mean, eager_var, 0.3)
    ops.batch_stats(x, running_mean, running_var, 0.3, EPS)
    torch.testing.assert_close(running_mean.double(), eager_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(running_var.double(), eager_var, rtol=1e-6, atol=1e-6)
    if kind == "strided_buffers":  # the elements between them are untouched
        assert torch.equal(storage[:, 1::2], storage_before[:, 1::2])


# ---- bn_relu_forward ----


@pytest.mark.parametrize("device, dtype", cases())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_bn_relu_forward(device, dtype, layout, shape, affine):
    buf = shared_buffer(shape, layout, dtype, device)
    buf_before = buf.clone()
    x = channel_slice(buf, shape[1])
    params = bn_params(shape[1], dtype, device, affine)
    out = scratch(x, layout)
    ops.bn_relu_forward(x, *params, out)
    assert_close(out, torch.relu(ref_y(x, *params)), dtype)
    assert out.is_contiguous(memory_format=memory_format(layout))
    assert torch.equal(buf, buf_before)


@pytest.mark.parametrize("device, dtype", cases())
@pytest.mark.parametrize("x_layout, out_layout", [("nchw", "channels_last"), ("channels_last", "nchw")])
def test_bn_relu_forward_into_a_channel_slice(device, dtype, x_layout, out_layout):
    shape = (2, 6, 5, 4)
    x = features(shape, x_layout, dtype, device)
    params = bn_params(shape[1], dtype, device)
    out_buf = shared_buffer(shape, out_layout, dtype, device)
    out_buf_before = out_buf.clone()
    out = channel_slice(out_buf, shape[1])
    ops.bn_relu_forward(x, *params, out)
    assert_close(out, torch.relu(ref_y(x, *params)), dtype)
    untouched = torch.ones(out_buf.shape[1], dtype=torch.bool)
    untouched[OFFSET : OFFSET + shape[1]] = False
    assert torch.equal(out_buf[:, untouched], out_buf_before[:, untouched])


# ---- bn_relu_backward_reduce ----


@pytest.mark.parametrize("device, dtype", cases())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_bn_relu_backward_reduce(device, dtype, layout, shape, affine):
    x = features(shape, layout, dtype, device)
    grad_out = torch.randn(x.shape, device=device).to(dtype).contiguous(memory_format=memory_format(layout))
    params = bn_params(shape[1], dtype, device, affine)
    sum_g, sum_gx = ops.bn_relu_backward_reduce(grad_out, x, *params)
    ref_sum_g, ref_sum_gx = ref_sums(grad_out, x, *params)
    m = shape[0] * shape[2] * shape[3]
    assert sum_g.dtype == sum_gx.dtype == param_dtype(dtype)
    # A sum of m terms, each rounded in the dtype's math: allow m times the atol.
    assert_close(sum_g, ref_sum_g, param_dtype(dtype), scale=m)
    assert_close(sum_gx, ref_sum_gx, param_dtype(dtype), scale=m)


# ---- bn_relu_backward_input ----


@pytest.mark.parametrize("device, dtype", cases())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_relu_backward_input_accumulates(device, dtype, layout, shape, affine, training):
    c = shape[1]
    x = features(shape, layout, dtype, device)
    grad_out = torch.randn(x.shape, device=device).to(dtype).contiguous(memory_format=memory_format(layout))
    params = bn_params(c, dtype, device, affine)
    sums = [torch.randn(c, dtype=param_dtype(dtype), device=device) * 3 for _ in range(2)]
    grad_buf = shared_buffer(shape, layout, dtype, device)  # pre-filled: the op must add
    grad_buf_before = grad_buf.clone()
    ops.bn_relu_backward_input(grad_out, x, *params, *sums, channel_slice(grad_buf, c), training)
    expected = channel_slice(grad_buf_before, c).double() + ref_dx(grad_out, x, *params, *sums, training)
    assert_close(channel_slice(grad_buf, c), expected, dtype, scale=4)
    untouched = torch.ones(grad_buf.shape[1], dtype=torch.bool)
    untouched[OFFSET : OFFSET + c] = False
    assert torch.equal(grad_buf[:, untouched], grad_buf_before[:, untouched])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_ops_compose_to_autograd_of_batch_norm_relu(device, layout, affine, training):
    """batch_stats -> forward -> backward_reduce -> backward_input == relu(F.batch_norm) and autograd."""
    shape = (3, 5, 6, 7)
    c = shape[1]
    x = features(shape, layout, torch.float64, device)
    p = dict(dtype=torch.float64, device=device)
    weight, bias = (torch.randn(c, **p), torch.randn(c, **p)) if affine else (None, None)
    running_mean, running_var = torch.randn(c, **p), torch.rand(c, **p) + 0.5

    ours_mean, ours_var = running_mean.clone(), running_var.clone()
    if training:
        mean, rstd = ops.batch_stats(x, ours_mean, ours_var, 0.1, EPS)
    else:
        mean, rstd = running_mean, torch.rsqrt(running_var + EPS)
    out = scratch(x, layout)
    ops.bn_relu_forward(x, mean, rstd, weight, bias, out)
    grad_out = torch.randn_like(out)
    sum_g, sum_gx = ops.bn_relu_backward_reduce(grad_out, x, mean, rstd, weight, bias)
    grad_in = channel_slice(shared_buffer(shape, layout, torch.float64, device).zero_(), c)
    ops.bn_relu_backward_input(grad_out, x, mean, rstd, weight, bias, sum_g, sum_gx, grad_in, training)

    leaf = x.detach().clone().requires_grad_()
    eager_weight = weight.clone().requires_grad_() if affine else None
    eager_bias = bias.clone().requires_grad_() if affine else None
    eager_mean, eager_var = running_mean.clone(), running_var.clone()
    y = torch.relu(F.batch_norm(leaf, eager_mean, eager_var, eager_weight, eager_bias, training, 0.1, EPS))
    y.backward(grad_out)
    torch.testing.assert_close(ours_mean, eager_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_var, eager_var, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, y.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad_in, leaf.grad, rtol=1e-10, atol=1e-10)
    if affine:  # what BatchNorm's parameter gradients are made of
        torch.testing.assert_close(sum_g, eager_bias.grad, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(sum_gx * rstd, eager_weight.grad, rtol=1e-10, atol=1e-10)


# ---- NaN, Inf, empty ----


@pytest.mark.parametrize("device, dtype", cases())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("size", [3, 8], ids=["3x3", "8x8"])  # 8x8: the CPU's vectorized row loops
def test_nan_and_inf_propagate_like_eager(device, dtype, layout, training, size):
    shape = (2, 4, size, size)
    x = features(shape, layout, dtype, device)
    x[0, 0, 1, 1] = float("nan")
    x[1, 1, 0, 2] = float("inf")
    x[0, 2, 2, 0] = float("-inf")
    grad_out = torch.randn(x.shape, device=device).to(dtype)
    grad_out[1, 3, 1, 1] = float("nan")
    params = bn_params(shape[1], dtype, device)

    mean, rstd = ops.batch_stats(x)
    assert rstd[:3].isnan().all() and not mean[:3].isfinite().any()
    assert mean[3].isfinite() and rstd[3].isfinite()

    out = scratch(x, layout)
    ops.bn_relu_forward(x, *params, out)
    assert out[0, 0, 1, 1].isnan()  # relu(NaN) is NaN, like torch.relu
    assert_close(out, torch.relu(ref_y(x, *params)), dtype, equal_nan=True)

    sums = ops.bn_relu_backward_reduce(grad_out, x, *params)
    m = shape[0] * shape[2] * shape[3]
    for got, ref in zip(sums, ref_sums(grad_out, x, *params)):
        assert_close(got, ref, param_dtype(dtype), scale=m, equal_nan=True)

    grad_in = torch.zeros_like(x)
    ops.bn_relu_backward_input(grad_out, x, *params, *sums, grad_in, training)
    assert_close(grad_in, ref_dx(grad_out, x, *params, *sums, training), dtype, scale=4, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    x = torch.randn(0, 3, 4, 4, device=device)
    mean, rstd = ops.batch_stats(x)
    assert mean.isnan().all() and rstd.isnan().all()  # like the mean of an empty tensor
    params = bn_params(3, torch.float32, device)
    out = torch.empty_like(x)
    ops.bn_relu_forward(x, *params, out)
    sum_g, sum_gx = ops.bn_relu_backward_reduce(x, x, *params)
    assert (sum_g == 0).all() and (sum_gx == 0).all()
    ops.bn_relu_backward_input(x, x, *params, sum_g, sum_gx, torch.empty_like(x), True)


# ---- CUDA specifics ----


@pytest.mark.skipif(not CUDA, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_many_chunks_on_a_side_stream_match_cpu(layout):
    shape = (8, 70, 33, 33)  # several chunks per channel in the reductions
    x = features(shape, layout, torch.float32, "cuda")
    grad_out = torch.randn_like(x)
    params = bn_params(shape[1], torch.float32, "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        mean, rstd = ops.batch_stats(x, eps=EPS)
        out = scratch(x, layout)
        ops.bn_relu_forward(x, *params, out)
        sums = ops.bn_relu_backward_reduce(grad_out, x, *params)
        grad_in = torch.zeros_like(x)
        ops.bn_relu_backward_input(grad_out, x, *params, *sums, grad_in, True)
    stream.synchronize()
    x_cpu, grad_out_cpu = x.cpu(), grad_out.cpu()
    params_cpu = [p.cpu() for p in params]
    cpu_mean, cpu_rstd = ops.batch_stats(x_cpu, eps=EPS)
    torch.testing.assert_close(mean.cpu(), cpu_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rstd.cpu(), cpu_rstd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.cpu().double(), torch.relu(ref_y(x_cpu, *params_cpu)), rtol=1e-6, atol=1e-5)
    m = shape[0] * shape[2] * shape[3]
    for got, ref in zip(sums, ref_sums(grad_out_cpu, x_cpu, *params_cpu)):
        torch.testing.assert_close(got.cpu().double(), ref, rtol=1e-4, atol=1e-6 * m)
    expected = ref_dx(grad_out_cpu, x_cpu, *params_cpu, *[t.cpu() for t in sums], True)
    torch.testing.assert_close(grad_in.cpu().double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not CUDA, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("offset, extra", [(0, 0), (8, 8), (1, 3)], ids=["whole", "aligned", "misaligned"])
@pytest.mark.parametrize("shape", [(4, 16, 8, 8), (2, 64, 28, 28), (8, 24, 7, 7), (2, 3, 64, 64)], ids=str)
def test_cuda_vector_and_scalar_paths(dtype, layout, offset, extra, shape):
    """16-byte vectors where the slice allows them (whole/aligned), single elements otherwise."""
    n, c, h, w = shape
    buf = torch.randn(n, c + extra, h, w, dtype=torch.float64, device="cuda")
    buf = buf.to(dtype).contiguous(memory_format=memory_format(layout))
    x = buf[:, offset : offset + c]
    m = n * h * w
    acc = param_dtype(dtype)
    mean, rstd = ops.batch_stats(x, eps=EPS)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(ref_var + EPS), rtol=1e-5, atol=1e-6)
    params = bn_params(c, dtype, "cuda")
    out = torch.full_like(buf, 7.0)[:, offset : offset + c]
    ops.bn_relu_forward(x, *params, out)
    assert_close(out, torch.relu(ref_y(x, *params)), dtype)
    grad_out = torch.randn(buf.shape, device="cuda").to(dtype).contiguous(memory_format=memory_format(layout))
    grad_out = grad_out[:, offset : offset + c]
    sums = ops.bn_relu_backward_reduce(grad_out, x, *params)
    for got, ref in zip(sums, ref_sums(grad_out, x, *params)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=TOL[acc][1] * m)
    grad_buf = torch.randn(buf.shape, device="cuda").to(dtype).contiguous(memory_format=memory_format(layout))
    before = grad_buf.clone()
    ops.bn_relu_backward_input(grad_out, x, *params, *sums, grad_buf[:, offset : offset + c], True)
    expected = before[:, offset : offset + c].double() + ref_dx(grad_out, x, *params, *sums, True)
    assert_close(grad_buf[:, offset : offset + c], expected, dtype, scale=4)
    untouched = torch.ones(c + extra, dtype=torch.bool)
    untouched[offset : offset + c] = False
    assert torch.equal(grad_buf[:, untouched], before[:, untouched])


# ---- the CUDA kernels, emulated on the CPU ----
#
# Without a GPU the kernels of csrc/dense_cuda.cu still run: the file is
# compiled by the host compiler against a shim in which a block's threads are
# std::threads, __syncthreads a std::barrier and __shared__ a static (blocks run
# one at a time), and `kernel<<<grid, block, 0, stream>>>(args)` becomes a call
# of every thread of every block. This checks the launchers' plans, the thread
# mapping and index math, the vector/scalar choice, tails and the reductions
# (the same code as on the GPU, not its timing or memory model).

_EMULATION_SHIM = r"""
// Runs dense_cuda.cu's kernels on the CPU: a block's threads are std::threads,
// __syncthreads a barrier, __shared__ a static (one block at a time).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <barrier>
#include <cmath>
#include <cstring>
#include <functional>
#include <thread>
#include <tuple>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __launch_bounds__(...)

using std::fma;
using std::isfinite;
using std::sqrt;

namespace emu {
inline thread_local uint3 thread_idx;
inline thread_local uint3 block_idx;  // one block at a time
inline dim3 grid_dim;
inline std::barrier<>* block_barrier = nullptr;
inline long launches = 0;

struct Launch {
  dim3 grid, block;
  Launch(dim3 g, unsigned b, int, cudaStream_t) : grid(g), block(b, 1, 1) {}
};

template <class... P>
struct Pending {
  void (*f)(P...);
  Launch l;
};

template <class... P>
Pending<P...> operator>>(void (*f)(P...), Launch l) { return {f, l}; }

template <class... A>
std::tuple<A...> args(A... a) { return {a...}; }

template <class... P, class... A>
void operator<<(Pending<P...> p, std::tuple<A...> a) {
  ++launches;
  grid_dim = p.l.grid;
  const unsigned threads = p.l.block.x;
  std::barrier<> bar(threads);
  block_barrier = &bar;
  std::vector<std::thread> ts;
  for (unsigned t = 0; t < threads; ++t)
    ts.emplace_back([&, t] {
      thread_idx = {t, 0, 0};
      for (unsigned by = 0; by < p.l.grid.y; ++by)
        for (unsigned bx = 0; bx < p.l.grid.x; ++bx) {
          block_idx = {bx, by, 0};
          std::apply([&](auto&... x) { p.f(x...); }, a);
          bar.arrive_and_wait();  // the block's shared memory is the next one's
        }
    });
  for (auto& th : ts) th.join();
}
}  // namespace emu

using emu::operator>>;
using emu::operator<<;

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define gridDim emu::grid_dim
inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
inline double __longlong_as_double(long long v) {
  double d;
  std::memcpy(&d, &v, sizeof d);
  return d;
}

extern "C" {
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
cudaError_t cudaSetDevice(int) { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
cudaError_t cudaGetDeviceCount(int* c) { *c = 1; return cudaSuccess; }
long emu_launches(void) { return emu::launches; }
}
"""


def _cuda_include_dir():
    """The CUDA toolkit's include directory (cuda_fp16.h), or None."""
    candidates = [os.path.join(os.environ[v], "include") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        probe = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                               capture_output=True, text=True)
        for line in (probe.stdout + probe.stderr).splitlines():
            if line.startswith("#$ TOP="):
                candidates.append(os.path.join(line[len("#$ TOP="):].strip(), "include"))
        candidates.append(os.path.join(os.path.dirname(os.path.realpath(nvcc)), "..", "include"))
    return next((d for d in candidates if os.path.isfile(os.path.join(d, "cuda_fp16.h"))), None)


@pytest.fixture(scope="module")
def emulated():
    """dense_cuda.cu's launchers built for the CPU (ctypes), with argument types set."""
    import ctypes
    import pathlib
    import re
    import tempfile

    include, cxx = _cuda_include_dir(), shutil.which("g++") or shutil.which("c++")
    if include is None or cxx is None:
        pytest.skip("needs the CUDA headers (nvcc's toolkit) and a C++20 host compiler")
    csrc = pathlib.Path(__file__).resolve().parent.parent / "csrc"
    source = (csrc / "dense_cuda.cu").read_text()
    source = re.sub(r"#include <cuda_(bf16|fp16|runtime)\.h>\n", "", source)
    source = '#include "emulation_shim.h"\n' + source.replace("<<<", " >> emu::Launch(").replace(">>>(", ") << emu::args(")
    work = pathlib.Path(tempfile.mkdtemp(prefix="fastres_emulated_"))
    (work / "emulation_shim.h").write_text(_EMULATION_SHIM)
    (work / "dense_cuda_emulated.cpp").write_text(source)
    lib_path = work / "libdense_cuda_emulated.so"
    build = subprocess.run(
        [cxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-w", f"-I{include}", f"-I{csrc}",
         str(work / "dense_cuda_emulated.cpp"), "-o", str(lib_path), "-lpthread"],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    lib = ctypes.CDLL(str(lib_path))

    class Dims(ctypes.Structure):  # FastresShape and FastresStrides
        _fields_ = [("n", ctypes.c_int64), ("c", ctypes.c_int64), ("hw", ctypes.c_int64)]

    P, I, D = ctypes.c_void_p, ctypes.c_int, ctypes.c_double
    lib.fastres_cuda_reduce_workspace_bytes.restype = ctypes.c_int64
    lib.fastres_cuda_reduce_workspace_bytes.argtypes = [I, Dims, Dims]
    lib.fastres_cuda_batch_stats.argtypes = [I, P, I, Dims, P, Dims, P, P, D, D, P, P, P]
    lib.fastres_cuda_bn_relu_forward.argtypes = [I, P, I, Dims, P, Dims, P, P, P, P, P, Dims]
    lib.fastres_cuda_bn_relu_backward_reduce.argtypes = [I, P, I, Dims, P, Dims, P, Dims, P, P, P, P, P, P, P]
    lib.fastres_cuda_bn_relu_backward_input.argtypes = [I, P, I, Dims, P, Dims, P, Dims, P, P, P, P, P, P, P, Dims, I]
    lib.Dims = Dims
    return lib


def _emulated_call(lib, name, *args):
    """Calls launcher `name`: tensors become (pointer, and for 4-D ones their [N, C, HW] strides)."""
    code = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
    x = next(a for a in args if isinstance(a, torch.Tensor) and a.dim() == 4)
    flat = [0, None, code[x.dtype], lib.Dims(x.shape[0], x.shape[1], x.shape[2] * x.shape[3])]
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() == 4:
            h, w = a.shape[2:]
            hw_stride = a.stride(2) if w == 1 else a.stride(3)
            flat += [a.data_ptr(), lib.Dims(a.stride(0), a.stride(1), hw_stride)]
        elif isinstance(a, torch.Tensor):
            flat.append(a.data_ptr())
        else:
            flat.append(a)
    assert getattr(lib, name)(*flat) == 0


EMULATED_SHAPES = [(2, 16, 8, 8), (2, 3, 64, 64), (8, 24, 7, 7), (3, 5, 1, 1), (2, 4, 1, 6)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("offset, extra", [(0, 0), (8, 8), (1, 3)], ids=["whole", "aligned", "misaligned"])
@pytest.mark.parametrize("shape", EMULATED_SHAPES, ids=str)
def test_cuda_kernels_emulated_on_cpu(emulated, dtype, layout, offset, extra, shape):
    """Every launcher on channel slices that take 16-byte vectors (whole, aligned) or not (misaligned)."""
    n, c, h, w = shape
    m = n * h * w
    acc = param_dtype(dtype)

    def buffer():
        b = torch.randn(n, c + extra, h, w, dtype=torch.float64).to(dtype)
        return b.contiguous(memory_format=memory_format(layout))

    def workspace(t):
        d = emulated.Dims
        code = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}[dtype]
        size = emulated.fastres_cuda_reduce_workspace_bytes(
            code, d(n, c, h * w), d(t.stride(0), t.stride(1), t.stride(2) if w == 1 else t.stride(3)))
        return torch.empty(max(size, 1), dtype=torch.uint8)

    buf = buffer()
    x = buf[:, offset : offset + c]
    untouched = torch.ones(c + extra, dtype=torch.bool)
    untouched[offset : offset + c] = False

    # batch_stats, with the running statistics
    mean, rstd = torch.empty(c, dtype=acc), torch.empty(c, dtype=acc)
    running_mean, running_var = torch.randn(c, dtype=acc), torch.rand(c, dtype=acc) + 0.5
    expected_mean, expected_var = running_mean.double(), running_var.double()
    if m > 1:
        F.batch_norm(x.double(), expected_mean, expected_var, None, None, True, 0.3, EPS)
    _emulated_call(emulated, "fastres_cuda_batch_stats", x, running_mean, running_var, 0.3, EPS, mean, rstd, workspace(x))
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    assert_close(mean, ref_mean, acc)
    assert_close(rstd, torch.rsqrt(ref_var + EPS), acc)
    if m > 1:
        assert_close(running_mean, expected_mean, acc)
        assert_close(running_var, expected_var, acc)

    # forward, into a slice of the same layout
    params = bn_params(c, dtype, "cpu")
    out_buf = buffer()
    out_before = out_buf.clone()
    out = out_buf[:, offset : offset + c]
    _emulated_call(emulated, "fastres_cuda_bn_relu_forward", x, *params, out)
    assert_close(out, torch.relu(ref_y(x, *params)), dtype)
    assert torch.equal(out_buf[:, untouched], out_before[:, untouched])

    # backward: the two sums, then grad_in += dx (training and eval)
    grad_out = buffer()[:, offset : offset + c]
    sums = [torch.empty(c, dtype=acc), torch.empty(c, dtype=acc)]
    _emulated_call(emulated, "fastres_cuda_bn_relu_backward_reduce", grad_out, x, *params, *sums, workspace(x))
    for got, ref in zip(sums, ref_sums(grad_out, x, *params)):
        assert_close(got, ref, acc, scale=m)
    for training in (True, False):
        grad_buf = buffer()
        before = grad_buf.clone()
        _emulated_call(emulated, "fastres_cuda_bn_relu_backward_input", grad_out, x, *params, *sums,
                       grad_buf[:, offset : offset + c], int(training))
        expected = before[:, offset : offset + c].double() + ref_dx(grad_out, x, *params, *sums, training)
        assert_close(grad_buf[:, offset : offset + c], expected, dtype, scale=4)
        assert torch.equal(grad_buf[:, untouched], before[:, untouched])


def test_cuda_kernels_are_linked_when_nvcc_is_present():
    if shutil.which("nvcc") is None or os.environ.get("FASTRES_CUDA") == "0":
        pytest.skip("no nvcc on PATH, or FASTRES_CUDA=0: the build may skip the CUDA kernels")
    assert _C.cuda_kernels_compiled()


@pytest.mark.skipif(not _C.cuda_kernels_compiled(), reason="built without the CUDA kernels")
def test_cuda_runtime_reports_errors_instead_of_crashing():
    if torch.cuda.is_available():
        assert _C.cuda_device_count() == torch.cuda.device_count()
    else:  # no driver or no device: the launcher's error code becomes a RuntimeError
        with pytest.raises(RuntimeError, match="cuda_device_count: CUDA error"):
            _C.cuda_device_count()


# ---- bad input ----


def good_args(op: str) -> dict:
    x = torch.randn(2, 3, 4, 4)
    mean, rstd, weight, bias = bn_params(3, torch.float32, "cpu")
    bn = dict(mean=mean, rstd=rstd, weight=weight, bias=bias)
    return {
        "batch_stats": dict(x=x, running_mean=torch.zeros(3), running_var=torch.ones(3), momentum=0.1, eps=1e-5),
        "bn_relu_forward": dict(x=x, **bn, out=torch.empty_like(x)),
        "bn_relu_backward_reduce": dict(grad_out=torch.randn_like(x), x=x, **bn),
        "bn_relu_backward_input": dict(
            grad_out=torch.randn_like(x), x=x, **bn, sum_g=torch.zeros(3), sum_gx=torch.zeros(3),
            grad_in=torch.zeros_like(x), training=True,
        ),
    }[op]


def unmergeable():
    return torch.randn(2, 3, 4, 6)[..., :4]  # stride(2) = 6 != 4 * stride(3): H and W cannot merge


BAD_ARGS = [  # (op, argument, bad value, error, message after "op: ")
    ("batch_stats", "x", lambda: torch.randn(3, 4, 4), ValueError, "x must be 4-D, got 3-D"),
    ("batch_stats", "x", lambda: torch.ones(2, 3, 4, 4, dtype=torch.int64), TypeError,
     "x must have dtype float32 or float64 on CPU, got int64"),
    ("batch_stats", "x", lambda: torch.randn(2, 3, 4, 4).half(), TypeError, "x must have dtype float32 or float64"),
    ("batch_stats", "x", unmergeable, ValueError, "x must have H and W mergeable"),
    ("batch_stats", "x", lambda: torch.randn(2, 3, 4, 4, device="meta"), ValueError,
     "x must be a CPU or CUDA tensor, got meta"),
    ("batch_stats", "running_mean", lambda: torch.zeros(4), ValueError,
     r"running_mean must have shape \[3\] \(\[C\], C = x.size\(1\)\), got \[4\]"),
    ("batch_stats", "running_var", lambda: torch.ones(3, dtype=torch.int64), TypeError,
     "running_var must have a floating-point dtype, got int64"),
    ("batch_stats", "running_mean", lambda: None, ValueError,
     "running_mean and running_var must both be given or both be None"),
    ("batch_stats", "running_var", lambda: torch.ones(3, device="meta"), ValueError,
     r"running_var must be on the same device as x \(cpu\), got meta"),
    ("bn_relu_forward", "out", lambda: torch.empty(2, 4, 4, 4), ValueError,
     r"out must have shape \[2, 3, 4, 4\] \(like x\), got \[2, 4, 4, 4\]"),
    ("bn_relu_forward", "out", lambda: torch.empty(2, 3, 4, 4, dtype=torch.float64), TypeError,
     "out must have dtype float32, got float64"),
    ("bn_relu_forward", "out", unmergeable, ValueError, "out must have H and W mergeable"),
    ("bn_relu_forward", "out", lambda: torch.empty(1, 3, 4, 4).expand(2, 3, 4, 4), ValueError,
     "out is written, so it must not overlap itself"),
    ("bn_relu_forward", "weight", lambda: torch.ones(2), ValueError, r"weight must have shape \[3\]"),
    ("bn_relu_forward", "bias", lambda: torch.ones(1, 3), ValueError, r"bias must have shape \[3\]"),
    ("bn_relu_forward", "rstd", lambda: torch.ones(3, dtype=torch.float64), TypeError,
     "rstd must have dtype float32, got float64"),
    ("bn_relu_forward", "mean", lambda: torch.zeros(3, device="meta"), ValueError,
     r"mean must be on the same device as x \(cpu\), got meta"),
    ("bn_relu_backward_reduce", "mean", lambda: torch.zeros(4), ValueError, r"mean must have shape \[3\]"),
    ("bn_relu_backward_reduce", "grad_out", lambda: torch.randn(1, 3, 4, 4), ValueError, "grad_out must have shape"),
    ("bn_relu_backward_input", "sum_g", lambda: torch.zeros(2), ValueError, r"sum_g must have shape \[3\]"),
    ("bn_relu_backward_input", "grad_in", lambda: torch.zeros(2, 3, 4, 4, dtype=torch.float64), TypeError,
     "grad_in must have dtype float32"),
    ("bn_relu_backward_input", "grad_in", unmergeable, ValueError, "grad_in must have H and W mergeable"),
]


@pytest.mark.parametrize(
    "op, arg, make_bad, error, message", BAD_ARGS, ids=[f"{row[0]}-{row[1]}-{i}" for i, row in enumerate(BAD_ARGS)]
)
def test_bad_input_raises_naming_the_argument(op, arg, make_bad, error, message):
    args = good_args(op)
    getattr(ops, op)(**args)  # the good arguments pass
    args[arg] = make_bad()
    with pytest.raises(error, match=f"^{op}: {message}"):
        getattr(ops, op)(**args)


# ---- loading ----


def test_load_explains_how_to_rebuild(monkeypatch):
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setitem(sys.modules, "fastres._C", None)  # makes the import fail
    rebuild = r"fastres\._C .*could not be imported.*pip install --no-build-isolation -e \."
    with pytest.raises(RuntimeError, match=rebuild):
        _ext.load()
    assert not _ext.available()


def test_import_fastres_works_without_the_extension():
    script = (
        "import sys; sys.modules['fastres._C'] = None\n"
        "import fastres, fastres.ops.dense_ops\n"
        "from fastres import _ext\n"
        "assert not _ext.available()\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
