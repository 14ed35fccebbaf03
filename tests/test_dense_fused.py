"""DenseNet blocks and transitions on the fused BN-ReLU-Conv kernels (the CUDA path), against torchvision.

On CPU the kernels run through Triton's interpreter: ``FUSED_ON_CPU``
sends dense blocks there (by default interpreted CPU runs keep the C++ path).
"""

import pytest
import torch

import fastres
from fastres.ops import dense_path, use_triton

from helpers import assert_modules_normwise_close, assert_normwise_close, saved_bytes, train_steps, twin

STEP = {"lr": 0.1, "momentum": 0.9}


@pytest.fixture
def fused_path(device, monkeypatch):
    """Dense blocks and transitions on the fused kernels, on this device."""
    if device.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setattr(dense_path, "FUSED_ON_CPU", True)
    if not use_triton(torch.empty(0, device=device)):
        pytest.skip("needs the Triton path")


def _compare(fused, eager, inputs):
    torch.manual_seed(0)
    got = train_steps(fused, inputs, **STEP)
    torch.manual_seed(0)
    want = train_steps(eager, inputs, **STEP)
    for g, w in zip(got, want):
        assert_normwise_close(g, w)
    assert_modules_normwise_close(fused, eager)
    fused.eval(), eager.eval()
    with torch.no_grad():
        assert_normwise_close(fused(inputs[0].double()), eager(inputs[0].double()))


@pytest.mark.parametrize("channels_last,drop_rate", [(False, 0.0), (True, 0.25)], ids=["nchw", "channels_last-dropout"])
def test_dense_block_matches_torchvision(device, tv, fused_path, channels_last, drop_rate):
    eager = tv.models.densenet._DenseBlock(3, 5, 2, 3, drop_rate=drop_rate)
    fused = twin(eager, fastres.nn.DenseBlock(3, 5, 2, 3, drop_rate=drop_rate))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    eager, fused = (m.to(device, torch.float64) for m in (eager, fused))
    inputs = [torch.randn(2, 5, 5, 5, device=device).contiguous(memory_format=fmt) for _ in range(2)]
    _compare(fused, eager, inputs)


def test_dense_block_runs_the_fused_function(device, fused_path):
    block = fastres.nn.DenseBlock(2, 4, 2, 3).to(device)
    out = block(torch.randn(2, 4, 5, 5, device=device, requires_grad=True))
    assert type(out.grad_fn).__name__ == "FusedDenseBlockFunctionBackward"


def test_odd_widths_and_one_pixel(device, tv, fused_path):
    """DenseNet-BC-like odd channel counts (C0 3, k 5: no multiple of 16 anywhere), N 1, 1x1 spatial."""
    eager = tv.models.densenet._DenseBlock(2, 3, 3, 5, drop_rate=0.0)
    fused = twin(eager, fastres.nn.DenseBlock(2, 3, 3, 5))
    eager, fused = (m.to(device, torch.float64) for m in (eager, fused))
    _compare(fused, eager, [torch.randn(2, 3, 1, 1, device=device)])
    eager.train(), fused.train()
    _compare(fused, eager, [torch.randn(1, 3, 4, 4, device=device)])


def test_transition_matches_torchvision(device, tv, fused_path):
    eager = tv.models.densenet._Transition(6, 3)
    fused = twin(eager, fastres.nn.Transition(6, 3))
    eager, fused = (m.to(device, torch.float64) for m in (eager, fused))
    _compare(fused, eager, [torch.randn(2, 6, 6, 6, device=device) for _ in range(2)])


def test_model_matches_torchvision(device, tv, fused_path):
    # test_densenet.py's tiny model (smaller images leave the stem's gradients at rounding level).
    config = {"growth_rate": 4, "block_config": (2, 3, 2), "num_init_features": 8, "bn_size": 2, "num_classes": 5}
    eager = tv.models.DenseNet(**config, drop_rate=0.1)
    fused = twin(eager, fastres.models.DenseNet(**config, drop_rate=0.1))
    eager, fused = (m.to(device, torch.float64, memory_format=torch.channels_last) for m in (eager, fused))
    inputs = [torch.randn(3, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)]
    _compare(fused, eager, inputs)


def test_feature_statistics_are_reduced_once_per_channel(device, fused_path, monkeypatch):
    """Per block: the input's channels and each layer's new ones once, each bottleneck once; never a concatenation."""
    from fastres.ops import kernels

    bn = kernels("batch_norm")
    reduced = []
    stats = bn.batch_norm_stats
    monkeypatch.setattr(bn, "batch_norm_stats", lambda x, shape, *a, **k: reduced.append(shape[1]) or stats(x, shape, *a, **k))
    block = fastres.nn.DenseBlock(4, 5, 2, 3).to(device)
    block(torch.randn(2, 5, 4, 4, device=device, requires_grad=True)).sum().backward()
    # Block input (5), the new channels of the first three layers (3 each; the last layer's are read by
    # no later layer), and each layer's bottleneck (6).
    assert sorted(reduced) == sorted([5, 3, 3, 3] + [6] * 4)


def test_no_bn_relu_output_is_kept(device, fused_path):
    """Autograd keeps the block's buffer and, per layer, the bottleneck and per-channel vectors: nothing else."""
    n, c0, k, bottleneck, hw, layers = 2, 6, 3, 6, 16, 3
    block = fastres.nn.DenseBlock(layers, c0, 2, k).to(device)
    x = torch.randn(n, c0, 4, 4, device=device, requires_grad=True)
    kept = saved_bytes(lambda: block(x))
    features = n * (c0 + layers * k) * hw * 4
    per_layer = [n * bottleneck * hw * 4 + 4 * (2 * (c0 + i * k) + 1) + 4 * (2 * bottleneck + 1) for i in range(layers)]
    assert kept == features + sum(per_layer)


def test_running_statistics_updated_once(device, fused_path):
    block = fastres.nn.DenseBlock(2, 4, 2, 3).to(device)
    out = block(torch.randn(2, 4, 5, 5, device=device, requires_grad=True))
    before = {name: b.clone() for name, b in block.named_buffers()}
    out.sum().backward()
    for name, b in block.named_buffers():
        assert torch.equal(b, before[name]), name
    assert all(layer.norm1.num_batches_tracked.item() == 1 for layer in block.values())


def test_double_backward_is_refused_clearly(device, fused_path):
    block = fastres.nn.DenseBlock(2, 4, 2, 3).to(device)
    x = torch.randn(2, 4, 5, 5, device=device, requires_grad=True)
    out = block(x)
    with pytest.raises(RuntimeError, match="memory_efficient=False"):
        torch.autograd.grad(out.sum(), x, create_graph=True)
