"""fastres.convert on timm's DenseNets (``timm.models.densenet``): shared storage, timm's keys, API and numbers."""

import copy
import warnings

import pytest
import torch

import fastres
from helpers import assert_modules_normwise_close, assert_normwise_close, assert_trains_like, saved_bytes, train_steps

NAMES = ["densenet121", "densenet161", "densenet169", "densenet201", "densenetblur121d"]
LAYERS = {"densenet121": 58, "densenet161": 78, "densenet169": 82, "densenet201": 98, "densenetblur121d": 58}
# timm's DenseNet at a few channels: the same modules and forward as the full models (whose structure and
# keys the first test checks); num_init_features is timm's 2 * growth_rate.
TINY = {"growth_rate": 4, "block_config": (2, 3, 2), "bn_size": 2, "num_classes": 5}


def _timm_densenet(timm, name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_convert_puts_every_timm_densenet_on_shared_storage_with_timms_keys(timm, name):
    model = _timm_densenet(timm, name)
    keys, params = list(model.state_dict()), [id(p) for p in model.parameters()]
    model, report = fastres.convert(model, report=True)
    kinds = [type(m).__name__ for m in model.modules()]
    assert type(model) is timm.models.densenet.DenseNet  # timm's class: timm's model API, unchanged
    assert type(model.features) is fastres.nn.TimmDenseFeatures
    assert kinds.count("TimmDenseLayer") == LAYERS[name] and kinds.count("TimmDenseBlock") == 4
    assert kinds.count("TimmTransition") == 3
    assert not {"DenseLayer", "DenseBlock", "DenseTransition"} & set(kinds)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(type(m) is timm.layers.BatchNormAct2d for m in norms)  # timm's converters still see them
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
    _timm_densenet(timm, name).load_state_dict(model.state_dict(), strict=True)
    assert report.left == []
    assert len(report.fused) == 1 + 4 + 3 + LAYERS[name]
    stem = "norm0 -> conv1 (BN-ReLU-conv)" if name == "densenetblur121d" else "norm0 -> pool0 (BN-ReLU-max-pool)"
    assert stem in report.fused[0][1] and "norm5 (BN-ReLU)" in report.fused[0][1]


# Every variant on the reference path; the interpreter runs the plain and the blur (deep stem, blur-pooled
# transitions) variants in training, the plain one in eval.
VARIANTS = {"plain": ("densenet121", {}), "blur": ("densenetblur121d", {"aa_stem_only": False}),
            "dropout": ("densenet121", {"proj_drop_rate": 0.2})}
CASES = [(p, v, t) for p in ("triton", "reference") for v in VARIANTS for t in (True, False)
         if torch.cuda.is_available() or p == "reference" or (v != "dropout" and (t or v == "plain"))]
if torch.cuda.is_available():
    CASES = [c for c in CASES if c[0] == "triton"]


@pytest.mark.parametrize("path, variant, training", CASES,
                         ids=[f"{p}-{v}-{'train' if t else 'eval'}" for p, v, t in CASES])
def test_converted_timm_densenet_trains_as_timm(on_path, device, timm, path, variant, training):
    """float64 SGD steps: outputs, input gradients, every parameter, gradient and BatchNorm buffer; then eval."""
    on_path(path)
    name, kwargs = VARIANTS[variant]
    eager = _timm_densenet(timm, name, **TINY, **kwargs).to(device, torch.float64).train(training)
    fused = fastres.convert(copy.deepcopy(eager))
    x = [torch.randn(2, 3, 32, 32, device=device, dtype=torch.float64) for _ in range(2)]
    assert_trains_like(fused, eager, x)


def test_converted_timm_densenet121_trains_as_timm(device, timm, needs_ext):
    """The whole densenet121, one float64 step (batch 4: 1x1 features at the end, conditioned enough)."""
    eager = _timm_densenet(timm, "densenet121", num_classes=10).to(device, torch.float64)
    fused = fastres.convert(copy.deepcopy(eager))
    x = [torch.randn(4, 3, 32, 32, device=device, dtype=torch.float64)]
    for got, want in zip(train_steps(fused, x), train_steps(eager, x)):
        assert_normwise_close(got, want)
    assert_modules_normwise_close(fused, eager)


def test_converted_timm_densenet121_saves_what_fastres_densenet121_saves(device, timm, needs_ext):
    eager = _timm_densenet(timm, "densenet121", num_classes=10).to(device)
    fused = fastres.convert(copy.deepcopy(eager))
    builder = fastres.models.densenet121(num_classes=10).to(device)
    builder.load_state_dict(eager.state_dict())
    x = torch.randn(2, 3, 64, 64, device=device)
    saved = saved_bytes(lambda: fused(x))
    assert saved == saved_bytes(lambda: builder(x))
    assert saved < saved_bytes(lambda: eager(x)) * 0.3  # measured on CPU: 5,536,512 against 22,001,152 bytes


def test_convert_reports_what_it_leaves_in_a_timm_densenet(timm):
    with pytest.warns(UserWarning, match="nothing in this DenseNet could be fused.*SiLU"):
        model, report = fastres.convert(_timm_densenet(timm, "densenet121", **TINY, act_layer="silu"), report=True)
    assert report.fused == [] and type(model.features.denseblock1) is timm.models.densenet.DenseBlock
    assert ("features.denseblock1", "as written, its layers one by one: denselayer1: BatchNormAct2d -> SiLU is "
            "not a batch norm with a plain ReLU (or a module has hooks)") in report.left

    hooked = _timm_densenet(timm, "densenet121", **TINY).double()
    hooked.features.denseblock2.denselayer2.register_forward_hook(lambda *args: None)
    eager = copy.deepcopy(hooked)
    model, report = fastres.convert(hooked, report=True)
    # The hooked layer runs as timm's, its block calls its layers one by one; every other module converts.
    assert type(model.features.denseblock2) is timm.models.densenet.DenseBlock
    assert type(model.features.denseblock2.denselayer2) is timm.models.densenet.DenseLayer
    assert type(model.features.denseblock2.denselayer1) is fastres.nn.TimmDenseLayer
    assert type(model.features.denseblock1) is fastres.nn.TimmDenseBlock
    assert ("features.denseblock2", "as written, its layers one by one: denselayer2: a module in it has forward "
            "hooks") in report.left
    assert_trains_like(model, eager, [torch.randn(2, 3, 32, 32, dtype=torch.float64)])


def test_converted_layers_honour_grad_checkpointing_where_they_run_as_written(timm, needs_ext):
    """Off shared storage a converted layer is timm's forward, checkpointing included (its running statistics
    updated by the recomputation too, as timm's are)."""
    eager = _timm_densenet(timm, "densenet121", **TINY, memory_efficient=True).double()
    fused = fastres.convert(copy.deepcopy(eager))
    for module in fused.modules():
        if isinstance(module, (fastres.nn.TimmDenseBlock, fastres.nn.TimmDenseLayer)):
            module.memory_efficient = False
    assert all(m.grad_checkpointing for m in fused.modules() if isinstance(m, fastres.nn.TimmDenseLayer))
    assert_trains_like(fused, eager, [torch.randn(2, 3, 32, 32, dtype=torch.float64) for _ in range(2)])
    assert eager.features.denseblock1.denselayer1.norm1.num_batches_tracked == 4  # twice per step: recomputed


def test_converted_timm_densenet_keeps_timms_model_api(timm, needs_ext):
    eager = _timm_densenet(timm, "densenetblur121d", **TINY).double().eval()
    fused = fastres.convert(copy.deepcopy(eager))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert fused.feature_info == eager.feature_info and fused.group_matcher() == eager.group_matcher()
    got, want = fused.forward_intermediates(x), eager.forward_intermediates(x)
    assert_normwise_close(got[0], want[0])
    for a, b in zip(got[1], want[1], strict=True):
        assert_normwise_close(a, b)
    assert_normwise_close(fused.forward_head(fused.forward_features(x), pre_logits=True),
                          eager.forward_head(eager.forward_features(x), pre_logits=True))
    fused.set_grad_checkpointing(True)  # timm's method; the converted layers run on shared storage regardless
    for model in (fused, eager):
        model.prune_intermediate_layers(2)
    assert type(fused.features) is fastres.nn.TimmDenseFeatures
    assert_normwise_close(fused.forward_features(x), eager.forward_features(x))

    taps = {"features_only": True, "out_indices": (0, 1, 2, 3)}  # three blocks: four taps
    features = fastres.convert(_timm_densenet(timm, "densenet121", **TINY, **taps).double().eval())
    eager_features = _timm_densenet(timm, "densenet121", **TINY, **taps).double().eval()
    assert sum(isinstance(m, fastres.nn.TimmDenseBlock) for m in features.modules()) == 3
    for a, b in zip(features(x), eager_features(x), strict=True):
        assert_normwise_close(a, b)


def test_timm_sync_batchnorm_converter_keeps_shared_storage(timm, needs_ext):
    """timm's converter swaps the norms for SyncBatchNormAct; without a process group they compute as before."""
    eager = _timm_densenet(timm, "densenet121", **TINY).double()
    fused = fastres.convert(copy.deepcopy(eager))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    before = saved_bytes(lambda: copy.deepcopy(fused)(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = timm.layers.convert_sync_batchnorm(fused)
    assert all(layer.shares_storage() for layer in fused.modules() if isinstance(layer, fastres.nn.TimmDenseLayer))
    assert saved_bytes(lambda: copy.deepcopy(fused)(x)) == before
    assert_trains_like(fused, eager, [x])
