"""A dense block through shared storage (Pleiss et al., 2017), forward and backward.

Layer ``l`` of a block reads the concatenation of the block input and every
earlier layer's ``k`` new channels, and computes
``conv2(relu(bn2(conv1(relu(bn1(concat))))))``. Here:

- All features live in one buffer ``[N, C0 + L*k, H, W]``, the block's output.
  Layer ``l`` reads the view ``features[:, :C0 + l*k]`` and writes its new
  channels into ``features[:, C0 + l*k : C0 + (l+1)*k]``: no ``torch.cat``.
- Both BN-ReLU outputs are written into two scratch tensors that every layer
  reuses, and are recomputed in backward from the saved batch statistics; the
  running statistics are updated once, in forward.
- Autograd keeps per layer only the bottleneck output (``bn_size*k``
  channels), four per-channel vectors and the dropout mask, so memory grows
  linearly with depth. Neither convolution is run twice.
- Backward accumulates every layer's input gradient into one gradient buffer
  shaped like ``features``.

The BN-ReLU passes run in ``fastres._C`` (C++ on CPU, CUDA kernels on GPU).
"""

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dense_ops
from .batch_norm import channels_last


class BatchNormArgs(NamedTuple):
    """One batch norm's tensors and settings, as ``F.batch_norm`` takes them."""

    running_mean: Tensor | None
    running_var: Tensor | None
    weight: Tensor | None
    bias: Tensor | None
    training: bool  # batch statistics (else the running ones)
    momentum: float
    eps: float


class DenseLayerArgs(NamedTuple):
    """One dense layer: norm1 -> relu -> conv1 (1x1) -> norm2 -> relu -> conv2 (3x3) -> dropout."""

    norm1: BatchNormArgs
    conv1_weight: Tensor
    norm2: BatchNormArgs
    conv2_weight: Tensor
    drop_rate: float
    dropout: bool  # the module is training: dropout is applied


def _params(layer: DenseLayerArgs) -> tuple:
    return (layer.norm1.weight, layer.norm1.bias, layer.conv1_weight, layer.norm2.weight, layer.norm2.bias, layer.conv2_weight)


_PARAMS_PER_LAYER = 6


def _statistics(x: Tensor, bn: BatchNormArgs) -> tuple[Tensor, Tensor]:
    """(mean, invstd) that normalise ``x``; updates the running statistics when training."""
    if not bn.training:
        return bn.running_mean.clone(), torch.rsqrt(bn.running_var + bn.eps)
    mean, var = dense_ops.batch_stats(x)
    if bn.running_mean is not None:
        m = x.numel() // x.shape[1]
        bn.running_mean.mul_(1 - bn.momentum).add_(mean.to(bn.running_mean.dtype), alpha=bn.momentum)
        unbiased = var * (m / (m - 1))
        bn.running_var.mul_(1 - bn.momentum).add_(unbiased.to(bn.running_var.dtype), alpha=bn.momentum)
    return mean, torch.rsqrt(var + bn.eps)


def _scratch_view(storage: Tensor, shape: tuple, memory_format: torch.memory_format) -> Tensor:
    """The first ``prod(shape)`` elements of ``storage`` as a dense tensor in ``memory_format``."""
    n, c, h, w = shape
    flat = storage[: n * c * h * w]
    if memory_format == torch.channels_last:
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(n, c, h, w)


def _scratch(x: Tensor, c0: int, k: int, layers: Sequence[DenseLayerArgs], conv_dtype: torch.dtype):
    """Storage for norm1's output (the widest concatenation, x's dtype) and norm2's (the bottleneck)."""
    n, _, h, w = x.shape
    bottleneck = layers[0].conv1_weight.shape[0]
    scratch1 = torch.empty(n * (c0 + (len(layers) - 1) * k) * h * w, dtype=x.dtype, device=x.device)
    scratch2 = torch.empty(n * bottleneck * h * w, dtype=conv_dtype, device=x.device)
    return scratch1, scratch2


def _bn_relu_into(x: Tensor, mean: Tensor, invstd: Tensor, bn: BatchNormArgs, storage: Tensor, fmt) -> Tensor:
    out = _scratch_view(storage, tuple(x.shape), fmt)
    dense_ops.bn_relu_forward(x, mean, invstd, bn.weight, bn.bias, out)
    return out


def _bn_relu_backward(grad: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, bn: BatchNormArgs, grad_x: Tensor):
    """Accumulates the input gradient into ``grad_x``; returns (dweight, dbias) or Nones."""
    sum_dy, sum_dy_xmu = dense_ops.bn_relu_backward_reduce(grad, x, mean, invstd, bn.weight, bn.bias)
    dense_ops.bn_relu_backward_input(grad, x, mean, invstd, bn.weight, bn.bias, sum_dy, sum_dy_xmu, grad_x, bn.training)
    if bn.weight is None:
        return None, None
    return (sum_dy_xmu * invstd).to(bn.weight.dtype), sum_dy.to(bn.bias.dtype)


def _conv_backward(grad: Tensor, inp: Tensor, weight: Tensor, padding: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(grad_input, grad_weight) of ``conv2d(inp, weight, padding=padding)`` computed in ``dtype``.

    ``dtype`` is what the forward convolution ran in (autocast's, or the
    input's); the gradients come back in the dtypes of ``inp`` and ``weight``,
    as autocast's casts give them.
    """
    grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad.to(dtype), inp.to(dtype), weight.to(dtype), None, [1, 1], [padding, padding], [1, 1], False, [0, 0], 1,
        [True, True, False],
    )
    return grad_input.to(inp.dtype), grad_weight.to(weight.dtype)


class DenseBlockFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, layers: Sequence[DenseLayerArgs], *params: Tensor) -> Tensor:
        n, c0, h, w = x.shape
        k = layers[0].conv2_weight.shape[0]
        fmt = torch.channels_last if channels_last(x) else torch.contiguous_format
        features = torch.empty((n, c0 + len(layers) * k, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
        features[:, :c0].copy_(x)
        # Under autocast the convolutions run in its dtype, so the bottleneck
        # output (and norm2's scratch) has that dtype; features keep x's.
        device_type = x.device.type
        conv_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        scratch1, scratch2 = _scratch(x, c0, k, layers, conv_dtype)

        saved, masks = [], []
        for i, layer in enumerate(layers):
            c = c0 + i * k
            concat = features[:, :c]
            mean1, invstd1 = _statistics(concat, layer.norm1)
            a1 = _bn_relu_into(concat, mean1, invstd1, layer.norm1, scratch1, fmt)
            b = F.conv2d(a1, layer.conv1_weight)
            mean2, invstd2 = _statistics(b, layer.norm2)
            a2 = _bn_relu_into(b, mean2, invstd2, layer.norm2, scratch2, fmt)
            new = F.conv2d(a2, layer.conv2_weight, padding=1)
            mask = None
            if layer.drop_rate > 0 and layer.dropout:
                new, mask = torch.native_dropout(new, layer.drop_rate, True)  # F.dropout's RNG use
            features[:, c : c + k].copy_(new)
            saved += [b, mean1, invstd1, mean2, invstd2]
            masks.append(mask)
        ctx.save_for_backward(features, *saved, *masks)
        ctx.layers, ctx.c0, ctx.k, ctx.fmt = layers, c0, k, fmt
        ctx.conv_dtype = conv_dtype
        return features

    @staticmethod
    def backward(ctx, grad_features: Tensor):
        layers, c0, k, fmt = ctx.layers, ctx.c0, ctx.k, ctx.fmt
        features, *saved = ctx.saved_tensors
        saved, masks = saved[: 5 * len(layers)], saved[5 * len(layers) :]
        grad_buffer = torch.empty_like(features, memory_format=fmt)
        grad_buffer.copy_(grad_features)
        scratch1, scratch2 = _scratch(features, c0, k, layers, ctx.conv_dtype)

        grads = [None] * (len(layers) * _PARAMS_PER_LAYER)
        for i in reversed(range(len(layers))):
            layer, c = layers[i], c0 + i * k
            b, mean1, invstd1, mean2, invstd2 = saved[5 * i : 5 * i + 5]
            grad_new = grad_buffer[:, c : c + k]
            if masks[i] is not None:
                grad_new = torch.ops.aten.native_dropout_backward(grad_new, masks[i], 1 / (1 - layer.drop_rate))
            grad_new = grad_new.contiguous(memory_format=fmt)

            a2 = _bn_relu_into(b, mean2, invstd2, layer.norm2, scratch2, fmt)
            grad_a2, grad_conv2 = _conv_backward(grad_new, a2, layer.conv2_weight, 1, ctx.conv_dtype)
            grad_b = torch.zeros_like(b)
            grad_w2, grad_b2 = _bn_relu_backward(grad_a2, b, mean2, invstd2, layer.norm2, grad_b)
            del grad_a2

            concat = features[:, :c]
            a1 = _bn_relu_into(concat, mean1, invstd1, layer.norm1, scratch1, fmt)
            grad_a1, grad_conv1 = _conv_backward(grad_b, a1, layer.conv1_weight, 0, ctx.conv_dtype)
            del grad_b
            grad_w1, grad_b1 = _bn_relu_backward(grad_a1, concat, mean1, invstd1, layer.norm1, grad_buffer[:, :c])
            del grad_a1
            grads[_PARAMS_PER_LAYER * i : _PARAMS_PER_LAYER * (i + 1)] = [
                grad_w1, grad_b1, grad_conv1, grad_w2, grad_b2, grad_conv2,
            ]
        grad_x = grad_buffer[:, :c0].contiguous(memory_format=fmt)
        return (grad_x, None, *grads)


def dense_block(x: Tensor, layers: Sequence[DenseLayerArgs]) -> Tensor:
    """``cat([x, new_1, ..., new_L], 1)`` of a dense block, through shared storage."""
    params = [p for layer in layers for p in _params(layer)]
    return DenseBlockFunction.apply(x, tuple(layers), *params)
