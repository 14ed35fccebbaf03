"""A fastres module's call updates its batch norms' buffers completely or not at all.

A fused op updates a batch norm's running statistics in its first kernel and
may launch more after it; a dense block or a whole model runs many such ops.
If any launch raises (out of memory, a compile failure, an interrupt), the
running statistics and ``num_batches_tracked`` already updated would describe
a step that never happened, and a resumed run would differ from one never
interrupted. So the outermost fastres module of a call copies the buffers of
its training batch norms into copies it keeps (one multi-tensor copy, no
allocation after the first call) and copies them back if the call raises;
the error then goes on unchanged. Parameters are never written by a forward
or backward, and no backward writes a buffer.

The batch norms under a module are found once and kept until any module
anywhere registers a submodule (a global registration hook counts those);
the copies are remade when a buffer is a different tensor (``model.to``).
Under ``torch.compile``, ``torch.export``, ``torch.jit.trace`` and
``torch.fx`` tracing the call runs as written: what is traced is the forward.
"""

import functools
import threading

import torch
import torch.utils.checkpoint
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# torch.utils.checkpoint (non-reentrant) stops a recomputation in backward by raising this out of the
# forward once it has what it needs; the batch norms that ran in it keep their second update, as in eager.
_STOP_RECOMPUTATION = getattr(torch.utils.checkpoint, "_StopRecomputationError", ())
_calls = threading.local()  # the outermost call on this thread holds the copies
_generation = [0]  # bumped whenever a submodule is registered: cached norm lists are then stale


def _module_registered(module, name, submodule):
    _generation[0] += 1


nn.modules.module.register_module_module_registration_hook(_module_registered)


class _Norms:
    __slots__ = ("generation", "norms", "buffers", "copies")

    def __init__(self, module: nn.Module):
        self.generation = _generation[0]
        self.norms = tuple(m for m in module.modules() if isinstance(m, _BatchNorm))
        self.buffers: list[torch.Tensor] = []
        self.copies: list[torch.Tensor] = []


def _norms(module: nn.Module) -> _Norms:
    cached = module.__dict__.get("_fastres_norms")
    if cached is None or cached.generation != _generation[0]:
        cached = module.__dict__["_fastres_norms"] = _Norms(module)
    return cached


_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _training_buffers(norms) -> list[torch.Tensor]:
    """The buffers a training call may update: running statistics and counters of training batch norms."""
    out = []
    for bn in norms:
        if bn.training and bn.track_running_stats:
            buffers = bn._buffers  # not Module.__getattr__'s slower lookup: this runs on every call
            for name in _BUFFERS:
                t = buffers.get(name)
                if t is not None:
                    out.append(t)
    return out


def _traced() -> bool:
    return torch.jit.is_tracing() or torch.fx._symbolic_trace._is_fx_tracing_flag  # the flag: no deprecation warning


def atomic(forward):
    """Decorates a module's forward: the batch norms' buffers as before the call if it raises."""

    @functools.wraps(forward)
    def call(self, *args, **kwargs):
        if torch.compiler.is_compiling() or getattr(_calls, "active", False) or _traced():
            return forward(self, *args, **kwargs)
        cache = _norms(self)
        buffers = _training_buffers(cache.norms)
        if not buffers:  # eval: nothing to restore
            return forward(self, *args, **kwargs)
        if len(buffers) != len(cache.buffers) or any(a is not b for a, b in zip(buffers, cache.buffers)):
            cache.buffers, cache.copies = buffers, [torch.empty_like(t) for t in buffers]
        torch._foreach_copy_(cache.copies, buffers)  # buffers need no grad mode: nothing to record
        _calls.active = True
        try:
            return forward(self, *args, **kwargs)
        except _STOP_RECOMPUTATION:  # checkpoint's recomputation ended early: no failure, state kept as eager's
            raise
        except BaseException:
            with torch.no_grad():
                torch._foreach_copy_(buffers, cache.copies)
            raise
        finally:
            _calls.active = False

    return call
