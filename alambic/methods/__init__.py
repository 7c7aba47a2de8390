"""Methods: each maps student and teacher outputs to a loss.

Importing this package imports every module in it, which registers its methods: a new method is a new
file here with ``@METHODS.register("name")`` and nothing else to edit.
"""

import importlib
import pkgutil

from alambic.methods.base import Method, MethodConfig, MethodOutput, SetupInfo, StepContext

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Method", "MethodConfig", "MethodOutput", "SetupInfo", "StepContext"]
