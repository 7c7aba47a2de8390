"""Logit-level distillation beyond Hinton's KL: DKD, DIST, logit standardisation, per-sample weights.

Pure tensor functions: shapes in the docstrings, no configs, no modules. As in ``divergence.py`` the
teacher side is always treated as a constant target (detached), whatever its ``requires_grad``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from alambic.errors import ShapeMismatchError
from alambic.losses.divergence import _log_probs

__all__ = [
    "decoupled_kd_terms",
    "dist_loss",
    "dist_relations",
    "dkd_loss",
    "sample_weights",
    "standardize_logits",
    "weighted_kd_loss",
]


def _check_pair_2d(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.shape != teacher.shape or student.dim() != 2:
        raise ShapeMismatchError(
            f"{what}: needs [B, C] student and teacher logits of one shape, got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``Σ_c p·(log p − log q)`` per row, with ``0·log 0 = 0`` (a class the target gives probability 0)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


# ------------------------------------------------------------------------------------------------ DKD


def decoupled_kd_terms(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float = 4.0,
    reduction: Literal["mean", "none"] = "mean",
) -> tuple[Tensor, Tensor]:
    """TCKD and NCKD, the two parts of KD that DKD decouples, each times T².

    Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022, arXiv:2203.08679, §3.1. With
    ``p = softmax(z/T)`` and ``t`` the target class:

    - TCKD = ``KL(b^T ‖ b^S)`` over the binary distribution ``b = [p_t, 1 − p_t]`` (target vs the rest);
    - NCKD = ``KL(p̂^T ‖ p̂^S)`` over ``p̂ = softmax`` of the non-target logits only (target removed);

    and per sample ``KL(p^T ‖ p^S) = TCKD + (1 − p_t^T)·NCKD`` (Eq. 1): classical KD couples NCKD to the
    teacher's confidence, which DKD undoes. Computed in log space (``log(1 − p_t)`` as a difference of
    log-sum-exps) so a confident network does not produce ``log 0``.

    Args:
        student_logits: [B, C], C ≥ 2.
        teacher_logits: [B, C]; treated as a constant.
        target: [B] int64 class ids in ``[0, C)`` (no ``IGNORE_INDEX``: pick a class for unlabelled rows).
        temperature: T > 0.
        reduction: ``"mean"`` over the batch (scalars) or ``"none"`` ([B] each).
    Returns:
        ``(tckd, nckd)``, both already multiplied by T².
    """
    _check_pair_2d(student_logits, teacher_logits, "decoupled_kd_terms")
    _check_temperature(temperature)
    b, c = student_logits.shape
    if c < 2:
        raise ShapeMismatchError(f"decoupled_kd_terms: needs at least 2 classes, got logits {(b, c)}")
    if target.shape != (b,):
        raise ShapeMismatchError(
            f"decoupled_kd_terms: target {tuple(target.shape)} does not match logits {(b, c)} (expected ({b},))"
        )
    if bool(((target < 0) | (target >= c)).any()):
        raise ValueError(
            f"decoupled_kd_terms: target holds a class outside [0, {c}) (unlabelled rows need a class, "
            "e.g. the teacher's argmax)"
        )
    gt = F.one_hot(target, c).bool()

    def parts(z: Tensor) -> tuple[Tensor, Tensor]:
        z = z / temperature
        log_all = torch.logsumexp(z, dim=-1)
        rest = z[~gt].reshape(b, c - 1)  # non-target logits, class order kept
        log_rest = torch.logsumexp(rest, dim=-1)
        z_t = z.gather(1, target[:, None])[:, 0]
        binary = torch.stack([z_t - log_all, log_rest - log_all], dim=-1)  # log [p_t, 1 − p_t]
        return binary, rest - log_rest[:, None]  # log p̂ over the C − 1 other classes

    bin_s, rest_s = parts(student_logits)
    bin_t, rest_t = parts(teacher_logits.detach())
    scale = temperature**2
    tckd = _kl_rows(bin_t, bin_s) * scale
    nckd = _kl_rows(rest_t, rest_s) * scale
    if reduction == "none":
        return tckd, nckd
    return tckd.mean(), nckd.mean()


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> Tensor:
    """Decoupled KD: ``α·TCKD + β·NCKD`` (both times T²), averaged over the batch.

    Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022, arXiv:2203.08679, Eq. (2); defaults
    α = 1, β = 8, T = 4 as in the official mdistiller config (CIFAR-100). ``α = β = 1`` is not KD: KD
    weighs NCKD by ``1 − p_t^T`` per sample (see :func:`decoupled_kd_terms`).

    Args: student_logits, teacher_logits: [B, C]; target: [B] class ids in [0, C). Returns: scalar.
    """
    tckd, nckd = decoupled_kd_terms(student_logits, teacher_logits, target, temperature)
    return alpha * tckd + beta * nckd


# ----------------------------------------------------------------------------------------------- DIST


def _pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``: [N, D], [N, D] -> [N].

    The cosine of the centred rows, ``⟨a − ā, b − b̄⟩ / (max(‖a − ā‖, eps)·max(‖b − b̄‖, eps))``: each
    norm is clamped on its own (as ``torch.nn.functional.cosine_similarity`` does), so the result is
    exactly DIST's Eq. (3) ``Cov/(Std·Std)`` unless a row is constant (norm below ``eps``), which then gets
    correlation 0 instead of NaN. Not ``‖a‖·‖b‖ + eps``: on near-uniform probabilities (small logits, a
    high T) each centred norm is ~1e-5 and their product ~1e-9, so an ``eps`` of 1e-8 added to it
    would pull ρ towards 0 and shrink the gradient several-fold.
    """
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1).clamp_min(eps) * b.norm(dim=-1).clamp_min(eps))


def dist_relations(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, eps: float = 1e-8
) -> tuple[Tensor, Tensor]:
    """DIST's two relation losses, each times T²: ``(T²·L_inter, T²·L_intra)``.

    Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022, arXiv:2205.10536,
    Eqs. (4)-(6): with ``Y = softmax(Z/T)`` row-wise and ρ the Pearson correlation,
    ``L_inter = 1 − mean_i ρ(Y^S_i,:, Y^T_i,:)`` (each sample's ranking of the classes, the rows) and
    ``L_intra = 1 − mean_c ρ(Y^S_:,c, Y^T_:,c)`` (each class's ranking of the batch's samples, the
    columns). Pearson is invariant to a positive scale and a shift of either side, so the student only has
    to match the teacher's predictions up to a linear map (the paper's "relaxed match"), not exactly as KL
    demands. The intra-class term needs B ≥ 2; with B = 1 it is the constant T² (no gradient).

    ρ is Eq. (3) exactly whenever both centred vectors have norm ≥ ``eps`` (see :func:`_pearson_rows`).
    The authors' code (``lib/models/losses/dist_kd.py`` in hunto/image_classification_sota, linked from
    hunto/DIST_KD) divides by ``‖a‖·‖b‖ + eps`` instead; the two agree to 1e-6 relative or better on ordinary
    logits, but on near-uniform probabilities (logits ~1e-3, T = 8) that guard lowers the loss by several
    percent and shrinks its gradient several-fold, so alambic follows the paper's equation there.

    Args:
        student_logits: [B, C].
        teacher_logits: [B, C]; treated as a constant.
        temperature: T > 0.
        eps: lower bound of each centred norm (a constant row or column has correlation 0, not NaN).
    Returns:
        ``(inter, intra)`` scalars.
    """
    _check_pair_2d(student_logits, teacher_logits, "dist_loss")
    _check_temperature(temperature)
    y_s = F.softmax(student_logits / temperature, dim=-1)
    y_t = F.softmax(teacher_logits.detach() / temperature, dim=-1)
    scale = temperature**2
    inter = scale * (1 - _pearson_rows(y_s, y_t, eps).mean())
    intra = scale * (1 - _pearson_rows(y_s.t(), y_t.t(), eps).mean())
    return inter, intra


def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    eps: float = 1e-8,
) -> Tensor:
    """DIST: ``β·T²·L_inter + γ·T²·L_intra`` (see :func:`dist_relations`), batch statistics.

    T² multiplies each term as in the official code; defaults β = γ = T = 1 are its ImageNet setting.

    Args: student_logits, teacher_logits: [B, C], teacher treated as a constant. Returns: scalar.
    """
    inter, intra = dist_relations(student_logits, teacher_logits, temperature, eps)
    return beta * inter + gamma * intra


# -------------------------------------------------------------------------------- logit standardisation


def standardize_logits(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Z-score each logit vector: ``(z − mean(z)) / (std(z) + eps)`` over the last (class) dimension.

    Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024, arXiv:2403.04512, Alg. 1:
    applied to both teacher and student before the temperature softmax, so the student matches the
    teacher's logit *relations* rather than their range; the result is invariant to ``a·z + b`` (a > 0)
    per row. ``std`` is the unbiased (C − 1) estimate and ``eps = 1e-7`` is added to it, as in the
    official code (torch's default ``std``); the paper's 1/C form differs by a constant factor
    ``sqrt(C/(C − 1))``, i.e. by a rescaled base temperature.

    Args: logits: [..., C], C ≥ 2. Returns: same shape.
    """
    if logits.shape[-1] < 2:
        raise ShapeMismatchError(f"standardize_logits: needs at least 2 classes, got logits {tuple(logits.shape)}")
    mean = logits.mean(-1, keepdim=True)
    std = logits.std(-1, keepdim=True)
    return (logits - mean) / (std + eps)


# --------------------------------------------------------------------------------- per-sample weights


def sample_weights(
    teacher_logits: Tensor,
    kind: Literal["none", "confidence", "margin"],
    temperature: float = 1.0,
    normalize: bool = True,
    eps: float = 1e-12,
) -> Tensor:
    """Per-sample weights of a distillation term from the teacher's confidence, detached: [..., C] -> [...].

    - ``confidence``: the teacher's top-1 probability ``max_c p_c``, ``p = softmax(z/T)``.
    - ``margin``: top-1 minus top-2 probability, WAD's weight ``w = s_(1) − s_(2)`` (seed #15, WAD
      ``evals/eval.py``: there ``s`` are prototype scores, here the teacher's probabilities): a sample the
      teacher cannot separate from its runner-up class (two equal top probabilities) gets weight 0.
    - ``none``: all ones.

    With ``normalize`` (default) the weights are divided by their batch mean, so they average 1 and the
    weighted term keeps the scale of the unweighted one (α and the learning rate keep their meaning);
    only the *relative* weights within a batch change. A batch whose raw weights are all 0 stays all 0.

    Args: teacher_logits: [..., C]; kind; temperature T > 0; normalize. Returns: [...], no gradient.
    """
    if kind not in ("none", "confidence", "margin"):
        raise ValueError(f"sample_weights: kind must be none, confidence or margin, got {kind!r}")
    _check_temperature(temperature)
    z = teacher_logits.detach()
    if kind == "none":
        return torch.ones(z.shape[:-1], dtype=z.dtype, device=z.device)
    if kind == "margin" and z.shape[-1] < 2:
        raise ShapeMismatchError(f"sample_weights: margin needs at least 2 classes, got logits {tuple(z.shape)}")
    p = F.softmax(z / temperature, dim=-1)
    if kind == "confidence":
        w = p.max(-1).values
    else:
        top = p.topk(2, dim=-1).values
        w = top[..., 0] - top[..., 1]
    if normalize:
        w = w / w.mean().clamp_min(eps)
    return w


def weighted_kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, weights: Tensor, temperature: float = 4.0
) -> Tensor:
    """``T² · mean_i w_i · KL(softmax(t_i/T) ‖ softmax(s_i/T))``: Hinton's KD with a weight per sample.

    With all weights 1 it equals :func:`alambic.losses.kd_loss`. The weights are detached (a constant
    per sample, as WAD's pseudo-label weights are).

    Args: student_logits, teacher_logits: [B, C]; weights: [B]. Returns: scalar.
    """
    log_p_s, log_p_t = _log_probs(student_logits, teacher_logits, temperature, "weighted_kd_loss")
    if weights.shape != student_logits.shape[:-1]:
        raise ShapeMismatchError(
            f"weighted_kd_loss: weights {tuple(weights.shape)} do not match logits {tuple(student_logits.shape)}"
        )
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return (weights.detach().reshape(-1) * kl).mean() * temperature**2
