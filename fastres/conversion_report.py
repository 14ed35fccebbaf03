"""What ``fastres.convert`` fused in a model, and what it left running as written, with the reason."""

import dataclasses

from torch import nn

from .nn.batch_norm import BatchNormReLU2d, SyncBatchNormReLU2d
from .nn.module_state import has_hooks


@dataclasses.dataclass
class ConversionReport:
    """``fused``: (module path, what now runs fused); ``left``: (module path, what runs as written, and why)."""

    model: str
    fused: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    left: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    _left_modules: set = dataclasses.field(default_factory=set, repr=False)  # blocks already reported as left

    def add_fused(self, path: str, what: str) -> None:
        self.fused.append((path or "(model)", what))

    def add_block(self, path: str, old: nn.Module, new: nn.Module) -> bool:
        """Records ``old`` becoming ``new``; False when nothing in it would run fused (it is then left)."""
        what = f"{type(old).__name__} -> fastres.nn.{type(new).__name__}"
        fusion = getattr(new, "fusion", None)
        fused, left = fusion() if fusion is not None else ([], [])
        self.left.extend((path or "(model)", item) for item in left)
        if fusion is not None and not fused:
            return False
        self.add_fused(path, f"{what}: {'; '.join(fused)}" if fused else what)
        return True

    def leave(self, module: nn.Module) -> None:
        self._left_modules.add(id(module))

    def find_left(self, root: nn.Module) -> None:
        """Batch norms outside fastres's modules that still run unfused, each with the reason."""
        self._walk(root, "")

    def _walk(self, module: nn.Module, path: str) -> None:
        if type(module).__module__.split(".")[0] == "fastres" or id(module) in self._left_modules:
            return  # fastres's modules say what they fuse (add_block), as do blocks left whole
        names = list(module._modules)
        for i, name in enumerate(names):
            child = module._modules[name]
            if child is None:
                continue
            child_path = f"{path}.{name}" if path else name
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and \
                    not isinstance(child, (BatchNormReLU2d, SyncBatchNormReLU2d)):
                self.left.append((child_path, f"{type(child).__name__}: as written, {_why(module, names, i)}"))
            else:
                self._walk(child, child_path)

    def left_summary(self, limit: int = 3) -> str:
        if not self.left:
            return ""
        shown = "; ".join(f"{p}: {why}" for p, why in self.left[:limit])
        more = f" (and {len(self.left) - limit} more)" if len(self.left) > limit else ""
        return f" Left as written: {shown}{more}."

    def __str__(self) -> str:
        lines = [f"fastres.convert({self.model}): {len(self.fused)} fused, {len(self.left)} left as written"]
        if not self.fused:
            lines.append("  nothing could be fused")
        for title, rows in (("fused:", self.fused), ("left as written:", self.left)):
            if rows:
                lines.append(title)
                width = max(len(p) for p, _ in rows)
                lines += [f"  {p:<{width}}  {what}" for p, what in rows]
        return "\n".join(lines)


def _why(parent: nn.Module, names: list[str], i: int) -> str:
    child = parent._modules[names[i]]
    if has_hooks(child):
        return "it has forward hooks (a fused call would skip them)"
    act = child._modules.get("act")
    if isinstance(act, nn.Module):
        what = "a ReLU" if type(act) is nn.ReLU else f"{type(act).__name__}"
        return f"a norm-act module ({what}) outside a block fastres converts, run by its parent's forward"
    if type(parent).forward is not nn.Sequential.forward:
        return f"{type(parent).__name__}'s forward is not one fastres knows"
    following = parent._modules[names[i + 1]] if i + 1 < len(names) else None
    if type(following) is not nn.ReLU:
        return f"no ReLU follows it (next: {type(following).__name__ if following is not None else 'nothing'})"
    return "the ReLU after it has hooks"
