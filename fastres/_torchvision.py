"""Import torchvision's models where only a CPU build of torch is installed.

torchvision is not a dependency of fastres; tests and the demo compare against
its models. Its PyPI wheel is a CUDA build whose compiled operators fail to
register against a CPU-only torch (``operator torchvision::nms does not exist``)
while its models never need them. If the normal import fails that way, the two
modules that register those operators are replaced by empty ones and the import
is retried; ``torchvision.ops`` then stays unusable.
"""

import importlib
import sys
import types

_OPERATOR_MODULES = ("torchvision._meta_registrations", "torchvision._autograd_registrations")


def import_torchvision() -> types.ModuleType:
    """``import torchvision``, also where its compiled operators cannot load against this torch (see above)."""
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as err:
        if "does not exist" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    for name in _OPERATOR_MODULES:
        sys.modules[name] = types.ModuleType(name)
    return importlib.import_module("torchvision")
