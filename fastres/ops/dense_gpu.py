"""The GPU path of a dense block: shared storage on the fused BN-ReLU-Conv kernels.

The same contract as ``dense_ext.DenseBlockFunction`` (one feature buffer,
per layer only the bottleneck output kept, running statistics updated once),
with no BN-ReLU output anywhere, not even as scratch:

- conv1 is the fused 1x1 ``bn_relu_conv`` reading the buffer's view
  ``features[:, :c]`` in place; conv2 the fused 3x3 reading the bottleneck
  and storing its ``k`` new channels straight into ``features[:, c:c+k]``.
- A feature channel's batch statistics are the same for every later layer of
  the block (the same data): each channel's mean and M2 are reduced once,
  when it is written, into a per-block cache, and every layer finishes its
  own ``[mean | rstd | count]`` (its eps, its running buffers) from the cache
  in one small launch, instead of re-reducing the whole concatenation.
- Backward per layer: conv2's dgrad with the ReLU mask and norm2's sums in
  its epilogue, norm2's dx in place, conv2's wgrad with the activation
  recomputed in its prologue; then the same for conv1, whose dx is added
  straight into the gradient buffer's slice. The only scratch is conv1's
  masked gradient, shaped like the widest concatenation and shared by all
  layers.
- Synchronized batch norms (``process_group`` set) gather each process's
  statistics and merge them; backward all-reduces the BN sums before dx.
"""

from typing import Sequence

import torch
from torch import Tensor

from . import kernels
from .layout import acc_dtype, conv_dtype, out_strides, shape3, view3
from .bn_relu_conv import empty_weight_grad, statistics
from .dense_ext import (
    BatchNormArgs, DenseLayerArgs, _apply, _drops, _memory_format, _params, _scratch_view, _PARAMS_PER_LAYER,
    backward_state,
)


def _moments_into(t: Tensor, cache: Tensor, count: Tensor, start: int) -> None:
    """Store the mean and M2 of ``t``'s channels in ``cache[:, start:]`` (and the element count per channel)."""
    c = t.shape[1]
    local = torch.empty(2 * c + 1, dtype=cache.dtype, device=t.device)
    t3, ts = view3(t)
    kernels("batch_norm").batch_norm_stats(t3, shape3(t), ts, local, None, None, 0.0, 0.0, local=True)
    cache[:, start : start + c].copy_(local[: 2 * c].view(2, c))
    count.copy_(local[2 * c :])


def _synchronized(local: Tensor, bn, stats: Tensor) -> Tensor:
    """``[mean | rstd | count]`` over every process of ``bn``'s group from this one's ``[mean | M2 | count]``.

    The gathered statistics are merged exactly (batches may differ in size) and
    the running ones updated, as ``torch.nn.SyncBatchNorm`` does.
    """
    dist = torch.distributed
    world = dist.get_world_size(bn.process_group)
    gathered = torch.empty((world, local.numel()), dtype=local.dtype, device=local.device)
    dist.all_gather(list(gathered.unbind(0)), local, group=bn.process_group)
    kernels("batch_norm").batch_norm_combine(gathered, stats, bn.running_mean, bn.running_var, bn.momentum, bn.eps)
    return stats


def _norm1_stats(layer: DenseLayerArgs, concat: Tensor, cache: Tensor, count: Tensor, stats: Tensor) -> Tensor:
    """norm1's ``[mean | rstd | count]`` into ``stats``, finished from the block's per-channel cache."""
    bn = layer.norm1
    if not bn.training:
        return statistics(concat, bn.running_mean, bn.running_var, False, bn.momentum, bn.eps, stats)
    c = concat.shape[1]
    if bn.process_group is not None:
        return _synchronized(torch.cat([cache[0, :c], cache[1, :c], count]), bn, stats)
    kernels("batch_norm").batch_norm_finish(cache[0, :c], cache[1, :c], count, stats, bn.running_mean,
                                            bn.running_var, bn.momentum, bn.eps)
    return stats


def _norm2_stats(bn, b: Tensor, stats: Tensor) -> Tensor:
    """norm2's ``[mean | rstd | count]`` into ``stats``."""
    if not (bn.training and bn.process_group is not None):
        return statistics(b, bn.running_mean, bn.running_var, bn.training, bn.momentum, bn.eps, stats)
    local = torch.empty(2 * b.shape[1] + 1, dtype=acc_dtype(b), device=b.device)
    b3, bs = view3(b)
    kernels("batch_norm").batch_norm_stats(b3, shape3(b), bs, local, None, None, 0.0, 0.0, local=True)
    return _synchronized(local, bn, stats)


def _global_sums(sums: Tensor, bn) -> Tensor:
    """Synchronized batch norm: dx takes every process's sums (the statistics' count is the global one already)."""
    if bn.training and bn.process_group is not None:
        torch.distributed.all_reduce(sums, group=bn.process_group)
    return sums


def _allocate(x: Tensor, layers: Sequence[DenseLayerArgs], dtype: torch.dtype) -> tuple[Tensor, list, list]:
    """The forward's outputs: the feature buffer, per layer (bottleneck, stats1, stats2), the dropout masks."""
    n, c0, h, w = x.shape
    k, bottleneck = layers[0].conv2_weight.shape[0], layers[0].conv1_weight.shape[0]
    fmt, acc = _memory_format(x), acc_dtype(x)
    features = torch.empty((n, c0 + len(layers) * k, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
    saved = []
    for i in range(len(layers)):
        saved += [torch.empty((n, bottleneck, h, w), dtype=dtype, device=x.device, memory_format=fmt),
                  torch.empty(2 * (c0 + i * k) + 1, dtype=acc, device=x.device),
                  torch.empty(2 * bottleneck + 1, dtype=acc, device=x.device)]
    masks = [torch.empty((n, k, h, w), dtype=torch.bool, device=x.device, memory_format=fmt)
             for layer in layers if _drops(layer)]
    return features, saved, masks


def _forward_into(x: Tensor, layers: Sequence[DenseLayerArgs], dtype: torch.dtype, allow_tf32: bool,
                  features: Tensor, saved: Sequence[Tensor], masks: Sequence[Tensor]) -> None:
    """The block's forward into ``_allocate``'s outputs (running statistics updated in place)."""
    c0 = x.shape[1]
    k = layers[0].conv2_weight.shape[0]
    fmt = _memory_format(x)
    features[:, :c0].copy_(x)
    conv = kernels("bn_relu_conv")
    cache = torch.empty((2, features.shape[1]), dtype=saved[1].dtype, device=x.device)
    count = torch.empty(1, dtype=saved[1].dtype, device=x.device)
    if any(layer.norm1.training for layer in layers):
        _moments_into(x, cache, count, 0)
    dropped = iter(masks)
    for i, layer in enumerate(layers):
        c = c0 + i * k
        concat = features[:, :c]
        n1, n2 = layer.norm1, layer.norm2
        b, stats1, stats2 = saved[3 * i : 3 * i + 3]
        _norm1_stats(layer, concat, cache, count, stats1)
        conv.conv_forward(concat, stats1, n1.weight, n1.bias, conv.mma_weight(layer.conv1_weight, dtype), None, b,
                          (1, 1), (0, 0), allow_tf32)
        _norm2_stats(n2, b, stats2)
        target = features[:, c : c + k]
        direct = dtype == x.dtype and not _drops(layer)
        new = target if direct else torch.empty(target.shape, dtype=dtype, device=x.device, memory_format=fmt)
        conv.conv_forward(b, stats2, n2.weight, n2.bias, conv.mma_weight(layer.conv2_weight, dtype), None, new,
                          (1, 1), (1, 1), allow_tf32)
        if _drops(layer):
            new, mask = torch.native_dropout(new, layer.drop_rate, True)  # F.dropout's RNG use
            next(dropped).copy_(mask)
        if not direct:
            target.copy_(new)
        if i + 1 < len(layers) and any(later.norm1.training for later in layers[i + 1 :]):
            _moments_into(target, cache, count, c)


def _backward_into(layers: Sequence[DenseLayerArgs], dtype: torch.dtype, allow_tf32: bool, features: Tensor,
                   saved: Sequence[Tensor], masks: Sequence[Tensor | None], grad_buffer: Tensor,
                   grads: Sequence[Tensor | None]) -> None:
    """Every gradient: the parameters' into ``grads`` (``_PARAMS_PER_LAYER`` per layer), x's into ``grad_buffer``."""
    k = layers[0].conv2_weight.shape[0]
    n, c_total, h, w = features.shape
    c0, fmt = c_total - len(layers) * k, _memory_format(features)
    scratch = torch.empty(n * (c0 + (len(layers) - 1) * k) * h * w, dtype=features.dtype, device=features.device)
    conv = kernels("bn_relu_conv")
    elementwise = kernels("batch_norm_backward").batch_norm_relu_backward_elementwise
    for i in reversed(range(len(layers))):
        layer, c = layers[i], c0 + i * k
        n1, n2 = layer.norm1, layer.norm2
        b, stats1, stats2 = saved[3 * i : 3 * i + 3]
        dw1, db1, dconv1, dw2, db2, dconv2 = grads[_PARAMS_PER_LAYER * i : _PARAMS_PER_LAYER * (i + 1)]
        grad_new = grad_buffer[:, c : c + k]
        if masks[i] is not None:
            grad_new = torch.ops.aten.native_dropout_backward(grad_new, masks[i], 1 / (1 - layer.drop_rate))
        dy2 = grad_new.to(dtype).contiguous(memory_format=fmt)

        # conv2 (3x3) and norm2: the bottleneck's gradient, written over the masked one.
        w2 = conv.mma_weight(layer.conv2_weight, dtype)
        grad_b = torch.empty_like(b)
        sums2 = torch.empty(2 * b.shape[1], dtype=stats2.dtype, device=b.device)
        conv.conv_dgrad(dy2, w2, b, stats2, n2.weight, n2.bias, grad_b, sums2, dw2, db2, (1, 1), (1, 1),
                        False, allow_tf32)
        _dx(elementwise, grad_b, b, stats2, n2, _global_sums(sums2, n2), grad_b, False)
        conv.conv_wgrad(dy2, b, stats2, n2.weight, n2.bias, dconv2, (1, 1), (1, 1), allow_tf32)
        del dy2

        # conv1 (1x1) and norm1: dx added into the gradient buffer's slice.
        concat = features[:, :c]
        w1 = conv.mma_weight(layer.conv1_weight, dtype)
        g1 = _scratch_view(scratch, concat.shape, fmt)
        sums1 = torch.empty(2 * c, dtype=stats1.dtype, device=b.device)
        conv.conv_dgrad(grad_b, w1, concat, stats1, n1.weight, n1.bias, g1, sums1, dw1, db1, (1, 1), (0, 0),
                        False, allow_tf32)
        _dx(elementwise, g1, concat, stats1, n1, _global_sums(sums1, n1), grad_buffer[:, :c], True)
        conv.conv_wgrad(grad_b, concat, stats1, n1.weight, n1.bias, dconv1, (1, 1), (0, 0), allow_tf32)


# The custom ops: the block as torch.compile and torch.export see it. Layers travel flat: per layer the
# _PARAMS_PER_LAYER parameters (None where a norm is not affine), the tracked running buffers, and per
# batch norm (norm1, norm2 of each layer) its settings.


def _flatten(layers: Sequence[DenseLayerArgs]) -> tuple:
    params = [p for layer in layers for p in _params(layer)]
    norms = [bn for layer in layers for bn in (layer.norm1, layer.norm2)]
    running = [t for bn in norms if bn.running_mean is not None for t in (bn.running_mean, bn.running_var)]
    settings = ([bn.running_mean is not None for bn in norms], [bn.training for bn in norms],
                [float(bn.momentum) for bn in norms], [float(bn.eps) for bn in norms],
                [float(layer.drop_rate) for layer in layers], [layer.dropout for layer in layers])
    return params, running, settings


def _unflatten(params, running, tracked, training, momentum, eps, drop_rate, dropout) -> list[DenseLayerArgs]:
    buffers = iter(running)
    norms = [BatchNormArgs(*((next(buffers), next(buffers)) if tracked[j] else (None, None)),
                           params[3 * j], params[3 * j + 1], training[j], momentum[j], eps[j]) for j in range(len(tracked))]
    return [DenseLayerArgs(norms[2 * i], params[_PARAMS_PER_LAYER * i + 2], norms[2 * i + 1],
                           params[_PARAMS_PER_LAYER * i + 5], drop_rate[i], dropout[i]) for i in range(len(drop_rate))]


@torch.library.custom_op("fastres::fused_dense_block_forward", mutates_args=("running", "outputs"))
def _forward_op(x: Tensor, params: list[Tensor | None], running: list[Tensor], tracked: list[bool],
                training: list[bool], momentum: list[float], eps: list[float], drop_rate: list[float],
                dropout: list[bool], dtype: torch.dtype, allow_tf32: bool, outputs: list[Tensor]) -> None:
    layers = _unflatten(params, running, tracked, training, momentum, eps, drop_rate, dropout)
    _forward_into(x, layers, dtype, allow_tf32, outputs[0], outputs[1 : 1 + 3 * len(layers)],
                  outputs[1 + 3 * len(layers) :])


@_forward_op.register_fake
def _(x, params, running, tracked, training, momentum, eps, drop_rate, dropout, dtype, allow_tf32, outputs):
    return None


@torch.library.custom_op("fastres::fused_dense_block_backward", mutates_args=("grad_buffer", "grads"))
def _backward_op(features: Tensor, saved: list[Tensor], masks: list[Tensor | None], params: list[Tensor | None],
                 tracked: list[bool], training: list[bool], eps: list[float], drop_rate: list[float],
                 dtype: torch.dtype, allow_tf32: bool, grad_buffer: Tensor, grads: list[Tensor]) -> None:
    # Backward reads no running buffer and updates none: placeholders keep _unflatten's shape.
    norms = len(tracked)
    layers = _unflatten(params, [], [False] * norms, training, [0.0] * norms, eps, drop_rate, [True] * len(drop_rate))
    given = iter(grads)
    _backward_into(layers, dtype, allow_tf32, features, saved, masks, grad_buffer,
                   [next(given) if p is not None else None for p in params])


@_backward_op.register_fake
def _(features, saved, masks, params, tracked, training, eps, drop_rate, dtype, allow_tf32, grad_buffer, grads):
    return None


def _synchronized_norms(layers: Sequence[DenseLayerArgs]) -> bool:
    return any(bn.process_group is not None for layer in layers for bn in (layer.norm1, layer.norm2))


class FusedDenseBlockFunction(torch.autograd.Function):
    """``forward`` returns ``(features, *saved)``, the saved tensors non-differentiable (setup_context form).

    In eager mode the implementation is called directly (the dispatcher's
    custom-op handling costs host time); under torch.compile the custom ops.
    Synchronized batch norms, whose collectives the ops cannot carry, run
    the implementation eagerly (a graph break under torch.compile).
    """

    @staticmethod
    def forward(x: Tensor, layers: Sequence[DenseLayerArgs], *params: Tensor) -> tuple:
        dtype, allow_tf32 = conv_dtype(x), torch.backends.cudnn.allow_tf32
        features, saved, masks = _allocate(x, layers, dtype)
        if torch.compiler.is_compiling() and not _synchronized_norms(layers):
            flat, running, settings = _flatten(layers)
            torch.ops.fastres.fused_dense_block_forward(x, flat, running, *settings, dtype, allow_tf32,
                                                        [features, *saved, *masks])
        else:
            (_eager_forward_into if torch.compiler.is_compiling() else _forward_into)(
                x, layers, dtype, allow_tf32, features, saved, masks)
        return (features, *saved, *masks)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, layers = inputs[:2]
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*output)
        ctx.layers, ctx.conv_dtype, ctx.allow_tf32 = layers, conv_dtype(x), torch.backends.cudnn.allow_tf32

    @staticmethod
    def backward(ctx, grad_features: Tensor | None, *_saved):
        if grad_features is None:
            return (None,) * len(ctx.needs_input_grad)
        layers, dtype, tf32 = ctx.layers, ctx.conv_dtype, ctx.allow_tf32
        features, c0, k, fmt, saved, masks, grad_buffer = backward_state(ctx, grad_features, 3)
        grads = [None if p is None else (empty_weight_grad(features, p) if p.dim() == 4 else torch.empty_like(p))
                 for layer in layers for p in _params(layer)]
        if torch.compiler.is_compiling() and not _synchronized_norms(layers):
            flat, _, (tracked, training, _, eps, drop_rate, _) = _flatten(layers)
            torch.ops.fastres.fused_dense_block_backward(features, list(saved), masks, flat, tracked, training, eps,
                                                         drop_rate, dtype, tf32, grad_buffer,
                                                         [g for g in grads if g is not None])
        else:
            (_eager_backward_into if torch.compiler.is_compiling() else _backward_into)(
                layers, dtype, tf32, features, saved, masks, grad_buffer, grads)
        grad_x = grad_buffer[:, :c0].contiguous(memory_format=fmt)
        return (grad_x, None, *grads)


# Synchronized batch norms' collectives run in Python: never traced.
_eager_forward_into = torch.compiler.disable(_forward_into)
_eager_backward_into = torch.compiler.disable(_backward_into)


def _param_grads(bn) -> tuple[Tensor | None, Tensor | None]:
    return (None if bn.weight is None else torch.empty_like(bn.weight),
            None if bn.bias is None else torch.empty_like(bn.bias))


def _dx(elementwise, g: Tensor, x: Tensor, stats: Tensor, bn, sums: Tensor, dx: Tensor, accumulate: bool) -> None:
    """The batch norm's input gradient from the masked gradient ``g`` (dense), into (or added to) ``dx``."""
    shape = shape3(x)
    c_last = _memory_format(x) == torch.channels_last
    x3, xs = view3(x)
    _, dxs = view3(dx)
    dense = out_strides(shape, c_last)
    elementwise(g, dense, x3, xs, shape, dense, None, stats, bn.weight, sums if bn.training else None, dx, None,
                c_last, dxs, accumulate)


def dense_block(x: Tensor, layers: Sequence[DenseLayerArgs]) -> Tensor:
    """``cat([x, new_1, ..., new_L], 1)`` of a dense block, through shared storage and the fused kernels."""
    params = [p for layer in layers for p in _params(layer)]
    return _apply(FusedDenseBlockFunction, x, tuple(layers), *params)
