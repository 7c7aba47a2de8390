"""A teacher that is an exponential moving average of the student (mean teacher, DINO, BYOL).

After every ``every``-th optimizer step: ``θ_T ← m·θ_T + (1 − m)·θ_S`` (Tarvainen & Valpola, "Mean
teachers are better role models", 2017, arXiv:1703.01780, Eq. 1). Floating-point buffers (BatchNorm
running statistics) are averaged the same way; integer buffers (``num_batches_tracked``) are copied. The
teacher never receives gradients and runs in eval mode. ``m`` may follow a cosine schedule from
``momentum`` to ``end_momentum`` over the run (BYOL / DINO: 0.996 -> 1).

``every = 1`` averages after each step, as the mean teacher does. ``every = steps_per_epoch`` averages once
per epoch, as GeoDistill (Tong et al., "GeoDistill: Geometry-Guided Self-Distillation for Weakly
Supervised Cross-View Localization", 2025, arXiv:2507.10935) and MACIL-SD (Yu et al., 2022,
arXiv:2207.05500) do. Then the cosine schedule counts *updates*, not steps, so the first update still uses
``momentum`` and the last one ``end_momentum``. A schedule over steps would skip most of its values.

``batch_stats=True`` makes the teacher's BatchNorm layers normalise each batch with its own statistics, as
BYOL's target network does (Grill et al., 2020, arXiv:2006.07733; the official code applies the target
with ``is_training=True``), while everything else stays in eval mode and the running buffers are never
written. With the running statistics instead, a BYOL target whose projector has BatchNorm maps every
sample to nearly the same vector and the student collapses onto it (seen on digits: kNN 0.90 -> 0.85).
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from alambic.data.batch import Batch
from alambic.errors import AlambicError
from alambic.teachers.base import ModelOutput
from alambic.teachers.frozen import FrozenTeacher, model_outputs, on_model_device, state_fingerprint


def ema_momentum(step: int, total_steps: int, start: float, end: float | None) -> float:
    """Momentum after optimizer step ``step`` (1-based): constant, or cosine from ``start`` to ``end``."""
    if end is None or total_steps <= 1:
        return start
    progress = min(max((step - 1) / (total_steps - 1), 0.0), 1.0)
    return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2


def momentum_schedule(total_updates: int, start: float, end: float | None) -> np.ndarray:
    """The momentum of each of ``total_updates`` updates (index ``u - 1`` for update ``u``).

    The cosine runs from ``start`` (first update) to ``end`` (last update), as in BYOL (Grill et al.,
    "Bootstrap your own latent", 2020, arXiv:2006.07733, App. A: τ = 1 − (1 − τ_base)(cos(πk/K) + 1)/2).
    The values equal :func:`ema_momentum` with steps replaced by updates. The first and last values are set
    to ``start`` and ``end`` exactly, so ``end = 1`` makes the last update a true no-op. With
    ``end=None`` (or fewer than two updates) every value is ``start``.
    """
    n = max(int(total_updates), 0)
    if end is None or n <= 1:
        return np.full(n, start, dtype=np.float64)
    progress = np.arange(n, dtype=np.float64) / (n - 1)
    values = end - (end - start) * (np.cos(np.pi * progress) + 1) / 2
    values[0], values[-1] = start, end
    return values


def check_schedule(owner: str, momentum: float, end_momentum: float | None, every: int) -> None:
    """Raise an :class:`AlambicError` naming ``owner`` when a momentum or ``every`` is out of range."""
    for name, m in (("momentum", momentum), ("end_momentum", end_momentum)):
        if m is not None and not 0.0 <= m <= 1.0:
            raise AlambicError(f"{owner}: {name} must be in [0, 1], got {m}")
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
        raise AlambicError(f"{owner}: every must be a positive number of optimizer steps, got {every!r}")


def scheduled_momentum(schedule: np.ndarray, step: int, every: int, start: float) -> float | None:
    """The momentum of the update after optimizer step ``step``, or ``None`` if ``step`` is no update step.

    Update ``u = step // every`` happens after steps ``every, 2·every, ...``. Updates past the end of the
    schedule (``total_steps`` underestimated) keep its last value; an empty schedule (``total_steps``
    unknown) gives ``start``.
    """
    if step < every or step % every:
        return None
    if len(schedule) == 0:
        return float(start)
    return float(schedule[min(step // every, len(schedule)) - 1])


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for name, t in t_state.items():
        s = s_state[name]
        if t.dtype.is_floating_point:
            t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)
        else:
            t.copy_(s)


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model``'s BatchNorm layers normalise with the batch's own mean and variance and
    update no buffer (running stats, ``num_batches_tracked``); every other layer stays in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.track_running_stats for m in bns]
    model.eval()
    for m in bns:  # training + not tracking: F.batch_norm gets no running buffers, so it reads and writes none
        m.train()
        m.track_running_stats = False
    try:
        yield model
    finally:
        for m, track in zip(bns, saved):
            m.track_running_stats = track
        model.eval()


class EmaTeacher(FrozenTeacher):
    """A frozen copy of the student (eval mode, no gradients, taps as any frozen teacher) that
    :meth:`after_step` moves toward the student every ``every`` optimizer steps; with ``batch_stats`` its
    BatchNorm layers use each batch's statistics (BYOL's target network), see the module docstring."""

    def __init__(self, student: nn.Module, momentum: float = 0.999, end_momentum: float | None = None,
                 total_steps: int = 0, every: int = 1, batch_stats: bool = False):
        check_schedule(type(self).__name__, momentum, end_momentum, every)
        super().__init__(copy.deepcopy(student))
        self.momentum, self.end_momentum, self.total_steps, self.every = momentum, end_momentum, total_steps, every
        self.schedule = momentum_schedule(total_steps // every, momentum, end_momentum)
        self.batch_stats = batch_stats

    @torch.no_grad()
    def outputs(self, batch: Batch, views: Sequence[str]) -> dict[str, ModelOutput]:
        if not self.batch_stats:
            return super().outputs(batch, views)
        with batch_statistics(self.model):
            return model_outputs(self.model, on_model_device(batch, self.model), views, self._taps)

    def after_step(self, student: nn.Module, step: int) -> None:
        m = scheduled_momentum(self.schedule, step, self.every, self.momentum)
        if m is not None:
            ema_update(self.model, student, m)

    def fingerprint(self) -> str:
        return state_fingerprint(self.model, "ema")  # changes every step: never cached

    def state_tensors(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self.model.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.model.load_state_dict(tensors)
