"""Pre-activation blocks and ResNetV2 builders against timm's (``timm.models.resnetv2``, BatchNorm variants)."""

import copy
import sys

import pytest
import torch
from torch import nn

import fastres
from helpers import (
    assert_forward_as_accurate_as_eager, assert_modules_normwise_close, assert_normwise_close, assert_trains_like,
    saved_bytes, train_steps, twin,
)

BUILDERS = [
    "resnetv2_18", "resnetv2_18d", "resnetv2_34", "resnetv2_34d", "resnetv2_50", "resnetv2_50d",
    "resnetv2_101", "resnetv2_101d", "resnetv2_152", "resnetv2_152d",
]

# SGD step sizes as in test_resnet.py: small in float32 so one step's rounding is not amplified.


def _timm_block(timm, kind: str, in_chs: int, out_chs: int, stride: int, proj: str | None):
    from timm.layers import BatchNormAct2d, create_conv2d
    from timm.models import resnetv2

    cls = resnetv2.PreActBasic if kind == "basic" else resnetv2.PreActBottleneck
    proj_layer = {None: None, "conv": resnetv2.DownsampleConv, "avg": resnetv2.DownsampleAvg}[proj]
    return cls(in_chs, out_chs, stride=stride, proj_layer=proj_layer, norm_layer=BatchNormAct2d,
               conv_layer=create_conv2d)


def _fastres_block(kind: str, in_chs: int, out_chs: int, stride: int, proj: str | None):
    cls = fastres.nn.PreActBasicBlock if kind == "basic" else fastres.nn.PreActBottleneck
    proj_layer = {None: None, "conv": fastres.nn.DownsampleConv, "avg": fastres.nn.DownsampleAvg}[proj]
    return cls(in_chs, out_chs, stride=stride, proj_layer=proj_layer)


# (id, kind, in_chs, out_chs, stride, projection)
BLOCKS = [
    ("basic_stride2_proj", "basic", 6, 8, 2, "conv"),
    ("bottleneck", "bottleneck", 16, 16, 1, None),
    ("bottleneck_stride2_proj", "bottleneck", 8, 16, 2, "conv"),
    ("bottleneck_stride2_avg_proj", "bottleneck", 8, 16, 2, "avg"),
]


@pytest.mark.parametrize("name, kind, in_chs, out_chs, stride, proj", BLOCKS, ids=[b[0] for b in BLOCKS])
@pytest.mark.parametrize("batch, size", [(1, 7), (3, 5)], ids=["N1_7x7", "N3_5x5"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_block_matches_timm(path, device, timm, name, kind, in_chs, out_chs, stride, proj, batch, size,
                            channels_last, dtype):
    eager = _timm_block(timm, kind, in_chs, out_chs, stride, proj)
    fused = twin(eager, _fastres_block(kind, in_chs, out_chs, stride, proj))
    assert list(fused.state_dict()) == list(eager.state_dict())  # timm's keys in timm's order
    eager, fused = eager.to(device, dtype), fused.to(device, dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    inputs = [torch.randn(batch, in_chs, size, size, device=device).contiguous(memory_format=fmt) for _ in range(3)]
    assert_trains_like(fused, eager, inputs)  # three SGD steps, then eval


def test_block_runs_one_fused_op_per_convolution_and_keeps_no_pre_activation(device, gpu_paths, monkeypatch, timm):
    """Each convolution is one bn_relu_conv2d on its input; the projection shares norm1 without a stored norm1(x)."""
    calls = []
    module = sys.modules["fastres.nn.bn_relu_conv"]  # the attribute fastres.nn.bn_relu_conv is the function
    original = module.bn_relu_conv2d

    def spy(x, running_mean, *args, **kwargs):
        calls.append((tuple(x.shape), running_mean is not None))
        return original(x, running_mean, *args, **kwargs)

    monkeypatch.setattr(module, "bn_relu_conv2d", spy)
    eager = _timm_block(timm, "bottleneck", 8, 16, 2, "conv").to(device)
    block = twin(eager, _fastres_block("bottleneck", 8, 16, 2, "conv")).to(device)
    x = torch.randn(2, 8, 6, 6, device=device, requires_grad=True)
    fused_saved = saved_bytes(lambda: block(x))
    # norm1 feeds conv1 and the projection, both reading x (the second without a second running-statistics
    # update); norm2 and norm3 feed conv2 (stride 2) and conv3. Bottleneck width: timm's make_divisible, 8.
    assert calls == [((2, 8, 6, 6), True), ((2, 8, 6, 6), False), ((2, 8, 6, 6), True), ((2, 8, 3, 3), True)]
    assert int(block.norm1.num_batches_tracked) == 1
    # Autograd keeps each convolution's input (x, conv1's and conv2's outputs) and per-channel statistics,
    # no BN-ReLU output: at most two 8-channel [2C+1] float32 vectors per op besides.
    inputs = 2 * 8 * 6 * 6 * 4 * 2 + 2 * 8 * 3 * 3 * 4
    assert inputs <= fused_saved <= inputs + 4 * 2 * (2 * 8 + 1) * 4
    assert fused_saved < saved_bytes(lambda: eager(x)) / 1.9  # timm keeps x and every BN-ReLU output too


@pytest.mark.parametrize("builder", BUILDERS)
def test_builder_has_timms_state_dict_and_initialisation(timm, builder):
    torch.manual_seed(0)
    eager = timm.create_model(builder, num_classes=10)
    torch.manual_seed(0)
    fused = getattr(fastres.models, builder)(num_classes=10)
    assert list(fused.state_dict()) == list(eager.state_dict())  # timm's keys, in timm's order
    for (name, a), (_, b) in zip(fused.state_dict().items(), eager.state_dict().items()):
        assert torch.equal(a, b), name  # same construction and init order: same seed, same weights
    fused.load_state_dict(timm.create_model(builder, num_classes=10).state_dict())  # strict


def _models(timm, builder, dtype, fmt=torch.contiguous_format, **kwargs):
    eager = timm.create_model(builder, **kwargs).to(dtype, memory_format=fmt)
    fused = twin(eager, getattr(fastres.models, builder)(**kwargs)).to(dtype, memory_format=fmt)
    return eager, fused


# Whole models in float64, three passes with two SGD steps between (the interpreter: two and one), batch 4 at 64x64: the last stage normalises 16 values per
# channel. (At 32x32 it normalises 4, and eager timm itself then moves by 3e-8 between NCHW and
# channels_last after two steps: too ill-conditioned to check wiring at 1e-9.) On a GPU every builder
# runs the kernels at full width. On CPU every builder runs the reference path at a quarter of the width
# (the wiring, which width does not change; full widths are checked against timm's state_dicts above),
# and the interpreter (one program at a time) runs resnetv2_50d at an eighth of the width: bottlenecks
# behind the deep stem, average-pooled projections (the 1x1 projections and basic blocks run the kernels
# in test_block_matches_timm).
TRAIN_CASES = (
    [(b, "triton", 1) for b in BUILDERS] if torch.cuda.is_available()
    else [(b, "reference", 0.25) for b in BUILDERS] + [("resnetv2_50d", "triton", 0.125)]
)


@pytest.mark.parametrize("builder, path, width", TRAIN_CASES, ids=[f"{b}-{p}-x{w}" for b, p, w in TRAIN_CASES])
def test_builder_trains_like_timm(on_path, device, timm, builder, path, width):
    on_path(path)
    eager, fused = _models(timm, builder, torch.float64, num_classes=10, width_factor=width)
    steps = 2 if path == "triton" and device.type == "cpu" else 3  # the interpreter: one SGD step, else two
    inputs = [torch.randn(4, 3, 64, 64, device=device) for _ in range(steps)]
    eager, fused = eager.to(device), fused.to(device)
    for got, want in zip(train_steps(fused, inputs), train_steps(eager, inputs)):
        assert_normwise_close(got, want)
    assert_modules_normwise_close(fused, eager)
    eager.eval(), fused.eval()
    with torch.no_grad():
        assert_normwise_close(fused(inputs[0].double()), eager(inputs[0].double()))


@pytest.mark.parametrize("builder", ["resnetv2_18", "resnetv2_50d"])
def test_model_forward_fp32_as_accurate_as_timm(path, device, timm, builder):
    """float32 forward in train mode (outputs, running statistics), then eval, against a float64 twin."""
    width = 0.125 if path == "triton" and device.type == "cpu" else 1
    eager, fused = _models(timm, builder, torch.float32, num_classes=10, width_factor=width)
    x = torch.randn(4, 3, 64, 64, device=device)
    assert_forward_as_accurate_as_eager(fused.to(device), eager.to(device), x)


KWARGS = [
    ("resnetv2_50", {"num_classes": 0}),
    ("resnetv2_18", {"in_chans": 1, "global_pool": "max"}),
    ("resnetv2_50", {"output_stride": 16}),
    ("resnetv2_18", {"output_stride": 8}),
    ("resnetv2_50d", {"output_stride": 16}),  # a dilated average-pooled projection: 'SAME'-padded pooling
    ("resnetv2_18", {"global_pool": ""}),  # no pooling: a class map
    ("resnetv2_50", {"zero_init_last": True, "stem_chs": 32}),
    ("resnetv2_18d", {"width_factor": 0.5}),
    ("resnetv2_50d", {"drop_rate": 0.5, "drop_path_rate": 0.3}),
]


@pytest.mark.parametrize("builder, kwargs", KWARGS, ids=[f"{b}-{'-'.join(k)}" for b, k in KWARGS])
def test_builder_keyword_arguments_follow_timm(monkeypatch, device, timm, builder, kwargs):
    """Same seed, same weights; then one training step in float64 with the same random draws (dropout, drop path).

    Full-width models: on CPU the reference path (the interpreter runs the kernels in the tests above).
    """
    torch.manual_seed(0)
    eager = timm.create_model(builder, **kwargs)
    torch.manual_seed(0)
    fused = getattr(fastres.models, builder)(**kwargs)
    for (name, a), (_, b) in zip(fused.state_dict().items(), eager.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    eager, fused = eager.to(device, torch.float64), fused.to(device, torch.float64)
    x = torch.randn(4, kwargs.get("in_chans", 3), 32, 32, device=device, dtype=torch.float64)
    outs = []
    for model in (fused, eager):
        torch.manual_seed(1)
        xl = x.clone().requires_grad_()
        out = model(xl)
        out.backward(torch.ones_like(out))
        outs += [out, xl.grad]
    assert_normwise_close(outs[0], outs[2])
    assert_normwise_close(outs[1], outs[3])
    assert_modules_normwise_close(fused, eager)
    assert fused.num_features == eager.num_features


def test_small_inputs_stem_is_one_3x3_convolution(monkeypatch):
    model = fastres.models.resnetv2_18(num_classes=10, small_inputs=True)
    assert list(model.stem._modules) == ["conv"] and model.stem.conv.kernel_size == (3, 3)
    assert model.stem.conv.stride == (1, 1) and model.stem.conv.padding == (1, 1)
    x = torch.randn(2, 3, 32, 32)
    assert model.stem(x).shape == (2, 64, 32, 32)  # full resolution into the first stage
    assert model(x).shape == (2, 10)
    assert model.forward_features(x).shape == (2, 512, 4, 4)


def test_classifier_api_follows_timm(monkeypatch, timm):
    torch.manual_seed(0)
    eager, fused = _models(timm, "resnetv2_18", torch.float32, num_classes=10)
    eager.eval(), fused.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused.forward_head(fused.forward_features(x), pre_logits=True),
                                   eager.forward_head(eager.forward_features(x), pre_logits=True))
    assert type(fused.get_classifier()) is nn.Conv2d and fused.get_classifier().out_channels == 10
    fused.reset_classifier(0)
    with torch.no_grad():
        assert fused(x).shape == (2, 512)
    fused.reset_classifier(5, "max")
    assert fused(x).shape == (2, 5) and fused.head.pool_type == "max"
    fused.load_state_dict({k: v for k, v in eager.state_dict().items() if not k.startswith("head")}, strict=False)


def test_batch_norm_converters_keep_the_computation(path, device, timm):
    """The norms are plain BatchNorm2d (the ReLUs the blocks'): SyncBatchNorm and frozen-BN converters keep the model."""
    from timm.layers import freeze_batch_norm_2d

    model = fastres.models.resnetv2_18d(num_classes=10, width_factor=0.125).to(device)
    train_steps(model, [torch.randn(4, 3, 32, 32, device=device)])  # running statistics away from (0, 1)
    model.eval()
    x = torch.randn(2, 3, 32, 32, device=device)
    with torch.no_grad():
        want = model(x)
        for convert in (nn.SyncBatchNorm.convert_sync_batchnorm, fastres.nn.convert_sync_batchnorm,
                        freeze_batch_norm_2d):
            converted = convert(copy.deepcopy(model)).eval()
            assert all(type(m) is not nn.BatchNorm2d for m in converted.modules())
            torch.testing.assert_close(converted(x), want)
