"""Bad input gets a clear error naming the argument, before any kernel launch."""

import re

import pytest
import torch

from torch import nn

import fastres
import fastres.ops.add_relu as dispatch_add_relu
from fastres.functional import add_relu, batch_norm_relu, bn_relu_conv2d
from fastres.nn import BNReLUConv2d


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
    with pytest.raises(TypeError, match=f"{type(block).__name__}: x must have a floating dtype, got torch.int64"):
        block(torch.ones(2, c, 5, 5, dtype=torch.int64))  # eager: a RuntimeError from inside its convolution


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


F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16


@pytest.mark.parametrize(
    "x_dtype, stats_dtype, weight_dtype, bad",
    [
        (F32, F64, F32, "running_mean"),
        (F32, F32, F64, "weight"),
        (F32, F16, F16, "running_mean"),
        (F64, F32, F32, "running_mean"),
        (F16, F32, F16, "weight"),  # mixed precision wants every per-channel tensor float32
        (BF16, BF16, F32, "running_mean"),
    ],
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_relu_refuses_the_dtypes_eager_refuses(path, monkeypatch, x_dtype, stats_dtype, weight_dtype, bad, training):
    """As F.batch_norm on every path (the Triton one took float64 statistics with a float32 x)."""
    import torch.nn.functional as F

    import fastres.ops.batch_norm as dispatch_batch_norm

    x = torch.randn(2, 3, 4, 4, dtype=x_dtype)
    args = (torch.zeros(3, dtype=stats_dtype), torch.ones(3, dtype=stats_dtype),
            torch.ones(3, dtype=weight_dtype), torch.zeros(3, dtype=weight_dtype), training)
    with pytest.raises(RuntimeError):
        F.batch_norm(x, *args)
    monkeypatch.setattr(dispatch_batch_norm, "batch_norm_relu", lambda *a: pytest.fail("reached dispatch"))
    with pytest.raises(TypeError, match=f"{bad} has dtype {stats_dtype if 'running' in bad else weight_dtype} but x has {x_dtype}"):
        fastres.functional.batch_norm_relu(x, *args)


def test_batch_norm_relu_takes_the_dtypes_eager_takes(path):
    x = torch.randn(2, 3, 4, 4, dtype=F16)
    stats = (torch.zeros(3), torch.ones(3), torch.ones(3), torch.zeros(3))  # float32: mixed precision
    assert fastres.functional.batch_norm_relu(x, *stats, training=True).dtype == F16
    fastres.functional.batch_norm_relu(x.double(), torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64), training=True)


def test_dense_ops_refuse_the_dtypes_eager_refuses():
    from fastres.functional import BatchNormArgs, bn_relu_conv1x1

    stats = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    with pytest.raises(TypeError, match="norm.running_mean has dtype torch.float64 but x has torch.float32"):
        bn_relu_conv1x1(torch.randn(2, 3, 4, 4), BatchNormArgs(*stats, None, None, True, 0.1, 1e-5), torch.randn(2, 3, 1, 1))


def test_resnet_names_its_input_and_shape():
    """Not the stem convolution's output, which a 3-D (unbatched) input would otherwise reach BN as."""
    model = fastres.models.resnet18()
    with pytest.raises(ValueError, match=r"ResNet: x must be a 4-D tensor \(N, C, H, W\), got shape \(3, 16, 16\)"):
        model(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match="ResNet: x has 4 channels but conv1 expects 3"):
        model(torch.randn(2, 4, 16, 16))


_PER_CHANNEL = ("running_mean", "running_var", "weight", "bias")
# Every functional op that takes a batch norm's tensors and settings: one checker serves them all.
_BN_OPS = ["batch_norm_relu", "bn_relu_conv2d", "sync_batch_norm_relu", "bn_relu_conv1x1", "bn_relu_max_pool2d",
           "dense_block"]


def _named(op: str, field: str) -> str:
    """How ``op``'s error names a batch norm's ``field``: the argument, or the ``BatchNormArgs`` field."""
    if op in ("batch_norm_relu", "bn_relu_conv2d", "sync_batch_norm_relu"):
        return field
    return f"{'layers[0].norm1' if op == 'dense_block' else 'norm'}.{field}"


def _call(op, x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5):
    """``op`` on a 4-channel ``x`` with these batch-norm tensors and settings (the other arguments valid)."""
    from fastres.functional import BatchNormArgs, DenseLayerArgs

    f = fastres.functional
    norm = BatchNormArgs(rm, rv, w, b, training, momentum, eps)
    if op == "batch_norm_relu":
        return f.batch_norm_relu(x, rm, rv, w, b, training, momentum, eps)
    if op == "bn_relu_conv2d":
        return f.bn_relu_conv2d(x, rm, rv, w, b, torch.randn(3, 4, 3, 3), padding=1, training=training,
                                momentum=momentum, eps=eps)
    if op == "sync_batch_norm_relu":
        return f.sync_batch_norm_relu(x, rm, rv, w, b, momentum=momentum, eps=eps)
    if op == "bn_relu_conv1x1":
        return f.bn_relu_conv1x1(x, norm, torch.randn(3, 4, 1, 1))
    if op == "bn_relu_max_pool2d":
        return f.bn_relu_max_pool2d(x, norm)
    norm2 = BatchNormArgs(torch.zeros(8), torch.ones(8), None, None, training, 0.1, 1e-5)
    return f.dense_block(x, [DenseLayerArgs(norm, torch.randn(8, 4, 1, 1), norm2, torch.randn(2, 8, 3, 3), 0.0, False)])


def _strided(name, which, c=4):
    """Per-channel tensors for ``c`` channels, ``which`` of them a strided view (``buf[::2]``)."""
    values = {"running_mean": torch.zeros(c), "running_var": torch.ones(c), "weight": torch.rand(c) + 0.5,
              "bias": torch.randn(c)}
    values[which] = torch.empty(2 * c)[::2].copy_(values[which])
    return tuple(values[n] for n in _PER_CHANNEL)


@pytest.mark.parametrize("which", _PER_CHANNEL)
@pytest.mark.parametrize("op", _BN_OPS)
def test_strided_per_channel_tensors_are_refused(path, op, which):
    """A strided view (``buf[::2]``) as a BN parameter or running statistic is refused on every path, naming it:
    the kernels index these tensors with stride 1 and would read (and update) the wrong elements."""
    rm, rv, w, b = _strided(op, which)
    with pytest.raises(ValueError, match=re.escape(f"{_named(op, which)} must be contiguous (stride 1), got stride 2")):
        _call(op, torch.randn(2, 4, 6, 6), rm, rv, w, b)
    contiguous = dict(zip(_PER_CHANNEL, (rm, rv, w, b)))
    assert contiguous[which].stride(0) == 2  # the tensor was not changed


def test_a_strided_view_made_contiguous_works(path):
    """The error's advice: ``.contiguous()`` gives what eager computes (running statistics updated in place)."""
    import torch.nn.functional as F

    x = torch.randn(2, 4, 6, 6)
    w = torch.empty(8)[::2].copy_(torch.rand(4) + 0.5)
    rm, rv = torch.zeros(4), torch.ones(4)
    y = fastres.functional.batch_norm_relu(x, rm, rv, w.contiguous(), None, training=True)
    rm_e, rv_e = torch.zeros(4), torch.ones(4)
    y_e = F.relu(F.batch_norm(x, rm_e, rv_e, w, None, True))
    torch.testing.assert_close(y, y_e)
    torch.testing.assert_close((rm, rv), (rm_e, rv_e))


def _eager_takes_zero_eps_in_eval() -> bool:
    import torch.nn.functional as F
    try:
        F.batch_norm(torch.ones(1, 1, 1, 1), torch.zeros(1), torch.ones(1), training=False, eps=0.0)
    except ValueError:
        return False  # torch 2.11
    return True  # torch 2.13


_EPS_CASES = [
    (True, 0.0, "eps must be positive during training, but got 0.0"),
    (True, -1e-5, "eps must be positive during training, but got -1e-05"),
    (False, -1e-5, f"eps must be {'non-negative' if _eager_takes_zero_eps_in_eval() else 'positive'}, but got -1e-05"),
]


@pytest.mark.parametrize("op, training, eps, match", [
    (op, *case) for op in _BN_OPS for case in _EPS_CASES
    if case[0] or op != "sync_batch_norm_relu"  # synchronized batch norm always trains
])
def test_eps_follows_eagers_rule(path, op, training, eps, match):
    """As ``F.batch_norm``: eps > 0 in training, >= 0 in eval, on every path (the Triton one computed with any eps)."""
    import torch.nn.functional as F
    x = torch.randn(2, 4, 6, 6)
    rm, rv = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match="eps must be"):  # eager refuses too (its wording varies by version)
        F.batch_norm(x, rm, rv, training=training, eps=eps)
    with pytest.raises(ValueError, match=re.escape(match)):
        _call(op, x, rm, rv, None, None, training=training, eps=eps)
    assert rm.eq(0).all() and rv.eq(1).all()  # refused before anything ran


@pytest.mark.parametrize("op", _BN_OPS)
def test_momentum_must_be_a_number(path, op):
    """``F.batch_norm`` takes a float momentum (a module's None is its cumulative average, which modules resolve)."""
    x = torch.randn(2, 4, 6, 6)
    rm, rv = torch.zeros(4), torch.ones(4)
    with pytest.raises(TypeError, match=re.escape(f"{_named(op, 'momentum')} must be a float, got NoneType")):
        _call(op, x, rm, rv, None, None, momentum=None)
    assert rm.eq(0).all() and rv.eq(1).all()


@pytest.mark.parametrize("op", _BN_OPS)
def test_one_tensor_as_both_running_statistics_is_refused(path, op):
    """Eager's result would depend on the order of the two in-place updates, which differs between its devices."""
    x = torch.randn(2, 4, 6, 6)
    stats = torch.ones(4)
    match = f"{_named(op, 'running_mean')} and {_named(op, 'running_var')} must be two tensors, got the same one"
    with pytest.raises(ValueError, match=re.escape(match)):
        _call(op, x, stats, stats, None, None)
    assert stats.eq(1).all()


def test_zero_eps_in_eval_is_taken_as_eager_takes_it(path):
    """torch 2.13 takes eps = 0 in eval, torch 2.11 refuses it: fastres does what the installed torch does."""
    import torch.nn.functional as F

    x = torch.randn(2, 4, 6, 6)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    try:
        expected = F.relu(F.batch_norm(x, rm, rv, training=False, eps=0.0))
    except ValueError:
        with pytest.raises(ValueError, match="eps must be positive, but got 0.0"):
            fastres.functional.batch_norm_relu(x, rm, rv, training=False, eps=0.0)
        return
    torch.testing.assert_close(fastres.functional.batch_norm_relu(x, rm, rv, training=False, eps=0.0), expected)


@pytest.mark.parametrize("bad_dtype, match", [
    (torch.float64, "has dtype torch.float64 but x has torch.float32: they must be the same"),
    (torch.int64, "must have a floating dtype"),
], ids=["float64", "int64"])
@pytest.mark.parametrize("op, name", [("bn_relu_conv1x1", "weight"), ("dense_block", "layers[0].conv1_weight"),
                                      ("dense_block", "layers[0].conv2_weight")])
def test_dense_ops_name_a_convolution_weight_of_the_wrong_dtype(path, op, name, bad_dtype, match):
    """A TypeError naming the weight before anything runs (it was conv2d's RuntimeError from inside the op)."""
    from fastres.functional import BatchNormArgs, DenseLayerArgs, bn_relu_conv1x1, dense_block

    x = torch.randn(2, 4, 6, 6)
    rm = torch.zeros(4)
    norm = BatchNormArgs(rm, torch.ones(4), None, None, True, 0.1, 1e-5)

    def weight(shape, which):
        return torch.ones(shape, dtype=bad_dtype) if which == name else torch.randn(shape)

    with pytest.raises(TypeError, match=re.escape(name) + ".*" + match):
        if op == "bn_relu_conv1x1":
            bn_relu_conv1x1(x, norm, weight((3, 4, 1, 1), "weight"))
        else:
            norm2 = BatchNormArgs(torch.zeros(8), torch.ones(8), None, None, True, 0.1, 1e-5)
            dense_block(x, [DenseLayerArgs(norm, weight((8, 4, 1, 1), "layers[0].conv1_weight"), norm2,
                                           weight((2, 8, 3, 3), "layers[0].conv2_weight"), 0.0, False)])
    assert rm.eq(0).all()  # refused before the statistics were touched


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", ["bn_relu_conv1x1", "bn_relu_max_pool2d", "dense_block"])
def test_cpu_engine_ops_name_x_of_a_dtype_they_do_not_compute_in(path, op, dtype):
    """On CPU these run fastres._C (float32/float64): a TypeError naming x (it named the engine's batch_stats)."""
    from fastres.functional import BatchNormArgs, DenseLayerArgs, bn_relu_conv1x1, bn_relu_max_pool2d, dense_block

    x = torch.randn(2, 4, 6, 6, dtype=dtype)
    norm = BatchNormArgs(torch.zeros(4), torch.ones(4), None, None, True, 0.1, 1e-5)

    def run():
        if op == "bn_relu_conv1x1":
            return bn_relu_conv1x1(x, norm, torch.randn(3, 4, 1, 1, dtype=dtype))
        if op == "bn_relu_max_pool2d":
            return bn_relu_max_pool2d(x, norm)
        norm2 = BatchNormArgs(torch.zeros(8), torch.ones(8), None, None, True, 0.1, 1e-5)
        return dense_block(x, [DenseLayerArgs(norm, torch.randn(8, 4, 1, 1, dtype=dtype), norm2,
                                              torch.randn(2, 8, 3, 3, dtype=dtype), 0.0, False)])

    if path == "triton" and op == "dense_block":  # CUDA's path: the fused kernels take every float dtype
        assert run().dtype == dtype
        return
    with pytest.raises(TypeError, match=f"x must be float32 or float64 on CPU .*got {dtype}"):
        run()


# --- batch_norm_relu and BatchNormReLU2d -----------------------------------------


def _bn_good(device):
    x, r = torch.randn(2, 3, 4, 4, device=device), torch.randn(2, 3, 4, 4, device=device)
    w, b, rm = (torch.randn(3, device=device) for _ in range(3))
    rv = torch.rand(3, device=device) + 0.5
    return dict(x=x, running_mean=rm, running_var=rv, weight=w, bias=b, training=True, residual=r)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"x": torch.randn(2, 3, 4)}, ValueError, "x must be a 4-D"),
        ({"x": torch.ones(2, 3, 4, 4, dtype=torch.int32)}, TypeError, "x must have a floating dtype"),
        ({"weight": torch.ones(4)}, ValueError, r"weight must have shape \(3,\)"),
        ({"running_mean": torch.zeros(3, device="meta")}, ValueError, "running_mean must be on x's device"),
        ({"running_var": torch.zeros(3, dtype=torch.int64)}, TypeError, "running_var must have a floating dtype"),
        ({"residual": torch.randn(2, 3, 4, 5)}, ValueError, "x and residual must have the same shape"),
        ({"running_mean": None}, ValueError, "running_mean and running_var must be given together"),
        ({"running_mean": None, "running_var": None, "training": False}, ValueError, "training=False"),
        ({"x": torch.randn(1, 3, 1, 1)}, ValueError, "more than 1 value per channel"),
    ],
    ids=["3d", "int", "weight_shape", "stats_device", "stats_dtype", "residual_shape", "one_stat", "eval_no_stats", "one_value"],
)
def test_batch_norm_relu_names_bad_input(path, device, change, error, match):
    args = _bn_good(device)
    args.update({k: v.to(device) if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v for k, v in change.items()})
    if "x" in change:
        args["residual"] = None
    with pytest.raises(error, match=match):
        batch_norm_relu(**args)


def test_batch_norm_relu_module_names_the_channel_count(device):
    bn = fastres.nn.BatchNormReLU2d(4).to(device)
    with pytest.raises(ValueError, match="x has 3 channels but BatchNormReLU2d expects 4"):
        bn(torch.randn(2, 3, 5, 5, device=device))
    with pytest.raises(ValueError, match="x must be a 4-D tensor"):
        bn(torch.randn(2, 4, 5, device=device))


# --- bn_relu_conv2d and BNReLUConv2d ---------------------------------------------


def _conv_good(device):
    x = torch.randn(2, 4, 5, 5, device=device)
    return dict(x=x, running_mean=torch.zeros(4, device=device), running_var=torch.ones(4, device=device),
                weight=torch.ones(4, device=device), bias=torch.zeros(4, device=device),
                conv_weight=torch.randn(6, 4, 3, 3, device=device), conv_bias=None, padding=1, training=True)


@pytest.mark.parametrize("change,error,match", [
    (dict(x=torch.randn(2, 4, 5)), ValueError, "x must be a 4-D"),
    (dict(x=torch.randint(0, 3, (2, 4, 5, 5))), TypeError, "x must have a floating dtype"),
    (dict(conv_weight=torch.randn(6, 3, 3, 3)), ValueError, "conv_weight has shape .* takes 3 input channels"),
    (dict(conv_weight=torch.randn(6, 4, 3)), ValueError, "conv_weight must have shape"),
    (dict(conv_weight=torch.randn(6, 4, 3, 3, dtype=torch.float64)), TypeError, "conv_weight has dtype"),
    (dict(conv_bias=torch.randn(5)), ValueError, "conv_bias must have shape"),
    (dict(running_mean=torch.zeros(3)), ValueError, "running_mean must have shape"),
    (dict(weight=torch.ones(4, dtype=torch.float64)), TypeError, "weight has dtype"),
    (dict(padding=-1), ValueError, "padding must be"),
    (dict(padding="full"), ValueError, "padding must be"),
    (dict(stride=0), ValueError, "stride must be"),
    (dict(padding=0, conv_weight=torch.randn(6, 4, 7, 7)), ValueError, "output would be empty"),
    (dict(x=torch.randn(1, 4, 1, 1), padding=0, conv_weight=torch.randn(6, 4, 1, 1)), ValueError,
     "more than 1 value per channel"),
    (dict(training=False, running_mean=None, running_var=None), ValueError, "running_mean and running_var"),
])
def test_bn_relu_conv2d_names_bad_input(path, device, change, error, match):
    args = _conv_good(device)
    args.update({k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in change.items()})
    with pytest.raises(error, match=match):
        bn_relu_conv2d(**args)


def test_bn_relu_conv_module_names_the_channel_count(device):
    m = BNReLUConv2d(4, 6, 3, device=device)
    with pytest.raises(ValueError, match="x has 5 channels but BatchNorm2d expects 4"):
        m(torch.randn(2, 5, 5, 5, device=device))


_TINY_DENSENET = {"growth_rate": 4, "block_config": (2, 3, 2), "num_init_features": 8, "bn_size": 2, "num_classes": 5}


# --- DenseNets -------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, x, match",
    [
        (lambda: fastres.nn.DenseBlock(2, 5, 2, 3), torch.randn(2, 4, 5, 5), "init_features has 4 channels .* expects 5"),
        (lambda: fastres.nn.DenseBlock(2, 5, 2, 3), torch.randn(5, 5, 5), "init_features must be a 4-D tensor"),
        (lambda: fastres.nn.DenseLayer(5, 3, 2, 0.0), torch.randn(2, 6, 5, 5), "input has 6 channels .* expects 5"),
        (lambda: fastres.nn.DenseLayer(5, 3, 2, 0.0), torch.randn(2, 5, 5), "input must be a 4-D tensor"),
        (lambda: fastres.nn.Transition(6, 3), torch.randn(2, 5, 4, 4), "x has 5 channels .* expects 6"),
        (lambda: fastres.models.DenseNet(**_TINY_DENSENET), torch.randn(2, 1, 32, 32), "x has 1 channels but conv0 expects 3"),
        (lambda: fastres.models.DenseNet(**_TINY_DENSENET), torch.randn(3, 32, 32), "x must be a 4-D tensor"),
    ],
    ids=["block_channels", "block_3d", "layer_channels", "layer_3d", "transition_channels", "model_channels", "model_3d"],
)
def test_densenet_modules_name_bad_input(make, x, match):
    module = make()
    with pytest.raises(ValueError, match=match):
        module(x)
    assert all(b.item() == 0 for n, b in module.named_buffers() if n.endswith("num_batches_tracked"))


def test_training_on_one_value_per_channel_raises_like_eager(needs_ext):
    block = fastres.nn.DenseBlock(2, 3, 2, 2)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        block(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        nn.BatchNorm2d(3)(torch.randn(1, 3, 1, 1))


def test_functional_dense_block_checks_weights(needs_ext):
    block = fastres.nn.DenseBlock(2, 5, 2, 3)
    args = [layer.dense_args((2, layer.conv1.in_channels, 4, 4)) for layer in block.values()]
    args[1] = args[1]._replace(conv1_weight=torch.randn(6, 7, 1, 1))
    with pytest.raises(ValueError, match=r"layers\[1\].conv1_weight must have shape \(6, 8, 1, 1\)"):
        fastres.functional.dense_block(torch.randn(2, 5, 4, 4), args)
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        fastres.functional.dense_block(torch.ones(2, 5, 4, 4, dtype=torch.int64), args[:1])


# --- ResNetV2 --------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: fastres.models.resnetv2_50()(torch.randn(2, 4, 32, 32)), ValueError, "x has 4 channels"),
        (lambda: fastres.models.resnetv2_50()(torch.randn(3, 32, 32)), ValueError, "x must be a 4-D tensor"),
        (lambda: fastres.models.resnetv2_18()(torch.randint(0, 5, (2, 3, 32, 32))), TypeError, "floating dtype"),
        (lambda: fastres.models.resnetv2_50(stem_type="deeper"), ValueError, "stem_type must be one of"),
        (lambda: fastres.models.resnetv2_50(small_inputs=True, stem_type="deep"), ValueError, "small_inputs"),
        (lambda: fastres.models.resnetv2_50d(stem_type=""), TypeError, "fixed by the builder: stem_type"),
        (lambda: fastres.models.resnetv2_50(global_pool="catmax"), ValueError, "global_pool must be one of"),
        (lambda: fastres.models.resnetv2_50(output_stride=4), ValueError, "output_stride must be 8, 16 or 32"),
        (lambda: fastres.models.resnetv2_50(num_classes=-1), ValueError, "num_classes must be >= 0"),
        (lambda: fastres.models.ResNetV2([1, 1], channels=(64,)), ValueError, "one entry per stage"),
        (lambda: fastres.models.ResNetV2([1], channels=(64,), preact=False), ValueError, "preact=False"),
        (lambda: fastres.nn.PreActBottleneck(8, 16, act_layer=nn.SiLU), ValueError, "act_layer must be None or nn.ReLU"),
        (lambda: fastres.nn.PreActBottleneck(8, 32)(torch.randn(2, 8, 4, 4)), ValueError, "shortcut gives"),
        (lambda: fastres.nn.PreActBasicBlock(8)(torch.randn(2, 6, 4, 4)), ValueError, "x has 6 channels"),
        (lambda: fastres.nn.DropPath(1.5), ValueError, r"drop_prob must be in \[0, 1\]"),
    ],
    ids=["channels", "3d", "int", "stem_type", "small_inputs_deep", "builder_fixed", "pool", "output_stride",
         "num_classes", "stages", "preact", "act_layer", "no_projection", "block_channels", "drop_prob"],
)
def test_resnetv2_names_bad_input(make, error, match):
    with pytest.raises(error, match=match):
        make()


# --- sync_batch_norm -------------------------------------------------------------


def test_sync_batch_norm_bad_input_is_refused_before_any_collective():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"running_mean must have shape \(4,\)"):
        fastres.functional.sync_batch_norm(x, torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="x must be a 4-D tensor"):
        fastres.functional.sync_batch_norm(torch.randn(2, 4), None, None)
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        fastres.functional.sync_batch_norm(x.long(), None, None)
    with pytest.raises(RuntimeError, match="sync_batch_norm needs an initialised torch.distributed process group"):
        fastres.functional.sync_batch_norm(x, None, None)
