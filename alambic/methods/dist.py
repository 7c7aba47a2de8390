"""``dist``: distillation from a stronger teacher by matching prediction correlations (DIST)."""

from __future__ import annotations

from pydantic import Field

from alambic.data.batch import INPUT
from alambic.losses import dist_relations, masked_cross_entropy
from alambic.methods.base import Method, MethodConfig, MethodOutput
from alambic.registry import METHODS


class DISTConfig(MethodConfig):
    beta: float = Field(1.0, ge=0, description="inter-class (per-sample row) relation weight β (official: 1)")
    gamma: float = Field(1.0, ge=0, description="intra-class (per-class column) relation weight γ (official: 1)")
    temperature: float = Field(
        1.0, gt=0,
        description="softmax temperature τ; each term is multiplied by τ² (official ImageNet setting τ = 1; "
        "forks of the official code use τ = 4 with β = γ = 2 on CIFAR-100)",
    )
    ce_weight: float = Field(1.0, ge=0, description="weight of cross-entropy on the labelled samples (official: 1)")


@METHODS.register("dist")
class DIST(Method):
    """``ce_weight·CE(labels) + β·τ²·L_inter + γ·τ²·L_intra`` with Pearson-correlation relations.

    ``L_inter`` = 1 − mean over samples of the correlation between the student's and the teacher's class
    probabilities; ``L_intra`` = 1 − mean over classes of the correlation of each class's probabilities
    across the batch. Correlations ignore scale and shift, so a weaker student only has to keep the
    stronger teacher's relations, not its exact probabilities. Neither term reads a label, so unlabelled
    samples are taught too; the intra-class term is a batch statistic, so it depends on the batch size.
    """

    paper = (
        'Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher" (DIST), NeurIPS 2022, '
        "arXiv:2205.10536"
    )

    Config = DISTConfig
    needs_teacher = True
    uses_unlabeled = True

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        cfg = self.config
        s, t = student[INPUT].logits, teacher[INPUT].logits
        inter, intra = dist_relations(s, t, cfg.temperature)
        inter, intra = cfg.beta * inter, cfg.gamma * intra
        if cfg.ce_weight > 0 and batch.target is not None:
            ce = cfg.ce_weight * masked_cross_entropy(s, batch.target, all_labeled=batch.all_labeled)
        else:
            ce = s.sum() * 0.0
        terms = {"ce": ce.detach(), "inter": inter.detach(), "intra": intra.detach()}
        return MethodOutput(ce + inter + intra, terms, s)
