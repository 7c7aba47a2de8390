"""``multi_teacher``: KD from several teachers, each weighted by a fixed or task-similarity weight.

DistillNearest / DistillWeighted (Borup, Phoo, Hariharan, "Distilling from Similar Tasks for Transfer
Learning on a Budget", ICCV 2023, arXiv:2304.12314): a task-similarity score computed from each source
model's outputs on the target's labelled data either picks one teacher (Nearest) or weighs all of them
(Weighted); no source data is needed. The paper's exact similarity metric and weighting could not be
checked here (only its abstract was reachable), so the scores below are documented stand-ins: the
leave-one-out accuracy of a nearest-centroid probe on each teacher's logits (label-space agnostic, like
the paper's source-feature metrics) or the teacher's own accuracy on the labelled data.
"""

from __future__ import annotations

from typing import Iterator, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from alambic.data.batch import INPUT, Batch
from alambic.errors import AlambicError, RecipeError
from alambic.losses import kd_loss, masked_cross_entropy
from alambic.methods.base import Method, MethodConfig, MethodOutput
from alambic.registry import METHODS


class MultiTeacherConfig(MethodConfig):
    weighting: Literal["average", "fixed", "similarity", "nearest"] = Field(
        "similarity",
        description="average: 1/K each; fixed: `weights`; similarity: softmax(score/weight_temperature) "
                    "(DistillWeighted); nearest: all weight on the best-scoring teacher (DistillNearest)",
    )
    weights: list[float] | None = Field(
        None, description="weighting: fixed only; one non-negative value per teacher, normalised to sum 1",
    )
    score: Literal["centroid", "accuracy"] = Field(
        "centroid",
        description="task similarity of a teacher on the labelled training data: centroid = leave-one-out "
                    "nearest-centroid accuracy on its logits; accuracy = its own prediction accuracy",
    )
    weight_temperature: float = Field(0.05, gt=0, description="τ_w of softmax(score/τ_w) for weighting: similarity")
    temperature: float = Field(4.0, gt=0, description="KD temperature T (kd's default, RepDistiller's 4)")
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the KD terms; 1 - alpha weighs the label term")
    batch_size: int = Field(256, ge=1, description="batch size of the one scoring pass over the labelled data")

    @model_validator(mode="after")
    def _weights_only_when_fixed(self) -> "MultiTeacherConfig":
        if self.weighting == "fixed":
            if not self.weights:
                raise ValueError("weighting: fixed needs `weights`, one per teacher")
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError(f"weights must be non-negative with a positive sum, got {self.weights}")
        elif self.weights is not None:
            raise ValueError(f"`weights` is only read with weighting: fixed, not {self.weighting}")
        return self


def nearest_centroid_accuracy(features: Tensor, labels: Tensor) -> float:
    """Leave-one-out accuracy of a nearest-class-mean classifier (squared Euclidean distance).

    Sample i is classified against the class means computed without it: its own class mean moves to
    ``(n_c·μ_c − f_i)/(n_c − 1)``, so its squared distance is ``(n_c/(n_c − 1))²·‖f_i − μ_c‖²``; a class with
    a single sample cannot be predicted for it (distance ∞). Ties go to the lower class id.

    Args: features [N, D]; labels [N] int. Returns: accuracy in [0, 1].
    """
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"features {tuple(features.shape)} and labels {tuple(labels.shape)}: want [N, D] and [N]")
    f = features.detach().double()
    classes, y = torch.unique(labels, return_inverse=True)
    counts = torch.bincount(y, minlength=len(classes)).double()
    means = torch.zeros(len(classes), f.shape[1], dtype=f.dtype).index_add_(0, y, f) / counts[:, None]
    dist = torch.cdist(f, means).pow(2)  # [N, C]
    n_own = counts[y]
    own = dist.gather(1, y[:, None]).squeeze(1)
    own = torch.where(n_own > 1, own * (n_own / (n_own - 1).clamp_min(1)) ** 2, torch.full_like(own, float("inf")))
    dist.scatter_(1, y[:, None], own[:, None])
    return float((dist.argmin(1) == y).double().mean())


def similarity_weights(scores: Tensor, temperature: float) -> Tensor:
    """``softmax(scores / τ_w)``: non-negative weights summing to 1, larger for more similar teachers."""
    return torch.softmax(scores.double() / temperature, dim=0)


def _labelled_batches(loader, batch_size: int) -> Iterator[Batch]:
    """The labelled training samples, in batches: from the in-memory split, or one pass over the loader."""
    split = getattr(loader, "split", None)
    if split is not None:
        lab = split.labeled_only()
        for i in range(0, len(lab), batch_size):
            sl = slice(i, i + batch_size)
            yield Batch(views={INPUT: lab.x[sl]}, index=lab.index[sl], target=lab.y[sl])
        return
    for batch in loader.epoch(0):
        mask = batch.labeled_mask()
        if bool(mask.any()):
            yield batch.select(mask)


@METHODS.register("multi_teacher")
class MultiTeacher(Method):
    """``(1 − α)·CE + α·Σ_k w_k·T²·KL(p_Tk ‖ p_S)``: one KD term per teacher, weighted.

    Needs ``teachers: [...]`` (a :class:`~alambic.teachers.ensemble.TeacherEnsemble`), whose per-teacher
    outputs are read from ``members``. The weights ``w`` (non-negative, summing to 1) are fixed once in
    ``setup``, kept in the buffer ``weights`` (checkpointed) next to the per-teacher ``scores``, and each
    teacher's weighted KD contribution is logged as term ``kd_t{k}``. ``average`` averages the K
    divergences; it is not ``kd`` on the ensemble, which distils the teachers' mean distribution.
    """

    paper = (
        'Borup, Phoo, Hariharan, "Distilling from Similar Tasks for Transfer Learning on a Budget" '
        "(DistillNearest / DistillWeighted), ICCV 2023, arXiv:2304.12314"
    )

    Config = MultiTeacherConfig
    needs_teacher = True
    uses_unlabeled = True

    def __init__(self, config: MultiTeacherConfig | None = None):
        super().__init__(config)
        self.register_buffer("weights", None)  # [K] float64, sums to 1
        self.register_buffer("scores", None)  # [K] task-similarity scores (NaN when not computed)

    @staticmethod
    def _members(teacher) -> list:
        members = teacher[INPUT].members if teacher is not None else []
        if not members:
            raise AlambicError(
                "multi_teacher needs several teachers: give `teachers: [{run: ...}, {run: ...}]` in the recipe, "
                "not a single `teacher:`"
            )
        return members

    def setup(self, student, teacher, info) -> None:
        cfg = self.config
        k = len(self._members(teacher))
        if cfg.weighting == "fixed" and len(cfg.weights) != k:
            raise RecipeError(f"method.weights has {len(cfg.weights)} values but the recipe gives {k} teachers")
        scores = torch.full((k,), float("nan"), dtype=torch.float64)
        if cfg.weighting in ("similarity", "nearest"):
            scores = self.teacher_scores(info.teacher, info.loader, k)
        self.scores = scores
        self.weights = self.weights_from(scores, k)

    def teacher_scores(self, ensemble, loader, k: int) -> Tensor:
        """[K] task-similarity score of each teacher on the labelled training data (see ``score``)."""
        logits: list[list[Tensor]] = [[] for _ in range(k)]
        targets = []
        for batch in _labelled_batches(loader, self.config.batch_size):
            members = self._members(ensemble.outputs(batch, [INPUT]))
            for i, m in enumerate(members):
                logits[i].append(m.logits.detach())
            targets.append(batch.target)
        if not targets:
            raise AlambicError("multi_teacher: weighting by similarity needs labelled training samples, there are none")
        y = torch.cat(targets)
        out = []
        for per_teacher in logits:
            z = torch.cat(per_teacher)
            if self.config.score == "accuracy":
                out.append(float((z.argmax(1) == y).double().mean()))
            else:
                out.append(nearest_centroid_accuracy(z, y))
        return torch.tensor(out, dtype=torch.float64)

    def weights_from(self, scores: Tensor, k: int) -> Tensor:
        """[K] float64 weights, non-negative, summing to 1, for this config's ``weighting``."""
        cfg = self.config
        if cfg.weighting == "average":
            return torch.full((k,), 1.0 / k, dtype=torch.float64)
        if cfg.weighting == "fixed":
            w = torch.tensor(cfg.weights, dtype=torch.float64)
            return w / w.sum()
        if cfg.weighting == "nearest":
            return torch.nn.functional.one_hot(scores.argmax(), k).double()
        return similarity_weights(scores, cfg.weight_temperature)

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        cfg = self.config
        s = student[INPUT].logits
        members = self._members(teacher)
        if len(members) != len(self.weights):
            raise AlambicError(f"multi_teacher was set up for {len(self.weights)} teachers, got {len(members)}")
        a = cfg.alpha
        terms = {}
        loss = (1 - a) * masked_cross_entropy(s, batch.target, all_labeled=batch.all_labeled) if a < 1 else s.sum() * 0.0
        terms["ce"] = loss.detach()
        for i, (m, w) in enumerate(zip(members, self.weights.tolist())):
            kd = (a * w) * kd_loss(s, m.logits, cfg.temperature)
            terms[f"kd_t{i}"] = kd.detach()
            loss = loss + kd
        return MethodOutput(loss, terms, s)
