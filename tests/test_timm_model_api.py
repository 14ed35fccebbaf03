"""timm's model API on fastres's ResNetV2s, against timm's own models on the same weights (float64)."""

import copy
import functools

import pytest
import torch

import fastres
from fastres.models import resnetv2 as fastres_resnetv2
from helpers import assert_modules_normwise_close, assert_normwise_close, train_steps

NAMES = ["resnetv2_18", "resnetv2_50d"]  # basic blocks and plain stem; bottlenecks, deep stem, pooled projections


def _pair(timm, name, **kwargs):
    """(timm's model, fastres's with its weights), float64, an eighth of the width (the API does not see width)."""
    eager = timm.create_model(name, width_factor=0.125, **kwargs).double()
    fused = getattr(fastres.models, name)(width_factor=0.125, **kwargs).double()
    fused.load_state_dict(eager.state_dict())
    return eager, fused.train(eager.training)


def _x():
    return torch.randn(2, 3, 64, 64, dtype=torch.float64)


@pytest.mark.parametrize("name", fastres_resnetv2.__all__[1:])
def test_pretrained_cfg_feature_info_and_groups_are_timms(timm, name):
    eager, fused = timm.create_model(name), getattr(fastres.models, name)()
    assert fused.pretrained_cfg == eager.pretrained_cfg
    assert fused.default_cfg == eager.default_cfg
    assert fused.feature_info == eager.feature_info
    assert fused.group_matcher() == eager.group_matcher()
    assert fused.group_matcher(coarse=True) == eager.group_matcher(coarse=True)
    assert (fused.num_features, fused.head_hidden_size) == (eager.num_features, eager.head_hidden_size)


def test_pretrained_cfg_without_timm_is_timms_default(timm, monkeypatch):
    """Without timm the builders give timm's defaults for the family (here against an untrained timm config)."""
    expected = timm.create_model("resnetv2_50d").pretrained_cfg
    monkeypatch.setattr(fastres_resnetv2.importlib.util, "find_spec", lambda name: None)
    cfg = fastres.models.resnetv2_50d().pretrained_cfg
    for key, value in cfg.items():
        if key != "tag":  # timm names its untrained config's tag
            assert value == expected[key], key


INTERMEDIATES = {"all": {}, "last2": {"indices": 2}, "first_last_norm": {"indices": [0, -1], "norm": True},
                 "stop_early": {"indices": [1], "stop_early": True}, "only": {"indices": (0, 2), "intermediates_only": True}}
# Which taps are taken is the same code on every path: the interpreter runs one case, through the fused deep stem.
INTERMEDIATE_CASES = [(p, n, k) for p in ("triton", "reference") for n in NAMES for k in INTERMEDIATES
                      if torch.cuda.is_available() or p == "reference" or (n == "resnetv2_50d" and k == "all")]
if torch.cuda.is_available():
    INTERMEDIATE_CASES = [c for c in INTERMEDIATE_CASES if c[0] == "triton"]


@pytest.mark.parametrize("path, name, case", INTERMEDIATE_CASES, ids=["-".join(c) for c in INTERMEDIATE_CASES])
def test_forward_intermediates_is_timms(on_path, timm, path, name, case):
    on_path(path)
    kwargs = INTERMEDIATES[case]
    eager, fused = _pair(timm, name)
    eager.eval(), fused.eval()
    x = _x()
    got, want = fused.forward_intermediates(x, **kwargs), eager.forward_intermediates(x, **kwargs)
    if isinstance(want, tuple):
        assert_normwise_close(got[0], want[0], "final")
        got, want = got[1], want[1]
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_normwise_close(a, b, f"intermediate {i}")


def test_forward_intermediates_checks_its_arguments(timm):
    model = fastres.models.resnetv2_18(width_factor=0.125)
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), indices=6)
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW'"):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), output_fmt="NHWC")
    with pytest.raises(ValueError, match="x has 1 channels"):
        model.forward_intermediates(torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize("indices", [1, 2, [0]], ids=["last", "last2", "stem"])
def test_prune_intermediate_layers_is_timms(timm, indices):
    eager, fused = _pair(timm, "resnetv2_50d")
    assert fused.prune_intermediate_layers(indices) == eager.prune_intermediate_layers(indices)
    assert list(fused.state_dict()) == list(eager.state_dict())
    assert (fused.num_features, fused.head_hidden_size) == (eager.num_features, eager.head_hidden_size)
    eager.eval(), fused.eval()
    x = _x()
    got, want = fused.forward_intermediates(x, indices, intermediates_only=True), \
        eager.forward_intermediates(x, indices, intermediates_only=True)
    for a, b in zip(got, want, strict=True):
        assert_normwise_close(a, b)


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax", "catavgmax", "fast", "fastcatavgmax", ""])
def test_every_global_pool_is_timms(timm, pool):
    eager, fused = _pair(timm, "resnetv2_18", num_classes=10, global_pool=pool)
    eager.eval(), fused.eval()
    x = _x()
    assert_normwise_close(fused(x), eager(x))
    assert_normwise_close(fused.forward_head(fused.forward_features(x), pre_logits=True),
                          eager.forward_head(eager.forward_features(x), pre_logits=True))
    assert fused.head_hidden_size == eager.head_hidden_size
    fused.reset_classifier(5, "catavgmax"), eager.reset_classifier(5, "catavgmax")
    assert fused.get_classifier().in_channels == eager.get_classifier().in_channels
    assert fused.head_hidden_size == eager.head_hidden_size


# The interpreter checkpoints the fused basic blocks; the bottlenecks on the CPU path.
CHECKPOINT_CASES = [("triton", n) for n in NAMES] if torch.cuda.is_available() else \
    [("triton", "resnetv2_18")] + [("reference", n) for n in NAMES]


@pytest.mark.parametrize("path, name", CHECKPOINT_CASES, ids=["-".join(c) for c in CHECKPOINT_CASES])
def test_grad_checkpointing_trains_like_timms(on_path, timm, path, name):
    """Checkpointed blocks: the same outputs, gradients and buffers as timm's checkpointed model, and fewer
    tensors kept for backward than without."""
    on_path(path)
    eager, fused = _pair(timm, name, num_classes=10)
    plain = copy.deepcopy(fused)
    eager.set_grad_checkpointing(), fused.set_grad_checkpointing()
    x = _x()
    for model in (fused, eager):
        xl = x.clone().requires_grad_()
        torch.manual_seed(1)
        out = model(xl)
        out.backward(torch.ones_like(out))
        model.result = (out.detach(), xl.grad)
    assert_normwise_close(fused.result[0], eager.result[0], "out")
    assert_normwise_close(fused.result[1], eager.result[1], "x.grad")
    del fused.result, eager.result
    assert_modules_normwise_close(fused, eager)
    saved = fastres.testing.saved_bytes
    # The blocks keep only their inputs (a checkpoint that did nothing would keep as much as the plain model);
    # the stem, the final BN-ReLU and the head, not checkpointed as in timm, keep theirs. How much is left
    # depends on the path: 61% on the CPU path for resnetv2_18, 80% on the GPU path, whose blocks keep 1-bit
    # ReLU masks where eager keeps activations.
    assert saved(lambda: fused(x), fused.parameters()) < saved(lambda: plain(x), plain.parameters())


# --- registered with timm ------------------------------------------------------------------------


def test_registered_names_build_fastres_models_with_timms_arguments(timm):
    names = fastres.models.register_with_timm()
    resnets = [n for n in fastres.models.resnet.__all__ if n != "ResNet"]
    densenets = ["densenet121", "densenet161", "densenet169", "densenet201", "densenet264d", "densenetblur121d"]
    assert names == [f"fastres_{n}" for n in fastres_resnetv2.__all__[1:] + resnets + densenets]
    assert fastres.models.register_with_timm() == names  # registering again changes nothing
    assert sorted(timm.list_models("fastres_*")) == sorted(names)
    model = timm.create_model("fastres_resnetv2_50d", num_classes=7, global_pool="catavgmax", width_factor=0.125)
    assert type(model) is fastres.models.ResNetV2 and model.num_classes == 7 and model.head.pool_type == "catavgmax"
    assert model.pretrained_cfg["architecture"] == "resnetv2_50d"  # timm's weights for the same architecture
    eager = timm.create_model("resnetv2_50d", num_classes=7, global_pool="catavgmax", width_factor=0.125)
    model.load_state_dict(eager.state_dict())  # strict


# timm's own ResNets and DenseNets under fastres_ names: timm's model, converted (narrow: the API does not see width).
CONVERTED = {"resnet50": {"drop_path_rate": 0.1}, "resnext50_32x4d": {"cardinality": 4, "base_width": 16},
             "densenet121": {"growth_rate": 4, "block_config": (2, 3, 2, 2), "bn_size": 2},
             "densenetblur121d": {"growth_rate": 4, "block_config": (2, 3, 2, 2), "bn_size": 2}}


@pytest.mark.parametrize("name", CONVERTED)
def test_registered_resnets_and_densenets_are_timms_models_converted(timm, name):
    fastres.models.register_with_timm()
    kwargs = {"num_classes": 7, "global_pool": "avgmax", **CONVERTED[name]}
    torch.manual_seed(0)
    eager = timm.create_model(name, **kwargs).double()
    torch.manual_seed(0)
    fused = timm.create_model(f"fastres_{name}", **kwargs).double()
    assert type(fused) is type(eager) and fused.pretrained_cfg == eager.pretrained_cfg
    assert fused.feature_info == eager.feature_info and fused.global_pool.pool_type == "avgmax"
    assert any(type(m).__module__.startswith("fastres.") for m in fused.modules())
    assert [(k, v.shape) for k, v in fused.state_dict().items()] == [(k, v.shape) for k, v in eager.state_dict().items()]
    for a, b in zip(fused.state_dict().values(), eager.state_dict().values()):
        assert torch.equal(a, b)  # timm's initialisation, untouched by the conversion
    x = _x()
    torch.manual_seed(1)
    got = fused(x)
    torch.manual_seed(1)
    assert_normwise_close(got, eager(x))
    features = timm.create_model(f"fastres_{name}", features_only=True, out_indices=(1, 3), **CONVERTED[name])
    eager_features = timm.create_model(name, features_only=True, out_indices=(1, 3), **CONVERTED[name])
    features.load_state_dict(eager_features.state_dict())
    assert features.feature_info.channels() == eager_features.feature_info.channels()
    for a, b in zip(features.double().eval()(x), eager_features.double().eval()(x), strict=True):
        assert_normwise_close(a, b)


@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3, 4), (1, 3)], ids=["all", "some"])
def test_features_only_is_timms(timm, out_indices):
    fastres.models.register_with_timm()
    kwargs = {"features_only": True, "out_indices": out_indices, "width_factor": 0.125}
    eager = timm.create_model("resnetv2_50d", **kwargs).double().eval()
    fused = timm.create_model("fastres_resnetv2_50d", **kwargs).double().eval()
    fused.load_state_dict(eager.state_dict())
    assert fused.feature_info.channels() == eager.feature_info.channels()
    assert fused.feature_info.reduction() == eager.feature_info.reduction()
    x = _x()
    for a, b in zip(fused(x), eager(x), strict=True):
        assert_normwise_close(a, b)


@pytest.mark.parametrize("name", ["resnetv2_50", "resnet50", "densenet121"])
def test_pretrained_weights_absent_give_timms_error(timm, name):
    fastres.models.register_with_timm()
    with pytest.raises(Exception) as fused_error:
        timm.create_model(f"fastres_{name}", pretrained=True)
    with pytest.raises(Exception) as eager_error:
        timm.create_model(name, pretrained=True)
    assert (type(fused_error.value), str(fused_error.value)) == (type(eager_error.value), str(eager_error.value))


FACTORY_MODELS = {"resnetv2_50": {"width_factor": 0.125},  # 64x64 images: 2x2 features at the end
                  "densenet121": {"growth_rate": 4, "block_config": (2, 3, 2, 2), "bn_size": 2}}


@pytest.mark.parametrize("base", FACTORY_MODELS)
def test_timms_loader_optimizer_and_scheduler_train_a_registered_model(timm, tmp_path, base):
    """timm's factories end to end on a small image folder: the same losses and weights as timm's own model."""
    import random

    import numpy as np
    from PIL import Image

    for c in range(2):
        (tmp_path / f"class{c}").mkdir()
        for i in range(4):
            pixels = np.random.RandomState(10 * c + i).randint(0, 255, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / f"class{c}" / f"{i}.png")
    fastres.models.register_with_timm()
    from timm.data import create_dataset, create_loader
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    runs = {}
    for name in (base, f"fastres_{base}"):
        model = timm.create_model(name, num_classes=2, **FACTORY_MODELS[base]).double()
        if name.startswith("fastres"):
            model.load_state_dict(runs[base][1])
        start = copy.deepcopy(model.state_dict())
        torch.manual_seed(0), random.seed(0), np.random.seed(0)
        loader = create_loader(create_dataset("", root=str(tmp_path)), input_size=(3, 64, 64), batch_size=8,
                               is_training=True, use_prefetcher=False, num_workers=0)
        optimizer = create_optimizer_v2(model, opt="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4)
        scheduler, epochs = create_scheduler_v2(optimizer, sched="cosine", num_epochs=4)
        losses = []
        for epoch in range(epochs):
            for x, y in loader:
                loss = torch.nn.functional.cross_entropy(model(x.double()), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            scheduler.step(epoch + 1)
        runs[name] = (losses, start, model)
    (fused_losses, _, fused), (eager_losses, _, eager) = runs[f"fastres_{base}"], runs[base]
    assert len(fused_losses) == 4
    print(f"fastres_{base} losses: {fused_losses}; timm's {base}: {eager_losses}")
    torch.testing.assert_close(torch.tensor(fused_losses), torch.tensor(eager_losses), rtol=1e-9, atol=0)
    assert_modules_normwise_close(fused, eager)


# --- timm's layer arguments --------------------------------------------------------------------

LAYER_ARGS = {
    "silu": lambda timm: {"act_layer": "silu"},  # timm's BatchNormAct2d with SiLU: runs as written
    "relu_module": lambda timm: {"act_layer": torch.nn.ReLU},  # the default, fused
    "groupnorm": lambda timm: {"norm_layer": functools.partial(timm.layers.GroupNormAct, num_groups=4)},
    "std_conv": lambda timm: {"conv_layer": timm.layers.StdConv2d},  # weight standardisation: unfused convs
}


@pytest.mark.parametrize("case", LAYER_ARGS)
def test_layer_arguments_are_timms(timm, case):
    """act_layer/norm_layer/conv_layer as timm's ResNetV2 takes them: same keys, and one float64 step alike."""
    kwargs = LAYER_ARGS[case](timm)
    eager, fused = _pair(timm, "resnetv2_50d", **kwargs)
    assert [(k, v.shape) for k, v in fused.state_dict().items()] == [(k, v.shape) for k, v in eager.state_dict().items()]
    norms = {type(m).__name__ for m in fused.modules() if "norm" in type(m).__name__.lower()}
    assert norms == ({"GroupNormAct"} if case == "groupnorm" else {"BatchNormAct2d"} if case == "silu"
                     else {"BatchNorm2d"})
    x = [_x()]
    for got, want in zip(train_steps(fused, x), train_steps(eager, x)):
        assert_normwise_close(got, want)
    assert_modules_normwise_close(fused, eager)


def test_other_activations_without_timm_say_what_to_pass(monkeypatch):
    monkeypatch.setattr(fastres_resnetv2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="act_layer='silu' needs timm's norm-act layers"):
        fastres.models.resnetv2_18(act_layer="silu")
