"""Shared parts of the self-supervised methods: the cross-view plan and per-step temperature schedules.

The plan follows DINO's multi-crop rule (Caron et al., 2021, arXiv:2104.14294, Alg. 1 and §3.1): the
teacher sees the global views only, the student every view, and each teacher view is paired with every
student view except itself. A loader without a ``global`` group but with exactly two other views (a
``weak``/``strong`` pair, two views of one group) treats both as global, which is BYOL's symmetric setting.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from alambic.data.batch import INPUT
from alambic.errors import AlambicError


def is_global(name: str) -> bool:
    return name == "global" or name.startswith("global_")


def cross_view_plan(names: Sequence[str], method: str, masked: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(student views, teacher views) from the loader's view names.

    Student views start with the global views in the teacher's order, so student view i and teacher view
    i are the same crop (the pair the losses skip). With ``masked`` the student sees the masked copies
    ``masked_<global>`` of the global views instead (iBOT), the teacher the unmasked ones.
    """
    plain = [n for n in names if n != INPUT and not n.startswith(("masked_", "teacher_masked_"))]
    globals_ = [n for n in plain if is_global(n)]
    if not globals_:
        if len(plain) == 2:
            globals_ = plain
        else:
            raise AlambicError(
                f"method '{method}' needs at least two augmented views: add a `views:` section with a `global` "
                f"group of count >= 2 (and optional `local` crops); the data gives {list(names)}"
            )
    others = [n for n in plain if n not in globals_]
    if len(globals_) + len(others) < 2:
        raise AlambicError(f"method '{method}' needs at least two views, the data gives {list(names)}: "
                           f"set views.groups.global.count to 2")
    if masked:
        missing = [f"masked_{g}" for g in globals_ if f"masked_{g}" not in names]
        if missing:
            raise AlambicError(f"method '{method}' needs masked global views {missing}: add views.mask with "
                               f"views: [global]")
        return tuple(f"masked_{g}" for g in globals_) + tuple(others), tuple(globals_)
    return tuple(globals_) + tuple(others), tuple(globals_)


def one_view(names: Sequence[str], configured: str | None, method: str) -> str:
    """The single view a method trains on: ``configured``, else the first augmented view, else the input."""
    view = configured or next((n for n in names if n != INPUT and not n.startswith(("masked_", "teacher_"))), INPUT)
    if view not in names:
        raise AlambicError(f"{method}: view '{view}' is not produced by the data (views: {list(names)})")
    return view


def warmup_then_constant(total_steps: int, steps_per_epoch: int, start: float, end: float,
                         warmup_epochs: float) -> np.ndarray:
    """Per-step values: linear from ``start`` to ``end`` over ``warmup_epochs``, then ``end``.

    DINO's teacher temperature (0.04 -> 0.07 over the first 30 epochs in the boosted recipe; constant 0.04
    by default). Computed per optimizer step, so it is exact under ``train.steps`` and on resume.
    """
    steps = np.arange(total_steps, dtype=np.float64)
    warm = warmup_epochs * steps_per_epoch
    if warm <= 0:
        return np.full(total_steps, end)
    return np.where(steps < warm, start + (end - start) * steps / warm, end)
