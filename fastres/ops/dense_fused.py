"""A dense block through shared storage on the fused BN-ReLU-Conv kernels (the GPU path).

The same contract as ``dense_block.DenseBlockFunction`` (one feature buffer,
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
from .batch_norm import acc_dtype, out_strides, shape3, view3
from .bn_relu_conv import conv_dtype, empty_weight_grad, statistics
from .dense_block import (
    _NO_DOUBLE_BACKWARD, DenseLayerArgs, _apply, _drops, _memory_format, _params, _scratch_view, _PARAMS_PER_LAYER,
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


def _synchronized(local: Tensor, bn) -> Tensor:
    """``[mean | rstd | count]`` over every process of ``bn``'s group from this one's ``[mean | M2 | count]``.

    The gathered statistics are merged exactly (batches may differ in size) and
    the running ones updated, as ``torch.nn.SyncBatchNorm`` does.
    """
    dist = torch.distributed
    world = dist.get_world_size(bn.process_group)
    gathered = torch.empty((world, local.numel()), dtype=local.dtype, device=local.device)
    dist.all_gather(list(gathered.unbind(0)), local, group=bn.process_group)
    stats = torch.empty_like(local)
    kernels("batch_norm").batch_norm_combine(gathered, stats, bn.running_mean, bn.running_var, bn.momentum, bn.eps)
    return stats


def _norm1_stats(layer: DenseLayerArgs, concat: Tensor, cache: Tensor, count: Tensor) -> Tensor:
    bn = layer.norm1
    if not bn.training:
        return statistics(concat, bn.running_mean, bn.running_var, False, bn.momentum, bn.eps)
    c = concat.shape[1]
    if bn.process_group is not None:
        return _synchronized(torch.cat([cache[0, :c], cache[1, :c], count]), bn)
    stats = torch.empty(2 * c + 1, dtype=cache.dtype, device=concat.device)
    kernels("batch_norm").batch_norm_finish(cache[0, :c], cache[1, :c], count, stats, bn.running_mean,
                                            bn.running_var, bn.momentum, bn.eps)
    return stats


def _norm2_stats(bn, b: Tensor) -> Tensor:
    if not (bn.training and bn.process_group is not None):
        return statistics(b, bn.running_mean, bn.running_var, bn.training, bn.momentum, bn.eps)
    local = torch.empty(2 * b.shape[1] + 1, dtype=acc_dtype(b), device=b.device)
    b3, bs = view3(b)
    kernels("batch_norm").batch_norm_stats(b3, shape3(b), bs, local, None, None, 0.0, 0.0, local=True)
    return _synchronized(local, bn)


def _global_sums(sums: Tensor, bn) -> Tensor:
    """Synchronized batch norm: dx takes every process's sums (the statistics' count is the global one already)."""
    if bn.training and bn.process_group is not None:
        torch.distributed.all_reduce(sums, group=bn.process_group)
    return sums


class FusedDenseBlockFunction(torch.autograd.Function):
    """``forward`` returns ``(features, *saved)``, the saved tensors non-differentiable (setup_context form)."""

    @staticmethod
    def forward(x: Tensor, layers: Sequence[DenseLayerArgs], *params: Tensor) -> tuple:
        n, c0, h, w = x.shape
        k = layers[0].conv2_weight.shape[0]
        fmt = _memory_format(x)
        features = torch.empty((n, c0 + len(layers) * k, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
        features[:, :c0].copy_(x)
        dtype, allow_tf32 = conv_dtype(x), torch.backends.cudnn.allow_tf32
        conv = kernels("bn_relu_conv")
        acc = acc_dtype(x)
        cache = torch.empty((2, features.shape[1]), dtype=acc, device=x.device)
        count = torch.empty(1, dtype=acc, device=x.device)
        if any(layer.norm1.training for layer in layers):
            _moments_into(x, cache, count, 0)
        bottleneck = layers[0].conv1_weight.shape[0]

        saved, masks = [], []
        for i, layer in enumerate(layers):
            c = c0 + i * k
            concat = features[:, :c]
            n1, n2 = layer.norm1, layer.norm2
            stats1 = _norm1_stats(layer, concat, cache, count)
            b = torch.empty((n, bottleneck, h, w), dtype=dtype, device=x.device, memory_format=fmt)
            conv.conv_forward(concat, stats1, n1.weight, n1.bias, conv.mma_weight(layer.conv1_weight, dtype), None, b,
                              (1, 1), (0, 0), allow_tf32)
            stats2 = _norm2_stats(n2, b)
            target = features[:, c : c + k]
            direct = dtype == x.dtype and not _drops(layer)
            new = target if direct else torch.empty((n, k, h, w), dtype=dtype, device=x.device, memory_format=fmt)
            conv.conv_forward(b, stats2, n2.weight, n2.bias, conv.mma_weight(layer.conv2_weight, dtype), None, new,
                              (1, 1), (1, 1), allow_tf32)
            if _drops(layer):
                new, mask = torch.native_dropout(new, layer.drop_rate, True)  # F.dropout's RNG use
                masks.append(mask)
            if not direct:
                target.copy_(new)
            if i + 1 < len(layers) and any(later.norm1.training for later in layers[i + 1 :]):
                _moments_into(target, cache, count, c)
            saved += [b, stats1, stats2]
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
        if torch.is_grad_enabled():
            raise RuntimeError(_NO_DOUBLE_BACKWARD)
        layers, dtype, tf32 = ctx.layers, ctx.conv_dtype, ctx.allow_tf32
        features, c0, k, fmt, saved, masks, grad_buffer = backward_state(ctx, grad_features, 3)
        n, _, h, w = features.shape
        scratch = torch.empty(n * (c0 + (len(layers) - 1) * k) * h * w, dtype=features.dtype, device=features.device)
        conv = kernels("bn_relu_conv")
        elementwise = kernels("batch_norm_backward").batch_norm_relu_backward_elementwise

        grads = [None] * (len(layers) * _PARAMS_PER_LAYER)
        for i in reversed(range(len(layers))):
            layer, c = layers[i], c0 + i * k
            n1, n2 = layer.norm1, layer.norm2
            b, stats1, stats2 = saved[3 * i : 3 * i + 3]
            grad_new = grad_buffer[:, c : c + k]
            if masks[i] is not None:
                grad_new = torch.ops.aten.native_dropout_backward(grad_new, masks[i], 1 / (1 - layer.drop_rate))
            dy2 = grad_new.to(dtype).contiguous(memory_format=fmt)

            # conv2 (3x3) and norm2: the bottleneck's gradient, written over the masked one.
            w2 = conv.mma_weight(layer.conv2_weight, dtype)
            grad_b = torch.empty_like(b)
            sums2 = torch.empty(2 * b.shape[1], dtype=stats2.dtype, device=b.device)
            dw2, db2 = _param_grads(n2)
            conv.conv_dgrad(dy2, w2, b, stats2, n2.weight, n2.bias, grad_b, sums2, dw2, db2, (1, 1), (1, 1),
                            False, tf32)
            _dx(elementwise, grad_b, b, stats2, n2, _global_sums(sums2, n2), grad_b, False)
            dconv2 = empty_weight_grad(b, layer.conv2_weight)
            conv.conv_wgrad(dy2, b, stats2, n2.weight, n2.bias, dconv2, (1, 1), (1, 1), tf32)
            del dy2

            # conv1 (1x1) and norm1: dx added into the gradient buffer's slice.
            concat = features[:, :c]
            w1 = conv.mma_weight(layer.conv1_weight, dtype)
            g1 = _scratch_view(scratch, concat.shape, fmt)
            sums1 = torch.empty(2 * c, dtype=stats1.dtype, device=b.device)
            dw1, db1 = _param_grads(n1)
            conv.conv_dgrad(grad_b, w1, concat, stats1, n1.weight, n1.bias, g1, sums1, dw1, db1, (1, 1), (0, 0),
                            False, tf32)
            _dx(elementwise, g1, concat, stats1, n1, _global_sums(sums1, n1), grad_buffer[:, :c], True)
            dconv1 = empty_weight_grad(concat, layer.conv1_weight)
            conv.conv_wgrad(grad_b, concat, stats1, n1.weight, n1.bias, dconv1, (1, 1), (0, 0), tf32)
            grads[_PARAMS_PER_LAYER * i : _PARAMS_PER_LAYER * (i + 1)] = [dw1, db1, dconv1, dw2, db2, dconv2]
        grad_x = grad_buffer[:, :c0].contiguous(memory_format=fmt)
        return (grad_x, None, *grads)


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


def applies(x: Tensor) -> bool:
    """Whether the fused kernels take this block's input (not an empty one)."""
    return x.numel() > 0


def dense_block(x: Tensor, layers: Sequence[DenseLayerArgs]) -> Tensor:
    """``cat([x, new_1, ..., new_L], 1)`` of a dense block, through shared storage and the fused kernels."""
    params = [p for layer in layers for p in _params(layer)]
    return _apply(FusedDenseBlockFunction, x, tuple(layers), *params)
