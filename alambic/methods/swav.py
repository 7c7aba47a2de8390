"""``swav``: Sinkhorn-balanced prototype codes with swapped prediction across views (SwAV; DISCOVR's hard codes)."""

from __future__ import annotations

import torch
from pydantic import Field

from alambic.losses import code_cross_entropy, sinkhorn
from alambic.methods._ssl import cross_view_plan
from alambic.methods.base import Method, MethodConfig, MethodOutput
from alambic.models.heads import DINOHead, EmbeddingNet, feature_path, tap_dim
from alambic.registry import METHODS


class SwAVConfig(MethodConfig):
    prototypes: int = Field(64, ge=2, description="K, the number of prototypes (SwAV: 3000; DISCOVR: 3000)")
    hidden: int = Field(256, ge=1, description="hidden width of the projection MLP (SwAV: 2048)")
    bottleneck: int = Field(64, ge=1, description="width of the L2-normalised embedding (SwAV: 128)")
    head_layers: int = Field(2, ge=1, description="Linear layers of the projection MLP (SwAV: 2)")
    head_batchnorm: bool = Field(True, description="BatchNorm after the projection's hidden layer (SwAV: yes)")
    feature: str | None = Field(None, description="tap path of the backbone's representation; None = the zoo default")
    temperature: float = Field(0.1, gt=0, description="τ of the softmax over prototype scores (SwAV, DISCOVR: 0.1)")
    epsilon: float = Field(0.05, gt=0, description="ε of Sinkhorn-Knopp (SwAV: 0.05)")
    sinkhorn_iterations: int = Field(3, ge=1, description="Sinkhorn iterations (SwAV: 3; DISCOVR: 10)")
    hard: bool = Field(False, description="train on the arg-max code (DISCOVR) instead of the soft code (SwAV)")


@METHODS.register("swav")
class SwAV(Method):
    """Each view predicts, from its prototype scores, the balanced code of another (global) view.

    The network is the backbone, a projection MLP, L2 normalisation and K unit-norm prototypes (the
    :class:`~alambic.models.heads.DINOHead` is exactly that, its output the cosines ``zᵀc_k``). The codes
    of each global view come from :func:`~alambic.losses.sinkhorn` on the teacher's scores when a teacher is
    given (DISCOVR computes them on an EMA teacher's outputs: ``teacher: {ema: ...}``) and on the
    student's own detached scores otherwise (SwAV, no teacher). Every student view ``v`` then pays
    ``−Σ_k q_ik log softmax(s_v/τ)_k`` for every global view ``i ≠ v`` (:func:`~alambic.losses.code_cross_entropy`;
    with two views this is :func:`~alambic.losses.swapped_prediction_loss`), averaged over pairs. Sinkhorn's
    equipartition constraint, not a center, keeps the batch from collapsing onto one prototype; the
    monitor ``used_prototypes`` counts the prototypes that are some sample's arg-max.
    """

    distributed_safe = False  # Sinkhorn over the local batch (SwAV all-reduces its sums): not reduced across ranks yet

    paper = ('Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments" '
             '(SwAV), 2020, arXiv:2006.09882, Eq. (1)-(3); hard codes: DISCOVR (Divyanshu et al., 2025)')

    Config = SwAVConfig
    needs_teacher = False
    uses_unlabeled = True
    self_supervised = True

    def use_views(self, names) -> None:
        self.student_views, self.teacher_views = cross_view_plan(names, "swav")

    def wrap_student(self, student, example, arch):
        cfg = self.config
        path = feature_path(arch, cfg.feature)
        head = DINOHead(tap_dim(student, path, example), cfg.prototypes, cfg.hidden, cfg.bottleneck, cfg.head_layers,
                        cfg.head_batchnorm)
        return EmbeddingNet(student, path, head)

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        cfg = self.config
        source = teacher if teacher is not None else student
        codes = {v: sinkhorn(source[v].logits.detach(), cfg.epsilon, cfg.sinkhorn_iterations) for v in self.teacher_views}
        losses = []
        for i, t in enumerate(self.teacher_views):
            for j, v in enumerate(self.student_views):
                if j == i:
                    continue
                losses.append(code_cross_entropy(student[v].logits, codes[t], cfg.temperature, cfg.hard))
        loss = torch.stack(losses).mean()
        with torch.no_grad():
            used = torch.unique(student[self.student_views[0]].logits.argmax(-1)).numel()
        return MethodOutput(loss, {"swav": loss.detach()}, None,
                            {"used_prototypes": torch.tensor(float(used))})
