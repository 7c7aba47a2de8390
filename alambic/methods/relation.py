"""Relation-based KD across the samples of a batch: ``sp``, ``rkd`` and ``pkt``; and the shared frame of
every feature/relation method in this family (AT, spatial affinity, token relations, MLKD).

Each of these methods reads pairs of taps (``student_taps[i]`` ↔ ``teacher_taps[i]``), turns each side
into a relation that does not depend on the feature width (B×B similarities, B² distances, B³ angles,
conditional probabilities), and adds the weighted relation loss to cross-entropy on the labelled samples
and, optionally, Hinton KD:

    ``loss = ce_weight · CE(labels) + kd_weight · T²·KL(p_T ‖ p_S) + feature_weight · Σ_pairs L(pair)``

The defaults follow RepDistiller (Tian et al., "Contrastive Representation Distillation", ICLR 2020,
arXiv:1910.10699), which benchmarks all of them with CE weight 1, no KD and a per-method feature weight
(the published table is in docs/anchors.md). The relation terms need no label, so unlabelled
samples teach through them (``uses_unlabeled``).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, field_validator, model_validator
from torch import Tensor

from alambic.data.batch import INPUT
from alambic.errors import AlambicError, ShapeMismatchError
from alambic.losses import pkt_loss, rkd_loss, sp_loss
from alambic.methods.base import Method, MethodConfig, MethodOutput, supervised_terms
from alambic.registry import METHODS
from alambic.teachers.base import ModelOutput


class FeatureKDConfig(MethodConfig):
    """Options shared by the feature and relation methods (each adds its own weights)."""

    student_taps: list[str] = Field(min_length=1, description="student layers (dotted paths), one per pair")
    teacher_taps: list[str] = Field(min_length=1, description="teacher layers, paired with student_taps in order")
    ce_weight: float = Field(1.0, ge=0, description="weight of cross-entropy on the labelled samples (1 in RepDistiller)")
    kd_weight: float = Field(0.0, ge=0, description="weight of Hinton KD on the logits (0 in RepDistiller's tables)")
    temperature: float = Field(4.0, gt=0, description="KD temperature (4 in RepDistiller)")
    feature_weight: float = Field(1.0, ge=0, description="weight of the summed feature/relation terms")

    @field_validator("student_taps", "teacher_taps", mode="before")
    @classmethod
    def _one_tap_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _paired(self) -> "FeatureKDConfig":
        if len(self.student_taps) != len(self.teacher_taps):
            raise ValueError(
                f"student_taps ({len(self.student_taps)}) and teacher_taps ({len(self.teacher_taps)}) "
                "must pair up one to one"
            )
        return self


def tapped(out: ModelOutput, tap: str, side: str) -> Tensor:
    """The feature a tap captured, or a one-line error naming the tap and the ones that exist."""
    try:
        return out.features[tap]
    except KeyError:
        known = ", ".join(out.features) or "none (an ensemble exposes no taps)"
        raise AlambicError(f"the {side} output has no tap '{tap}' (captured: {known})") from None


class PairedFeatureMethod(Method):
    """Frame of a method comparing tap pairs: subclasses set ``term`` and implement :meth:`pair_loss`.

    ``setup`` evaluates every pair once on the probe batch, so incompatible taps fail before training
    with a one-line error naming both taps and shapes.
    """

    term: ClassVar[str] = "feature"
    needs_teacher = True
    uses_unlabeled = True

    def student_taps(self) -> list[str]:
        return list(self.config.student_taps)

    def teacher_taps(self) -> list[str]:
        return list(self.config.teacher_taps)

    def pair_loss(self, student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
        raise NotImplementedError

    def pairs(self, student: ModelOutput, teacher: ModelOutput) -> list[tuple[str, str, Tensor, Tensor]]:
        return [(s, t, tapped(student, s, "student"), tapped(teacher, t, "teacher"))
                for s, t in zip(self.config.student_taps, self.config.teacher_taps)]

    def feature_loss(self, student: ModelOutput, teacher: ModelOutput) -> Tensor:
        """Σ over the tap pairs of :meth:`pair_loss` (unweighted)."""
        total = None
        for s_tap, t_tap, s, t in self.pairs(student, teacher):
            try:
                value = self.pair_loss(s, t)
            except ShapeMismatchError as err:
                raise ShapeMismatchError(
                    f"{type(self).__name__}: student tap '{s_tap}' {tuple(s.shape)} vs teacher tap '{t_tap}' "
                    f"{tuple(t.shape)}: {err}"
                ) from None
            total = value if total is None else total + value
        return total

    def setup(self, student, teacher, info) -> None:
        if teacher is None:
            raise AlambicError(f"{type(self).__name__} needs a teacher")
        self.feature_loss(student[INPUT], teacher[INPUT])  # shape check on the probe batch

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        cfg = self.config
        s_out, t_out = student[INPUT], teacher[INPUT]
        loss, terms = supervised_terms(s_out.logits, t_out.logits, batch, cfg.ce_weight, cfg.kd_weight,
                                       cfg.temperature)
        if cfg.feature_weight > 0:
            feat = cfg.feature_weight * self.feature_loss(s_out, t_out)
            loss, terms[self.term] = loss + feat, feat.detach()
        return MethodOutput(loss, terms, s_out.logits)


# ------------------------------------------------------------------------------------------------- SP


class SPConfig(FeatureKDConfig):
    feature_weight: float = Field(
        3000.0, ge=0, description="γ: weight of the summed SP terms (3000 in the paper's CIFAR runs and RepDistiller)"
    )


@METHODS.register("sp")
class SP(PairedFeatureMethod):
    """Similarity-preserving KD: the student's B×B sample similarities match the teacher's.

    Each tap pair contributes ``‖G_S − G_T‖_F²/B²`` with ``G = row_normalise(F Fᵀ)`` (see
    :func:`alambic.losses.sp_loss`); the paper applies it at the end of each stage (RepDistiller: the last
    block's output). Widths may differ; only the batch must match.
    """

    paper = 'Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019, arXiv:1907.09682'
    Config = SPConfig
    term = "sp"

    def pair_loss(self, student_feature, teacher_feature):
        return sp_loss(student_feature, teacher_feature)


# ------------------------------------------------------------------------------------------------ RKD


class RKDConfig(FeatureKDConfig):
    distance_weight: float = Field(25.0, ge=0, description="λ_D of the distance-wise term (25 in the paper)")
    angle_weight: float = Field(50.0, ge=0, description="λ_A of the angle-wise term (50 in the paper)")
    feature_weight: float = Field(1.0, ge=0, description="overall multiplier of λ_D·L_D + λ_A·L_A")


@METHODS.register("rkd")
class RKD(PairedFeatureMethod):
    """Relational KD: distances (normalised by their mean) and triplet angles of the embeddings match.

    Apply it to embeddings (the penultimate layer, ``pool`` of the CNN, ``body.act{last}`` of an MLP): each
    pair contributes ``λ_D·L_RKD-D + λ_A·L_RKD-A`` (:func:`alambic.losses.rkd_loss`), which is unchanged by
    rotating, translating or uniformly scaling either embedding space.
    """

    paper = 'Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019, arXiv:1904.05068'
    Config = RKDConfig
    term = "rkd"

    def pair_loss(self, student_feature, teacher_feature):
        return rkd_loss(student_feature, teacher_feature, self.config.distance_weight, self.config.angle_weight)


# ------------------------------------------------------------------------------------------------ PKT


class PKTConfig(FeatureKDConfig):
    feature_weight: float = Field(
        30000.0, ge=0, description="weight of the KL term (3e4 in RepDistiller, calibrated for its B² mean)"
    )


@METHODS.register("pkt")
class PKT(PairedFeatureMethod):
    """Probabilistic knowledge transfer: cosine-kernel conditional distributions over the batch match.

    Each pair contributes ``KL(P_T ‖ P_S)`` between the row-normalised cosine kernels of the two embedding
    sets (:func:`alambic.losses.pkt_loss`); widths may differ.
    """

    paper = (
        'Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018, '
        'arXiv:1803.10837'
    )
    Config = PKTConfig
    term = "pkt"

    def pair_loss(self, student_feature, teacher_feature):
        return pkt_loss(student_feature, teacher_feature)
