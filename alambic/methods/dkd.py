"""``dkd``: Decoupled Knowledge Distillation, target-class and non-target-class KD weighted apart."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from alambic.data.batch import IGNORE_INDEX, INPUT
from alambic.losses import decoupled_kd_terms, masked_cross_entropy, standardize_logits
from alambic.methods.base import Method, MethodConfig, MethodOutput, SetupInfo
from alambic.registry import METHODS

WARMUP = "dkd_warmup"
"""Name of the per-step warm-up factor in ``ctx.values``."""


class DKDConfig(MethodConfig):
    alpha: float = Field(1.0, ge=0, description="TCKD weight α (mdistiller CFG.DKD.ALPHA = 1)")
    beta: float = Field(
        8.0, ge=0, description="NCKD weight β (mdistiller default 8; its ImageNet runs use α=0.5, β=0.5)"
    )
    temperature: float = Field(4.0, gt=0, description="softmax temperature T (mdistiller CFG.DKD.T = 4)")
    ce_weight: float = Field(1.0, ge=0, description="weight of cross-entropy on the labelled samples (CE_WEIGHT 1)")
    warmup_epochs: float = Field(
        20.0, ge=0,
        description="epochs over which the DKD term ramps linearly from 0 to full weight (mdistiller WARMUP 20); "
        "0 = full weight from the first step",
    )
    logit_standardization: bool = Field(
        False,
        description="z-score both sides' logits first (Sun et al., CVPR 2024, arXiv:2403.04512); the softmax "
        "then uses base_temperature",
    )
    base_temperature: float = Field(
        2.0, gt=0, description="temperature on standardised logits (official --base-temp 2); only with "
        "logit_standardization",
    )


def warmup_ramp(total_steps: int, steps_per_epoch: int, warmup_epochs: float) -> np.ndarray:
    """DKD's warm-up factor per optimizer step: ``min((step + 1) / (warmup_epochs · steps_per_epoch), 1)``.

    mdistiller multiplies the DKD loss by ``min(epoch / warmup, 1)`` with 1-based epochs, a staircase that
    is constant within an epoch. Here the same line is followed per step: it reaches the staircase's value
    ``(e + 1) / warmup`` on the last step of each (0-based) epoch ``e`` and 1 after ``warmup_epochs``.
    """
    steps = np.arange(1, total_steps + 1, dtype=np.float64)
    if warmup_epochs <= 0:
        return np.ones(total_steps)
    return np.minimum(steps / (warmup_epochs * steps_per_epoch), 1.0)


@METHODS.register("dkd")
class DKD(Method):
    """``ce_weight·CE(labels) + ramp·(α·TCKD + β·NCKD)``, the DKD term ramped in over ``warmup_epochs``.

    Classical KD is ``TCKD + (1 − p_t^T)·NCKD``: the knowledge in the non-target classes is damped exactly
    where the teacher is confident. DKD weighs the two parts independently (β ≫ α by default).

    DKD needs a target class for every sample. Unlabelled samples (target ``IGNORE_INDEX``) take the
    teacher's argmax as their target class for the DKD term, so the teacher still teaches on them; the
    cross-entropy term reads real labels only.
    """

    paper = 'Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022, arXiv:2203.08679'

    Config = DKDConfig
    needs_teacher = True
    uses_unlabeled = True

    def schedules(self, info: SetupInfo) -> dict[str, np.ndarray]:
        return {WARMUP: warmup_ramp(info.total_steps, info.steps_per_epoch, self.config.warmup_epochs)}

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        cfg = self.config
        s, t = student[INPUT].logits, teacher[INPUT].logits
        target = dkd_targets(batch.target, t, batch.all_labeled)
        s_kd, t_kd, temp = s, t, cfg.temperature
        if cfg.logit_standardization:
            s_kd, t_kd, temp = standardize_logits(s), standardize_logits(t), cfg.base_temperature
        tckd, nckd = decoupled_kd_terms(s_kd, t_kd, target, temp)
        ramp = float(ctx.values.get(WARMUP, 1.0))  # a caller without the loop's schedules gets full weight
        tckd, nckd = ramp * cfg.alpha * tckd, ramp * cfg.beta * nckd
        if cfg.ce_weight > 0 and batch.target is not None:
            ce = cfg.ce_weight * masked_cross_entropy(s, batch.target, all_labeled=batch.all_labeled)
        else:
            ce = s.sum() * 0.0
        terms = {"ce": ce.detach(), "tckd": tckd.detach(), "nckd": nckd.detach()}
        return MethodOutput(ce + tckd + nckd, terms, s)


def dkd_targets(target: torch.Tensor | None, teacher_logits: torch.Tensor, all_labeled: bool) -> torch.Tensor:
    """The class DKD splits on per sample: the label, or the teacher's argmax where there is none. [B]."""
    if target is None:
        return teacher_logits.detach().argmax(-1)
    if all_labeled:
        return target
    return torch.where(target == IGNORE_INDEX, teacher_logits.detach().argmax(-1), target)
