"""Public loss functions: pure functions of tensors, callable from any training loop."""

from alambic.losses.divergence import js_loss, kd_loss, masked_cross_entropy
from alambic.losses.feature import hint_loss

__all__ = ["hint_loss", "js_loss", "kd_loss", "masked_cross_entropy"]
