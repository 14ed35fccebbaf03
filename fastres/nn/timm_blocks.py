"""timm's post-activation ResNet blocks (``timm.models.resnet``), fused where they follow the plain pattern.

timm's ``BasicBlock``/``Bottleneck`` (resnet18/50, resnet50d, resnext, seresnet,
anti-aliased and DropBlock variants) name their activations ``act1``/``act2``/
``act3`` and may hold ``drop_block``, ``aa``, ``se`` and ``drop_path`` modules.
``convert()`` turns them into ``TimmBasicBlock``/``TimmBottleneck``, which share
the block's modules and run the same computation:

- ``bn -> act -> conv`` with nothing between (``drop_block`` and ``aa``
  identities): one fused BN-ReLU-convolution, the activation never stored;
- ``bn -> act`` followed by an anti-aliasing ``aa``: a fused BN-ReLU, then ``aa``;
- the tail ``act(bn(x) + shortcut)`` without ``se``/``drop_path``: one fused
  BN-add-ReLU; with them, ``bn``, ``se``, ``drop_path`` run as written and the
  merge is the fused add-ReLU.

Anything else (a non-ReLU activation, a DropBlock between BN and ReLU, hooks)
runs as written. ``fusion()`` says which is which.
"""

import torch
from torch import Tensor, nn

from .._checks import check_4d
from ..functional import add_relu
from .atomic import atomic
from .batch_norm import batch_norm, norm_relu, run_sequential
from .bn_relu_conv import bn_relu_conv, fusable
from .module_state import PLAIN_BATCH_NORMS, FromModule, is_plain

# torch.fx leaves: they branch on the tensor, and read the modules' state when the graph runs.
torch.fx.wrap("check_4d")
torch.fx.wrap("add_relu")
torch.fx.wrap("batch_norm")
torch.fx.wrap("norm_relu")
torch.fx.wrap("run_sequential")
torch.fx.wrap("bn_relu_conv")


def _relu(act: nn.Module) -> bool:
    return is_plain(act, nn.ReLU)


def _identity(m: nn.Module | None) -> bool:
    return m is None or is_plain(m, nn.Identity)


class _TimmBlock(FromModule, nn.Module):
    _timm_name = ""
    _stages: tuple = ()  # (bn, drop_block or None, act, aa or None, next conv)
    _last: tuple = ()  # (last bn, last act)

    @classmethod
    def is_convertible(cls, module: nn.Module) -> bool:
        names = {n for stage in cls._stages for n in stage if n} | {*cls._last, "se", "drop_path", "downsample"}
        return (
            type(module).__name__ == cls._timm_name and type(module).__module__ == "timm.models.resnet"
            and all(hasattr(module, n) for n in names)
        )

    @classmethod
    def convertible_from(cls) -> str:
        return f"timm's {cls._timm_name} (timm.models.resnet)"

    def _pre_activation_conv(self, stage: tuple, x: Tensor) -> Tensor:
        """``conv(aa(act(drop_block(bn(x)))))``, fused as far as the pattern allows."""
        bn_name, drop_name, act_name, aa_name, conv_name = stage
        bn, act, conv = getattr(self, bn_name), getattr(self, act_name), getattr(self, conv_name)
        drop, aa = getattr(self, drop_name) if drop_name else None, getattr(self, aa_name) if aa_name else None
        if _identity(drop) and _relu(act):
            if _identity(aa):
                return bn_relu_conv(bn, conv, x)
            return conv(aa(norm_relu(bn, act, x)))
        x = batch_norm(bn, x)
        if drop is not None:
            x = drop(x)
        x = act(x)
        return conv(aa(x) if aa is not None else x)

    def _tail(self, x: Tensor, shortcut: Tensor) -> Tensor:
        bn, act = getattr(self, self._last[0]), getattr(self, self._last[1])
        if self.downsample is not None:
            shortcut = run_sequential(self.downsample, shortcut)
        if self.se is None and self.drop_path is None:
            return norm_relu(bn, act, x, shortcut)
        x = batch_norm(bn, x)
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if _relu(act):
            return add_relu(x, shortcut, inplace=True)
        x += shortcut
        return act(x)

    def fusion(self) -> tuple[list[str], list[str]]:
        """(what runs fused, what runs as written and why), from the modules as they are now."""
        fused, left = [], []
        for bn_name, drop_name, act_name, aa_name, conv_name in self._stages:
            bn, act, conv = getattr(self, bn_name), getattr(self, act_name), getattr(self, conv_name)
            drop, aa = getattr(self, drop_name) if drop_name else None, getattr(self, aa_name) if aa_name else None
            if not (_identity(drop) and _relu(act)):
                why = f"{drop_name} ({type(drop).__name__}) sits between them" if not _identity(drop) else \
                    f"{act_name} is {type(act).__name__}, not a plain ReLU"
                left.append(f"{bn_name} -> {act_name}: as written, {why}")
            elif _identity(aa) and fusable(bn, conv):
                fused.append(f"{bn_name} -> {act_name} -> {conv_name} (BN-ReLU-conv)")
            elif is_plain(bn, *PLAIN_BATCH_NORMS):
                fused.append(f"{bn_name} -> {act_name} (BN-ReLU)")
                if not _identity(aa):
                    left.append(f"{aa_name} ({type(aa).__name__}): as written, between the ReLU and {conv_name}")
            else:
                left.append(f"{bn_name} -> {act_name}: as written, {bn_name} is {type(bn).__name__} or has hooks")
        bn_name, act_name = self._last
        bn, act = getattr(self, bn_name), getattr(self, act_name)
        extras = [n for n in ("se", "drop_path") if getattr(self, n) is not None]
        plain_bn = is_plain(bn, *PLAIN_BATCH_NORMS)
        if not _relu(act):
            left.append(f"{bn_name} + shortcut -> {act_name}: as written, {act_name} is {type(act).__name__}")
        elif not extras and plain_bn:
            fused.append(f"{bn_name} + shortcut -> {act_name} (BN-add-ReLU)")
        else:
            fused.append(f"+ shortcut -> {act_name} (add-ReLU)")
            why = f"{' and '.join(extras)} between it and the add" if extras else "not a plain BatchNorm2d, or hooks"
            left.append(f"{bn_name}{''.join(', ' + e for e in extras)}: as written, {why}")
        return fused, left


class TimmBasicBlock(_TimmBlock):
    """timm's ``BasicBlock``: conv1 -> bn1 -> drop_block -> act1 -> aa -> conv2 -> bn2 -> se -> drop_path, + shortcut, act2."""

    _timm_name = "BasicBlock"
    _stages = (("bn1", "drop_block", "act1", "aa", "conv2"),)
    _last = ("bn2", "act2")

    @atomic
    def forward(self, x: Tensor) -> Tensor:
        check_4d("x", x, "BasicBlock", self.conv1.in_channels, "inplanes")
        out = self._pre_activation_conv(self._stages[0], self.conv1(x))
        return self._tail(out, x)


class TimmBottleneck(_TimmBlock):
    """timm's ``Bottleneck``: conv1 -> bn1 -> act1 -> conv2 -> bn2 -> drop_block -> act2 -> aa -> conv3 -> bn3 -> ..."""

    _timm_name = "Bottleneck"
    _stages = (("bn1", None, "act1", None, "conv2"), ("bn2", "drop_block", "act2", "aa", "conv3"))
    _last = ("bn3", "act3")

    @atomic
    def forward(self, x: Tensor) -> Tensor:
        check_4d("x", x, "Bottleneck", self.conv1.in_channels, "inplanes")
        out = self._pre_activation_conv(self._stages[0], self.conv1(x))
        out = self._pre_activation_conv(self._stages[1], out)
        return self._tail(out, x)
