"""torchvision's and timm's own model-test procedures, rewritten against fastres's models.

torchvision's (``test/test_models.py``): ``test_classification_model`` (output shape, input
backprop, channels_last, state_dict round trip), ``test_memory_efficient_densenet``,
``test_resnet_dilation``, and the traced model that loads without the package that built it;
on every fastres builder and every family ``convert()`` takes. Its FX check is
``test_fx.test_classification_model_fx`` (every builder) and ``test_fx``'s converted models.

timm's (``tests/test_models.py``): ``test_model_forward``, ``test_model_backward``,
``test_model_default_cfgs`` (classifier reset, pooling off, pre-logits, the config's layer
names), ``test_model_forward_intermediates`` and ``test_model_forward_features``
(``features_only``), on every ``fastres_*`` name ``register_with_timm()`` adds: fastres's
ResNetV2 builders and timm's ResNets and DenseNets converted. timm's TorchScript procedure does
not apply: fastres refuses ``torch.jit.script`` with one message (``test_torch_tooling``).

Full widths and depths (what the procedures are about), at 32x32 (64x64 where each stage's
output is checked) on the CPU reference path (CUDA: the Triton kernels).
"""

import copy
import io
import itertools
import subprocess
import sys
import textwrap

import pytest
import torch

import fastres
from helpers import assert_normwise_close

BUILDERS = [name for module in (fastres.models.resnet, fastres.models.resnetv2, fastres.models.densenet)
            for name in module.__all__ if name[0].islower()]
# convert() of each family it takes, at full size (timm imports torchvision, so every maker gets both).
CONVERTED = {
    "convert(tv resnet50)": lambda tv, timm, **kw: fastres.convert(tv.models.resnet50(**kw)),
    "convert(tv densenet121)": lambda tv, timm, **kw: fastres.convert(tv.models.densenet121(**kw)),
    "convert(timm resnet50d)": lambda tv, timm, **kw: fastres.convert(timm.create_model("resnet50d", **kw)),
    "convert(timm seresnet50)": lambda tv, timm, **kw: fastres.convert(timm.create_model("seresnet50", **kw)),
    "convert(timm resnetv2_50d)": lambda tv, timm, **kw: fastres.convert(timm.create_model("resnetv2_50d", **kw)),
    "convert(timm densenet121)": lambda tv, timm, **kw: fastres.convert(timm.create_model("densenet121", **kw)),
    "convert(timm densenetblur121d)": lambda tv, timm, **kw: fastres.convert(
        timm.create_model("densenetblur121d", **kw)),
}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _make(request, name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    if name in CONVERTED:
        return CONVERTED[name](request.getfixturevalue("tv"), request.getfixturevalue("timm"), **kwargs)
    return getattr(fastres.models, name)(**kwargs)


def _x(batch: int = 1, size: int = 32) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(DEVICE)


# --- torchvision's procedures ---------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILDERS + list(CONVERTED))
def test_classification_model(request, name):
    """Output shape; the input gradient; every parameter gradient in training; channels_last; state_dict."""
    model = _make(request, name, num_classes=50).to(DEVICE).eval()
    x = _x()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, 50) and out.isfinite().all()

    x_grad = x.clone().requires_grad_()  # torchvision's _check_input_backprop
    model(x_grad).mean().backward()
    assert x_grad.grad is not None and x_grad.grad.shape == x.shape

    model.zero_grad(set_to_none=True)  # timm's procedure: every parameter gets a gradient in training
    model.train()(_x(batch=2)).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing[:5]

    model.eval()
    reloaded = copy.deepcopy(model)
    for tensor in reloaded.state_dict().values():  # what the state_dict restores (not a blur pool's filter)
        tensor.zero_()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    reloaded.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))

        # torchvision checks channels_last on CUDA; the layout must not change the result on any device.
        model = model.double()
        dense = model(x.double())
        model = model.to(memory_format=torch.channels_last)
        assert_normwise_close(model(x.double().contiguous(memory_format=torch.channels_last)), dense)


@pytest.mark.parametrize("name", [n for n in BUILDERS if n.startswith("densenet")])
def test_memory_efficient_densenet(name):
    """Shared storage (memory_efficient=True) against the concatenating path, same weights: outputs and grads."""
    x = _x()
    model1 = getattr(fastres.models, name)(num_classes=50, memory_efficient=True).to(DEVICE).eval()
    model2 = getattr(fastres.models, name)(num_classes=50, memory_efficient=False).to(DEVICE).eval()
    model2.load_state_dict(model1.state_dict())
    out1, out2 = model1(x), model2(x)
    out1.sum().backward()
    out2.sum().backward()
    assert sum(p.grad.numel() for p in model1.parameters()) == sum(p.numel() for p in model1.parameters())
    torch.testing.assert_close(out1, out2, rtol=0.0, atol=1e-5)
    for (name1, p1), p2 in zip(model1.named_parameters(), model2.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-5, msg=name1)


@pytest.mark.parametrize("dilate", list(itertools.product((False, True), repeat=3)),
                         ids=lambda d: "".join("d" if v else "s" for v in d))
def test_resnet_dilation(dilate):
    model = fastres.models.resnet50(replace_stride_with_dilation=list(dilate)).to(DEVICE).eval()
    trunk = torch.nn.Sequential(*list(model.children())[:-2])  # up to layer4, as torchvision slices it
    with torch.no_grad():
        out = trunk(_x(size=224))
    assert out.shape == (1, 2048, 224 // (32 // 2 ** sum(dilate)), 224 // (32 // 2 ** sum(dilate)))


# One model per family, shallow: a trace records the same ops for every depth and width.
TRACED = {
    "resnet18": lambda tv, timm: fastres.models.resnet18(num_classes=10),
    "resnetv2_18d": lambda tv, timm: fastres.models.resnetv2_18d(num_classes=10),
    "densenet_bc": lambda tv, timm: fastres.models.densenet_bc(depth=22),
    "convert(tv resnet)": lambda tv, timm: fastres.convert(tv.models.resnext50_32x4d(num_classes=10)),
    "convert(tv densenet)": lambda tv, timm: fastres.convert(tv.models.DenseNet(block_config=(2, 2), num_classes=10)),
    "convert(timm resnet50d)": lambda tv, timm: fastres.convert(
        timm.create_model("resnet50d", num_classes=10, layers=(1, 1, 1, 1))),
    "convert(timm densenetblur121d)": lambda tv, timm: fastres.convert(
        timm.create_model("densenetblur121d", num_classes=10, block_config=(2, 2))),
}


def test_traced_models_load_and_run_without_fastres(request, tmp_path):
    """torch.jit.trace, saved, then loaded and run in a process where fastres cannot be imported."""
    x = _x(batch=2)
    tv, timm = request.getfixturevalue("tv"), request.getfixturevalue("timm")
    for i, make in enumerate(TRACED.values()):
        torch.manual_seed(0)
        model = make(tv, timm).to(DEVICE).eval()
        with torch.no_grad():
            traced = torch.jit.trace(model, x, check_trace=False)
            torch.save(model(x), tmp_path / f"{i}.expected.pt")
        torch.jit.save(traced, str(tmp_path / f"{i}.pt"))
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["fastres"] = None  # importing it raises
        import torch
        x = torch.load({str(tmp_path / 'x.pt')!r})
        for i in range({len(TRACED)}):
            model = torch.jit.load({str(tmp_path)!r} + f"/{{i}}.pt")
            with torch.no_grad():
                out = model(x)
            torch.testing.assert_close(out, torch.load({str(tmp_path)!r} + f"/{{i}}.expected.pt"))
        print("ok", {len(TRACED)})
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split() == ["ok", str(len(TRACED))], done.stderr[-3000:]


# --- timm's procedures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registered(timm):
    return fastres.models.register_with_timm()


TIMM_NAMES = [f"fastres_{n}" for n in fastres.models.resnetv2.__all__ if n.startswith("resnetv2_")] + [
    f"fastres_{n}" for n in fastres.models.resnet.__all__ if n != "ResNet"] + [
    f"fastres_{n}" for n in ("densenet121", "densenet161", "densenet169", "densenet201", "densenet264d",
                             "densenetblur121d")]


def test_timm_names_are_every_registered_name(registered):
    assert sorted(TIMM_NAMES) == sorted(registered)


@pytest.mark.parametrize("name", TIMM_NAMES)
def test_model_forward_backward_and_default_cfgs(timm, registered, name):
    """timm's test_model_forward, test_model_backward and test_model_default_cfgs on one model."""
    model = timm.create_model(name, num_classes=42).to(DEVICE)
    cfg = model.pretrained_cfg
    x = _x(batch=2)
    out = model.train()(x)  # backward: every parameter gets a gradient
    out.mean().backward()
    assert out.shape == (2, 42) and not [n for n, p in model.named_parameters() if p.grad is None]

    model.eval()
    state_dict = model.state_dict()
    assert cfg["first_conv"] + ".weight" in state_dict and cfg["classifier"] + ".weight" in state_dict
    assert cfg["input_size"][0] == 3 and len(cfg["mean"]) == len(cfg["std"]) == 3
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape[:2] == (2, model.num_features) and features.dim() == 4
        assert model.forward_head(features, pre_logits=True).shape == (2, model.head_hidden_size)
        assert model.feature_info[-1]["num_chs"] == model.num_features
        model.reset_classifier(0)  # pooled features
        assert model(x).shape == (2, model.head_hidden_size)
        model.reset_classifier(0, "")  # no pooling: the features map
        assert torch.equal(model(x), features)


@pytest.mark.parametrize("name", TIMM_NAMES)
def test_model_forward_intermediates_and_features(timm, registered, name):
    """timm's test_model_forward_intermediates and test_model_forward_features on one model."""
    model = timm.create_model(name).to(DEVICE).eval()
    x = _x(batch=1, size=64)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
    assert len(intermediates) == len(model.feature_info)
    for tensor, info in zip(intermediates, model.feature_info):
        assert tensor.shape[1] == info["num_chs"] and tensor.shape[-1] == 64 // info["reduction"]

    features = timm.create_model(name, features_only=True).to(DEVICE).eval()
    with torch.no_grad():
        outputs = features(x)
    assert [o.shape[1] for o in outputs] == features.feature_info.channels()
    assert [64 // o.shape[-1] for o in outputs] == features.feature_info.reduction()
