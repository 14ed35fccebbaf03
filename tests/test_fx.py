"""torch.fx on fastres's models, as torchvision tests its own: symbolic_trace, and feature extraction.

Each fused op is a leaf of the traced graph (a call_function node, its modules get_attr nodes): it
chooses its path from the tensor and reads the modules' state (training, running statistics) when
the graph runs, so the traced model computes what the model computes, in either mode, and the input
checks still run.
"""

import copy

import pytest
import torch
import torch.fx

import fastres
from helpers import assert_equal, assert_modules_match, train_steps

# torchvision's test_classification_model, on every builder, where it is cheap: eager CPU ops (CUDA: Triton).
CHEAP_PATH = "triton" if torch.cuda.is_available() else "reference"
BUILDERS = [name for module in (fastres.models.resnet, fastres.models.resnetv2, fastres.models.densenet)
            for name in module.__all__ if name[0].islower()]


def _assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Exact on CPU; on CUDA within rounding, as torchvision's check (the per-shape tuner may pick another kernel)."""
    if actual.device.type == "cpu":
        assert_equal(actual, expected)
    else:
        torch.testing.assert_close(actual, expected)


def _graph_leaves(gm: torch.fx.GraphModule) -> set[str]:
    return {n.target.__name__ for n in gm.graph.nodes
            if n.op == "call_function" and (getattr(n.target, "__module__", None) or "").startswith("fastres")}


@pytest.mark.parametrize("path", [CHEAP_PATH], indirect=True)
@pytest.mark.parametrize("builder", BUILDERS)
def test_classification_model_fx(path, device, builder):
    """torchvision's procedure (``_check_fx_compatible``): trace, run, compare with the model."""
    torch.manual_seed(0)
    model = getattr(fastres.models, builder)(num_classes=50).eval().to(device)
    x = torch.rand(1, 3, 32, 32, device=device)
    with torch.no_grad():
        out = model(x)
    assert out.shape[-1] == 50
    model_fx = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        fx_out = model_fx(x)
    _assert_same(fx_out, out)
    leaves = _graph_leaves(model_fx)  # the fused ops, not what they run
    assert leaves & {"norm_relu", "_tail", "_dense_block", "_transition", "bn_relu_conv", "pre_activation"}, leaves


def _tv_resnet(tv):
    return tv.models.ResNet(tv.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)


def _tv_densenet(tv):
    return tv.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=10)


def _fr_densenet(**kwargs):
    return fastres.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=10,
                                   **kwargs)


def _timm_resnetv2(timm):
    from timm.layers import BatchNormAct2d, create_conv2d
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2([1, 1], channels=(8, 16), stem_chs=8, basic=True, bottle_ratio=1.0, num_classes=10,
                    norm_layer=BatchNormAct2d, conv_layer=create_conv2d)


# name -> (the model, given tv and timm; the nodes a detection backbone takes from it; traced by timm's rules)
MODELS = {
    "resnet": (lambda tv, timm: fastres.models.ResNet(fastres.nn.BasicBlock, [1, 1, 1, 1], num_classes=10),
               ["layer1", "layer2", "layer3", "layer4"], False),
    "densenet": (lambda tv, timm: _fr_densenet(), ["features.denseblock1", "features.denseblock2"], False),
    "densenet(memory_efficient=False)": (lambda tv, timm: _fr_densenet(memory_efficient=False),
                                         ["features.denseblock1", "features.denseblock2"], False),
    "densenet_bc": (lambda tv, timm: fastres.models.densenet_bc(depth=10, growth_rate=4),
                    ["features.denseblock1", "features.denseblock3"], False),
    "resnetv2": (lambda tv, timm: fastres.models.ResNetV2([1, 1], channels=(8, 16), stem_chs=8, basic=True,
                                                          bottle_ratio=1.0, num_classes=10),
                 ["stages.0", "stages.1"], False),
    # Deep stem, pooled projections, a dilated last stage (padded pooling), drop path.
    "resnetv2d": (lambda tv, timm: fastres.models.ResNetV2(
        [1, 1, 1], channels=(16, 32, 32), stem_chs=8, stem_type="deep", avg_down=True, output_stride=16,
        drop_path_rate=0.2, num_classes=10), ["stages.0", "stages.2"], False),
    "convert(tv resnet)": (lambda tv, timm: fastres.convert(_tv_resnet(tv)), ["layer1", "layer2", "layer3", "layer4"],
                           False),
    "convert(tv densenet)": (lambda tv, timm: fastres.convert(_tv_densenet(tv)),
                             ["features.denseblock1", "features.denseblock2"], False),
    "convert(timm resnetv2)": (lambda tv, timm: fastres.convert(_timm_resnetv2(timm)), ["stages.0", "stages.1"], True),
    "convert(timm densenet)": (lambda tv, timm: fastres.convert(timm.create_model(
        "densenetblur121d", growth_rate=4, block_config=(2, 2), bn_size=2, num_classes=10, aa_stem_only=False)),
        ["features.denseblock1", "features.denseblock2"], True),
    # Deep stem: BatchNorm-ReLU pairs of a plain Sequential, which convert makes BatchNormReLU2d.
    "convert(timm resnet50d)": (lambda tv, timm: fastres.convert(timm.create_model(
        "resnet50d", num_classes=10, layers=[1, 1, 1, 1], channels=(8, 16, 32, 64), stem_width=8)),
        ["layer1", "layer4"], True),
}
# The interpreter runs one program at a time: each family of model once there.
INTERPRETED = ["resnet", "densenet", "resnetv2d", "convert(tv densenet)", "convert(timm resnetv2)",
               "convert(timm densenet)"]
CASES = [(p, name) for p in ("triton", "reference") for name in MODELS
         if torch.cuda.is_available() or p == "reference" or name in INTERPRETED]
if torch.cuda.is_available():
    CASES = [c for c in CASES if c[0] == "triton"]


def _model(request, tv, name, device):
    make, _, timm_rules = MODELS[name]
    timm = request.getfixturevalue("timm") if timm_rules else None  # only timm's models need it
    torch.manual_seed(0)
    return make(tv, timm).to(device)


def _symbolic_trace(model: torch.nn.Module, timm_rules: bool) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace``; for timm's models with timm's leaf modules (its norm-act layers), as timm traces."""
    if not timm_rules:
        return torch.fx.symbolic_trace(model)
    from timm.layers import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import LeafModuleAwareTracer

    tracer = LeafModuleAwareTracer(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    graph = tracer.trace(model)
    return torch.fx.GraphModule(tracer.root, graph)


def _input(device):
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)).to(device)


@pytest.mark.parametrize("path, name", CASES, ids=[f"{p}-{n}" for p, n in CASES])
def test_traced_model_trains_and_evaluates_as_the_model(request, path, device, tv, name):
    """Traced in training mode: an SGD step (output, every gradient, BatchNorm buffers), then eval mode, all exact."""
    model = _model(request, tv, name, device)
    source = copy.deepcopy(model)
    traced = _symbolic_trace(source, MODELS[name][2])
    assert {"call_function"} <= {n.op for n in traced.graph.nodes}
    x = _input(device)
    torch.manual_seed(2)  # drop path
    expected = train_steps(model, [x])
    torch.manual_seed(2)
    actual = train_steps(traced, [x])
    for a, e in zip(actual, expected):
        _assert_same(a, e)
    exact = {"rtol": 0, "atol": 0} if x.device.type == "cpu" else {}
    assert_modules_match(source, model, **exact)  # the graph ran the source's modules
    model.eval(), traced.eval()
    with torch.no_grad():
        _assert_same(traced(x), model(x))


@pytest.mark.parametrize("path, name", CASES, ids=[f"{p}-{n}" for p, n in CASES])
def test_feature_extractor(request, path, device, tv, name):
    """create_feature_extractor with a detection backbone's nodes: the model's own intermediate outputs, both modes."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    model = _model(request, tv, name, device)
    _, nodes, timm_rules = MODELS[name]
    if timm_rules:
        from timm.layers import create_feature_extractor
    else:  # no node differs between the modes: nothing is decided at trace time
        train_nodes, eval_nodes = get_graph_node_names(model)
        assert train_nodes == eval_nodes
    source = copy.deepcopy(model)
    extractor = create_feature_extractor(source, return_nodes=nodes)
    for training in (True, False):
        model.train(training), extractor.train(training)
        captured = {}
        hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: captured.__setitem__(n, out))
                 for n in nodes]
        x = _input(device)
        with torch.no_grad():
            torch.manual_seed(2)
            model(x)
            torch.manual_seed(2)
            features = extractor(x)
        for hook in hooks:
            hook.remove()
        assert list(features) == nodes
        for n in nodes:  # a hooked dense block runs unfused: the same numbers up to rounding
            torch.testing.assert_close(features[n], captured[n], msg=lambda m, n=n: f"{n}: {m}")
    # The extractor's graph ran the source's batch norms, once in training mode.
    assert int(source.get_submodule(nodes[0]).get_submodule(_first_bn(source, nodes[0])).num_batches_tracked) == 1


def _first_bn(model: torch.nn.Module, node: str) -> str:
    return next(name for name, m in model.get_submodule(node).named_modules()
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))


@pytest.mark.parametrize("path", [CHEAP_PATH], indirect=True)
@pytest.mark.parametrize("builder", ["resnet18", "densenet121", "resnetv2_50"])
def test_traced_graphs_keep_the_input_checks(path, device, builder):
    """The checks are graph nodes, not decided at trace time, and dead-code elimination keeps them."""
    from torchvision.models.feature_extraction import create_feature_extractor

    model = getattr(fastres.models, builder)(num_classes=10).eval().to(device)
    first = {"resnet18": "layer1", "densenet121": "features.denseblock1", "resnetv2_50": "stages.0"}[builder]
    for graph in (torch.fx.symbolic_trace(model), create_feature_extractor(model, return_nodes=[first])):
        with pytest.raises(ValueError, match="x has 4 channels|expects 3"):
            graph(torch.randn(1, 4, 32, 32, device=device))
        with pytest.raises(ValueError, match="4-D tensor"):
            graph(torch.randn(3, 32, 32, device=device))


@pytest.mark.parametrize("path", [CHEAP_PATH], indirect=True)
@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: fastres.nn.BasicBlock(8, 8), (2, 8, 5, 5)),
        (lambda: fastres.nn.Bottleneck(8, 4, 2, torch.nn.Sequential(fastres.nn.conv1x1(8, 16, 2),
                                                                    torch.nn.BatchNorm2d(16))), (2, 8, 5, 5)),
        (lambda: fastres.nn.PreActBottleneck(8, 16, stride=2, proj_layer=fastres.nn.DownsampleConv), (2, 8, 5, 5)),
        (lambda: fastres.nn.BNReLUConv2d(4, 8, 3, padding=1), (2, 4, 5, 5)),
        (lambda: fastres.nn.DenseBlock(2, 4, bn_size=2, growth_rate=4), (2, 4, 5, 5)),
        (lambda: fastres.nn.Transition(8, 4), (2, 8, 6, 6)),
    ],
    ids=["BasicBlock", "Bottleneck", "PreActBottleneck", "BNReLUConv2d", "DenseBlock", "Transition"],
)
def test_modules_trace_on_their_own(path, device, make, shape):
    module = make().to(device)
    source = copy.deepcopy(module)
    traced = torch.fx.symbolic_trace(source)
    x = torch.randn(shape, device=device)
    _assert_same(traced(x), module(x))
    assert_modules_match(source, module, **({"rtol": 0, "atol": 0} if x.device.type == "cpu" else {}))
    source.eval(), module.eval()
    _assert_same(traced(x), module(x))
