"""The batch every part of alambic speaks.

A :class:`Batch` carries named views of the same samples (one view, ``"input"``, for plain
classification; later ``"global_0"``, ``"weak"``/``"strong"``, modalities ...), the stable integer index
of each sample in its dataset (the key for teacher caches and per-sample stores), the class targets and a
mask saying which targets are real labels. Unlabelled samples carry ``IGNORE_INDEX`` as their target, so a
loss cannot read a label it was not given.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping

import torch
from torch import Tensor

IGNORE_INDEX = -100
"""Target value of an unlabelled sample (the ``ignore_index`` of ``torch.nn.functional.cross_entropy``)."""

INPUT = "input"
"""Name of the single view of a plain supervised batch."""


@dataclass(frozen=True)
class Batch:
    views: Mapping[str, Tensor]
    index: Tensor  # [B] int64 stable sample ids
    target: Tensor | None = None  # [B] int64 class ids, IGNORE_INDEX where unlabelled
    labeled: Tensor | None = None  # [B] bool; None: every target is a real label
    extras: Mapping[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @property
    def input(self) -> Tensor:
        return self.views[INPUT]

    @property
    def all_labeled(self) -> bool:
        """True when the loader promised every target is a real label (``labeled`` is None)."""
        return self.labeled is None and self.target is not None

    def labeled_mask(self) -> Tensor:
        """[B] bool: which samples have a real label (all of them when no mask was given)."""
        if self.labeled is not None:
            return self.labeled
        if self.target is None:
            return torch.zeros(len(self), dtype=torch.bool, device=self.index.device)
        return self.target != IGNORE_INDEX

    def select(self, rows: Tensor | slice) -> "Batch":
        """The sub-batch of ``rows`` (a slice, a bool mask or an index tensor) across every field."""
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return Batch(
            views={k: v[rows] for k, v in self.views.items()},
            index=self.index[rows],
            target=pick(self.target),
            labeled=pick(self.labeled),
            extras={k: v[rows] for k, v in self.extras.items()},
        )

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            views={k: v.to(device) for k, v in self.views.items()},
            index=self.index.to(device),
            target=move(self.target),
            labeled=move(self.labeled),
            extras={k: v.to(device) for k, v in self.extras.items()},
        )
