"""``spatial_affinity``: FAKD's feature-affinity distillation (the L_AD term of DSCLoRA)."""

from __future__ import annotations

from pydantic import Field

from alambic.losses import spatial_affinity_loss
from alambic.methods.relation import FeatureKDConfig, PairedFeatureMethod
from alambic.registry import METHODS


class SpatialAffinityConfig(FeatureKDConfig):
    feature_weight: float = Field(
        1.0, ge=0,
        description="λ of the summed L1 affinity terms (DSCLoRA's λ3 is not published: its repo is "
                    "inference-only; 1 = the affinity term on a par with the label term)",
    )


@METHODS.register("spatial_affinity")
class SpatialAffinity(PairedFeatureMethod):
    """The student's HW×HW cosine affinities between spatial positions match the teacher's (L1).

    For each tap pair, every position's channel vector is L2-normalised, ``A = F̂ᵀF̂`` and the loss is the
    mean absolute difference (:func:`alambic.losses.spatial_affinity_loss`), summed over pairs. DSCLoRA
    (seed paper #8) adds it, as ``λ3·L_AD``, to a reconstruction and an output-distillation term; for
    classification those are ``ce_weight`` and ``kd_weight``. Channels may differ; spatial sizes must
    match.
    """

    paper = (
        'He, Dai, Lu, Jiang, Xia, "FAKD: Feature-Affinity Based Knowledge Distillation for Efficient Image '
        'Super-Resolution", ICIP 2020 (as used by DSCLoRA: Chai et al., "Distillation-Supervised Convolutional '
        'Low-Rank Adaptation for Efficient Image Super-Resolution", 2025, arXiv:2504.11271)'
    )
    Config = SpatialAffinityConfig
    term = "affinity"

    def pair_loss(self, student_feature, teacher_feature):
        return spatial_affinity_loss(student_feature, teacher_feature)
