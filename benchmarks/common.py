"""Parameters and helpers that several suites share (fixtures shared by all live in conftest.py)."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

# bfloat16 is a GPU-sized case; the CPU smoke run times float32 alone.
DTYPES = ["float32", pytest.param("bfloat16", marks=pytest.mark.cuda_only)]
LAYOUTS = ["nchw", "channels_last"]


def memory_format(layout: str) -> torch.memory_format:
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed-precision training's context: fp32 parameters, ``dtype`` compute; nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@pytest.fixture(scope="module", autouse=True)
def cudnn_benchmark():
    """Let cuDNN pick its fastest algorithms (during the untimed first call), as training does.

    Autouse in each suite that imports it.
    """
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    yield
    torch.backends.cudnn.benchmark = before


def training_step(model, optimizer, images, labels, device, dtype):
    """One step of a training loop: zero_grad, forward (autocast for low precision), cross-entropy, backward, SGD."""

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()

    return step
