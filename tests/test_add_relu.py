"""fastres.functional.add_relu against eager ``torch.relu(x + identity)``."""

import pytest
import torch

from fastres.functional import add_relu
from helpers import assert_equal, assert_low_precision_close, saved_bytes

SHAPES = [
    (1, 3, 7, 7),
    (2, 3, 7, 7),
    (1, 1, 1, 1),
    (1,),
    (5,),
    (),  # 0-d
    (0, 3, 4, 4),  # empty
    (3, 5, 2, 4, 3),  # 5-D: walked flat
    (2, 33, 40, 25),  # more than one program under the interpreter, with a tail
]


def _layouts(shape):
    """(name, make(tensor) -> view) pairs that make sense for ``shape``."""
    out = [("contiguous", lambda t: t)]
    if len(shape) == 4:
        cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
        out.append(("channels_last", cl))
    if len(shape) >= 2:
        out.append(("transposed", lambda t: t.transpose(0, -1).contiguous().transpose(0, -1)))
    return out


def _make(shape, dtype, device, layout, *, slice_last=False):
    """A tensor of ``shape`` in ``layout``; with ``slice_last``, a strided slice of a wider one."""
    if slice_last and len(shape) >= 1:
        wide = (*shape[:-1], 2 * shape[-1])
        return layout(torch.randn(wide, device=device).to(dtype))[..., ::2]
    return layout(torch.randn(shape, device=device).to(dtype))


def _eager(x, r, inplace):
    if inplace:
        x = x.clone()  # x is a non-leaf here; eager mutates its own copy
        x += r
        return torch.relu_(x)
    return torch.relu(x + r)


def _run(fn, x, r, inplace, grad_out=None):
    """Output and gradients of ``fn`` on fresh leaves copied from x, r."""
    xl, rl = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
    x_in = xl * 1 if inplace else xl  # in-place needs a non-leaf, as in a real block
    out = fn(x_in, rl, inplace) if fn is _eager else fn(x_in, rl, inplace=inplace)
    out.backward(grad_out if grad_out is not None else torch.ones_like(out))
    return out, xl.grad, rl.grad


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_matches_eager(path, device, shape, dtype, inplace):
    for lname, layout in _layouts(shape):
        for rname, rlayout in _layouts(shape):
            x = _make(shape, dtype, device, layout)
            r = _make(shape, dtype, device, rlayout)
            grad = _make(shape, dtype, device, lambda t: t)
            out, dx, dr = _run(add_relu, x, r, inplace, grad)
            ref_out, ref_dx, ref_dr = _run(_eager, x, r, inplace, grad)
            if dtype == torch.float32:
                assert_equal(out, ref_out)
            else:
                assert_low_precision_close(out, ref_out, torch.relu(x.float() + r.float()))
            # The backward only selects dz: exact in every dtype.
            assert_equal(dx, ref_dx)
            assert_equal(dr, ref_dr)


@pytest.mark.parametrize("shape", [(2, 3, 7, 7), (3, 5, 2, 4, 3), (9,)], ids=str)
def test_non_contiguous_views(path, device, shape):
    """Slices (strided, not dense) for either input, and for the in-place target."""
    for x_slice, r_slice in [(True, False), (False, True), (True, True)]:
        x = _make(shape, torch.float32, device, lambda t: t, slice_last=x_slice)
        r = _make(shape, torch.float32, device, lambda t: t, slice_last=r_slice)
        assert_equal(add_relu(x, r), torch.relu(x + r))
        target, expected = x.clone(), x.clone()
        view, expected_view = target[..., ::2], expected[..., ::2]
        add_relu(view, r[..., ::2], inplace=True)
        expected_view += r[..., ::2]
        expected_view.relu_()
        assert_equal(target, expected)  # elements outside the view untouched


def test_expanded_upstream_gradient(path, device):
    """``.sum()`` sends a stride-0 gradient into backward."""
    x = torch.randn(2, 3, 5, 5, device=device)
    r = torch.randn(2, 3, 5, 5, device=device).contiguous(memory_format=torch.channels_last)
    out, dx, dr = _run(add_relu, x, r, False, torch.ones(()).expand(2, 3, 5, 5))
    ref_out, ref_dx, ref_dr = _run(_eager, x, r, False, torch.ones(()).expand(2, 3, 5, 5))
    assert_equal(out, ref_out)
    assert_equal(dx, ref_dx)
    assert_equal(dr, ref_dr)


@pytest.mark.parametrize("wants", [(True, False), (False, True), (False, False)])
def test_requires_grad_follows_eager(path, device, wants):
    x = torch.randn(2, 3, 4, 4, device=device, requires_grad=wants[0])
    r = torch.randn(2, 3, 4, 4, device=device, requires_grad=wants[1])
    out = add_relu(x, r)
    assert out.requires_grad == torch.relu(x + r).requires_grad
    if out.requires_grad:
        out.sum().backward()
        assert (x.grad is None) != wants[0] and (r.grad is None) != wants[1]
    with torch.no_grad():
        assert not add_relu(x, r).requires_grad


def test_inplace_writes_x(path, device):
    base = torch.randn(2, 3, 4, 4, device=device, requires_grad=True)
    x = base * 2
    r = torch.randn(2, 3, 4, 4, device=device)
    version = x._version
    out = add_relu(x, r, inplace=True)
    assert out is x and x._version > version
    assert_equal(out, torch.relu(base.detach() * 2 + r))
    out.sum().backward()
    assert_equal(base.grad, 2.0 * (out > 0).float())


def test_inplace_on_leaf_is_refused_like_eager(path, device):
    x = torch.randn(4, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf"):
        x.add_(1.0)
    with pytest.raises(RuntimeError, match="leaf"):
        add_relu(x, torch.randn(4, device=device), inplace=True)


def test_nan_and_inf_follow_eager(path, device):
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, -1.0], device=device)
    x = special.repeat_interleave(len(special))
    r = special.repeat(len(special))
    grad = torch.tensor([float("nan"), 2.0, float("inf")], device=device).repeat(len(x) // 3 + 1)[: len(x)]
    out, dx, dr = _run(add_relu, x, r, False, grad)
    ref_out, ref_dx, ref_dr = _run(_eager, x, r, False, grad)
    assert_equal(out, ref_out)
    assert_equal(dx, ref_dx)
    assert_equal(dr, ref_dr)


@pytest.mark.parametrize("permute", [False, True], ids=["contiguous", "permuted"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_gradcheck(path, device, permute, inplace):
    def away_from_kink(shape):
        # Keep x + r off the ReLU kink, where the derivative does not exist.
        t = torch.randn(shape, dtype=torch.float64, device=device)
        return t + 0.2 * t.sign()

    x = away_from_kink((2, 3, 3, 2))
    r = torch.zeros_like(x)
    if permute:
        x, r = x.permute(0, 2, 3, 1), r.permute(0, 2, 3, 1).contiguous().transpose(1, 2).contiguous().transpose(1, 2)
    x.requires_grad_()
    r.requires_grad_()
    fn = (lambda a, b: add_relu(a * 1, b, inplace=True)) if inplace else add_relu
    assert torch.autograd.gradcheck(fn, (x, r))


def _expected_mask(z: torch.Tensor) -> torch.Tensor:
    """Bit i (byte i // 8, bit i % 8) is set unless element i of z, in memory order, is <= 0."""
    order = sorted(range(z.dim()), key=lambda d: -z.stride(d))
    bits = (~(z.permute(order) <= 0)).reshape(-1).to(torch.uint8)
    bits = torch.nn.functional.pad(bits, (0, (-bits.numel()) % 8)).view(-1, 8)
    return (bits << torch.arange(8, dtype=torch.uint8, device=z.device)).sum(1, dtype=torch.uint8)


@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (13,)], ids=str)
def test_mask_bits(device, gpu_paths, shape):
    """The saved mask is exactly the documented 1-bit format, NaN counted as kept."""
    x = torch.randn(shape, device=device)
    if len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    x[x.abs() < 0.3] = float("nan")
    r = torch.randn(shape, device=device)
    z, mask = torch.ops.fastres.add_relu(x, r, True)
    assert mask.dtype == torch.uint8 and mask.numel() == (x.numel() + 7) // 8
    assert torch.equal(mask, _expected_mask(z))


def test_raw_ops_need_triton():
    x = torch.randn(4)  # a CPU tensor outside gpu_paths_on_cpu()
    with pytest.raises(RuntimeError, match="fastres::add_relu runs Triton kernels"):
        torch.ops.fastres.add_relu(x, x, True)


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_backward_saves_one_bit_per_element(path, device, inplace):
    shape = (4, 8, 9, 9)
    numel = 4 * 8 * 9 * 9
    saved = {}
    for name, fn in [("fastres", lambda a, b: add_relu(a, b, inplace=inplace)), ("eager", lambda a, b: _eager(a, b, inplace))]:
        x = torch.randn(shape, device=device, requires_grad=True)
        r = torch.randn(shape, device=device, requires_grad=True)
        saved[name] = saved_bytes(lambda: fn(x * 1, r))
    assert saved["eager"] == numel * 4  # relu keeps its fp32 output
    # The Triton path keeps 1 bit per element; the CPU path is eager itself.
    assert saved["fastres"] == ((numel + 7) // 8 if path == "triton" else saved["eager"])


@pytest.mark.parametrize(
    "x_dtype, r_dtype",
    [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.float64)],
    ids=str,
)
def test_inplace_casts_identity_like_eager(path, device, x_dtype, r_dtype):
    """In place, identity may have another dtype, as with ``x += identity`` (autocast)."""
    x = torch.randn(2, 3, 5, 5, device=device).to(x_dtype)
    r = torch.randn(2, 3, 5, 5, device=device).to(r_dtype)
    grad = torch.randn(2, 3, 5, 5, device=device).to(x_dtype)
    out, dx, dr = _run(add_relu, x, r, True, grad)
    ref_out, ref_dx, ref_dr = _run(_eager, x, r, True, grad)
    assert out.dtype == x_dtype and dx.dtype == x_dtype and dr.dtype == r_dtype
    if x_dtype == torch.float32:
        assert_equal(out, ref_out)
    else:
        assert_low_precision_close(out, ref_out, torch.relu(x.double() + r.double()).float())
    assert_equal(dx, ref_dx)
    assert_equal(dr, ref_dr)
