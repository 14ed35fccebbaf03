"""Fused blocks and ResNet builders against torchvision's eager ones."""

import copy
import io
from functools import partial

import pytest
import torch
from torch import nn

import fastres
from helpers import (
    assert_forward_as_accurate_as_eager, assert_modules_normwise_close, assert_normwise_close, assert_trains_like,
    train_steps, twin,
)

BUILDERS = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
    "wide_resnet50_2", "wide_resnet101_2",
]


def _downsample(inplanes, outplanes, stride):
    return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False), nn.BatchNorm2d(outplanes))


# (name, block class name, args, kwargs, input channels)
BLOCKS = [
    ("basic", "BasicBlock", (8, 8), {}, 8),
    ("basic_stride2_downsample", "BasicBlock", (3, 8, 2), {"downsample": _downsample(3, 8, 2)}, 3),
    ("bottleneck", "Bottleneck", (16, 4), {}, 16),
    ("bottleneck_groups_width", "Bottleneck", (8, 4, 2), {"downsample": _downsample(8, 16, 2), "groups": 2, "base_width": 32}, 8),
    ("bottleneck_dilated", "Bottleneck", (16, 4), {"dilation": 2}, 16),
]


def _block_pair(tv, cls_name, args, kwargs):
    eager = getattr(tv.models.resnet, cls_name)(*args, **copy.deepcopy(kwargs))
    fused = getattr(fastres.nn, cls_name)(*args, **copy.deepcopy(kwargs))
    return eager, twin(eager, fused)


@pytest.mark.parametrize("name, cls_name, args, kwargs, channels", BLOCKS, ids=[b[0] for b in BLOCKS])
@pytest.mark.parametrize("batch, size", [(1, 7), (3, 5)], ids=["N1_7x7", "N3_5x5"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_block_matches_torchvision(path, device, tv, name, cls_name, args, kwargs, channels, batch, size, channels_last, dtype):
    eager, fused = _block_pair(tv, cls_name, args, kwargs)
    eager, fused = eager.to(device, dtype), fused.to(device, dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    inputs = [torch.randn(batch, channels, size, size, device=device).contiguous(memory_format=fmt) for _ in range(3)]

    # Three SGD steps, then eval. In float32, N=1 at 7x7 makes BN weight gradients cancellations, where
    # eager's own float32 oneDNN convolutions vary run to run by ~1e-5: hence assert_trains_like's float64 twin.
    assert_trains_like(fused, eager, inputs)


@pytest.mark.parametrize("name, cls_name, args, kwargs, channels", BLOCKS[:3], ids=[b[0] for b in BLOCKS[:3]])
def test_block_under_autocast_as_close_as_eager(path, device, tv, name, cls_name, args, kwargs, channels):
    """Under bf16 autocast: eager's dtypes, an output as accurate as eager's, gradients pointing the same way.

    A bf16 ReLU input near zero lands on either side of it depending on the
    order of summation (eager's own oneDNN convolutions differ run to run in
    where they land), and each flip moves the gradients by percents. So the
    gradients are compared by direction (cosine similarity, as
    torch._dynamo's accuracy checks do for low precision); their values are
    held to eager's error op by op in test_batch_norm.py and test_add_relu.py.
    The direction is the whole gradient's, every tensor scaled by its float32
    norm: a BN bias gradient is an 8-element sum of mixed signs, where one
    flip alone turns its own cosine by 1-2% (0.9864 over 30 seeds), while a
    gradient lost or of the wrong sign turns the whole one by 5% or more.
    """
    eager, fused = _block_pair(tv, cls_name, args, kwargs)
    eager, fused = eager.to(device), fused.to(device)
    reference = copy.deepcopy(eager)
    x = torch.randn(4, channels, 8, 8, device=device)
    size = 8 // (args[2] if len(args) > 2 else 1)
    grad = torch.randn(4, args[1] * eager.expansion, size, size, device=device)
    results = []
    for model, autocast in ((fused, True), (eager, True), (reference, False)):
        xl = x.clone().requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(xl)
        out.backward(grad.to(out.dtype))
        results.append([out, xl.grad] + [p.grad for p in model.parameters()])
    (out, *grads), (ref_out, *ref_grads), (fp32_out, *fp32_grads) = results
    assert out.dtype == ref_out.dtype == torch.bfloat16
    fused_err, eager_err = (out.float() - fp32_out).norm(), (ref_out.float() - fp32_out).norm()
    assert fused_err <= 2 * eager_err, (fused_err.item(), eager_err.item())
    assert all(got.dtype == want.dtype == torch.float32 for got, want in zip(grads, ref_grads))

    def direction(gradients):
        return torch.cat([(g / s.norm()).flatten().double() for g, s in zip(gradients, fp32_grads)])

    cosine = torch.nn.functional.cosine_similarity(direction(grads), direction(ref_grads), dim=0)
    assert cosine > 0.99, cosine.item()
    for (n, a), (_, b) in zip(fused.named_buffers(), eager.named_buffers()):
        torch.testing.assert_close(a, b, rtol=2 ** -7, atol=1e-3, msg=n)  # running stats: bf16 inputs


@pytest.mark.parametrize("builder", BUILDERS)
def test_builder_loads_torchvision_state_dict(device, tv, builder):
    """Keys and shapes of every builder, loaded strictly; the forward on the device's own path."""
    eager = getattr(tv.models, builder)(num_classes=10).eval().to(device)
    fused = getattr(fastres.models, builder)(num_classes=10).eval().to(device)
    assert list(fused.state_dict()) == list(eager.state_dict())
    fused.load_state_dict(eager.state_dict())  # strict
    x = torch.randn(1, 3, 32, 32, device=device)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), eager(x), rtol=1.3e-6, atol=1e-5)


# Whole models are compared in float64. In float32 two correct orders of
# summation can put a batch-norm output a few ulps either side of zero; the
# ReLU then passes the gradient in one model and not in the other, and every
# gradient upstream differs by far more than rounding (one such flip in
# resnet18's layer4 moves all earlier gradients by 0.4%). float64 rounding is
# too small to flip a ReLU, so the models must agree to 1e-10 after SGD steps:
# that checks the wiring, the buffers and the step. float32 arithmetic is
# checked op by op and block by block, and by the forward test below.
# The grouped convolutions are torch's own on every path: on CPU, resnext50 runs the reference path only,
# the interpreter the bottlenecks of resnet50.
MODELS = [(p, b, cl) for p in ("triton", "reference") for b, cl in
          [("resnet18", False), ("resnet18", True), ("resnet50", True), ("resnext50_32x4d", False)]
          if torch.cuda.is_available() or p == "reference" or b != "resnext50_32x4d"]
if torch.cuda.is_available():
    MODELS = [m for m in MODELS if m[0] == "triton"]


@pytest.mark.parametrize("path, builder, channels_last", MODELS,
                         ids=[f"{p}-{b}-{'cl' if c else 'nchw'}" for p, b, c in MODELS])
def test_model_training_matches_torchvision(on_path, device, tv, path, builder, channels_last):
    on_path(path)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    eager = getattr(tv.models, builder)(num_classes=10).to(device, torch.float64, memory_format=fmt)
    fused = twin(eager, getattr(fastres.models, builder)(num_classes=10)).to(device, torch.float64, memory_format=fmt)
    # Batch 4 at 64x64: layer4 still normalises 16 values per channel (at
    # 32x32 and batch 2 it normalises 2, and the gradient is noise).
    inputs = [torch.randn(4, 3, 64, 64, device=device).contiguous(memory_format=fmt) for _ in range(2)]
    for got, want in zip(train_steps(fused, inputs), train_steps(eager, inputs)):
        assert_normwise_close(got, want)
    assert_modules_normwise_close(fused, eager)


@pytest.mark.parametrize("builder", ["resnet18", "resnet50"])
def test_model_forward_fp32_matches_torchvision(path, device, tv, builder):
    """float32 forward in train mode (continuous in its inputs: no ReLU flip issue), then eval."""
    eager = getattr(tv.models, builder)(num_classes=10).to(device)
    fused = twin(eager, getattr(fastres.models, builder)(num_classes=10)).to(device)
    x = torch.randn(4, 3, 64, 64, device=device)
    assert_forward_as_accurate_as_eager(fused, eager, x)


KWARGS = [
    ("zero_init_bottleneck", "resnet50", {"zero_init_residual": True}),
    ("zero_init_basic", "resnet18", {"zero_init_residual": True}),
    ("dilation", "resnet50", {"replace_stride_with_dilation": [False, True, True]}),
    ("norm_layer", "resnet34", {"norm_layer": partial(nn.BatchNorm2d, eps=1e-3, momentum=0.2)}),
    ("groups", "resnet50", {"groups": 4, "width_per_group": 16}),
    ("num_classes", "resnet18", {"num_classes": 7}),
]
# On CPU the interpreter takes only the argument its kernels see (the batch norms' eps and momentum); the
# others change the construction and torch's convolutions, checked on the reference path.
KWARGS_CASES = [(p, *k) for p in ("triton", "reference") for k in KWARGS
                if torch.cuda.is_available() or p == "reference" or k[0] == "norm_layer"]
if torch.cuda.is_available():
    KWARGS_CASES = [c for c in KWARGS_CASES if c[0] == "triton"]


@pytest.mark.parametrize("path, case, builder, kwargs", KWARGS_CASES, ids=[f"{c[0]}-{c[1]}" for c in KWARGS_CASES])
def test_builder_keyword_arguments_follow_torchvision(on_path, device, tv, path, case, builder, kwargs):
    on_path(path)
    torch.manual_seed(0)
    eager = getattr(tv.models, builder)(**kwargs).to(device)
    torch.manual_seed(0)
    fused = getattr(fastres.models, builder)(**kwargs).to(device)
    # Same construction order: the same seed gives the same weights.
    for (name, a), (_, b) in zip(fused.state_dict().items(), eager.state_dict().items()):
        assert torch.equal(a, b), name
    eager, fused = eager.double(), fused.double()  # float64, as for whole models above
    x = torch.randn(2, 3, 64, 64, device=device)
    for got, want in zip(train_steps(fused, [x]), train_steps(eager, [x])):
        assert_normwise_close(got, want)
    assert_modules_normwise_close(fused, eager)


def test_state_dict_round_trips_with_torchvision_keys(tv):
    fused = fastres.models.resnet50(num_classes=10)
    buffer = io.BytesIO()
    torch.save(fused.state_dict(), buffer)
    buffer.seek(0)
    eager = tv.models.resnet50(num_classes=10)
    eager.load_state_dict(torch.load(buffer))  # strict: same keys, same shapes
    back = fastres.models.resnet50(num_classes=10)
    back.load_state_dict(eager.state_dict())
    for (name, a), (_, b) in zip(back.state_dict().items(), fused.state_dict().items()):
        assert torch.equal(a, b), name
