"""Divergences between a student's and a teacher's class distributions.

Pure tensor functions: shapes in the docstrings, no configs, no modules. The teacher side is always
treated as a constant target (detached), whatever its ``requires_grad``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from alambic.data.batch import IGNORE_INDEX
from alambic.errors import ShapeMismatchError


__all__ = ['js_loss', 'kd_loss', 'masked_cross_entropy']


def _same_shape(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ShapeMismatchError(
            f"{what}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} shapes differ"
        )


def upcast(t: Tensor) -> Tensor:
    """``t`` in float32 when it is half precision (bf16/fp16 logits from an autocast forward), else as it is:
    softmaxes and logs of half-precision logits lose the small probabilities a divergence is made of."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _log_probs(student_logits: Tensor, teacher_logits: Tensor, temperature: float, what: str) -> tuple[Tensor, Tensor]:
    """Checked, temperature-scaled log-softmax of both sides as [N, C] rows (the teacher detached)."""
    _same_shape(student_logits, teacher_logits, what)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    c = student_logits.shape[-1]
    log_p_s = F.log_softmax(upcast(student_logits.reshape(-1, c)) / temperature, dim=-1)
    log_p_t = F.log_softmax(upcast(teacher_logits.detach().reshape(-1, c)) / temperature, dim=-1)
    return log_p_s, log_p_t


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton's distillation loss: ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, averaged over the batch.

    Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015, arXiv:1503.02531, §2:
    the gradient of the soft cross-entropy with respect to a logit is ``(q_i − p_i)/T``, so soft-target
    gradients shrink as ``1/T²``; multiplying by ``T²`` keeps their magnitude roughly unchanged when T
    changes (and comparable to the hard-label term). KL differs from the soft cross-entropy by the
    teacher's entropy, a constant with no gradient, and is 0 when the distributions match.

    Args:
        student_logits: [B, C] (or [B, ..., C]; every leading position is a sample).
        teacher_logits: same shape; treated as a constant.
        temperature: T > 0.
    Returns:
        scalar: the sum over classes, mean over samples ("batchmean"), times T².
    """
    log_p_s, log_p_t = _log_probs(student_logits, teacher_logits, temperature, "kd_loss")
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return kl.mean() * temperature**2


def js_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Jensen–Shannon divergence ``½KL(p_t‖m) + ½KL(p_s‖m)``, ``m = ½(p_t + p_s)``, times T², batch mean.

    The symmetric divergence SSLD trains on (Cui et al., "Beyond Self-Supervision: A Simple Yet Effective
    Network Distillation Alternative to Improve Backbones", 2021, arXiv:2103.05959), reported there to
    beat KL by about 0.2 points with teacher soft labels and no ground truth. Bounded by ``ln 2 · T²``.

    Args: student_logits, teacher_logits: [B, C]; teacher treated as a constant. Returns: scalar.
    """
    log_p_s, log_p_t = _log_probs(student_logits, teacher_logits, temperature, "js_loss")
    log_m = torch.logsumexp(torch.stack([log_p_s, log_p_t]), dim=0) - math.log(2.0)
    kl_t = (log_p_t.exp() * (log_p_t - log_m)).sum(-1)
    kl_s = (log_p_s.exp() * (log_p_s - log_m)).sum(-1)
    return 0.5 * (kl_t + kl_s).mean() * temperature**2


def masked_cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0,
                         all_labeled: bool = False) -> Tensor:
    """Cross-entropy averaged over the labelled samples only (target ``IGNORE_INDEX`` = unlabelled).

    Unlike ``F.cross_entropy(..., ignore_index=-100)`` a batch with no labelled sample gives 0 (with a
    graph, so ``backward`` still works), not NaN: in label-scarce runs such batches are common.
    ``all_labeled=True`` promises every target is a real label and takes plain cross-entropy's faster path.

    Args: logits [B, C]; target [B] int64. Returns: scalar.
    """
    if all_labeled:
        return F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    # sum over the labelled rows / their count (at least 1): no host sync, no boolean gather
    total = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing,
                            reduction="sum")
    return total / (target != IGNORE_INDEX).sum().clamp_min(1)
