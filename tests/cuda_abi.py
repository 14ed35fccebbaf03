"""fastres._C's C interface to its CUDA kernels (``csrc/dense_cuda.h``) through ctypes, for tests.

Any build with the kernels exports it: the installed ``fastres._C`` and the
emulated build of tests/emulated_cuda.py.
"""

import ctypes
from types import ModuleType

import torch

FLOAT32, FLOAT64, FLOAT16, BFLOAT16 = 0, 1, 2, 3
CODES = {torch.float32: FLOAT32, torch.float64: FLOAT64, torch.float16: FLOAT16, torch.bfloat16: BFLOAT16}
NOT_BUILT, TOO_LARGE = -1, -2


class View(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("sn", ctypes.c_int64), ("sc", ctypes.c_int64), ("sp", ctypes.c_int64)]


class Problem(ctypes.Structure):
    _fields_ = [("n", ctypes.c_int64), ("c", ctypes.c_int64), ("p", ctypes.c_int64), ("dtype", ctypes.c_int),
                ("device", ctypes.c_int), ("stream", ctypes.c_void_p)]


def library(module: ModuleType) -> ctypes.CDLL:
    lib = ctypes.CDLL(module.__file__)
    lib.fastres_cuda_error_string.restype = ctypes.c_char_p
    return lib


def view_of(t: torch.Tensor) -> View:
    """The view the bindings pass for a 4-D tensor: H and W merged (``merged_hw_stride`` in csrc/checks.h)."""
    h, w = t.shape[2], t.shape[3]
    sp = t.stride(2) if w == 1 else t.stride(3)
    assert w == 1 or h == 1 or t.stride(2) == w * t.stride(3), "H and W do not merge"
    return View(t.data_ptr(), t.stride(0), t.stride(1), sp)


def plan(lib: ctypes.CDLL, problem: Problem, *views: View) -> tuple[str, int]:
    """(iteration: "rows" or "channels", elements per access) of a call over these views."""
    layout, vec, parts = ctypes.c_int(-1), ctypes.c_int(-1), ctypes.c_int64(-1)
    refs = [ctypes.byref(v) for v in views] + [None] * (3 - len(views))
    err = lib.fastres_cuda_plan(ctypes.byref(problem), *refs, ctypes.byref(layout), ctypes.byref(vec),
                                ctypes.byref(parts))
    assert err == 0
    return ("channels" if layout.value else "rows"), vec.value


def plan_of(module: ModuleType, x: torch.Tensor, *others: torch.Tensor) -> tuple[str, int]:
    """The plan ``module``'s CUDA kernels take for an op over x (and the x-shaped others)."""
    n, c, h, w = x.shape
    problem = Problem(n, c, h * w, CODES[x.dtype], 0, None)
    return plan(library(module), problem, *(view_of(t) for t in (x, *others)))
