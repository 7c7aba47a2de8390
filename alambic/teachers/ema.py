"""A teacher that is an exponential moving average of the student (mean teacher, DINO, BYOL).

After every optimizer step: ``θ_T ← m·θ_T + (1 − m)·θ_S`` (Tarvainen & Valpola, "Mean teachers are better
role models", 2017, arXiv:1703.01780, Eq. 1). Floating-point buffers (BatchNorm running statistics) are
averaged the same way; integer buffers (``num_batches_tracked``) are copied. The teacher never receives
gradients and runs in eval mode. ``m`` may follow a cosine schedule from ``momentum`` to ``end_momentum``
over the run (BYOL / DINO: 0.996 -> 1).
"""

from __future__ import annotations

import copy
import math
import torch
from torch import Tensor, nn

from alambic.teachers.frozen import FrozenTeacher, state_fingerprint


def ema_momentum(step: int, total_steps: int, start: float, end: float | None) -> float:
    """Momentum after optimizer step ``step`` (1-based): constant, or cosine from ``start`` to ``end``."""
    if end is None or total_steps <= 1:
        return start
    progress = min(max((step - 1) / (total_steps - 1), 0.0), 1.0)
    return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for name, t in t_state.items():
        s = s_state[name]
        if t.dtype.is_floating_point:
            t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)
        else:
            t.copy_(s)


class EmaTeacher(FrozenTeacher):
    """A frozen copy of the student (eval mode, no gradients, taps as any frozen teacher) that
    :meth:`after_step` moves toward the student."""

    def __init__(self, student: nn.Module, momentum: float = 0.999, end_momentum: float | None = None,
                 total_steps: int = 0):
        super().__init__(copy.deepcopy(student))
        self.momentum, self.end_momentum, self.total_steps = momentum, end_momentum, total_steps

    def after_step(self, student: nn.Module, step: int) -> None:
        ema_update(self.model, student, ema_momentum(step, self.total_steps, self.momentum, self.end_momentum))

    def fingerprint(self) -> str:
        return state_fingerprint(self.model, "ema")  # changes every step: never cached

    def state_tensors(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self.model.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.model.load_state_dict(tensors)
