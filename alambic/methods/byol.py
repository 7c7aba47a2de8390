"""``byol``: latent prediction of an EMA teacher's projection across views (BYOL; JEPA-style), no labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from alambic.losses import byol_loss
from alambic.methods._ssl import cross_view_plan
from alambic.methods.base import Method, MethodConfig, MethodOutput
from alambic.models.heads import EmbeddingNet, MLPHead, feature_path, tap_dim
from alambic.registry import METHODS
from alambic.teachers.ema import EmaTeacher


class BYOLConfig(MethodConfig):
    projection_dim: int = Field(64, ge=1, description="output of the projector and the predictor (paper: 256)")
    hidden: int = Field(256, ge=1, description="hidden width of the projector (paper: 4096)")
    predictor_hidden: int = Field(256, ge=1, description="hidden width of the predictor (paper: 4096)")
    feature: str | None = Field(None, description="tap path of the backbone's representation; None = the zoo default")
    target_batch_stats: bool = Field(True, description="the EMA target's BatchNorm uses each batch's statistics, as "
                                                       "BYOL's target network does (False: its running statistics)")


@METHODS.register("byol")
class BYOL(Method):
    """``mean over pairs (i, v≠i) of 2 − 2·cos(q(z_v), sg(z'_i))``: the student predicts the teacher's projection.

    Student: backbone + projector (an :class:`~alambic.models.heads.MLPHead`, inside the
    :class:`~alambic.models.heads.EmbeddingNet` the EMA teacher copies) and a predictor ``q`` that only
    the student has (owned by the method, so the teacher never gets one). Teacher: ``teacher: {ema:
    {momentum: 0.99, end_momentum: 1.0}}``, a stop-gradient target. With two views the loss is BYOL's
    symmetrised ``L + L̃`` (Eq. 2), here averaged over the two directions; with more views every
    teacher global view is paired with every other student view, as in DINO's multi-crop. JEPA's
    latent-prediction objective (an online encoder with a predictor against a stop-gradient/EMA target,
    Assran et al. 2023, arXiv:2301.08243) is this same loss; the seed paper on JEPA's implicit bias
    (Littwin et al. 2024, arXiv:2407.03475) asks only that the target branch gets no gradient, which a test
    checks. The monitor ``z_std`` is the per-dimension std of the normalised predictions (collapse -> 0).
    The target normalises its BatchNorm layers with each batch's statistics (``target_batch_stats``, the
    paper's target network; :class:`~alambic.teachers.ema.EmaTeacher` ``batch_stats``): with its running
    statistics the target's projections of a batch nearly coincide and the student collapses onto them.
    """

    paper = 'Grill et al., "Bootstrap your own latent" (BYOL), 2020, arXiv:2006.07733, Eq. (2)'

    Config = BYOLConfig
    needs_teacher = True
    uses_unlabeled = True
    self_supervised = True

    def __init__(self, config: BYOLConfig | None = None):
        super().__init__(config)
        cfg = self.config
        self.predictor = MLPHead(cfg.projection_dim, cfg.projection_dim, cfg.predictor_hidden)

    def use_views(self, names) -> None:
        self.student_views, self.teacher_views = cross_view_plan(names, "byol")

    def wrap_student(self, student, example, arch):
        cfg = self.config
        path = feature_path(arch, cfg.feature)
        return EmbeddingNet(student, path, MLPHead(tap_dim(student, path, example), cfg.projection_dim, cfg.hidden))

    def setup(self, student, teacher, info) -> None:
        if self.config.target_batch_stats and isinstance(info.teacher, EmaTeacher):
            info.teacher.batch_stats = True

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        preds = {v: self.predictor(student[v].logits) for v in self.student_views}
        losses = [byol_loss(preds[v], teacher[t].logits) for i, t in enumerate(self.teacher_views)
                  for j, v in enumerate(self.student_views) if j != i]
        loss = torch.stack(losses).mean()
        with torch.no_grad():
            z_std = F.normalize(preds[self.student_views[0]], dim=-1).std(0).mean()
        return MethodOutput(loss, {"byol": loss.detach()}, None, {"z_std": z_std})
