"""Semi-supervised distillation losses: consistency, thresholded pseudo-labels, split labelled/unlabelled KD.

Pure tensor functions: shapes in the docstrings, no configs, no modules. The teacher side is always a
constant target (detached), whatever its ``requires_grad``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from alambic.losses.divergence import _log_probs, _same_shape

__all__ = ["pseudo_label_loss", "softmax_mse_loss", "split_kd_loss"]


def softmax_mse_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean-teacher consistency cost: ``mean_{i,c} (softmax(s_i)_c − softmax(t_i)_c)²``.

    Tarvainen & Valpola, "Mean teachers are better role models", 2017, arXiv:1703.01780, §2:
    ``J(θ) = E‖f(x, θ', η') − f(x, θ, η)‖²`` on the class probabilities; the official code divides the
    squared distance by the number of classes, i.e. averages over classes and samples. Unlike KL, the
    cost is bounded (by 2/C per sample), so a confidently wrong teacher cannot blow it up.

    Args: student_logits, teacher_logits: [B, C]; teacher treated as a constant. Returns: scalar.
    """
    _same_shape(student_logits, teacher_logits, "softmax_mse_loss")
    p_s = student_logits.softmax(-1)
    p_t = teacher_logits.detach().softmax(-1)
    return ((p_s - p_t) ** 2).mean()


def pseudo_label_loss(student_logits: Tensor, teacher_logits: Tensor, threshold: float = 0.95,
                      rows: Tensor | None = None) -> Tensor:
    """Confidence-thresholded hard pseudo-labels: ``(1/|R|) Σ_{i∈R} 1[max_c q_ic ≥ τ] · CE(s_i, argmax_c q_ic)``.

    ``q = softmax(t)`` is the teacher's prediction. Lee, "Pseudo-Label: The Simple and Efficient
    Semi-Supervised Learning Method for Deep Neural Networks", ICML 2013 workshop, trains on the arg-max
    class of every unlabelled sample; Sohn et al., "FixMatch", 2020, arXiv:2001.07685, Eq. (4), keeps only
    those whose confidence reaches τ and normalises by the number of unlabelled samples |R| (not by the
    number kept), so a teacher that is rarely confident contributes a small term rather than a noisy one.

    Args:
        student_logits, teacher_logits: [B, C]; the teacher is a constant.
        threshold: τ in [0, 1] (0 keeps every row: Lee's plain pseudo-label).
        rows: [B] bool, the samples that take part (the unlabelled ones); None = every row.
    Returns: scalar (0 with a graph when no row takes part).
    """
    _same_shape(student_logits, teacher_logits, "pseudo_label_loss")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"pseudo_label_loss: threshold must be in [0, 1], got {threshold}")
    confidence, pseudo = teacher_logits.detach().softmax(-1).max(-1)
    keep = confidence >= threshold
    if rows is not None:
        keep = keep & rows
        count = rows.sum()
    else:
        count = torch.tensor(len(keep), device=keep.device)
    per_sample = F.cross_entropy(student_logits, pseudo, reduction="none")
    return (per_sample * keep).sum() / count.clamp_min(1)


def split_kd_loss(student_logits: Tensor, teacher_logits: Tensor, labeled: Tensor,
                  temperature: float = 2.0) -> Tensor:
    """DHO's distillation term: ``T²·mean_{i∈L} KL(q_i ‖ p_i) + T²·mean_{i∈U} KL(q_i ‖ p_i)``.

    ``p = softmax(s/T)``, ``q = softmax(t/T)``. Kang et al., "Simple yet Effective Semi-supervised
    Knowledge Distillation from Vision-Language Models via Dual-Head Optimization", 2025, arXiv:2505.07675:
    the labelled batch and the unlabelled batch each contribute a "batchmean" Hinton KD term and the two
    are added; here both halves come from one batch split by ``labeled``. A half with no row adds 0.

    Args:
        student_logits, teacher_logits: [B, C]; the teacher is a constant.
        labeled: [B] bool.
        temperature: T > 0.
    Returns: scalar.
    """
    log_p_s, log_p_t = _log_probs(student_logits, teacher_logits, temperature, "split_kd_loss")
    if labeled.shape != log_p_s.shape[:1]:
        raise ValueError(f"split_kd_loss: labeled has shape {tuple(labeled.shape)}, expected [{log_p_s.shape[0]}]")
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    lab = labeled.to(kl.dtype)
    n_l = lab.sum()
    n_u = len(lab) - n_l
    mean_l = (kl * lab).sum() / n_l.clamp_min(1)
    mean_u = (kl * (1 - lab)).sum() / n_u.clamp_min(1)
    return (mean_l + mean_u) * temperature**2
