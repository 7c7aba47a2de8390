"""``dho``: Dual-Head Optimization, a CE head for the labels and a KD head for the teacher, mixed at inference."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from alambic.data.batch import INPUT
from alambic.errors import AlambicError, ShapeMismatchError
from alambic.eval.classification import eval_mode
from alambic.losses import masked_cross_entropy, split_kd_loss
from alambic.methods.base import Method, MethodConfig, MethodOutput
from alambic.models.taps import Taps
from alambic.registry import METHODS

#: The official search grid (erjui/DHO ``evaluate``): α ∈ {0, 0.05, …, 1}, β ∈ {0.5, …, 4}.
ALPHAS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))
BETAS: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0)


class DHOConfig(MethodConfig):
    tap: str = Field(
        description="dotted path of the student's penultimate features [B, D], the input of its own head "
                    "(mlp with one hidden layer: body.act0; cnn: pool)",
    )
    temperature: float = Field(2.0, gt=0, description="KD temperature T (2 in the paper's code)")
    kd_weight: float = Field(
        0.5, ge=0, le=1, description="λ in (1 − λ)·CE + λ·KD; the paper weighs both heads' losses 0.5",
    )
    alpha: float = Field(
        0.5, ge=0, le=1,
        description="inference mix α used until select_mix picks one on the validation split",
    )
    beta: float = Field(1.0, gt=0, description="KD-head temperature β used until select_mix picks one")
    student_view: str = Field(INPUT, description="the view both heads learn from (an augmented copy)")
    teacher_view: str = Field(INPUT, description="the view the teacher predicts on (the paper: the same image)")
    alphas: list[float] = Field(default_factory=lambda: list(ALPHAS), min_length=1,
                                description="α grid of the validation search (paper: 0, 0.05, …, 1)")
    betas: list[float] = Field(default_factory=lambda: list(BETAS), min_length=1,
                               description="β grid of the validation search (paper: 0.5 … 4)")

    @field_validator("alphas")
    @classmethod
    def _alphas_in_unit(cls, v: list[float]) -> list[float]:
        bad = [a for a in v if not 0 <= a <= 1]
        if bad:
            raise ValueError(f"every α must be in [0, 1], got {bad}")
        return v

    @field_validator("betas")
    @classmethod
    def _betas_positive(cls, v: list[float]) -> list[float]:
        bad = [b for b in v if not b > 0]
        if bad:
            raise ValueError(f"every β must be > 0, got {bad}")
        return v


def mix_log_probs(logits_ce: Tensor, logits_kd: Tensor, alpha: float, beta: float) -> Tensor:
    """``log p`` with ``p = (1 − α)·softmax(z_ce) + α·softmax(z_kd / β)`` (DHO's inference rule).

    Computed as a log-sum-exp of the two weighted log-softmaxes, so a class both heads rule out keeps a
    finite log-probability. α = 0 is exactly ``log_softmax(z_ce)``, α = 1 exactly ``log_softmax(z_kd/β)``.

    Args: logits_ce, logits_kd: [B, C]; alpha in [0, 1]; beta > 0. Returns: [B, C] log-probabilities.
    """
    if logits_ce.shape != logits_kd.shape:
        raise ShapeMismatchError(
            f"dho: CE-head logits {tuple(logits_ce.shape)} and KD-head logits {tuple(logits_kd.shape)} differ"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"dho: alpha must be in [0, 1], got {alpha}")
    if not beta > 0:
        raise ValueError(f"dho: beta must be > 0, got {beta}")
    log_ce = logits_ce.log_softmax(-1)
    if alpha == 0:
        return log_ce
    log_kd = (logits_kd / beta).log_softmax(-1)
    if alpha == 1:
        return log_kd
    return torch.logaddexp(log_ce + math.log(1 - alpha), log_kd + math.log(alpha))


def choose_mix(logits_ce: Tensor, logits_kd: Tensor, target: Tensor,
               alphas: Sequence[float] = ALPHAS, betas: Sequence[float] = BETAS) -> tuple[float, float]:
    """The (α, β) of the grid whose mixed prediction is most accurate on ``target``.

    The official search: β in the outer loop, α in the inner one, both in the order given, and a pair
    replaces the best only if it is strictly more accurate, so ties go to the smallest β, then the
    smallest α (with the default grids: towards the plain CE head).

    Args: logits_ce, logits_kd: [N, C] of the two heads on validation samples; target: [N] class ids.
    Returns: (alpha, beta) as floats.
    """
    if logits_ce.shape != logits_kd.shape or logits_ce.dim() != 2:
        raise ShapeMismatchError(
            f"choose_mix: head logits must both be [N, C], got {tuple(logits_ce.shape)} and {tuple(logits_kd.shape)}"
        )
    if tuple(target.shape) != (logits_ce.shape[0],):
        raise ShapeMismatchError(f"choose_mix: target must be [{logits_ce.shape[0]}], got {tuple(target.shape)}")
    if len(target) == 0:
        raise AlambicError("choose_mix: no validation sample to choose (alpha, beta) on")
    p_ce = logits_ce.detach().double().softmax(-1)
    kd = logits_kd.detach().double()
    target = target.to(p_ce.device)
    best, best_pair = -1, (float(alphas[0]), float(betas[0]))
    for beta in betas:
        p_kd = (kd / beta).softmax(-1)
        for alpha in alphas:
            correct = int((((1 - alpha) * p_ce + alpha * p_kd).argmax(-1) == target).sum())
            if correct > best:
                best, best_pair = correct, (float(alpha), float(beta))
    return best_pair


def _features(student: nn.Module, tap: str, x: Tensor) -> tuple[Tensor, Tensor]:
    """The student's logits (its CE head) and its features at ``tap``, in one forward pass."""
    with Taps(student, [tap]) as taps:
        logits = student(x)
        features = taps[tap]
    return logits, features


class DHOClassifier(nn.Module):
    """The deployed DHO network: the student (CE head) plus the KD head, mixed by (α, β).

    ``forward`` returns ``log p`` (see :func:`mix_log_probs`): its arg-max is the mixed prediction and its
    softmax the mixed probability, so accuracy, NLL, ECE and ONNX export treat it as logits. The state
    dict holds ``student.*`` and ``kd_head.*``; (α, β) and the tap come from ``student.json``.
    """

    def __init__(self, student: nn.Module, kd_head: nn.Linear, tap: str, alpha: float, beta: float):
        super().__init__()
        self.student, self.kd_head = student, kd_head
        self.tap, self.alpha, self.beta = tap, float(alpha), float(beta)

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(CE-head logits, KD-head logits), each [B, C]."""
        logits, features = _features(self.student, self.tap, x)
        return logits, self.kd_head(features)

    def forward(self, x: Tensor) -> Tensor:
        return mix_log_probs(*self.heads(x), self.alpha, self.beta)


@METHODS.register("dho")
class DHO(Method):
    """``(1 − λ)·CE(h_ce) + λ·[KD_l(h_kd) + KD_u(h_kd)]`` on two linear heads sharing the student's features.

    The student's own head is the CE head and sees only labels; a second linear head, built in
    ``setup`` on the features at ``tap``, learns the teacher with Hinton's ``T²·KL`` on the labelled and on
    the unlabelled samples of the batch (two batch means, added, as in the official code). Neither loss
    reaches the other head, which is the point: the paper measures conflicting CE and KD gradients on a
    single head. At inference ``p = (1 − α)·softmax(z_ce) + α·softmax(z_kd/β)``; :meth:`select_mix` picks
    (α, β) on the validation split by grid search and :meth:`deploy` wraps the student in a
    :class:`DHOClassifier` that outputs ``log p``. Until ``select_mix`` runs, the config's ``alpha``
    (0.5) and ``beta`` (1) are used.
    """

    paper = (
        'Kang, Lee, Jang, Hwang, "Simple yet Effective Semi-supervised Knowledge Distillation from '
        'Vision-Language Models via Dual-Head Optimization", 2025, arXiv:2505.07675'
    )

    Config = DHOConfig
    needs_teacher = True
    uses_unlabeled = True

    def __init__(self, config: DHOConfig | None = None):
        super().__init__(config)
        self.kd_head: nn.Linear | None = None
        self.alpha, self.beta = self.config.alpha, self.config.beta
        self.selected = False  # True once select_mix has chosen (alpha, beta) on validation data

    def student_taps(self) -> list[str]:
        return [self.config.tap]

    def setup(self, student, teacher, info) -> None:
        feats = student[self.config.student_view].features[self.config.tap]
        logits = student[self.config.student_view].logits
        if feats.dim() != 2:
            raise ShapeMismatchError(
                f"dho: tap '{self.config.tap}' gives features of shape {list(feats.shape)}; DHO's KD head needs "
                "penultimate vectors [B, D] (mlp: body.act<last>, cnn: pool)"
            )
        self.kd_head = nn.Linear(feats.shape[1], logits.shape[-1]).to(device=feats.device, dtype=feats.dtype)
        self.__dict__["_student"] = info.student if info is not None else None  # a reference, not a submodule

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        cfg = self.config
        s_out = student[cfg.student_view]
        z_ce = s_out.logits
        z_kd = self.kd_head(s_out.features[cfg.tap])
        lam = cfg.kd_weight
        ce = (1 - lam) * masked_cross_entropy(z_ce, batch.target, all_labeled=batch.all_labeled)
        kd = lam * split_kd_loss(z_kd, teacher[cfg.teacher_view].logits, batch.labeled_mask(), cfg.temperature)
        return MethodOutput(ce + kd, {"ce": ce.detach(), "kd": kd.detach()}, z_ce)

    # -- inference ---------------------------------------------------------------------------------------

    def _wrap(self, student: nn.Module, alpha: float, beta: float) -> DHOClassifier:
        if self.kd_head is None:
            raise AlambicError("dho: the KD head does not exist yet (setup has not run)")
        return DHOClassifier(student, self.kd_head, self.config.tap, alpha, beta)

    @torch.no_grad()
    def tune_on_validation(self, student: nn.Module, val_x: Tensor, val_y: Tensor) -> None:
        self.select_mix(val_x, val_y, student)

    def select_mix(self, val_x: Tensor, val_y: Tensor, student: nn.Module | None = None,
                   batch_size: int = 512) -> tuple[float, float]:
        """Choose (α, β) on validation inputs/labels (:func:`choose_mix`) and keep them for :meth:`deploy`."""
        student = student if student is not None else self.__dict__.get("_student")
        if student is None:
            raise AlambicError("dho: select_mix needs the student (pass student=, or run setup first)")
        wrapper = self._wrap(student, self.alpha, self.beta)
        device = next(student.parameters()).device
        ce, kd = [], []
        with eval_mode(wrapper):
            for i in range(0, len(val_x), batch_size):
                z_ce, z_kd = wrapper.heads(val_x[i : i + batch_size].to(device))
                ce.append(z_ce.cpu())
                kd.append(z_kd.cpu())
        self.alpha, self.beta = choose_mix(torch.cat(ce), torch.cat(kd), val_y.cpu(),
                                           self.config.alphas, self.config.betas)
        self.selected = True
        return self.alpha, self.beta

    def deploy(self, student: nn.Module) -> nn.Module:
        return self._wrap(student, self.alpha, self.beta)

    def deploy_meta(self) -> dict[str, Any] | None:
        if self.kd_head is None:
            return None
        return {"tap": self.config.tap, "alpha": self.alpha, "beta": self.beta,
                "in_features": self.kd_head.in_features, "num_classes": self.kd_head.out_features,
                "selected_on_val": self.selected}

    @classmethod
    def rebuild(cls, student: nn.Module, meta: dict[str, Any]) -> nn.Module:
        missing = [k for k in ("tap", "alpha", "beta", "in_features", "num_classes") if k not in meta]
        if missing:
            raise AlambicError(f"dho: student.json deploy section lacks {missing}")
        head = nn.Linear(int(meta["in_features"]), int(meta["num_classes"]))
        return DHOClassifier(student, head, meta["tap"], float(meta["alpha"]), float(meta["beta"]))

