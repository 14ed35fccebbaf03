"""Public functional API of fastres."""

import operator
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_4d, check_batch_norm_args, check_float_tensor, check_same_tensor_meta
from .ops import add_relu as _add_relu
from .ops import batch_norm as _batch_norm
from .ops import bn_relu_conv as _bn_relu_conv
from . import _ext
from . import ops as _ops
from .ops import dense_ext as _dense_ext
from .ops import dense_gpu as _dense_gpu
from .ops import dense_tuning as _dense_tuning
from .ops.dense_ext import BatchNormArgs, DenseLayerArgs
from .ops import sync_batch_norm as _sync_batch_norm
from .ops.layout import has_internal_overlap

__all__ = [
    "BatchNormArgs", "DenseLayerArgs", "add_relu", "batch_norm_relu", "bn_relu_conv1x1", "bn_relu_conv2d",
    "bn_relu_max_pool2d",
    "dense_block", "extension_available", "fused_conv_applies", "recompute_bn_relu_applies", "shared_storage_applies",
    "sync_batch_norm", "sync_batch_norm_relu",
]


def add_relu(x: Tensor, identity: Tensor, inplace: bool = False) -> Tensor:
    """Residual merge ``relu(x + identity)`` in one fused pass.

    Args:
        x: the block's output; written in place when ``inplace=True``.
        identity: the shortcut, with x's device and shape (it is never
            broadcast) and x's dtype. Any pair of layouts works; the output
            takes the layout eager PyTorch would give ``x + identity``.
        inplace: write the result into ``x`` and return it, like torchvision's
            ``out += identity; out = relu(out)``. As with ``+=``, identity may
            then have another floating dtype (a bf16 block output and an fp32
            block input under autocast): the sum is taken in float32 and
            stored in x's dtype.

    Backward saves a 1-bit-per-element ReLU mask instead of the output tensor.
    float32, float16, bfloat16 (computed in float32) and float64.
    """
    check_float_tensor("x", x)
    check_float_tensor("identity", identity)
    check_same_tensor_meta("x", x, "identity", identity, same_dtype=not inplace)
    if inplace and has_internal_overlap(x):
        raise ValueError(
            "x has elements that share memory (e.g. an expanded view) and cannot be "
            "written in place; pass inplace=False"
        )
    return _add_relu.add_relu(x, identity, inplace)


def batch_norm_relu(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: Tensor | None = None,
) -> Tensor:
    """``relu(F.batch_norm(x, ...) [+ residual])`` in one fused pass (two in training).

    The arguments are ``F.batch_norm``'s, in its order, and mean the same:
    training mode normalises with the batch statistics and updates
    ``running_mean``/``running_var`` in place (unbiased variance, factor
    ``momentum``); eval mode uses the running statistics, folded into one
    per-channel scale and shift.

    Args:
        x: (N, C, H, W), float32/float16/bfloat16 (statistics in float32) or
            float64; NCHW, channels_last or any strided view. The output has
            x's dtype and the layout eager's batch norm would give it.
        running_mean, running_var: (C,) buffers, or None (then training must
            be True); updated in place.
        weight, bias: (C,) affine parameters, or None. As for
            ``F.batch_norm``, these four have x's dtype, or all float32 for a
            float16/bfloat16 x (TypeError otherwise).
        residual: added after the affine, before the ReLU (the tail of a
            residual block); x's shape and device, any floating dtype, like
            ``out += identity``.

    Backward saves x, two per-channel vectors and a 1-bit-per-element ReLU
    mask; eager batch norm + ReLU saves x and the whole output.
    """
    _check_batch_norm_args(x, running_mean, running_var, weight, bias, residual, training, momentum, eps)
    channels = x.shape[1]
    if training and x.numel() == channels and channels:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    return _batch_norm.batch_norm_relu(x, running_mean, running_var, weight, bias, training, momentum, eps, residual)


def _check_batch_norm_args(x, running_mean, running_var, weight, bias, residual, training, momentum, eps) -> None:
    check_float_tensor("x", x)
    check_4d("x", x)
    check_batch_norm_args(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        check_float_tensor("residual", residual)
        check_same_tensor_meta("x", x, "residual", residual, same_dtype=False)


def _check_conv_dtype(name: str, weight, x: Tensor) -> None:
    """A convolution weight is a floating tensor of x's dtype (F.conv2d's rule outside autocast)."""
    check_float_tensor(name, weight)
    if weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{name} has dtype {weight.dtype} but x has {x.dtype}: they must be the same "
                        "(as F.conv2d requires outside autocast)")


def _check_engine_dtype(x: Tensor) -> None:
    """``fastres._C``'s CPU engine computes in float32 or float64: a TypeError naming x, not the engine's op."""
    if x.device.type == "cpu" and x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"x must be float32 or float64 on CPU (fastres._C computes in them), got {x.dtype}")


def _pair(name: str, value, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints (integer-valued 0-d tensors too: shapes under ``torch.jit.trace`` are tensors)."""
    try:
        pair = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
        ints = tuple(operator.index(v) for v in pair if not isinstance(v, bool))
    except TypeError:
        ints = ()
    if len(pair) != 2 or len(ints) != 2 or min(ints) < minimum:
        raise ValueError(f"{name} must be an int or a pair of ints >= {minimum}, got {value!r}")
    return ints


def bn_relu_conv2d(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    conv_weight: Tensor,
    conv_bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``F.conv2d(F.relu(F.batch_norm(x, ...)), conv_weight, conv_bias, stride, padding, dilation, groups)``, fused.

    The pre-activation of pre-activation ResNets and DenseNet layers. The
    batch norm's scale and shift and the ReLU are applied while the
    convolution loads its input, so ``relu(batch_norm(x))`` is never written
    to memory, forward or backward: autograd keeps x, two per-channel vectors
    and the parameters, and backward recomputes the activation inside the
    weight-gradient convolution and the ReLU mask inside the input-gradient one.

    Args:
        x: (N, C, H, W), float32/float16/bfloat16 (BN in float32) or float64,
            any layout (channels_last or NCHW, a channel slice of a larger
            tensor is read in place).
        running_mean, running_var, weight, bias, training, momentum, eps: as
            for ``F.batch_norm``; the running statistics are updated in place
            in training, once.
        conv_weight: (C_out, C / groups, kH, kW), x's dtype (under autocast
            any floating dtype: the convolution runs in autocast's, like
            ``F.conv2d``). conv_bias: (C_out,) or None.
        stride, padding, dilation: ints or pairs, as for ``F.conv2d``
            (``padding`` also ``"valid"`` or ``"same"``).

    The fused kernels run on CUDA tensors (and through Triton's interpreter
    inside ``fastres.testing.gpu_paths_on_cpu()``) for ``groups=1``, ``dilation=1`` and integer
    padding; elsewhere, including CPU tensors, this is the eager computation
    above. float32 convolutions use TF32 exactly when
    ``torch.backends.cudnn.allow_tf32`` is set, as cuDNN does.
    """
    _check_batch_norm_args(x, running_mean, running_var, weight, bias, None, training, momentum, eps)
    check_float_tensor("conv_weight", conv_weight)
    if conv_weight.device != x.device:
        raise ValueError(f"conv_weight must be on x's device {x.device}, got {conv_weight.device}")
    if not isinstance(groups, int) or groups < 1 or x.shape[1] % groups or conv_weight.dim() != 4 \
            or conv_weight.shape[0] % groups:
        raise ValueError(
            f"conv_weight must have shape (C_out, C / groups, kH, kW) with C_out and C = {x.shape[1]} divisible by "
            f"groups = {groups!r}, got {tuple(conv_weight.shape)}"
        )
    if conv_weight.shape[1] * groups != x.shape[1]:
        raise ValueError(
            f"conv_weight has shape {tuple(conv_weight.shape)}: it takes {conv_weight.shape[1] * groups} input "
            f"channels (groups={groups}) but x has {x.shape[1]}"
        )
    _check_conv_dtype("conv_weight", conv_weight, x)
    autocast = torch.is_autocast_enabled(x.device.type)
    if conv_bias is not None:
        check_float_tensor("conv_bias", conv_bias)
        if conv_bias.shape != (conv_weight.shape[0],):
            raise ValueError(f"conv_bias must have shape ({conv_weight.shape[0]},), got {tuple(conv_bias.shape)}")
        if conv_bias.device != x.device:
            raise ValueError(f"conv_bias must be on x's device {x.device}, got {conv_bias.device}")
        if conv_bias.dtype != conv_weight.dtype and not autocast:
            raise TypeError(f"conv_bias has dtype {conv_bias.dtype} but conv_weight has {conv_weight.dtype}")
    stride = _pair("stride", stride, 1)
    dilation = _pair("dilation", dilation, 1)
    if isinstance(padding, str):
        if padding not in ("valid", "same"):
            raise ValueError(f"padding must be an int, a pair of ints, 'valid' or 'same', got {padding!r}")
        if padding == "valid":
            padding = (0, 0)
        elif stride != (1, 1):
            raise ValueError("padding='same' is not supported for strided convolutions (as in F.conv2d)")
    else:
        padding = _pair("padding", padding, 0)
    n, c, h, w = x.shape
    if training and n * h * w == 1 and c:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    kh, kw = conv_weight.shape[2:]
    if not isinstance(padding, str):
        for name, size, k, p, d in (("height", h, kh, padding[0], dilation[0]), ("width", w, kw, padding[1], dilation[1])):
            if size + 2 * p < d * (k - 1) + 1:
                raise ValueError(
                    f"x's {name} {size} with padding {p} is smaller than conv_weight's kernel "
                    f"({k}, dilation {d}): the output would be empty"
                )
    return _bn_relu_conv.bn_relu_conv2d(
        x, running_mean, running_var, weight, bias, conv_weight, conv_bias, stride, padding, dilation, groups,
        training, momentum, eps,
    )


def sync_batch_norm_relu(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: Tensor | None = None,
    process_group=None,
) -> Tensor:
    """``batch_norm_relu`` in training mode with statistics over all processes of ``process_group``.

    What ``torch.nn.SyncBatchNorm`` followed by ReLU computes: mean and
    variance per channel over the concatenated batches of every process
    (batch sizes may differ), the same running-statistic update on each, and
    a backward whose input gradient accounts for every process's batch (weight
    and bias gradients are local). Every process of the group must call it.
    CPU tensors work too (gloo). The default group is the whole world; with a
    single process it is ``batch_norm_relu(..., training=True)``.
    """
    _check_sync_args("sync_batch_norm_relu", x, running_mean, running_var, weight, bias, residual, momentum, eps)
    group = process_group or dist.group.WORLD
    if dist.get_world_size(group) == 1:
        return batch_norm_relu(x, running_mean, running_var, weight, bias, True, momentum, eps, residual)
    return _sync_batch_norm.sync_batch_norm_relu(
        x, running_mean, running_var, weight, bias, momentum, eps, residual, group
    )


def sync_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    process_group=None,
) -> Tensor:
    """``torch.nn.SyncBatchNorm``'s training forward (no ReLU) as a function, on any device.

    Statistics over the concatenated batches of every process of
    ``process_group`` (batch sizes may differ), the same running-statistic
    update on each, an input gradient that accounts for every process's batch
    (weight and bias gradients local). Eager PyTorch with differentiable
    all-reduces, so it also runs where torch's SyncBatchNorm refuses the input
    (CPU tensors on gloo). Every process of the group must call it; with a
    single process it is ``F.batch_norm(..., training=True)``.
    """
    _check_sync_args("sync_batch_norm", x, running_mean, running_var, weight, bias, None, momentum, eps)
    group = process_group or dist.group.WORLD
    if dist.get_world_size(group) == 1:
        return F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
    return _sync_batch_norm.sync_batch_norm(x, running_mean, running_var, weight, bias, momentum, eps, group)


def _check_sync_args(name, x, running_mean, running_var, weight, bias, residual, momentum, eps) -> None:
    _check_batch_norm_args(x, running_mean, running_var, weight, bias, residual, True, momentum, eps)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{name} needs an initialised torch.distributed process group")


def shared_storage_applies(x: Tensor) -> bool:
    """Whether ``dense_block`` (and the BN-ReLU-recomputing ops) run on ``x`` here: not under CPU autocast."""
    return _ops.route("dense", x) != _ops.EAGER


def fused_conv_applies(x: Tensor) -> bool:
    """Whether DenseNet blocks and transitions on ``x`` run the fused BN-ReLU-Conv kernels (CUDA tensors)."""
    return _ops.route("dense", x) == _ops.TRITON


def recompute_bn_relu_applies(x: Tensor) -> bool:
    """Whether recomputing a BN-ReLU of ``x`` in backward saves memory over the fused BN-ReLU (``fastres._C``'s path, built).

    On the Triton path the fused BN-ReLU keeps a 1-bit mask, about as small, and recomputes nothing.
    """
    return _ops.route("dense", x) == _ops.EXTENSION and _ext.available()


def extension_available() -> bool:
    """Whether ``fastres._C`` (behind ``dense_block``, ``bn_relu_conv1x1``, ``bn_relu_max_pool2d``) is built."""
    return _ext.available()


def _check_norm_args(name: str, norm: BatchNormArgs, channels: int, x: Tensor) -> None:
    """A ``BatchNormArgs`` of ``channels`` channels on ``x``'s device, its fields named ``name.field``."""
    check_batch_norm_args(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, norm.training,
                          norm.momentum, norm.eps, prefix=f"{name}.", channels=channels)


def bn_relu_conv1x1(x: Tensor, norm: BatchNormArgs, weight: Tensor) -> Tensor:
    """``conv2d(relu(batch_norm(x, ...)), weight)``, a 1x1 convolution without bias, as in a DenseNet transition.

    Autograd keeps x and two per-channel vectors; the BN-ReLU output is
    recomputed in backward instead of kept. Running statistics are updated
    once, in forward. Runs in ``fastres._C``.
    """
    check_float_tensor("x", x)
    check_4d("x", x)
    check_float_tensor("weight", weight)
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (x.shape[1], 1, 1):
        raise ValueError(f"weight must have shape (out_channels, {x.shape[1]}, 1, 1), got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    _check_norm_args("norm", norm, x.shape[1], x)
    _check_conv_dtype("weight", weight, x)
    _check_engine_dtype(x)
    return _dense_ext.bn_relu_conv1x1(x, norm, weight)


def bn_relu_max_pool2d(x: Tensor, norm: BatchNormArgs, kernel_size: int = 3, stride: int = 2, padding: int = 1) -> Tensor:
    """``max_pool2d(relu(batch_norm(x, ...)), kernel_size, stride, padding)``, as in a DenseNet's ImageNet stem.

    Autograd keeps x, two per-channel vectors and the pool's indices; the
    BN-ReLU output is recomputed in backward instead of kept. Runs in
    ``fastres._C``.
    """
    check_float_tensor("x", x)
    check_4d("x", x)
    _check_norm_args("norm", norm, x.shape[1], x)
    _check_engine_dtype(x)
    return _dense_ext.bn_relu_max_pool2d(x, norm, kernel_size, stride, padding)


def dense_block(x: Tensor, layers: Sequence[DenseLayerArgs]) -> Tensor:
    """A DenseNet dense block through shared storage: ``cat([x, new_1, ..., new_L], 1)``.

    Layer ``i`` computes ``new_i = dropout(conv2(relu(bn2(conv1(relu(bn1(cat_i)))))))``
    on the concatenation ``cat_i`` of ``x`` and the earlier new features, with
    a 1x1 ``conv1`` and a 3x3 ``conv2`` (padding 1, no bias). Every layer reads
    and writes one shared buffer, which is returned; the BN-ReLU outputs are
    recomputed in backward instead of kept, so autograd keeps per layer only
    the bottleneck output. Running statistics are updated once, in forward.

    Args:
        x: the block input ``(N, C0, H, W)``: float32 or float64 (on CUDA also
            float16 and bfloat16), NCHW or channels_last.
        layers: one ``DenseLayerArgs`` per layer; layer ``i``'s ``conv1_weight``
            takes ``C0 + i*k`` channels, where ``k`` is every ``conv2_weight``'s
            output channel count.

    On CUDA the convolutions are the fused BN-ReLU-Conv kernels, which read
    the buffer in place and write the new channels into it, with no BN-ReLU
    output at all, or ``fastres._C``'s CUDA kernels with cuDNN's
    convolutions (on GPUs without Triton's tensor-core paths, where the
    tuner times it faster for the block's shape, or when
    ``fastres.dense_path("extension")`` selects it); on CPU ``fastres._C``'s
    C++ code runs.
    """
    check_float_tensor("x", x)
    check_4d("x", x)
    if not layers:
        raise ValueError("layers must hold at least one DenseLayerArgs")
    for i, layer in enumerate(layers):
        check_float_tensor(f"layers[{i}].conv1_weight", layer.conv1_weight)
        check_float_tensor(f"layers[{i}].conv2_weight", layer.conv2_weight)
    k = layers[0].conv2_weight.shape[0]
    bottleneck = layers[0].conv1_weight.shape[0]
    for i, layer in enumerate(layers):
        c = x.shape[1] + i * k
        if tuple(layer.conv1_weight.shape) != (bottleneck, c, 1, 1):
            raise ValueError(
                f"layers[{i}].conv1_weight must have shape {(bottleneck, c, 1, 1)} (a 1x1 convolution of the "
                f"{c} channels the layer reads), got {tuple(layer.conv1_weight.shape)}"
            )
        if tuple(layer.conv2_weight.shape) != (k, bottleneck, 3, 3):
            raise ValueError(
                f"layers[{i}].conv2_weight must have shape {(k, bottleneck, 3, 3)}, got {tuple(layer.conv2_weight.shape)}"
            )
        _check_norm_args(f"layers[{i}].norm1", layer.norm1, c, x)
        _check_norm_args(f"layers[{i}].norm2", layer.norm2, bottleneck, x)
        for name in ("conv1_weight", "conv2_weight"):
            t = getattr(layer, name)
            if t.device != x.device:
                raise ValueError(f"layers[{i}].{name} is on {t.device} but x is on {x.device}")
            _check_conv_dtype(f"layers[{i}].{name}", t, x)
    path = _ops.route("dense", x)
    if path == _ops.TRITON and _both_dense_paths_run(x, layers):
        path = _dense_tuning.choose_path(x, layers, _run_dense_block)
    return _run_dense_block(path, x, layers)


def _both_dense_paths_run(x: Tensor, layers: Sequence[DenseLayerArgs]) -> bool:
    """Whether the tuner may pick the engine: "auto" on CUDA with _C's kernels built, eager mode, no process group
    (each process timing on its own could pick differently, and the paths' collectives would not pair up)."""
    return (x.device.type == "cuda" and _ops.dense_choice() == _ops.AUTO and _ext.cuda_kernels()
            and not torch.compiler.is_compiling()
            and all(layer.norm1.process_group is None and layer.norm2.process_group is None for layer in layers))


def _run_dense_block(path: str, x: Tensor, layers: Sequence[DenseLayerArgs]) -> Tensor:
    if path == _ops.TRITON:
        return _dense_gpu.dense_block(x, layers)
    _check_engine_dtype(x)
    return _dense_ext.dense_block(x, layers)
