"""``at``: attention transfer — the student's spatial attention maps match the teacher's."""

from __future__ import annotations

from pydantic import Field

from alambic.losses import at_loss
from alambic.methods.relation import FeatureKDConfig, PairedFeatureMethod
from alambic.registry import METHODS


class ATConfig(FeatureKDConfig):
    p: float = Field(2.0, gt=0, description="exponent of the attention map Σ_c |A_c|^p (2 in the paper)")
    feature_weight: float = Field(
        1000.0, ge=0,
        description="β: weight of the summed per-pair mean squared map differences (1000 in RepDistiller; "
                    "the authors' code uses β/2 with β = 1000)",
    )


@METHODS.register("at")
class AT(PairedFeatureMethod):
    """Attention transfer between pairs of convolutional feature maps of the same spatial size.

    Each pair contributes the mean squared difference of the L2-normalised maps ``Σ_c |A_c|^p``
    (:func:`alambic.losses.at_loss`). The paper places pairs at the ends of the residual groups (RepDistiller:
    every block output); channels may differ, the spatial sizes must match (else a ShapeMismatchError
    naming both taps and shapes when the run starts).
    """

    paper = (
        'Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of '
        'Convolutional Neural Networks via Attention Transfer", ICLR 2017, arXiv:1612.03928'
    )
    Config = ATConfig
    term = "at"

    def pair_loss(self, student_feature, teacher_feature):
        return at_loss(student_feature, teacher_feature, self.config.p)
