"""``fitnet``: a hint from a teacher layer, reached through a learned regressor on a student layer."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from alambic.data.batch import INPUT
from alambic.errors import ShapeMismatchError
from alambic.losses import hint_loss, kd_loss, masked_cross_entropy
from alambic.methods.base import Method, MethodConfig, MethodOutput
from alambic.registry import METHODS


class FitNetConfig(MethodConfig):
    student_tap: str = Field(description="dotted path of the student's guided layer, e.g. body.act0")
    teacher_tap: str = Field(description="dotted path of the teacher's hint layer, e.g. body.act1")
    hint_weight: float = Field(1.0, ge=0, description="weight of the hint term when trained jointly")
    hint_epochs: int = Field(
        0, ge=0,
        description="paper's stage 1: epochs training the hint alone before KD; 0 = one joint stage",
    )
    temperature: float = Field(4.0, gt=0, description="KD temperature of the second stage")
    alpha: float = Field(0.9, ge=0, le=1, description="KD weight of the second stage (1 - alpha on labels)")


def make_regressor(student_feature: Tensor, teacher_feature: Tensor) -> nn.Module:
    """The regressor ``r`` of FitNets §2.2 mapping the guided layer's shape onto the hint layer's.

    Vectors [B, d_s] -> [B, d_t]: a linear map. Maps [B, C_s, H_s, W_s] -> [B, C_t, H_t, W_t]: a
    convolution with kernel ``(H_s − H_t + 1, W_s − W_t + 1)`` and no padding, the paper's convolutional
    regressor (it needs the guided map to be at least as large as the hint map).
    """
    s, t = tuple(student_feature.shape), tuple(teacher_feature.shape)
    if len(s) == 2 and len(t) == 2:
        return nn.Linear(s[1], t[1])
    if len(s) == 4 and len(t) == 4 and s[2] >= t[2] and s[3] >= t[3]:
        return nn.Conv2d(s[1], t[1], kernel_size=(s[2] - t[2] + 1, s[3] - t[3] + 1))
    raise ShapeMismatchError(
        f"fitnet: no regressor maps the student tap {s} onto the teacher tap {t} "
        "(both must be [B, D] vectors, or [B, C, H, W] maps with the student's map at least as large)"
    )


@METHODS.register("fitnet")
class FitNet(Method):
    """Hint-based training followed (or accompanied) by Hinton KD.

    Stage 1 (the first ``hint_epochs`` epochs) minimises only the hint loss of Eq. (3), training the
    student up to its guided layer and the regressor; stage 2 trains the whole student with KD. With
    ``hint_epochs: 0`` both run jointly: ``(1 − α)·CE + α·KD + hint_weight·hint``.
    """

    paper = 'Romero et al., "FitNets: Hints for Thin Deep Nets", 2015, arXiv:1412.6550'

    Config = FitNetConfig
    needs_teacher = True
    uses_unlabeled = True

    def __init__(self, config: FitNetConfig | None = None):
        super().__init__(config)
        self.regressor: nn.Module | None = None

    def student_taps(self) -> list[str]:
        return [self.config.student_tap]

    def teacher_taps(self) -> list[str]:
        return [self.config.teacher_tap]

    def setup(self, student, teacher, info) -> None:
        self.regressor = make_regressor(
            student[INPUT].features[self.config.student_tap], teacher[INPUT].features[self.config.teacher_tap]
        )

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        cfg = self.config
        s_out, t_out = student[INPUT], teacher[INPUT]
        hint = hint_loss(self.regressor(s_out.features[cfg.student_tap]), t_out.features[cfg.teacher_tap])
        if ctx.epoch < cfg.hint_epochs:
            return MethodOutput(hint, {"hint": hint.detach()}, s_out.logits)
        kd = cfg.alpha * kd_loss(s_out.logits, t_out.logits, cfg.temperature)
        ce = (1 - cfg.alpha) * masked_cross_entropy(s_out.logits, batch.target, all_labeled=batch.all_labeled)
        terms = {"ce": ce.detach(), "kd": kd.detach()}
        loss = ce + kd
        if cfg.hint_epochs == 0 and cfg.hint_weight > 0:
            weighted = cfg.hint_weight * hint
            terms["hint"] = weighted.detach()
            loss = loss + weighted
        return MethodOutput(loss, terms, s_out.logits)
