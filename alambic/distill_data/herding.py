"""``herding`` and ``kcenter``: real images picked per class in a frozen teacher's feature space.

Herding (Welling, "Herding Dynamical Weights to Learn", ICML 2009; in the greedy mean-matching form of
Rebuffi et al., "iCaRL: Incremental Classifier and Representation Learning", CVPR 2017, arXiv:1611.07725,
Algorithm 4): with class mean ``μ = mean_i φ(x_i)``, the k-th pick is

    p_k = argmin_i ‖ μ − (φ(x_i) + Σ_{j<k} φ(x_{p_j})) / k ‖,

never a row already picked, so every prefix of the order is the subset whose mean tracks μ best, greedily.
K-center (the greedy core-set of Sener & Savarese, "Active Learning for Convolutional Neural Networks: A
Core-Set Approach", ICLR 2018, arXiv:1708.00489, Algorithm 1): start from the row nearest the class mean,
then repeatedly add the row farthest from every row picked so far. Both are deterministic: ties go to the
lower row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from alambic.distill_data.random_subset import check_per_class
from alambic.errors import AlambicError

__all__ = ["herding_order", "kcenter_order", "per_class_selection"]


def _check(features: Tensor, n: int, what: str) -> None:
    if features.dim() != 2 or features.shape[0] == 0:
        raise AlambicError(f"{what}: features must be [N, D] with N >= 1, got {tuple(features.shape)}")
    if not 1 <= n <= features.shape[0]:
        raise AlambicError(f"{what}: cannot pick {n} of {features.shape[0]} rows")


def herding_order(features: Tensor, n: int) -> Tensor:
    """[n] int64 rows of ``features`` [N, D] in herding order (see the module docstring); float64 inside."""
    _check(features, n, "herding")
    phi = features.detach().double()
    mu = phi.mean(0)
    picked: list[int] = []
    running = torch.zeros_like(mu)
    available = torch.ones(phi.shape[0], dtype=torch.bool)
    for k in range(1, n + 1):
        dist = (mu - (running + phi) / k).norm(dim=1)
        dist[~available] = float("inf")
        i = int(torch.argmin(dist))  # first minimum: ties go to the lower row
        picked.append(i)
        available[i] = False
        running += phi[i]
    return torch.tensor(picked, dtype=torch.int64)


def kcenter_order(features: Tensor, n: int) -> Tensor:
    """[n] int64 rows of ``features`` [N, D] in greedy k-center order, from the row nearest the mean."""
    _check(features, n, "kcenter")
    phi = features.detach().double()
    first = int(torch.argmin((phi - phi.mean(0)).norm(dim=1)))
    picked = [first]
    nearest = (phi - phi[first]).norm(dim=1)
    for _ in range(n - 1):
        i = int(torch.argmax(nearest))
        picked.append(i)
        nearest = torch.minimum(nearest, (phi - phi[i]).norm(dim=1))
    return torch.tensor(picked, dtype=torch.int64)


def per_class_selection(features: Tensor, labels: Tensor, per_class: int, rule: str = "herding",
                        normalize: bool = True, num_classes: int | None = None) -> Tensor:
    """Row indices of the whole split: ``per_class`` rows of every class picked by ``rule`` (``herding`` or
    ``kcenter``) among that class's rows, grouped by class. ``normalize``: L2-normalise the features first,
    as iCaRL does."""
    if features.shape[0] != labels.shape[0]:
        raise AlambicError(f"{rule}: {features.shape[0]} feature rows but {labels.shape[0]} labels")
    order = {"herding": herding_order, "kcenter": kcenter_order}[rule]
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    check_per_class(labels, per_class, num_classes, rule)
    phi = F.normalize(features.double(), dim=1) if normalize else features
    out = []
    for c in range(num_classes):
        rows = torch.nonzero(labels == c).flatten()
        out.append(rows[order(phi[rows], per_class)])
    return torch.cat(out)


def _register() -> None:
    from pydantic import BaseModel, ConfigDict, Field

    from alambic.distill_data.context import Context, Selection
    from alambic.distill_data.recipe import DATA_DISTILLERS

    class SelectionConfig(BaseModel):
        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
        normalize: bool = Field(True, description="L2-normalise the teacher features first (iCaRL)")

    def make(rule: str):
        def select(ctx: Context, options: SelectionConfig) -> Selection:
            features = ctx.teacher(ctx.x)
            rows = per_class_selection(features, ctx.y, ctx.per_class, rule, options.normalize, ctx.num_classes)
            return Selection(ctx, rows, rule)
        return select

    DATA_DISTILLERS.register("herding", config=SelectionConfig, needs_teacher=True,
                             description="per class, the real images whose running mean tracks the class mean "
                                         "of the teacher's features (greedy herding, iCaRL)")(make("herding"))
    DATA_DISTILLERS.register("kcenter", config=SelectionConfig, needs_teacher=True,
                             description="per class, greedy k-center (farthest-point) real images in the "
                                         "teacher's feature space")(make("kcenter"))


_register()
