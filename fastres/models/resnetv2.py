"""Pre-activation ResNets (He et al. 2016, "Identity Mappings in Deep Residual Networks") shaped like timm's.

``ResNetV2`` and the ``resnetv2_*`` builders have the module names, argument
names and state_dict keys (in order) of timm's BatchNorm ``resnetv2_*``
models, so ``fastres.models.resnetv2_50().load_state_dict(
timm.create_model("resnetv2_50").state_dict())`` loads strictly. Every
convolution after the stem runs as one fused BN-ReLU-convolution, and the
final BN-ReLU as one fused pass. The same seed builds the same weights as
timm. The batch norms are plain ``nn.BatchNorm2d`` (the ReLUs are the
blocks', and explicit ``act`` modules in the deep stem), so SyncBatchNorm and
frozen-BN converters keep the computation.
"""

import importlib.util
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .._checks import check_4d, check_float_tensor
from .._torchvision import import_torchvision
from ..nn.atomic import atomic
from ..nn.bn_relu_conv import bn_relu_conv, is_norm_act, pre_activation
from ..nn.module_state import NotScriptable, is_plain
from ..nn.preact_blocks import (
    DownsampleAvg, DownsampleConv, PreActBasicBlock, PreActBottleneck, conv2d, make_divisible,
)

# torch.fx leaves: they branch on the tensor, and read the modules' state when the graph runs.
torch.fx.wrap("check_4d")
torch.fx.wrap("check_float_tensor")
torch.fx.wrap("bn_relu_conv")
torch.fx.wrap("pre_activation")

__all__ = [
    "ResNetV2", "resnetv2_18", "resnetv2_18d", "resnetv2_34", "resnetv2_34d", "resnetv2_50", "resnetv2_50d",
    "resnetv2_101", "resnetv2_101d", "resnetv2_152", "resnetv2_152d",
]

_STEM_TYPES = ("", "fixed", "deep", "deep_fixed", "tiered")
_DEEP_STEM = ("conv1", "norm1", "act1", "conv2", "norm2", "act2", "conv3")


class AdaptiveAvgMaxPool2d(nn.Module):
    """The mean of global average and global max pooling (timm's ``avgmax``)."""

    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * (F.adaptive_avg_pool2d(x, 1) + F.adaptive_max_pool2d(x, 1))


class AdaptiveCatAvgMaxPool2d(nn.Module):
    """Global average and global max pooling, concatenated along channels (timm's ``catavgmax``)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat((F.adaptive_avg_pool2d(x, 1), F.adaptive_max_pool2d(x, 1)), 1)


# timm's pool types: (module, feature multiplier). The 'fast' ones compute the same values.
_POOLS = {
    "": (nn.Identity, 1), "avg": (lambda: nn.AdaptiveAvgPool2d(1), 1), "max": (lambda: nn.AdaptiveMaxPool2d(1), 1),
    "avgmax": (AdaptiveAvgMaxPool2d, 1), "catavgmax": (AdaptiveCatAvgMaxPool2d, 2),
}
_POOLS.update({"fast": _POOLS["avg"], **{f"fast{k}": v for k, v in _POOLS.items() if k}})


class ResNetStage(nn.Module):
    """One stage: ``blocks``, the first with the stride and the projection shortcut (timm's ``ResNetStage``)."""

    def __init__(
        self, in_chs: int, out_chs: int, stride: int, dilation: int, depth: int, bottle_ratio: float = 0.25,
        groups: int = 1, avg_down: bool = False, block_dpr: Sequence[float] | None = None,
        block_fn: type = PreActBottleneck, act_layer=None, conv_layer=None, norm_layer=None, device=None, dtype=None,
    ):
        super().__init__()
        first_dilation = 1 if dilation in (1, 2) else 2
        proj_layer = DownsampleAvg if avg_down else DownsampleConv
        prev_chs = in_chs
        self.blocks = nn.Sequential()
        for block_idx in range(depth):
            self.blocks.add_module(str(block_idx), block_fn(
                prev_chs, out_chs, stride=stride if block_idx == 0 else 1, dilation=dilation,
                bottle_ratio=bottle_ratio, groups=groups, first_dilation=first_dilation, proj_layer=proj_layer,
                drop_path_rate=block_dpr[block_idx] if block_dpr else 0.0, act_layer=act_layer, conv_layer=conv_layer,
                norm_layer=norm_layer, device=device, dtype=dtype,
            ))
            prev_chs, first_dilation, proj_layer = out_chs, dilation, None
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            # timm's checkpoint_seq: each block recomputed in backward, its activations not kept.
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return self.blocks(x)


def _check_pool(pool_type: str) -> None:
    if pool_type not in _POOLS:
        raise ValueError(f"global_pool must be one of {sorted(_POOLS)} ('': no pooling), got {pool_type!r}")


class ClassifierHead(nn.Module):
    """Global pooling, dropout, and a 1x1-convolution classifier (``fc``), flattened: timm's head with ``use_conv``.

    ``pool_type=''`` pools nothing: the classifier runs at every position and nothing is flattened, as in timm.
    ``catavgmax`` doubles the pooled features (``num_features``), which the classifier takes.
    """

    def __init__(self, in_features: int, num_classes: int, pool_type: str = "avg", drop_rate: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self._set_pool(pool_type)
        self.drop = nn.Dropout(drop_rate)
        self.fc = _fc(self.num_features, num_classes, device, dtype)

    def _set_pool(self, pool_type: str) -> None:
        _check_pool(pool_type)
        module, mult = _POOLS[pool_type]
        self.pool_type, self.global_pool, self.num_features = pool_type, module(), self.in_features * mult
        self.flatten = nn.Flatten(1) if pool_type else nn.Identity()

    def reset(self, num_classes: int, pool_type: str | None = None) -> None:
        """A new classifier (PyTorch's default init, as timm's), and pooling if ``pool_type`` is given."""
        if pool_type is not None and pool_type != self.pool_type:
            self._set_pool(pool_type)
        weight = getattr(self.fc, "weight", None)
        device, dtype = (weight.device, weight.dtype) if weight is not None else (None, None)
        self.fc = _fc(self.num_features, num_classes, device, dtype)

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.drop(self.global_pool(x))
        return self.flatten(x if pre_logits else self.fc(x))


def _fc(in_features: int, num_classes: int, device, dtype) -> nn.Module:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0: no classifier), got {num_classes}")
    return nn.Conv2d(in_features, num_classes, 1, device=device, dtype=dtype) if num_classes else nn.Identity()


def _init_classifier(fc: nn.Module) -> None:
    if isinstance(fc, nn.Conv2d):
        nn.init.normal_(fc.weight, mean=0.0, std=0.01)
        nn.init.zeros_(fc.bias)


def _stem(
    in_chans: int, out_chs: int, stem_type: str, small_inputs: bool, conv_layer, norm_layer, dd: dict
) -> nn.Sequential:
    """timm's ``create_resnetv2_stem`` (pre-activation: no norm after the last convolution)."""
    stem = OrderedDict()
    if small_inputs:  # CIFAR: one 3x3 convolution at full resolution, no pooling
        stem["conv"] = conv_layer(in_chans, out_chs, 3, **dd)
        return nn.Sequential(stem)
    if stem_type in ("deep", "deep_fixed", "tiered"):
        chs = (3 * out_chs // 8, out_chs // 2) if stem_type == "tiered" else (out_chs // 2, out_chs // 2)
        # timm's norm1/norm2 are norm-act modules; a plain norm gets its ReLU as a module of its own (no state).
        stem["conv1"] = conv_layer(in_chans, chs[0], 3, stride=2, **dd)
        stem["norm1"] = norm_layer(chs[0], **dd)
        if not is_norm_act(stem["norm1"]):
            stem["act1"] = nn.ReLU(inplace=True)
        stem["conv2"] = conv_layer(chs[0], chs[1], 3, stride=1, **dd)
        stem["norm2"] = norm_layer(chs[1], **dd)
        if not is_norm_act(stem["norm2"]):
            stem["act2"] = nn.ReLU(inplace=True)
        stem["conv3"] = conv_layer(chs[1], out_chs, 3, stride=1, **dd)
    else:
        stem["conv"] = conv_layer(in_chans, out_chs, 7, stride=2, **dd)
    if "fixed" in stem_type:  # BiT's approximation of 'SAME' padding
        stem["pad"] = nn.ConstantPad2d(1, 0.0)
        stem["pool"] = nn.MaxPool2d(kernel_size=3, stride=2, padding=0)
    else:
        stem["pool"] = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    return nn.Sequential(stem)


def _layers(act_layer, norm_layer, conv_layer) -> tuple:
    """(norm_layer, conv_layer) from timm's three arguments, None meaning the BatchNorm ResNetV2's.

    As in timm the activation lives in the norm layer: ``act_layer`` other
    than ReLU turns ``norm_layer`` (default BatchNorm2d) into timm's norm-act
    layer with that activation (``timm.layers.get_norm_act_layer``). A plain
    norm layer is followed by a ReLU, a norm-act one applies its own.
    """
    if act_layer not in (None, nn.ReLU, "relu"):
        if importlib.util.find_spec("timm") is None:
            raise ValueError(f"act_layer={act_layer!r} needs timm's norm-act layers (pip install timm); "
                             "without timm, pass a norm_layer that applies its own activation")
        import_torchvision()  # timm imports torchvision
        from timm.layers import get_norm_act_layer

        norm_layer = get_norm_act_layer(norm_layer or nn.BatchNorm2d, act_layer=act_layer)
    return norm_layer or nn.BatchNorm2d, conv_layer or conv2d


def drop_path_rates(drop_path_rate: float, layers: Sequence[int]) -> list[list[float]]:
    """Per block, rising linearly from 0 to ``drop_path_rate`` over the whole network (timm's schedule)."""
    return [r.tolist() for r in torch.linspace(0, drop_path_rate, sum(layers), device="cpu").split(list(layers))]


class ResNetV2(NotScriptable, nn.Module):
    """timm's ``ResNetV2`` with BatchNorm-ReLU pre-activations (its ``resnetv2_18 ... resnetv2_152d``).

    Arguments are timm's: ``layers`` (blocks per stage), ``channels`` (output
    channels per stage), ``num_classes`` (0: no classifier), ``in_chans``,
    ``global_pool`` (timm's: 'avg', 'max', 'avgmax', 'catavgmax', their 'fast'
    forms, or '': none), ``output_stride`` (32, 16 or 8: later strides become
    dilations), ``width_factor``, ``stem_chs``, ``stem_type`` ('', 'fixed',
    'deep', 'deep_fixed', 'tiered'), ``avg_down`` (the 'd'
    variants' pooled projection), ``basic`` (``PreActBasicBlock``, else
    ``PreActBottleneck``), ``bottle_ratio``, ``drop_rate`` (before the
    classifier), ``drop_path_rate`` (stochastic depth, rising per block),
    ``zero_init_last``, ``act_layer``/``norm_layer``/``conv_layer`` (timm's:
    the activation lives in the norm layer; with other layers than BatchNorm-
    ReLU and a plain convolution those run as written, unfused).
    ``small_inputs=True`` makes the stem one 3x3 convolution without pooling,
    for 32x32 images (CIFAR).
    """

    def __init__(
        self, layers: Sequence[int], channels: Sequence[int] = (256, 512, 1024, 2048), num_classes: int = 1000,
        in_chans: int = 3, global_pool: str = "avg", output_stride: int = 32, width_factor: int = 1,
        stem_chs: int = 64, stem_type: str = "", avg_down: bool = False, preact: bool = True, basic: bool = False,
        bottle_ratio: float = 0.25, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
        zero_init_last: bool = False, small_inputs: bool = False, act_layer=None, norm_layer=None, conv_layer=None,
        device=None, dtype=None,
    ):
        super().__init__()
        norm_layer, conv_layer = _layers(act_layer, norm_layer, conv_layer)
        if not preact:
            raise ValueError("preact=False (timm's non-pre-activation ResNetV2 for ViT hybrids) is not supported")
        if stem_type not in _STEM_TYPES:
            raise ValueError(f"stem_type must be one of {_STEM_TYPES}, got {stem_type!r}")
        if small_inputs and stem_type:
            raise ValueError(f"small_inputs=True replaces the stem: it takes the plain stem (stem_type ''), "
                             f"got stem_type {stem_type!r} (the 'd' builders set 'deep')")
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"in_chans must be a positive int, got {in_chans!r}")
        if not 0.0 <= drop_path_rate <= 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1], got {drop_path_rate}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        if len(layers) != len(channels):
            raise ValueError(f"layers and channels must have one entry per stage, got {len(layers)} and {len(channels)}")
        dd = {"device": device, "dtype": dtype}
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        stem_chs = make_divisible(stem_chs * width_factor)
        self.stem = _stem(in_chans, stem_chs, stem_type, small_inputs, conv_layer, norm_layer, dd)
        # timm's feature taps: the stem's last convolution (before pooling), then each stage.
        stem_feat = "conv3" if "conv3" in self.stem._modules else "conv"
        self.stem_feat_idx = list(self.stem._modules).index(stem_feat)
        self.feature_info = [{"num_chs": stem_chs, "reduction": 1 if small_inputs else 2, "module": f"stem.{stem_feat}"}]

        prev_chs, curr_stride, dilation = stem_chs, 1 if small_inputs else 4, 1
        block_fn = PreActBasicBlock if basic else PreActBottleneck
        self.stages = nn.Sequential()
        for stage_idx, (depth, c, dpr) in enumerate(zip(layers, channels, drop_path_rates(drop_path_rate, layers))):
            out_chs = make_divisible(c * width_factor)
            stride = 1 if stage_idx == 0 else 2
            if curr_stride >= output_stride:
                dilation *= stride
                stride = 1
            self.stages.add_module(str(stage_idx), ResNetStage(
                prev_chs, out_chs, stride=stride, dilation=dilation, depth=depth, bottle_ratio=bottle_ratio,
                avg_down=avg_down, block_dpr=dpr, block_fn=block_fn, conv_layer=conv_layer, norm_layer=norm_layer, **dd,
            ))
            prev_chs = out_chs
            curr_stride *= stride
            self.feature_info.append({"num_chs": prev_chs, "reduction": curr_stride, "module": f"stages.{stage_idx}"})
        self.num_features = prev_chs
        self.norm = norm_layer(prev_chs, **dd)  # the final pre-activation: BN-ReLU in forward_features
        self.head = ClassifierHead(prev_chs, num_classes, global_pool, drop_rate, **dd)
        self.head_hidden_size = self.head.num_features
        self._timm_name, self._pretrained_cfg = None, None
        self.init_weights(zero_init_last)

    @torch.no_grad()
    def init_weights(self, zero_init_last: bool = True) -> None:
        """timm's: Kaiming-normal (fan out) convolutions, N(0, 0.01) classifier, unit BatchNorms."""
        for name, m in self.named_modules():
            if name == "head.fc":
                _init_classifier(m)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:  # after the convolutions' own init (timm's runs children first)
            for m in self.modules():
                if isinstance(m, (PreActBasicBlock, PreActBottleneck)):
                    m.zero_init_last()

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's ``pretrained_cfg`` of the builder's name (input size, mean, std, crop, classifier...).

        timm's own when timm is installed (read on first use); otherwise, and
        for a ``ResNetV2`` built directly, timm's defaults for this family.
        """
        if self._pretrained_cfg is None:
            self._pretrained_cfg = timm_pretrained_cfg(self._timm_name, self.stem)
        return self._pretrained_cfg

    @pretrained_cfg.setter
    def pretrained_cfg(self, cfg: dict[str, Any]) -> None:
        self._pretrained_cfg = cfg

    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name of ``pretrained_cfg``."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: dict[str, Any]) -> None:
        self._pretrained_cfg = cfg

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)
        self.head_hidden_size = self.head.num_features

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter groups (layer-wise learning-rate decay): the stem, each stage or block, the final norm."""
        return {"stem": r"^stem", "blocks": r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.blocks\.(\d+)", None), (r"^norm", (99999,))]}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward instead of keeping its activations (``torch.utils.checkpoint``)."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def _stem_forward(self, x: Tensor, keep_feature: bool = False):
        """The stem; with ``keep_feature``, (output, the stem's feature tap) as timm's ``forward_intermediates``."""
        stem = self.stem
        names = list(stem._modules)
        fused = is_plain(stem, nn.Sequential) and names[:7] == list(_DEEP_STEM) and all(
            is_plain(stem._modules[a], nn.ReLU) for a in ("act1", "act2"))
        if not fused and not keep_feature:
            return stem(x)
        start, feature = 0, None
        if fused:  # the deep stem: conv1, then each BN-ReLU fused into the convolution after it
            x = bn_relu_conv(stem.norm2, stem.conv3, bn_relu_conv(stem.norm1, stem.conv2, stem.conv1(x)))
            start, feature = 7, x
        for i, name in enumerate(names[start:], start):
            x = stem._modules[name](x)
            if i == self.stem_feat_idx:
                feature = x
        return (x, feature) if keep_feature else x

    def forward_features(self, x: Tensor) -> Tensor:
        check_4d("x", x, "ResNetV2", self.in_chans, "in_chans")
        check_float_tensor("x", x)
        return pre_activation(self.norm, self.stages(self._stem_forward(x)))

    def forward_intermediates(
        self, x: Tensor, indices: int | Sequence[int] | None = None, norm: bool = False, stop_early: bool = False,
        output_fmt: str = "NCHW", intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's: the features at ``feature_info``'s taps (``indices``: the last n, or which; None: all).

        ``norm`` applies the final BN-ReLU to the last stage's tap; ``stop_early``
        stops after the last tap asked for. Returns the taps, or (final
        features, taps) unless ``intermediates_only``.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        check_4d("x", x, "ResNetV2", self.in_chans, "in_chans")
        check_float_tensor("x", x)
        take, max_index = feature_take_indices(len(self.stages) + 1, indices)
        x, stem_feature = self._stem_forward(x, keep_feature=True)
        intermediates = [stem_feature] if 0 in take else []
        stages = self.stages[:max_index] if stop_early else self.stages
        feat_idx, last = 0, len(self.stages)
        for feat_idx, stage in enumerate(stages, start=1):
            x = stage(x)
            if feat_idx in take:
                intermediates.append(pre_activation(self.norm, x) if norm and feat_idx == last else x)
        if intermediates_only:
            return intermediates
        if feat_idx == last:
            x = pre_activation(self.norm, x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True,
    ) -> list[int]:
        """timm's: drop the stages (and norm, head) that the taps ``indices`` do not need; returns the taps."""
        take, max_index = feature_take_indices(len(self.stages) + 1, indices)
        prune_end = max_index < len(self.stages)
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        self.stages = self.stages[:max_index]
        if max_index == 0:
            self.stem = self.stem[: self.stem_feat_idx + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            self.head.in_features = self.num_features
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits=pre_logits)

    @atomic
    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def feature_take_indices(num_features: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """timm's rule: None takes every tap, an int n the last n, a sequence those (negative from the end)."""
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"indices: last-n ({indices}) is out of range (1 to {num_features})")
        take = list(range(num_features - indices, num_features))
    else:
        take = [num_features + i if i < 0 else i for i in indices]
        bad = [i for i in take if not 0 <= i < num_features]
        if bad or not take:
            raise ValueError(f"indices: feature index {bad[0] if bad else None} is out of range (0 to {num_features - 1})")
    return take, max(take)


def timm_pretrained_cfg(name: str | None, stem: nn.Module) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` for the model ``name`` (timm's own when timm is installed), else its defaults."""
    if name and importlib.util.find_spec("timm") is not None:
        import_torchvision()  # timm imports torchvision: through the CPU-torch workaround first
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
        if cfg is not None:
            return cfg.to_dict()
    return {
        "url": "", "architecture": name, "tag": "", "custom_load": False, "input_size": (3, 224, 224),
        "fixed_input_size": False, "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center",
        "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "num_classes": 1000, "pool_size": (7, 7),
        "first_conv": "stem.conv1" if "conv1" in stem._modules else "stem.conv", "classifier": "head.fc",
    }


def _resnetv2(name: str, layers: Sequence[int], basic: bool, deep: bool, kwargs: dict[str, Any]) -> ResNetV2:
    arch: dict[str, Any] = {"layers": layers}
    if basic:
        arch.update(channels=(64, 128, 256, 512), basic=True, bottle_ratio=1.0)
    if deep:
        arch.update(stem_type="deep", avg_down=True)
    clash = sorted(set(arch) & set(kwargs))
    if clash:
        raise TypeError(f"these arguments are fixed by the builder: {', '.join(clash)}")
    model = ResNetV2(**arch, **kwargs)
    model._timm_name = name
    return model


def resnetv2_18(**kwargs: Any) -> ResNetV2:
    """ResNetV2-18: pre-activation basic blocks, [2, 2, 2, 2]."""
    return _resnetv2("resnetv2_18", [2, 2, 2, 2], True, False, kwargs)


def resnetv2_18d(**kwargs: Any) -> ResNetV2:
    """ResNetV2-18d: deep 3x3 stem, average-pooled projections."""
    return _resnetv2("resnetv2_18d", [2, 2, 2, 2], True, True, kwargs)


def resnetv2_34(**kwargs: Any) -> ResNetV2:
    """ResNetV2-34: pre-activation basic blocks, [3, 4, 6, 3]."""
    return _resnetv2("resnetv2_34", [3, 4, 6, 3], True, False, kwargs)


def resnetv2_34d(**kwargs: Any) -> ResNetV2:
    """ResNetV2-34d."""
    return _resnetv2("resnetv2_34d", [3, 4, 6, 3], True, True, kwargs)


def resnetv2_50(**kwargs: Any) -> ResNetV2:
    """ResNetV2-50: pre-activation bottlenecks, [3, 4, 6, 3]."""
    return _resnetv2("resnetv2_50", [3, 4, 6, 3], False, False, kwargs)


def resnetv2_50d(**kwargs: Any) -> ResNetV2:
    """ResNetV2-50d."""
    return _resnetv2("resnetv2_50d", [3, 4, 6, 3], False, True, kwargs)


def resnetv2_101(**kwargs: Any) -> ResNetV2:
    """ResNetV2-101: [3, 4, 23, 3]."""
    return _resnetv2("resnetv2_101", [3, 4, 23, 3], False, False, kwargs)


def resnetv2_101d(**kwargs: Any) -> ResNetV2:
    """ResNetV2-101d."""
    return _resnetv2("resnetv2_101d", [3, 4, 23, 3], False, True, kwargs)


def resnetv2_152(**kwargs: Any) -> ResNetV2:
    """ResNetV2-152: [3, 8, 36, 3]."""
    return _resnetv2("resnetv2_152", [3, 8, 36, 3], False, False, kwargs)


def resnetv2_152d(**kwargs: Any) -> ResNetV2:
    """ResNetV2-152d."""
    return _resnetv2("resnetv2_152d", [3, 8, 36, 3], False, True, kwargs)
