"""Public loss functions: pure functions of tensors, callable from any training loop.

Every module of this package lists its public losses in ``__all__``; they are all re-exported here
(``alambic.losses.kd_loss``, ``alambic.losses.hint_loss``, ...).
"""

import importlib
import pkgutil

__all__: list[str] = []
for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _module.name.startswith("_"):
        continue
    _mod = importlib.import_module(f"{__name__}.{_module.name}")
    for _name in getattr(_mod, "__all__", []):
        globals()[_name] = getattr(_mod, _name)
        __all__.append(_name)
