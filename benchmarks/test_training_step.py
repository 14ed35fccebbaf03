"""A whole training step: fastres.models vs the eager model it replaces vs torch.compile.

The eager model is torchvision's ResNet, or timm's ResNetV2 for the
pre-activation ``resnetv2_*``. One step is what a training loop runs per
batch: ``zero_grad``, forward, cross-entropy on random labels, backward and an
SGD step (momentum, weight decay). All three start from the same weights
(fastres loads the eager model's state_dict); ``compile`` compiles the eager
model, the optimizer step stays eager in every provider. bfloat16 is mixed precision: fp32 parameters and float32 input
images, forward and loss under ``torch.autocast``.
"""

import pytest
import torch

import fastres.models
from fastres._torchvision import import_torchvision

from .common import memory_format, training_step
from .common import cudnn_benchmark  # noqa: F401 - an autouse fixture, active in this module

tv = import_torchvision()

LAYOUT = "channels_last"  # as ResNets are trained on GPUs


def size(name, batch, hw, num_classes, dtype, mark):
    case_id = f"{name}-N{batch}-{hw}x{hw}-{dtype}"
    return pytest.param(name, batch, hw, num_classes, dtype, marks=mark, id=case_id)


# ImageNet training sizes for a GPU, and a CPU smoke size whose torch.compile
# takes well under a minute.
SIZES = [
    size("resnet18", 2, 32, 10, "float32", pytest.mark.cpu_only),
    size("resnet50", 64, 224, 1000, "bfloat16", pytest.mark.cuda_only),
    size("resnet50", 128, 224, 1000, "bfloat16", pytest.mark.cuda_only),
    size("resnetv2_18", 2, 32, 10, "float32", pytest.mark.cpu_only),
    size("resnetv2_50", 64, 224, 1000, "bfloat16", pytest.mark.cuda_only),
]


def eager_model(name, num_classes):
    if name.startswith("resnetv2"):
        import timm  # after import_torchvision: timm imports torchvision

        return timm.create_model(name, num_classes=num_classes)
    return getattr(tv.models, name)(num_classes=num_classes)


def make_model(provider, name, num_classes, device, fmt, compile_once, key):
    torch.manual_seed(0)
    eager = eager_model(name, num_classes)
    if provider == "fastres":
        model = getattr(fastres.models, name)(num_classes=num_classes)
        model.load_state_dict(eager.state_dict())
    else:
        model = eager
    model = model.to(device=device, memory_format=fmt).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    return (compile_once(model, key) if provider == "compile" else model), optimizer


@pytest.mark.parametrize("provider", ["fastres", "eager", "compile"])
@pytest.mark.parametrize("name, batch, hw, num_classes, dtype", SIZES)
def test_training_step(bench, compile_once, device, name, batch, hw, num_classes, dtype, provider):
    shape = (batch, 3, hw, hw)
    fmt = memory_format(LAYOUT)
    torch_dtype = getattr(torch, dtype)
    model, optimizer = make_model(
        provider, name, num_classes, device, fmt, compile_once, key=(name, shape, dtype),
    )
    images = torch.randn(shape, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(num_classes, (batch,), device=device)
    step = training_step(model, optimizer, images, labels, device, torch_dtype)
    bench(step, op=name, provider=provider, mode="step", shape=shape, dtype=torch_dtype, layout=LAYOUT)
