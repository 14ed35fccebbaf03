"""fastres's ResNet and DenseNet builders take torchvision's builder arguments and behave as torchvision's do.

The weights never download here: torchvision's loader is replaced by one that
returns the state_dict of torchvision's own model for the URL asked, built
from a fixed seed, so both builders load the same tensors.
"""

import inspect
import warnings

import pytest
import torch

import fastres

TORCHVISION_BUILDERS = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
    "densenet121", "densenet161", "densenet169", "densenet201",
]
SMALL = ["resnet18", "resnext50_32x4d", "densenet121"]  # one of each family, for the calls that build models


@pytest.fixture
def weights_from(tv, monkeypatch):
    """torchvision's ``load_state_dict_from_url`` replaced: the URLs asked, and torchvision's model's tensors."""
    import torchvision.models._api as api

    asked = []

    def load(url, *args, **kwargs):
        asked.append(url)
        builder = url.rsplit("/", 1)[1].split("-")[0]  # .../models/resnet18-f37072fd.pth
        torch.manual_seed(1234)
        return getattr(tv.models, builder)().state_dict()

    monkeypatch.setattr(api, "load_state_dict_from_url", load)
    return asked


def _parameters(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("name", TORCHVISION_BUILDERS)
def test_signature_is_torchvisions(tv, name):
    assert _parameters(getattr(fastres.models, name)) == _parameters(getattr(tv.models, name))


def _build(lib, name, *args, **kwargs):
    """(model or the exception's type and message, the warnings' messages); a model without weights from seed 0."""
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = getattr(lib.models, name)(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - compared with torchvision's
            result = (type(err), str(err))
    return result, [str(w.message) for w in caught]


def _assert_builds_alike(tv, name, *args, **kwargs):
    (fused, fused_warnings), (eager, eager_warnings) = _build(fastres, name, *args, **kwargs), _build(tv, name, *args, **kwargs)
    assert fused_warnings == eager_warnings
    if isinstance(eager, tuple):
        assert fused == eager
        return
    assert list(fused.state_dict()) == list(eager.state_dict())
    for (key, a), b in zip(fused.state_dict().items(), eager.state_dict().values()):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("weights", ["DEFAULT", "IMAGENET1K_V1", "enum", "full_name"])
def test_weights_resolve_and_load_as_torchvision(tv, weights_from, name, weights):
    enum = tv.models.get_model_weights(name)
    weights = {"enum": enum.IMAGENET1K_V1, "full_name": f"{enum.__name__}.IMAGENET1K_V1"}.get(weights, weights)
    _assert_builds_alike(tv, name, weights=weights)
    assert len(weights_from) == 2 and weights_from[0] == weights_from[1] == enum.verify(weights).url
    model = getattr(fastres.models, name)(weights=weights, progress=False)
    assert type(model).__module__.startswith("fastres")


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("call", [
    ((), {"pretrained": True}), ((), {"pretrained": False}), ((True,), {}), ((), {"weights": None, "num_classes": 7}),
    ((), {"weights": "DEFAULT", "num_classes": 10}), ((), {"weights": "DEFAULT", "num_classes": 1000}),
    ((), {"weights": "NO_SUCH_WEIGHTS"}), ((), {"weights": 3}), ((), {"pretrained": True, "progress": False}),
], ids=["pretrained", "not_pretrained", "positional", "none", "num_classes_conflict", "num_classes_same",
        "unknown_name", "not_weights", "progress"])
def test_arguments_behave_as_torchvisions(tv, weights_from, name, call):
    """Warnings (pretrained's deprecation), errors (a conflicting num_classes, an unknown name) and models as torchvision's."""
    args, kwargs = call
    _assert_builds_alike(tv, name, *args, **kwargs)


@pytest.mark.parametrize("name, kwargs", [
    ("resnext50_32x4d", {"groups": 4}), ("wide_resnet50_2", {"width_per_group": 64}), ("resnext101_64x4d", {"groups": 64}),
])
def test_fixed_widths_refuse_other_values_as_torchvision(tv, name, kwargs):
    _assert_builds_alike(tv, name, **kwargs)


def test_no_weights_needs_no_torchvision():
    """The builders import torchvision only when weights are asked for."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torchvision'] = None; import fastres; "
            "fastres.models.resnet18(num_classes=3); fastres.models.densenet121(weights=None); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "ok"
