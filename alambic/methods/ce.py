"""``ce``: the student alone on its labels, the baseline every report shows."""

from __future__ import annotations

from pydantic import Field

from alambic.data.batch import INPUT
from alambic.losses import masked_cross_entropy
from alambic.methods.base import Method, MethodConfig, MethodOutput
from alambic.registry import METHODS


class CEConfig(MethodConfig):
    label_smoothing: float = Field(0.0, ge=0, lt=1)


@METHODS.register("ce")
class CrossEntropy(Method):
    """Cross-entropy on the labelled samples only; unlabelled samples are dropped from its training set."""

    paper = "baseline: cross-entropy on the labelled samples, no teacher"

    Config = CEConfig

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        logits = student[INPUT].logits
        ce = masked_cross_entropy(logits, batch.target, self.config.label_smoothing, batch.all_labeled)
        return MethodOutput(ce, {"ce": ce.detach()}, logits)
