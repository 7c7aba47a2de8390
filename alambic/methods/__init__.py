"""Methods: each maps student and teacher outputs to a loss. Importing this package registers them."""

from alambic.methods import ce, fitnet, kd  # noqa: F401  (registration)
from alambic.methods.base import Method, MethodConfig, MethodOutput, StepContext

__all__ = ["Method", "MethodConfig", "MethodOutput", "StepContext"]
