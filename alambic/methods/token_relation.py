"""``token_relation``: the student's query-key token relations match the teacher's (Hybrid Distill, G2SD)."""

from __future__ import annotations

from pydantic import Field

from alambic.errors import ShapeMismatchError
from alambic.losses import token_relation_loss
from alambic.methods.relation import FeatureKDConfig, PairedFeatureMethod, tapped
from alambic.registry import METHODS


class TokenRelationConfig(FeatureKDConfig):
    """``student_taps`` / ``teacher_taps`` name *attention modules* (e.g. ``blocks.1.attn`` of ``arch: vit``);
    the method taps their ``q_name`` and ``k_name`` linears."""

    q_name: str = Field("q", description="submodule of each attention module that outputs the queries [B, N, C]")
    k_name: str = Field("k", description="submodule of each attention module that outputs the keys [B, N, C]")
    num_heads: int = Field(
        1, ge=1,
        description="relation heads H: q/k channels split into H groups on each side (G2SD's Ar, default 1); "
                    "set it to the models' attention heads to match head by head",
    )
    feature_weight: float = Field(1.0, ge=0, description="weight of the summed relation KL terms")


@METHODS.register("token_relation")
class TokenRelation(PairedFeatureMethod):
    """KL(R_T ‖ R_S) between ``R = softmax(q kᵀ/√d_h)`` of paired attention layers, per relation head.

    Hybrid Distill has the student imitate the token relations of a masked-image-modelling teacher at
    intermediate layers to keep its attention diverse; G2SD's ``cal_relation_loss`` is the same primitive
    (:func:`alambic.losses.token_relation_loss`: sum over keys, mean over batch, heads and query tokens;
    pairs summed). Student and teacher widths may differ (each splits its own channels into
    ``num_heads`` groups) but the token counts must match: same patch size, both with or both without a
    class token. Hybrid Distill's second teacher (feature regression to a CLIP/DeiT model) and its
    progressive token masking are not part of this method; combine it with ``kd_weight`` for the
    prediction-level term.
    """

    paper = (
        'Shi et al., "Hybrid Distillation: Connecting Masked Autoencoders with Contrastive Learners", ICLR 2024, '
        'arXiv:2306.15876; relation loss as in Huang et al., "Generic-to-Specific Distillation of Masked '
        'Autoencoders" (G2SD), CVPR 2023, arXiv:2302.14771'
    )
    Config = TokenRelationConfig
    term = "relation"

    def _qk(self, paths: list[str]) -> list[str]:
        return [f"{p}.{name}" for p in paths for name in (self.config.q_name, self.config.k_name)]

    def student_taps(self) -> list[str]:
        return self._qk(self.config.student_taps)

    def teacher_taps(self) -> list[str]:
        return self._qk(self.config.teacher_taps)

    def pairs(self, student, teacher):
        cfg = self.config
        out = []
        for s, t in zip(cfg.student_taps, cfg.teacher_taps):
            s_qk = (tapped(student, f"{s}.{cfg.q_name}", "student"), tapped(student, f"{s}.{cfg.k_name}", "student"))
            t_qk = (tapped(teacher, f"{t}.{cfg.q_name}", "teacher"), tapped(teacher, f"{t}.{cfg.k_name}", "teacher"))
            out.append((s, t, s_qk, t_qk))
        return out

    def feature_loss(self, student, teacher):
        total = None
        for s_path, t_path, (s_q, s_k), (t_q, t_k) in self.pairs(student, teacher):
            try:
                value = token_relation_loss(s_q, s_k, t_q, t_k, self.config.num_heads)
            except ShapeMismatchError as err:
                raise ShapeMismatchError(
                    f"TokenRelation: student '{s_path}' q {tuple(s_q.shape)} vs teacher '{t_path}' q "
                    f"{tuple(t_q.shape)}: {err}"
                ) from None
            total = value if total is None else total + value
        return total
