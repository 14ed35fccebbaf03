"""A quick self-test of every fastres op and block against eager PyTorch, on one device and dtype.

Each case computes the same thing twice on the same inputs, with fastres and
with the eager code it replaces (torchvision's blocks and DenseNet where they
exist), a forward and a backward in training mode, and returns every tensor a
user can observe: outputs, input and parameter gradients, BatchNorm running
statistics. Tensors agree when their dtypes and shapes match and their
normwise difference is within the dtype's tolerance (NaN never agrees).
"""

import contextlib
import dataclasses
import traceback
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import fastres.functional as Fn
from fastres import _ext
import fastres.nn
from fastres._torchvision import import_torchvision

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}  # normwise, ||fastres - eager|| / ||eager||
SHAPE = (2, 8, 6, 6)


@dataclasses.dataclass
class Result:
    case: str
    device: str
    dtype: str
    ok: bool
    error: str = ""
    worst: float | None = None  # largest normwise difference seen (None: the case did not get that far)


def _randn(shape, device, dtype, seed, requires_grad=True):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return t.to(device=device, dtype=dtype).requires_grad_(requires_grad)


def _grads(out: torch.Tensor, tensors: dict, seed: int) -> dict:
    """Backward of ``out`` against a fixed random gradient; the gradients of ``tensors`` by name."""
    out.backward(_randn(out.shape, out.device, out.dtype, seed, requires_grad=False))
    return {f"grad {name}": t.grad for name, t in tensors.items()}


def _bn_state(seed, c, device, dtype):
    return {
        "weight": _randn((c,), device, dtype, seed).detach().abs().add(0.5).requires_grad_(),
        "bias": _randn((c,), device, dtype, seed + 1),
        "running_mean": _randn((c,), device, dtype, seed + 2, requires_grad=False),
        "running_var": _randn((c,), device, dtype, seed + 3, requires_grad=False).abs() + 0.5,
    }


def _add_relu(impl, device, dtype):
    x, r = _randn(SHAPE, device, dtype, 0), _randn(SHAPE, device, dtype, 1)
    out = Fn.add_relu(x, r) if impl == "fastres" else torch.relu(x + r)
    return {"out": out.detach(), **_grads(out, {"x": x, "identity": r}, 2)}


def _add_relu_inplace(impl, device, dtype):
    a, r = _randn(SHAPE, device, dtype, 0), _randn(SHAPE, device, dtype, 1)
    x = a * 1  # a non-leaf, written in place
    out = Fn.add_relu(x, r, inplace=True) if impl == "fastres" else x.add_(r).relu_()
    return {"out": out.detach(), **_grads(out, {"x": a, "identity": r}, 2)}


def _batch_norm_relu(training: bool, residual: bool):
    def case(impl, device, dtype):
        x = _randn(SHAPE, device, dtype, 0)
        r = _randn(SHAPE, device, dtype, 1) if residual else None
        s = _bn_state(10, SHAPE[1], device, dtype)
        args = (s["running_mean"], s["running_var"], s["weight"], s["bias"], training, 0.1, 1e-5)
        if impl == "fastres":
            out = Fn.batch_norm_relu(x, *args, residual=r)
        else:
            y = F.batch_norm(x, *args)
            out = torch.relu(y + r if residual else y)
        leaves = {"x": x, "weight": s["weight"], "bias": s["bias"], **({"residual": r} if residual else {})}
        grads = _grads(out, leaves, 2)
        return {"out": out.detach(), **grads, "running_mean": s["running_mean"], "running_var": s["running_var"]}

    return case


def _bn_relu_conv(kernel: int, stride: int):
    def case(impl, device, dtype):
        x = _randn(SHAPE, device, dtype, 0)
        s = _bn_state(10, SHAPE[1], device, dtype)
        w = _randn((12, SHAPE[1], kernel, kernel), device, dtype, 5)
        pad = kernel // 2
        bn = (s["running_mean"], s["running_var"], s["weight"], s["bias"])
        if impl == "fastres":
            out = Fn.bn_relu_conv2d(x, *bn, w, None, stride, pad, training=True)
        else:
            out = F.conv2d(torch.relu(F.batch_norm(x, *bn, True, 0.1, 1e-5)), w, None, stride, pad)
        grads = _grads(out, {"x": x, "weight": s["weight"], "bias": s["bias"], "conv weight": w}, 2)
        return {"out": out.detach(), **grads, "running_mean": s["running_mean"], "running_var": s["running_var"]}

    return case


def _module_case(build_pair: Callable[[], tuple[nn.Module, nn.Module]], in_shape):
    """A fastres module against the eager module it replaces, with the same weights, in training mode."""

    def case(impl, device, dtype):
        torch.manual_seed(0)
        fused, reference = build_pair()
        fused.load_state_dict(reference.state_dict())
        model = (fused if impl == "fastres" else reference).to(device=device, dtype=dtype).train()
        x = _randn(in_shape, device, dtype, 0)
        out = model(x)
        grads = _grads(out, {"x": x, **dict(model.named_parameters())}, 2)
        buffers = {name: b for name, b in model.named_buffers() if "running" in name}
        return {"out": out.detach(), **grads, **buffers}

    return case


def _blocks():
    tv = import_torchvision()
    down = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 1, 2, bias=False), nn.BatchNorm2d(o))  # noqa: E731

    def densenet_bc():
        from .zoo import _torchvision_densenet_bc

        return fastres.models.densenet_bc(10, 4, 3, memory_efficient=True), _torchvision_densenet_bc(10, 4, 3, False)

    timm_cases = {}
    try:
        from timm.layers import BatchNormAct2d, create_conv2d
        from timm.models import resnetv2 as timm_v2
    except ImportError:  # an optional reference: its blocks are checked where it is installed
        timm_v2 = None
    if timm_v2 is not None:
        # What timm's BatchNorm resnetv2_* models build (its blocks default to GroupNorm and StdConv2d).
        timm_layers = {"norm_layer": BatchNormAct2d, "conv_layer": create_conv2d}
        timm_cases = {
            "PreActBasicBlock (vs timm)": _module_case(
                lambda: (fastres.nn.PreActBasicBlock(8, 8), timm_v2.PreActBasic(8, 8, **timm_layers)), SHAPE),
            "PreActBottleneck (vs timm)": _module_case(
                lambda: (fastres.nn.PreActBottleneck(16, 16), timm_v2.PreActBottleneck(16, 16, **timm_layers)),
                (2, 16, 6, 6)),
        }
    return {
        "BasicBlock (vs torchvision)": _module_case(
            lambda: (fastres.nn.BasicBlock(8, 16, 2, down(8, 16)), tv.models.resnet.BasicBlock(8, 16, 2, down(8, 16))),
            SHAPE),
        "Bottleneck (vs torchvision)": _module_case(
            lambda: (fastres.nn.Bottleneck(16, 4), tv.models.resnet.Bottleneck(16, 4)), (2, 16, 6, 6)),
        "DenseNet-BC depth 10 (vs torchvision)": _module_case(densenet_bc, (2, 3, 8, 8)),
        **timm_cases,
    }


def cases() -> dict[str, Callable]:
    return {
        "add_relu": _add_relu,
        "add_relu inplace": _add_relu_inplace,
        "batch_norm_relu train": _batch_norm_relu(True, False),
        "batch_norm_relu train + residual": _batch_norm_relu(True, True),
        "batch_norm_relu eval + residual": _batch_norm_relu(False, True),
        "bn_relu_conv2d 3x3": _bn_relu_conv(3, 1),
        "bn_relu_conv2d 1x1 stride 2": _bn_relu_conv(1, 2),
        **_blocks(),
    }


def _difference(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    if a.dtype != b.dtype or a.shape != b.shape:
        raise AssertionError(f"dtype/shape {a.dtype} {tuple(a.shape)} vs eager's {b.dtype} {tuple(b.shape)}")
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    scale = b.norm().item()
    diff = (a - b).norm().item()
    return diff / scale if scale > 0 else diff


def run_case(name: str, case: Callable, device: str, dtype: torch.dtype) -> Result:
    label = str(dtype).removeprefix("torch.")
    try:
        got, want = case("fastres", device, dtype), case("eager", device, dtype)
        worst, bad = 0.0, []
        for key in want:
            d = _difference(got.get(key), want[key])
            worst = max(worst, d)
            if not d <= TOLERANCE[dtype]:  # `not <=` catches NaN
                bad.append(f"{key}: {d:.1e}")
        if bad:
            return Result(name, device, label, False, f"beyond {TOLERANCE[dtype]:.0e}: " + ", ".join(bad[:3]), worst)
        return Result(name, device, label, True, worst=worst)
    except Exception as err:  # a self-test reports every failure, whatever it is
        where = traceback.extract_tb(err.__traceback__)[-1]
        place = f"{where.filename.rsplit('/', 1)[-1]}:{where.lineno}"
        return Result(name, device, label, False, f"{type(err).__name__}: {err} ({place})")


@contextlib.contextmanager
def _exact_float32():
    """TF32 off while the cases run: with it, both sides' float32 convolutions round to 10-bit mantissas."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _on_dense_path(path: str, case: Callable) -> Callable:
    """``case`` with fastres's side on one dense path (``fastres.dense_path``)."""
    def run(provider, device, dtype):
        with fastres.dense_path(path):
            return case(provider, device, dtype)
    return run


def cases_for(device: str) -> dict[str, Callable]:
    """``cases()``, plus on CUDA the DenseNet on fastres._C's CUDA kernels where they are built."""
    found = cases()
    if device.startswith("cuda") and _ext.cuda_kernels():
        name = "DenseNet-BC depth 10 (vs torchvision)"
        found[name.replace(" (vs", ", fastres._C CUDA kernels (vs")] = _on_dense_path("extension", found[name])
    return found


def run_all(device: str, dtypes=(torch.float64, torch.float32)) -> list[Result]:
    with _exact_float32():
        return [run_case(name, case, device, dtype) for name, case in cases_for(device).items() for dtype in dtypes]
