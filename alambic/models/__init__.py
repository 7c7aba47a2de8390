"""Networks: the reference zoo, user factories and taps."""

from alambic.models.taps import Taps, resolve_module
from alambic.models.zoo import MLP, SmallCNN, build_model, import_object

__all__ = ["MLP", "SmallCNN", "Taps", "build_model", "import_object", "resolve_module"]
