"""Losses between relations *across the samples of a batch*: SP, RKD, PKT, and MLKD's layer matching.

Pure tensor functions: shapes in the docstrings, no configs, no modules. The teacher side is always a
constant target (detached), whatever its ``requires_grad``. Relations are B×B (or B×B×B) matrices, so
student and teacher features may have different widths; only the batch must match.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from alambic.errors import ShapeMismatchError


__all__ = [
    "sp_similarity", "sp_loss",
    "rkd_distance_loss", "rkd_angle_loss", "rkd_loss",
    "pkt_loss",
    "nearest_layers_loss",
]


def _same_batch(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.dim() < 2 or teacher.dim() < 2 or student.shape[0] != teacher.shape[0]:
        raise ShapeMismatchError(
            f"{what}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must be [B, ...] "
            "with the same batch size B"
        )


# ------------------------------------------------------------------------------------------------- SP


def sp_similarity(feature: Tensor) -> Tensor:
    """SP's batch similarity ``G = row_L2_normalise(F Fᵀ)`` with F the features flattened to [B, D].

    Tung & Mori, ICCV 2019, arXiv:1907.09682, Eq. (2): ``G_[i,:] = G̃_[i,:] / ‖G̃_[i,:]‖₂``, a row-wise
    **L2** normalisation, and it is deliberate here. Some reimplementations (torchdistill's
    ``normalize(G, 1)``, i.e. ``p=1``) divide each row by its L1 norm instead: a different loss, not the
    paper's; do not "fix" this to match them (tests/unit/test_loss_references.py pins Eq. 2).

    Args: feature: [B, ...]. Returns: [B, B], each row of unit L2 norm (a zero row stays zero).
    """
    f = feature.flatten(1)
    return F.normalize(f @ f.t(), p=2, dim=1)


def sp_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """Similarity-preserving KD for one layer pair: ``‖G_S − G_T‖_F² / B²``.

    Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019, arXiv:1907.09682, Eqs. (1)-(4):
    ``G = Q Qᵀ`` with Q the activation map reshaped to [B, C·H·W], each row L2-normalised; the loss of a
    layer pair is the squared Frobenius norm of the difference divided by B² (the method sums pairs and
    multiplies by γ, 3000 on CIFAR). It depends only on inner products between samples, so it is
    unchanged by any permutation of the channels and independent of the feature width.

    Args:
        student_feature: [B, ...] (any width).
        teacher_feature: [B, ...] (any width, same B); treated as a constant.
    Returns: scalar, sum of squared differences over the B×B entries divided by B².
    """
    _same_batch(student_feature, teacher_feature, "sp_loss")
    b = student_feature.shape[0]
    diff = sp_similarity(student_feature) - sp_similarity(teacher_feature.detach())
    return diff.pow(2).sum() / (b * b)


# ------------------------------------------------------------------------------------------------ RKD


def _pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """[B, D] -> [B, B] Euclidean distances with an exact-zero diagonal (no NaN gradient at 0)."""
    sq = e.pow(2).sum(1)
    d2 = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * e @ e.t()).clamp_min(eps)
    d = d2.sqrt()
    return d * (1 - torch.eye(len(e), dtype=d.dtype, device=d.device))


def _normalised_distances(e: Tensor) -> Tensor:
    """Distances divided by their mean over distinct pairs, μ = Σ_{i≠j} d_ij / #(d_ij > 0) (RKD Eq. 4)."""
    d = _pairwise_distances(e)
    positive = (d > 0).sum().clamp_min(1)
    mu = (d.sum() / positive).clamp_min(1e-12)
    return d / mu


def _angles(e: Tensor) -> Tensor:
    """[B, D] -> [B, B, B]: ``A[j, i, k] = <e_ij, e_kj>`` with ``e_ij = (t_i − t_j)/‖t_i − t_j‖`` (RKD Eq. 6).

    Entries with i = j or k = j are 0 (the zero difference vector normalises to 0).
    """
    diff = e.unsqueeze(0) - e.unsqueeze(1)  # [j, i] = e_i - e_j
    unit = F.normalize(diff, p=2, dim=2)
    return unit @ unit.transpose(1, 2)


def rkd_distance_loss(student_embedding: Tensor, teacher_embedding: Tensor) -> Tensor:
    """RKD distance-wise term: Huber (δ = 1) between mean-normalised pairwise distances, mean over B².

    Park et al., "Relational Knowledge Distillation", CVPR 2019, arXiv:1904.05068, Eqs. (4)-(5):
    ``ψ_D(t_i, t_j) = ‖t_i − t_j‖₂ / μ``, μ the mean distance over the batch's distinct pairs; the loss is
    ``l_δ`` (Huber = smooth-L1 with δ = 1) averaged over all B² entries (the zero diagonal included, as in
    the authors' code). Invariant to rotations, translations and uniform scaling of either space.

    Args: student_embedding [B, ...], teacher_embedding [B, ...] (constant). Returns: scalar.
    """
    _same_batch(student_embedding, teacher_embedding, "rkd_distance_loss")
    d_s = _normalised_distances(student_embedding.flatten(1))
    d_t = _normalised_distances(teacher_embedding.detach().flatten(1))
    return F.smooth_l1_loss(d_s, d_t, beta=1.0)


def rkd_angle_loss(student_embedding: Tensor, teacher_embedding: Tensor) -> Tensor:
    """RKD angle-wise term: Huber (δ = 1) between the cosines of every triplet's angle, mean over B³.

    Park et al. 2019, arXiv:1904.05068, Eqs. (6)-(7): ``ψ_A(t_i, t_j, t_k) = cos∠t_i t_j t_k = <e_ij, e_kj>``
    with ``e_ij = (t_i − t_j)/‖t_i − t_j‖₂``; the authors' code averages over all B³ index triplets
    (degenerate ones are 0 on both sides). Invariant to rotations, translations and uniform scaling.

    Args: student_embedding [B, ...], teacher_embedding [B, ...] (constant). Returns: scalar.
    """
    _same_batch(student_embedding, teacher_embedding, "rkd_angle_loss")
    a_s = _angles(student_embedding.flatten(1))
    a_t = _angles(teacher_embedding.detach().flatten(1))
    return F.smooth_l1_loss(a_s, a_t, beta=1.0)


def rkd_loss(student_embedding: Tensor, teacher_embedding: Tensor, distance_weight: float = 25.0,
             angle_weight: float = 50.0) -> Tensor:
    """Relational KD: ``distance_weight · L_RKD-D + angle_weight · L_RKD-A`` (Park et al. 2019, Eq. 8).

    The paper (and RepDistiller) use λ_D = 25 and λ_A = 50 on CIFAR-100 / metric learning. See
    :func:`rkd_distance_loss` and :func:`rkd_angle_loss` for the terms and their reductions.

    Args:
        student_embedding: [B, D_s] (or [B, ...], flattened).
        teacher_embedding: [B, D_t]; treated as a constant.
        distance_weight, angle_weight: λ_D, λ_A ≥ 0.
    Returns: scalar.
    """
    if distance_weight < 0 or angle_weight < 0:
        raise ValueError(f"rkd_loss: weights must be >= 0, got distance {distance_weight}, angle {angle_weight}")
    loss = student_embedding.new_zeros(())
    if distance_weight:
        loss = loss + distance_weight * rkd_distance_loss(student_embedding, teacher_embedding)
    if angle_weight:
        loss = loss + angle_weight * rkd_angle_loss(student_embedding, teacher_embedding)
    return loss


# ------------------------------------------------------------------------------------------------ PKT


def _cosine_conditionals(e: Tensor, eps: float) -> Tensor:
    """[B, D] -> [B, B]: cosine kernel ``½(cos + 1)`` with every row divided by its sum."""
    unit = e / (e.norm(dim=1, keepdim=True) + eps)
    k = (unit @ unit.t() + 1) / 2
    return k / k.sum(dim=1, keepdim=True)


def pkt_loss(student_embedding: Tensor, teacher_embedding: Tensor, eps: float = 1e-7) -> Tensor:
    """Probabilistic knowledge transfer: KL(teacher ‖ student) between cosine-kernel conditionals.

    Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018,
    arXiv:1803.10837, Eqs. (7)-(10) with the cosine kernel ``K(a, b) = ½(aᵀb/(‖a‖‖b‖) + 1)``: each sample's
    row of kernel values is normalised to a distribution ``p_{j|i}``. Following the authors' code (and
    RepDistiller, whose weight 3·10⁴ is calibrated for it) the row keeps the self-similarity term and the
    loss is the *mean* over all B² entries ``(1/B²) Σ_ij p^T_{j|i} log((p^T_{j|i} + ε)/(p^S_{j|i} + ε))``,
    ε = 1e-7.

    Args:
        student_embedding: [B, D_s] (or [B, ...], flattened).
        teacher_embedding: [B, D_t]; treated as a constant.
    Returns: scalar ≥ 0 (up to ε); 0 when the two spaces have the same cosine similarities.
    """
    _same_batch(student_embedding, teacher_embedding, "pkt_loss")
    p_s = _cosine_conditionals(student_embedding.flatten(1), eps)
    p_t = _cosine_conditionals(teacher_embedding.detach().flatten(1), eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


# ----------------------------------------------------------------------------------------------- MLKD


def nearest_layers_loss(student_feature: Tensor | Sequence[Tensor], teacher_features: Sequence[Tensor],
                        weights: Sequence[float] | None = None, top_k: int | None = None) -> Tensor:
    """MLKD's similarity-based intermediate-layer term for one student layer l.

    Wu et al., "Multi-Level Knowledge Distillation for Out-of-Distribution Detection in Text", ACL 2023,
    arXiv:2211.11300, §3: the similarity of student layer l to teacher layer j at position i is
    ``s_{l,i}(j) = −‖h^S_{l,i} − W_j h^T_{j,i}‖₂`` (the caller applies the learned map ``W_j``); the
    similarities are ranked over j, and ``L_(l) = (1/N)(1/K) Σ_i Σ_k −β_k · s^k_{l,i}`` with ``s^k`` the
    k-th largest: the β-weighted distances to the K *nearest* teacher layers, averaged over the N positions.
    A position is a sample for [B, D] features and a (sample, token) pair for [B, T, D] ones; other shapes
    are flattened per sample.

    Args:
        student_feature: [B, D] or [B, T, D], compared with every teacher feature; or a sequence of J
            tensors, the j-th compared with ``teacher_features[j]`` (when the map is on the student side,
            ``W_j h^S_l``).
        teacher_features: J tensors, each of the shape of the student feature it is compared with
            (``W_j h^T_j``: the teacher activations are constants, a map applied to them is trained).
        weights: β_1..β_K (default all 1).
        top_k: K (default: all J layers).
    Returns: scalar.
    """
    j = len(teacher_features)
    if j == 0:
        raise ValueError("nearest_layers_loss: needs at least one teacher layer")
    students = [student_feature] * j if isinstance(student_feature, Tensor) else list(student_feature)
    if len(students) != j:
        raise ValueError(f"nearest_layers_loss: {len(students)} student features for {j} teacher layers")
    k = j if top_k is None else top_k
    if not 1 <= k <= j:
        raise ValueError(f"nearest_layers_loss: top_k must be in 1..{j} (the teacher layers given), got {top_k}")
    beta = [1.0] * k if weights is None else list(weights)
    if len(beta) != k:
        raise ValueError(f"nearest_layers_loss: {len(beta)} weights for top_k={k} layers")
    dists = []
    for s, t in zip(students, teacher_features):
        s = s if s.dim() in (2, 3) else s.flatten(1)
        t = t if t.dim() == s.dim() else t.flatten(1)
        if t.shape != s.shape:
            raise ShapeMismatchError(
                f"nearest_layers_loss: student feature {tuple(s.shape)} and teacher feature {tuple(t.shape)} "
                "shapes differ"
            )
        dists.append((s - t).pow(2).sum(-1).clamp_min(1e-12).sqrt())  # [B] or [B, T]
    nearest = torch.stack(dists, -1).topk(k, dim=-1, largest=False).values  # ascending distance
    w = torch.tensor(beta, dtype=nearest.dtype, device=nearest.device)
    return (nearest * w).sum(-1).mean() / k
