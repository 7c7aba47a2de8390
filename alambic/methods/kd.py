"""Output-level distillation: Hinton's KD and label-free KD."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from alambic.data.batch import INPUT
from alambic.losses import js_loss, kd_loss, masked_cross_entropy
from alambic.methods.base import Method, MethodConfig, MethodOutput
from alambic.registry import METHODS


class KDConfig(MethodConfig):
    temperature: float = Field(4.0, gt=0, description="softmax temperature T (4 in RepDistiller's CIFAR tables)")
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the KD term; 1 - alpha weighs the label term")


@METHODS.register("kd")
class KD(Method):
    """``(1 − α)·CE(labels) + α·T²·KL(p_T ‖ p_S)``; unlabelled samples contribute through the KD term.

    The KD term averages over every sample of the batch, the label term over its labelled samples, so in a
    label-scarce run the teacher teaches on the unlabelled rest (the transfer set of Hinton et al. §2).
    """

    paper = 'Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015, arXiv:1503.02531'

    Config = KDConfig
    needs_teacher = True
    uses_unlabeled = True

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        s, t = student[INPUT].logits, teacher[INPUT].logits
        a = self.config.alpha
        kd = a * kd_loss(s, t, self.config.temperature)
        ce = (1 - a) * masked_cross_entropy(s, batch.target, all_labeled=batch.all_labeled) if a < 1 else s.sum() * 0.0
        return MethodOutput(ce + kd, {"ce": ce.detach(), "kd": kd.detach()}, s)


class LabelFreeConfig(MethodConfig):
    temperature: float = Field(1.0, gt=0, description="SSLD uses the teacher's plain softmax (T = 1)")
    divergence: Literal["js", "kl"] = Field("js", description="SSLD reports JS above KL by ~0.2 points")


@METHODS.register("label_free_kd")
class LabelFreeKD(Method):
    """The student matches the teacher's soft predictions only: no label enters the loss.

    Because the loss never reads a target, every unlabelled sample is as useful as a labelled one, which is
    what lets SSLD mine millions of unlabelled images; permuting the labels changes nothing.
    """

    paper = (
        'Cui et al., "Beyond Self-Supervision: A Simple Yet Effective Network Distillation Alternative '
        'to Improve Backbones" (SSLD), 2021, arXiv:2103.05959'
    )

    Config = LabelFreeConfig
    needs_teacher = True
    uses_unlabeled = True

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        s, t = student[INPUT].logits, teacher[INPUT].logits
        fn = js_loss if self.config.divergence == "js" else kd_loss
        loss = fn(s, t, self.config.temperature)
        return MethodOutput(loss, {self.config.divergence: loss.detach()}, s)
