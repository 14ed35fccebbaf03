"""A call that fails part-way leaves a module's state as it was, and the error reaches the caller unchanged.

Each launch of each fused op is made to raise in turn, forward and backward:
on the GPU paths every Triton kernel launch (through Triton's interpreter
here), on the CPU path every operator call (ATen's and ``fastres._C``'s,
counted by a TorchDispatchMode). After each failure the module's
parameters, running statistics and ``num_batches_tracked`` must equal what
they were before the call, bit for bit, and the exception must be the very
object raised.
"""

import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastres
from fastres.kernels import launch


class Injected(Exception):
    pass


class Counter:
    """Counts launches; raises ``error`` at launch number ``at`` (1-based) when given."""

    def __init__(self, at: int | None = None):
        self.count, self.at, self.error = 0, at, Injected(f"launch {at}")

    def tick(self) -> None:
        self.count += 1
        if self.count == self.at:
            raise self.error


@contextlib.contextmanager
def triton_launches(counter: Counter):
    call = launch.Kernel.__call__

    def counting(self, *args, **kwargs):
        counter.tick()
        return call(self, *args, **kwargs)

    launch.Kernel.__call__ = counting
    try:
        yield
    finally:
        launch.Kernel.__call__ = call


class _OperatorCalls(TorchDispatchMode):
    def __init__(self, counter: Counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in (torch.ops.aten.detach.default, torch.ops.prim.device.default):  # bookkeeping, not compute
            self.counter.tick()
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def operator_calls(counter: Counter):
    with _OperatorCalls(counter):
        yield


def _state(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_state(module: nn.Module, before: dict, when: str) -> None:
    now = module.state_dict()
    changed = [k for k in before if not torch.equal(now[k], before[k])]
    assert not changed, f"{when}: changed {changed[:4]}"


def _make(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6)
    if name == "BatchNormReLU2d":
        return fastres.nn.BatchNormReLU2d(8), x
    if name == "BNReLUConv2d":
        return fastres.nn.BNReLUConv2d(8, 4, kernel_size=3, padding=1), x
    if name == "BasicBlock":
        down = nn.Sequential(nn.Conv2d(8, 4, 1, stride=2, bias=False), nn.BatchNorm2d(4))
        return fastres.nn.BasicBlock(8, 4, stride=2, downsample=down), x
    if name == "Bottleneck":
        down = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
        return fastres.nn.Bottleneck(8, 2, downsample=down), x
    if name == "PreActBottleneck":
        return fastres.nn.PreActBottleneck(8, 8), x
    if name == "DenseBlock":
        return fastres.nn.DenseBlock(2, 8, bn_size=2, growth_rate=4, memory_efficient=True), x
    if name == "Transition":
        return fastres.nn.Transition(8, 4), x
    if name == "densenet_bc":
        return fastres.models.densenet_bc(10, 4), torch.randn(2, 3, 8, 8)
    raise KeyError(name)


MODULES = ["BatchNormReLU2d", "BNReLUConv2d", "BasicBlock", "Bottleneck", "PreActBottleneck", "DenseBlock",
           "Transition", "densenet_bc"]


def _each_failure(module: nn.Module, x: torch.Tensor, injector, every: int = 1) -> tuple[int, int]:
    """Fails each forward launch, then each backward launch, in turn (``every``: each such one, and the
    last); returns how many of each there are."""
    counted, m = Counter(), copy.deepcopy(module)
    with injector(counted):
        m(x)
    forward_launches = counted.count
    for at in sorted({*range(1, forward_launches + 1, every), forward_launches}):
        m = copy.deepcopy(module)
        before = _state(m)
        counter = Counter(at)
        with pytest.raises(Injected) as raised, injector(counter):
            m(x)
        assert raised.value is counter.error
        _assert_state(m, before, f"forward launch {at} of {forward_launches}")

    m = copy.deepcopy(module)
    out = m(x)
    grad = torch.randn_like(out)
    counted = Counter()
    with injector(counted):
        out.backward(grad, retain_graph=True)
    backward_launches = counted.count
    for at in sorted({*range(1, backward_launches + 1, every), backward_launches}):
        m = copy.deepcopy(module)
        out = m(x)
        before = _state(m)
        counter = Counter(at)
        with pytest.raises(Injected) as raised, injector(counter):
            out.backward(grad)
        assert raised.value is counter.error
        _assert_state(m, before, f"backward launch {at} of {backward_launches}")
    return forward_launches, backward_launches


@pytest.mark.parametrize("name", MODULES)
def test_each_triton_launch_failing_leaves_the_state_as_before(gpu_paths, name):
    module, x = _make(name)
    x = x.requires_grad_()
    # The whole model's launches are its modules' (each failed in turn above): every third one here.
    forward, backward = _each_failure(module.train(), x, triton_launches, every=3 if name == "densenet_bc" else 1)
    assert forward >= 2 and backward >= 1  # the module ran on Triton kernels


@pytest.mark.parametrize("name", MODULES)
def test_each_cpu_operator_failing_leaves_the_state_as_before(name):
    module, x = _make(name)
    x = x.requires_grad_()
    forward, backward = _each_failure(module.train(), x, operator_calls)
    assert forward >= 2 and backward >= 1


def test_the_check_fails_without_the_restore(monkeypatch, gpu_paths):
    """Without the restore a failure after the statistics kernel leaves the running statistics updated."""
    import fastres.nn.atomic as atomic

    monkeypatch.setattr(atomic, "_training_buffers", lambda norms: [])
    module, x = _make("BatchNormReLU2d")
    with pytest.raises(AssertionError, match="changed"):
        _each_failure(module.train(), x, triton_launches)
