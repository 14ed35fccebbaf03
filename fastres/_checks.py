"""Argument checks shared by the public functions and modules.

Each raises before any kernel launch, with a message that names the argument.
"""

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def kept_in_fx_graphs(fn):
    """Marks a check (a function whose result nothing uses) side-effectful for torch.fx.

    A module that wraps it with ``torch.fx.wrap`` gets a call node for it in a
    traced graph; dead-code elimination (which torchvision's
    ``create_feature_extractor`` runs) would otherwise drop that node, and the
    check with it. Returns ``fn`` itself.
    """
    mark = getattr(torch.fx.node, "has_side_effect", None)
    return fn if mark is None else mark(fn)


@kept_in_fx_graphs
def check_float_tensor(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        supported = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
        raise TypeError(f"{name} must have a floating dtype ({supported}), got {t.dtype}")


def check_same_tensor_meta(
    name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, same_dtype: bool = True
) -> None:
    """Same dtype (unless ``same_dtype=False``), device and shape: no moves or broadcasting."""
    if same_dtype and a.dtype != b.dtype:
        raise TypeError(
            f"{name_a} and {name_b} must have the same dtype, got {a.dtype} and {b.dtype}"
        )
    if a.device != b.device:
        raise ValueError(
            f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}"
        )
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape (no broadcasting), "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )


@kept_in_fx_graphs
def check_4d(name: str, x: object, owner: str | None = None, channels: int | None = None, expected: str = "") -> None:
    """``x`` is a 4-D tensor (N, C, H, W), with ``channels`` channels if given.

    ValueError naming the argument (and the module, ``owner``, if any); TypeError for a non-floating dtype.
    """
    prefix = f"{owner}: " if owner else ""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{prefix}{name} must be a 4-D tensor (N, C, H, W), got shape {shape}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{prefix}{name} must have a floating dtype, got {x.dtype}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(
            f"{prefix}{name} has {x.shape[1]} channels but {owner or 'the module'} expects {channels} ({expected})"
        )


def check_dense_vector(name: str, t: torch.Tensor) -> None:
    """A per-channel tensor's elements are adjacent in memory (stride 1): the kernels index it so.

    A strided view (``buf[::2]``, a parameter carved out of a flat buffer with a
    step) would be read, and a running statistic written, at the wrong
    elements: refused on every path, naming the argument. ``.contiguous()``
    (or a copy, for a running statistic) makes one that works.
    """
    if t.numel() > 1 and t.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous (stride 1), got stride {t.stride(0)}: pass {name}.contiguous()")


def check_batch_norm_args(x: torch.Tensor, running_mean, running_var, weight, bias, training: bool, momentum,
                          eps: float, prefix: str = "", channels: int | None = None) -> None:
    """One batch norm's per-channel tensors and settings against ``x`` (already a 4-D float tensor).

    Every path of every op checks them here: each tensor one value per channel
    of x, on x's device, stride 1; running statistics given together (and in
    eval); eps and momentum as ``F.batch_norm`` takes them; the dtypes by
    ``check_batch_norm_dtypes``. ``prefix`` names a group (``"norm."``);
    ``channels``: how many it normalises, when not x's.
    """
    channels = x.shape[1] if channels is None else channels
    tensors = {f"{prefix}running_mean": running_mean, f"{prefix}running_var": running_var,
               f"{prefix}weight": weight, f"{prefix}bias": bias}
    for name, t in tensors.items():
        if t is None:
            continue
        check_float_tensor(name, t)
        if t.dim() != 1 or t.shape[0] != channels:
            raise ValueError(f"{name} must have shape ({channels},), one value per channel of x, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
        check_dense_vector(name, t)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{prefix}running_mean and {prefix}running_var must be given together, or both be None")
    if running_mean is not None and running_mean is running_var:
        # Eager's result then depends on the order of the two updates, which differs between devices.
        raise ValueError(f"{prefix}running_mean and {prefix}running_var must be two tensors, got the same one")
    if not training and running_mean is None:
        raise ValueError(f"training=False normalises with {prefix}running_mean and {prefix}running_var: "
                         "both are required")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"{prefix}momentum must be a float, got {type(momentum).__name__} "
                        "(F.batch_norm's; a module's momentum=None is its cumulative average, passed as 1/steps)")
    check_batch_norm_eps(f"{prefix}eps", eps, training)
    check_batch_norm_dtypes(x, tensors)


def _eager_eval_eps_rule() -> str:
    """What the installed torch's ``F.batch_norm`` takes as eps in eval: "positive" (torch 2.11) or "non-negative"."""
    try:
        torch.nn.functional.batch_norm(torch.ones(1, 1, 1, 1), torch.zeros(1), torch.ones(1), training=False, eps=0.0)
    except ValueError:
        return "positive"
    return "non-negative"


_EVAL_EPS_RULE = _eager_eval_eps_rule()  # asked once, at import: torch versions differ on eps = 0


def check_batch_norm_eps(name: str, eps: float, training: bool) -> None:
    """``F.batch_norm``'s rule: eps > 0 in training; in eval eps >= 0, or > 0 where the installed torch says so.

    A ValueError naming ``name``.
    """
    if training and eps <= 0.0:
        raise ValueError(f"{name} must be positive during training, but got {eps}")
    if eps < 0.0 or (eps == 0.0 and _EVAL_EPS_RULE == "positive"):
        raise ValueError(f"{name} must be {_EVAL_EPS_RULE}, but got {eps}")


_REDUCED = (torch.float16, torch.bfloat16)


def check_batch_norm_dtypes(x: torch.Tensor, params: dict[str, torch.Tensor | None]) -> None:
    """``F.batch_norm``'s dtype rule for its per-channel tensors (``None`` ones skipped).

    All of x's dtype, or, for a float16/bfloat16 ``x``, all float32 (eager's
    mixed-precision case). Anything else eager refuses on CPU and CUDA alike;
    TypeError naming the first tensor that breaks the rule.
    """
    given = [(name, t) for name, t in params.items() if t is not None]
    if all(t.dtype == x.dtype for _, t in given):
        return
    wanted = torch.float32 if x.dtype in _REDUCED else x.dtype
    for name, t in given:
        if t.dtype != wanted:
            allowed = f"{x.dtype}, or all torch.float32" if x.dtype in _REDUCED else f"{x.dtype}"
            raise TypeError(
                f"{name} has dtype {t.dtype} but x has {x.dtype}: {', '.join(params)} must all have "
                f"dtype {allowed} (as F.batch_norm requires)"
            )
