"""Launch keys are derived by Triton's own binder: every argument Triton specialises on changes the key.

A launch reuses a compiled binary exactly when its key matches; a field left
out would run a binary compiled for other arguments. The key is what
``JITFunction.run`` specialises with for sm_90, so these checks hold the
package to Triton's rules rather than to a list written here.
"""

import pytest
import torch
import triton.language as tl

from fastres.kernels.add_relu import add_relu_fwd_kernel
from fastres.kernels.bn_relu_conv import forward_kernel


def _add_relu_args(x=None, r=None, z=None, mask=None, n=64, size1=1, stride=0, dense=True, block=2048):
    x = torch.randn(64) if x is None else x
    r = torch.randn(64) if r is None else r
    z = torch.empty(64) if z is None else z
    return (x, r, z, mask, n, size1, 1, 1, stride, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            dense, True, True, mask is not None, False, block)


def _key(*args, stream=0, warps=8, stages=None, kernel=add_relu_fwd_kernel):
    return kernel.key(stream, warps, stages, *args)


BASE = _key(*_add_relu_args())


@pytest.mark.parametrize("change", [
    "x dtype", "x misaligned", "n not a multiple of 16", "n wide", "size 1", "stride 1", "stride not a multiple of 16",
    "mask given", "constexpr flag", "constexpr block", "stream", "warps", "stages",
])
def test_a_specialisation_relevant_change_changes_the_key(change):
    base = torch.randn(80)
    if change == "x dtype":
        key = _key(*_add_relu_args(x=torch.randn(64, dtype=torch.float64)))
    elif change == "x misaligned":
        key = _key(*_add_relu_args(x=base[1:65]))  # 4 bytes past a 16-byte boundary
    elif change == "n not a multiple of 16":
        key = _key(*_add_relu_args(n=63))
    elif change == "n wide":
        key = _key(*_add_relu_args(n=2 ** 31))  # an int64 argument
    elif change == "size 1":
        key = _key(*_add_relu_args(size1=7))  # 1 is specialised as a constant
    elif change == "stride 1":
        key = _key(*_add_relu_args(stride=1))
    elif change == "stride not a multiple of 16":
        key = _key(*_add_relu_args(stride=5))  # 0 counts as divisible by 16
    elif change == "mask given":
        key = _key(*_add_relu_args(mask=torch.empty(8, dtype=torch.uint8)))
    elif change == "constexpr flag":
        key = _key(*_add_relu_args(dense=False))
    elif change == "constexpr block":
        key = _key(*_add_relu_args(block=1024))
    elif change == "stream":
        key = _key(*_add_relu_args(), stream=7)
    elif change == "warps":
        key = _key(*_add_relu_args(), warps=4)
    else:
        key = _key(*_add_relu_args(), stages=2)
    assert key != BASE


def test_values_triton_treats_alike_share_a_key():
    assert _key(*_add_relu_args(n=48)) == BASE  # both divisible by 16
    assert _key(*_add_relu_args(n=5)) == _key(*_add_relu_args(n=7))
    assert _key(*_add_relu_args(x=torch.randn(100)[16:80])) == BASE  # another 16-byte-aligned pointer


def test_the_conv_kernels_key_covers_every_argument():
    """One entry per parameter of the function (constexprs included), after stream, warps and stages."""
    x = torch.randn(2, 8, 5, 5)
    w = torch.randn(4, 8, 3, 3)
    y = torch.empty(2, 4, 5, 5)
    stats = torch.randn(17)
    args = (x, stats, None, None, w, None, torch.ones(256), y, 2, 8, 5, 5, 4, 5, 5, *x.stride(), *w.stride(), *y.stride(),
            3, 3, 1, 1, 1, 1, tl.float32, "ieee", 32, 32, 16)
    key = _key(*args, kernel=forward_kernel, warps=4, stages=3)
    assert len(key) == 3 + len(args)
    other = _key(*args[:-1], 32, kernel=forward_kernel, warps=4, stages=3)
    assert other != key
