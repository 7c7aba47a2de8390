"""What every data-distillation method receives, and the small contract it fulfils.

A method is registered in :data:`~alambic.distill_data.recipe.DATA_DISTILLERS` as a function
``(Context, options) -> Distiller``. A selection (random, herding, k-center) has no steps; an optimised
set (DM, KRR-ST) runs ``total_steps`` outer steps, and its whole state (tensors + JSON) can be written at
any step and loaded back, so a killed distillation resumes where its last checkpoint stands and ends with
the same set as an uninterrupted one (every draw is seeded by the step: :mod:`alambic.distill_data.networks`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class Context:
    """The real data and the networks a method may use.

    ``x`` [N, C, H, W] and ``y`` [N]: the labelled real training split (never validation or test).
    ``teacher(x) -> [B, k]``: the frozen teacher's representation (eval mode, no gradient), or None.
    ``network(out_dim)``: a fresh network of the recipe's ``network`` architecture whose output has
    ``out_dim`` units (its weights come from torch's global RNG: seed it, see ``networks.fresh``).
    ``feature``: the tap of ``network``'s representation (the input of its classifier; cnn: ``pool``), read
    by a method whose own ``feature`` option is None.
    """

    x: Tensor
    y: Tensor
    ids: Tensor  # [N] the stable sample ids of x (rows of the raw data)
    num_classes: int
    per_class: int
    seed: int
    teacher: Callable[[Tensor], Tensor] | None
    network: Callable[[int], nn.Module]
    device: torch.device
    feature: str | None = None
    say: Callable[[str], None] = lambda _msg: None

    @property
    def size(self) -> int:
        return self.num_classes * self.per_class


class Distiller:
    """Base: ``total_steps`` outer steps of ``step``, checkpointable through ``state``/``load_state``, then
    ``result()`` -> (images [m, ...], labels [m] or None, targets [m, k] or None, extra metadata)."""

    total_steps: int = 0

    def step(self, step: int) -> dict[str, float]:
        return {}

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {}, {}

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        return None

    def result(self) -> tuple[Tensor, Tensor | None, Tensor | None, dict[str, Any]]:
        raise NotImplementedError


class Selection(Distiller):
    """Real training images picked by row: labels are theirs; targets are left to the driver (the teacher's
    representations of the picked images)."""

    def __init__(self, ctx: Context, rows: Tensor, rule: str):
        self.ctx, self.rows, self.rule = ctx, rows, rule

    def result(self):
        return (self.ctx.x[self.rows].clone(), self.ctx.y[self.rows].clone(), None,
                {"selection": self.rule, "sample_ids": self.ctx.ids[self.rows].tolist()})
