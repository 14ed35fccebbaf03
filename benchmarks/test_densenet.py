"""A DenseNet training step: fastres's shared-storage blocks vs naive concatenation vs checkpointing.

Providers (``make_model`` in ``fastres/cli/memory.py``, same weights in all):
``fastres`` is ``fastres.models`` with ``memory_efficient=True`` on its
default dense path; on CUDA ``fastres_triton`` and ``fastres_c`` force one of
its two CUDA paths (``fastres.dense_path``): the fused Triton convolutions,
and ``fastres._C``'s CUDA kernels with cuDNN's convolutions. ``naive`` and
``checkpoint`` are torchvision's DenseNet with ``memory_efficient=False`` and
``True`` (``torch.utils.checkpoint`` around each layer's cat-BN-ReLU-conv1).
DenseNet-BC is torchvision's DenseNet with fastres's CIFAR stem.

One step as in ``test_training_step.py``: ``zero_grad``, forward, cross-entropy
on random labels, backward, SGD step. Besides the times, ``extra_info`` holds
``saved_mb`` (what autograd keeps for backward, counted through
``saved_tensors_hooks`` in one untimed step; blind to what checkpoints keep
inside themselves) and, on CUDA, ``peak_mb``. A process's peak RSS cannot be
measured per case inside one pytest process: for CPU memory, one variant per
process, use ``fastres memory``.
"""

import pytest
import torch

import fastres
from fastres.cli.memory import make_model, make_optimizer, model_label, saved_bytes

from .common import memory_format
from .common import cudnn_benchmark  # noqa: F401 - an autouse fixture, active in this module
from .common import training_step


def size(model, depth, batch, hw, dtype, layout, mark):
    label = model_label(model, depth, 12)
    case_id = f"{label}-N{batch}-{hw}x{hw}-{dtype}-{layout}"
    return pytest.param(model, depth, batch, hw, dtype, layout, marks=mark, id=case_id)


# CPU smoke sizes (a few seconds each) and GPU training sizes: ImageNet
# DenseNet-121 and the paper's CIFAR DenseNet-BC (L=100, k=12).
SIZES = [
    size("densenet_bc", 40, 4, 32, "float32", "nchw", pytest.mark.cpu_only),
    size("densenet121", None, 2, 64, "float32", "nchw", pytest.mark.cpu_only),
    size("densenet_bc", 100, 64, 32, "float32", "channels_last", pytest.mark.cuda_only),
    size("densenet121", None, 64, 224, "float32", "channels_last", pytest.mark.cuda_only),
    size("densenet121", None, 64, 224, "bfloat16", "channels_last", pytest.mark.cuda_only),
]


DENSE_PATHS = {"fastres": "auto", "fastres_triton": "triton", "fastres_c": "extension"}


@pytest.mark.parametrize("provider", ["fastres", "fastres_triton", "fastres_c", "naive", "checkpoint"])
@pytest.mark.parametrize("model_name, depth, batch, hw, dtype, layout", SIZES)
def test_densenet_step(bench, benchmark, device, model_name, depth, batch, hw, dtype, layout, provider):
    if provider in ("fastres_triton", "fastres_c") and device.type != "cuda":
        pytest.skip("the two CUDA dense paths: on CPU fastres has one engine (the fastres case)")
    with fastres.dense_path(DENSE_PATHS.get(provider, "auto")):
        _step(bench, benchmark, device, model_name, depth, batch, hw, dtype, layout, provider)


def _step(bench, benchmark, device, model_name, depth, batch, hw, dtype, layout, provider):
    shape = (batch, 3, hw, hw)
    fmt = memory_format(layout)
    torch_dtype = getattr(torch, dtype)
    model, num_classes = make_model("fastres" if provider in DENSE_PATHS else provider, model_name,
                                    depth=depth or 100, growth_rate=12)
    model = model.to(device=device, memory_format=fmt).train()
    optimizer = make_optimizer(model)
    images = torch.randn(shape, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(num_classes, (batch,), device=device)
    step = training_step(model, optimizer, images, labels, device, torch_dtype)

    benchmark.extra_info["saved_mb"] = saved_bytes(step, model.parameters()) / 2**20
    bench(
        step, op=model_label(model_name, depth, 12), provider=provider, mode="step", shape=shape,
        dtype=torch_dtype, layout=layout,
    )
