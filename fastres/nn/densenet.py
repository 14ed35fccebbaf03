"""DenseNet layers, blocks and transitions with torchvision's names and state_dict keys.

``memory_efficient=True`` runs a block through shared storage
(``fastres.functional.dense_block``): activation memory linear in depth, no
convolution run twice, running statistics updated once. ``False`` runs the
plain concatenating computation, with the BN-ReLUs fused. A layer whose
modules were swapped for something else (another norm, a hook, a convolution
with other settings) runs as written.
"""

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn
from torch._prims_common import suggest_memory_format

from ..functional import (
    BatchNormArgs, DenseLayerArgs, bn_relu_conv1x1, bn_relu_max_pool2d, dense_block, fused_conv_applies,
    recompute_bn_relu_applies, shared_storage_applies,
)
from .atomic import atomic
from .batch_norm import BatchNormReLU2d, SyncBatchNormReLU2d, bn_relu, norm_relu
from .bn_relu_conv import bn_relu_conv, is_timm_bn_relu
from .._checks import check_4d
from .module_state import PLAIN_BATCH_NORMS, FromModule, has_hooks, is_plain, running_stats_args, sync_world


def _check_features(module: nn.Module, x: Tensor, expected: int, name: str = "x") -> None:
    check_4d(name, x, type(module).__name__, expected, "num_input_features")


def _norm_args(bn: nn.BatchNorm2d, x_shape: tuple) -> BatchNormArgs:
    running_mean, running_var, training, momentum = running_stats_args(bn)
    sync = sync_world(bn, training) if isinstance(bn, nn.SyncBatchNorm) else None
    if training and sync is None and x_shape[0] * x_shape[2] * x_shape[3] <= 1:
        # As F.batch_norm: a batch statistic needs more than one value.
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {torch.Size(x_shape)}")
    group = None if sync is None else sync[0]
    return BatchNormArgs(running_mean, running_var, bn.weight, bn.bias, training, momentum, bn.eps, group)


def _plain_bn_relu(norm: nn.Module, relu: nn.Module | None) -> bool:
    """A batch norm (synchronized or not) and a ReLU whose computation fastres._C can take over.

    ``relu`` is None for a norm-act module (timm's ``BatchNormAct2d``), which applies its own.
    """
    if relu is None:
        return is_timm_bn_relu(norm)
    return is_plain(norm, *PLAIN_BATCH_NORMS, BatchNormReLU2d, SyncBatchNormReLU2d) and is_plain(relu, nn.ReLU)


def _norm_relu(norm: nn.Module, relu: nn.Module | None, x: Tensor) -> Tensor:
    """``relu(norm(x))`` (a norm-act ``norm(x)`` when ``relu`` is None): the fused BN-ReLU where it is plain."""
    if relu is not None:
        return norm_relu(norm, relu, x)
    return bn_relu(norm, x) if is_timm_bn_relu(norm) else norm(x)


def recomputes_bn_relu(x: Tensor, norm: nn.Module, relu: nn.Module) -> bool:
    """Whether a BN-ReLU on ``x`` runs through fastres._C, recomputed in backward instead of kept.

    On CPU, where the alternative (eager BatchNorm2d and ReLU) keeps the full
    BN-ReLU output. On CUDA the fused Triton BN-ReLU keeps a 1-bit mask,
    about as small, and recomputes nothing, so it is used there.
    """
    return recompute_bn_relu_applies(x) and _plain_bn_relu(norm, relu)


def stem_bn_relu_pool(norm: nn.Module, relu: nn.Module | None, pool: nn.Module, x: Tensor) -> Tensor:
    """``pool(relu(norm(x)))`` of an ImageNet stem; BN-ReLU recomputed in backward where that saves memory.

    ``relu`` is None for a norm-act ``norm``.
    """
    plain_pool = (
        is_plain(pool, nn.MaxPool2d) and pool.dilation in (1, (1, 1)) and not pool.ceil_mode
        and not pool.return_indices and all(isinstance(v, int) for v in (pool.kernel_size, pool.stride, pool.padding))
    )
    if plain_pool and recomputes_bn_relu(x, norm, relu):
        return bn_relu_max_pool2d(x, _norm_args(norm, tuple(x.shape)), pool.kernel_size, pool.stride, pool.padding)
    return pool(_norm_relu(norm, relu, x))


def _is_plain_conv(conv: nn.Module, kernel: int, padding: int) -> bool:
    return (
        is_plain(conv, nn.Conv2d) and conv.kernel_size == (kernel, kernel) and conv.stride == (1, 1)
        and conv.padding == (padding, padding) and conv.dilation == (1, 1) and conv.groups == 1
        and conv.bias is None and conv.padding_mode == "zeros"
    )


class _FromTorchvision(FromModule):
    """Conversion of torchvision's module of the same role (for ``fastres.convert``)."""

    _torchvision_name = ""
    _children: tuple[str, ...] = ()

    @classmethod
    def is_convertible(cls, module: nn.Module) -> bool:
        return type(module).__name__ == cls._torchvision_name and all(hasattr(module, n) for n in cls._children)

    @classmethod
    def convertible_from(cls) -> str:
        return f"torchvision's {cls._torchvision_name}"


class DenseLayer(_FromTorchvision, nn.Module):
    """torchvision's ``_DenseLayer``: BN-ReLU-conv1x1-BN-ReLU-conv3x3, then dropout.

    ``forward`` takes the block's earlier features (a tensor or a list of
    tensors, concatenated along channels) and returns the ``growth_rate`` new
    channels.
    """

    def __init__(
        self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float,
        memory_efficient: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    _torchvision_name = "_DenseLayer"
    _children = ("norm1", "relu1", "conv1", "norm2", "relu2", "conv2", "drop_rate")

    def _adopt(self) -> None:
        self.memory_efficient = True  # torchvision's flag means checkpointing; here, shared storage

    def extra_repr(self) -> str:
        return f"drop_rate={self.drop_rate}, memory_efficient={self.memory_efficient}"

    def bn_relus(self) -> tuple[tuple[nn.Module, nn.Module | None], ...]:
        """``((norm1, relu1), (norm2, relu2))``: the pre-activations of conv1 and conv2."""
        return (self.norm1, self.relu1), (self.norm2, self.relu2)

    def shares_storage(self) -> bool:
        """Whether this layer can run in a shared-storage block (else it runs as written). Every forward asks."""
        (norm1, relu1), (norm2, relu2) = self.bn_relus()
        return (
            _plain_bn_relu(norm1, relu1) and _plain_bn_relu(norm2, relu2)
            and _is_plain_conv(self.conv1, 1, 0) and _is_plain_conv(self.conv2, 3, 1)
            and not any(has_hooks(m) for m in self.modules())
        )

    def _unshared_reason(self) -> str:
        """Why ``shares_storage()`` is False ("" when it is True), for convert()'s report."""
        if self.shares_storage():
            return ""
        (norm1, relu1), (norm2, relu2) = self.bn_relus()
        for norm, relu, conv, kernel in ((norm1, relu1, self.conv1, 1), (norm2, relu2, self.conv2, 3)):
            if not _plain_bn_relu(norm, relu):
                act = norm._modules.get("act") if relu is None else relu
                return (f"{type(norm).__name__} -> {type(act).__name__} is not a batch norm with a plain ReLU "
                        "(or a module has hooks)")
            if not _is_plain_conv(conv, kernel, (kernel - 1) // 2):
                return f"its {kernel}x{kernel} convolution has other settings than a DenseNet's"
        return "a module in it has forward hooks"

    def fusion(self) -> tuple[list[str], list[str]]:
        """(what runs fused, what runs as written and why), from the modules as they are now."""
        why = self._unshared_reason()
        if why:
            return [], [f"as written: {why}"]
        return ["BN-ReLU-conv1x1-BN-ReLU-conv3x3 on shared storage"], []

    def dense_args(self, x_shape: tuple) -> DenseLayerArgs:
        """This layer's tensors and settings for ``dense_block`` (counts the batch in the BNs)."""
        bottleneck_shape = (x_shape[0], self.conv1.out_channels, *x_shape[2:])
        return DenseLayerArgs(
            _norm_args(self.norm1, x_shape), self.conv1.weight,
            _norm_args(self.norm2, bottleneck_shape), self.conv2.weight,
            self.drop_rate, self.training,
        )

    @atomic
    def forward(self, input: Tensor | list[Tensor]) -> Tensor:
        return _dense_layer(self, input)


class DenseBlock(_FromTorchvision, nn.ModuleDict):
    """torchvision's ``_DenseBlock``: ``num_layers`` layers; returns the concatenation of all features."""

    _version = 2
    _torchvision_name = "_DenseBlock"
    _children = ("denselayer1",)
    _layer_class = DenseLayer  # what convert() makes of its layers

    def _adopt(self) -> None:
        self.num_input_features = self.denselayer1.norm1.num_features
        self.memory_efficient = True

    def __init__(
        self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
        drop_rate: float = 0.0, memory_efficient: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        self.num_input_features = num_input_features
        self.memory_efficient = memory_efficient
        for i in range(num_layers):
            layer = DenseLayer(
                num_input_features + i * growth_rate, growth_rate=growth_rate, bn_size=bn_size,
                drop_rate=drop_rate, memory_efficient=memory_efficient,
            )
            self.add_module(f"denselayer{i + 1}", layer)

    def fusion(self) -> tuple[list[str], list[str]]:
        """(what runs fused, what runs as written and why): shared storage needs every layer to share it."""
        if has_hooks(self):
            return [], ["as written: it has forward hooks"]
        for name, layer in self.items():
            if not isinstance(layer, DenseLayer) and self._layer_class.is_convertible(layer):
                layer = self._layer_class.from_module(layer)
            why = layer._unshared_reason() if isinstance(layer, DenseLayer) else f"{type(layer).__name__} is not a dense layer"
            if why:
                return [], [f"as written, its layers one by one: {name}: {why}"]
        return [f"{len(self)} layers on one shared feature buffer (activation memory linear in depth)"], []

    @atomic
    def forward(self, init_features: Tensor) -> Tensor:
        return _dense_block(
            list(self.values()), init_features, self.num_input_features,
            self.memory_efficient and not has_hooks(self), type(self).__name__,
        )


class Transition(_FromTorchvision, nn.Sequential):
    """torchvision's ``_Transition``: BN-ReLU (fused), 1x1 convolution, 2x2 average pool."""

    _torchvision_name = "_Transition"
    _children = ("norm", "relu", "conv", "pool")

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)

    def bn_relus(self) -> tuple[tuple[nn.Module, nn.Module | None], ...]:
        """``((norm, relu),)``: the pre-activation of conv."""
        return ((self.norm, self.relu),)

    def fusion(self) -> tuple[list[str], list[str]]:
        """(what runs fused, what runs as written and why), from the modules as they are now."""
        (norm, relu), = self.bn_relus()
        if has_hooks(self) or not _plain_bn_relu(norm, relu) or not _is_plain_conv(self.conv, 1, 0):
            return [], ["as written: its norm is not a batch norm with a plain ReLU, its conv not a plain Conv2d, "
                        "or a module has hooks"]
        return ["BN-ReLU-conv1x1 (the BN-ReLU output is not stored)"], []

    @atomic
    def forward(self, x: Tensor) -> Tensor:
        (norm, relu), = self.bn_relus()
        return _transition(norm, relu, self.conv, self.pool, x, has_hooks(self), type(self).__name__)


# The forwards of the layer, block and transition, as torch.fx leaves: they choose their path from the
# tensor, and read the modules' state (training, buffers) when the graph runs. They take the modules
# they run, so a traced graph holds references to those.


def _dense_layer(layer: DenseLayer, input: Tensor | list[Tensor]) -> Tensor:
    prev = [input] if isinstance(input, Tensor) else list(input)
    if not prev or not all(isinstance(t, Tensor) and t.dim() == 4 for t in prev):
        raise ValueError(f"{type(layer).__name__}: input must be a 4-D tensor or a list of 4-D tensors")
    x = prev[0] if len(prev) == 1 else torch.cat(prev, 1)
    _check_features(layer, x, layer.conv1.in_channels, "input")
    if layer.memory_efficient and layer.shares_storage() and shared_storage_applies(x):
        new = dense_block(x, [layer.dense_args(tuple(x.shape))])[:, x.shape[1]:]
        return new.contiguous(memory_format=suggest_memory_format(x))  # eager's layout, not a view
    (norm1, relu1), (norm2, relu2) = layer.bn_relus()
    if getattr(layer, "grad_checkpointing", False) and any(t.requires_grad for t in prev):  # timm's layer's flag
        out = torch.utils.checkpoint.checkpoint(_bottleneck, layer.conv1, norm1, relu1, *prev, use_reentrant=False)
    else:
        out = _bottleneck(layer.conv1, norm1, relu1, x)
    out = layer.conv2(_norm_relu(norm2, relu2, out))
    if layer.drop_rate > 0:
        out = F.dropout(out, p=layer.drop_rate, training=layer.training)
    return out


def _bottleneck(conv: nn.Module, norm: nn.Module, relu: nn.Module | None, *prev: Tensor) -> Tensor:
    x = prev[0] if len(prev) == 1 else torch.cat(prev, 1)
    return conv(_norm_relu(norm, relu, x))


def _dense_block(
    layers: list[nn.Module], init_features: Tensor, num_input_features: int, memory_efficient: bool, owner: str
) -> Tensor:
    check_4d("init_features", init_features, owner, num_input_features, "num_input_features")
    shared = all(isinstance(layer, DenseLayer) and layer.shares_storage() for layer in layers)
    if memory_efficient and shared and shared_storage_applies(init_features):
        n, _, h, w = init_features.shape
        return dense_block(init_features, [layer.dense_args((n, layer.conv1.in_channels, h, w)) for layer in layers])
    features = [init_features]
    for layer in layers:
        features.append(layer(features))
    return torch.cat(features, 1)


def _transition(
    norm: nn.Module, relu: nn.Module | None, conv: nn.Module, pool: nn.Module, x: Tensor, hooked: bool, owner: str
) -> Tensor:
    check_4d("x", x, owner, norm.num_features, "num_input_features")
    if fused_conv_applies(x) and (relu is None or is_plain(relu, nn.ReLU)) and not hooked:
        # The fused BN-ReLU-Conv reads the block's buffer in place and keeps nothing of its size.
        return pool(bn_relu_conv(norm, conv, x))
    if not hooked and recomputes_bn_relu(x, norm, relu) and _is_plain_conv(conv, 1, 0):
        return pool(bn_relu_conv1x1(x, _norm_args(norm, tuple(x.shape)), conv.weight))
    return pool(conv(_norm_relu(norm, relu, x)))


torch.fx.wrap("_dense_layer")
torch.fx.wrap("_dense_block")
torch.fx.wrap("_transition")
