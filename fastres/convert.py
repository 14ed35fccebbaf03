"""Swap fused blocks into an existing model, keeping its weights."""

import sys
import warnings

from torch import nn

from .conversion_report import ConversionReport
from .models.densenet import DenseNet
from .models.resnet import ResNet
from .nn.batch_norm import BatchNormReLU2d, SyncBatchNormReLU2d
from .nn.densenet import DenseBlock, DenseLayer, Transition
from .nn.module_state import is_plain
from .nn.preact_blocks import PreActBasicBlock, PreActBottleneck
from .nn.resnet_blocks import BasicBlock, Bottleneck
from .nn.timm_blocks import TimmBasicBlock, TimmBottleneck
from .nn.timm_densenet import TimmDenseBlock, TimmDenseFeatures, TimmDenseLayer, TimmTransition

_FUSED_BLOCKS = (
    TimmBasicBlock, TimmBottleneck, PreActBasicBlock, PreActBottleneck,
    BasicBlock, Bottleneck, DenseBlock, DenseLayer, Transition,
    TimmDenseFeatures, TimmDenseBlock, TimmDenseLayer, TimmTransition,
)
_FUSED_NORMS = {nn.BatchNorm2d: BatchNormReLU2d, nn.SyncBatchNorm: SyncBatchNormReLU2d}


def convert(model: nn.Module, report: bool = False):
    """Fuse what can be fused in ``model``, in place.

    - torchvision-style ``BasicBlock``/``Bottleneck`` become fastres's blocks
      (fused BN-ReLU and BN-add-ReLU).
    - torchvision's DenseNet ``_DenseBlock``/``_DenseLayer``/``_Transition``
      become ``DenseBlock``/``DenseLayer``/``Transition`` with
      ``memory_efficient=True`` (shared storage, in place of checkpointing).
    - A torchvision ``DenseNet`` (its own class, with torchvision's layout of
      ``features``) becomes a ``fastres.models.DenseNet`` and a torchvision
      ``ResNet`` (its own class) a ``fastres.models.ResNet``, in place: the
      same children and computation, with the stems' BN-ReLU (and DenseNet's
      final BN-ReLU) fused in forward as in fastres's builders, so the same
      activation memory, and BatchNorm modules that stay BatchNorms (which
      ``nn.SyncBatchNorm.convert_sync_batchnorm`` can convert).
    - timm's ResNets (``timm.models.resnet``: resnet18/50, resnet50d,
      resnext, seresnet, anti-aliased, DropBlock and drop-path variants):
      ``BasicBlock``/``Bottleneck`` become ``fastres.nn.TimmBasicBlock``/
      ``TimmBottleneck``, which fuse each BN -> act -> conv, BN -> act and
      BN -> add -> act that follows the plain pattern (ReLU, nothing between)
      and run ``se``, ``aa``, ``drop_block`` and ``drop_path`` as written.
      The model's own stem (``bn1``, ``act1``) runs as timm's forward calls it.
    - timm's ResNetV2 (``timm.models.resnetv2``): ``PreActBasic``/
      ``PreActBottleneck`` become fastres's, each convolution a fused
      BN-ReLU-convolution where the norm is a ``BatchNormAct2d`` with a
      plain ReLU. The norms stay timm's modules (so timm's SyncBatchNorm and
      frozen-BN converters still work); those outside blocks (the final norm,
      a deep stem's) run as timm's forward calls them.
    - timm's DenseNets (``timm.models.densenet``: densenet121/161/169/201,
      densenetblur121d, densenet264d): ``DenseBlock``/``DenseLayer``/
      ``DenseTransition`` become ``fastres.nn.TimmDenseBlock``/
      ``TimmDenseLayer``/``TimmTransition`` (shared storage, as torchvision's
      become), and the model's ``features`` a ``TimmDenseFeatures`` (the
      stem's and final BN-ReLU fused as in ``fastres.models.DenseNet``). The
      norms stay timm's ``BatchNormAct2d``; the model stays timm's class,
      with timm's model API. timm's ``set_grad_checkpointing`` no longer
      reaches the converted layers (they are not timm's class): shared
      storage needs no checkpointing.
    - BatchNorm2d -> ReLU pairs in any plain ``nn.Sequential`` (one whose
      forward is ``nn.Sequential.forward``; a subclass with its own forward
      may return or use the BN's output, so it is left alone) become one
      ``BatchNormReLU2d`` (a ``SyncBatchNormReLU2d`` for SyncBatchNorm)
      followed by ``nn.Identity``. For synchronized BN convert these with
      ``fastres.nn.convert_sync_batchnorm``: torch's converter would turn a
      ``BatchNormReLU2d`` into a plain SyncBatchNorm and drop its ReLU.

    fastres's own modules (built by fastres or already converted) are left as
    they are. Fused modules share the old ones' parameters, buffers and hooks,
    so optimizers and state_dict keys are unaffected. A pair where either
    module has forward hooks is left alone (fusing would change what the
    hooks see). Results are the same either way.

    Returns ``model`` (or the fused block, if ``model`` itself is a block);
    with ``report=True``, ``(model, ConversionReport)``: what was fused, and
    each batch norm left running as written with the reason. A model in
    which nothing could be fused draws a warning that says so.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(report, bool):
        raise TypeError(f"report must be a bool, got {type(report).__name__}")
    notes = ConversionReport(type(model).__name__)
    already = any(_is_fastres(m) for m in model.modules())
    fused = _fused_version(model, "", notes)
    root = fused or model
    for prefix, parent in list(root.named_modules()):
        for name, child in list(parent.named_children()):
            fused = _fused_version(child, _join(prefix, name), notes)
            if fused is not None:
                setattr(parent, name, fused)
    for path, module in list(root.named_modules()):
        if _is_torchvision_densenet(module):
            module.__class__ = DenseNet
            notes.add_fused(path, "torchvision DenseNet -> fastres DenseNet (stem and final BN-ReLU fused)")
        elif _is_torchvision_resnet(module):
            module.__class__ = ResNet
            notes.add_fused(path, "torchvision ResNet -> fastres ResNet (stem BN-ReLU fused)")
    _fuse_pairs_outside_fastres(root, "", notes)
    notes.find_left(root)
    if not notes.fused and not already:
        warnings.warn(f"fastres.convert: nothing in this {type(model).__name__} could be fused; "
                      f"it runs as before.{notes.left_summary()}", UserWarning, stacklevel=2)
    return (root, notes) if report else root


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _fused_version(module: nn.Module, path: str, notes: ConversionReport) -> nn.Module | None:
    for cls in _FUSED_BLOCKS:
        if cls.is_convertible(module):
            fused = cls.from_module(module)
            if notes.add_block(path, module, fused):
                return fused
            notes.leave(module)  # nothing in it matches: it stays the module it was, reported once
            return None
    return None


def _is_fastres(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "fastres"


def _torchvision_class(module_name: str, class_name: str) -> type | None:
    """torchvision's class, if torchvision is imported (a torchvision model implies it is)."""
    return getattr(sys.modules.get(module_name), class_name, None)


def _is_torchvision_densenet(module: nn.Module) -> bool:
    """torchvision's DenseNet itself, with the children ``fastres.models.DenseNet.forward`` runs, in its order.

    That forward runs the stem and the blocks/transitions of ``features``
    without calling ``features`` itself, so ``features`` must be a plain
    Sequential without hooks holding exactly torchvision's layout.
    """
    if type(module) is not _torchvision_class("torchvision.models.densenet", "DenseNet"):
        return False
    features, classifier = module._modules.get("features"), module._modules.get("classifier")
    if not is_plain(features, nn.Sequential) or type(classifier) is not nn.Linear:
        return False
    names = list(features._modules)
    if names[:4] != ["conv0", "norm0", "relu0", "pool0"] or names[-1:] != ["norm5"]:
        return False
    blocks = names[4:-1]
    expected = [f"{kind}{i // 2 + 1}" for i, kind in zip(range(len(blocks)), ["denseblock", "transition"] * len(blocks))]
    return bool(blocks) and blocks == expected and blocks[-1].startswith("denseblock")


def _is_torchvision_resnet(module: nn.Module) -> bool:
    """torchvision's ResNet itself: ``fastres.models.ResNet`` has its children and runs them alike, stem fused."""
    return type(module) is _torchvision_class("torchvision.models.resnet", "ResNet")


def _pairs(module: nn.Module) -> list[tuple[str, str]]:
    """(norm, relu) child names that ``module``'s forward runs back to back: a plain Sequential's."""
    if type(module).forward is nn.Sequential.forward:  # each child's output feeds the next
        names = list(module._modules)
        return list(zip(names, names[1:]))
    return []


def _fuse_pairs_outside_fastres(module: nn.Module, path: str, notes: ConversionReport) -> None:
    if _is_fastres(module):
        return  # fastres's modules run their BN-ReLUs fused already (or recompute them), as they are
    _fuse_bn_relu_pairs(module, path, notes)
    for name, child in module.named_children():
        _fuse_pairs_outside_fastres(child, _join(path, name), notes)


def _fuse_bn_relu_pairs(module: nn.Module, path: str, notes: ConversionReport) -> None:
    for norm_name, relu_name in _pairs(module):
        norm, relu = module._modules.get(norm_name), module._modules.get(relu_name)
        if type(norm) not in _FUSED_NORMS or type(relu) is not nn.ReLU:
            continue
        if norm._forward_hooks or norm._forward_pre_hooks or relu._forward_hooks or relu._forward_pre_hooks:
            continue
        module._modules[norm_name] = _FUSED_NORMS[type(norm)].from_module(norm)
        module._modules[relu_name] = nn.Identity()
        notes.add_fused(_join(path, norm_name), f"{norm_name} -> {relu_name} (BN-ReLU)")
