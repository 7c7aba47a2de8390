"""``pskd``: the model's own predictions from the previous epoch, mixed into its targets (PS-KD).

The teacher is a per-sample store of past predictions: row ``i`` holds the softmax the student gave
sample ``i`` the last time it was trained on it. Targets move progressively from the one-hot label
towards that store as training advances, so the model is taught by its past self without a second
network.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from alambic.data.batch import IGNORE_INDEX, INPUT
from alambic.errors import ShapeMismatchError
from alambic.methods.base import Method, MethodConfig, MethodOutput
from alambic.registry import METHODS

ALPHA = "alpha_t"


class PSKDConfig(MethodConfig):
    alpha_T: float = Field(
        0.8, ge=0, le=1,
        description="α_T, the weight of the past predictions at the last epoch (0.8 in Kim et al. §4)",
    )


def pskd_alpha(epoch: int, epochs: int, alpha_T: float) -> float:
    """``α_t = α_T · (t + 1) / E`` (Kim et al. Eq. 5): linear in the epoch ``t`` (0-based), α_T at the last."""
    return alpha_T * (epoch + 1) / epochs


def pskd_targets(onehot: Tensor, past: Tensor, alpha: float) -> Tensor:
    """``(1 − α_t)·onehot(y) + α_t·P_past`` (Kim et al. Eq. 4): rows that sum to 1 when both inputs do.

    Args: onehot [B, C]; past [B, C] (the stored predictions, constants); alpha in [0, 1]. Returns [B, C].
    """
    if onehot.shape != past.shape:
        raise ShapeMismatchError(
            f"pskd_targets: one-hot labels {tuple(onehot.shape)} and past predictions {tuple(past.shape)} shapes differ"
        )
    return (1 - alpha) * onehot + alpha * past.detach()


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """``mean_b −Σ_c target_bc · log softmax(logits)_bc``: cross-entropy against soft targets.

    Args: logits [B, C]; targets [B, C] rows of a distribution, treated as constants. Returns: scalar.
    """
    if logits.shape != targets.shape:
        raise ShapeMismatchError(
            f"soft_cross_entropy: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} shapes differ"
        )
    return -(targets.detach() * F.log_softmax(logits, dim=-1)).sum(-1).mean()


@METHODS.register("pskd")
class PSKD(Method):
    """Soft-target cross-entropy against ``(1 − α_t)·onehot(y) + α_t·P[i]``, P[i] the last prediction for i.

    ``P`` is a per-sample buffer [num_samples, C] (checkpointed with the method). In the first epoch the
    targets are exactly one-hot, as in the authors' code (their store is filled with one-hot labels before
    the first targets are formed). After computing the loss, the store rows of the batch are overwritten
    with the detached softmax of this very forward; rows of other samples are left alone. ``α_t`` is a
    per-step schedule (constant within an epoch). Unlabelled samples have no label to mix with, so the
    method trains on labelled samples only.
    """

    distributed_safe = False  # its per-sample store: not reduced across ranks yet

    paper = (
        'Kim et al., "Self-Knowledge Distillation with Progressive Refinement of Targets" (PS-KD), '
        "ICCV 2021, arXiv:2006.12000"
    )

    Config = PSKDConfig
    needs_teacher = False
    uses_unlabeled = False

    def setup(self, student, teacher, info) -> None:
        logits = student[INPUT].logits
        n, c = info.num_samples, info.num_classes
        self.register_buffer("store", torch.zeros(n, c, dtype=logits.dtype, device=logits.device))
        self.register_buffer("seen", torch.zeros(n, dtype=torch.bool, device=logits.device))

    def schedules(self, info) -> dict[str, np.ndarray]:
        per_epoch = [pskd_alpha(e, info.epochs, self.config.alpha_T) for e in range(info.epochs)]
        return {ALPHA: np.repeat(np.asarray(per_epoch, dtype=np.float64), info.steps_per_epoch)[: info.total_steps]}

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        logits = student[INPUT].logits
        alpha = ctx.values.get(ALPHA)
        if alpha is None:  # called outside the Trainer: derive it from where training stands
            alpha = pskd_alpha(ctx.epoch, ctx.total_steps // ctx.steps_per_epoch, self.config.alpha_T)
        index, target = batch.index, batch.target
        if not batch.all_labeled:  # only labelled rows have a label to mix with (and a store row to update)
            keep = batch.labeled_mask() & (target != IGNORE_INDEX)
            logits, index, target = logits[keep], index[keep], target[keep]
        onehot = F.one_hot(target, logits.shape[-1]).to(logits.dtype)
        past = onehot  # epoch 0: exactly one-hot targets
        if ctx.epoch > 0:  # a row never trained on yet (none, in a plain loop) keeps its one-hot label
            past = torch.where(self.seen[index].unsqueeze(-1), self.store[index].to(logits.dtype), onehot)
        loss = soft_cross_entropy(logits, pskd_targets(onehot, past, alpha)) if len(target) else logits.sum() * 0.0
        with torch.no_grad():
            self.store[index] = F.softmax(logits.detach(), dim=-1).to(self.store.dtype)
            self.seen[index] = True
        return MethodOutput(loss, {"soft_ce": loss.detach()}, student[INPUT].logits)
