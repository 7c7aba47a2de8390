"""Networks: the reference zoo, user factories and taps.

Every module of this package is imported here, so a new architecture is one new file with
``@MODELS.register("name", config=...)``.
"""

import importlib
import pkgutil

from alambic.models.taps import Taps, resolve_module
from alambic.models.zoo import MLP, SmallCNN, build_model, import_object

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["MLP", "SmallCNN", "Taps", "build_model", "import_object", "resolve_module"]
