"""No op waits for the device: nothing reads a tensor's value on the host, on the Triton path.

A host read (``.item()``, ``bool(t)``, ``torch.equal``, a device-to-host copy)
stalls the CPU until the GPU catches up, and breaks CUDA-graph capture. Every
fused op's forward and backward, dense blocks and a ``convert()``ed model
included, runs here under a dispatch mode that fails on any of them. Without
a GPU the ops run through Triton's interpreter, which reads kernel arguments
on the host by itself: its launches are let through (they are the GPU's
kernels), nothing else is.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastres
from fastres.functional import add_relu, batch_norm_relu, bn_relu_conv2d

HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
              torch.ops.aten.equal.default}


class FailOnHostRead(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            if func in HOST_READS:
                raise AssertionError(f"host read: {func}")
            if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
                src = args[1] if func is torch.ops.aten.copy_.default else args[0]
                dst_device = args[0].device if func is torch.ops.aten.copy_.default else kwargs.get("device")
                if src.device.type == "cuda" and dst_device is not None and torch.device(dst_device).type == "cpu":
                    raise AssertionError(f"device-to-host copy: {func}")
        return func(*args, **kwargs)


@pytest.fixture
def no_host_reads(device, gpu_paths, monkeypatch):
    """Yields the mode; interpreted kernel launches run outside it (they stand for the GPU's kernels)."""
    mode = FailOnHostRead()
    from triton.runtime import interpreter

    run = interpreter.InterpretedFunction.run

    def paused_run(self, *args, **kwargs):
        mode.paused += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            mode.paused -= 1

    if device.type == "cpu":
        monkeypatch.setattr(interpreter.InterpretedFunction, "run", paused_run)
    return mode


def _leaf(*shape, device, fmt=torch.contiguous_format):
    return torch.randn(*shape, device=device).contiguous(memory_format=fmt).requires_grad_()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_fused_ops(device, no_host_reads, training, fmt):
    c = 16
    x, r = _leaf(2, c, 5, 5, device=device, fmt=fmt), _leaf(2, c, 5, 5, device=device, fmt=fmt)
    w, b = _leaf(c, device=device), _leaf(c, device=device)
    cw = _leaf(8, c, 3, 3, device=device)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    with no_host_reads:
        y = add_relu(x, r)
        y = batch_norm_relu(y, rm, rv, w, b, training, 0.1, 1e-5, r)
        y = bn_relu_conv2d(y, rm, rv, w, b, cw, None, 2, 1, training=training)
        y.backward(torch.ones_like(y))
    assert x.grad is not None and cw.grad is not None


@pytest.mark.parametrize("conv_path", ["fused", "unfused"])
def test_dense_network_and_converted_resnet(device, no_host_reads, monkeypatch, tv, conv_path):
    monkeypatch.setenv("FASTRES_CONV_PATH", conv_path)
    dense = fastres.models.densenet_bc(depth=10, growth_rate=4, num_classes=3).to(device)
    resnet = fastres.convert(tv.models.resnet18(num_classes=3)).to(device)
    x = torch.randn(2, 3, 16, 16, device=device)
    with no_host_reads:
        for model in (dense, resnet):
            model(x).sum().backward()
    assert all(p.grad is not None for p in dense.parameters())
