"""A dense block on ``fastres._C``: shared storage (Pleiss et al., 2017), forward and backward, on CPU and CUDA.

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

The BN-ReLU passes run in ``fastres._C`` (its C++ code on CPU tensors, its
CUDA kernels on CUDA tensors) and the convolutions are torch's (cuDNN on
CUDA). On CUDA this is the path where the fused Triton convolutions of
``dense_gpu`` cannot run, or where it is selected (``fastres.dense_path``).
"""

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import extension
from .batch_norm import differentiable_batch_norm
from .layout import channels_last, conv_dtype
from .owned import mark_owned as _mark_owned, owned as _owned


class BatchNormArgs(NamedTuple):
    """One batch norm's tensors and settings, as ``F.batch_norm`` takes them."""

    running_mean: Tensor | None
    running_var: Tensor | None
    weight: Tensor | None
    bias: Tensor | None
    training: bool  # batch statistics (else the running ones)
    momentum: float
    eps: float
    # Training statistics synchronized over this torch.distributed group (SyncBatchNorm); None: local.
    process_group: object = None


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


def _drops(layer: DenseLayerArgs) -> bool:
    """Whether the layer applies dropout (and saves its mask)."""
    return layer.drop_rate > 0 and layer.dropout


def _memory_format(x: Tensor) -> torch.memory_format:
    """The layout eager's batch norm would give x's output, which the BN-ReLU scratch takes."""
    return torch.channels_last if channels_last(x) else torch.contiguous_format


def _statistics(x: Tensor, bn: BatchNormArgs) -> tuple[Tensor, Tensor]:
    """(mean, rstd) that normalise ``x``, ``rstd = 1 / sqrt(var + eps)``, all from ``fastres._C``.

    Training: the batch statistics, with the running ones (when tracked)
    updated in place by the same call. Eval: from the running statistics.
    """
    if not bn.training:
        return extension.running_stats(x, bn.running_mean, bn.running_var, bn.eps)
    if bn.process_group is not None:
        return _synchronized_statistics(x, bn)
    return extension.batch_stats(x, bn.running_mean, bn.running_var, bn.momentum, bn.eps)


def _synchronized_statistics(x: Tensor, bn: BatchNormArgs) -> tuple[Tensor, Tensor]:
    """(mean, rstd) over every process's batch, as ``torch.nn.SyncBatchNorm`` computes them.

    Each process's moments are gathered and merged exactly by ``fastres._C``
    (batches may differ in size), which also updates the running statistics,
    the variance unbiased over the whole count.
    """
    dist = torch.distributed
    local = extension.batch_moments(x)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(bn.process_group))]
    dist.all_gather(gathered, local, group=bn.process_group)
    return extension.merge_batch_stats(
        x, torch.stack(gathered), bn.running_mean, bn.running_var, bn.momentum, bn.eps
    )


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


def _bn_relu_into(x: Tensor, mean: Tensor, rstd: Tensor, bn: BatchNormArgs, out: Tensor) -> Tensor:
    extension.bn_relu_forward(x, mean, rstd, bn.weight, bn.bias, out)
    return out


def _bn_relu_backward(grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, bn: BatchNormArgs, grad_x: Tensor):
    """Accumulates the input gradient into ``grad_x``; returns (dweight, dbias) or Nones."""
    sum_g, sum_gx = extension.bn_relu_backward_reduce(grad, x, mean, rstd, bn.weight, bn.bias)
    g_sums, gx_sums = sum_g, sum_gx
    if bn.training and bn.process_group is not None:
        # dx takes every process's sums over the whole count (the kernel divides by the local one);
        # the parameter gradients stay local, as torch's SyncBatchNorm leaves them to DDP.
        c = x.shape[1]
        total = torch.cat([sum_g, sum_gx, sum_g.new_full((1,), x.numel() // c)])
        torch.distributed.all_reduce(total, group=bn.process_group)
        ratio = (x.numel() // c) / total[2 * c :]
        g_sums, gx_sums = total[:c] * ratio, total[c : 2 * c] * ratio
    extension.bn_relu_backward_input(grad, x, mean, rstd, bn.weight, bn.bias, g_sums, gx_sums, grad_x, bn.training)
    if bn.weight is None:
        return None, None
    return (sum_gx * rstd).to(bn.weight.dtype), sum_g.to(bn.bias.dtype)


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


def _conv1x1_backward_in_place(grad: Tensor, a: Tensor, weight: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(grad_a, grad_weight) of ``conv2d(a, weight)`` for a 1x1 ``weight``, with grad_a written over ``a``.

    ``a`` is scratch (a recomputed BN-ReLU output) that is dead once the
    weight gradient is taken, so the input gradient, a GEMM for a 1x1
    convolution, goes into its storage instead of a new tensor as large as
    the layer's concatenation.
    """
    if a.dtype != dtype or grad.dtype != dtype:  # autocast: the convolution ran in another dtype
        return _conv_backward(grad, a, weight, 0, dtype)
    _, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad, a, weight.to(dtype), None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, False]
    )
    n, c, h, w = a.shape
    w2d = weight.to(dtype).view(weight.shape[0], c)
    if a.is_contiguous():  # [N, C, HW] = W^T [C, O] @ grad [N, O, HW]
        torch.matmul(w2d.t(), grad.contiguous().view(n, -1, h * w), out=a.view(n, c, h * w))
    else:  # channels_last: [N*HW, C] = grad [N*HW, O] @ W [O, C]
        g2d = grad.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(n * h * w, -1)
        torch.matmul(g2d, w2d, out=a.permute(0, 2, 3, 1).view(n * h * w, c))
    return a, grad_weight.to(weight.dtype)


_NO_DOUBLE_BACKWARD = (
    "fastres's shared-storage dense blocks do not support double backward (create_graph=True): they keep "
    "no activations to differentiate their backward through. Build the DenseNet (or DenseBlock/DenseLayer) "
    "with memory_efficient=False for gradient penalties and other higher-order gradients"
)


def backward_state(ctx, grad_features: Tensor, per_layer: int) -> tuple:
    """What a dense block's backward starts from: (features, c0, k, fmt, per-layer saved, dropout masks, grad buffer).

    ``per_layer`` tensors were saved for each layer after the features, then
    the dropout masks. The gradient buffer is ``grad_features`` itself when a
    transition handed over a fresh one (accumulated into), else a copy.
    Double backward is refused here, for both paths.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(_NO_DOUBLE_BACKWARD)
    layers = ctx.layers
    features, *saved = ctx.saved_tensors
    k = layers[0].conv2_weight.shape[0]
    c0, fmt = features.shape[1] - len(layers) * k, _memory_format(features)
    saved, dropped = saved[: per_layer * len(layers)], iter(saved[per_layer * len(layers) :])
    masks = [next(dropped) if _drops(layer) else None for layer in layers]
    if _owned(grad_features) and grad_features.is_contiguous(memory_format=fmt):
        grad_buffer = grad_features
    else:
        grad_buffer = grad_features.clone(memory_format=fmt)
    return features, c0, k, fmt, saved, masks, grad_buffer


class DenseBlockFunction(torch.autograd.Function):
    """``forward`` returns ``(features, *saved)``, the saved tensors non-differentiable, so that
    ``setup_context`` can save them: the form functorch transforms require."""

    @staticmethod
    def forward(x: Tensor, layers: Sequence[DenseLayerArgs], *params: Tensor) -> tuple:
        n, c0, h, w = x.shape
        k = layers[0].conv2_weight.shape[0]
        fmt = _memory_format(x)
        features = torch.empty((n, c0 + len(layers) * k, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
        features[:, :c0].copy_(x)
        # Under autocast the convolutions run in its dtype, so the bottleneck
        # output (and norm2's scratch) has that dtype; features keep x's.
        scratch1, scratch2 = _scratch(x, c0, k, layers, conv_dtype(x))

        saved, masks = [], []
        for i, layer in enumerate(layers):
            c = c0 + i * k
            concat = features[:, :c]
            mean1, rstd1 = _statistics(concat, layer.norm1)
            a1 = _bn_relu_into(concat, mean1, rstd1, layer.norm1, _scratch_view(scratch1, concat.shape, fmt))
            b = F.conv2d(a1, layer.conv1_weight)
            mean2, rstd2 = _statistics(b, layer.norm2)
            a2 = _bn_relu_into(b, mean2, rstd2, layer.norm2, _scratch_view(scratch2, b.shape, fmt))
            new = F.conv2d(a2, layer.conv2_weight, padding=1)
            mask = None
            if _drops(layer):
                new, mask = torch.native_dropout(new, layer.drop_rate, True)  # F.dropout's RNG use
            features[:, c : c + k].copy_(new)
            saved += [b, mean1, rstd1, mean2, rstd2]
            if mask is not None:
                masks.append(mask)
        return (features, *saved, *masks)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, layers = inputs[:2]
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no zero gradients for the saved outputs
        ctx.save_for_backward(*output)
        ctx.layers, ctx.conv_dtype = layers, conv_dtype(x)

    @staticmethod
    def backward(ctx, grad_features: Tensor | None, *_saved):
        if grad_features is None:
            return (None,) * len(ctx.needs_input_grad)
        layers = ctx.layers
        features, c0, k, fmt, saved, masks, grad_buffer = backward_state(ctx, grad_features, 5)
        scratch1, scratch2 = _scratch(features, c0, k, layers, ctx.conv_dtype)

        grads = [None] * (len(layers) * _PARAMS_PER_LAYER)
        for i in reversed(range(len(layers))):
            layer, c = layers[i], c0 + i * k
            b, mean1, rstd1, mean2, rstd2 = saved[5 * i : 5 * i + 5]
            grad_new = grad_buffer[:, c : c + k]
            if masks[i] is not None:
                grad_new = torch.ops.aten.native_dropout_backward(grad_new, masks[i], 1 / (1 - layer.drop_rate))
            grad_new = grad_new.contiguous(memory_format=fmt)

            a2 = _bn_relu_into(b, mean2, rstd2, layer.norm2, _scratch_view(scratch2, b.shape, fmt))
            grad_a2, grad_conv2 = _conv_backward(grad_new, a2, layer.conv2_weight, 1, ctx.conv_dtype)
            grad_b = a2.zero_()  # a2 is dead: its scratch holds b's gradient
            grad_w2, grad_b2 = _bn_relu_backward(grad_a2, b, mean2, rstd2, layer.norm2, grad_b)
            del grad_a2

            concat = features[:, :c]
            a1 = _bn_relu_into(concat, mean1, rstd1, layer.norm1, _scratch_view(scratch1, concat.shape, fmt))
            grad_a1, grad_conv1 = _conv1x1_backward_in_place(grad_b, a1, layer.conv1_weight, ctx.conv_dtype)
            del grad_b
            grad_w1, grad_b1 = _bn_relu_backward(grad_a1, concat, mean1, rstd1, layer.norm1, grad_buffer[:, :c])
            del grad_a1
            grads[_PARAMS_PER_LAYER * i : _PARAMS_PER_LAYER * (i + 1)] = [
                grad_w1, grad_b1, grad_conv1, grad_w2, grad_b2, grad_conv2,
            ]
        grad_x = grad_buffer[:, :c0].contiguous(memory_format=fmt)
        return (grad_x, None, *grads)


def _eager_bn_relu(x: Tensor, mean: Tensor, rstd: Tensor, norm: BatchNormArgs) -> Tensor:
    """``relu(batch_norm(x))`` as a graph of torch ops, for the backward of a backward."""
    return F.relu(differentiable_batch_norm(x, norm.weight, norm.bias, mean, rstd, norm.training, norm.eps))


def _differentiable_grads(ctx, fn, x: Tensor, mean: Tensor, rstd: Tensor, grad_out: Tensor, wrt) -> tuple:
    """Backward's return value for ``fn(relu(bn(x)))`` at ``grad_out``, built as a graph (create_graph=True).

    ``wrt``: (tensor, input index) pairs; the needed ones are differentiated.
    """
    needed = [(t, i) for t, i in wrt if ctx.needs_input_grad[i]]
    out = fn(_eager_bn_relu(x, mean, rstd, ctx.norm))
    grads = torch.autograd.grad(out, [t for t, _ in needed], grad_out, create_graph=True) if needed else ()
    result = [None] * len(ctx.needs_input_grad)
    for (_, i), g in zip(needed, grads):
        result[i] = g
    return tuple(result)


class BNReLUConv1x1Function(torch.autograd.Function):
    """``conv1x1(relu(bn(x)))`` keeping only x and two per-channel vectors: BN-ReLU is recomputed in backward.

    A DenseNet transition reads the block's feature buffer, which the block
    keeps anyway, so the transition adds no activation memory of its own.
    ``forward`` returns ``(out, mean, rstd)``: ``setup_context`` saves them.
    """

    @staticmethod
    def forward(x: Tensor, norm: BatchNormArgs, weight: Tensor, *bn_params: Tensor) -> tuple:
        mean, rstd = _statistics(x, norm)
        out = F.conv2d(_bn_relu_into(x, mean, rstd, norm, torch.empty_like(x, memory_format=_memory_format(x))), weight)
        return out, mean, rstd

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, norm, weight = inputs[:3]
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no zero gradients for the saved outputs
        ctx.save_for_backward(x, *output[1:])
        ctx.norm, ctx.weight, ctx.fmt, ctx.conv_dtype = norm, weight, _memory_format(x), conv_dtype(x)

    @staticmethod
    def backward(ctx, grad_out: Tensor | None, *_stats):
        if grad_out is None:
            return (None,) * len(ctx.needs_input_grad)
        x, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: recompute eagerly, differentiably
            weight, norm = ctx.weight, ctx.norm
            return _differentiable_grads(ctx, lambda a: F.conv2d(a, weight), x, mean, rstd, grad_out,
                                         ((x, 0), (weight, 2), (norm.weight, 3), (norm.bias, 4)))
        a = _bn_relu_into(x, mean, rstd, ctx.norm, torch.empty_like(x, memory_format=ctx.fmt))
        grad_a, grad_weight = _conv1x1_backward_in_place(grad_out, a, ctx.weight, ctx.conv_dtype)
        grad_x = _mark_owned(torch.zeros_like(x, memory_format=ctx.fmt))
        grad_w, grad_b = _bn_relu_backward(grad_a, x, mean, rstd, ctx.norm, grad_x)
        return grad_x, None, grad_weight, grad_w, grad_b


class BNReLUMaxPool2dFunction(torch.autograd.Function):
    """``max_pool2d(relu(bn(x)))`` keeping x, two per-channel vectors and the pool's indices.

    The BN-ReLU output, which eager keeps for the pool, is recomputed: the
    pool's backward needs only where each maximum came from. ``forward``
    returns ``(out, mean, rstd, indices)``: ``setup_context`` saves them.
    """

    @staticmethod
    def forward(x: Tensor, norm: BatchNormArgs, pool: tuple, *bn_params: Tensor) -> tuple:
        mean, rstd = _statistics(x, norm)
        a = _bn_relu_into(x, mean, rstd, norm, torch.empty_like(x, memory_format=_memory_format(x)))
        out, indices = torch.ops.aten.max_pool2d_with_indices(a, *pool)
        return out, mean, rstd, indices

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, norm, pool = inputs[:3]
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no zero gradients for the saved outputs
        ctx.save_for_backward(x, *output[1:])
        ctx.norm, ctx.pool, ctx.fmt = norm, pool, _memory_format(x)

    @staticmethod
    def backward(ctx, grad_out: Tensor | None, *_saved):
        if grad_out is None:
            return (None,) * len(ctx.needs_input_grad)
        x, mean, rstd, indices = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: recompute eagerly, differentiably
            pool, norm = ctx.pool, ctx.norm
            return _differentiable_grads(ctx, lambda a: F.max_pool2d(a, *pool[:4], ceil_mode=pool[4]), x, mean, rstd,
                                         grad_out, ((x, 0), (norm.weight, 3), (norm.bias, 4)))
        # The pool's input only lends its shape and layout: x has both.
        grad_a = torch.ops.aten.max_pool2d_with_indices_backward(grad_out, x, *ctx.pool, indices)
        grad_x = torch.zeros_like(x, memory_format=ctx.fmt)
        grad_w, grad_b = _bn_relu_backward(grad_a, x, mean, rstd, ctx.norm, grad_x)
        return grad_x, None, None, grad_w, grad_b


def _apply(cls: type[torch.autograd.Function], *args) -> Tensor:
    """``cls``'s output: through autograd when a gradient can flow, else its forward alone (nothing to save)."""
    if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
        return cls.apply(*args)[0]
    return cls.forward(*args)[0]


def bn_relu_max_pool2d(x: Tensor, norm: BatchNormArgs, kernel_size: int, stride: int, padding: int) -> Tensor:
    """``max_pool2d(relu(batch_norm(x)), kernel_size, stride, padding)``, recomputing the BN-ReLU in backward."""
    pool = ([kernel_size] * 2, [stride] * 2, [padding] * 2, [1, 1], False)
    return _apply(BNReLUMaxPool2dFunction, x, norm, pool, norm.weight, norm.bias)


def bn_relu_conv1x1(x: Tensor, norm: BatchNormArgs, weight: Tensor) -> Tensor:
    """``conv2d(relu(batch_norm(x)), weight)`` for a 1x1 ``weight``, recomputing the BN-ReLU in backward."""
    return _apply(BNReLUConv1x1Function, x, norm, weight, norm.weight, norm.bias)


def dense_block(x: Tensor, layers: Sequence[DenseLayerArgs]) -> Tensor:
    """``cat([x, new_1, ..., new_L], 1)`` of a dense block, through shared storage."""
    params = [p for layer in layers for p in _params(layer)]
    return _apply(DenseBlockFunction, x, tuple(layers), *params)
