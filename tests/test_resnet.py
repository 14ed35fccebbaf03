"""Fused blocks and ResNet builders against torchvision's eager ones."""

import copy
import io
from functools import partial

import pytest
import torch
from torch import nn

import fastres
from helpers import assert_modules_match, train_steps, twin

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
def test_block_matches_torchvision(path, device, tv, name, cls_name, args, kwargs, channels, batch, size, channels_last):
    eager, fused = _block_pair(tv, cls_name, args, kwargs)
    eager, fused = eager.to(device), fused.to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    inputs = [torch.randn(batch, channels, size, size, device=device).contiguous(memory_format=fmt) for _ in range(3)]

    # Training: outputs, input gradients, and after three SGD steps every
    # parameter, gradient and BatchNorm buffer.
    for got, want in zip(train_steps(fused, inputs), train_steps(eager, inputs)):
        torch.testing.assert_close(got, want, rtol=1.3e-6, atol=1e-5)
        assert got.is_contiguous(memory_format=fmt) == want.is_contiguous(memory_format=fmt)
    assert_modules_match(fused, eager)

    # Evaluation with the running statistics the steps produced.
    fused.eval(), eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(inputs[0]), eager(inputs[0]), rtol=1.3e-6, atol=1e-5)


@pytest.mark.parametrize("name, cls_name, args, kwargs, channels", BLOCKS[:3], ids=[b[0] for b in BLOCKS[:3]])
def test_block_under_autocast_matches_torchvision(path, device, tv, name, cls_name, args, kwargs, channels):
    """Under autocast a block sees an fp32 input and a bf16 branch: merged as ``+=`` does."""
    eager, fused = _block_pair(tv, cls_name, args, kwargs)
    eager, fused = eager.to(device), fused.to(device)
    x = torch.randn(2, channels, 6, 6, device=device)
    size = 6 // (args[2] if len(args) > 2 else 1)
    grad = torch.randn(2, args[1] * eager.expansion, size, size, device=device)
    results = []
    for model in (fused, eager):
        xl = x.clone().requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(xl)
        out.backward(grad.to(out.dtype))
        results.append((out, xl.grad))
    (out, dx), (ref_out, ref_dx) = results
    assert out.dtype == ref_out.dtype == torch.bfloat16 and dx.dtype == torch.float32
    # Same bf16 branch, same fp32 sum: within one bf16 rounding (interpreter truncation).
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=2 ** -7, atol=0)
    # Backward selects the same gradients (same signs), then runs the same ops.
    torch.testing.assert_close(dx, ref_dx)
    assert_modules_match(fused, eager)


@pytest.mark.parametrize("builder", BUILDERS)
def test_builder_loads_torchvision_state_dict(path, device, tv, builder):
    eager = getattr(tv.models, builder)(num_classes=10).eval().to(device)
    fused = getattr(fastres.models, builder)(num_classes=10).eval().to(device)
    assert list(fused.state_dict()) == list(eager.state_dict())
    fused.load_state_dict(eager.state_dict())  # strict
    x = torch.randn(1, 3, 32, 32, device=device)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), eager(x), rtol=1.3e-6, atol=1e-5)


@pytest.mark.parametrize("builder", ["resnet18", "resnet50", "resnext50_32x4d"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_model_training_matches_torchvision(path, device, tv, builder, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    eager = getattr(tv.models, builder)(num_classes=10).to(device, memory_format=fmt)
    fused = twin(eager, getattr(fastres.models, builder)(num_classes=10)).to(device, memory_format=fmt)
    inputs = [torch.randn(2, 3, 32, 32, device=device).contiguous(memory_format=fmt) for _ in range(2)]
    for got, want in zip(train_steps(fused, inputs), train_steps(eager, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_modules_match(fused, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "builder, kwargs",
    [
        ("resnet50", {"zero_init_residual": True}),
        ("resnet18", {"zero_init_residual": True}),
        ("resnet50", {"replace_stride_with_dilation": [False, True, True]}),
        ("resnet34", {"norm_layer": partial(nn.BatchNorm2d, eps=1e-3, momentum=0.2)}),
        ("resnet50", {"groups": 4, "width_per_group": 16}),
        ("resnet18", {"num_classes": 7}),
    ],
    ids=["zero_init_bottleneck", "zero_init_basic", "dilation", "norm_layer", "groups", "num_classes"],
)
def test_builder_keyword_arguments_follow_torchvision(path, device, tv, builder, kwargs):
    torch.manual_seed(0)
    eager = getattr(tv.models, builder)(**kwargs).to(device)
    torch.manual_seed(0)
    fused = getattr(fastres.models, builder)(**kwargs).to(device)
    # Same construction order: the same seed gives the same weights.
    for (name, a), (_, b) in zip(fused.state_dict().items(), eager.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.randn(2, 3, 32, 32, device=device)
    for got, want in zip(train_steps(fused, [x]), train_steps(eager, [x])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_modules_match(fused, eager, rtol=1e-5, atol=1e-5)


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


def test_weights_argument_takes_torchvision_style_weights(tv):
    source = tv.models.resnet18(num_classes=3)

    class Weights:  # what torchvision's weight enums provide
        meta = {"categories": ["a", "b", "c"]}

        def get_state_dict(self, progress, check_hash):
            return source.state_dict()

    model = fastres.models.resnet18(weights=Weights())
    assert model.fc.out_features == 3
    assert torch.equal(model.fc.weight, source.fc.weight)
