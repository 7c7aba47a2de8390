"""``instance_nce``: instance-level cross-modal InfoNCE, the student's embedding against its paired teacher
embedding, the batch's other teacher embeddings as negatives."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from alambic.losses import info_nce_loss
from alambic.methods._instance import InstanceConfig, InstanceMethod
from alambic.methods.base import MethodOutput
from alambic.registry import METHODS


class InstanceNCEConfig(InstanceConfig):
    temperature: float = Field(0.1, gt=0, description="τ (the InfoNCE baseline of Breezelled/COMODO: 0.1)")
    symmetric: bool = Field(False, description="add the teacher-to-student direction (CLIP's symmetric loss), "
                                               "averaged with the student-to-teacher one")


@METHODS.register("instance_nce")
class InstanceNCE(InstanceMethod):
    """``−mean_i log softmax_j(ẑ_s,i · z_t,j / τ)[i]``: each student row must pick its own sample's teacher embedding.

    van den Oord, Li, Vinyals, "Representation Learning with Contrastive Predictive Coding", 2018,
    arXiv:1807.03748, Eq. (4) (:func:`~alambic.losses.info_nce_loss`), between modalities at the level of the
    instance: the positive of student row ``i`` is the teacher embedding of the same sample, its negatives
    the teacher embeddings of the batch's other samples; both sides are L2-normalised (cosines), τ = 0.1 and
    one direction, as the InfoNCE baseline of Breezelled/COMODO (``comodo/loss.py::info_nce``). Unlike
    COMODO it asks for the pairing only, not for the teacher's similarities between samples: two different
    samples the teacher finds alike are pushed apart all the same. The teacher side is a constant.
    ``symmetric: true`` adds the other direction (each teacher row picks its student row), as CLIP does.
    """

    paper = ('van den Oord et al., "Representation Learning with Contrastive Predictive Coding", 2018, '
             "arXiv:1807.03748, as the instance-level baseline of COMODO (arXiv:2503.07259)")

    Config = InstanceNCEConfig

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        cfg = self.config
        z_s = F.normalize(self.student_embeddings(student), dim=1)
        z_t = self.teacher_embeddings(teacher, batch).to(z_s.dtype)
        loss = info_nce_loss(z_s, z_t, cfg.temperature)
        if cfg.symmetric:
            loss = (loss + info_nce_loss(z_t, z_s, cfg.temperature)) / 2
        return MethodOutput(loss, {"nce": loss.detach()}, None)
