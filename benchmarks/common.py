"""Parameters and helpers that several suites share (fixtures shared by all live in conftest.py)."""

import pytest
import torch

from fastres.cli.measure import autocast, memory_format, training_step  # noqa: F401 (the suites' helpers)

# bfloat16 is a GPU-sized case; the CPU smoke run times float32 alone.
DTYPES = ["float32", pytest.param("bfloat16", marks=pytest.mark.cuda_only)]
LAYOUTS = ["nchw", "channels_last"]


@pytest.fixture(scope="module", autouse=True)
def cudnn_benchmark():
    """Let cuDNN pick its fastest algorithms (during the untimed first call), as training does.

    Autouse in each suite that imports it.
    """
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    yield
    torch.backends.cudnn.benchmark = before
