"""fastres.convert on torchvision models and blocks."""

import copy

import pytest
import torch
from torch import nn

import fastres
from helpers import assert_modules_normwise_close, assert_normwise_close, train_steps


@pytest.mark.parametrize("builder", ["resnet18", "resnet50"])
def test_convert_swaps_blocks_in_place_and_keeps_weights(path, device, tv, builder):
    model = getattr(tv.models, builder)(num_classes=10).to(device)
    eager = copy.deepcopy(model)
    params_before = [id(p) for p in model.parameters()]
    keys_before = list(model.state_dict())
    calls = []
    model.layer1[0].register_forward_hook(lambda *args: calls.append(1))

    assert fastres.convert(model) is model
    blocks = [m for m in model.modules() if type(m).__name__ in ("BasicBlock", "Bottleneck")]
    assert blocks and all(isinstance(m, (fastres.nn.BasicBlock, fastres.nn.Bottleneck)) for m in blocks)
    assert [id(p) for p in model.parameters()] == params_before  # optimizers keep working
    assert list(model.state_dict()) == keys_before
    # torchvision's ResNet becomes fastres's (same children), which fuses the stem's BN-ReLU in forward
    # and keeps bn1 a BatchNorm2d that SyncBatchNorm's converter can convert.
    assert type(model) is fastres.models.ResNet
    assert type(model.bn1) is nn.BatchNorm2d and type(model.relu) is nn.ReLU

    # Compared in float64, as whole models are in test_resnet.py.
    model, eager = model.double(), eager.double()
    x = [torch.randn(2, 3, 64, 64, device=device)]
    for got, want in zip(train_steps(model, x), train_steps(eager, x)):
        assert_normwise_close(got, want)
    assert_modules_normwise_close(model, eager)
    assert calls, "the block's forward hook survives conversion"


def test_convert_a_single_block_shares_its_parameters(tv):
    block = tv.models.resnet.Bottleneck(16, 4)
    fused = fastres.convert(block)
    assert isinstance(fused, fastres.nn.Bottleneck)
    assert fused.conv1 is block.conv1 and fused.bn3.running_mean is block.bn3.running_mean


def test_convert_is_idempotent_and_leaves_other_models_alone(tv):
    model = fastres.convert(tv.models.resnet18())
    blocks = [id(m) for m in model.modules()]
    assert [id(m) for m in fastres.convert(model).modules()] == blocks
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert fastres.convert(plain) is plain and isinstance(plain[0], nn.Conv2d)


def test_convert_skips_lookalikes_without_the_block_structure():
    class BasicBlock(nn.Module):  # same name, different structure
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

    model = nn.Sequential(BasicBlock())
    fastres.convert(model)
    assert not isinstance(model[0], fastres.nn.BasicBlock)


class _Stages(nn.Sequential):
    """A feature extractor: returns every child's output, so a BN's output is a result."""

    def forward(self, x):
        outputs = []
        for module in self:
            x = module(x)
            outputs.append(x)
        return outputs


def test_convert_leaves_a_sequential_subclass_with_its_own_forward():
    inner = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())  # plain: its pair is fused
    model = _Stages(inner, nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    eager = copy.deepcopy(model)
    fastres.convert(model)
    assert type(model[2]) is nn.BatchNorm2d and type(model[3]) is nn.ReLU
    assert isinstance(inner[1], fastres.nn.BatchNormReLU2d) and isinstance(inner[2], nn.Identity)
    x = torch.randn(2, 3, 8, 8)
    got, want = model(x), eager(x)
    assert want[2].min() < 0  # the BN stage's output is returned before its ReLU
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_convert_leaves_the_stem_of_a_resnet_subclass(tv):
    class StemFeatures(tv.models.ResNet):  # its own forward returns the stem's BN output
        def forward(self, x):
            return self.bn1(self.conv1(x))

    class Renamed(tv.models.ResNet):  # a subclass may add anything: it keeps its class and its stem
        pass

    features = fastres.convert(StemFeatures(tv.models.resnet.BasicBlock, [1, 1, 1, 1]))
    assert type(features.bn1) is nn.BatchNorm2d and type(features.relu) is nn.ReLU
    assert features(torch.randn(2, 3, 16, 16)).min() < 0
    renamed = fastres.convert(Renamed(tv.models.resnet.BasicBlock, [1, 1, 1, 1]))
    assert type(renamed) is Renamed and type(renamed.bn1) is nn.BatchNorm2d
    assert isinstance(renamed.layer1[0], fastres.nn.BasicBlock)


def test_convert_leaves_fastres_resnets_as_they_are():
    model = fastres.models.resnet18()
    modules = [(name, type(m)) for name, m in model.named_modules()]
    assert fastres.convert(model) is model
    assert [(name, type(m)) for name, m in model.named_modules()] == modules
