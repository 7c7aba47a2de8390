"""Per-step schedules computed up front (a resumed run reads the same arrays; nothing keeps a clock)."""

from __future__ import annotations

import math

import numpy as np


def lr_schedule(
    base_lr: float,
    total_steps: int,
    steps_per_epoch: int,
    kind: str = "cosine",
    warmup_steps: int = 0,
    step_epochs: list[int] | None = None,
    gamma: float = 0.1,
) -> np.ndarray:
    """Learning rate for each optimizer step ``0 .. total_steps-1``.

    Linear warm-up from ``base_lr / warmup_steps`` to ``base_lr`` over ``warmup_steps``, then ``constant``,
    ``cosine`` (half-cosine from ``base_lr`` to 0 over the remaining steps; Loshchilov & Hutter, SGDR,
    2017, arXiv:1608.03983, without restarts) or ``step`` (multiply by ``gamma`` at each epoch in
    ``step_epochs``).
    """
    steps = np.arange(total_steps, dtype=np.float64)
    if kind == "constant":
        lr = np.full(total_steps, base_lr)
    elif kind == "cosine":
        span = max(total_steps - warmup_steps, 1)
        progress = np.clip((steps - warmup_steps) / span, 0.0, 1.0)
        lr = base_lr * 0.5 * (1.0 + np.cos(math.pi * progress))
    elif kind == "step":
        epochs = steps // max(steps_per_epoch, 1)
        drops = sum((epochs >= e).astype(np.float64) for e in (step_epochs or []))
        lr = base_lr * gamma ** np.asarray(drops)
    else:
        raise ValueError(f"unknown schedule '{kind}'")
    if warmup_steps > 0:
        warm = steps < warmup_steps
        lr = np.where(warm, base_lr * (steps + 1) / warmup_steps, lr)
    return lr
