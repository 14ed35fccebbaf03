"""fastres.convert on timm's ResNets (``timm.models.resnet``) and ResNetV2s, and its report."""

import copy
import warnings

import pytest
import torch
from torch import nn

import fastres
from helpers import assert_modules_normwise_close, assert_normwise_close

# (case id, timm model, its keyword arguments): the block variants people train.
MODELS = [
    ("resnet18", "resnet18", {}),
    ("resnet50", "resnet50", {}),
    ("resnet50d", "resnet50d", {}),  # deep stem (a Sequential), average-pooled projections
    ("resnext50_32x4d", "resnext50_32x4d", {}),  # grouped 3x3: runs unfused, the rest fused
    ("seresnet50", "seresnet50", {}),  # se between bn3 and the add
    ("resnetaa50", "resnetaa50", {}),  # anti-aliasing between act2 and conv3
    ("resnet50_dropblock_droppath", "resnet50", {"drop_block_rate": 0.2, "drop_path_rate": 0.2}),
    ("resnet18_silu", "resnet18", {"act_layer": "silu"}),  # nothing matches: runs as written
    ("resnetv2_18", "resnetv2_18", {}),
    ("resnetv2_50", "resnetv2_50", {}),
    ("resnetv2_50d", "resnetv2_50d", {"drop_path_rate": 0.2}),
]

# On CPU narrow versions of the same structures: the interpreter runs one program at a time, and the
# reference path checks wiring, which the width does not change (the builders' full widths are checked
# against timm's state_dicts in test_resnetv2.py and test_resnet.py).
NARROW = {"resnet": {"channels": (8, 16, 32, 64), "stem_width": 8}, "resnetv2": {"width_factor": 0.125}}


def _timm_model(timm, name, kwargs, path, device):
    narrow = NARROW["resnetv2" if name.startswith("resnetv2") else "resnet"]
    if name.startswith("resnext"):  # 32 groups of 4 would round the narrow widths to 0
        narrow = {**narrow, "cardinality": 4, "base_width": 16}
    extra = narrow if device.type == "cpu" else {}
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10, **kwargs, **extra)


# Every model and mode on the reference path; the interpreter (one program at a time, a second or more
# per model) runs each kind of block once in training, and the two block families in eval too.
INTERPRETED = {"resnet18", "resnet50", "seresnet50", "resnetaa50", "resnet50_dropblock_droppath", "resnetv2_18",
               "resnetv2_50d"}
CASES = [(p, case, name, kwargs, training) for p in ("triton", "reference") for case, name, kwargs in MODELS
         for training in (True, False)
         if torch.cuda.is_available() or p == "reference"
         or (case in INTERPRETED and (training or case in ("resnet50", "resnetv2_18")))]
if torch.cuda.is_available():
    CASES = [c for c in CASES if c[0] == "triton"]


@pytest.mark.parametrize("path, case, name, kwargs, training", CASES,
                         ids=[f"{p}-{c}-{'train' if t else 'eval'}" for p, c, _, _, t in CASES])
def test_converted_timm_model_matches_timm(on_path, device, timm, path, case, name, kwargs, training):
    """float64: outputs, input and every parameter gradient, BatchNorm buffers, of one forward and backward.

    (One step only: at 32x32 the last stage normalises 4 values per channel, and a second step would
    amplify rounding past 1e-9 in eager timm itself; test_resnetv2.py trains whole models over steps.)
    """
    on_path(path)
    eager = _timm_model(timm, name, kwargs, path, device).to(device, torch.float64).train(training)
    keys = list(eager.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # resnet18_silu: nothing fuses, which convert() says
        fused = fastres.convert(copy.deepcopy(eager))
    assert list(fused.state_dict()) == keys
    x = torch.randn(4, 3, 32, 32, device=device, dtype=torch.float64)
    grad = torch.randn(4, 10, device=device, dtype=torch.float64)
    results = []
    for model in (fused, eager):
        xl = x.clone().requires_grad_()
        torch.manual_seed(1)  # drop_block and drop_path draw the same numbers in both
        out = model(xl)
        out.backward(grad)
        results.append((out, xl.grad))
    (out, dx), (ref, ref_dx) = results
    assert_normwise_close(out, ref, "out")
    assert_normwise_close(dx, ref_dx, "x.grad")
    assert_modules_normwise_close(fused, eager)


def test_convert_fuses_every_timm_resnet50_block(timm):
    model, report = fastres.convert(timm.create_model("resnet50"), report=True)
    blocks = [m for m in model.modules() if isinstance(m, fastres.nn.TimmBottleneck)]
    assert len(blocks) == 16
    assert len(report.fused) == 16
    # The stem runs as timm's forward calls it (replacing its modules would break timm's SyncBN converter).
    assert report.left == [("bn1", "BatchNorm2d: as written, ResNet's forward is not one fastres knows")]
    assert "bn1 -> act1 -> conv2 (BN-ReLU-conv)" in report.fused[0][1]
    assert "bn3 + shortcut -> act3 (BN-add-ReLU)" in report.fused[0][1]


def test_convert_fuses_every_timm_resnetv2_50_block(timm):
    model, report = fastres.convert(timm.create_model("resnetv2_50"), report=True)
    assert len([m for m in model.modules() if isinstance(m, fastres.nn.PreActBottleneck)]) == 16
    # The norms stay timm's BatchNormAct2d (timm's SyncBatchNorm and frozen-BN converters know them).
    assert sum(type(m).__name__ == "BatchNormAct2d" for m in model.modules()) == 49
    assert "norm1 -> conv1 and downsample.conv (BN-ReLU-conv)" in report.fused[0][1]
    assert [p for p, _ in report.left] == ["norm"]  # the final norm-act, called by timm's forward_features
    assert list(model.state_dict()) == list(timm.create_model("resnetv2_50").state_dict())


def test_convert_keeps_se_and_anti_aliasing_modules_working(timm):
    se_model, se_report = fastres.convert(timm.create_model("seresnet50"), report=True)
    se_blocks = [m for m in se_model.modules() if isinstance(m, fastres.nn.TimmBottleneck)]
    assert len(se_blocks) == 16 and all(type(b.se).__name__ == "SEModule" for b in se_blocks)
    se_left = [why for _, why in se_report.left if "se" in why]
    assert len(se_left) == 16 and all("se between it and the add" in why for why in se_left)
    aa_model, aa_report = fastres.convert(timm.create_model("resnetaa50"), report=True)
    aa = [b.aa for b in aa_model.modules() if isinstance(b, fastres.nn.TimmBottleneck) and type(b.aa) is not nn.Identity]
    assert len(aa) == 3 and all(type(m) is nn.AvgPool2d for m in aa)  # the three strided blocks
    assert [p for p, _ in aa_report.left] == ["layer2.0", "layer3.0", "layer4.0", "bn1"]
    assert "aa (AvgPool2d): as written, between the ReLU and conv3" in aa_report.left[0][1]


def test_convert_says_when_nothing_could_be_fused(timm):
    with pytest.warns(UserWarning, match="nothing in this ResNet could be fused"):
        _, report = fastres.convert(timm.create_model("resnet18", act_layer="silu"), report=True)
    assert not report.fused and "act1 is SiLU" in report.left[0][1]
    assert "nothing could be fused" in str(report)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.warns(UserWarning, match="nothing in this Sequential could be fused"):
        _, report = fastres.convert(plain, report=True)
    assert report.left == [("1", "BatchNorm2d: as written, no ReLU follows it (next: nothing)")]


def test_convert_leaves_hooked_modules_as_written_and_says_why(monkeypatch, timm):
    # A full-width model: the CPU path on CPU.
    model = timm.create_model("resnet18", num_classes=10)
    calls = []
    model.layer1[0].bn1.register_forward_hook(lambda *args: calls.append("layer1.0.bn1"))
    model.bn1.register_forward_hook(lambda *args: calls.append("bn1"))
    model, report = fastres.convert(model, report=True)
    assert ("bn1", "BatchNorm2d: as written, it has forward hooks (a fused call would skip them)") in report.left
    assert ("layer1.0", "bn1 -> act1: as written, bn1 is BatchNorm2d or has hooks") in report.left
    model(torch.randn(2, 3, 64, 64))
    assert calls == ["bn1", "layer1.0.bn1"]


def test_convert_report_argument_must_be_a_bool(timm):
    with pytest.raises(TypeError, match="report must be a bool"):
        fastres.convert(timm.create_model("resnet18"), report="yes")
