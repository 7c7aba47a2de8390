"""Losses between maps computed *within* one sample: spatial attention, spatial affinity, token relations.

Pure tensor functions: shapes in the docstrings, no configs, no modules. The teacher side is always a
constant target (detached), whatever its ``requires_grad``. Each comparison happens between maps of the
same size, so student and teacher may differ in width (channels); the positions (or tokens) must match.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from alambic.errors import ShapeMismatchError


__all__ = [
    "at_loss", "attention_map",
    "spatial_affinity", "spatial_affinity_loss",
    "token_relation", "token_relation_loss",
]


def _check_maps(student: Tensor, teacher: Tensor, what: str) -> None:
    """[B, C, *spatial] on both sides, same batch and spatial sizes (channels free)."""
    s, t = tuple(student.shape), tuple(teacher.shape)
    if student.dim() < 3 or teacher.dim() < 3:
        raise ShapeMismatchError(
            f"{what}: needs feature maps [B, C, H, W] (or [B, C, L]); got student {s} and teacher {t}"
        )
    if s[0] != t[0] or s[2:] != t[2:]:
        raise ShapeMismatchError(
            f"{what}: student {s} and teacher {t} must share the batch size and the spatial size "
            "(channels may differ)"
        )


def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    """The spatial attention map of Zagoruyko & Komodakis: ``Q = vec(Σ_c |A_c|^p) / ‖vec(Σ_c |A_c|^p)‖₂``.

    Args:
        feature: [B, C, *spatial] activations A.
        p: the exponent (the paper's F^p_sum; p = 2 in its experiments).
    Returns: [B, prod(spatial)], each row of unit L2 norm (a zero map stays zero).
    """
    if p <= 0:
        raise ValueError(f"attention_map: p must be > 0, got {p}")
    q = feature.abs().pow(p).sum(1).flatten(1)
    return F.normalize(q, p=2, dim=1)


def at_loss(student_feature: Tensor, teacher_feature: Tensor, p: float = 2) -> Tensor:
    """Attention transfer: mean squared difference of the L2-normalised spatial attention maps.

    Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of Convolutional
    Neural Networks via Attention Transfer", ICLR 2017, arXiv:1612.03928, Eq. (2):
    ``β/2 · Σ_j ‖Q_S^j/‖Q_S^j‖₂ − Q_T^j/‖Q_T^j‖₂‖_p`` with ``Q = vec(Σ_c |A_c|^p)``. Like the authors' code
    (and RepDistiller, whose β = 1000 it is calibrated for) this returns the *mean of the squared
    differences* over the batch and the positions, ``(1/(B·HW)) Σ_b Σ_i (Q̂_S[b,i] − Q̂_T[b,i])²``, for one
    layer pair; the method sums pairs and multiplies by β. Channels may differ, positions may not.

    Args:
        student_feature: [B, C_s, *spatial].
        teacher_feature: [B, C_t, *spatial] (same B and spatial sizes); treated as a constant.
        p: exponent of the attention map (2).
    Returns: scalar, in [0, 4/HW] since both maps have unit norm.
    """
    _check_maps(student_feature, teacher_feature, "at_loss")
    q_s = attention_map(student_feature, p)
    q_t = attention_map(teacher_feature.detach(), p)
    return (q_s - q_t).pow(2).mean()


def spatial_affinity(feature: Tensor, eps: float = 1e-7) -> Tensor:
    """FAKD's spatial affinity ``A = F̂ᵀF̂``: cosine similarity between every pair of positions.

    Each position's channel vector is divided by its L2 norm (+ ``eps``, as in the FAKD code), so
    ``A[b, i, j] = cos(F[b, :, i], F[b, :, j])``: symmetric, with a unit diagonal wherever a position is
    non-zero, and unchanged when any position is multiplied by a positive factor.

    Args: feature: [B, C, *spatial]. Returns: [B, HW, HW].
    """
    f = feature.flatten(2)  # [B, C, HW]
    f = f / (f.norm(dim=1, keepdim=True) + eps)
    return f.transpose(1, 2) @ f


def spatial_affinity_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """Mean absolute difference between the student's and the teacher's spatial affinity matrices.

    He et al., "FAKD: Feature-Affinity Based Knowledge Distillation for Efficient Image Super-Resolution",
    ICIP 2020 (the L_AD term of DSCLoRA, seed paper #8): per feature map, L2-normalise each spatial position
    over channels, ``A = F̂ᵀF̂ ∈ R^{HW×HW}``, and compare with L1:
    ``(1/(B·HW·HW)) Σ_b Σ_ij |A_S[b,i,j] − A_T[b,i,j]|`` (``nn.L1Loss``'s mean, as in the FAKD code), for
    one layer pair. Channels may differ; the spatial sizes must match.

    Args:
        student_feature: [B, C_s, *spatial].
        teacher_feature: [B, C_t, *spatial]; treated as a constant.
    Returns: scalar in [0, 2]; 0 when the student is any positive per-position rescaling of the teacher.
    """
    _check_maps(student_feature, teacher_feature, "spatial_affinity_loss")
    return (spatial_affinity(student_feature) - spatial_affinity(teacher_feature.detach())).abs().mean()


def token_relation(q: Tensor, k: Tensor, num_heads: int = 1) -> Tensor:
    """Attention-style token relations ``softmax(q_h k_hᵀ / √d_h)`` for ``num_heads`` relation heads.

    The channels of q and k are split into ``num_heads`` contiguous groups of ``d_h = C/num_heads`` (the
    layout of multi-head attention), so with ``num_heads`` equal to the model's heads each relation is one
    attention head's probability matrix.

    Args: q, k: [B, N, C] with C divisible by ``num_heads``. Returns: [B, num_heads, N, N] log-probabilities
    (rows log-normalised over the last axis).
    """
    if num_heads < 1:
        raise ValueError(f"token_relation: num_heads must be >= 1, got {num_heads}")
    if q.dim() != 3 or q.shape != k.shape:
        raise ShapeMismatchError(f"token_relation: q {tuple(q.shape)} and k {tuple(k.shape)} must both be [B, N, C]")
    b, n, c = q.shape
    if c % num_heads:
        raise ShapeMismatchError(f"token_relation: width {c} of q/k {tuple(q.shape)} is not divisible by num_heads={num_heads}")
    d = c // num_heads
    qh = q.reshape(b, n, num_heads, d).transpose(1, 2)
    kh = k.reshape(b, n, num_heads, d).transpose(1, 2)
    return F.log_softmax(qh @ kh.transpose(-2, -1) / math.sqrt(d), dim=-1)


def token_relation_loss(student_q: Tensor, student_k: Tensor, teacher_q: Tensor, teacher_k: Tensor,
                        num_heads: int = 1) -> Tensor:
    """KL between the teacher's and the student's query-key relation matrices, per relation head.

    Hybrid Distill (Shi et al., "Hybrid Distillation: Connecting Masked Autoencoders with Contrastive
    Learners", ICLR 2024, arXiv:2306.15876) has the student imitate the MIM teacher's token relations
    ``R = softmax(QKᵀ/√d)``; G2SD's ``cal_relation_loss`` (Huang et al., "Generic-to-Specific Distillation
    of Masked Autoencoders", CVPR 2023, arXiv:2302.14771) computes the same with the channels of each side
    split into the same number of relation heads:

        ``(1/(B·H·N)) Σ_b Σ_h Σ_i KL(R_T[b,h,i,:] ‖ R_S[b,h,i,:])``

    (sum over keys, mean over batch, heads and query tokens). Student and teacher widths may differ (each
    side uses its own ``d_h``); batch and token counts must match.

    Args:
        student_q, student_k: [B, N, C_s], C_s divisible by ``num_heads``.
        teacher_q, teacher_k: [B, N, C_t], C_t divisible by ``num_heads``; treated as constants.
        num_heads: relation heads H (G2SD's ``Ar``, 1 by default there).
    Returns: scalar ≥ 0; 0 when the relations match (e.g. when the student's q and k are the teacher's
    times the same orthogonal matrix).
    """
    sq, tq = tuple(student_q.shape), tuple(teacher_q.shape)
    if student_q.dim() != 3 or teacher_q.dim() != 3 or sq[:2] != tq[:2]:
        raise ShapeMismatchError(
            f"token_relation_loss: student q {sq} and teacher q {tq} must be [B, N, C] with the same B and "
            "token count N"
        )
    log_r_s = token_relation(student_q, student_k, num_heads)
    log_r_t = token_relation(teacher_q.detach(), teacher_k.detach(), num_heads)
    return (log_r_t.exp() * (log_r_t - log_r_s)).sum(-1).mean()
