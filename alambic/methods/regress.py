"""``regress``: a linear head on the student's representation regresses a frozen target representation.

KRR-ST's pre-training step (Lee et al., "Self-Supervised Dataset Distillation for Transfer Learning", ICLR
2024, arXiv:2310.06511, §3; official ``algorithms/pretrain_krr_st.py``): a fresh network with a linear
output layer is trained on ``MSE(model(X_s), Y_s)`` over the distilled set, the output layer is then
dropped and the representation probed or fine-tuned. With ``teacher: {distilled: DIR}`` the targets are the
set's stored ``Y_s``; with a frozen network teacher (``teacher: {run: DIR}``, ``teacher_feature: pool``)
they are that network's representation of each batch, which is plain feature distillation from a frozen
self-supervised teacher (the full-data reference a distilled set is measured against).
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import nn

from alambic.errors import ShapeMismatchError
from alambic.methods._ssl import one_view
from alambic.methods.base import Method, MethodConfig, MethodOutput, ReadsStudentFeature
from alambic.registry import METHODS


class RegressConfig(MethodConfig):
    feature: str | None = Field(None, description="tap path of the student's representation; None = the zoo default")
    teacher_feature: str | None = Field(None, description="tap path of the teacher's target; None = the teacher's "
                                        "output (a distilled set's stored targets)")
    view: str | None = Field(None, description="the view both sides see; None = the first augmented view, else the "
                                               "plain input")


@METHODS.register("regress")
class Regress(ReadsStudentFeature, Method):
    """``mean_(i, j) (W·f_s(x_i) + b − t(x_i))_j²``: regress a frozen target representation, labels unused.

    The head ``W, b`` is owned by the method (thrown away after training), so the deployed student is the
    backbone alone and the run is evaluated by probing its representation, like a self-supervised run.
    """

    paper = ('Lee et al., "Self-Supervised Dataset Distillation for Transfer Learning" (KRR-ST), ICLR 2024, '
             'arXiv:2310.06511, §3 (pre-training on the distilled set)')

    Config = RegressConfig
    needs_teacher = True
    uses_unlabeled = True
    self_supervised = True

    def __init__(self, config: RegressConfig | None = None):
        super().__init__(config)
        self.head: nn.Module | None = None

    def use_views(self, names) -> None:
        self.student_views = self.teacher_views = (one_view(names, self.config.view, "regress"),)

    def teacher_taps(self) -> list[str]:
        return [self.config.teacher_feature] if self.config.teacher_feature else []

    def _target(self, out):
        path = self.config.teacher_feature
        target = out.features[path] if path else out.logits
        return target.flatten(1)

    def setup(self, student, teacher, info) -> None:
        s = student[self.student_views[0]].features[self.feature].flatten(1)
        self.head = nn.Linear(s.shape[1], self._target(teacher[self.teacher_views[0]]).shape[1])

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        v = self.student_views[0]
        pred = self.head(student[v].features[self.feature].flatten(1))
        target = self._target(teacher[self.teacher_views[0]]).detach()
        if target.shape != pred.shape:
            raise ShapeMismatchError(f"regress: the teacher's target is {tuple(target.shape)}, the head predicts "
                                     f"{tuple(pred.shape)}")
        loss = F.mse_loss(pred, target.to(pred.dtype))
        return MethodOutput(loss, {"regress": loss.detach()}, None)
