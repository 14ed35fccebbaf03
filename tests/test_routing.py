"""Where a call runs: ``fastres.ops.route``, and ``fastres.testing.gpu_paths_on_cpu()`` sending CPU tensors down the GPU paths."""

import threading

import pytest
import torch

import fastres
from fastres.nn.module_state import is_plain
from fastres.ops import route
from fastres.testing import gpu_paths_on_cpu
from helpers import assert_trains_like, twin


def test_cpu_tensors_take_the_cpu_paths_outside_the_context():
    x = torch.randn(2, 3, 4, 4)
    assert route("elementwise", x) == "eager"
    assert route("dense", x) == "extension"
    assert route("dense", x.half()) == "eager"  # fastres._C computes in float32/float64
    assert route("dense", x[:0]) == "eager"  # an empty batch: eager handles it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert route("dense", x) == "eager"  # autocast makes the bottleneck bfloat16


def test_the_context_sends_every_op_down_the_gpu_paths_and_nests():
    x = torch.randn(2, 3, 4, 4)
    with gpu_paths_on_cpu():
        assert route("elementwise", x) == route("dense", x) == route("dense", x.half()) == "triton"
        with gpu_paths_on_cpu():
            assert route("dense", x) == "triton"
        assert route("dense", x) == "triton"  # still inside the outer one
        assert route("dense", x[:0]) == "eager"
    assert route("dense", x) == "extension"


def test_the_context_holds_for_its_thread_only():
    x = torch.randn(2, 3, 4, 4)
    seen = []
    with gpu_paths_on_cpu():
        thread = threading.Thread(target=lambda: seen.append(route("elementwise", x)))
        thread.start()
        thread.join()
        assert route("elementwise", x) == "triton"
    assert seen == ["eager"]


def test_the_context_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        with gpu_paths_on_cpu():
            pass
    assert route("elementwise", torch.randn(2)) == "eager"


def test_dense_blocks_follow_the_route():
    """The module's own decision is route's: the fused Function inside the context, fastres._C's outside."""
    block = fastres.nn.DenseBlock(1, 4, 2, 3)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    if fastres.functional.extension_available():
        assert type(block(x).grad_fn).__name__ == "DenseBlockFunctionBackward"
    with gpu_paths_on_cpu():
        assert type(block(x).grad_fn).__name__ == "FusedDenseBlockFunctionBackward"


def test_no_module_level_flags():
    """Routing state lives in the context manager, not in a module attribute that callers flip.

    In a fresh process: torch.compile installs its own constants as module globals where it traced.
    """
    import subprocess
    import sys

    code = ("import sys, fastres.cli, fastres.models, fastres.testing\n"
            "print([f'{n}.{a}' for n, m in list(sys.modules.items()) if n.startswith('fastres')"
            " for a, v in vars(m).items() if isinstance(v, bool)])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_is_plain_takes_exact_types_without_hooks():
    class MyNorm(torch.nn.BatchNorm2d):
        pass

    bn = torch.nn.BatchNorm2d(3)
    assert is_plain(bn, torch.nn.BatchNorm2d, torch.nn.SyncBatchNorm)
    assert not is_plain(MyNorm(3), torch.nn.BatchNorm2d)  # a subclass may have its own forward
    assert not is_plain(bn, torch.nn.ReLU)
    assert not is_plain(None, torch.nn.Identity)
    handle = bn.register_forward_pre_hook(lambda m, args: None)
    assert not is_plain(bn, torch.nn.BatchNorm2d)
    handle.remove()
    with torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: None):
        assert not is_plain(bn, torch.nn.BatchNorm2d)  # a global hook runs on every module call
    assert is_plain(bn, torch.nn.BatchNorm2d)


class _ScaledNorm(torch.nn.BatchNorm2d):
    def forward(self, x):
        return 2 * super().forward(x)


def _swap_relu(block):
    block.relu = torch.nn.GELU()


def _subclass_norm(block):
    norm = _ScaledNorm(block.bn2.num_features)
    norm.load_state_dict(block.bn2.state_dict())
    block.bn2 = norm


def _hook_norm(block):
    block.bn1.register_forward_hook(lambda m, args, out: out * 0.5)


@pytest.mark.parametrize("change", [_swap_relu, _subclass_norm, _hook_norm], ids=["gelu", "norm_subclass", "norm_hook"])
def test_a_module_that_is_not_plain_runs_as_written(path, tv, change):
    """A block whose ReLU, norm or hooks differ from the plain modules computes what eager's does with them."""
    eager, fused = tv.models.resnet.BasicBlock(4, 4), fastres.nn.BasicBlock(4, 4)
    change(eager), change(fused)
    eager, fused = eager.double(), fused.double()
    twin(eager, fused)
    assert_trains_like(fused, eager, [torch.randn(2, 4, 5, 5, dtype=torch.float64) for _ in range(2)])
