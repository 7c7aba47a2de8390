"""``lsskd``: self-supervised augmented labels (class × rotation) learned and transferred inside one network.

Each batch is expanded to its four rotations; classifiers on intermediate stages predict the joint label
``4·y + r`` (4C classes), and each stage's joint distribution teaches the stage below it. The main head
keeps its plain C-class cross-entropy on the unrotated copies. The stage classifiers live in the method,
so the deployed network is the plain student.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from alambic.data.batch import IGNORE_INDEX, INPUT
from alambic.errors import ShapeMismatchError
from alambic.losses import kd_loss, masked_cross_entropy
from alambic.methods.base import Method, MethodConfig, MethodOutput
from alambic.methods.byot import make_branch, pooled
from alambic.models.taps import Taps
from alambic.registry import METHODS

ROTATIONS = 4


def rotate4(images: Tensor) -> Tensor:
    """[B, C, H, W] -> [4B, C, H, W]: row ``4b + r`` is sample b rotated by ``r·90°`` (r = 0 is the original).

    Samples stay together (interleaved), as in HSAKD's ``stack([rot90(x, k) for k in 0..3], 1)``, so
    ``out[0::4]`` is the unrotated batch. Needs square images (a quarter turn swaps H and W).
    """
    if images.dim() != 4 or images.shape[-1] != images.shape[-2]:
        raise ShapeMismatchError(
            f"rotate4: rotation labels need square images [B, C, H, W] (H == W), got {tuple(images.shape)}"
        )
    return torch.stack([torch.rot90(images, r, dims=(2, 3)) for r in range(ROTATIONS)], dim=1).flatten(0, 1)


def joint_labels(target: Tensor) -> Tensor:
    """[B] class ids -> [4B] joint ids ``4·y + r`` in :func:`rotate4`'s row order; unlabelled stay ignored."""
    joint = torch.stack([target * ROTATIONS + r for r in range(ROTATIONS)], dim=1).flatten()
    return joint.masked_fill(target.repeat_interleave(ROTATIONS) == IGNORE_INDEX, IGNORE_INDEX)


def deep_to_shallow_kd(stage_logits: list[Tensor], temperature: float) -> Tensor:
    """``Σ_i T²·KL(p_{i+1} ‖ p_i)``: each stage taught by the next deeper one, the deeper side a constant.

    Stages are ordered shallow to deep; the deepest stage is taught by nobody. Args: stage_logits, a
    list of [N, K] tensors (K = 4C joint classes); temperature T > 0. Returns: scalar (0 for one stage).
    """
    total = stage_logits[0].new_zeros(())
    for shallow, deeper in zip(stage_logits[:-1], stage_logits[1:]):
        total = total + kd_loss(shallow, deeper, temperature)
    return total


class LSSKDConfig(MethodConfig):
    taps: list[str] = Field(
        min_length=2,
        description="student taps, shallow to deep, each given a 4C joint-label classifier "
                    "(e.g. [features.block0, features.block1])",
    )
    temperature: float = Field(3.0, gt=0, description="T of the stage-to-stage KL (3 in HSAKD)")

    @model_validator(mode="after")
    def _distinct(self) -> "LSSKDConfig":
        if len(set(self.taps)) != len(self.taps):
            raise ValueError(f"taps must be distinct, got {self.taps}")
        return self


@METHODS.register("lsskd")
class LSSKD(Method):
    """``CE(main on r = 0) + Σ_i CE(stage_i, 4y + r) + Σ_i T²·KL(p_{i+1} ‖ p_i)`` over the ×4 rotated batch.

    How the rotated pass runs: the loop has already run the student on the input view, but the rotated
    copies need a pass of their own, so ``forward`` runs the student (kept from ``setup``) once on the
    4B-row batch (BatchNorm sees the four rotations together, as in HSAKD) and captures the stage taps of
    that pass with its own short-lived :class:`~alambic.models.taps.Taps`; the method declares no loop taps.
    The main cross-entropy is on ``logits[0::4]``, the unrotated copies of that same pass; the loop's own
    forward is not used in the loss (it costs a quarter of the step extra and moves BatchNorm statistics
    once more per step). Every weight is 1, as in HSAKD. Stage classifiers are a bottleneck + pooling +
    linear branch as in ``byot``, with the deepest tap's width.

    LSSKD has no public code; "one-to-one transfer across stages" is read here as each stage taught by
    the next deeper one (adjacent pairs), the teacher side detached, at HSAKD's T = 3.
    """

    paper = (
        'Dahri et al., "A Layered Self-Supervised Knowledge Distillation Framework for Efficient Multimodal '
        'Learning on the Edge" (LSSKD), 2025, arXiv:2506.07055; mechanism after HSAKD, Yang et al., '
        '"Hierarchical Self-supervised Augmented Knowledge Distillation", IJCAI 2021, arXiv:2107.13715'
    )

    Config = LSSKDConfig
    needs_teacher = False
    uses_unlabeled = False

    def __init__(self, config: LSSKDConfig | None = None):
        super().__init__(config)
        self.heads = nn.ModuleList()
        self._student: tuple[nn.Module, ...] = ()  # a tuple, so the student is not registered as a submodule

    def setup(self, student, teacher, info) -> None:
        model = info.student
        x = next(iter(info.loader.epoch(0))).views[INPUT][:2] if info.loader is not None else None
        if x is None:
            raise ValueError("lsskd needs the training loader in SetupInfo to size its stage classifiers")
        feats = self._stage_features(model, rotate4(x), train=False)[1]
        width = pooled(feats[self.config.taps[-1]], f"lsskd tap {self.config.taps[-1]}").shape[1]
        for tap in self.config.taps:
            self.heads.append(nn.Sequential(make_branch(feats[tap], width, f"lsskd tap {tap}"),
                                            nn.Linear(width, ROTATIONS * info.num_classes)))
        self._student = (model,)

    def _stage_features(self, model: nn.Module, x: Tensor, train: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        with Taps(model, self.config.taps) as taps:
            if train:
                logits = model(x)
            else:
                was = model.training
                model.eval()
                with torch.no_grad():
                    logits = model(x)
                model.train(was)
            return logits, taps.take()

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        if not self._student:
            raise RuntimeError("lsskd: setup() was not called (it keeps the student for the rotated pass)")
        x4 = rotate4(batch.views[INPUT])
        logits4, feats = self._stage_features(self._student[0], x4)
        main = logits4[0::ROTATIONS]
        ce = masked_cross_entropy(main, batch.target, all_labeled=batch.all_labeled)
        joint = joint_labels(batch.target)
        stage_logits = [head(feats[tap]) for tap, head in zip(self.config.taps, self.heads)]
        stage_ce = sum(masked_cross_entropy(z, joint, all_labeled=batch.all_labeled) for z in stage_logits)
        stage_kd = deep_to_shallow_kd(stage_logits, self.config.temperature)
        terms = {"ce": ce.detach(), "stage_ce": stage_ce.detach(), "stage_kd": stage_kd.detach()}
        return MethodOutput(ce + stage_ce + stage_kd, terms, main)
