"""fastres._C, the dense-block ops, against a float64 eager reference: on CPU, and through its CUDA kernels.

x is a channel slice of a shared feature buffer (NCHW or channels_last), as a
memory-efficient DenseNet layer reads it. The same tests run the CUDA kernels,
float16 and bfloat16 included: on the host through the emulated build
("emulated" cases, tests/emulated_cuda.py) everywhere, and on a GPU where
there is one ("cuda" cases); tests/test_ext_cuda.py covers the build itself.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import cuda_abi
import emulated_cuda
from fastres import _ext

if os.environ.get("FASTRES_NO_EXT") == "1":
    pytest.skip("fastres._C is not built (FASTRES_NO_EXT=1)", allow_module_level=True)

from fastres.ops import extension as ops  # noqa: E402

CUDA = torch.cuda.is_available() and os.environ.get("FASTRES_NO_EXT") != "1" and _ext.cuda_kernels()
# "emulated": CPU tensors through the CUDA kernels, run on the host (tests/emulated_cuda.py).
EMULATED = pytest.param("cpu", id="emulated", marks=pytest.mark.emulated_cuda)
DEVICES = ["cpu", EMULATED] + (["cuda"] if CUDA else [])
LAYOUTS = ["nchw", "channels_last"]
# Odd channel counts, 7x7, N=1, 1x1, H=1 or W=1 (merged H*W strides), and more
# than 16 channels (the CPU's channel tiles when channels are innermost).
SHAPES = [(2, 3, 7, 7), (1, 3, 7, 7), (3, 5, 1, 1), (1, 1, 1, 1), (2, 4, 1, 6), (2, 4, 6, 1), (4, 40, 5, 3)]
# (rtol, atol) against float64 math on the same inputs: a few ulps of the dtype.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-6, 1e-6),
    torch.float16: (2e-3, 2e-3),  # outputs rounded once to float16 (2^-11), math in float32
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
EPS = 1e-5
BUFFER_EXTRA = 5  # channels of the shared buffer outside x
OFFSET = 2  # x = buf[:, OFFSET:OFFSET + C]


def cases():
    """(device, dtype): the dtypes fastres._C takes: float32 and float64, its CUDA kernels also float16 and bfloat16."""
    full = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    out = [pytest.param("cpu", dtype, id=f"cpu-{str(dtype)[6:]}") for dtype in full[:2]]
    out += [pytest.param("cpu", dtype, id=f"emulated-{str(dtype)[6:]}", marks=EMULATED.marks) for dtype in full]
    if CUDA:
        out += [pytest.param("cuda", dtype, id=f"cuda-{str(dtype)[6:]}") for dtype in full]
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


def cuda_kernels_run(device: str) -> bool:
    """Whether the ops run fastres._C's CUDA kernels: on a GPU, or on the host through the emulated build."""
    return device == "cuda" or emulated_cuda.active()


def accumulation_dtype(device: str, dtype: torch.dtype) -> torch.dtype:
    """What per-channel sums accumulate in: double on CPU (as eager CPU batch norm), the math type per CUDA thread."""
    return param_dtype(dtype) if cuda_kernels_run(device) else torch.float64


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
    shape = (4, 6, 9, 9)
    n, c, h, w = shape
    fill = 1e3 + 1e-2 * torch.randn(n, c + BUFFER_EXTRA, h, w, dtype=torch.float64)
    x = channel_slice(shared_buffer(shape, layout, torch.float32, device, fill=fill), c)
    mean, rstd = ops.batch_stats(x, eps=0.0)  # eps = 0: var = 1 / rstd**2
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=0)
    var = rstd.double() ** -2
    torch.testing.assert_close(var, ref_var, rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_reductions_are_deterministic(device):
    x = features((4, 40, 17, 17), "channels_last", torch.float32, device)
    g = torch.randn_like(x)
    mean, rstd, weight, bias = bn_params(40, torch.float32, device)
    for first, second in [
        (ops.batch_stats(x), ops.batch_stats(x)),
        ((ops.batch_moments(x),), (ops.batch_moments(x),)),
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
    eager_mean, eager_var = running_mean.double().clone(), running_var.double().clone()
    _eager_batch_norm_update(x, eager_mean, eager_var, 0.3)
    ops.batch_stats(x, running_mean, running_var, 0.3, EPS)
    torch.testing.assert_close(running_mean.double(), eager_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(running_var.double(), eager_var, rtol=1e-6, atol=1e-6)
    if kind == "strided_buffers":  # the elements between them are untouched
        assert torch.equal(storage[:, 1::2], storage_before[:, 1::2])


# ---- synchronized batch norm: batch_moments, merge_batch_stats ----
#
# A process group is simulated: each process's batch is a chunk of one batch
# along N, and the all_gather is torch.stack of the chunks' moments.


def ref_moments(x):
    """[3, C] float64: per-channel sum, M2 and count, as batch_moments lays them out."""
    xd = x.double()
    dev = xd - per_channel(xd.mean((0, 2, 3)))
    count = torch.full((x.shape[1],), x.numel() // x.shape[1], dtype=torch.float64, device=x.device)
    return torch.stack([xd.sum((0, 2, 3)), (dev * dev).sum((0, 2, 3)), count])


def ref_synchronized_statistics(chunks, running_mean, running_var, momentum):
    """(mean, biased var) over the chunks from each one's (mean, var, count), running buffers updated in place.

    torch.nn.SyncBatchNorm's combination in float64: empty chunks are dropped,
    the running variance is unbiased over the total count.
    """
    stats = [(*torch.var_mean(c.double(), dim=(0, 2, 3), correction=0), c.numel() // c.shape[1])
             for c in chunks if c.numel() > 0]
    counts = torch.tensor([n for _, _, n in stats], dtype=torch.float64)[:, None]
    variances = torch.stack([v for v, _, _ in stats])
    means = torch.stack([m for _, m, _ in stats])
    total = counts.sum()
    mean = (counts * means).sum(0) / total
    var = (counts * (variances + (means - mean) ** 2)).sum(0) / total
    if running_mean is not None:
        running_mean.copy_(running_mean.double() * (1 - momentum) + mean * momentum)
        running_var.copy_(running_var.double() * (1 - momentum) + var * (total / (total - 1)) * momentum)
    return mean, var


def split_batch(x, sizes):
    """x's consecutive chunks along N (channel slices still): one per simulated process."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [x[s : s + n] for s, n in zip(starts, sizes)]


@pytest.mark.parametrize("device, dtype", cases())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES + [(0, 3, 4, 4)], ids=str)
def test_batch_moments(device, dtype, layout, shape):
    buf = shared_buffer(shape, layout, dtype, device)
    buf_before = buf.clone()
    x = channel_slice(buf, shape[1])
    moments = ops.batch_moments(x)
    assert moments.dtype == torch.float64 and moments.shape == (3, shape[1])
    expected = ref_moments(x)
    if shape[0] == 0:  # no elements: nothing summed
        expected = torch.zeros_like(expected)
    m = shape[0] * shape[2] * shape[3]
    assert_close(moments, expected, accumulation_dtype(device, dtype), scale=max(m, 1))
    assert torch.equal(buf, buf_before)


# Batches per process: unequal, one process only, an empty one (skipped, as SyncBatchNorm does).
BATCH_SIZES = [(1, 4, 2), (3, 3), (5,), (2, 0, 3)]


@pytest.mark.parametrize("device, dtype", cases())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("sizes", BATCH_SIZES, ids=str)
@pytest.mark.parametrize("c, h, w", [(3, 7, 7), (40, 5, 3), (4, 1, 6)], ids=str)
def test_merge_batch_stats_of_unequal_batches(device, dtype, layout, sizes, c, h, w):
    """Against the float64 combination of each batch's (mean, var, count), the whole batch's statistics,
    and the running buffers of torch.nn.BatchNorm2d on the concatenated batch (what SyncBatchNorm matches)."""
    x = features((sum(sizes), c, h, w), layout, dtype, device)
    chunks = split_batch(x, sizes)
    p = dict(dtype=param_dtype(dtype), device=device)
    running_mean, running_var = torch.randn(c, **p), torch.rand(c, **p) + 0.5
    ref_mean_buf, ref_var_buf = running_mean.double().clone(), running_var.double().clone()
    eager = torch.nn.BatchNorm2d(c, momentum=0.3, dtype=torch.float64, device=device)
    eager.running_mean.copy_(running_mean)
    eager.running_var.copy_(running_var)

    gathered = torch.stack([ops.batch_moments(chunk) for chunk in chunks])
    mean, rstd = ops.merge_batch_stats(x[: sizes[0]], gathered, running_mean, running_var, 0.3, EPS)
    ref_mean, ref_var = ref_synchronized_statistics(chunks, ref_mean_buf, ref_var_buf, 0.3)
    eager(x.double())

    assert mean.dtype == rstd.dtype == param_dtype(dtype)
    assert_close(mean, ref_mean, param_dtype(dtype))
    assert_close(rstd, torch.rsqrt(ref_var + EPS), param_dtype(dtype))
    whole_var, whole_mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    assert_close(mean, whole_mean, param_dtype(dtype))
    assert_close(rstd, torch.rsqrt(whole_var + EPS), param_dtype(dtype))
    for got, ref, module_buffer in [(running_mean, ref_mean_buf, eager.running_mean),
                                    (running_var, ref_var_buf, eager.running_var)]:
        assert_close(got, ref, param_dtype(dtype))
        assert_close(got, module_buffer, param_dtype(dtype))


@pytest.mark.parametrize("device, dtype", cases())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_merge_batch_stats_updates_running_statistics_like_batch_norm(device, dtype, layout):
    """momentum, and momentum=None's cumulative factors 1, 1/2, 1/3, over three steps of two processes."""
    c, sizes = 5, (3, 1)
    p = dict(dtype=param_dtype(dtype), device=device)
    for factors in ([0.1, 0.1, 0.1], [1.0, 1 / 2, 1 / 3], [0.0, 0.7, 0.25]):
        running_mean, running_var = torch.randn(c, **p), torch.rand(c, **p) + 0.5
        eager_mean, eager_var = running_mean.clone(), running_var.clone()
        for momentum in factors:
            x = features((sum(sizes), c, 4, 3), layout, dtype, device)
            gathered = torch.stack([ops.batch_moments(chunk) for chunk in split_batch(x, sizes)])
            ops.merge_batch_stats(x, gathered, running_mean, running_var, momentum, EPS)
            _eager_batch_norm_update(x, eager_mean, eager_var, momentum)
            assert_close(running_mean, eager_mean, param_dtype(dtype))
            assert_close(running_var, eager_var, param_dtype(dtype))


@pytest.mark.parametrize("device, dtype", cases())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_merge_batch_stats_of_one_process_is_batch_stats(device, dtype, layout):
    """Bit for bit, running buffers included: batch_stats is batch_moments then the same merge and finish."""
    x = features((3, 40, 5, 3), layout, dtype, device)
    p = dict(dtype=param_dtype(dtype), device=device)
    buffers = [torch.randn(40, **p), torch.rand(40, **p) + 0.5]
    merged_buffers = [b.clone() for b in buffers]
    local = ops.batch_stats(x, *buffers, 0.1, EPS)
    merged = ops.merge_batch_stats(x, ops.batch_moments(x)[None], *merged_buffers, 0.1, EPS)
    assert all(torch.equal(a, b) for a, b in zip((*local, *buffers), (*merged, *merged_buffers)))


# ---- running_stats (eval) ----


@pytest.mark.parametrize("device, dtype", cases())
@pytest.mark.parametrize("buffer_dtype", [torch.float32, torch.float64], ids=["float32_buffers", "float64_buffers"])
def test_running_stats(device, dtype, buffer_dtype):
    c = 6
    x = features((2, c, 3, 3), "nchw", dtype, device)
    running_mean = torch.randn(c, dtype=buffer_dtype, device=device)
    running_var = torch.rand(c, dtype=buffer_dtype, device=device) + 1e-3
    before = running_mean.clone(), running_var.clone()
    mean, rstd = ops.running_stats(x, running_mean, running_var, EPS)
    assert mean.dtype == rstd.dtype == param_dtype(dtype)
    assert mean.data_ptr() != running_mean.data_ptr()  # saved for backward: not the buffer itself
    assert_close(mean, running_mean.to(param_dtype(dtype)), param_dtype(dtype))
    assert_close(rstd, torch.rsqrt(running_var.to(param_dtype(dtype)).double() + EPS), param_dtype(dtype))
    assert torch.equal(running_mean, before[0]) and torch.equal(running_var, before[1])


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
        mean, rstd = ops.running_stats(x, running_mean, running_var, EPS)
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


# ---- large slices: the CUDA kernels' 16-byte and 1-element paths, several loop iterations and parts ----


def vector_width(x: torch.Tensor, aligned: bool) -> int:
    """Elements per access the CUDA kernels should take for x: 16 bytes where the slice allows."""
    wide = 16 // x.element_size()
    along = x.shape[1] if x.is_contiguous(memory_format=torch.channels_last) else x.shape[2] * x.shape[3]
    return wide if aligned and along % wide == 0 else 1


@pytest.mark.parametrize("device, dtype", cases())
@pytest.mark.parametrize("layout", LAYOUTS)
# 32 channels of 48x48: every dtype's 16-byte width divides C and H*W; 5 of 37x41 divides by none.
@pytest.mark.parametrize("shape", [(2, 32, 48, 48), (3, 5, 37, 41)], ids=str)
# The buffer starts 16-byte aligned, or one element past it.
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
def test_every_op_on_large_slices(device, dtype, layout, shape, aligned):
    """Large enough that the CUDA kernels' loops take several iterations and their reductions several parts."""
    n, c, h, w = shape
    total, offset = c + 16, 8  # x = buf[:, 8:8 + c]: 16-byte aligned in every dtype where buf is

    def buffer(fill=None):
        values = torch.randn(n, total, h, w, dtype=torch.float64) if fill is None else torch.full((n, total, h, w), fill)
        flat = torch.empty(values.numel() + 1, dtype=dtype, device=device)[int(not aligned) :][: values.numel()]
        if layout == "channels_last":
            return flat.view(n, h, w, total).permute(0, 3, 1, 2).copy_(values)
        return flat.view(n, total, h, w).copy_(values)

    def inside(buf):
        return buf[:, offset : offset + c]

    def outside(buf):
        keep = torch.ones(buf.shape[1], dtype=torch.bool)
        keep[offset : offset + c] = False
        return buf[:, keep]

    xbuf, gbuf, obuf, ibuf = buffer(), buffer(), buffer(float("nan")), buffer()
    x, grad_out, out, grad_in = inside(xbuf), inside(gbuf), inside(obuf), inside(ibuf)
    ibuf_before = ibuf.clone()
    if cuda_kernels_run(device):
        expected = ("channels" if layout == "channels_last" else "rows", vector_width(x, aligned))
        assert cuda_abi.plan_of(_ext.load(), x, grad_out, grad_in) == expected

    mean, rstd = ops.batch_stats(x, eps=EPS)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    assert_close(mean, ref_mean, param_dtype(dtype))
    assert_close(rstd, torch.rsqrt(ref_var + EPS), param_dtype(dtype))

    _, _, weight, bias = bn_params(c, dtype, device)
    ops.bn_relu_forward(x, mean, rstd, weight, bias, out)
    assert_close(out, torch.relu(ref_y(x, mean, rstd, weight, bias)), dtype)
    assert outside(obuf).isnan().all()  # nothing written outside the slice

    sums = ops.bn_relu_backward_reduce(grad_out, x, mean, rstd, weight, bias)
    for got, ref in zip(sums, ref_sums(grad_out, x, mean, rstd, weight, bias)):
        assert_close(got, ref, param_dtype(dtype), scale=n * h * w)

    ops.bn_relu_backward_input(grad_out, x, mean, rstd, weight, bias, *sums, grad_in, True)
    ref = inside(ibuf_before).double() + ref_dx(grad_out, x, mean, rstd, weight, bias, *sums, True)
    assert_close(grad_in, ref, dtype, scale=4)
    assert torch.equal(outside(ibuf), outside(ibuf_before))


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
    moments = ops.batch_moments(x)
    assert (moments == 0).all()
    assert all(t.isnan().all() for t in ops.merge_batch_stats(x, torch.stack([moments, moments])))
    params = bn_params(3, torch.float32, device)
    out = torch.empty_like(x)
    ops.bn_relu_forward(x, *params, out)
    sum_g, sum_gx = ops.bn_relu_backward_reduce(x, x, *params)
    assert (sum_g == 0).all() and (sum_gx == 0).all()
    ops.bn_relu_backward_input(x, x, *params, sum_g, sum_gx, torch.empty_like(x), True)


# ---- bad input ----


OPS = ["batch_stats", "batch_moments", "merge_batch_stats", "running_stats", "bn_relu_forward",
       "bn_relu_backward_reduce", "bn_relu_backward_input"]


def good_args(op: str) -> dict:
    x = torch.randn(2, 3, 4, 4)
    mean, rstd, weight, bias = bn_params(3, torch.float32, "cpu")
    bn = dict(mean=mean, rstd=rstd, weight=weight, bias=bias)
    return {
        "batch_stats": dict(x=x, running_mean=torch.zeros(3), running_var=torch.ones(3), momentum=0.1, eps=1e-5),
        "batch_moments": dict(x=x),
        "merge_batch_stats": dict(
            x=x, moments=torch.stack([ops.batch_moments(x), ops.batch_moments(x[:1])]), running_mean=torch.zeros(3),
            running_var=torch.ones(3), momentum=0.1, eps=1e-5,
        ),
        "running_stats": dict(x=x, running_mean=torch.zeros(3), running_var=torch.ones(3), eps=1e-5),
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
    ("batch_stats", "running_mean", lambda: torch.zeros(4), ValueError,
     r"running_mean must have shape \[3\] \(\[C\], C = x.size\(1\)\), got \[4\]"),
    ("batch_stats", "running_var", lambda: torch.ones(3, dtype=torch.int64), TypeError,
     "running_var must have a floating-point dtype, got int64"),
    ("batch_stats", "running_mean", lambda: None, ValueError,
     "running_mean and running_var must both be given or both be None"),
    ("batch_stats", "running_var", lambda: torch.ones(3, device="meta"), ValueError,
     r"running_var must be on the same device as x \(cpu\), got meta"),
    ("batch_moments", "x", lambda: torch.randn(3, 4, 4), ValueError, "x must be 4-D, got 3-D"),
    ("batch_moments", "x", lambda: torch.randn(2, 3, 4, 4).half(), TypeError, "x must have dtype float32 or float64"),
    ("merge_batch_stats", "moments", lambda: torch.zeros(2, 3, 3), TypeError,
     "moments must have dtype float64, got float32"),
    ("merge_batch_stats", "moments", lambda: torch.zeros(3, 3, dtype=torch.float64), ValueError,
     "moments must be 3-D, got 2-D"),
    ("merge_batch_stats", "moments", lambda: torch.zeros(2, 3, 4, dtype=torch.float64), ValueError,
     r"moments must have shape \[W, 3, C\] with W > 0 and C = x.size\(1\) = 3, got \[2, 3, 4\]"),
    ("merge_batch_stats", "moments", lambda: torch.zeros(0, 3, 3, dtype=torch.float64), ValueError,
     r"moments must have shape \[W, 3, C\] with W > 0"),
    ("merge_batch_stats", "moments", lambda: torch.zeros(2, 3, 3, dtype=torch.float64, device="meta"), ValueError,
     r"moments must be on the same device as x \(cpu\), got meta"),
    ("merge_batch_stats", "running_mean", lambda: None, ValueError,
     "running_mean and running_var must both be given or both be None"),
    ("merge_batch_stats", "running_var", lambda: torch.ones(4), ValueError, r"running_var must have shape \[3\]"),
    ("running_stats", "running_mean", lambda: torch.zeros(2), ValueError, r"running_mean must have shape \[3\]"),
    ("running_stats", "running_var", lambda: torch.ones(3, dtype=torch.int64), TypeError,
     "running_var must have a floating-point dtype, got int64"),
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


# fastres._C checks x's device before anything else: a tensor on neither the
# CPU nor a CUDA device (a meta tensor) raises naming the op.
@pytest.mark.parametrize("op", OPS)
def test_tensors_on_other_devices_raise_naming_the_op(op):
    args = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in good_args(op).items()}
    expected = rf"^{op}: fastres\._C runs on CPU and CUDA tensors, got x on meta$"
    with pytest.raises(ValueError, match=expected):
        getattr(ops, op)(**args)
    with pytest.raises(ValueError, match=expected):  # the extension itself, as the wrappers call it
        getattr(_ext.load(), op)(*args.values())


@pytest.mark.parametrize("op", OPS)
def test_half_types_on_cpu_raise_naming_x(op):
    args = {k: v.half() if isinstance(v, torch.Tensor) and v.dim() == 4 else v for k, v in good_args(op).items()}
    with pytest.raises(TypeError, match=rf"^{op}: x must have dtype float32 or float64 on CPU, got float16$"):
        getattr(_ext.load(), op)(*args.values())


# ---- torch.library ----


@pytest.mark.parametrize("op", OPS)
def test_custom_ops_pass_opcheck(op):
    """Each op's torch.library registration: schema, mutations, fake implementation, compile."""
    torch.library.opcheck(getattr(torch.ops.fastres, f"dense_{op}").default, tuple(good_args(op).values()))


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
        "import fastres, fastres.ops.extension\n"
        "from fastres import _ext\n"
        "assert not _ext.available()\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
