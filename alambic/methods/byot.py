"""``byot``: Be Your Own Teacher, the network's deepest classifier teaching classifiers on its shallow stages.

Classifier branches are attached to intermediate taps of the student; each learns from the labels, from
the deepest classifier's softened prediction and from the deepest feature (a hint). The branches live in
the method, not in the student, so they are dropped at export: the deployed network is the plain student.
"""

from __future__ import annotations

from pydantic import Field, model_validator
from torch import Tensor, nn

from alambic.data.batch import INPUT
from alambic.errors import ShapeMismatchError
from alambic.losses import kd_loss, masked_cross_entropy
from alambic.methods.base import Method, MethodConfig, MethodOutput
from alambic.registry import METHODS


def pooled(feature: Tensor, what: str) -> Tensor:
    """A tap as one vector per sample: [B, D] as is, [B, C, H, W] averaged over H and W."""
    if feature.dim() == 2:
        return feature
    if feature.dim() == 4:
        return feature.mean(dim=(2, 3))
    raise ShapeMismatchError(f"{what}: expected a [B, D] or [B, C, H, W] feature, got {tuple(feature.shape)}")


def make_branch(feature: Tensor, width: int, what: str) -> nn.Module:
    """The bottleneck of one shallow branch: a tap [B, C, H, W] or [B, d] -> a vector [B, width].

    Maps: a 1x1 convolution to ``width`` channels, BatchNorm, ReLU, then global average pooling (the
    BYOT bottleneck with its down-sampling replaced by pooling). Vectors: Linear + ReLU.
    """
    shape = tuple(feature.shape)
    if len(shape) == 4:
        return nn.Sequential(nn.Conv2d(shape[1], width, kernel_size=1, bias=False), nn.BatchNorm2d(width),
                             nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    if len(shape) == 2:
        return nn.Sequential(nn.Linear(shape[1], width), nn.ReLU())
    raise ShapeMismatchError(f"{what}: a branch needs a [B, D] or [B, C, H, W] tap, got {shape}")


def feature_hint(branch_feature: Tensor, deep_feature: Tensor) -> Tensor:
    """``‖F_i − F_C‖²`` per sample (summed over features), batch mean; the deepest feature is a constant.

    Zhang et al., BYOT §3.2, loss source 3 ("L2 loss from hints"). Args: branch_feature [B, D] (after the
    branch's bottleneck); deep_feature [B, D]. Returns: scalar.
    """
    if branch_feature.shape != deep_feature.shape:
        raise ShapeMismatchError(
            f"feature_hint: branch feature {tuple(branch_feature.shape)} and deepest feature "
            f"{tuple(deep_feature.shape)} shapes differ"
        )
    return (branch_feature - deep_feature.detach()).pow(2).flatten(1).sum(1).mean()


class BYOTConfig(MethodConfig):
    taps: list[str] = Field(
        min_length=1,
        description="intermediate student taps, shallow to deep, each given a classifier branch "
                    "(e.g. [features.block0])",
    )
    deep_tap: str = Field(
        "pool",
        description="the deepest feature the branch hints regress to: pool for cnn, the last body.act{i} for mlp",
    )
    alpha: float = Field(
        0.3, ge=0, le=1,
        description="KD weight of each branch, 1 - alpha on its labels (0.3: loss_coefficient in the authors' code)",
    )
    temperature: float = Field(3.0, gt=0, description="softmax temperature of the branch KD (3 in the authors' code)")
    hint_weight: float = Field(
        0.03, ge=0,
        description="λ on each branch's feature hint; the authors' released code drops the hint (λ = 0), the ICCV "
                    "reimplementation uses 1e-6 on a batch- and element-summed error; 0.03 on our per-sample sum "
                    "is our choice",
    )

    @model_validator(mode="after")
    def _distinct(self) -> "BYOTConfig":
        if len(set(self.taps)) != len(self.taps):
            raise ValueError(f"taps must be distinct, got {self.taps}")
        if self.deep_tap in self.taps:
            raise ValueError(f"deep_tap '{self.deep_tap}' is the hint target; it cannot also be a branch tap")
        return self


@METHODS.register("byot")
class BYOT(Method):
    """``CE(deepest) + Σ_i [(1 − α)·CE(q_i) + α·T²·KL(q_C ‖ q_i) + λ·‖F_i − F_C‖²]``.

    ``q_C`` is the student's own (deepest) prediction, used as the teacher of every branch ``i`` and
    detached there, as in the authors' code (``teacher_output = outputs[0].detach()``): the deepest
    classifier learns from the labels only. ``F_C`` is the deepest feature (``deep_tap``, pooled),
    also detached; ``F_i`` is branch i's bottleneck output, whose width is made equal to ``F_C``'s.
    The KL carries Hinton's T² (the authors' code uses the soft cross-entropy without it, i.e. the KD
    gradient there is 1/T² of ours). Branches are built in ``setup`` from the taps' shapes.
    """

    paper = (
        'Zhang et al., "Be Your Own Teacher: Improve the Performance of Convolutional Neural Networks via '
        'Self Distillation" (BYOT), ICCV 2019, arXiv:1905.08094'
    )

    Config = BYOTConfig
    needs_teacher = False
    uses_unlabeled = False

    def __init__(self, config: BYOTConfig | None = None):
        super().__init__(config)
        self.branches = nn.ModuleList()
        self.classifiers = nn.ModuleList()

    def student_taps(self) -> list[str]:
        return [*self.config.taps, self.config.deep_tap]

    def setup(self, student, teacher, info) -> None:
        feats = student[INPUT].features
        width = pooled(feats[self.config.deep_tap], f"byot deep_tap {self.config.deep_tap}").shape[1]
        for tap in self.config.taps:
            self.branches.append(make_branch(feats[tap], width, f"byot tap {tap}"))
            self.classifiers.append(nn.Linear(width, info.num_classes))

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        cfg = self.config
        out = student[INPUT]
        logits, target, all_labeled = out.logits, batch.target, batch.all_labeled
        deep = pooled(out.features[cfg.deep_tap], f"byot deep_tap {cfg.deep_tap}").detach()
        ce = masked_cross_entropy(logits, target, all_labeled=all_labeled)
        branch_ce = branch_kd = hint = logits.new_zeros(())
        for tap, branch, classifier in zip(cfg.taps, self.branches, self.classifiers):
            z = branch(out.features[tap])
            z_logits = classifier(z)
            branch_ce = branch_ce + masked_cross_entropy(z_logits, target, all_labeled=all_labeled)
            branch_kd = branch_kd + kd_loss(z_logits, logits, cfg.temperature)
            if cfg.hint_weight > 0:
                hint = hint + feature_hint(z, deep)
        branch_ce, branch_kd, hint = (1 - cfg.alpha) * branch_ce, cfg.alpha * branch_kd, cfg.hint_weight * hint
        terms = {"ce": ce.detach(), "branch_ce": branch_ce.detach(), "branch_kd": branch_kd.detach()}
        if cfg.hint_weight > 0:
            terms["hint"] = hint.detach()
        return MethodOutput(ce + branch_ce + branch_kd + hint, terms, logits)
