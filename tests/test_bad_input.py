"""Bad input gets a clear error naming the argument, before any kernel launch."""

import pytest
import torch

import fastres
import fastres.ops.add_relu as dispatch_add_relu
from fastres.functional import add_relu


@pytest.fixture(autouse=True)
def _no_launch(monkeypatch):
    """Any call that reaches dispatch is a failure: checks must come first."""
    def launched(*args, **kwargs):
        raise AssertionError("reached dispatch with bad input")
    monkeypatch.setattr(dispatch_add_relu, "add_relu", launched)


def _pair(**kw):
    x = torch.randn(2, 3, 4, 4)
    return x, torch.randn(2, 3, 4, 4, **kw)


@pytest.mark.parametrize(
    "x, identity, error, match",
    [
        (torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3), TypeError, "x must have a floating dtype"),
        (torch.ones(2, 3), torch.ones(2, 3, dtype=torch.int32), TypeError, "identity must have a floating dtype"),
        (torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool), TypeError, "x must have a floating"),
        (torch.ones(2, 3, dtype=torch.complex64), torch.ones(2, 3), TypeError, "x must have a floating"),
        (torch.ones(2, 3), torch.ones(2, 3, dtype=torch.float16), TypeError, "same dtype.*float32 and torch.float16"),
        (torch.ones(2, 3, 4, 4), torch.ones(1, 3, 4, 4), ValueError, r"same shape \(no broadcasting\)"),
        (torch.ones(2, 3), torch.ones(3), ValueError, "same shape"),
        (torch.ones(2, 3), torch.ones(3, 2), ValueError, "same shape"),
        (torch.ones(2, 3), torch.ones(2, 3, device="meta"), ValueError, "same device"),
        ([1.0, 2.0], torch.ones(2), TypeError, "x must be a torch.Tensor"),
        (torch.ones(2), 1.0, TypeError, "identity must be a torch.Tensor"),
    ],
)
def test_add_relu_rejects(x, identity, error, match):
    with pytest.raises(error, match=match):
        add_relu(x, identity)


def test_mixed_dtypes_are_refused_unless_in_place():
    x, r = torch.randn(4), torch.randn(4, dtype=torch.float64)
    with pytest.raises(TypeError, match="x and identity must have the same dtype"):
        add_relu(x, r)
    with pytest.raises(TypeError, match="identity must have a floating dtype"):
        add_relu(x, torch.ones(4, dtype=torch.int64), inplace=True)


def test_block_names_a_missing_downsample():
    block = fastres.nn.BasicBlock(8, 16, stride=2)  # no downsample: shapes cannot match
    with pytest.raises(ValueError, match="BasicBlock: the residual branch gives .* needs a matching downsample"):
        block(torch.randn(2, 8, 6, 6))


def test_inplace_into_expanded_view_is_refused():
    x = torch.randn(1, 3, 1, 1).expand(2, 3, 4, 4)
    with pytest.raises(ValueError, match="x has elements that share memory"):
        add_relu(x, torch.randn(2, 3, 4, 4), inplace=True)


@pytest.mark.parametrize("block", [fastres.nn.BasicBlock(8, 8), fastres.nn.Bottleneck(32, 8)], ids=["basic", "bottleneck"])
def test_block_rejects_wrong_input(block):
    c = block.conv1.in_channels
    with pytest.raises(ValueError, match=f"x has {c + 1} channels but .* expects {c}"):
        block(torch.randn(2, c + 1, 5, 5))
    with pytest.raises(ValueError, match="x must be a 4-D tensor"):
        block(torch.randn(c, 5, 5))


def test_convert_rejects_non_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fastres.convert("resnet50")


def test_block_constructor_checks_follow_torchvision():
    with pytest.raises(ValueError, match="groups=1 and base_width=64"):
        fastres.nn.BasicBlock(8, 8, groups=2)
    with pytest.raises(NotImplementedError, match="Dilation > 1"):
        fastres.nn.BasicBlock(8, 8, dilation=2)
    with pytest.raises(ValueError, match="replace_stride_with_dilation"):
        fastres.models.resnet50(replace_stride_with_dilation=[True])
