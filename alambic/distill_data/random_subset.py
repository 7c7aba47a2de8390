"""``random``: a class-balanced random subset of the real training split, the baseline every distilled set
must beat at the same size.

Dataset-distillation papers report it as "Random" at each images-per-class budget (Zhao & Bilen, "Dataset
Condensation with Distribution Matching", WACV 2023, arXiv:2110.04181, Table 1; Lee et al., KRR-ST, ICLR
2024, arXiv:2310.06511, Table 1).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from alambic.errors import AlambicError

__all__ = ["check_per_class", "class_balanced_subset"]


def check_per_class(labels: Tensor, per_class: int, num_classes: int, what: str) -> None:
    """One line when a class of ``labels`` holds fewer than ``per_class`` samples (or none)."""
    counts = torch.bincount(labels.cpu(), minlength=num_classes)
    short = [c for c in range(num_classes) if int(counts[c]) < per_class]
    if short:
        c = short[0]
        raise AlambicError(f"{what}: images_per_class {per_class}, but class {c} has {int(counts[c])} training "
                           f"image(s) ({len(short)} class(es) short): lower images_per_class")


def class_balanced_subset(labels: Tensor, per_class: int, seed: int, num_classes: int | None = None) -> Tensor:
    """Row indices: ``per_class`` rows of every class, drawn without replacement; grouped by class (class 0
    first), in drawn order within a class. Depends only on (labels, per_class, seed).

    Args:
        labels: [N] int64 class ids.
        per_class: rows per class (>= 1).
        seed: numpy ``default_rng([seed, 0])`` permutes each class's rows.
    Returns: [num_classes · per_class] int64.
    """
    if per_class < 1:
        raise AlambicError(f"class_balanced_subset: per_class must be >= 1, got {per_class}")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    check_per_class(labels, per_class, num_classes, "random subset")
    y = labels.cpu().numpy()
    rng = np.random.default_rng([int(seed) % 2**64, 0])
    rows = [rng.permutation(np.flatnonzero(y == c))[:per_class] for c in range(num_classes)]
    return torch.from_numpy(np.concatenate(rows).astype(np.int64))


def _register() -> None:
    from alambic.distill_data.context import Context, Selection
    from alambic.distill_data.recipe import DATA_DISTILLERS
    from alambic.registry import NoOptions

    @DATA_DISTILLERS.register("random", config=NoOptions,
                              description="a class-balanced random subset of the real training images")
    def random_subset(ctx: Context, options: NoOptions) -> Selection:
        return Selection(ctx, class_balanced_subset(ctx.y, ctx.per_class, ctx.seed, ctx.num_classes), "random")


_register()
