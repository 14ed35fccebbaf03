"""Comparison helpers for the equality contract."""

import copy

import torch


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


def train_steps(model: torch.nn.Module, inputs: list[torch.Tensor], grad_seed: int = 1) -> list[torch.Tensor]:
    """SGD steps on ``inputs`` with fixed upstream gradients; returns each step's output.

    Gradients of the last step are left in ``.grad`` for comparison.
    """
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator(device=inputs[0].device).manual_seed(grad_seed)
    outputs = []
    for step, x in enumerate(inputs):
        opt.zero_grad(set_to_none=True)
        x = x.detach().clone().requires_grad_(True)
        out = model(x)
        grad = torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)
        out.backward(grad)
        outputs.append(out.detach())
        outputs.append(x.grad)
        if step < len(inputs) - 1:
            opt.step()
    return outputs
