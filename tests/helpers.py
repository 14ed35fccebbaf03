"""Comparison helpers for the equality contract."""

import copy

import torch

from fastres.testing import saved_bytes  # noqa: F401 (the tests' name for it)


def layout_strides(t: torch.Tensor) -> tuple:
    """Strides that carry layout: not those of size-1 dims, nor any of an empty tensor."""
    return tuple(s if n > 1 and t.numel() > 0 else None for s, n in zip(t.stride(), t.shape))


def assert_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same values (NaN where eager has NaN), dtype, shape and memory layout."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
    assert layout_strides(actual) == layout_strides(expected), (actual.stride(), expected.stride())


def assert_low_precision_close(actual: torch.Tensor, expected: torch.Tensor, reference: torch.Tensor) -> None:
    """fp16/bf16: within one unit of rounding of the fp32 ``reference``.

    Eager's own rounding is at most half of that; the bound leaves room for
    Triton's interpreter, whose downcast to bf16 truncates instead of rounding.
    """
    eps = torch.finfo(actual.dtype).eps
    bound = eps * reference.abs() + torch.finfo(actual.dtype).tiny
    eager_err = (expected.float() - reference).abs()
    fused_err = (actual.float() - reference).abs()
    assert bool((eager_err <= bound / 2).all()), "eager itself is outside half a unit"
    assert bool((fused_err <= bound).all()), f"max error {fused_err.max().item()} (eager {eager_err.max().item()})"
    assert actual.dtype == expected.dtype
    assert layout_strides(actual) == layout_strides(expected), (actual.stride(), expected.stride())


def assert_modules_match(fused: torch.nn.Module, eager: torch.nn.Module, rtol=1.3e-6, atol=1e-5) -> None:
    """Every parameter, its gradient, and every buffer (BN running stats, num_batches_tracked)."""
    fp, ep = dict(fused.named_parameters()), dict(eager.named_parameters())
    assert fp.keys() == ep.keys()
    for name in fp:
        torch.testing.assert_close(fp[name], ep[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
        if ep[name].grad is None:
            assert fp[name].grad is None, name
        else:
            torch.testing.assert_close(fp[name].grad, ep[name].grad, rtol=rtol, atol=atol, msg=lambda m: f"{name}.grad: {m}")
    fb, eb = dict(fused.named_buffers()), dict(eager.named_buffers())
    assert fb.keys() == eb.keys()
    for name in fb:
        torch.testing.assert_close(fb[name], eb[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def twin(eager: torch.nn.Module, fused: torch.nn.Module) -> torch.nn.Module:
    """``fused`` with ``eager``'s weights and buffers (strict load), same mode."""
    fused.load_state_dict(copy.deepcopy(eager.state_dict()))
    return fused.train(eager.training)


def train_steps(
    model: torch.nn.Module, inputs: list[torch.Tensor], grad_seed: int = 1, lr: float = 0.1, momentum: float = 0.9
) -> list[torch.Tensor]:
    """SGD steps on ``inputs`` with fixed upstream gradients; returns each step's output and input gradient.

    Inputs are cast to the model's dtype. Gradients of the last step are left in
    ``.grad`` for comparison.
    """
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator(device=inputs[0].device).manual_seed(grad_seed)
    outputs = []
    for step, x in enumerate(inputs):
        opt.zero_grad(set_to_none=True)
        x = x.detach().clone().to(next(model.parameters()).dtype).requires_grad_(True)
        out = model(x)
        # Drawn in float32 whatever the model's dtype: every model gets the same numbers.
        grad = torch.randn(out.shape, generator=gen, device=out.device).to(out.dtype)
        out.backward(grad)
        outputs.append(out.detach())
        outputs.append(x.grad)
        if step < len(inputs) - 1:
            opt.step()
    return outputs


# Normwise relative tolerance for results that pass through batch-norm
# reductions, which fastres sums in another order than eager. An element can
# cancel to near zero (a bias gradient, a channel's mean), so the error is
# measured against the whole tensor's norm, not element by element. float64:
# a gradient that is itself a cancellation (the stem's BN weight gradient of a
# small DenseNet has norm 7e-5 from O(1) terms) loses five digits, so 1e-9,
# still seven orders above float64 rounding; any wiring mistake is O(1).
NORMWISE_RTOL = {torch.float32: 1e-5, torch.float64: 1e-9}


def assert_normwise_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    """``||actual - expected|| <= rtol * ||expected||``, same NaN/Inf positions, dtype, shape and layout."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    assert layout_strides(actual) == layout_strides(expected), (name, actual.stride(), expected.stride())
    a, e = actual.detach().double(), expected.detach().double()
    finite = e.isfinite()
    assert torch.equal(a.isfinite(), finite) and torch.equal(a[~finite].isnan(), e[~finite].isnan()), name
    err, scale = (a[finite] - e[finite]).norm().item(), e[finite].norm().item()
    bound = NORMWISE_RTOL[actual.dtype] * scale + torch.finfo(actual.dtype).tiny
    assert err <= bound, f"{name}: normwise error {err:.3g} > {bound:.3g} (||expected|| = {scale:.3g})"


def assert_modules_normwise_close(fused: torch.nn.Module, eager: torch.nn.Module) -> None:
    """``assert_normwise_close`` for every parameter, gradient and float buffer; counters exactly."""
    fp, ep = dict(fused.named_parameters()), dict(eager.named_parameters())
    assert fp.keys() == ep.keys()
    for name in fp:
        assert_normwise_close(fp[name], ep[name], name)
        assert (fp[name].grad is None) == (ep[name].grad is None), name
        if ep[name].grad is not None:
            assert_normwise_close(fp[name].grad, ep[name].grad, f"{name}.grad")
    fb, eb = dict(fused.named_buffers()), dict(eager.named_buffers())
    assert fb.keys() == eb.keys()
    for name in fb:
        if fb[name].is_floating_point():
            assert_normwise_close(fb[name], eb[name], name)
        else:
            assert torch.equal(fb[name], eb[name]), name


def assert_as_accurate_as_eager(actual: torch.Tensor, expected: torch.Tensor, reference: torch.Tensor, name: str = "") -> None:
    """float32 ``actual`` is within 1e-5 (normwise) of the float64 ``reference``, or at most twice as far as eager.

    For results a deep network computes ill-conditioned (a 50-layer forward in
    train mode amplifies rounding to ~4e-5 even in eager): agreement is then
    measured in accuracy against float64, not against eager's own rounding.
    """
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    ref = reference.detach().double()
    fused_err = (actual.detach().double() - ref).norm().item()
    eager_err = (expected.detach().double() - ref).norm().item()
    bound = max(2 * eager_err, NORMWISE_RTOL[torch.float32] * ref.norm().item())
    assert fused_err <= bound, f"{name}: error vs float64 {fused_err:.3g}, eager's {eager_err:.3g}"


def assert_buffers_as_accurate_as_eager(fused: torch.nn.Module, eager: torch.nn.Module, reference: torch.nn.Module) -> None:
    """``assert_as_accurate_as_eager`` for every float buffer (running stats); counters exactly."""
    for (name, a), (_, b), (_, r) in zip(fused.named_buffers(), eager.named_buffers(), reference.named_buffers()):
        if a.is_floating_point():
            assert_as_accurate_as_eager(a, b, r, name)
        else:
            assert torch.equal(a, b), name


def assert_modules_as_accurate_as_eager(fused: torch.nn.Module, eager: torch.nn.Module, reference: torch.nn.Module) -> None:
    """``assert_as_accurate_as_eager`` for every parameter, gradient and float buffer; counters exactly."""
    fp, ep, rp = (dict(m.named_parameters()) for m in (fused, eager, reference))
    assert fp.keys() == ep.keys() == rp.keys()
    for name in fp:
        assert_as_accurate_as_eager(fp[name], ep[name], rp[name], name)
        assert (fp[name].grad is None) == (ep[name].grad is None), name
        if ep[name].grad is not None:
            assert_as_accurate_as_eager(fp[name].grad, ep[name].grad, rp[name].grad, f"{name}.grad")
    assert_buffers_as_accurate_as_eager(fused, eager, reference)


def assert_forward_as_accurate_as_eager(fused: torch.nn.Module, eager: torch.nn.Module, x: torch.Tensor) -> None:
    """float32 forward of whole models against a float64 twin: train mode (outputs, buffers), then eval."""
    reference = copy.deepcopy(eager).double()
    with torch.no_grad():
        assert_as_accurate_as_eager(fused(x), eager(x), reference(x.double()))
        assert_buffers_as_accurate_as_eager(fused, eager, reference)  # running stats, num_batches_tracked
        fused.eval(), eager.eval(), reference.eval()
        assert_as_accurate_as_eager(fused(x), eager(x), reference(x.double()))


# The SGD step of the model comparisons, per dtype. In float32 a small step keeps SGD from amplifying one
# step's rounding into the next step's inputs; in float64 rounding is far below the tolerance even at
# torchvision's usual lr=0.1, momentum=0.9.
STEP = {torch.float32: {"lr": 0.01, "momentum": 0.0}, torch.float64: {"lr": 0.1, "momentum": 0.9}}


def assert_trains_like(fused: torch.nn.Module, eager: torch.nn.Module, inputs: list[torch.Tensor],
                       step: dict | None = None, seed: int = 0) -> None:
    """The equality contract for a module: SGD steps on ``inputs``, then evaluation.

    Training: each step's output and input gradient, then every parameter,
    gradient and BatchNorm buffer (``num_batches_tracked`` exactly). float64
    (the module's dtype) to 1e-9 of eager; float32 as accurate as eager
    against a float64 twin of it (eager's own float32 convolutions vary run
    to run). The global RNG is reset to ``seed`` before each run, so dropout
    draws the same masks. Then evaluation with the running statistics the
    steps produced: no batch reduction left, so normwise to each dtype's
    tolerance. ``step``: SGD's lr and momentum (default ``STEP``).
    """
    dtype = next(eager.parameters()).dtype
    step = STEP[dtype] if step is None else step

    def run(model, xs):
        torch.manual_seed(seed)
        return train_steps(model, xs, **step)

    if dtype == torch.float64:
        for got, want in zip(run(fused, inputs), run(eager, inputs)):
            assert_normwise_close(got, want)
        assert_modules_normwise_close(fused, eager)
    else:
        reference = copy.deepcopy(eager).double()
        runs = run(fused, inputs), run(eager, inputs), run(reference, [t.double() for t in inputs])
        for got, want, exact in zip(*runs):
            assert_as_accurate_as_eager(got, want, exact)
        assert_modules_as_accurate_as_eager(fused, eager, reference)
    fused.eval(), eager.eval()
    with torch.no_grad():
        x = inputs[0].to(dtype)
        assert_normwise_close(fused(x), eager(x))


def assert_steps_like(compiled: torch.nn.Module, fused: torch.nn.Module, eager: torch.nn.Module,
                      inputs: list[torch.Tensor]) -> None:
    """``compiled`` (a compiled ``fused``) against ``eager``: each input's output, a backward with the same
    random gradient, then every parameter, gradient and buffer of ``fused`` (float64, to 1e-9)."""
    for x in inputs:
        out, ref = compiled(x), eager(x)
        assert_normwise_close(out, ref, "out")
        g = torch.randn_like(ref)
        out.backward(g)
        ref.backward(g)
    assert_modules_normwise_close(fused, eager)
